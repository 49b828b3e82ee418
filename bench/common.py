"""Flags and summaries shared by the throughput benchmarks."""
from __future__ import annotations

import argparse
import statistics


def add_timing_args(parser: argparse.ArgumentParser, unit: str, rounds: int) -> None:
    """Device, precision, how much to time and the interleaved rounds against the official formulation."""
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32', help='autocast dtype')
    parser.add_argument('--steps', type=int, default=10, help=f'timed {unit}')
    parser.add_argument('--warmup', type=int, default=2, help=f'untimed {unit} first')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (torch.set_num_threads)')
    parser.add_argument('--reference', action='store_true',
                        help='also time the official formulation (bench/reference.py)')
    parser.add_argument('--rounds', type=int, default=rounds,
                        help='measurements of each, interleaved: the best images/s, the median ratio')


def ratio_summary(ratios: list[float]) -> str:
    """The median of per-round ratios (each round's pair ran back to back) and their range."""
    ratios = sorted(ratios)
    return (f'ratio {statistics.median(ratios):.2f}x (median of {len(ratios)} rounds, '
            f'{ratios[0]:.2f}-{ratios[-1]:.2f})')
