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
Results go to --output as they finish: candidates.csv / .json, best.json, the best subnet's
weights, and a plot of the metric against parameters with the Pareto front. With the web UI (``--engine
ts``), each NNI trial asks a warm worker of trial.py, so a candidate costs its evaluation, not a
process start-up; Ctrl-C stops cleanly and ``--resume --output FOLDER`` continues.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import nni_patches  # first: its warning filters must be in place before NNI is imported
import torch
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.experiment import NasExperiment, NasExperimentConfig
from nni.nas.strategy import Random

import data
import trial
from failures import first_failure
from candidates import (METRICS, SEARCH_SPLIT, TIE_BREAK, SearchFolder, evaluate_candidate, plot_pareto, ranked,
                        write_results)
from cli import (add_data_args, add_device_arg, add_gpus_arg, add_name_arg, add_precision_args, from_flags,
                 parse_checked, run_main, space_arg)
from checkpoints import export_standalone, save_weights
from metrics import binomial_se
from arch import arch_key, canonical_arch
from space import AutoformerSpace, inherited_subnet, load_supernet_file, sub_state_dict
from strategy import Budget, SearchLedger, StrategySettings, build_strategy
from utils import (COMPILE_ON_CPU, UserError, atomic_path, atomic_write_json, check_output_folder, check_writable,
                   json_form, lock_output, read_json, remove_unfinished_writes, set_up_precision)

_logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_name_arg(parser, 'preset of --weights (default: the space stored with them, else tiny)')
    parser.add_argument('--weights', default='weights/supernet-tiny.pth', help='trained supernet weights')
    add_data_args(parser, batch_size=256)
    parser.add_argument('--search-images', type=int, default=None,
                        help='training images to search on, the same number from every class that has them '
                             "(default: 100 per class, the paper's subImageNet; digits and fashion-mnist: their "
                             'validation split)')
    parser.add_argument('--strategy', choices=['random', 'evolution', 'autoformer'], default='random',
                        help="NNI's Random, NNI's RegularizedEvolution, or the paper's evolution (each refuses the "
                             "flags of the others)")
    parser.add_argument('--evolution', action='store_true', help='same as --strategy evolution (seed CLI)')
    parser.add_argument('--metric', choices=list(METRICS), default='top1',
                        help='what candidates are ranked by on the search split: top1 or balanced (the mean of the '
                             'per-class accuracies, for imbalanced data); default top1')
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
    parser.add_argument('--min-params', type=float, default=None, help='budget: at least this many M params')
    parser.add_argument('--max-params', type=float, default=None, help='budget: at most this many M params')
    parser.add_argument('--max-flops', type=float, default=None, help='budget: at most this many GFLOPs (MACs)')
    parser.add_argument('--max-latency', type=float, default=None, help='budget: at most this many ms per batch')
    parser.add_argument('--latency-device', default='cpu', help='device latency is measured on')
    parser.add_argument('--latency-batch-size', type=int, default=1, help='batch latency is measured at')
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
    args = parse_checked(parser, argv)
    if args.resume and args.output is None:
        raise UserError('--resume continues the search in --output: give the folder of the search to continue')
    if args.evolution:
        args.strategy = 'evolution'
    strategy_settings(args)
    args.dataset = data.dataset_name(args.dataset, args.datapath)
    if args.evolution_sample_size > args.evolution_population_size:
        _logger.warning('--evolution-sample-size %d > --evolution-population-size %d: using %d',
                        args.evolution_sample_size, args.evolution_population_size, args.evolution_population_size)
        args.evolution_sample_size = args.evolution_population_size
    args.machine_list = read_machines(args) if args.machines is not None else None  # refused before anything loads
    return args


# Each strategy's own flags and their defaults: a flag of another strategy is refused, not ignored.
STRATEGY_FLAGS: dict[str, dict[str, Any]] = {
    'random': {'trials': 100},
    'evolution': {'trials': 100, 'evolution_population_size': 50, 'evolution_sample_size': 25,
                  'evolution_mutation_prob': 0.05},
    'autoformer': {'generations': 20, 'population': 50, 'select': 10, 'mutation_num': 25, 'crossover_num': 25,
                   'mutation_prob': 0.2, 'param_mutation_prob': 0.4},
}


