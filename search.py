"""Search a trained supernet for the best subnet under a budget, as an NNI experiment.

    python search.py --weights weights/supernet-tiny.pth --datapath path/to/imagenet          # random
    python search.py --weights weights/supernet-tiny.pth --datapath path/to/cifar10 --evolution \\
                     --evolution-sample-size 100 --evolution-population-size 50 --evolution-cycles 1000
    python search.py --dataset digits --weights outputs/scratch-digits/supernet.pth \\
                     --strategy autoformer --max-params 0.25 --engine sequential

Every candidate inherits its weights from the supernet (no retraining) and is ranked by top-1 (or, with
--metric balanced, balanced accuracy) on the search split, decoded once into a cache: up to 100
training images per class, not the validation split, so its figures differ from evaluate.py's. Ties go
to fewer parameters. Candidates outside the budget are never evaluated.
Results go to --output: each candidate's record as it finishes, then candidates.csv / .json, best.json, the best
subnet's weights, and a plot of the metric against parameters with the Pareto front. With the web UI (``--engine
ts``), each NNI trial asks a warm worker of trial.py, so a candidate costs its evaluation, not a
process start-up; Ctrl-C stops cleanly and ``--resume --output FOLDER`` continues.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from cli import (add_data_args, add_device_arg, add_gpus_arg, add_name_arg, add_precision_args, from_flags,
                 parse_checked, run_main, space_arg)
import folders
from failures import first_failure
from metrics import METRICS, binomial_se
from outputs import SearchFolder
from recipes import SEARCH_IMAGES_PER_CLASS
from remote import read_machines
from arch import canonical_arch
from utils import (COMPILE_ON_CPU, UserError, atomic_path, atomic_write_json, check_output_folder, check_writable,
                   json_form, lock_output, read_json, remove_unfinished_writes)
from workers import file_identity, spec_of, start_workers, stop_all_workers

if TYPE_CHECKING:  # the heavy modules load after the flags (startup time): each function that needs one imports it
    import torch
    from experiment import SearchExperiment
    from search_data import CachedSplit
    from strategy import Budget


# The settings: flags checked, defaults filled in, devices resolved; never changed afterwards

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_name_arg(parser, 'preset of --weights (default: the space stored with them, else tiny)')
    parser.add_argument('--weights', default='weights/supernet-tiny.pth', help='trained supernet weights')
    add_data_args(parser, batch_size=256)
    parser.add_argument('--search-images', type=int, default=None,
                        help='training images to search on, the same number from every class that has them (default: '
                             f"{SEARCH_IMAGES_PER_CLASS} per class, the paper's subImageNet; digits and fashion-mnist: "
                             'their validation split)')
    add_strategy_args(parser)
    add_budget_args(parser)
    add_experiment_args(parser)
    add_precision_args(parser)
    add_device_arg(parser, 'device candidates evaluate on, cpu or cuda (with --machines: CUDA when any listed '
                   'machine has a GPU); --gpus spreads the trials over GPUs')
    parser.add_argument('--compile', action='store_true',
                        help='evaluate every candidate through one torch.compile graph of the supernet (the arch as '
                             'data, masked_supernet.py; compiled once per worker): for GPUs, not a CPU')
    parser.add_argument('--resume', action='store_true', help='continue the search in --output (its experiment)')
    parser.add_argument('--export', action='store_true',
                        help='also export the best subnet into --output (TorchScript, ONNX and its JSON)')
    parser.add_argument('--output', default=None, metavar='FOLDER',
                        help='results folder (default: outputs/search-<experiment id>)')
    parser.add_argument('--seed', type=int, default=0, help='random seed of the strategy')
    return parser


def add_strategy_args(parser: argparse.ArgumentParser) -> None:
    """The strategy and its own flags (None when not given: see :func:`strategy_settings`)."""
    parser.add_argument('--strategy', choices=['random', 'evolution', 'autoformer'], default='random',
                        help="NNI's Random, NNI's RegularizedEvolution, or the paper's evolution (each refuses the "
                             "flags of the others)")
    parser.add_argument('--evolution', action='store_true', help='same as --strategy evolution (seed CLI)')
    parser.add_argument('--metric', choices=list(METRICS), default=None,
                        help='what candidates are ranked by on the search split: top1 or balanced (the mean of the '
                             'per-class accuracies); default: balanced for a folder of imbalanced classes (3x), '
                             'else top1')
    parser.add_argument('--trials', '--evolution-cycles', dest='trials', type=int, default=None,
                        help='random and evolution: distinct candidates to evaluate (default 100); refused with '
                             'autoformer, which evaluates --population x --generations')
    parser.add_argument('--evolution-population-size', type=int, default=None,
                        help='evolution: population (default 50)')
    parser.add_argument('--evolution-sample-size', type=int, default=None,
                        help='evolution: tournament size (default 25, capped at the population size)')
    parser.add_argument('--evolution-mutation-prob', type=float, default=None,
                        help='evolution: per-label mutation probability (default 0.05)')
    parser.add_argument('--generations', type=int, default=None, help='autoformer: generations (default 20)')
    parser.add_argument('--population', type=int, default=None,
                        help='autoformer: population per generation (default 50)')
    parser.add_argument('--select', type=int, default=None, help='autoformer: parents kept, top-k (default 10)')
    parser.add_argument('--mutation-num', type=int, default=None,
                        help='autoformer: mutants per generation (default 25)')
    parser.add_argument('--crossover-num', type=int, default=None,
                        help='autoformer: crossovers per generation (default 25)')
    parser.add_argument('--mutation-prob', type=float, default=None,
                        help='autoformer: per-layer mutation probability (default 0.2)')
    parser.add_argument('--param-mutation-prob', type=float, default=None,
                        help='autoformer: depth / embed dim mutation probability (default 0.4)')


def add_budget_args(parser: argparse.ArgumentParser) -> None:
    """What a candidate may cost: parameters, FLOPs, latency."""
    parser.add_argument('--min-params', type=float, default=None, help='budget: at least this many M params')
    parser.add_argument('--max-params', type=float, default=None, help='budget: at most this many M params')
    parser.add_argument('--max-flops', type=float, default=None, help='budget: at most this many GFLOPs (MACs)')
    parser.add_argument('--max-latency', type=float, default=None, help='budget: at most this many ms per batch')
    parser.add_argument('--latency-device', default='cpu', help='device latency is measured on')
    parser.add_argument('--latency-batch-size', type=int, default=1, help='batch latency is measured at')


def add_experiment_args(parser: argparse.ArgumentParser) -> None:
    """NNI's engine, the web UI, and where trials run."""
    parser.add_argument('--engine', choices=['ts', 'sequential'], default='ts',
                        help="ts: NNI's training service with the web UI; sequential: one process")
    add_gpus_arg(parser, 'GPUs to spread trials over, one trial and one warm worker each')
    parser.add_argument('--concurrency', type=int, default=None,
                        help='trials at once, one warm worker each (default: --gpus, at least 1; ts engine)')
    parser.add_argument('--port', type=int, default=8080, help='web UI port (ts engine)')
    parser.add_argument('--web-ui-host', choices=['loopback', 'all'], default='loopback',
                        help='interfaces the web UI (no authentication) listens on; default: this machine only')
    parser.add_argument('--experiment-dir', default=None, help="NNI's experiment folder (default ~/nni-experiments)")
    parser.add_argument('--machines', default=None, metavar='FILE',
                        help="JSON list of machines to run the trials on over SSH (NNI's remote training service; "
                             'ts engine; see the README for the file and the shared-folder contract)')
    parser.add_argument('--manager-ip', default=None,
                        help='with --machines: the address of this machine they connect back to (default: '
                             '127.0.0.1 when every machine is this one, else its address on the route to the first '
                             'other machine)')

