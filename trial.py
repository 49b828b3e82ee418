"""The NNI trial of a web-UI search, and the warm evaluation worker it asks.

NNI's training service starts one process per trial. Importing torch and NNI's NAS package and
reading the supernet and the search split would cost that process seconds, every trial. So the
trial process imports nothing heavy: it takes its candidate from NNI's HTTP trial channel, hands
it to a worker that holds the supernet and the decoded split in memory (one per device, started
by ``search.py`` or, when none answers, by the trial itself), relays the worker's intermediate
results and final metric dict back to NNI, and exits.

    python trial.py                     # a trial (NNI starts it; AUTOFORMER_SEARCH names the search)
    python trial.py --serve SLOT        # a worker (started by search.py or by a trial)

Only the standard library, ``failures.py`` and ``workers.py`` (themselves only the standard library) are imported
at the top: keep it so. The worker imports the candidate server (torch, NNI, the supernet) when it starts.
"""
from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from failures import record_failure
from workers import (SPEC_ENV, alive, connect, is_worker, machine_name, read_spec, socket_address, start_worker,
                     worker_log_tail, worker_pid, worker_slots, workers_folder)

STARTUP_SECONDS = 900  # importing torch and reading a large supernet from a slow network filesystem
POLL_SECONDS = 1.0


# --------------------------------------------------------------------------------------------
# The trial process
# --------------------------------------------------------------------------------------------

