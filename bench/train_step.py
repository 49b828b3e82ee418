"""Supernet training throughput: forward + backward + AdamW step, a new random arch every step.

    python bench/train_step.py --name tiny --batch-size 8 --threads 2          # CPU, fp32
    python bench/train_step.py --name tiny --batch-size 128 --device cuda --precision bf16

Prints figures, asserts nothing. ``--reference`` also times the official formulation
(``bench/reference.py``: direct relative positions, weights sliced through autograd) in the
same run, on the same archs, for a before / after ratio.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from space import AutoformerSpace, build_supernet, sample_arch, set_active_arch, space_config  # noqa: E402
from common import add_timing_args, ratio_summary  # noqa: E402
from reference import official_formulation  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', choices=['tiny', 'small', 'base', 'demo'], default='tiny', help='preset')
    parser.add_argument('--batch-size', type=int, default=8, help='images per step')
    parser.add_argument('--img-size', type=int, default=None, help="input size (default: the preset's)")
    add_timing_args(parser, 'steps', rounds=5)
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    return parser.parse_args()


def time_steps(supernet, config, args, device) -> float:
    """Images/s over ``args.steps`` training steps after ``args.warmup`` untimed ones."""
    optimizer = torch.optim.AdamW(supernet.parameters(), lr=1e-4, fused=True)  # as lightning.py
    rng = random.Random(args.seed)
    images = torch.randn(args.batch_size, 3, config['img_size'], config['img_size'], device=device)
    targets = torch.randint(0, config['num_labels'], (args.batch_size,), device=device)
    dtype = torch.bfloat16 if args.precision == 'bf16' else torch.float32
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
        set_active_arch(supernet, sample_arch(config, rng))
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != 'fp32'):
            loss = torch.nn.functional.cross_entropy(supernet(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    kwargs = AutoformerSpace.preset(args.name)
    if args.img_size:
        kwargs['img_size'] = args.img_size
    config = space_config(**kwargs)
    supernet = build_supernet(config).to(device).train()
    label = (f'train_step {args.name} {config["img_size"]}px batch {args.batch_size} {args.device} {args.precision} '
             f'threads {torch.get_num_threads()}')
    ours, reference = [], []
    for _ in range(args.rounds):  # interleaved, so that a noisy moment does not favour one of them
        ours.append(time_steps(supernet, config, args, device))
        if args.reference:
            with official_formulation():
                reference.append(time_steps(supernet, config, args, device))
    if device.type == 'cuda':
        label += f' peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB'
    if args.reference:
        print(f'{label}: {max(ours):.2f} images/s; official formulation {max(reference):.2f} images/s; '
              f'{ratio_summary([a / b for a, b in zip(ours, reference)])}')
    else:
        print(f'{label}: {max(ours):.2f} images/s')


if __name__ == '__main__':
    main()
