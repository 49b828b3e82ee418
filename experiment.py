"""The search's NNI experiment: its configuration (sequential, or NNI's training service with the web UI, on this
machine or remote ones), a run that SIGINT / SIGTERM stop cleanly, and NNI's answers about it."""
from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import nni_patches  # first: its warning filters must be in place before NNI is imported
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.experiment import NasExperiment, NasExperimentConfig
from nni.nas.strategy import Random

from metrics import METRICS
from remote import remote_machines
from arch import arch_key, canonical_arch
from space import AutoformerSpace
from strategy import SearchLedger
from utils import UserError
from workers import SPEC_ENV, TRIAL_SCRIPT, alive, stop_process

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentSettings:
    """What the experiment is run with: the engine, the web UI, the trials' placement and how many there are."""
    engine: str
    port: int
    web_ui_host: str
    experiment_dir: str | None
    concurrency: int
    gpus: int
    resume: bool
    planned: int
    machine_list: list[dict] | None = None
    manager_ip: str | None = None


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the search."""


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


def new_experiment(settings: ExperimentSettings, space_kwargs: Mapping[str, Any],
                   resumed: str | None) -> SearchExperiment:
    """The experiment, whose id names the output folder; its config, evaluator and strategy come once that folder
    holds the split and the worker spec. With the web UI, its port is checked free and a manager left running by
    the stopped run of a resumed experiment is stopped first."""
    if settings.engine == 'ts':
        check_port_free(settings.port)
        if resumed:
            stop_orphan_manager(resumed)
        if settings.web_ui_host == 'loopback':
            os.environ['NODE_OPTIONS'] = nni_patches.loopback_node_options(os.environ.get('NODE_OPTIONS', ''))
    return SearchExperiment(AutoformerSpace(**space_kwargs), FunctionalEvaluator(lambda *a, **k: None), Random(),
                            NasExperimentConfig('sequential', 'raw'), id=resumed)


def experiment_config(settings: ExperimentSettings, spec: Path | None) -> NasExperimentConfig:
    if settings.engine == 'sequential':
        config = NasExperimentConfig('sequential', 'raw')
    else:
        machines = settings.machine_list
        config = NasExperimentConfig('ts', 'simplified', 'remote' if machines else 'local')
        config.trial_concurrency = settings.concurrency
        config.trial_gpu_number = 1 if settings.gpus > 0 else 0
        python = sys.executable
        if machines:  # NNI's remote training service; every machine sees the project, --weights and --output
            config.training_service.machine_list = remote_machines(machines)
            config.training_service.reuse_mode = False
            config.nni_manager_ip = settings.manager_ip
            python = machines[0]['python']  # the same on every machine (remote.read_machines)
        elif settings.gpus > 0:  # the GPUs the workers were started for, busy or not
            config.training_service.use_active_gpu = True
            config.training_service.gpu_indices = list(range(settings.gpus))
        # NNI fixes the trial command to "{envs} {python} -m nni.nas.execution.training_service trial";
        # trial.py, run as the "python", ignores the module arguments after it and asks a warm worker.
        nni_patches.set_trial_command(config, envs=f'{SPEC_ENV}={shlex.quote(str(spec))}',
                                      python=f'{shlex.quote(python)} {shlex.quote(str(TRIAL_SCRIPT))}')
    config.max_trial_number = settings.planned
    if settings.experiment_dir:
        config.experiment_working_directory = str(Path(settings.experiment_dir).resolve())
    return config


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if sock.connect_ex(('127.0.0.1', port)) == 0:
            raise UserError(f'port {port} is busy (another web UI or service uses it): pass another --port')


def stop_orphan_manager(experiment_id: str) -> None:
    """A previous run of this experiment killed before it could stop NNI's manager (not Linux): stop it."""
    from nni.tools.nnictl.config_utils import Experiments
    entry = Experiments().get_all_experiments().get(experiment_id, {})
    pid = entry.get('pid')
    if entry.get('status') in ('STOPPED', 'DONE', 'ERROR') or not pid or not alive(pid):
        return
    print(f'stopping the NNI manager (pid {pid}) left running by the stopped search', flush=True)
    stop_process(pid, patience=20)


def web_ui_hint(experiment_id: str, settings: ExperimentSettings) -> str:
    """Where the web UI is, and the command that serves it after the run: ``nnictl view`` listens on every
    interface, so with ``--web-ui-host loopback`` the command carries the NODE_OPTIONS that keep it local."""
    view = f'nnictl view {experiment_id} --port {settings.port}'
    if settings.experiment_dir:
        view += f' --experiment_dir {shlex.quote(str(Path(settings.experiment_dir).resolve()))}'
    if settings.web_ui_host == 'loopback':
        node_options = shlex.quote(nni_patches.loopback_node_options(''))
        return (f'web UI: http://127.0.0.1:{settings.port} (this machine only); after the run, serve it on this '
                f'machine only with: NODE_OPTIONS={node_options} {view}')
    return f'web UI: http://<this machine>:{settings.port} (every interface); after the run: {view}'


def run_experiment(experiment: SearchExperiment, ledger: SearchLedger, settings: ExperimentSettings) -> None:
    """Run the strategy and wait for its trials; SIGINT and SIGTERM stop NNI cleanly and raise Interrupted."""
    caught: list[str] = []

    def on_signal(signum, frame) -> None:
        caught.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            start = experiment.resume if settings.resume else experiment.run
            with nni_patches.loopback_portal_urls() if settings.web_ui_host == 'loopback' else nullcontext():
                start(port=settings.port, wait_completion=False)  # NNI stops the experiment itself on KeyboardInterrupt
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
