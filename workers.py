"""The warm evaluation workers of a web-UI search: their spec, where each listens, starting and stopping them.

search.py writes the spec and starts one worker per device; trial.py (the relay NNI starts per candidate) finds
a worker here, or starts one. Only the standard library is imported: the relay must stay light.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

SPEC_ENV = 'AUTOFORMER_SEARCH'  # the search's worker.json: what every worker loads and where results go
TRIAL_SCRIPT = Path(__file__).resolve().with_name('trial.py')


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The search's ``worker.json``, written by search.py."""
    return json.loads(Path(path).read_text())


def socket_address(spec: dict[str, Any], slot: str) -> str:
    """A short socket path (AF_UNIX paths are capped at 107 bytes; output folders can be longer), in a
    folder only this user can enter (another user could otherwise take the name first)."""
    folder = Path(tempfile.gettempdir()) / f'autoformer-{os.getuid()}'
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise RuntimeError(f'{folder} belongs to another user or is open to others: remove it')
    digest = hashlib.sha1(f"{spec['output']}|{slot}".encode()).hexdigest()[:16]
    return str(folder / f'{digest}.sock')


def machine_name() -> str:
    """This machine, also among containers that share a hostname: the hostname and the machine id."""
    try:
        machine_id = Path('/etc/machine-id').read_text().strip()[:8]
    except OSError:
        machine_id = ''
    return '-'.join(filter(None, [os.uname().nodename, machine_id]))


def workers_folder(spec: dict[str, Any]) -> Path:
    """Per machine: several machines of a remote search can share the output folder."""
    folder = Path(spec['output']) / 'workers' / machine_name()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def worker_slots(spec: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """The workers of a search on this machine, with their environment: one per GPU, else ``workers``."""
    if spec['gpus']:
        return [(f'gpu{i}', {'CUDA_VISIBLE_DEVICES': str(i)}) for i in range(spec['gpus'])]
    return [(f'worker{i}', {}) for i in range(spec['workers'])]


def start_worker(spec_path: str | os.PathLike, slot: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A worker in its own session (a Ctrl-C meant for the search must not kill it mid-candidate)."""
    spec = read_spec(spec_path)
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith('NNI_')}
    folder = workers_folder(spec)
    with open(folder / f'{slot}.log', 'ab') as log:
        process = subprocess.Popen([sys.executable, str(TRIAL_SCRIPT), '--serve', slot, '--spec',
                                    str(spec_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    (folder / f'{slot}.pid').write_text(str(process.pid))  # at once: a trial must not start a second one
    return process


def connect(spec: dict[str, Any], slot: str) -> Connection | None:
    """A connection to the slot's worker, or None when no worker of this search answers there."""
    try:
        return Client(socket_address(spec, slot), family='AF_UNIX', authkey=spec['token'].encode())
    except (OSError, EOFError, AuthenticationError):  # none yet, or a stale one of an earlier run
        return None


def worker_pid(spec: dict[str, Any], slot: str) -> int | None:
    """The pid its pid file gives for the slot's worker (written as soon as the worker is started)."""
    try:
        return int((workers_folder(spec) / f'{slot}.pid').read_text())
    except (OSError, ValueError):
        return None


def worker_log_tail(spec: dict[str, Any], slot: str, lines: int = 5) -> str:
    """The last lines of the slot's worker log, on one line, for an error message."""
    path = workers_folder(spec) / f'{slot}.log'
    text = path.read_text(errors='replace') if path.is_file() else ''
    return ' | '.join(line for line in text.strip().splitlines()[-lines:]) or f'(nothing in {path})'


def stop_process(pid: int, patience: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``patience`` seconds."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + patience
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """A running process (a zombie, which a search that started a worker has not reaped yet, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] != 'Z'
    except (OSError, IndexError):
        return True


def is_worker(pid: int, spec: dict[str, Any]) -> bool:
    """A live worker of this search, not another process that took the pid of one long gone."""
    if not alive(pid):
        return False
    try:
        cmdline = Path(f'/proc/{pid}/cmdline').read_bytes()
    except OSError:
        return True  # no /proc (not Linux): trust the pid file
    return b'--serve' in cmdline and spec['output'].encode() in cmdline


def file_identity(path: Path) -> list[int]:
    """Size and modification time: a worker refuses a weights file that changed after the search read it."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def spec_of(**spec: Any) -> dict[str, Any]:
    """The spec every worker of a search loads (its weights, split, device and output), with the search's pid and
    machine, and a token: a worker serves only trials that present it (the file is for this user's eyes only)."""
    return {**spec, 'owner_pid': os.getpid(), 'host': machine_name(), 'token': secrets.token_hex(16),
            'idle_seconds': 3600}


def start_workers(spec_path: Path) -> None:
    """One warm worker per device, loading while NNI's manager starts (a trial starts any that is missing)."""
    for slot, env in worker_slots(read_spec(spec_path)):
        start_worker(spec_path, slot, {**os.environ, **env})


def stop_all_workers(spec_path: Path | None) -> None:
    """Stop this machine's workers of a search, mid-candidate or not, and wait until each has exited (SIGKILL after
    10 s); then remove the spec, so that workers on other machines exit too."""
    if spec_path is None or not spec_path.is_file():
        return
    spec = read_spec(spec_path)
    for pid_file in workers_folder(spec).glob('*.pid'):
        pid = worker_pid(spec, pid_file.stem)
        if pid is not None and is_worker(pid, spec):
            stop_process(pid)
        pid_file.unlink(missing_ok=True)
    spec_path.unlink()
