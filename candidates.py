"""The search's candidates: one subnet evaluated with weights inherited from the supernet (the trial NNI runs
in the search's process, or a warm worker of ``trial.py`` serves), its record, the results files and the
Pareto plot. :class:`SearchFolder` names every file of a search's output folder.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import nni
import torch

import data
from checkpoints import read_weights
from engine import evaluate
from masked_supernet import MaskedSupernet
from plots import save_figure
from arch import arch_key, count_flops, count_params, typed_arch
from space import build_supernet, inherited_subnet
from failures import FOLDER as FAILURES, record_failure
from utils import UserError, atomic_write_json, atomic_write_text, pick_device, read_json


@dataclass(frozen=True)
class SearchFolder:
    """The files of one search's ``--output`` folder."""
    root: Path

    @property
    def candidates(self) -> Path:
        """One record per finished candidate, named by :func:`space.arch_key`."""
        return self.root / 'candidates'

    def record(self, arch: Mapping[str, Any]) -> Path:
        return self.candidates / f'{arch_key(arch)}.json'

    def records(self) -> list[Path]:
        return sorted(self.candidates.glob('*.json'))

    @property
    def failures(self) -> Path:
        return self.root / FAILURES

    @property
    def latency(self) -> Path:
        return self.root / 'latency.json'

    @property
    def worker_spec(self) -> Path:
        return self.root / 'worker.json'

    @property
    def search_data(self) -> Path:
        return self.root / 'search-data.pt'

    @property
    def best(self) -> Path:
        return self.root / 'best.json'

    @property
    def experiment(self) -> Path:
        """The experiment id, the command line and the fingerprint a resumed search must match."""
        return self.root / 'experiment.json'

    @property
    def best_subnet(self) -> Path:
        """The best candidate's inherited weights, a subnet file."""
        return self.root / 'best-subnet.pth'

    @property
    def export(self) -> Path:
        """``--export``'s standalone files of the best candidate."""
        return self.root / 'export'

    @property
    def pareto(self) -> Path:
        return self.root / 'pareto.png'

    @property
    def results_json(self) -> Path:
        return self.root / 'candidates.json'

    @property
    def results_csv(self) -> Path:
        return self.root / 'candidates.csv'


