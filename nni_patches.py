"""Everything this project changes in NNI 3.0 (and in its Node.js manager), why, and where; nothing else patches NNI.

Written for NNI 3.0 (``NNI_VERSION``); :func:`check_nni_version` refuses any other in one line, and
``tests/test_nni_patches.py`` fails when an attribute patched or overridden here no longer exists.

Patches, each undone when it has served unless said:

* ``nni.nas.execution.training_service.TunerCommandChannel`` -> :class:`TolerantTunerChannel` while a search
  builds its execution engine (``search.SearchExperiment.execution_engine_factory``): NNI 3.0's channel raises
  ``ValueError`` on the commands its manager sends a resumed experiment (ImportData, AddCustomizedTrialJob);
  the error kills the engine's listener thread and the resumed search waits forever.
* ``nni.experiment.launcher.Popen`` -> :func:`popen_dying_with_parent` while NNI starts its manager
  (``search.SearchExperiment._start_nni_manager``, :func:`manager_start`): the manager gets its own process
  group (as NNI does) and ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (Linux, through ctypes), so a search killed even
  by SIGKILL leaves no web server behind.
* ``nni.experiment.launcher._check_rest_server`` -> a patient check, in the same block: NNI 3.0 gives its
  manager three seconds, and a manager still starting answers ``INITIALIZING`` (not JSON), so on a loaded
  machine a search failed with "Expecting value: line 1 column 1 (char 0)". The check now waits while the
  manager process lives, up to ``MANAGER_START_SECONDS``.
* ``NasExperimentConfig._trial_command_params`` (private, per config; :func:`set_trial_command`): NNI fixes a
  trial's command to ``{envs} {python} -m nni.nas.execution.training_service trial``; ``python`` becomes
  ``trial.py``, which asks a warm worker instead of importing torch in every trial.
* ``net.Server.prototype.listen`` in NNI's Node.js manager (``loopback.js``, preloaded through
  ``NODE_OPTIONS=--require``; :func:`loopback_node_options`): the web UI and REST server have no
  authentication and listen on every interface; this keeps them on 127.0.0.1 (``--web-ui-host loopback``).
* NNI's "Web portal URLs" log line (logger ``nni.experiment``, a logging filter while a search runs with
  ``--web-ui-host loopback``; :func:`loopback_portal_urls`): NNI lists an address of every interface, which
  ``loopback.js`` keeps from serving; the line keeps the loopback URL only.
* ``search.SearchExperiment`` overrides ``NasExperiment.load_checkpoint`` (resumed from the candidate records, not NNI's
  pickled strategy state, which torch >= 2.6 refuses to unpickle) and ``_send_space_to_nni_manager`` (NNI 3.0's
  ``nnictl view`` refuses a NAS experiment whose stored config has a search space).
* ``trial.TrialChannel`` speaks NNI 3.0's HTTP trial command channel (``nni.runtime.trial_command_channel.v3``)
  without importing NNI: a copy of the protocol, not a patch, but tied to the same version.

Warnings: the filters below drop three harmless ones NNI 3.0 prints on torch 2.14 and Lightning 2
(``layers.py`` and ``space.py`` filter what importing and building the space print, so they can be copied without it).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from utils import UserError

NNI_VERSION = '3.0'
LOOPBACK_JS = Path(__file__).resolve().parent / 'loopback.js'

# NNI 3.0 predates torch 2.14: one warning per torch class it does not know, and an indexing deprecation.
warnings.filterwarnings('ignore', message=r'.*is found to be not a nn\.Module, which is unexpected.*',
                        category=RuntimeWarning)
warnings.filterwarnings('ignore', message='Using a non-tuple sequence for multidimensional indexing',
                        category=UserWarning, module=r'nni\.')
# NNI's Lightning evaluator warns that it is not spawned by a training service: the scripts train in-process.
warnings.filterwarnings('ignore', message='When using training service to spawn trials')


def check_nni_version() -> None:
    """Refuse, in one line, an NNI other than the one these patches were written for. Its package metadata says
    which: importing NNI would take a second before a script has even read its flags."""
    installed = metadata.version('nni')
    if installed != NNI_VERSION:
        raise UserError(f'NNI {installed} is installed, but this project patches NNI {NNI_VERSION} '
                        f'(nni_patches.py): pip install nni=={NNI_VERSION}')


def tolerant_tuner_channel() -> Any:
    """The block in which NNI's execution engine is built with ``TolerantTunerChannel``."""
    from unittest import mock

    from nni.nas.execution import training_service
    from nni.runtime.tuner_command_channel import TunerCommandChannel
    from nni.runtime.tuner_command_channel.command_type import CommandType

    class TolerantTunerChannel(TunerCommandChannel):
        """NNI 3.0's tuner channel, skipping the commands a resumed experiment receives and it cannot parse."""

        def _receive(self):
            while True:
                command_type, data = super()._receive()
                if command_type not in (CommandType.ImportData, CommandType.AddCustomizedTrialJob):
                    return command_type, data

    return mock.patch.object(training_service, 'TunerCommandChannel', TolerantTunerChannel)


