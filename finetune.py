"""Fine-tune an ImageNet-pretrained AutoFormer supernet to CIFAR-10 (or any supported dataset), or with
``--arch`` one subnet (the searched one) from the weights it inherits from the supernet.

    python finetune.py --gpus 4 --weights weights/supernet-tiny.pth --datapath path/to/cifar10 \\
                       --epochs 100 --warmup 5 --learning_rate 0.0005
    python finetune.py --weights outputs/demo/scratch/supernet.pth --arch outputs/demo/search/best.json \\
                       --dataset digits --output outputs/subnet       # writes outputs/subnet/subnet.pth

The supernet's classifier head is re-initialised for the new classes; a subnet keeps its inherited head
when the data has the classes the supernet was trained on. Every other tensor is loaded (in
``on_fit_start``). Images are resized to the supernet's input size (224) unless ``--img-size``
asks for another: the absolute position embedding is then resampled (bicubic, as timm's
``resample_abs_pos_embed``) and the relative-position tables keep their pretrained length.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cli import (add_arch_arg, add_name_arg, add_training_args, check_recipe, from_flags, load_arch_arg, parse_checked,
                 recipe_parser, run_main, space_arg)
import recipes
from arch import complete_arch, complete_space_kwargs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, recipe = recipe_parser(argv, recipes.FINETUNE, 'finetune', __doc__)
    add_name_arg(parser, 'preset of --weights (default: the space stored with them, else tiny)')
    parser.add_argument('--weights', default='weights/supernet-tiny.pth',
                        help='pretrained supernet weights (any supported layout)')
    add_arch_arg(parser, 'fine-tune this one subnet')
    add_training_args(parser, recipe)
    args = parse_checked(parser, argv)
    check_recipe(args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # after the flags: --help and a flag error answer before torch loads (startup time)
    import data
    from checkpoints import adapt_to_input_size, sub_state_dict
    from engine import TrainingRun, train_supernet
    from space import load_supernet_file
    pretrained, pretrained_space, _ = load_supernet_file(args.weights, space_arg(args))
    img_size = args.img_size or pretrained_space['img_size']
    space_kwargs = complete_space_kwargs(**{**pretrained_space, 'img_size': img_size,
                                            'num_labels': data.num_classes(args.dataset, args.datapath)})
    adapt_to_input_size(pretrained, img_size, space_kwargs['patch_size'])
    arch = complete_arch(load_arch_arg(args.arch), space_kwargs) if args.arch else None
    new_head = arch is None or space_kwargs['num_labels'] != pretrained_space['num_labels']
    if arch is not None:
        pretrained = sub_state_dict(pretrained, arch)
    if new_head:
        pretrained = {k: v for k, v in pretrained.items() if not k.startswith('head.')}
    train_supernet(from_flags(TrainingRun, args, output=Path(args.output)), space_kwargs, pretrained, arch)


if __name__ == '__main__':
    run_main(main)