# Each strategy's own flags and their defaults: a flag of another strategy is refused, not ignored.
STRATEGY_FLAGS: dict[str, dict[str, Any]] = {
    'random': {'trials': 100},
    'evolution': {'trials': 100, 'evolution_population_size': 50, 'evolution_sample_size': 25,
                  'evolution_mutation_prob': 0.05},
    'autoformer': {'generations': 20, 'population': 50, 'select': 10, 'mutation_num': 25, 'crossover_num': 25,
                   'mutation_prob': 0.2, 'param_mutation_prob': 0.4},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked, with every default filled in: a new namespace, not the parser's, changed."""
    flags = parse_checked(build_parser(), argv)
    if flags.resume and flags.output is None:
        raise UserError('--resume continues the search in --output: give the folder of the search to continue')
    if flags.device not in (None, 'cpu', 'cuda'):
        raise UserError(f'--device {flags.device}: search.py evaluates candidates on cpu or cuda and places its '
                        'trials on GPUs itself (--gpus N spreads them)')
    if flags.gpus == 0 and flags.device == 'cuda':
        raise UserError('--device cuda with --gpus 0: give one GPU or more, or --device cpu')
    derived: dict[str, Any] = {'strategy': 'evolution' if flags.evolution else flags.strategy,
                               'dataset': folders.dataset_name(flags.dataset, flags.datapath)}
    derived.update(strategy_settings(argparse.Namespace(**{**vars(flags), **derived})))
    derived['machine_list'], derived['manager_ip'] = (None, flags.manager_ip) if flags.machines is None else \
        read_machines(flags.machines, flags.engine, flags.web_ui_host, flags.port, flags.manager_ip)
    derived['metric'] = flags.metric or default_metric(derived['dataset'], flags.datapath)  # the data is read here
    if derived['evolution_sample_size'] > derived['evolution_population_size']:
        print(f"--evolution-sample-size {derived['evolution_sample_size']} > --evolution-population-size "
              f"{derived['evolution_population_size']}: using {derived['evolution_population_size']}", flush=True)
        derived['evolution_sample_size'] = derived['evolution_population_size']
    settings = argparse.Namespace(**{**vars(flags), **derived})
    settings.planned = settings.population * settings.generations if settings.strategy == 'autoformer' \
        else settings.trials  # distinct candidates
    return settings


def default_metric(dataset: str, datapath: str | None) -> str:
    """Balanced accuracy for a folder whose training classes are imbalanced (said in one line), else top-1."""
    import data
    import samplers
    uneven = samplers.imbalanced(data.build_dataset(dataset, datapath, 'train', 32)) if dataset == 'folder' else None
    if uneven:
        print(f'imbalanced classes ({uneven}): candidates are ranked by balanced accuracy (--metric top1 ranks '
              'by top-1)', flush=True)
    return 'balanced' if uneven else 'top1'


def strategy_settings(flags: argparse.Namespace) -> dict[str, Any]:
    """Every strategy flag with its default where not given (the parser gives None, so that a flag set explicitly
    can be told from its default); a flag given for another strategy than ``--strategy`` is refused."""
    own = STRATEGY_FLAGS[flags.strategy]
    for strategy, names in STRATEGY_FLAGS.items():
        for name in names:
            if name in own or getattr(flags, name) is None:
                continue
            if name == 'trials':
                planned = f"{flags.population or own['population']} x {flags.generations or own['generations']}"
                raise UserError(f'--trials (--evolution-cycles) counts the candidates of --strategy random and '
                                'evolution; --strategy autoformer evaluates --population x --generations '
                                f'({planned}): set those instead')
            raise UserError(f"--{name.replace('_', '-')} is a setting of --strategy {strategy}, not of --strategy "
                            f'{flags.strategy}: leave it out, or choose that strategy')
    return {name: default if getattr(flags, name) is None else getattr(flags, name)
            for names in STRATEGY_FLAGS.values() for name, default in names.items()}


@dataclass(frozen=True)
class Devices:
    device: str
    gpus: int
    concurrency: int
    precision: str | None


def resolve_devices(flags: argparse.Namespace) -> Devices:
    """CUDA whenever present (one GPU unless --gpus says more); the CPU with one line otherwise. With
    --machines, the machines' GPUs decide: CUDA when any lists ``gpus``, one trial per listed GPU."""
    import torch
    from devices import set_up_precision
    gpus = flags.gpus
    device = 'cpu' if gpus == 0 else flags.device
    machines = flags.machine_list or []
    remote_gpus = [len(m.get('gpus') or []) for m in machines]
    cuda = any(remote_gpus) if machines else torch.cuda.is_available()
    if device == 'cuda' and not cuda:
        print('--device cuda asked for but no CUDA GPU is visible: evaluating on the CPU', flush=True)
    if device is None and not cuda:
        print('No CUDA GPU found: evaluating candidates on the CPU (slower).', flush=True)
    device = 'cuda' if cuda and device != 'cpu' else 'cpu'
    if device == 'cpu' and gpus:
        print(f'--gpus {gpus} ignored: evaluating on the CPU', flush=True)
    gpus = 0 if device == 'cpu' else gpus if gpus is not None else max(remote_gpus) if machines else 1
    if flags.engine == 'sequential' and gpus > 1:
        print(f'--gpus {gpus}: the sequential engine uses one GPU (--engine ts spreads trials)', flush=True)
    default = (sum(remote_gpus) if device == 'cuda' else len(machines)) if machines else gpus
    precision = flags.precision
    if device == 'cpu' or torch.cuda.is_available():  # else remote GPUs: each worker takes its default
        precision = set_up_precision(precision, flags.tf32, device == 'cuda', 'evaluating candidates')
    return Devices(device, gpus, max(flags.concurrency or default, 1), precision)


def parse_settings(argv: list[str] | None = None) -> argparse.Namespace:
    """The search's settings: the checked flags with the devices resolved, and what the experiment takes of them."""
    flags = parse_args(argv)
    from experiment import ExperimentSettings
    settings = argparse.Namespace(**{**vars(flags), **asdict(resolve_devices(flags))})
    settings.experiment = from_flags(ExperimentSettings, settings)
    return settings


# The search: settings -> supernet -> split -> strategy over the candidates -> results

def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(argv)
    import data
    from experiment import new_experiment
    from space import load_supernet_file
    supernet, space_kwargs, meta = load_supernet_file(settings.weights, space_arg(settings))  # the one read
    data.check_classes(settings.dataset, data.num_classes(settings.dataset, settings.datapath), space_kwargs,
                       'supernet')
    resumed = SearchFolder(Path(settings.output).resolve()).experiment_id() if settings.resume else None
    experiment = new_experiment(settings.experiment, space_kwargs, resumed)
    output = Path(settings.output or f'outputs/search-{experiment.id}').resolve()
    check_writable(output)
    with lock_output(output, 'a search'):
        return run_search(settings, argv, experiment, output, supernet, space_kwargs, meta)


def run_search(settings: argparse.Namespace, argv: list[str] | None, experiment: SearchExperiment, output: Path,
               supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any], meta: Mapping[str, Any]) -> dict:
    """The search into a locked ``output``: its inputs checked and the split cached, the strategy run over the
    candidates, the results written."""
    from nni.nas.evaluator import FunctionalEvaluator
    from candidates import CandidateEvaluator, evaluate_from_spec, evaluate_in_process
    from devices import pick_device
    from experiment import Interrupted, experiment_config, run_experiment
    from strategy import Budget, SearchLedger, StrategySettings, build_strategy
    folder = SearchFolder(output)
    fingerprint = search_fingerprint(settings, space_kwargs)
    check_output(folder, settings, fingerprint)
    budget = Budget(space_kwargs, settings.min_params, settings.max_params, settings.max_flops, settings.max_latency,
                    settings.latency_device, settings.latency_batch_size, folder.latency)
    budget.check_feasible()
    atomic_write_json({'experiment_id': experiment.id, 'argv': sys.argv[1:] if argv is None else argv,
                       'fingerprint': fingerprint}, folder.experiment)
    split = cached_search_split(settings, folder, space_kwargs)
    measured_on = describe_search_split(split, settings)
    spec = None
    if settings.engine == 'ts':
        spec = worker_spec(settings, folder, supernet, space_kwargs, meta, fingerprint, measured_on)
        experiment.evaluator = FunctionalEvaluator(evaluate_from_spec, spec=str(spec))
    else:
        if settings.compile and settings.device == 'cpu':
            print(COMPILE_ON_CPU.format(what='candidate'), flush=True)
        experiment.evaluator = FunctionalEvaluator(evaluate_in_process, candidates=CandidateEvaluator(
            supernet, space_kwargs, split, output, settings.batch_size, pick_device(settings.device),
            settings.precision, settings.metric, measured_on, settings.compile))
    experiment.config = experiment_config(settings.experiment, spec)
    ledger = SearchLedger(output, settings.planned, settings.metric)
    experiment.planned = ledger.planned
    experiment.strategy = build_strategy(from_flags(StrategySettings, settings), space_kwargs, budget, ledger)
    announce(experiment.id, settings, ledger.planned, budget, folder)
    try:
        run_experiment(experiment, ledger, settings.experiment)
    except Interrupted as stop:
        stop_all_workers(spec)  # before best.json: a worker may still be writing a record
        return write_interrupted_results(experiment, output, supernet, space_kwargs, settings, str(stop))
    finally:
        stop_all_workers(spec)
    best = write_final_results(experiment, output, supernet, space_kwargs, settings)
    experiment.stop()
    return best