def strategy_settings(args: argparse.Namespace) -> None:
    """Refuse a flag given for another strategy than ``--strategy``, then fill in the defaults (given as None
    by the parser, so that a flag set explicitly can be told from its default)."""
    own = STRATEGY_FLAGS[args.strategy]
    for strategy, flags in STRATEGY_FLAGS.items():
        for name in flags:
            if name in own or getattr(args, name) is None:
                continue
            flag = '--' + name.replace('_', '-')
            if name == 'trials':
                planned = f"{args.population or own['population']} x {args.generations or own['generations']}"
                raise UserError(f'--trials (--evolution-cycles) counts the candidates of --strategy random and '
                                'evolution; --strategy autoformer evaluates --population x --generations '
                                f'({planned}): set those instead')
            raise UserError(f'{flag} is a setting of --strategy {strategy}, not of --strategy {args.strategy}: '
                            'leave it out, or choose that strategy')
    for flags in STRATEGY_FLAGS.values():
        for name, default in flags.items():
            if getattr(args, name) is None:
                setattr(args, name, default)


class SearchExperiment(NasExperiment):
    """A NAS experiment resumed from its candidate records rather than NNI's pickled strategy state.

    The strategy restarts from its seed and proposes the same candidates again; each one already
    recorded is answered from its record by the :class:`SearchLedger` (no trial), so the search
    continues where it stopped. (NNI 3.0's state file also holds numpy objects that torch >= 2.6
    refuses to unpickle.)
    """

    planned = 0

    def execution_engine_factory(self, config):
        with nni_patches.tolerant_tuner_channel():
            return super().execution_engine_factory(config)

    def _start_nni_manager(self, *args, **kwargs) -> None:
        with nni_patches.manager_start():
            super()._start_nni_manager(*args, **kwargs)

    def load_checkpoint(self) -> None:
        """On resume: room in NNI's trial count for the candidates still to come (its count includes the
        trials of the stopped run, the interrupted ones among them)."""
        if self._nni_manager_required() and self.port is not None:  # NNI also calls this before starting
            self.update_max_trial_number(len(self.list_trial_jobs()) + self.planned)

    def _send_space_to_nni_manager(self) -> None:
        """Not sent: NNI 3.0's ``nnictl view`` refuses a NAS experiment whose stored config has a search space."""


def experiment_config(args: argparse.Namespace, spec: Path | None) -> NasExperimentConfig:
    if args.engine == 'sequential':
        config = NasExperimentConfig('sequential', 'raw')
    else:
        machines = getattr(args, 'machine_list', None)
        config = NasExperimentConfig('ts', 'simplified', 'remote' if machines else 'local')
        config.trial_concurrency = args.concurrency
        config.trial_gpu_number = 1 if args.gpus > 0 else 0
        python = sys.executable
        if machines:  # NNI's remote training service; every machine sees ROOT, --weights and --output
            config.training_service.machine_list = remote_machines(machines, args)
            config.training_service.reuse_mode = False
            config.nni_manager_ip = args.manager_ip
            python = machines[0]['python']  # the same on every machine (read_machines)
        elif args.gpus > 0:  # the GPUs the workers were started for, busy or not
            config.training_service.use_active_gpu = True
            config.training_service.gpu_indices = list(range(args.gpus))
        # NNI fixes the trial command to "{envs} {python} -m nni.nas.execution.training_service trial";
        # trial.py, run as the "python", ignores the module arguments after it and asks a warm worker.
        nni_patches.set_trial_command(config, envs=f'{trial.SPEC_ENV}={shlex.quote(str(spec))}',
                                      python=f'{shlex.quote(python)} {shlex.quote(str(ROOT / "trial.py"))}')
    config.max_trial_number = planned_candidates(args)
    if args.experiment_dir:
        config.experiment_working_directory = str(Path(args.experiment_dir).resolve())
    return config


MACHINE_EXAMPLE = ('[{"host": "10.0.0.2", "port": 22, "user": "me", "ssh_key_file": "~/.ssh/id_rsa", '
                   '"python": "/opt/conda/envs/af/bin/python", "gpus": [0, 1]}]')
