"""Supernet training throughput: forward + backward + AdamW step, a new random arch every step.

    python bench/train_step.py --name tiny --batch-size 8 --threads 2 --steps 20 --reference   # CPU, fp32
    python bench/train_step.py --name tiny --batch-size 128 --device cuda --precision bf16

Prints figures, asserts nothing. ``--reference`` runs each step again (same arch, same batch)
in the official formulation (``bench/reference.py``: direct relative positions, weights sliced
through autograd) right after or before ours, for a before / after ratio. ``--ceiling`` adds the
same step on a supernet without relative positions: the most any relative-position code could
gain, since everything else is the same in both formulations. ``--compiled`` adds the supernet as one
compiled graph for every arch (``masked_supernet.py``: every step costs the largest arch) and, as its ceiling,
the frozen largest subnet compiled: a static ViT doing the same arithmetic.
"""
from __future__ import annotations

import argparse
import functools
import random
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common import (COMPILED, OFFICIAL, OTHER_ATTENTION, OURS, STATIC, add_timing_args, autocast,  # noqa: E402
                    compiled, interleaved_seconds, interleaved_summary, peak_memory, preset_space, set_up,
                    with_other_attention)
from masked_supernet import MaskedSupernet  # noqa: E402
from reference import in_official_formulation  # noqa: E402
from arch import count_flops, extreme_arch, sample_arch  # noqa: E402
from space import AutoformerSpace, build_supernet, init_weights, set_active_arch  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(parser, 'steps')
    parser.add_argument('--ceiling', action='store_true',
                        help='also time the same steps on a supernet without relative positions')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    return parser.parse_args()


def random_batch(space_kwargs: dict, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch_size, 3, space_kwargs['img_size'], space_kwargs['img_size'], device=device)
    return images, torch.randint(0, space_kwargs['num_labels'], (batch_size,), device=device)


def training_step(supernet, images, targets, precision: str,
                  set_arch: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
    """``step(arch)``: forward, backward and AdamW step of ``supernet`` running ``arch`` on a fixed batch;
    ``set_arch`` (default: ``space.set_active_arch``) makes it run the arch."""
    optimizer = torch.optim.AdamW(supernet.parameters(), lr=1e-4, fused=True)  # as lightning.py
    set_arch = set_arch or (lambda arch: set_active_arch(supernet, arch))

    def step(arch: dict) -> None:
        set_arch(arch)
        with autocast(images.device, precision):
            loss = torch.nn.functional.cross_entropy(supernet(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    args = parse_args()
    device = set_up(args)
    space_kwargs = preset_space(args)
    images, targets = random_batch(space_kwargs, args.batch_size, device)
    step = training_step(build_supernet(space_kwargs).to(device).train(), images, targets, args.precision)
    if args.ceiling:
        no_rpe = build_supernet({**space_kwargs, 'rpe': False}).to(device).train()
        step_without_rpe = training_step(no_rpe, images, targets, args.precision)
    if args.compiled:
        masked = MaskedSupernet(build_supernet(space_kwargs)).to(device).train()
        step_compiled = training_step(compiled(masked, args), images, targets, args.precision, masked.set_arch)
        static = init_weights(AutoformerSpace(**space_kwargs).freeze(extreme_arch(space_kwargs, max)))
        step_static = training_step(compiled(static.to(device).train(), args), images, targets, args.precision,
                                    lambda arch: None)
    rng = random.Random(args.seed)
    macs = []  # per image, of each step's arch

    def make_steps(index: int) -> dict[str, Callable[[], None]]:
        arch = sample_arch(space_kwargs, rng)
        macs.append(count_flops(arch, **space_kwargs))
        steps = {OURS: functools.partial(step, arch)}
        if args.reference:
            steps[OFFICIAL] = functools.partial(in_official_formulation, step, arch)
        if args.ceiling:
            steps['no relative positions'] = functools.partial(step_without_rpe, arch)
        if args.compiled:
            steps[COMPILED] = functools.partial(step_compiled, arch)
            steps[STATIC] = functools.partial(step_static, arch)
        if args.attention:
            steps[OTHER_ATTENTION] = with_other_attention(functools.partial(step, arch), device)
        return steps
    times = interleaved_seconds(make_steps, args)
    label = (f'train_step {args.name} {space_kwargs["img_size"]}px batch {args.batch_size} {args.device} '
             f'{args.precision} threads {torch.get_num_threads()}{peak_memory(device)}')
    flops_per_step = 6 * sum(macs) / len(macs) * args.batch_size  # forward 2 x MACs, backward twice that
    largest = count_flops(extreme_arch(space_kwargs, max), **space_kwargs)
    static_flops = {STATIC: 6 * largest * args.batch_size} if args.compiled else {}
    print(f'{label}: {interleaved_summary(times, args.batch_size, flops_per_step, args.peak_tflops, static_flops)}')
    if args.compiled:  # the share of peak counts the sampled archs' arithmetic: the work a step is for
        print(f'the compiled graph computes the largest arch: {largest / (sum(macs) / len(macs)):.2f}x the MACs of the '
              f'{len(macs)} archs sampled; its FLOP/s above count the sampled archs\' MACs')


if __name__ == '__main__':
    main()
