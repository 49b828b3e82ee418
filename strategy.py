"""Search strategies and budgets: the paper's evolution as an NNI strategy, parameter / FLOPs /
latency budgets, and the ledger between a strategy and NNI's engine (records, count, progress).

Used by ``search.py``; each piece works on its own in any NNI 3.0 experiment.
"""
from __future__ import annotations

import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from nni.nas.execution import ExecutionEngine
from nni.nas.execution.event import ModelEventType, TrainingEndEvent
from nni.nas.space import ExecutableModelSpace, ModelStatus
from nni.nas.strategy import Random, RegularizedEvolution
from nni.nas.strategy.base import Strategy
from nni.nas.strategy.middleware import Chain, Filter, StrategyMiddleware

from candidates import final_metrics, rank_key, ranking, read_record
from metrics import METRICS
from arch import arch_choices, arch_key, count_flops, count_params, extreme_arch, sample_arch
from space import AutoformerSpace
from failures import first_failure
from utils import UserError, atomic_write_json, read_json

_logger = logging.getLogger(__name__)


class Budget:
    """Parameter (M), FLOPs (G) and latency (ms) limits; latency measured once per arch and cached in a file."""

    def __init__(self, space_kwargs: Mapping[str, Any], min_params: float | None = None,
                 max_params: float | None = None, max_flops: float | None = None, max_latency: float | None = None,
                 latency_device: str = 'cpu', latency_batch_size: int = 1, latency_file: Path | None = None) -> None:
        self.space_kwargs = dict(space_kwargs)
        self.min_params, self.max_params, self.max_flops = min_params, max_params, max_flops
        self.max_latency, self.latency_device = max_latency, latency_device
        self.latency_batch_size, self.latency_file = latency_batch_size, latency_file
        self._latency: dict[str, float] = read_json(latency_file) \
            if latency_file is not None and latency_file.is_file() else {}

    def describe(self) -> str:
        limits = (('params >=', self.min_params, 'M'), ('params <=', self.max_params, 'M'),
                  ('FLOPs <=', self.max_flops, 'G'), ('latency <=', self.max_latency, 'ms'))
        return ', '.join(f'{what} {value}{unit}' for what, value, unit in limits if value is not None) or 'none'

    def fits(self, arch: Mapping[str, Any]) -> bool:
        params = count_params(arch, **self.space_kwargs) / 1e6
        if self.min_params is not None and params < self.min_params:
            return False
        if self.max_params is not None and params > self.max_params:
            return False
        if self.max_flops is not None and count_flops(arch, **self.space_kwargs) / 1e9 > self.max_flops:
            return False
        return self.max_latency is None or self.latency(arch) <= self.max_latency

    def latency(self, arch: Mapping[str, Any]) -> float:
        """Median milliseconds of a forward pass of the frozen subnet after warm-up (cached per arch)."""
        key = arch_key(arch)
        if key not in self._latency:
            self._latency[key] = measure_latency(AutoformerSpace(**self.space_kwargs).freeze(arch),
                                                 self.space_kwargs['img_size'], self.latency_batch_size,
                                                 torch.device(self.latency_device))
            if self.latency_file is not None:
                atomic_write_json(self._latency, self.latency_file)
        return self._latency[key]

    def check_feasible(self) -> None:
        """Say before starting when no arch of the space can meet the budget."""
        smallest, largest = extreme_arch(self.space_kwargs, min), extreme_arch(self.space_kwargs, max)
        low, high = (count_params(a, **self.space_kwargs) / 1e6 for a in (smallest, largest))
        problems = []
        if self.max_params is not None and low > self.max_params:
            problems.append(f'the smallest subnet has {low:.3f}M params > --max-params {self.max_params}')
        if self.min_params is not None and high < self.min_params:
            problems.append(f'the largest subnet has {high:.3f}M params < --min-params {self.min_params}')
        least_flops = count_flops(smallest, **self.space_kwargs) / 1e9
        if self.max_flops is not None and least_flops > self.max_flops:
            problems.append(f'the smallest subnet needs {least_flops:.4f}G FLOPs > --max-flops {self.max_flops}')
        if self.max_latency is not None and self.latency(smallest) > self.max_latency:
            problems.append(f'the smallest subnet takes {self.latency(smallest):.2f}ms > --max-latency '
                            f'{self.max_latency}')
        if problems:
            raise UserError('no architecture of the space meets the budget: ' + '; '.join(problems))


@torch.no_grad()
def measure_latency(model: torch.nn.Module, img_size: int, batch_size: int, device: torch.device,
                    warmup: int = 3, repeats: int = 10) -> float:
    model.eval().to(device)
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    times = []
    synchronize = torch.cuda.synchronize if device.type == 'cuda' else lambda: None
    for i in range(warmup + repeats):
        synchronize()
        start = time.perf_counter()
        model(images)
        synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


