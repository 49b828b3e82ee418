"""Search a trained supernet for the best subnet under a budget, as an NNI experiment.

    python search.py --weights weights/supernet-tiny.pth --datapath path/to/imagenet          # random
    python search.py --weights weights/supernet-tiny.pth --datapath path/to/cifar10 --evolution \\
                     --evolution-sample-size 100 --evolution-population-size 50 --evolution-cycles 1000
    python search.py --dataset digits --weights outputs/scratch-digits/supernet.pth \\
                     --strategy autoformer --max-params 0.25 --engine sequential

Every candidate inherits its weights from the supernet (no retraining) and is ranked by top-1 on
the search split, decoded once into a cache. Candidates outside the budget are never evaluated.
Results go to --output as they finish: candidates.csv / .json, best.json, the best subnet's
weights, and a plot of top-1 against parameters with the Pareto front.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import data
import torch
from engine import arch_key, evaluate_candidate, write_results
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.experiment import NasExperiment, NasExperimentConfig
from nni.nas.strategy import Random, RegularizedEvolution
from nni.nas.strategy.base import Strategy
from nni.nas.strategy.middleware import Chain, Filter
from space import (AutoformerSpace, arch_choices, count_flops, count_params, export_standalone, extreme_arch,
                   load_supernet_file, sample_arch, save_weights, sub_state_dict, used_arch)
from utils import UserError, atomic_write_json, check_writable, remove_unfinished_writes, run_main

_logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------

class Budget:
    """Parameter (M), FLOPs (G) and latency (ms) limits; latency measured once per arch and cached in a file."""

    def __init__(self, space_kwargs: Mapping[str, Any], min_params: float | None = None,
                 max_params: float | None = None, max_flops: float | None = None, max_latency: float | None = None,
                 latency_device: str = 'cpu', latency_batch_size: int = 1, latency_file: Path | None = None) -> None:
        self.space_kwargs = dict(space_kwargs)
        self.min_params, self.max_params, self.max_flops, self.max_latency = min_params, max_params, max_flops, \
            max_latency
        self.latency_device, self.latency_batch_size = latency_device, latency_batch_size
        self.latency_file = latency_file
        self._latency: dict[str, float] = json.loads(latency_file.read_text()) \
            if latency_file is not None and latency_file.is_file() else {}

    def describe(self) -> str:
        parts = [f'params >= {self.min_params}M' if self.min_params is not None else '',
                 f'params <= {self.max_params}M' if self.max_params is not None else '',
                 f'FLOPs <= {self.max_flops}G' if self.max_flops is not None else '',
                 f'latency <= {self.max_latency}ms' if self.max_latency is not None else '']
        return ', '.join(p for p in parts if p) or 'none'

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
    for i in range(warmup + repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# The paper's evolution as an NNI strategy
# --------------------------------------------------------------------------------------------

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

    def _initialize(self, model_space, engine):
        return model_space

    def state_dict(self) -> dict:
        return {}  # a resumed search replays its finished candidates from their records (see evaluate_candidate)

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def _run(self) -> None:
        candidates = self._fill([])
        for generation in range(self.generations):
            _logger.info('generation %d: %d candidates', generation, len(candidates))
            evaluated = self._evaluate(candidates)
            if evaluated is None:
                return
            self.top = sorted(self.top + evaluated, key=lambda item: -item[0])[:self.select]
            if not self.top:
                return
            parents = [arch for _, arch in self.top]
            children = self._make(self.mutation_num, lambda: self._mutate(self.rng.choice(parents)))
            children += self._make(self.crossover_num, lambda: self._crossover(*self.rng.choices(parents, k=2)))
            candidates = self._fill(children)

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
        child = copy.copy(parent)
        for label, values in self.choices.items():
            prob = self.param_mutation_prob if label in ('embed_dim', 'depth') else self.mutation_prob
            if self.rng.random() < prob:
                child[label] = self.rng.choice(values)
        return child

    def _crossover(self, first: dict, second: dict) -> dict:
        return {label: self.rng.choice([first[label], second[label]]) for label in self.choices}

    def _make(self, count: int, propose: Callable[[], dict], tries: int = 100) -> list[dict]:
        """Up to ``count`` new archs within budget, never one seen before."""
        made = []
        for _ in range(count * tries):
            if len(made) == count:
                break
            arch = propose()
            key = arch_key(arch)
            if key not in self.seen and self.fits(arch):
                self.seen.add(key)
                made.append(arch)
        return made

    def _fill(self, candidates: list[dict]) -> list[dict]:
        return candidates + self._make(self.population - len(candidates), self._random)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

def pareto_front(records: list[dict]) -> list[dict]:
    """Candidates no other beats on both top-1 and (fewer) params."""
    front, best = [], float('-inf')
    for record in sorted(records, key=lambda r: (r['params'], -r['top1'])):
        if record['top1'] > best:
            front.append(record)
            best = record['top1']
    return front


def plot_pareto(records: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    front = pareto_front(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r['params'] for r in records], [r['top1'] for r in records], s=12, alpha=0.6, label='candidates')
    ax.plot([r['params'] for r in front], [r['top1'] for r in front], 'r.-', label='Pareto front')
    ax.set(xlabel='parameters (M)', ylabel='top-1 (%)', title=title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix('.tmp.png')
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--name', choices=['tiny', 'small', 'base', 'demo'], default=None,
                        help='preset of --weights (default: the space stored with them, else tiny)')
    parser.add_argument('--weights', default='weights/supernet-tiny.pth', help='trained supernet weights')
    data.add_data_args(parser, batch_size=256)
    parser.add_argument('--search-images', type=int, default=10000,
                        help='class-balanced training images to search on (ImageNet: subImageNet)')
    parser.add_argument('--strategy', choices=['random', 'evolution', 'autoformer'], default='random',
                        help="NNI's Random, NNI's RegularizedEvolution, or the paper's evolution")
    parser.add_argument('--evolution', action='store_true', help='same as --strategy evolution (seed CLI)')
    parser.add_argument('--trials', '--evolution-cycles', dest='trials', type=int, default=100,
                        help='candidates to evaluate (random and evolution)')
    parser.add_argument('--evolution-population-size', type=int, default=50, help='regularized evolution')
    parser.add_argument('--evolution-sample-size', type=int, default=25,
                        help='tournament size (capped at the population size)')
    parser.add_argument('--evolution-mutation-prob', type=float, default=0.05, help='per-label mutation probability')
    parser.add_argument('--generations', type=int, default=20, help='autoformer: generations')
    parser.add_argument('--population', type=int, default=50, help='autoformer: population per generation')
    parser.add_argument('--select', type=int, default=10, help='autoformer: parents kept (top-k)')
    parser.add_argument('--mutation-num', type=int, default=25, help='autoformer: mutants per generation')
    parser.add_argument('--crossover-num', type=int, default=25, help='autoformer: crossovers per generation')
    parser.add_argument('--mutation-prob', type=float, default=0.2, help='autoformer: per-layer mutation probability')
    parser.add_argument('--param-mutation-prob', type=float, default=0.4,
                        help='autoformer: depth / embed dim mutation probability')
    parser.add_argument('--min-params', type=float, default=None, help='budget: at least this many M params')
    parser.add_argument('--max-params', type=float, default=None, help='budget: at most this many M params')
    parser.add_argument('--max-flops', type=float, default=None, help='budget: at most this many GFLOPs (MACs)')
    parser.add_argument('--max-latency', type=float, default=None, help='budget: at most this many ms per batch')
    parser.add_argument('--latency-device', default='cpu', help='device latency is measured on')
    parser.add_argument('--latency-batch-size', type=int, default=1, help='batch latency is measured at')
    parser.add_argument('--engine', choices=['ts', 'sequential'], default='ts',
                        help="ts: NNI's training service with the web UI; sequential: one process")
    parser.add_argument('--gpus', type=int, default=0, help='trials at once, one GPU each (ts engine)')
    parser.add_argument('--concurrency', type=int, default=None, help='trials at once (default: --gpus or 1)')
    parser.add_argument('--port', type=int, default=8080, help='web UI port (ts engine)')
    parser.add_argument('--web-ui-host', choices=['loopback', 'all'], default='loopback',
                        help='interfaces the web UI (no authentication) listens on; default: this machine only')
    parser.add_argument('--experiment-dir', default=None, help="NNI's experiment folder (default ~/nni-experiments)")
    parser.add_argument('--device', default=None, help='device trials evaluate on (default: CUDA when present)')
    parser.add_argument('--resume', default=None, metavar='ID', help='continue the experiment with this id')
    parser.add_argument('--export', action='store_true', help='also export the best subnet (TorchScript, ONNX)')
    parser.add_argument('--output', default=None, help='results folder (default: outputs/search-<experiment id>)')
    parser.add_argument('--seed', type=int, default=0, help='random seed of the strategy')
    args = parser.parse_args(argv)
    if args.evolution:
        args.strategy = 'evolution'
    args.dataset = data.dataset_name(args.dataset, args.datapath)
    if args.evolution_sample_size > args.evolution_population_size:
        _logger.warning('--evolution-sample-size %d > --evolution-population-size %d: using %d',
                        args.evolution_sample_size, args.evolution_population_size, args.evolution_population_size)
        args.evolution_sample_size = args.evolution_population_size
    return args


def build_strategy(args: argparse.Namespace, space_kwargs: Mapping[str, Any], budget: Budget) -> Strategy:
    if args.strategy == 'autoformer':
        return AutoformerEvolution(space_kwargs, budget.fits, population=args.population, select=args.select,
                                   mutation_num=args.mutation_num, crossover_num=args.crossover_num,
                                   mutation_prob=args.mutation_prob, param_mutation_prob=args.param_mutation_prob,
                                   generations=args.generations, seed=args.seed)
    strategy = Random(seed=args.seed) if args.strategy == 'random' else RegularizedEvolution(
        population_size=args.evolution_population_size, sample_size=args.evolution_sample_size,
        mutation_prob=args.evolution_mutation_prob, seed=args.seed)
    # Candidates outside the budget are rejected before they are submitted: never evaluated.
    return Chain(strategy, Filter(lambda model: budget.fits(model.sample), patience=100_000))


class SearchExperiment(NasExperiment):
    """A NAS experiment resumed from its candidate records rather than NNI's pickled strategy state.

    The strategy restarts from its seed and proposes the same candidates again; each one already
    recorded is answered from its record (no evaluation), so the search continues where it stopped.
    (NNI 3.0's state file also holds numpy objects that torch >= 2.6 refuses to unpickle.)
    """

    def load_checkpoint(self) -> None:
        pass

    def _send_space_to_nni_manager(self) -> None:
        """Not sent: NNI 3.0's ``nnictl view`` refuses a NAS experiment whose stored config has a search space."""


def experiment_config(args: argparse.Namespace) -> NasExperimentConfig:
    if args.engine == 'sequential':
        config = NasExperimentConfig('sequential', 'raw')
    else:
        config = NasExperimentConfig('ts', 'simplified', 'local')
        config.trial_concurrency = args.concurrency or max(args.gpus, 1)
        config.trial_gpu_number = 1 if args.gpus > 0 else 0
        if args.gpus > 0:
            config.training_service.use_active_gpu = True
    config.max_trial_number = args.population * args.generations if args.strategy == 'autoformer' else args.trials
    if args.experiment_dir:
        config.experiment_working_directory = str(Path(args.experiment_dir).resolve())
    return config


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if sock.connect_ex(('127.0.0.1', port)) == 0:
            raise UserError(f'port {port} is busy (another web UI or service uses it): pass another --port')


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    supernet, space_kwargs, meta = load_supernet_file(args.weights, args.name)
    split_classes = data.num_classes(args.dataset, args.datapath)
    if split_classes != space_kwargs['num_labels']:
        raise UserError(f'the {args.dataset} data has {split_classes} classes but the supernet has '
                        f'{space_kwargs["num_labels"]} outputs: pass a supernet trained for this dataset')
    if args.engine == 'ts':
        check_port_free(args.port)
        # Trials import the trial function from engine.py, whatever folder the search was started from.
        os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))
        if args.web_ui_host == 'loopback':
            preload = f"--require {ROOT / 'loopback.js'}"
            os.environ['NODE_OPTIONS'] = f"{os.environ.get('NODE_OPTIONS', '')} {preload}".strip()

    config = experiment_config(args)
    # The experiment id names the output folder the evaluator writes to: evaluator and strategy come after.
    experiment = SearchExperiment(AutoformerSpace(**space_kwargs), FunctionalEvaluator(lambda *a, **k: None),
                                  Random(), config, id=args.resume)
    output = Path(args.output or f'outputs/search-{experiment.id}').resolve()
    if output.joinpath('best.json').exists() and not args.resume:
        raise UserError(f'{output} already holds a finished search: choose another --output or pass --resume')
    check_writable(output)
    if args.resume:
        for folder in (output, output / 'candidates'):
            remove_unfinished_writes(folder)
    budget = Budget(space_kwargs, args.min_params, args.max_params, args.max_flops, args.max_latency,
                    args.latency_device, args.latency_batch_size, output / 'latency.json')
    budget.check_feasible()
    atomic_write_json({'experiment_id': experiment.id, 'argv': sys.argv[1:] if argv is None else argv},
                      output / 'experiment.json')
    weights = Path(args.weights).resolve()
    if 'space' not in meta:  # an official or NNI hub file: trials read a converted copy
        weights = output / 'supernet.pth'
        save_weights(weights, supernet, space_kwargs)
    cache = output / 'search-data.pt'
    if not cache.is_file():
        split = data.search_split(args.dataset, args.datapath, space_kwargs['img_size'], args.search_images,
                                  args.seed)
        data.write_cache(split, args.dataset, cache, num_workers=args.num_workers)
    experiment.evaluator = FunctionalEvaluator(evaluate_candidate, weights=str(weights), cache=str(cache),
                                               output=str(output), batch_size=args.batch_size,
                                               device=args.device or ('cuda' if args.gpus else 'cpu'))
    experiment.strategy = build_strategy(args, space_kwargs, budget)
    print(f'experiment {experiment.id}: {args.strategy} search, budget {budget.describe()}, results in {output}')
    if args.engine == 'ts':
        print(f'web UI: http://127.0.0.1:{args.port}  (after the run: nnictl view {experiment.id} --port {args.port}; '
              f'listening on {"this machine only" if args.web_ui_host == "loopback" else "every interface"})')
    if args.resume:
        experiment.resume(port=args.port, wait_completion=True)
    else:
        experiment.run(port=args.port, wait_completion=True)
    best = finish(experiment, output, supernet, space_kwargs, args)
    experiment.stop()
    return best


