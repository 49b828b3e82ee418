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

from cli import (add_arch_arg, add_name_arg, add_training_args, check_recipe, from_flags, load_arch_arg, parse_checked,
                 recipe_parser, run_main, space_arg, space_kwargs_of)
import folders
import recipes
from arch import SEARCHED, complete_arch, complete_space_kwargs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, recipe = recipe_parser(argv, recipes.SCRATCH, 'scratch', __doc__, recipes.RETRAIN)
    add_name_arg(parser, 'search space preset (default: demo for digits and the small recipe, fashion for '
                         'fashion-mnist, tiny otherwise)')
    add_arch_arg(parser, 'retrain this one subnet from scratch',
                 ' (whose preset is then the default --name); the defaults are then the official retrain recipe, '
                 f"{recipes.RETRAIN['imagenet']['epochs']} epochs with {recipes.RETRAIN['imagenet']['warmup']} of "
                 'warmup, with the imagenet and cifar10 recipes')
    add_training_args(parser, recipe)
    parser.add_argument('--conv-stem', type=int, default=None, metavar='CHANNELS',
                        help='channels of a convolutional stem before the patch embedding (0: none, the official '
                             'model; default: 64 for a folder whose images the small recipe resizes to 64 or 96 px)')
    args = parse_checked(parser, argv)
    check_recipe(args)
    released = (args.arch or '').removeprefix('autoformer-')
    if args.name is None:
        args.name = released if released in SEARCHED else recipes.DEFAULT_PRESETS.get(args.recipe, 'tiny')
        if args.space_file is None:
            print(f'space: the {args.name} preset (--name chooses another)', flush=True)
    return args


def input_of(args: argparse.Namespace) -> dict[str, int]:
    """The space's input keywords the flags or the recipe set: a folder's small recipe chooses them from its images
    (and says so), unless --img-size gives the size; --conv-stem sets the stem either way."""
    chosen = {}
    if args.img_size:
        chosen['img_size'] = args.img_size
    elif args.recipe == 'small' and args.dataset == 'folder' and args.space_file is None and not args.arch:
        side = folders.profile_folder(args.dataset, args.datapath).side
        chosen = dict(zip(('img_size', 'patch_size', 'conv_stem'), recipes.input_size(side)))
        stem = chosen['conv_stem'] if args.conv_stem is None else args.conv_stem
        print(f"input: images of about {side} px resized to {chosen['img_size']} px, "
              f"{f'a convolutional stem of {stem} channels, ' if stem else ''}patches of {chosen['patch_size']} px "
              '(--img-size sets another size, --conv-stem the stem)', flush=True)
    if args.conv_stem is not None:
        chosen['conv_stem'] = args.conv_stem
    return chosen


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # after the flags: --help and a flag error answer before torch loads (startup time)
    import data
    from engine import TrainingRun, train_supernet
    space_kwargs = space_kwargs_of(space_arg(args))
    space_kwargs['num_labels'] = data.num_classes(args.dataset, args.datapath)
    space_kwargs = complete_space_kwargs(**{**space_kwargs, **input_of(args)})
    arch = complete_arch(load_arch_arg(args.arch), space_kwargs) if args.arch else None
    train_supernet(from_flags(TrainingRun, args, output=Path(args.output)), space_kwargs, arch=arch)


if __name__ == '__main__':
    run_main(main)
