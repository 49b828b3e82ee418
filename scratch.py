"""Train an AutoFormer supernet from scratch (weight entanglement: one random subnet per step), or with
``--arch`` retrain one subnet from scratch (the official ``--mode retrain``), with the same recipe but the
official retrain defaults of 300 epochs and 5 of warmup.

    python scratch.py --dataset digits                       # the bundled demo, a few minutes on a CPU
    python scratch.py --gpus 4 --datapath path/to/imagenet --batch-size 256 --warmup 20 --epochs 500 \\
                      --learning-rate 0.001
    python scratch.py --gpus 8 --datapath path/to/imagenet --arch autoformer-tiny --output outputs/retrain-T
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cli import (add_arch_arg, add_name_arg, add_training_args, from_flags, load_arch_arg, parse_checked, recipe_parser,
                 run_main, space_arg, space_kwargs_of)
import data
from engine import TrainingRun, train_supernet
from space import SEARCHED, complete_arch, complete_space_kwargs

# The paper's recipe (DeiT's) for ImageNet; the demo recipe is sized for a laptop CPU. The small datasets'
# runs last a few epochs: a per-epoch schedule would hold a 1-epoch run at --warmup-lr, so theirs is per step.
RECIPES = {
    'imagenet': dict(epochs=500, warmup=20, min_lr=1e-5, warmup_lr=1e-6, weight_decay=0.05, smoothing=0.1,
                     mixup=0.8, cutmix=1.0, drop_path=0.1, batch_size=128, schedule='epoch'),
    'cifar10': dict(epochs=300, warmup=20, min_lr=1e-5, warmup_lr=1e-6, weight_decay=0.05, smoothing=0.1,
                    mixup=0.8, cutmix=1.0, drop_path=0.1, batch_size=128, schedule='epoch'),
    'digits': dict(epochs=40, warmup=2, learning_rate=2e-3, min_lr=1e-5, warmup_lr=1e-6, weight_decay=0.05,
                   smoothing=0.1, mixup=0.0, cutmix=0.0, drop_path=0.0, batch_size=32, schedule='step'),
    # Small images: no Mixup/CutMix or RandAugment (they slow a short run down), flips only (data.py);
    # batch 128 trains 1.4x the images per second of batch 64 on a 2-core CPU; 26 epochs take 18 minutes.
    'fashion-mnist': dict(epochs=26, warmup=2, learning_rate=1.5e-3, min_lr=1e-5, warmup_lr=1e-6, weight_decay=0.05,
                          smoothing=0.1, mixup=0.0, cutmix=0.0, drop_path=0.0, batch_size=128, schedule='step'),
}
RECIPES['folder'] = RECIPES['imagenet']
# Retraining one subnet (--arch), the official --mode retrain: its script's defaults, 300 epochs and 5 of warmup,
# where the supernet recipe is the paper's (the small datasets keep theirs).
RETRAIN = {dataset: dict(epochs=300, warmup=5) for dataset in ('imagenet', 'cifar10', 'folder')}
DEFAULT_PRESETS = {'digits': 'demo', 'fashion-mnist': 'fashion'}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, dataset, recipe = recipe_parser(argv, RECIPES, 'imagenet', 'scratch', __doc__)
    if retraining(argv):
        recipe = {**recipe, **RETRAIN.get(dataset, {})}
    add_name_arg(parser, 'search space preset (default: demo for digits, fashion for fashion-mnist, tiny otherwise)')
    add_arch_arg(parser, 'retrain this one subnet from scratch',
                 ' (whose preset is then the default --name); the defaults are then the official retrain recipe, '
                 f"{RETRAIN['imagenet']['epochs']} epochs with {RETRAIN['imagenet']['warmup']} of warmup, except on "
                 'digits and fashion-mnist')
    add_training_args(parser, recipe)
    args = parse_checked(parser, argv)
    args.dataset = dataset
    released = (args.arch or '').removeprefix('autoformer-')
    args.name = args.name or (released if released in SEARCHED else DEFAULT_PRESETS.get(dataset, 'tiny'))
    return args


def retraining(argv: list[str] | None) -> bool:
    """Whether the command line names one subnet to retrain (``--arch``), read before the parser is built."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--arch', default=None)
    return pre.parse_known_args(argv)[0].arch is not None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    space_kwargs = space_kwargs_of(space_arg(args))
    space_kwargs['num_labels'] = data.num_classes(args.dataset, args.datapath)
    if args.img_size:
        space_kwargs['img_size'] = args.img_size
    space_kwargs = complete_space_kwargs(**space_kwargs)
    arch = complete_arch(load_arch_arg(args.arch), space_kwargs) if args.arch else None
    train_supernet(from_flags(TrainingRun, args, output=Path(args.output)), space_kwargs, arch=arch)


if __name__ == '__main__':
    run_main(main)
