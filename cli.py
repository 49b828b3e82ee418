"""The checks every script runs on its flags before any work starts: one table, one place.

Each script parses with :func:`parse_checked`; a value outside its rule ends in one ``error:``
line and exit status 2 (through ``utils.run_main``), before a dataset or a weights file is read.
A flag is checked wherever a script has it, under the same rule.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable

import torch

from utils import UserError

Rule = Callable[[Any], 'str | None']


def at_least(low: int) -> Rule:
    return lambda value: None if value >= low else f'must be at least {low}'


def between(low: int, high: int) -> Rule:
    """Counts whose huge values would start millions of processes or allocate terabytes are capped too."""
    return lambda value: None if low <= value <= high else f'must be between {low} and {high}'


def number(low: float = 0.0, high: float = math.inf, high_open: bool = False) -> Rule:
    """A finite number in [low, high] (or [low, high)); NaN fails every comparison and is refused too."""
    def rule(value: float) -> str | None:
        inside = low <= value and (value < high if high_open else value <= high)
        if inside and math.isfinite(value):
            return None
        upper = '' if high == math.inf else f' and {"below" if high_open else "at most"} {high:g}'
        return f'must be a finite number of {low:g} or more{upper}'
    return rule


def device(value: str) -> str | None:
    try:
        kind = torch.device(value).type
    except RuntimeError:
        kind = None
    return None if kind in ('cpu', 'cuda', 'mps') else 'is not a device this runs on: use cpu, cuda or cuda:N'



def present_device(value: str) -> str | None:
    """A device that exists here: a figure measured elsewhere (the CPU instead of a GPU) would be wrong."""
    problem = device(value)
    if problem or not value.startswith('cuda'):
        return problem
    index = torch.device(value).index or 0
    if index >= torch.cuda.device_count():
        return f'needs CUDA GPU {index}, and {torch.cuda.device_count()} are visible: measure where the GPU is'
    return None


PROBABILITY = number(0.0, 1.0)
RULES: dict[str, Rule] = {
    # data and hardware
    'batch_size': at_least(1), 'num_workers': between(0, 1024), 'img_size': between(1, 4096), 'gpus': at_least(0),
    'devices': between(1, 1024), 'num_nodes': between(1, 100_000), 'concurrency': between(1, 1024),
    'device': device,
    'seed': lambda value: None if 0 <= value < 2 ** 32 else 'must be between 0 and 4294967295',
    'port': lambda value: None if 0 < value < 65536 else 'must be between 1 and 65535',
    # training recipe
    'epochs': at_least(1), 'warmup': at_least(0), 'learning_rate': number(), 'min_lr': number(),
    'warmup_lr': number(), 'weight_decay': number(), 'smoothing': number(0.0, 1.0, high_open=True),
    'mixup': number(), 'cutmix': number(), 'drop_path': number(0.0, 1.0, high_open=True),
    'clip_grad': number(), 'ema_decay': number(0.0, 1.0, high_open=True),
    # search
    'trials': at_least(1), 'generations': at_least(1), 'population': at_least(1), 'select': at_least(1),
    'mutation_num': at_least(0), 'crossover_num': at_least(0), 'evolution_population_size': at_least(1),
    'evolution_sample_size': at_least(1), 'search_images': at_least(1), 'latency_batch_size': between(1, 4096),
    'mutation_prob': PROBABILITY, 'param_mutation_prob': PROBABILITY, 'evolution_mutation_prob': PROBABILITY,
    'min_params': number(), 'max_params': number(), 'max_flops': number(), 'max_latency': number(),
    'latency_device': present_device,
}


def check_flags(args: argparse.Namespace) -> None:
    """Refuse the first flag whose value breaks its rule (unset flags, None, are not checked)."""
    for name, rule in RULES.items():
        value = getattr(args, name, None)
        problem = rule(value) if value is not None else None
        if problem:
            raise UserError(f'--{name.replace("_", "-")} {problem}, got {value}')
    low, high = getattr(args, 'min_params', None), getattr(args, 'max_params', None)
    if low is not None and high is not None and low > high:
        raise UserError(f'--min-params {low} > --max-params {high}: no arch can meet it')


def parse_checked(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` followed by :func:`check_flags`."""
    args = parser.parse_args(argv)
    check_flags(args)
    return args
