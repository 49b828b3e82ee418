"""Where a supernet training step's time goes: matmuls against everything else, and the top operators.

    python bench/profile_step.py --name tiny --batch-size 8 --threads 2
    python bench/profile_step.py --name tiny --batch-size 8 --threads 2 --reference   # the official formulation
    python bench/profile_step.py --name tiny --batch-size 128 --device cuda --precision bf16 --compiled

Runs ``--steps`` steps (random archs, fixed batch) under ``torch.profiler`` after ``--warmup``
untimed ones; ``--compiled`` profiles the supernet as one compiled graph (masked_supernet.py). On a GPU it
also prints how much of a step's wall time the GPU was busy: the rest is the CPU side (Python, launches) that the
GPU waits for. Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # else the profiler logs a failed GPU query as an ERROR on CPU machines
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import add_timing_args, compiled, preset_space, set_up  # noqa: E402
from masked_supernet import MaskedSupernet  # noqa: E402
from arch import sample_arch  # noqa: E402
from space import build_supernet  # noqa: E402
from reference import official_formulation  # noqa: E402
from train_step import random_batch, training_step  # noqa: E402

MATMULS = {'aten::mm', 'aten::bmm', 'aten::addmm', 'aten::addmm_', 'aten::baddbmm', 'aten::addbmm'}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(parser, 'steps')
    parser.add_argument('--top', type=int, default=12, help='operators to list')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.set_defaults(steps=4)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = set_up(args)
    space_kwargs = preset_space(args)
    images, targets = random_batch(space_kwargs, args.batch_size, device)
    supernet = build_supernet(space_kwargs).to(device).train()
    if args.compiled:
        masked = MaskedSupernet(supernet)
        step = training_step(compiled(masked, args), images, targets, args.precision, masked.set_arch)
    else:
        step = training_step(supernet, images, targets, args.precision)
    rng = random.Random(args.seed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with official_formulation() if args.reference else contextlib.nullcontext():
        for _ in range(args.warmup):
            step(sample_arch(space_kwargs, rng))
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as profiler:
            for _ in range(args.steps):
                step(sample_arch(space_kwargs, rng))
            if device.type == 'cuda':
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    events = profiler.key_averages()
    formulation = 'official formulation' if args.reference else 'ours, one compiled graph' if args.compiled else 'ours'
    label = (f'profile_step {args.name} batch {args.batch_size} {args.device} {args.precision} '
             f'threads {torch.get_num_threads()} {formulation}')
    if device.type == 'cuda':
        print_gpu_profile(events, label, wall_ms, args)
    else:
        print_cpu_profile(events, label, args)


def print_rows(events: list, attr: str, args: argparse.Namespace) -> None:
    for event in sorted(events, key=lambda event: -getattr(event, attr))[:args.top]:
        print(f'  {event.key[:60]:60s} {getattr(event, attr) / args.steps / 1e3:8.2f} ms per step, '
              f'{event.count // args.steps} calls')


def print_cpu_profile(events: list, label: str, args: argparse.Namespace) -> None:
    total = sum(event.self_cpu_time_total for event in events)
    matmuls = sum(event.self_cpu_time_total for event in events if event.key in MATMULS)
    print(f'{label}: {total / args.steps / 1e3:.1f} ms per step (profiled), matmuls {100 * matmuls / total:.0f}%')
    print_rows(events, 'self_cpu_time_total', args)


def print_gpu_profile(events: list, label: str, wall_ms: float, args: argparse.Namespace) -> None:
    """The kernels' device time against the wall time (the GPU's idle share is the CPU side it waits for), the
    top kernels, and the top operators by CPU time. An operator row also carries its kernels' device time, so the
    device total sums the kernel rows alone."""
    kernels = [event for event in events if event.device_type == DeviceType.CUDA]
    busy = sum(event.self_device_time_total for event in kernels) / args.steps / 1e3
    matmuls = sum(event.self_device_time_total for event in events if event.key in MATMULS) / args.steps / 1e3
    print(f'{label}: GPU busy {busy:.2f} of {wall_ms:.2f} ms wall per step ({100 * busy / wall_ms:.0f}%), '
          f'matmuls {matmuls:.2f} ms ({100 * matmuls / max(busy, 1e-9):.0f}% of the busy time)')
    print('top kernels by device time:')
    print_rows(kernels, 'self_device_time_total', args)
    print('top operators by CPU time (the side the GPU waits for):')
    print_rows([event for event in events if event.device_type != DeviceType.CUDA], 'self_cpu_time_total', args)


if __name__ == '__main__':
    main()
