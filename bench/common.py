"""Flags, interleaving and summaries shared by the throughput benchmarks.

A machine shared with other jobs drifts by 10-30% from one minute to the next, so timing all of
ours and then all of the reference compares two different machines. ``interleaved_seconds``
times the variants step by step instead, one right after the other on the same input (rotating
which goes first), and ratios are those of their summed times.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable, ContextManager

import torch

import cli  # noqa: F401  (quiets NNI 3.0's known warnings, as in the scripts)
import layers
from arch import PRESETS, complete_space_kwargs
from space import AutoformerSpace

OURS, OFFICIAL = 'ours', 'official formulation'


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def add_timing_args(parser: argparse.ArgumentParser, unit: str) -> None:
    """Preset, batch, device, precision, how much to time and whether to pair ours with the official formulation."""
    parser.add_argument('--name', choices=list(PRESETS), default='tiny', help='preset')
    parser.add_argument('--img-size', type=positive_int, default=None, help="input size (default: the preset's)")
    parser.add_argument('--batch-size', type=int, default=8, help=f'images per {unit[:-1]}')
    parser.add_argument('--device', default='cpu', metavar='DEVICE', help='cpu, cuda or cuda:N')
    parser.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32', help='autocast dtype')
    parser.add_argument('--steps', type=positive_int, default=10, help=f'timed {unit} of each variant')
    parser.add_argument('--warmup', type=int, default=2, help=f'untimed {unit} of each variant first')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--reference', action='store_true',
                        help='time the official formulation (bench/reference.py) right after or before each of ours')
    parser.add_argument('--peak-tflops', type=float, default=None,
                        help="the device's peak dense TFLOP/s at --precision, to print our share of it")
    parser.add_argument('--compiled', action='store_true',
                        help='also time the supernet as one compiled graph for every arch (masked_supernet.py) and, '
                             'as a ceiling, a static compiled ViT: the frozen largest subnet, the same arithmetic')
    parser.add_argument('--compile-mode', default='default',
                        choices=['default', 'reduce-overhead', 'max-autotune-no-cudagraphs'],
                        help="torch.compile's mode for --compiled (reduce-overhead: CUDA graphs)")
    parser.add_argument('--attention', action='store_true',
                        help="also time ours with the other attention path than the device's default (SDPA against "
                             'explicit matmuls: layers.SDPA_DEVICES)')


COMPILED, STATIC = 'ours, one compiled graph', 'static compiled ViT (largest subnet)'


def compiled(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """``model`` under ``torch.compile`` with ``--compile-mode`` (``TORCH_COMPILE_DISABLE=1`` runs it eagerly)."""
    return torch.compile(model, mode=args.compile_mode)


def set_up(args: argparse.Namespace) -> torch.device:
    """Threads, seed and device from the shared flags."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(getattr(args, 'seed', 0))
    return torch.device(args.device)


OTHER_ATTENTION = 'ours, other attention path'


@contextlib.contextmanager
def other_attention(device: torch.device):
    """Ours with the attention path the device does not use by default (``layers.SDPA_DEVICES`` toggled)."""
    fused = device.type in layers.SDPA_DEVICES
    layers.SDPA_DEVICES.discard(device.type) if fused else layers.SDPA_DEVICES.add(device.type)
    try:
        yield
    finally:
        layers.SDPA_DEVICES.add(device.type) if fused else layers.SDPA_DEVICES.discard(device.type)


def with_other_attention(function: Callable[[], object], device: torch.device) -> Callable[[], object]:
    def run() -> object:
        with other_attention(device):
            return function()
    return run


def autocast(device: torch.device, precision: str) -> ContextManager:
    """``--precision`` as an autocast context (none for fp32)."""
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def peak_memory(device: torch.device) -> str:
    """' peak X GiB' of GPU memory so far, for a figure's label; nothing on the CPU."""
    return f' peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB' if device.type == 'cuda' else ''


def seconds(function: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, waiting for the GPU before and after."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_seconds(make_steps: Callable[[int], dict[str, Callable[[], object]]],
                        args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of each variant's timed steps; ``make_steps(i)`` gives step i of every variant (same arch and batch)."""
    times: dict[str, list[float]] = {}
    for index in range(args.warmup + args.steps):
        steps = make_steps(index)
        names = list(steps)
        for name in names[index % len(names):] + names[:index % len(names)]:
            elapsed = seconds(steps[name], torch.device(args.device))
            if index >= args.warmup:
                times.setdefault(name, []).append(elapsed)
    return {name: times[name] for name in names}


def share_of_peak(times: list[float], flops_per_step: float, peak_tflops: float | None) -> str:
    """' X TFLOP/s, Y% of peak' for ``times`` of steps of ``flops_per_step`` each (nothing without a peak)."""
    if not peak_tflops:
        return ''
    achieved = flops_per_step * len(times) / sum(times) / 1e12
    return f' ({achieved:.1f} TFLOP/s, {100 * achieved / peak_tflops:.1f}% of the {peak_tflops:g} TFLOP/s peak)'


def interleaved_summary(times: dict[str, list[float]], images_per_step: int, flops_per_step: float = 0.0,
                        peak_tflops: float | None = None, variant_flops: dict[str, float] | None = None) -> str:
    """Images/s of each variant (with its share of the device's peak FLOP/s when given) and, against the
    official formulation, how many times faster the others are. ``flops_per_step``: the arithmetic of the archs
    run; ``variant_flops``: a variant that runs other arithmetic (a static largest subnet)."""
    variant_flops = variant_flops or {}
    parts = [f'{name} {images_per_step * len(values) / sum(values):.2f} images/s'
             + share_of_peak(values, variant_flops.get(name, flops_per_step), peak_tflops)
             for name, values in times.items()]
    official = times.get(OFFICIAL)
    for name, values in times.items():
        if official and name != OFFICIAL:
            ratios = sorted(b / a for a, b in zip(values, official))
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            parts.append(f'{name} / official {sum(official) / sum(values):.2f}x over {len(values)} interleaved steps '
                         f'(per step: median {statistics.median(ratios):.2f}x, '
                         f'quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}x)')
    return '; '.join(parts)


def preset_space(args: argparse.Namespace) -> dict:
    """The complete space keywords of ``--name`` at ``--img-size``."""
    preset = AutoformerSpace.preset(args.name)
    return complete_space_kwargs(**{**preset, **({'img_size': args.img_size} if args.img_size else {})})