@lru_cache(maxsize=2)
def _supernet(weights: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict, meta = read_weights(weights)
    return state_dict, meta['space']


@lru_cache(maxsize=2)
def compiled_supernet(weights: str, device: str) -> tuple[MaskedSupernet, torch.nn.Module]:
    """The supernet of ``weights`` as one compiled graph for every candidate (``--compile``), and its arch setter:
    compiled once per process; each candidate then writes its arch and runs (masked_supernet.py)."""
    state_dict, space_kwargs = _supernet(weights)
    supernet = build_supernet(space_kwargs)
    supernet.load_state_dict(state_dict)
    masked = MaskedSupernet(supernet).to(device).eval()
    return masked, torch.compile(masked)


@lru_cache(maxsize=2)
def _search_data(cache: str) -> data.CachedSplit:
    return data.CachedSplit(cache)


INTERMEDIATE_RESULTS = 20  # per candidate at most: the web UI's chart, not one point per batch

# What a search can rank by (--metric), as its results files and plot name it; every figure is measured on the
# search split (the record's "measured_on" says what that holds), not on the validation split.
METRICS = {'top1': 'top-1', 'balanced': 'balanced accuracy'}
RECORD_METRICS = ('top1', 'balanced', 'per_class')  # a record without them is re-evaluated, never ranked as 0
TIE_BREAK = 'the higher metric first; on a tie, fewer parameters, then the arch key (space.arch_key)'
SEARCH_SPLIT = 'search'


def metric_label(metric: str) -> str:
    """``top-1 on the search split (%)``: what an axis or a column of ``metric`` shows."""
    return f'{METRICS[metric]} on the search split (%)'


def rank_key(record: Mapping[str, Any], metric: str) -> tuple:
    """Sort key of the ranking every best is picked by (:data:`TIE_BREAK`): the first is the best."""
    return ranking(record[metric], record['params'], record['arch'])


def ranking(value: float, params: float, arch: Mapping[str, Any]) -> tuple:
    """:func:`rank_key` of a candidate not yet recorded: its metric ``value``, ``params`` (M) and ``arch``."""
    return -value, params, arch_key(arch)


def ranked(records: list[dict], metric: str) -> list[dict]:
    return sorted(records, key=lambda r: rank_key(r, metric))


def read_record(output: Path, arch: Mapping[str, Any]) -> dict | None:
    """The record of ``arch`` in ``output`` when it holds every figure a search ranks by; None otherwise (a
    record of an older version of this project is evaluated again rather than ranked without its figure)."""
    path = SearchFolder(output).record(arch)
    if not path.is_file():
        return None
    record = read_json(path)
    return record if all(key in record for key in RECORD_METRICS) else None


def evaluate_arch(arch: Mapping[str, Any], supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any],
                  split: data.CachedSplit, output: Path, batch_size: int, device: torch.device,
                  report: Callable[[float], None], precision: str | None = None, metric: str = 'top1',
                  measured_on: str | None = None,
                  graph: tuple[MaskedSupernet, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Top-1, balanced and per-class accuracy of one subnet (weights inherited from the supernet) on the
    search split; writes its record. ``report`` gets the running ``metric`` (NNI's intermediate results).
    ``graph``: :func:`compiled_supernet`'s, which runs the subnet instead of a frozen copy (the same figures up to
    float rounding).

    A candidate already recorded in ``output`` (a resumed search) is answered from its record.
    """
    start = time.perf_counter()
    folder = SearchFolder(output)
    record = read_record(output, arch)
    if record is not None:
        return record
    if graph is not None:
        graph[0].set_arch(arch)
        model = graph[1]
    else:
        model = inherited_subnet(supernet, arch, space_kwargs)
    every = max(1, -(-len(split) // batch_size) // INTERMEDIATE_RESULTS)
    metrics = evaluate(model, split.batches(batch_size, device), device, progress=False,
                       on_batch=lambda index, value: report(value), report_every=every, precision=precision,
                       running=metric)
    latency = read_json(folder.latency).get(arch_key(arch)) if folder.latency.is_file() else None
    record = {'arch': arch, 'params': count_params(arch, **space_kwargs) / 1e6,
              'flops': count_flops(arch, **space_kwargs) / 1e9, 'latency': latency,
              'top1': metrics['top1'], 'balanced': metrics['balanced'], 'per_class': metrics['per_class'],
              'split': SEARCH_SPLIT, 'measured_on': measured_on or 'the search split', 'images': metrics['images'],
              'seconds': time.perf_counter() - start,
              'finished': time.time()}  # the order candidates finished in: best-so-far curves
    atomic_write_json(record, folder.record(arch))
    write_results(output, metric, every_seconds=2.0)
    return record


def final_metrics(record: Mapping[str, Any], metric: str = 'top1') -> dict[str, float]:
    """What NNI shows of a candidate: the ranking ``metric`` on the search split as the default metric, both
    accuracies under their own names, then its cost."""
    return {'default': record[metric], 'top1': record['top1'], 'balanced': record['balanced'],
            'params': record['params'], 'flops': record['flops'],
            **({'latency': record['latency']} if record['latency'] is not None else {})}


def evaluate_candidate(model: torch.nn.Module, weights: str, cache: str, output: str, batch_size: int,
                       device: str, precision: str | None = None, metric: str = 'top1',
                       measured_on: str | None = None, compile: bool = False) -> None:
    """NNI trial run in the search's own process (``--engine sequential``): evaluates and reports."""
    supernet, space_kwargs = _supernet(weights)
    arch = typed_arch(nni.get_current_parameter().sample)
    device = pick_device(device)
    try:
        graph = compiled_supernet(weights, str(device)) if compile else None
        record = evaluate_arch(arch, supernet, space_kwargs, _search_data(cache), Path(output), batch_size,
                               device, nni.report_intermediate_result, precision, metric, measured_on, graph)
    except Exception as err:
        record_failure(output, arch_key(arch), f'{type(err).__name__}: {err}')
        raise
    nni.report_final_result(final_metrics(record, metric))


def candidate_server(spec: Mapping[str, Any]) -> Callable[[str, Callable[[dict], None]], None]:
    """What a warm worker (trial.py) runs per candidate: the supernet, the split and the imports stay loaded."""
    supernet, space_kwargs = _supernet(spec['weights'])
    split = _search_data(spec['cache'])
    device = pick_device(spec['device'])
    output = Path(spec['output'])
    metric = spec.get('metric', 'top1')
    graph = compiled_supernet(spec['weights'], str(device)) if spec.get('compile') else None

    def evaluate_parameter(parameter: str, send: Callable[[dict], None]) -> None:
        arch = typed_arch(nni.load(parameter)['parameters'].sample)
        record = evaluate_arch(arch, supernet, space_kwargs, split, output, spec['batch_size'], device,
                               lambda value: send({'intermediate': value}), spec.get('precision'), metric,
                               spec.get('measured_on'), graph)
        send({'final': final_metrics(record, metric)})

    return evaluate_parameter


def read_results(output: Path, metric: str = 'top1') -> list[dict]:
    """Every record in ``output``, best first (:func:`rank_key`); a record without ``metric`` is refused, not
    ranked as 0."""
    paths = SearchFolder(output).records()
    records = [read_json(p) for p in paths]
    for path, record in zip(paths, records):
        if metric not in record:
            raise UserError(f'{path} has no {metric} (written by an older version, or by a search that ranked by '
                            'another --metric): delete it to evaluate that candidate again, or use another --output')
    return ranked(records, metric)


_last_results_write = 0.0

# candidates.csv: (column header, record key); the headers name the split the accuracies are measured on
CSV_COLUMNS = [(metric_label('top1'), 'top1'), (metric_label('balanced'), 'balanced'), ('params (M)', 'params'),
               ('FLOPs (G)', 'flops'), ('latency (ms)', 'latency'), ('seconds', 'seconds'),
               ('per-class accuracy on the search split (%)', 'per_class'), ('arch', 'arch')]


def write_results(output: Path, metric: str = 'top1', every_seconds: float = 0.0) -> list[dict]:
    """Every finished candidate, best by ``metric`` first, as candidates.json and candidates.csv (each written
    atomically).

    Each candidate's own record is written the moment it finishes; these summaries, which grow
    with the search, are rewritten at most every ``every_seconds`` in one process (and at the end).
    """
    global _last_results_write
    if time.monotonic() - _last_results_write < every_seconds:
        return []
    _last_results_write = time.monotonic()
    records = read_results(output, metric)
    atomic_write_json(records, SearchFolder(output).results_json)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([header for header, _ in CSV_COLUMNS])
    for r in records:
        writer.writerow([_csv_value(r.get(key)) for _, key in CSV_COLUMNS])
    atomic_write_text(buffer.getvalue(), SearchFolder(output).results_csv)
    return records


def _csv_value(value: Any) -> str:
    if value is None:
        return ''
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return f'{value:.6g}'


def pareto_front(records: list[dict], metric: str = 'top1') -> list[dict]:
    """Candidates no other beats on both ``metric`` and (fewer) params."""
    front, best = [], float('-inf')
    for record in sorted(records, key=lambda r: (r['params'], -r[metric])):
        if record[metric] > best:
            front.append(record)
            best = record[metric]
    return front


def plot_pareto(records: list[dict], path: Path, title: str, metric: str = 'top1') -> None:
    """``metric`` (on the search split, as the axis says) against parameters, with the Pareto front."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    front = pareto_front(records, metric)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r['params'] for r in records], [r[metric] for r in records], s=12, alpha=0.6, label='candidates')
    ax.plot([r['params'] for r in front], [r[metric] for r in front], 'r.-', label='Pareto front')
    ax.set(xlabel='parameters (M)', ylabel=metric_label(metric), title=title)
    ax.legend()
    save_figure(fig, path, dpi=120)