def cached_search_split(settings: argparse.Namespace, folder: SearchFolder,
                        space_kwargs: Mapping[str, Any]) -> CachedSplit:
    """The search split, decoded once into the output folder's cache (kept by a resumed search)."""
    import search_data
    if not folder.search_data.is_file():
        split = search_data.search_split(settings.dataset, settings.datapath, space_kwargs['img_size'],
                                         settings.search_images, settings.seed)
        search_data.write_cache(split, settings.dataset, folder.search_data, num_workers=settings.num_workers,
                                shuffle_seed=settings.seed)
    return search_data.CachedSplit(folder.search_data)


def describe_search_split(split: CachedSplit, settings: argparse.Namespace) -> str:
    """What the search split holds (each record's ``measured_on``), printed with a warning when it is so small
    that a top-1 on it is uncertain by more than a point."""
    from search_data import search_split_description
    images = len(split.labels)
    measured_on = search_split_description(settings.dataset, settings.datapath, split.labels, settings.search_images)
    print(f'candidates are ranked by {METRICS[settings.metric]} on {measured_on}', flush=True)
    error = binomial_se(50.0, images)  # its largest, whatever the top-1
    if error > 1:
        print(f'warning: the search split holds {images} images: a top-1 on it has a standard error of up to '
              f'{error:.1f} points (sqrt(p(1-p)/n) at p = 0.5): candidates closer than that are not told apart',
              flush=True)
    return measured_on


