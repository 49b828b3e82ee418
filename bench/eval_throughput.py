"""Subnet evaluation throughput: images/s of a frozen subnet and of the supernet running that arch.

    python bench/eval_throughput.py --name tiny --batch-size 8 --threads 2 --reference
    python bench/eval_throughput.py --name tiny --batch-size 128 --device cuda --precision bf16

The arch is the preset's pre-searched one (AutoFormer-T/S/B). Prints figures, asserts nothing.
``--reference`` also times the official formulation (``bench/reference.py``) in the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common import add_timing_args, ratio_summary  # noqa: E402
from reference import official_formulation  # noqa: E402
from space import AutoformerSpace, build_supernet, set_active_arch, space_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', choices=['tiny', 'small', 'base'], default='tiny', help='preset')
    parser.add_argument('--batch-size', type=int, default=8, help='images per forward')
    add_timing_args(parser, 'forwards', rounds=3)
    return parser.parse_args()


@torch.no_grad()
def images_per_second(model: torch.nn.Module, images: torch.Tensor, args: argparse.Namespace) -> float:
    dtype = torch.bfloat16 if args.precision == 'bf16' else torch.float32
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if images.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(images.device.type, dtype=dtype, enabled=args.precision != 'fp32'):
            model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return args.steps * len(images) / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = space_config(**AutoformerSpace.preset(args.name))
    arch = AutoformerSpace.searched_arch(args.name)
    subnet = AutoformerSpace(**config).freeze(arch).eval().to(device)
    supernet = build_supernet(config).eval().to(device)
    set_active_arch(supernet, arch)
    images = torch.randn(args.batch_size, 3, config['img_size'], config['img_size'], device=device)
    figures: dict[str, float] = {}
    ratios = []
    for _ in range(args.rounds):  # interleaved, so that a noisy moment does not favour one of them
        for name, model in (('subnet', subnet), ('supernet', supernet)):
            figures[name] = max(figures.get(name, 0.0), images_per_second(model, images, args))
        if args.reference:
            with official_formulation():
                reference = images_per_second(subnet, images, args)
            name = 'subnet, official formulation'
            figures[name] = max(figures.get(name, 0.0), reference)
            ratios.append(images_per_second(subnet, images, args) / reference)  # back to back
    label = (f'eval autoformer-{args.name} {config["img_size"]}px batch {args.batch_size} {args.device} '
             f'{args.precision} threads {torch.get_num_threads()}')
    if device.type == 'cuda':
        label += f' peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB'
    summary = ', '.join(f'{name} {value:.2f} images/s' for name, value in figures.items())
    if args.reference:
        summary += f'; {ratio_summary(ratios)}'
    print(f'{label}: {summary}')


if __name__ == '__main__':
    main()
