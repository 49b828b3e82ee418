"""nni_patches.py: every attribute it patches or overrides exists in the NNI installed, a patch is undone after
its block, and another NNI version is refused in one line."""
from __future__ import annotations

import http.server
import inspect
import subprocess
import threading
import time

import nni
import pytest
from nni.experiment import launcher
from nni.nas.execution import training_service
from nni.nas.experiment import NasExperiment, NasExperimentConfig
from nni.runtime.tuner_command_channel import TunerCommandChannel
from nni.runtime.tuner_command_channel.command_type import CommandType

import nni_patches
from utils import UserError

pytestmark = pytest.mark.fast  # make test-fast


def test_the_installed_nni_is_the_patched_one():
    assert nni.__version__ == nni_patches.NNI_VERSION
    nni_patches.check_nni_version()


def test_another_nni_version_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(nni_patches.metadata, 'version', lambda name: '3.1' if name == 'nni' else None)
    refusal = r'^NNI 3.1 is installed, but this project patches NNI 3.0 .*pip install nni==3.0$'
    with pytest.raises(UserError, match=refusal):
        nni_patches.check_nni_version()


def test_every_patched_or_overridden_attribute_exists():
    assert training_service.TunerCommandChannel is TunerCommandChannel and hasattr(TunerCommandChannel, '_receive')
    assert CommandType.ImportData and CommandType.AddCustomizedTrialJob
    assert launcher.Popen is subprocess.Popen
    assert list(inspect.signature(launcher._check_rest_server).parameters) == ['port', 'retry', 'url_prefix']
    for method in ('execution_engine_factory', '_start_nni_manager', 'load_checkpoint', '_send_space_to_nni_manager'):
        assert callable(getattr(NasExperiment, method)), method
    config = NasExperimentConfig('ts', 'simplified', 'local')
    assert '_trial_command_params' in type(config).__dataclass_fields__
    nni_patches.set_trial_command(config, envs='A=1', python='/bin/python trial.py')
    config._canonicalize([])  # NNI composes the trial command here
    assert config.trial_command.startswith('A=1 /bin/python trial.py -m nni.nas.execution.training_service')
    import nni.runtime.trial_command_channel.v3  # noqa: F401  the protocol trial.TrialChannel speaks
    assert nni_patches.LOOPBACK_JS.is_file()


def test_patches_are_undone_after_their_block():
    with nni_patches.tolerant_tuner_channel():
        assert training_service.TunerCommandChannel.__name__ == 'TolerantTunerChannel'
        assert issubclass(training_service.TunerCommandChannel, TunerCommandChannel)
    assert training_service.TunerCommandChannel is TunerCommandChannel
    check = launcher._check_rest_server
    with pytest.raises(RuntimeError), nni_patches.manager_start():
        assert launcher.Popen is not subprocess.Popen and launcher._check_rest_server is not check
        raise RuntimeError
    assert launcher.Popen is subprocess.Popen and launcher._check_rest_server is check


class Manager(http.server.BaseHTTPRequestHandler):
    """NNI's manager as it starts: 'INITIALIZING' (not JSON) to /check-status until ``ready``, then JSON."""
    ready = 0.0

    def do_GET(self):
        body = b'INITIALIZING' if time.monotonic() < self.ready else b'{"status": "RUNNING"}'
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def starting_manager():
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Manager)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_a_manager_slower_than_three_seconds_to_start_is_waited_for(starting_manager):
    """NNI 3.0's own check gives up after three seconds with a JSON error; the patient one waits for a live
    manager, and gives up at once when the manager process has died."""
    port = starting_manager.server_address[1]
    Manager.ready = time.monotonic() + 3.5
    with pytest.raises(ValueError, match='Expecting value'):  # NNI's own, after three seconds: the bug
        launcher._check_rest_server(port)
    alive = subprocess.Popen(['sleep', '30'])
    try:
        nni_patches.patient_check([alive])(port)  # the same manager, still starting
        assert time.monotonic() >= Manager.ready
    finally:
        alive.kill()
        alive.wait()
    Manager.ready = time.monotonic() + 60
    start = time.monotonic()
    with pytest.raises(ValueError, match='Expecting value'):
        nni_patches.patient_check([alive])(port)  # the manager is dead: no use waiting
    assert time.monotonic() - start < 2


def test_the_web_portal_line_keeps_only_the_loopback_url(caplog):
    """NNI lists every interface's address; with loopback.js only 127.0.0.1 answers."""
    import logging

    import nni.experiment.experiment as nni_experiment

    # The line and the logger the filter relies on are NNI 3.0's.
    assert nni_experiment._logger.name == nni_patches.PORTAL_LOGGER
    assert "'Web portal URLs: ${CYAN}' + ' '.join(ips)" in inspect.getsource(nni_experiment)

    line = 'Web portal URLs: ${CYAN}http://127.0.0.1:8123 http://10.1.2.3:8123 http://172.17.0.1:8123'
    logger = logging.getLogger(nni_patches.PORTAL_LOGGER)
    with caplog.at_level(logging.INFO, logger=nni_patches.PORTAL_LOGGER):
        with nni_patches.loopback_portal_urls():
            logger.info(line)
        logger.info(line)  # the filter is gone after its block
    assert [r.getMessage() for r in caplog.records] == [
        'Web portal URL (this machine only): ${CYAN}http://127.0.0.1:8123', line]