def worker_spec(settings: argparse.Namespace, folder: SearchFolder, supernet: Mapping[str, torch.Tensor],
                space_kwargs: Mapping[str, Any], meta: Mapping[str, Any], fingerprint: Mapping[str, Any],
                measured_on: str) -> Path:
    """What every warm worker loads, as this search decided it: the weights file it read (or, for an official or
    NNI-hub file or a --space-file over a stored space, the converted copy it writes), checked by size and time."""
    from checkpoints import save_weights
    weights = Path(settings.weights).resolve()
    if json_form(meta.get('space')) != fingerprint['space']:
        weights = folder.root / 'supernet.pth'
        save_weights(weights, supernet, space_kwargs)
    spec = spec_of(weights=str(weights), weights_identity=file_identity(weights), cache=str(folder.search_data),
                   output=str(folder.root), batch_size=settings.batch_size, device=settings.device,
                   precision=settings.precision, workers=settings.concurrency, gpus=settings.gpus,
                   metric=settings.metric, measured_on=measured_on, compile=settings.compile)
    with atomic_path(folder.worker_spec) as tmp:
        os.chmod(tmp, 0o600)  # the token
        tmp.write_text(json.dumps(spec, indent=2))
    if not settings.machine_list:  # each machine's first trial starts the workers there
        start_workers(folder.worker_spec)
    return folder.worker_spec