class TrialChannel:
    """NNI 3.0's HTTP trial command channel (``nni.runtime.trial_command_channel.v3``) without importing NNI."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.parameter_id: int | None = None
        self.sequence = 0

    def _request(self, method: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        try:
            conn.request(method, self.path, body=None if body is None else json.dumps(body),
                         headers={'Content-Type': 'application/json'})
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    def receive_parameter(self) -> str | None:
        """The raw serialized parameter record: the worker, which imports NNI anyway, deserializes it."""
        self._request('PUT', {'type': 'request_parameter'})
        while True:
            status, body = self._request('GET')
            if status == 408:
                continue
            if status == 410:
                return None
            if status != 200:
                raise OSError(f'NNI trial channel answered HTTP {status}: {body[:200]!r}')
            parameter = json.loads(body)['parameter']
            self.parameter_id = json.loads(parameter)['parameter_id']
            return parameter

    def send_metric(self, kind: str, value: Any) -> None:
        metric = {'parameter_id': self.parameter_id, 'trial_job_id': os.environ.get('NNI_TRIAL_JOB_ID'),
                  'type': kind, 'sequence': self.sequence if kind == 'PERIODICAL' else 0,
                  'value': json.dumps(value)}
        status, body = self._request('PUT', {'type': 'metric', 'metric': json.dumps(metric)})
        if status >= 400:
            raise OSError(f'NNI trial channel refused a metric: HTTP {status} {body[:200]!r}')
        if kind == 'PERIODICAL':
            self.sequence += 1


def claim_slot(spec: dict[str, Any]) -> tuple[str, Any]:
    """The worker this trial uses and a lock held while it does: the GPU NNI gave the trial, else a free
    worker (NNI runs at most ``workers`` trials at once, so one is free unless a finished trial still exits)."""
    folder = workers_folder(spec)
    gpu = os.environ.get('CUDA_VISIBLE_DEVICES', '')
    slots = [f'gpu{gpu}'] if spec['gpus'] and gpu.isdigit() else [slot for slot, _ in worker_slots(spec)]
    while True:
        for slot in slots:
            lock = open(folder / f'{slot}.lock', 'w')
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return slot, lock
            except BlockingIOError:
                lock.close()
        time.sleep(0.05)


def ask_worker(spec_path: str, spec: dict[str, Any], slot: str, parameter: str,
               on_message: Callable[[dict], None]) -> None:
    """Evaluate on the slot's worker, starting one when none answers; a worker that dies mid-candidate is
    started again once (a second death fails the trial with the worker's last log lines)."""
    for attempt in range(2):
        conn = connect(spec, slot)
        if conn is None:
            conn = wait_for_worker(spec_path, spec, slot)
        try:
            conn.send({'parameter': parameter})
            while True:
                message = conn.recv()
                on_message(message)
                if 'final' in message or 'error' in message:
                    return
        except (EOFError, ConnectionResetError, BrokenPipeError):
            print(f'worker {slot} died while evaluating (attempt {attempt + 1} of 2)', file=sys.stderr)
        finally:
            conn.close()
    raise RuntimeError(f'worker {slot} died twice on this candidate: {worker_log_tail(spec, slot)}')


def wait_for_worker(spec_path: str, spec: dict[str, Any], slot: str) -> Connection:
    """A connection to the slot's worker: the one still loading, else a new one."""
    pid = worker_pid(spec, slot)
    if pid is None or not is_worker(pid, spec):
        pid = start_worker(spec_path, slot).pid
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        conn = connect(spec, slot)
        if conn is not None:
            return conn
        if not is_worker(pid, spec):
            raise RuntimeError(f'worker {slot} exited while starting: {worker_log_tail(spec, slot)}')
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise RuntimeError(f'worker {slot} did not answer within {STARTUP_SECONDS} s: {worker_log_tail(spec, slot)}')


def run_trial() -> int:
    channel_url = os.environ.get('NNI_TRIAL_COMMAND_CHANNEL', '')
    spec_path = os.environ.get(SPEC_ENV)
    if not channel_url.startswith('http://') or not spec_path:
        # Not NNI's HTTP channel (another training service): the plain, slower NNI trial.
        from nni.nas.execution.training_service import trial_entry
        trial_entry()
        return 0
    spec = read_spec(spec_path)
    channel = TrialChannel(channel_url)
    parameter = channel.receive_parameter()
    if parameter is None:
        return 0
    failure: list[str] = []

    def relay(message: dict) -> None:
        if 'intermediate' in message:
            channel.send_metric('PERIODICAL', message['intermediate'])
        elif 'final' in message:
            channel.send_metric('FINAL', message['final'])
        elif 'error' in message:
            failure.append(message['error'])
            print(message.get('traceback', message['error']), file=sys.stderr)

    slot, lock = claim_slot(spec)
    try:
        ask_worker(spec_path, spec, slot, parameter, relay)
    except Exception as err:  # the trial fails; the search goes on and shows this line
        failure.append(f'{type(err).__name__}: {err}')
        print(failure[-1], file=sys.stderr)
    finally:
        lock.close()
    if failure:
        record_failure(spec['output'], os.environ.get('NNI_TRIAL_JOB_ID', 'trial'), failure[0])
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------

def serve(spec_path: str, slot: str) -> None:
    """Hold the supernet and the split; evaluate candidates one at a time until the search is over."""
    spec = read_spec(spec_path)
    address = socket_address(spec, slot)
    pid_file = workers_folder(spec) / f'{slot}.pid'
    evaluator = _load_evaluator(spec)
    Path(address).unlink(missing_ok=True)
    listener = Listener(address, family='AF_UNIX', authkey=spec['token'].encode())
    last_request = [time.monotonic()]

    def shut_down(*_: Any) -> None:
        Path(address).unlink(missing_ok=True)
        if worker_pid(spec, slot) == os.getpid():
            pid_file.unlink(missing_ok=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, shut_down)

    def watch_owner() -> None:
        # A SIGKILLed search cannot stop its workers, nor can a search stop those on other machines:
        # they notice that the search is over and leave by themselves.
        while True:
            time.sleep(POLL_SECONDS)
            owner_gone = spec['host'] == machine_name() and not alive(spec['owner_pid'])
            if owner_gone or not _same_search(spec_path, spec) or \
                    time.monotonic() - last_request[0] > spec['idle_seconds']:
                shut_down()

    threading.Thread(target=watch_owner, daemon=True).start()
    print(f'worker {slot} ready (pid {os.getpid()})', flush=True)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError):  # a client of another run, or one killed mid-handshake
            continue
        with conn:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                continue
            last_request[0] = float('inf')  # never idle while evaluating
            try:
                evaluator(request['parameter'], conn.send)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the trial was killed: nothing to answer
            except Exception as err:
                with contextlib.suppress(OSError):  # the trial is gone too
                    conn.send({'error': f'{type(err).__name__}: {err}', 'traceback': traceback.format_exc()})
            last_request[0] = time.monotonic()


def _same_search(spec_path: str, spec: dict[str, Any]) -> bool:
    """The spec is still there and still this run's (a finished search removes it; a resumed one renews it)."""
    try:
        return read_spec(spec_path)['token'] == spec['token']
    except (OSError, ValueError, KeyError):
        return False


def _load_evaluator(spec: dict[str, Any]) -> Callable[[str, Callable[[dict], None]], None]:
    """The candidate server: the heavy imports (torch, NNI, the supernet), once per worker, here and not at the
    top, so that the trial relay NNI starts for every candidate stays light."""
    from candidates import CandidateEvaluator
    return CandidateEvaluator.from_spec(spec).serve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--serve']:
        serve(argv[argv.index('--spec') + 1], argv[1])
        return 0
    # NNI appends its own trial module's arguments to the command (``-m nni.nas...``): they are not ours.
    return run_trial()


if __name__ == '__main__':
    sys.exit(main())