def nni_top_model(experiment: NasExperiment, best_top1: float, records: list[dict],
                  patience: float = 10.0) -> dict | None:
    """NNI's ``export_top_models`` answer, once it agrees with the records (the training service reports a
    trial's final metric a moment after the trial ends; with concurrent trials NNI 3.0 was also seen to pair
    metrics with the wrong models, so best.json follows the records and this answer is only reported)."""
    top1_of = {arch_key(r['arch']): r['top1'] for r in records}
    deadline = time.monotonic() + patience
    while True:
        top = experiment.export_top_models(top_k=1, formatter='dict')
        if top and top1_of.get(arch_key(top[0])) == best_top1:
            return used_arch(top[0])
        if time.monotonic() > deadline:
            _logger.warning('NNI\'s export_top_models gives %s, not a candidate with the best top-1 %.2f',
                            top, best_top1)
            return used_arch(top[0]) if top else None
        time.sleep(0.5)


def finish(experiment: NasExperiment, output: Path, supernet: Mapping[str, torch.Tensor],
           space_kwargs: Mapping[str, Any], args: argparse.Namespace) -> dict:
    """best.json (NNI's top model), its weights, the plot and, with --export, standalone files."""
    records = write_results(output)
    if not records:
        raise UserError('no candidate was evaluated: widen the budget or raise --trials')
    best = max(records, key=lambda r: (r['top1'], -r['params']))
    nni_top = nni_top_model(experiment, best['top1'], records)
    best = {**best, 'experiment_id': experiment.id, 'strategy': args.strategy, 'candidates': len(records),
            'nni_top_model': nni_top}
    atomic_write_json(best, output / 'best.json')
    save_weights(output / 'best-subnet.pth', sub_state_dict(supernet, best['arch']), space_kwargs, arch=best['arch'])
    plot_pareto(records, output / 'pareto.png', f'{args.strategy} search, {len(records)} candidates')
    print(f"best: top-1 {best['top1']:.2f} on the search split, {best['params']:.3f}M params, "
          f"{best['flops']:.4f}G FLOPs; {output / 'best.json'}")
    if args.export:
        model = AutoformerSpace(**space_kwargs).freeze(best['arch'])
        model.load_state_dict(sub_state_dict(supernet, best['arch']))
        export_standalone(model, best, space_kwargs, output / 'export')
    return best


if __name__ == '__main__':
    run_main(main)