MACHINE_KEYS = ('host', 'port', 'user', 'ssh_key_file', 'password', 'python', 'gpus')


def read_machines(args: argparse.Namespace) -> list[dict]:
    """The ``--machines`` file, checked (each refusal one line, before anything loads); also sets
    ``args.manager_ip`` when not given."""
    if args.engine == 'sequential':
        raise UserError('--machines needs --engine ts: the sequential engine evaluates every candidate in this process')
    path = Path(args.machines).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f'--machines file {path} cannot be read ({getattr(err, "strerror", None) or err})') from None
    try:
        machines = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f'--machines file {path} is not valid JSON ({err}); expected e.g. {MACHINE_EXAMPLE}') from None
    if not isinstance(machines, list) or not machines or not all(isinstance(m, dict) for m in machines):
        raise UserError(f'--machines file {path} must hold a non-empty JSON list of machines, e.g. {MACHINE_EXAMPLE}')
    for number, machine in enumerate(machines, 1):
        where = f'--machines file {path}, machine {number}'
        unknown = sorted(set(machine) - set(MACHINE_KEYS))
        if unknown:
            raise UserError(f'{where}: unknown key(s) {", ".join(unknown)} (known: {", ".join(MACHINE_KEYS)})')
        for key in ('host', 'user', 'python'):
            if not isinstance(machine.get(key), str) or not machine[key].strip():
                raise UserError(f'{where} has no "{key}" (a non-empty string), e.g. {MACHINE_EXAMPLE}')
        if not os.path.isabs(machine['python']):
            raise UserError(f'{where}: "python" must be an absolute path (the interpreter of the python environment '
                            f'there, the same on every machine), got {machine["python"]!r}')
        port = machine.get('port', 22)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise UserError(f'{where}: "port" must be a port number, got {port!r}')
        gpus = machine.get('gpus')
        if gpus is not None and (not isinstance(gpus, list) or not gpus or not all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus)):
            raise UserError(f'{where}: "gpus" must be a non-empty list of GPU indices such as [0, 1], got {gpus!r}')
        if machine.get('password') is None:
            key_file = Path(machine.get('ssh_key_file') or '~/.ssh/id_rsa').expanduser()
            if not key_file.is_file():
                raise UserError(f'{where}: SSH key file {key_file} does not exist (give "ssh_key_file" or "password")')
    pythons = sorted({m['python'] for m in machines})
    if len(pythons) > 1:
        raise UserError(f'--machines file {path}: the machines disagree on "python" ({", ".join(pythons)}): one '
                        'trial command serves every machine, so the python environment must have the same path '
                        'on each')
    if Path.cwd().resolve() != ROOT:
        raise UserError(f'--machines: start search.py from the project folder {ROOT} (NNI uploads the current '
                        f'folder, {Path.cwd()}, to every machine)')
    if args.manager_ip is None:
        args.manager_ip = manager_ip(machines)
    if args.web_ui_host == 'loopback' and not _is_loopback(args.manager_ip):
        raise UserError(f'--machines: the machines connect back to NNI\'s manager at {args.manager_ip}:{args.port}, '
                        'which --web-ui-host loopback (the default) keeps to this machine: pass --web-ui-host all '
                        '(NNI\'s server has no authentication: let a firewall admit only the machines to --port)')
    return machines


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def manager_ip(machines: list[dict]) -> str:
    """127.0.0.1 when every machine is this one, else this machine's address on the route to the first other
    machine (NNI's trial keeper on each machine connects back to the manager at it)."""
    others = [m for m in machines if not _is_loopback(m['host'])]
    if not others:
        return '127.0.0.1'
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((others[0]['host'], others[0].get('port', 22)))  # UDP: picks the route, sends nothing
            return sock.getsockname()[0]
    except OSError as err:
        raise UserError(f'cannot find this machine\'s address towards {others[0]["host"]} ({err}): pass '
                        '--manager-ip with an address of this machine that the machines can reach') from None