try:  # looked up here: loading a library between fork and exec can deadlock
    _PRCTL: Callable | None = ctypes.CDLL(None, use_errno=True).prctl
except (AttributeError, OSError):
    _PRCTL = None  # not Linux: an orphan manager is stopped by the next --resume instead
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in NNI's manager process before it starts: its own process group, and SIGTERM from the kernel when
    the search dies."""
    os.setpgrp()
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the search died before the line above: nobody would send the signal
            os._exit(1)


def popen_dying_with_parent(*args: Any, **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen(*args, **{**kwargs, 'preexec_fn': _die_with_parent})


MANAGER_START_SECONDS = 120.0


def patient_check(started: list[subprocess.Popen], seconds: float = MANAGER_START_SECONDS) -> Callable[..., None]:
    """NNI's ``_check_rest_server(port, retry, url_prefix)``, waiting while the last process in ``started`` lives
    (up to ``seconds``) rather than three seconds; its last error once the manager has died or the time is up."""
    from nni.experiment import rest

    def check(port: int, retry: int = 3, url_prefix: str | None = None) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                rest.get(port, '/check-status', url_prefix)
                return
            except Exception:
                if time.monotonic() > deadline or (started and started[-1].poll() is not None):
                    raise
                time.sleep(0.25)
    return check


@contextmanager
def manager_start() -> Iterator[None]:
    """The block in which NNI starts its manager: with :func:`popen_dying_with_parent`, and checked by
    :func:`patient_check`."""
    from unittest import mock

    from nni.experiment import launcher

    started: list[subprocess.Popen] = []

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
        started.append(popen_dying_with_parent(*args, **kwargs))
        return started[-1]

    with mock.patch.object(launcher, 'Popen', popen), \
            mock.patch.object(launcher, '_check_rest_server', patient_check(started)):
        yield


def set_trial_command(config: Any, envs: str, python: str) -> None:
    """Each trial of ``config`` runs ``{envs} {python} -m nni.nas.execution.training_service trial``."""
    config._trial_command_params = {'envs': envs, 'python': python}


def loopback_node_options(node_options: str) -> str:
    """``NODE_OPTIONS`` that keep NNI's Node.js servers on 127.0.0.1."""
    return f'{node_options} --require {LOOPBACK_JS}'.strip()


PORTAL_LOGGER = 'nni.experiment'  # where NNI 3.0 logs "Web portal URLs: ..." (Experiment._start_impl)


class _LoopbackPortalUrls(logging.Filter):
    """Keeps the 127.0.0.1 URL of NNI's "Web portal URLs" line: the others, one per interface, do not answer
    while ``loopback.js`` keeps the server on 127.0.0.1."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith('Web portal URLs:'):
            port = re.search(r'http://[^\s:]+:(\d+)', record.msg)
            if port:
                record.msg = f'Web portal URL (this machine only): ${{CYAN}}http://127.0.0.1:{port.group(1)}'
        return True


@contextmanager
def loopback_portal_urls() -> Iterator[None]:
    """While it lasts, NNI's web-portal line names only the URL that serves (``--web-ui-host loopback``)."""
    logger, log_filter = logging.getLogger(PORTAL_LOGGER), _LoopbackPortalUrls()
    logger.addFilter(log_filter)
    try:
        yield
    finally:
        logger.removeFilter(log_filter)
