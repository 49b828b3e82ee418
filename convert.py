"""Convert official AutoFormer (Cream) or NNI hub supernet checkpoints to this project's layout.

    python convert.py --name tiny      # weights/official-supernet-tiny.pth -> weights/{supernet,subnet}-tiny.pth
    python convert.py --name tiny --input ckpt.pth --output weights/supernet-tiny.pth \\
                      [--format official|nni] [--subnet-output weights/subnet-tiny.pth] [--force]

The official supernets may be wider than the search space (the released tiny one is 256 wide
for a space that tops out at 240): the converter slices them, exactly as the official code does.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cli import add_name_arg, parse_checked, run_main, space_arg, space_kwargs_of
from arch import complete_arch, searched_arch
from utils import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_name_arg(parser, 'preset of the supernet (default: tiny)')
    parser.add_argument('--input', default=None, help="checkpoint to convert, or 'nni' to download NNI's "
                                                      '(default: weights/official-supernet-{name}.pth)')
    # A file, not a folder as elsewhere: design.md's public command line (convert.py --output weights/...pth).
    parser.add_argument('--output', default=None, metavar='FILE',
                        help='supernet weights to write (default: weights/supernet-{name}.pth)')
    parser.add_argument('--format', choices=['official', 'nni', 'project'], default=None,
                        help='layout of --input (default: detected from the keys)')
    parser.add_argument('--subnet-output', default=None, metavar='FILE',
                        help='also write the pre-searched AutoFormer subnet here '
                             '(default with no --input/--output: weights/subnet-{name}.pth)')
    parser.add_argument('--force', action='store_true', help='overwrite output files that already exist')
    args = parse_checked(parser, argv)
    args.name = args.name or 'tiny'
    if args.input is None and args.output is None and args.subnet_output is None:
        args.subnet_output = f'weights/subnet-{args.name}.pth'
    args.input = args.input or f'weights/official-supernet-{args.name}.pth'
    args.output = args.output or f'weights/supernet-{args.name}.pth'
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for path in filter(None, [args.output, args.subnet_output]):
        if Path(path).exists() and not args.force:
            raise UserError(f'{path} already exists: pass --force to overwrite it, or choose another output')
    # after the flags: --help and a flag error answer before torch loads (startup time)
    from checkpoints import save_weights, sub_state_dict
    from space import AutoformerSpace
    space = space_arg(args)
    space_kwargs = space_kwargs_of(space)
    if args.subnet_output:  # before anything is written: the released arch must be one of the space
        arch = searched_arch(args.name)
        complete_arch(arch, space_kwargs)
    supernet = AutoformerSpace.load_supernet_weights(space, args.input, layout=args.format)
    save_weights(args.output, supernet, space_kwargs)
    print(f'wrote supernet {args.output} ({sum(t.numel() for t in supernet.values()) / 1e6:.1f}M values)')
    if args.subnet_output:
        save_weights(args.subnet_output, sub_state_dict(supernet, arch), space_kwargs, arch=arch)
        print(f'wrote subnet autoformer-{args.name} {args.subnet_output}')


if __name__ == '__main__':
    run_main(main)