def remote_machines(machines: list[dict], args: argparse.Namespace) -> list:
    """NNI's machine configs: python_path is the folder of the machines' python (NNI puts it first in PATH
    and runs ``python -m pip install nni --upgrade`` with it when it connects); ``gpus`` restricts NNI to
    those GPUs, busy or not."""
    from nni.experiment.config import RemoteMachineConfig
    configs = []
    for m in machines:
        password = m.get('password')
        configs.append(RemoteMachineConfig(
            host=m['host'], port=m.get('port', 22), user=m['user'], password=password,
            ssh_key_file=None if password is not None else str(Path(m.get('ssh_key_file') or '~/.ssh/id_rsa')
                                                               .expanduser()),
            python_path=os.path.dirname(m['python']), gpu_indices=m.get('gpus'),
            use_active_gpu=m.get('gpus') is not None))
    return configs


def planned_candidates(args: argparse.Namespace) -> int:
    return args.population * args.generations if args.strategy == 'autoformer' else args.trials


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if sock.connect_ex(('127.0.0.1', port)) == 0:
            raise UserError(f'port {port} is busy (another web UI or service uses it): pass another --port')


def stop_orphan_manager(experiment_id: str) -> None:
    """A previous run of this experiment killed before it could stop NNI's manager (not Linux): stop it."""
    from nni.tools.nnictl.config_utils import Experiments
    entry = Experiments().get_all_experiments().get(experiment_id, {})
    pid = entry.get('pid')
    if entry.get('status') in ('STOPPED', 'DONE', 'ERROR') or not pid or not trial.alive(pid):
        return
    print(f'stopping the NNI manager (pid {pid}) left running by the stopped search', flush=True)
    trial.stop_process(pid, patience=20)


def resolve_devices(args: argparse.Namespace) -> None:
    """CUDA whenever present (one GPU unless --gpus says more); the CPU with one line otherwise. With
    --machines, the machines' GPUs decide: CUDA when any lists ``gpus``, one trial per listed GPU."""
    if args.device not in (None, 'cpu', 'cuda'):
        raise UserError(f'--device {args.device}: search.py evaluates candidates on cpu or cuda and places its trials '
                        'on GPUs itself (--gpus N spreads them)')
    if args.gpus == 0:
        if args.device == 'cuda':
            raise UserError('--device cuda with --gpus 0: give one GPU or more, or --device cpu')
        args.device = 'cpu'
    machines = args.machine_list or []
    remote_gpus = [len(m.get('gpus') or []) for m in machines]
    cuda = any(remote_gpus) if machines else torch.cuda.is_available()
    if args.device == 'cuda' and not cuda:
        print('--device cuda asked for but no CUDA GPU is visible: evaluating on the CPU', flush=True)
    if args.device is None and not cuda:
        print('No CUDA GPU found: evaluating candidates on the CPU (slower).', flush=True)
    args.device = 'cuda' if cuda and args.device != 'cpu' else 'cpu'
    if args.device == 'cpu':
        if args.gpus:
            print(f'--gpus {args.gpus} ignored: evaluating on the CPU', flush=True)
        args.gpus = 0
    elif args.gpus is None:
        args.gpus = max(remote_gpus) if machines else 1
    if args.engine == 'sequential' and args.gpus > 1:
        print(f'--gpus {args.gpus}: the sequential engine uses one GPU (--engine ts spreads trials)', flush=True)
    default = (sum(remote_gpus) if args.device == 'cuda' else len(machines)) if machines else args.gpus
    args.concurrency = max(args.concurrency or default, 1)
    if args.device == 'cpu' or torch.cuda.is_available():  # else remote GPUs: each worker takes its default
        args.precision = set_up_precision(args.precision, args.tf32, args.device == 'cuda', 'evaluating candidates')


def write_worker_spec(output: Path, weights: Path, cache: Path, args: argparse.Namespace, measured_on: str) -> Path:
    """What every warm worker loads (read by trial.py), with a token only this user can read."""
    spec = SearchFolder(output).worker_spec
    with atomic_path(spec) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(json.dumps({
            'weights': str(weights), 'cache': str(cache), 'output': str(output), 'batch_size': args.batch_size,
            'device': args.device, 'precision': args.precision, 'workers': args.concurrency, 'gpus': args.gpus,
            'metric': args.metric, 'measured_on': measured_on, 'compile': args.compile,
            'owner_pid': os.getpid(),
            'host': trial.machine_name(), 'token': secrets.token_hex(16), 'idle_seconds': 3600}, indent=2))
    return spec