def announce(experiment_id: str, settings: argparse.Namespace, planned: int, budget: Budget,
             folder: SearchFolder) -> None:
    from experiment import web_ui_hint
    print(f'experiment {experiment_id}: {settings.strategy} search of {planned} distinct candidates on '
          f'{settings.device}, ranked by {METRICS[settings.metric]}, budget {budget.describe()}, results in '
          f'{folder.root}')
    recorded = len(folder.records())
    if recorded:
        print(f'{recorded} candidates already evaluated: answered from their records')
    if settings.engine == 'ts':
        print(web_ui_hint(experiment_id, settings.experiment))


def search_fingerprint(settings: argparse.Namespace, space_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a candidate's record depends on: the weights and their space, the search split, the budget."""
    weights = Path(settings.weights).resolve()
    stat = weights.stat() if weights.is_file() else None  # not a file: 'nni', NNI's download
    return {'weights': str(weights) if stat else settings.weights, 'weights_size': stat and stat.st_size,
            'weights_mtime_ns': stat and stat.st_mtime_ns,
            'name': settings.name, 'space_file': settings.space_file and str(Path(settings.space_file).resolve()),
            'dataset': settings.dataset,
            'datapath': str(Path(settings.datapath).resolve()) if settings.datapath else None,
            'search_images': settings.search_images, 'seed': settings.seed, 'min_params': settings.min_params,
            'max_params': settings.max_params, 'max_flops': settings.max_flops, 'max_latency': settings.max_latency,
            'latency_device': settings.latency_device, 'latency_batch_size': settings.latency_batch_size,
            'precision': settings.precision, 'metric': settings.metric, 'space': json_form(dict(space_kwargs))}


def check_output(folder: SearchFolder, settings: argparse.Namespace, fingerprint: dict[str, Any]) -> None:
    """Refuse to mix this search's candidates with another's (:func:`utils.check_output_folder`); reuse the
    split cache and latencies of the same search only."""
    output = folder.root
    previous = read_json(folder.experiment) if folder.experiment.is_file() else {}
    held = [path for path in (folder.best, *folder.records()) if path.exists()]
    check_output_folder(output, settings.resume, f'search {previous.get("experiment_id", "?")}', held,
                        previous.get('fingerprint'), fingerprint)
    if settings.resume:
        for path in (output, folder.candidates):
            remove_unfinished_writes(path)
        lacking = [path for path in folder.records() if settings.metric not in read_json(path)]
        if lacking:  # a search from before --metric (its fingerprint has no metric): refused, not ranked as 0
            raise UserError(f'--resume: {len(lacking)} candidate records in {folder.candidates} have no '
                            f'{settings.metric} (written before --metric existed, e.g. {lacking[0].name}): resume with '
                            '--metric top1, or choose another --output')
    elif previous.get('fingerprint') != fingerprint:  # another search's split or latencies
        for stale in (folder.search_data, folder.latency):
            stale.unlink(missing_ok=True)


# The results, ranked once

def write_interrupted_results(experiment: SearchExperiment, output: Path, supernet: Mapping[str, torch.Tensor],
                              space_kwargs: Mapping[str, Any], settings: argparse.Namespace, signal_name: str) -> dict:
    """best.json from the finished candidates, marked as interrupted, and the command that continues."""
    from candidates import write_results
    records = write_results(output, settings.metric)
    command = ' '.join(shlex.quote(a) for a in SearchFolder(output).resume_argv())
    best = write_best(records, output, supernet, space_kwargs, settings, experiment.id,
                      {'interrupted': signal_name, 'nni_top_model': None}) if records else {'interrupted': signal_name}
    print(f'search stopped by {signal_name} after {len(records)} candidates'
          f'{"; best so far in " + str(SearchFolder(output).best) if records else ""}. Continue with: {command}',
          flush=True)
    return best


def write_best(records: list[dict], output: Path, supernet: Mapping[str, torch.Tensor],
               space_kwargs: Mapping[str, Any], settings: argparse.Namespace, experiment_id: str,
               extra: dict) -> dict:
    """best.json (the first of the ranked ``records``, what it was ranked by and how ties were broken), its weights
    and the plot."""
    import data
    from candidates import SEARCH_SPLIT, TIE_BREAK, plot_pareto
    from checkpoints import save_weights, sub_state_dict
    best = records[0]
    ties = sum(r[settings.metric] == best[settings.metric] for r in records) - 1
    best = {'split': SEARCH_SPLIT, **best, 'ranked_by': settings.metric, 'tie_break': TIE_BREAK, 'ties': ties,
            'experiment_id': experiment_id, 'strategy': settings.strategy, 'candidates': len(records), **extra}
    folder = SearchFolder(output)
    atomic_write_json(best, folder.best)
    save_weights(folder.best_subnet, sub_state_dict(supernet, best['arch']), space_kwargs, arch=best['arch'],
                 data=data.description(settings.dataset, settings.datapath, space_kwargs['img_size']))
    plot_pareto(records, folder.pareto, f'{settings.strategy} search, {len(records)} candidates', settings.metric)
    return best


def write_final_results(experiment: SearchExperiment, output: Path, supernet: Mapping[str, torch.Tensor],
                        space_kwargs: Mapping[str, Any], settings: argparse.Namespace) -> dict:
    """best.json (from the records, with NNI's top model beside it), its weights, the plot and, with
    --export, standalone files."""
    import data
    from candidates import write_results
    from checkpoints import export_standalone
    from experiment import nni_top_model
    from space import inherited_subnet
    records = write_results(output, settings.metric)
    if not records:
        experiment.stop()
        failure = first_failure(output)
        if failure:
            raise UserError(f'every candidate failed; the first error: {failure} '
                            f'(all errors in {SearchFolder(output).failures})')
        raise UserError('no candidate was evaluated: widen the budget or raise --trials')
    best = write_best(records, output, supernet, space_kwargs, settings, experiment.id,
                      {'nni_top_model': nni_top_model(experiment, records[0], records, settings.metric)})
    ties = f" (tied with {best['ties']} other{'s' if best['ties'] > 1 else ''}: fewer params first)" \
        if best['ties'] else ''
    top1 = f", top-1 {best['top1']:.2f}" if settings.metric != 'top1' else ''
    print(f"best: {METRICS[settings.metric]} {best[settings.metric]:.2f} on the search split{ties}{top1}, "
          f"{best['params']:.3f}M params, {best['flops']:.4f}G FLOPs, of {len(records)} candidates; "
          f"{SearchFolder(output).best}: {json.dumps(canonical_arch(best['arch']))}")
    if settings.export:
        export_standalone(inherited_subnet(supernet, best['arch'], space_kwargs), best, space_kwargs,
                          SearchFolder(output).export, data.description(settings.dataset, settings.datapath,
                                                                        space_kwargs['img_size']))
    return best


def command_line() -> None:
    interrupted = main().get('interrupted')
    if interrupted:  # stopped, not finished: a calling script must not take best.json as final
        sys.exit(128 + signal.Signals[interrupted].value)


if __name__ == '__main__':
    run_main(command_line)
