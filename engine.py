"""The accuracy loop shared by evaluate.py and search.py, and the search trial built on it.

The trial lives here, not in search.py: NNI's in-process trials import it by name, and the warm
workers of ``trial.py`` run it for web-UI trials.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import nni
import torch
import torch.nn as nn
from timm.utils import accuracy
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from space import AutoformerSpace, count_flops, count_params, read_weights, sub_state_dict, used_arch
from trial import record_failure
from utils import AUTOCAST, UserError, atomic_write_json, atomic_write_text, pick_device


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = 'cpu', progress: bool = True,
             desc: str = 'eval', on_batch: Callable[[int, float], None] | None = None,
             precision: str = '32-true') -> dict[str, float]:
    """Top-1 / top-5 (in %) of ``model`` over ``loader``, with images/s of the forward passes, the
    number of images evaluated and of undecodable images left out (``skipped``).

    ``on_batch(batch_index, running_top1)`` is called after every batch (NNI intermediate results).
    ``precision``: ``bf16-mixed`` or ``16-mixed`` autocast on CUDA (ignored on the CPU).
    """
    device = torch.device(device)
    dtype = AUTOCAST[precision] if device.type == 'cuda' else None
    model.eval().to(device)
    correct1 = correct5 = seen = 0
    seconds = 0.0
    for index, batch in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        if batch is None:  # no image of this batch could be decoded
            continue
        images, targets = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        if logits.device.type == 'cuda':
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        correct1 += top1.item() * len(targets) / 100
        correct5 += top5.item() * len(targets) / 100
        seen += len(targets)
        if on_batch is not None:
            on_batch(index, 100 * correct1 / seen)
    skipped = data.undecodable_count(loader.dataset) if isinstance(loader, DataLoader) else 0
    if seen == 0:
        raise UserError('no image of the evaluation data could be decoded' if skipped else
                        'the evaluation data is empty')
    return {'top1': 100 * correct1 / seen, 'top5': 100 * correct5 / seen, 'images': seen, 'skipped': skipped,
            'images_per_s': seen / max(seconds, 1e-9)}


# --------------------------------------------------------------------------------------------
# The search trial: one candidate with weights inherited from the supernet
# --------------------------------------------------------------------------------------------

def arch_key(arch: Mapping[str, Any]) -> str:
    """A stable name of an arch (labels of unused layers ignored)."""
    return hashlib.sha1(json.dumps(used_arch(arch), sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=2)
def _supernet(weights: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict, meta = read_weights(weights)
    return state_dict, meta['space']


@lru_cache(maxsize=2)
def _search_data(cache: str) -> data.CachedSplit:
    return data.CachedSplit(cache)


INTERMEDIATE_RESULTS = 20  # per candidate at most: the web UI's chart, not one point per batch


def evaluate_arch(arch: Mapping[str, Any], supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any],
                  split: data.CachedSplit, output: Path, batch_size: int, device: torch.device,
                  report: Callable[[float], None]) -> dict[str, Any]:
    """Top-1 of one subnet (weights inherited from the supernet) on the search split; writes its record.

    A candidate already recorded in ``output`` (a resumed search) is answered from its record.
    """
    start = time.perf_counter()
    key = arch_key(arch)
    record_file = output / 'candidates' / f'{key}.json'
    if record_file.is_file():
        return json.loads(record_file.read_text())
    model = AutoformerSpace(**space_kwargs).freeze(arch)
    model.load_state_dict(sub_state_dict(supernet, arch))
    batches = -(-len(split) // batch_size)
    every = max(1, batches // INTERMEDIATE_RESULTS)

    def on_batch(index: int, top1: float) -> None:
        if (index + 1) % every == 0 or index + 1 == batches:
            report(top1)

    metrics = evaluate(model, split.batches(batch_size), device, progress=False, on_batch=on_batch)
    latency = json.loads(latency_file.read_text()).get(key) \
        if (latency_file := output / 'latency.json').is_file() else None
    record = {'arch': arch, 'params': count_params(arch, **space_kwargs) / 1e6,
              'flops': count_flops(arch, **space_kwargs) / 1e9, 'latency': latency,
              'top1': metrics['top1'], 'seconds': time.perf_counter() - start}
    atomic_write_json(record, record_file)
    write_results(output, every_seconds=2.0)
    return record


def final_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """What NNI shows of a candidate: top-1 as the default metric, then its cost."""
    return {'default': record['top1'], 'params': record['params'], 'flops': record['flops'],
            **({'latency': record['latency']} if record['latency'] is not None else {})}


def arch_of(sample: Mapping[str, Any]) -> dict[str, Any]:
    """An NNI sample as an arch (NNI's JSON round trips turn a ratio of 3.0 into 3)."""
    return {label: float(v) if label.startswith('mlp_ratio') else int(v) for label, v in sample.items()}


def evaluate_candidate(model: torch.nn.Module, weights: str, cache: str, output: str, batch_size: int,
                       device: str) -> None:
    """NNI trial run in the search's own process (``--engine sequential``): evaluates and reports."""
    supernet, space_kwargs = _supernet(weights)
    arch = arch_of(nni.get_current_parameter().sample)
    try:
        record = evaluate_arch(arch, supernet, space_kwargs, _search_data(cache), Path(output), batch_size,
                               pick_device(device), nni.report_intermediate_result)
    except Exception as err:
        record_failure({'output': output}, arch_key(arch), f'{type(err).__name__}: {err}')
        raise
    nni.report_final_result(final_metrics(record))


def candidate_server(spec: Mapping[str, Any]) -> Callable[[str, Callable[[dict], None]], None]:
    """What a warm worker (trial.py) runs per candidate: the supernet, the split and the imports stay loaded."""
    supernet, space_kwargs = _supernet(spec['weights'])
    split = _search_data(spec['cache'])
    device = pick_device(spec['device'])
    output = Path(spec['output'])

    def evaluate_parameter(parameter: str, send: Callable[[dict], None]) -> None:
        arch = arch_of(nni.load(parameter)['parameters'].sample)
        record = evaluate_arch(arch, supernet, space_kwargs, split, output, spec['batch_size'], device,
                               lambda top1: send({'intermediate': top1}))
        send({'final': final_metrics(record)})

    return evaluate_parameter


def read_results(output: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((output / 'candidates').glob('*.json'))]
    return sorted(records, key=lambda r: -r['top1'])


_last_results_write = 0.0


def write_results(output: Path, every_seconds: float = 0.0) -> list[dict]:
    """Every finished candidate as candidates.json and candidates.csv (each written atomically).

    Each candidate's own record is written the moment it finishes; these summaries, which grow
    with the search, are rewritten at most every ``every_seconds`` in one process (and at the end).
    """
    global _last_results_write
    if time.monotonic() - _last_results_write < every_seconds:
        return []
    _last_results_write = time.monotonic()
    records = read_results(output)
    atomic_write_json(records, output / 'candidates.json')
    fields = ['top1', 'params', 'flops', 'latency', 'seconds', 'arch']
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(fields)
    for r in records:
        writer.writerow([json.dumps(r['arch']) if f == 'arch' else '' if r[f] is None else f'{r[f]:.6g}'
                         for f in fields])
    atomic_write_text(buffer.getvalue(), output / 'candidates.csv')
    return records