def start_workers(spec: Path, args: argparse.Namespace) -> None:
    """One warm worker per device, loading while NNI's manager starts (a trial starts any that is missing)."""
    for slot, env in trial.worker_slots(trial.read_spec(spec)):
        trial.start_worker(spec, slot, {**os.environ, **env})


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the search."""


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    resolve_devices(args)
    supernet, space_kwargs, meta = load_supernet_file(args.weights, space_arg(args))
    split_classes = data.num_classes(args.dataset, args.datapath)
    data.check_classes(args.dataset, split_classes, space_kwargs, 'supernet')
    resumed = resumed_experiment(args.output) if args.resume else None
    if args.engine == 'ts':
        check_port_free(args.port)
        if resumed:
            stop_orphan_manager(resumed)
        if args.web_ui_host == 'loopback':
            os.environ['NODE_OPTIONS'] = nni_patches.loopback_node_options(os.environ.get('NODE_OPTIONS', ''))

    # The experiment id names the output folder: the config (which names the worker spec in it), the
    # evaluator and the strategy come after.
    experiment = SearchExperiment(AutoformerSpace(**space_kwargs), FunctionalEvaluator(lambda *a, **k: None),
                                  Random(), NasExperimentConfig('sequential', 'raw'), id=resumed)
    output = Path(args.output or f'outputs/search-{experiment.id}').resolve()
    check_writable(output)
    with lock_output(output, 'a search'):
        return run_search(args, argv, experiment, output, supernet, space_kwargs, meta)


def resumed_experiment(output: str) -> str:
    """The id of the search in ``output`` that ``--resume`` continues, read before a folder is made for nothing."""
    folder = SearchFolder(Path(output).resolve())
    if not folder.experiment.is_file():
        raise UserError(f'--resume: {folder.root} holds no search to continue (no {folder.experiment.name}): pass '
                        'the --output of that search')
    experiment_id = read_json(folder.experiment).get('experiment_id')
    if not isinstance(experiment_id, str) or not experiment_id:
        raise UserError(f'{folder.experiment} is damaged (no experiment_id); delete the folder, or use another '
                        '--output')
    return experiment_id


def run_search(args: argparse.Namespace, argv: list[str] | None, experiment: 'SearchExperiment', output: Path,
               supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any], meta: Mapping[str, Any]) -> dict:
    """The search into a locked ``output``: inputs checked and cached, the experiment run, the results."""
    fingerprint = search_fingerprint(args, space_kwargs)
    if args.compile and args.device == 'cpu':
        print(COMPILE_ON_CPU.format(what='candidate'), flush=True)
    folder = SearchFolder(output)
    check_output(folder, args, fingerprint)
    budget = Budget(space_kwargs, args.min_params, args.max_params, args.max_flops, args.max_latency,
                    args.latency_device, args.latency_batch_size, folder.latency)
    budget.check_feasible()
    atomic_write_json({'experiment_id': experiment.id, 'argv': sys.argv[1:] if argv is None else argv,
                       'fingerprint': fingerprint}, folder.experiment)
    weights = Path(args.weights).resolve()
    if json_form(meta.get('space')) != fingerprint['space']:
        # an official or NNI hub file, or --space-file over a stored space: trials read a converted copy
        weights = output / 'supernet.pth'
        save_weights(weights, supernet, space_kwargs)
    cache = folder.search_data
    if not cache.is_file():
        split = data.search_split(args.dataset, args.datapath, space_kwargs['img_size'], args.search_images,
                                  args.seed)
        data.write_cache(split, args.dataset, cache, num_workers=args.num_workers, shuffle_seed=args.seed)
    measured_on = describe_search_split(cache, args)
    spec = write_worker_spec(output, weights, cache, args, measured_on) if args.engine == 'ts' else None
    experiment.config = experiment_config(args, spec)
    experiment.evaluator = FunctionalEvaluator(evaluate_candidate, weights=str(weights), cache=str(cache),
                                               output=str(output), batch_size=args.batch_size, device=args.device,
                                               precision=args.precision, metric=args.metric, measured_on=measured_on,
                                               compile=args.compile)
    ledger = SearchLedger(output, planned_candidates(args), args.metric)
    experiment.planned = ledger.planned
    experiment.strategy = build_strategy(from_flags(StrategySettings, args), space_kwargs, budget, ledger)
    print(f'experiment {experiment.id}: {args.strategy} search of {ledger.planned} distinct candidates on '
          f'{args.device}, ranked by {METRICS[args.metric]}, budget {budget.describe()}, results in {output}')
    recorded = len(folder.records())
    if recorded:
        print(f'{recorded} candidates already evaluated: answered from their records')
    if args.engine == 'ts':
        print(web_ui_hint(experiment.id, args))
        if not args.machine_list:  # each machine's first trial starts the workers there
            start_workers(spec, args)
    try:
        run_experiment(experiment, ledger, args)
    except Interrupted as stop:
        stop_all_workers(spec)  # before best.json: a worker may still be writing a record
        return write_interrupted_results(experiment, output, supernet, space_kwargs, args, str(stop))
    finally:
        stop_all_workers(spec)
    best = write_final_results(experiment, output, supernet, space_kwargs, args)
    experiment.stop()
    return best


def describe_search_split(cache: Path, args: argparse.Namespace) -> str:
    """What the search split holds (each record's ``measured_on``), printed with a warning when it is so small
    that a top-1 on it is uncertain by more than a point."""
    labels = data.CachedSplit(cache).labels
    measured_on = data.search_split_description(args.dataset, args.datapath, labels, args.search_images)
    print(f'candidates are ranked by {METRICS[args.metric]} on {measured_on}', flush=True)
    error = binomial_se(50.0, len(labels))  # its largest, whatever the top-1
    if error > 1:
        print(f'warning: the search split holds {len(labels)} images: a top-1 on it has a standard error of up to '
              f'{error:.1f} points (sqrt(p(1-p)/n) at p = 0.5): candidates closer than that are not told apart',
              flush=True)
    return measured_on


def web_ui_hint(experiment_id: str, args: argparse.Namespace) -> str:
    """Where the web UI is, and the command that serves it after the run: ``nnictl view`` listens on every
    interface, so with ``--web-ui-host loopback`` the command carries the NODE_OPTIONS that keep it local."""
    view = f'nnictl view {experiment_id} --port {args.port}'
    if args.experiment_dir:
        view += f' --experiment_dir {shlex.quote(str(Path(args.experiment_dir).resolve()))}'
    if args.web_ui_host == 'loopback':
        node_options = shlex.quote(nni_patches.loopback_node_options(''))
        return (f'web UI: http://127.0.0.1:{args.port} (this machine only); after the run, serve it on this machine '
                f'only with: NODE_OPTIONS={node_options} {view}')
    return f'web UI: http://<this machine>:{args.port} (every interface); after the run: {view}'


def stop_all_workers(spec: Path | None) -> None:
    """This machine's workers stopped; the spec removed, so that workers on other machines exit too."""
    if spec is not None and spec.is_file():
        trial.stop_workers(trial.read_spec(spec))
        spec.unlink()


def search_fingerprint(args: argparse.Namespace, space_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a candidate's record depends on: the weights and their space, the search split, the budget."""
    weights = Path(args.weights).resolve()
    stat = weights.stat() if weights.is_file() else None  # not a file: 'nni', NNI's download
    return {'weights': str(weights) if stat else args.weights, 'weights_size': stat and stat.st_size,
            'weights_mtime_ns': stat and stat.st_mtime_ns,
            'name': args.name, 'space_file': args.space_file and str(Path(args.space_file).resolve()),
            'dataset': args.dataset,
            'datapath': str(Path(args.datapath).resolve()) if args.datapath else None,
            'search_images': args.search_images, 'seed': args.seed, 'min_params': args.min_params,
            'max_params': args.max_params, 'max_flops': args.max_flops, 'max_latency': args.max_latency,
            'latency_device': args.latency_device, 'latency_batch_size': args.latency_batch_size,
            'precision': args.precision, 'metric': args.metric, 'space': json_form(dict(space_kwargs))}


def check_output(folder: SearchFolder, args: argparse.Namespace, fingerprint: dict[str, Any]) -> None:
    """Refuse to mix this search's candidates with another's (:func:`utils.check_output_folder`); reuse the
    split cache and latencies of the same search only."""
    output = folder.root
    previous = read_json(folder.experiment) if folder.experiment.is_file() else {}
    held = [path for path in (folder.best, *folder.records()) if path.exists()]
    check_output_folder(output, args.resume, f'search {previous.get("experiment_id", "?")}', held,
                        previous.get('fingerprint'), fingerprint)
    if args.resume:
        for path in (output, folder.candidates):
            remove_unfinished_writes(path)
        lacking = [path for path in folder.records() if args.metric not in read_json(path)]
        if lacking:  # a search from before --metric (its fingerprint has no metric): refused, not ranked as 0
            raise UserError(f'--resume: {len(lacking)} candidate records in {folder.candidates} have no '
                            f'{args.metric} (written before --metric existed, e.g. {lacking[0].name}): resume with '
                            '--metric top1, or choose another --output')
    elif previous.get('fingerprint') != fingerprint:  # another search's split or latencies
        for stale in (folder.search_data, folder.latency):
            stale.unlink(missing_ok=True)


def run_experiment(experiment: SearchExperiment, ledger: SearchLedger, args: argparse.Namespace) -> None:
    """Run the strategy and wait for its trials; SIGINT and SIGTERM stop NNI cleanly and raise Interrupted."""
    caught: list[str] = []

    def on_signal(signum, frame) -> None:
        caught.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            start = experiment.resume if args.resume else experiment.run
            with nni_patches.loopback_portal_urls() if args.web_ui_host == 'loopback' else nullcontext():
                start(port=args.port, wait_completion=False)  # NNI stops the experiment itself on KeyboardInterrupt
            if not caught:
                ledger.wait_pending(lambda: manager_running(experiment))
        except KeyboardInterrupt:
            caught.append(caught[0] if caught else 'SIGINT')
            experiment.stop()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if caught:
        raise Interrupted(caught[0])


def manager_running(experiment: NasExperiment) -> bool:
    """NNI's manager answers and has not stopped (the sequential engine has none: always true)."""
    if not experiment._nni_manager_required():
        return True
    try:
        return experiment.get_status() not in ('STOPPED', 'ERROR')
    except Exception:  # no answer at all: the manager is gone
        return False


def write_interrupted_results(experiment: NasExperiment, output: Path, supernet: Mapping[str, torch.Tensor],
                       space_kwargs: Mapping[str, Any], args: argparse.Namespace, signal_name: str) -> dict:
    """best.json from the finished candidates, marked as interrupted, and the command that continues."""
    records = write_results(output, args.metric)
    command = ' '.join(shlex.quote(a) for a in resume_argv(output))
    best: dict = {'interrupted': signal_name}
    if records:
        best = write_best(records, output, supernet, space_kwargs, args, experiment.id,
                          {'interrupted': signal_name, 'nni_top_model': None})
    print(f'search stopped by {signal_name} after {len(records)} candidates'
          f'{"; best so far in " + str(SearchFolder(output).best) if records else ""}. Continue with: {command}',
          flush=True)
    return best


def resume_argv(output: Path) -> list[str]:
    """The command that continues the search in ``output``: its own flags, ``--output`` and ``--resume``."""
    argv = read_json(SearchFolder(output).experiment)['argv']
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == '--output':
            skip = True
        elif arg != '--resume' and not arg.startswith('--output='):
            kept.append(arg)
    return ['python', 'search.py', *kept, '--output', str(output), '--resume']


def nni_top_model(experiment: NasExperiment, best: Mapping[str, Any], records: list[dict], metric: str,
                  patience: float = 10.0) -> dict | None:
    """NNI's ``export_top_models`` answer, as best.json states it. NNI ranks by the same metric (its 'default')
    but breaks ties its own way: a top model with the best's value is a tie, given as best.json's own arch (picked
    by :data:`candidates.TIE_BREAK`), so the two never disagree. A top model of another value is given as NNI's
    arch with a warning: the training service reports a trial's final metric a moment after the trial ends, and
    with concurrent trials NNI 3.0 was also seen to pair metrics with the wrong models; best.json follows the
    records."""
    value_of = {arch_key(r['arch']): r[metric] for r in records}
    deadline = time.monotonic() + patience
    while True:
        top = experiment.export_top_models(top_k=1, formatter='dict')
        if top and value_of.get(arch_key(top[0])) == best[metric]:
            return canonical_arch(best['arch'])
        if time.monotonic() > deadline:
            _logger.warning("NNI's export_top_models gives %s, not a candidate with the best %s %.2f", top,
                            METRICS[metric], best[metric])
            return canonical_arch(top[0]) if top else None
        time.sleep(0.5)


def best_record(records: list[dict], metric: str) -> dict:
    """The highest ``metric``; on a tie, fewer parameters, then the arch key (:data:`candidates.TIE_BREAK`)."""
    return ranked(records, metric)[0]


def write_best(records: list[dict], output: Path, supernet: Mapping[str, torch.Tensor],
               space_kwargs: Mapping[str, Any], args: argparse.Namespace, experiment_id: str,
               extra: dict) -> dict:
    """best.json (the best record, what it was ranked by and how ties were broken), its weights and the plot."""
    best = best_record(records, args.metric)
    ties = sum(r[args.metric] == best[args.metric] for r in records) - 1
    best = {'split': SEARCH_SPLIT, **best, 'ranked_by': args.metric, 'tie_break': TIE_BREAK, 'ties': ties,
            'experiment_id': experiment_id, 'strategy': args.strategy, 'candidates': len(records), **extra}
    folder = SearchFolder(output)
    atomic_write_json(best, folder.best)
    save_weights(folder.best_subnet, sub_state_dict(supernet, best['arch']), space_kwargs, arch=best['arch'],
                 data=data.description(args.dataset, args.datapath, space_kwargs['img_size']))
    plot_pareto(records, folder.pareto, f'{args.strategy} search, {len(records)} candidates', args.metric)
    return best


def write_final_results(experiment: NasExperiment, output: Path, supernet: Mapping[str, torch.Tensor],
           space_kwargs: Mapping[str, Any], args: argparse.Namespace) -> dict:
    """best.json (from the records, with NNI's top model beside it), its weights, the plot and, with
    --export, standalone files."""
    records = write_results(output, args.metric)
    if not records:
        experiment.stop()
        failure = first_failure(output)
        if failure:
            raise UserError(f'every candidate failed; the first error: {failure} '
                            f'(all errors in {SearchFolder(output).failures})')
        raise UserError('no candidate was evaluated: widen the budget or raise --trials')
    best = best_record(records, args.metric)
    best = write_best(records, output, supernet, space_kwargs, args, experiment.id,
                      {'nni_top_model': nni_top_model(experiment, best, records, args.metric)})
    ties = f" (tied with {best['ties']} other{'s' if best['ties'] > 1 else ''}: fewer params first)" \
        if best['ties'] else ''
    top1 = f", top-1 {best['top1']:.2f}" if args.metric != 'top1' else ''
    print(f"best: {METRICS[args.metric]} {best[args.metric]:.2f} on the search split{ties}{top1}, "
          f"{best['params']:.3f}M params, {best['flops']:.4f}G FLOPs, of {len(records)} candidates; "
          f"{SearchFolder(output).best}")
    if args.export:
        export_standalone(inherited_subnet(supernet, best['arch'], space_kwargs), best, space_kwargs,
                          SearchFolder(output).export, data.description(args.dataset, args.datapath,
                                                                        space_kwargs['img_size']))
    return best


def command_line() -> None:
    interrupted = main().get('interrupted')
    if interrupted:  # stopped, not finished: a calling script must not take best.json as final
        sys.exit(128 + signal.Signals[interrupted].value)


if __name__ == '__main__':
    run_main(command_line)
