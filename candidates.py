"""The search's candidates: one subnet evaluated with weights inherited from the supernet (the trial NNI runs
in the search's process, or a warm worker of ``trial.py`` serves), its record, the results files and the
Pareto plot. ``outputs.SearchFolder`` names every file of a search's output folder.
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

from checkpoints import read_weights
from devices import pick_device
from engine import evaluate
from masked_supernet import MaskedSupernet
from metrics import METRICS
from outputs import SearchFolder
from plots import save_figure
from search_data import CachedSplit
from arch import arch_key, count_flops, count_params, typed_arch
from space import build_supernet, inherited_subnet
from failures import record_failure
from utils import UserError, atomic_write_json, atomic_write_text, read_json
from workers import file_identity, read_spec


INTERMEDIATE_RESULTS = 20  # per candidate at most: the web UI's chart, not one point per batch

RECORD_METRICS = ('top1', 'balanced', 'per_class')  # a record without them is re-evaluated, never ranked as 0
TIE_BREAK = 'the higher metric first; on a tie, fewer parameters, then the arch key (arch.arch_key)'
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


@dataclass
class CandidateEvaluator:
    """Evaluates candidates with weights inherited from a supernet held in memory, on the search split, and writes
    each one's record. Made once per process (the search's own with ``--engine sequential``, each warm worker's
    otherwise), never per candidate. ``compile``: every candidate runs one compiled graph of the supernet with the
    arch as data (masked_supernet.py) instead of a frozen copy: the same figures up to float rounding."""
    supernet: Mapping[str, torch.Tensor]
    space_kwargs: Mapping[str, Any]
    split: CachedSplit
    output: Path
    batch_size: int
    device: torch.device
    precision: str | None = None
    metric: str = 'top1'
    measured_on: str = 'the search split'
    compile: bool = False

    def __post_init__(self) -> None:
        self.graph = compiled_graph(self.supernet, self.space_kwargs, self.device) if self.compile else None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> CandidateEvaluator:
        """A warm worker's: the weights file the search read (refused if it changed since), the search's split and
        settings, as the search decided them."""
        weights = Path(spec['weights'])
        if file_identity(weights) != spec['weights_identity']:
            raise UserError(f'{weights} changed after the search read it: restart the search with --resume')
        state_dict, meta = read_weights(weights)
        return cls(state_dict, meta['space'], CachedSplit(spec['cache']), Path(spec['output']), spec['batch_size'],
                   pick_device(spec['device']), spec['precision'], spec['metric'], spec['measured_on'], spec['compile'])

    def evaluate(self, arch: Mapping[str, Any], report: Callable[[float], None]) -> dict[str, Any]:
        """Top-1, balanced and per-class accuracy of one subnet on the search split; its record, also written.
        ``report`` gets the running metric (NNI's intermediate results). A candidate already recorded (a resumed
        search) is answered from its record."""
        start = time.perf_counter()
        folder = SearchFolder(self.output)
        record = read_record(self.output, arch)
        if record is not None:
            return record
        if self.graph is not None:
            self.graph[0].set_arch(arch)
        model = self.graph[1] if self.graph is not None else inherited_subnet(self.supernet, arch, self.space_kwargs)
        every = max(1, -(-len(self.split) // self.batch_size) // INTERMEDIATE_RESULTS)
        metrics = evaluate(model, self.split.batches(self.batch_size, self.device), self.device, progress=False,
                           on_batch=lambda index, value: report(value), report_every=every, precision=self.precision,
                           running=self.metric)
        latency = read_json(folder.latency).get(arch_key(arch)) if folder.latency.is_file() else None
        record = {'arch': arch, 'params': count_params(arch, **self.space_kwargs) / 1e6,
                  'flops': count_flops(arch, **self.space_kwargs) / 1e9, 'latency': latency,
                  'top1': metrics['top1'], 'balanced': metrics['balanced'],
                  'per_class': dict(zip(self.split.classes, metrics['per_class'])),
                  'split': SEARCH_SPLIT, 'measured_on': self.measured_on, 'images': metrics['images'],
                  'seconds': time.perf_counter() - start,
                  'finished': time.time()}  # the order candidates finished in: best-so-far curves
        atomic_write_json(record, folder.record(arch))
        return record

    def serve(self, parameter: str, send: Callable[[dict], None]) -> None:
        """A warm worker's answer to one trial (trial.py): its running metric, then its final metrics."""
        arch = typed_arch(nni.load(parameter)['parameters'].sample)
        record = self.evaluate(arch, lambda value: send({'intermediate': value}))
        send({'final': final_metrics(record, self.metric)})


def compiled_graph(supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any],
                   device: torch.device) -> tuple[MaskedSupernet, torch.nn.Module]:
    """The supernet as one compiled graph for every candidate, and its arch setter (masked_supernet.py)."""
    model = build_supernet(space_kwargs)
    model.load_state_dict(supernet)
    masked = MaskedSupernet(model).to(device).eval()
    return masked, torch.compile(masked)


def final_metrics(record: Mapping[str, Any], metric: str = 'top1') -> dict[str, float]:
    """What NNI shows of a candidate: the ranking ``metric`` on the search split as the default metric, both
    accuracies under their own names, then its cost."""
    return {'default': record[metric], 'top1': record['top1'], 'balanced': record['balanced'],
            'params': record['params'], 'flops': record['flops'],
            **({'latency': record['latency']} if record['latency'] is not None else {})}


def evaluate_in_process(model: torch.nn.Module, candidates: CandidateEvaluator) -> None:
    """The NNI trial of ``--engine sequential``, run in the search's own process with what it already holds."""
    arch = typed_arch(nni.get_current_parameter().sample)
    try:
        record = candidates.evaluate(arch, nni.report_intermediate_result)
    except Exception as err:
        record_failure(str(candidates.output), arch_key(arch), f'{type(err).__name__}: {err}')
        raise
    nni.report_final_result(final_metrics(record, candidates.metric))


@lru_cache(maxsize=1)
def _evaluator_of(spec: str) -> CandidateEvaluator:
    return CandidateEvaluator.from_spec(read_spec(spec))


def evaluate_from_spec(model: torch.nn.Module, spec: str) -> None:
    """The NNI trial of ``--engine ts`` when no warm worker can serve it (a training service without NNI's HTTP
    trial channel): the worker's evaluation, in the trial's own process."""
    evaluate_in_process(model, _evaluator_of(spec))


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


# candidates.csv: (column header, record key); the headers name the split the accuracies are measured on
CSV_COLUMNS = [(metric_label('top1'), 'top1'), (metric_label('balanced'), 'balanced'), ('params (M)', 'params'),
               ('FLOPs (G)', 'flops'), ('latency (ms)', 'latency'), ('seconds', 'seconds'),
               ('per-class accuracy on the search split (%), by class name', 'per_class'), ('arch', 'arch')]


def write_results(output: Path, metric: str = 'top1') -> list[dict]:
    """Every finished candidate, ranked once (:func:`rank_key`), as candidates.json and candidates.csv (each
    written atomically), at the end of a search or when it stops; each candidate's own record is written the
    moment it finishes."""
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