OFFSPRING_ATTEMPTS = 10  # proposals per wanted mutant or crossover child, as in the official evolution.py
CROSSOVER_REDRAWS = 50  # parent pairs drawn for one crossover until their depths match (official)
RANDOM_ATTEMPTS = 100  # the official code draws random archs without limit; a tight budget would then hang


class AutoformerEvolution(Strategy):
    """AutoFormer's evolution: keep the top ``select`` of all evaluated, then ``mutation_num`` mutants and
    ``crossover_num`` crossovers of them, topped up with random archs to ``population``, each within budget."""

    def __init__(self, space_kwargs: Mapping[str, Any], fits: Callable[[dict], bool], population: int = 50,
                 select: int = 10, mutation_num: int = 25, crossover_num: int = 25, mutation_prob: float = 0.2,
                 param_mutation_prob: float = 0.4, generations: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.space_kwargs = dict(space_kwargs)
        self.choices = arch_choices(space_kwargs)
        self.fits = fits
        self.population, self.select, self.generations = population, select, generations
        self.mutation_num, self.crossover_num = mutation_num, crossover_num
        self.mutation_prob, self.param_mutation_prob = mutation_prob, param_mutation_prob
        self.rng = random.Random(seed)
        self.seen: set[str] = set()
        self.top: list[tuple[float, dict]] = []

    def extra_repr(self) -> str:
        return f'population={self.population}, select={self.select}, generations={self.generations}'

    def state_dict(self) -> dict:
        return {}  # a resumed search replays its finished candidates from their records (CandidateEvaluator.evaluate)

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def _run(self) -> None:
        candidates = self._fill([])
        for generation in range(self.generations):
            _logger.info('generation %d: %d candidates', generation, len(candidates))
            evaluated = self._evaluate(candidates)
            if evaluated is None:
                return
            self.top = sorted(self.top + evaluated, key=self._rank)[:self.select]
            if not self.top or generation == self.generations - 1:
                return
            parents = [arch for _, arch in self.top]
            children = self._make(self.mutation_num, lambda: self._mutate(self.rng.choice(parents)),
                                  self.mutation_num * OFFSPRING_ATTEMPTS)
            children += self._make(self.crossover_num, self._crossover, self.crossover_num * OFFSPRING_ATTEMPTS)
            candidates = self._fill(children)

    def _rank(self, item: tuple[float, dict]) -> tuple:
        """The search's ranking (candidates.ranking) of an evaluated ``(metric, arch)``."""
        metric, arch = item
        return ranking(metric, count_params(arch, **self.space_kwargs) / 1e6, arch)

    def _evaluate(self, samples: list[dict]) -> list[tuple[float, dict]] | None:
        models = []
        for sample in samples:
            if not self.wait_for_resource():
                break
            model = self.model_space.freeze(sample)
            self.engine.submit_models(model)
            models.append(model)
        if not models:
            return None
        self.engine.wait_models(*models)
        return [(float(m.metric), m.sample) for m in models if m.metric is not None]

    def _random(self) -> dict:
        return sample_arch(self.space_kwargs, self.rng)

    def _mutate(self, parent: dict) -> dict:
        """The official mutation: a new depth (added layers get fresh genes) and embed dim with
        ``param_mutation_prob``, each used layer's MLP ratio and heads with ``mutation_prob``."""
        child = dict(parent)
        depth = int(parent['depth'])
        if self.rng.random() < self.param_mutation_prob:
            new_depth = self.rng.choice(self.choices['depth'])
            for gene in ('mlp_ratio', 'num_head'):  # every new MLP ratio, then every new head count
                for i in range(depth, new_depth):
                    child[f'{gene}_{i}'] = self.rng.choice(self.choices[f'{gene}_{i}'])
            depth = child['depth'] = new_depth
        for gene in ('mlp_ratio', 'num_head'):
            for i in range(depth):
                if self.rng.random() < self.mutation_prob:
                    child[f'{gene}_{i}'] = self.rng.choice(self.choices[f'{gene}_{i}'])
        if self.rng.random() < self.param_mutation_prob:
            child['embed_dim'] = self.rng.choice(self.choices['embed_dim'])
        return child

    def _crossover(self) -> dict | None:
        """The official crossover: two parents of equal depth (up to 50 redraws), each gene from either."""
        parents = [arch for _, arch in self.top]
        first, second = self.rng.choice(parents), self.rng.choice(parents)
        for _ in range(CROSSOVER_REDRAWS):
            if first['depth'] == second['depth']:
                break
            first, second = self.rng.choice(parents), self.rng.choice(parents)
        else:
            return None
        return {label: self.rng.choice([first[label], second[label]]) for label in self.choices}

    def _make(self, count: int, propose: Callable[[], dict | None], attempts: int) -> list[dict]:
        """Up to ``count`` new archs within budget, never one seen before, from at most ``attempts`` proposals."""
        made: list[dict] = []
        for _ in range(attempts):
            if len(made) == count:
                break
            arch = propose()
            if arch is None:
                continue
            key = arch_key(arch)
            if key not in self.seen and self.fits(arch):
                self.seen.add(key)
                made.append(arch)
        return made

    def _fill(self, candidates: list[dict]) -> list[dict]:
        missing = self.population - len(candidates)
        return candidates + self._make(missing, self._random, missing * RANDOM_ATTEMPTS)


@dataclass(frozen=True)
class StrategySettings:
    """search.py's strategy flags of the same names (see its --help)."""
    strategy: str
    seed: int
    population: int
    select: int
    mutation_num: int
    crossover_num: int
    mutation_prob: float
    param_mutation_prob: float
    generations: int
    evolution_population_size: int
    evolution_sample_size: int
    evolution_mutation_prob: float


def build_strategy(settings: StrategySettings, space_kwargs: Mapping[str, Any], budget: Budget,
                   ledger: 'SearchLedger') -> Strategy:
    """The strategy, with candidates outside the budget rejected before they are submitted (never evaluated)
    and the ledger (records, count, progress) between it and the engine."""
    s = settings
    if s.strategy == 'autoformer':
        strategy = AutoformerEvolution(space_kwargs, budget.fits, population=s.population, select=s.select,
                                       mutation_num=s.mutation_num, crossover_num=s.crossover_num,
                                       mutation_prob=s.mutation_prob, param_mutation_prob=s.param_mutation_prob,
                                       generations=s.generations, seed=s.seed)
        return Chain(strategy, ledger)
    strategy = Random(seed=s.seed) if s.strategy == 'random' else RegularizedEvolution(
        population_size=s.evolution_population_size, sample_size=s.evolution_sample_size,
        mutation_prob=s.evolution_mutation_prob, seed=s.seed)
    return Chain(strategy, Filter(lambda model: budget.fits(model.sample), patience=100_000), ledger)


REPEATS_IN_A_ROW = 1000  # proposals in a row that repeat earlier candidates before the search stops (no trial each)
REPEAT_LINES = 20  # repeats shown in the terminal (an evolution that keeps re-proposing its parents would flood it)


class SearchLedger(StrategyMiddleware):
    """Between the strategy and NNI's engine: counts distinct candidates (archs by :func:`arch.arch_key`) and
    stops at the planned number of them; answers a candidate recorded in ``output`` by a stopped run of this
    search from its record without a trial, and a proposal that repeats a candidate of this run (an arch equal
    to an earlier one but for the labels of unused layers) from that candidate's result, not counted; waits for
    its own trials (no fixed patience); prints progress and the first failure's error. ``metric`` is what the
    best and NNI's default metric are (see :data:`metrics.METRICS`)."""

    def __init__(self, output: Path, planned: int, metric: str = 'top1') -> None:
        super().__init__()
        self.output, self.planned, self.metric = output, planned, metric
        self.submitted = self.done = self.failed = self.recorded = self.repeats = self.repeats_in_a_row = 0
        self.numbers: dict[str, int] = {}  # arch key -> its candidate number in this run
        self.pending: dict[int, ExecutableModelSpace] = {}  # NNI's engine keeps only weak references to them
        self.waiting: dict[str, list[ExecutableModelSpace]] = {}  # repeats of a candidate still evaluating
        self.replays: list[ExecutableModelSpace] = []
        self.best: dict | None = None
        self.started = self.first_done = time.monotonic()
        self.first_failure: str | None = None

    def _initialize_engine(self, engine: ExecutionEngine) -> None:
        engine.register_model_event_callback(ModelEventType.TrainingEnd, self._on_end)

    def register_model_event_callback(self, event_type: ModelEventType, callback: Callable) -> None:
        super().register_model_event_callback(event_type, callback)
        self.engine.register_model_event_callback(event_type, callback)

    def unregister_model_event_callback(self, event_type: ModelEventType, callback: Callable) -> None:
        super().unregister_model_event_callback(event_type, callback)
        self.engine.unregister_model_event_callback(event_type, callback)

    def state_dict(self) -> dict:
        return {}  # a resumed search replays its candidates from their records

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def budget_available(self) -> bool:
        if self.repeats_in_a_row >= REPEATS_IN_A_ROW:
            return False
        return self.submitted < self.planned and self.engine.budget_available()

    def submit_models(self, *models: ExecutableModelSpace) -> None:
        for model in models:
            key = arch_key(model.sample)
            if key in self.numbers:
                self._repeat(model, key)
                continue
            self.repeats_in_a_row = 0
            self.submitted += 1
            self.numbers[key] = self.submitted
            record = read_record(self.output, model.sample)
            if record is None:
                self.pending[id(model)] = model
                self.engine.submit_models(model)
                continue
            self._replay(model, record)
            self.recorded += 1
            self._count(record, answered=True)

    def _repeat(self, model: ExecutableModelSpace, key: str) -> None:
        """A proposal of an arch already a candidate of this run: its result, once there, without a trial."""
        self.repeats += 1
        self.repeats_in_a_row += 1
        number = self.numbers[key]
        if any(arch_key(m.sample) == key for m in self.pending.values()):
            self.waiting.setdefault(key, []).append(model)
            answer = 'answered when it finishes'
        else:
            self._replay(model, read_record(self.output, model.sample))
            answer = 'answered from its record'
        if self.repeats <= REPEAT_LINES:
            more = f' (further repeats are not shown; {REPEAT_LINES} so far)' if self.repeats == REPEAT_LINES else ''
            print(f'a proposal repeats candidate {number} (the same subnet; labels of layers past its depth aside): '
                  f'{answer}, not counted{more}', flush=True)
        if self.repeats_in_a_row == REPEATS_IN_A_ROW:
            print(f'stopping: {REPEATS_IN_A_ROW} proposals in a row repeated earlier candidates (the budget leaves '
                  f'few distinct subnets; {self.submitted} so far)', flush=True)

    def _replay(self, model: ExecutableModelSpace, record: dict | None) -> None:
        """Tell the strategy ``model``'s result from ``record`` (None: it failed) as if it had been trained."""
        self.replays.append(model)
        if record is None:
            self.dispatch_model_event(ModelEventType.TrainingEnd, status=ModelStatus.Failed, model=model)
            return
        self.dispatch_model_event(ModelEventType.FinalMetric, metric=final_metrics(record, self.metric), model=model)
        self.dispatch_model_event(ModelEventType.TrainingEnd, status=ModelStatus.Trained, model=model)

    def list_models(self, status: ModelStatus | None = None) -> Iterator[ExecutableModelSpace]:
        yield from self.engine.list_models(status)
        yield from (model for model in self.replays if status is None or model.status == status)

    def wait_pending(self, running: Callable[[], bool], check_every: float = 5.0) -> None:
        """Until every submitted trial has ended; ``running()`` (checked every few seconds) says whether NNI's
        manager can still end them."""
        last_check = time.monotonic()
        while self.pending:
            time.sleep(0.1)
            if time.monotonic() - last_check > check_every:
                last_check = time.monotonic()
                if self.pending and not running():
                    raise UserError(f"NNI's manager stopped with {len(self.pending)} candidates still to finish; "
                                    "its log is in the experiment folder's log/nnimanager.log (continue with "
                                    "--resume)")

    def _on_end(self, event: TrainingEndEvent) -> None:
        if self.pending.pop(id(event.model), None) is None:
            return
        record = read_record(self.output, event.model.sample) if event.status == ModelStatus.Trained else None
        self._count(record)
        for repeat in self.waiting.pop(arch_key(event.model.sample), []):
            self._replay(repeat, record)

    def _count(self, record: dict | None, answered: bool = False) -> None:
        """One more distinct candidate done: ``record`` is its record, None when it failed; ``answered`` when it
        was answered from the record of a stopped run of this search."""
        self.done += 1
        if record is None:
            self.failed += 1
            if self.first_failure is None:
                self.first_failure = first_failure(self.output) or \
                    "no error recorded (see the trial's stderr in the web UI)"
                print(f'a candidate failed: {self.first_failure}', flush=True)
        elif self.best is None or rank_key(record, self.metric) < rank_key(self.best, self.metric):
            self.best = record
        if not answered and self.done - self.recorded == 1:
            self.first_done = time.monotonic()
        print(self.progress(answered), flush=True)

    def progress(self, answered: bool = False) -> str:
        """``candidate 12/100 | best top-1 85.30 (0.231M) | 1.4 s each | ETA 2m 3s``; ``answered``: the
        candidate came from its record (``candidate 3/100 (from its record) | ...``)."""
        evaluated = self.done - self.recorded
        parts = [f'candidate {self.done}/{self.planned}' + (' (from its record)' if answered else '')]
        if self.best is not None:
            parts.append(f"best {METRICS[self.metric]} {self.best[self.metric]:.2f} ({self.best['params']:.3f}M)")
        if self.failed:
            parts.append(f'{self.failed} failed')
        if evaluated:
            # After the first candidate, whose time includes NNI's start-up and the workers' loading.
            each = (time.monotonic() - self.first_done) / (evaluated - 1) if evaluated > 1 else \
                time.monotonic() - self.started
            left = max(self.planned - self.done, 0) * each
            parts += [f'{each:.1f} s each', f'ETA {int(left // 60)}m {int(left % 60)}s']
        return ' | '.join(parts)
