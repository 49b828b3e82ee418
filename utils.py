"""Small helpers with no side effects at import and no heavy import (the scripts check their flags with them before
torch loads): the user-error type, safe file I/O, locks, the names of the precisions and schedules."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong and what to do."""


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal after saving what it had: the message says how to continue; ``code`` is the exit
    status (128 + the signal's number, as a shell reports a process the signal ended)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --compile of the supernet without a GPU: allowed (the results are the same), but its cost is said.
COMPILE_ON_CPU = ('--compile on the CPU: compiling takes a minute or more, and every {what} then costs the largest '
                  "arch's arithmetic; it pays on GPUs, where Python and kernel launches bound a step")


def read_json(path: str | os.PathLike, expect: type = dict) -> Any:
    """A results or record file this project wrote, refused in one line when it is damaged (a hand edit, a
    disk error) instead of a traceback."""
    try:
        value = json.loads(Path(path).read_text(encoding='utf-8'))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise UserError(f'{path} is damaged ({type(err).__name__}: {err}); delete it, or use another '
                        '--output') from None
    if not isinstance(value, expect):
        raise UserError(f'{path} is damaged (a JSON {type(value).__name__}, not a {expect.__name__}); delete it, or '
                        'use another --output')
    return value


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a kept file gets the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(folder: str | os.PathLike, flag: str = '--output') -> None:
    """Refuse up front an output folder that cannot be written, before hours of work are spent."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f'{flag} {folder} is a file, not a folder: choose a folder')
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-test.', dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f'{flag} {folder} cannot be written ({err.strerror or err}): '
                        f'fix its permissions or free space, or choose another {flag}') from None


@contextmanager
def lock_output(output: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``output`` while ``what`` (e.g. 'a search') writes into it; a
    second run is refused with one line naming the holder. The lock goes with the process (flock)."""
    path = Path(output) / '.lock'
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: the holder's line stays readable
    with os.fdopen(fd, 'r+') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or 'another process'
            raise UserError(f'--output {output} is in use by {holder}: wait for it to finish, or choose another '
                            '--output') from None
        lock.truncate(0)
        lock.write(f'{what} (pid {os.getpid()} on {socket.gethostname()}: {" ".join(sys.argv)})\n')
        lock.flush()
        yield


def remove_unfinished_writes(folder: str | os.PathLike) -> None:
    """Delete the temporary files of writes a killed run left in ``folder`` (see :func:`atomic_path`)."""
    for tmp in Path(folder).glob('.*.tmp'):
        tmp.unlink(missing_ok=True)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode(), path)


def atomic_write_bytes(data: bytes | memoryview, path: str | os.PathLike) -> None:
    """Write ``data`` so that ``path`` is never half-written; a full disk or a read-only folder in one line."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as err:
        raise UserError(f'cannot write {path}: {err.strerror or err}') from None


def json_form(value: Any) -> Any:
    """``value`` as it reads back from a JSON file (tuples as lists): what a recorded fingerprint is compared with."""
    return json.loads(json.dumps(value))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + '\n', path)


# --precision: Lightning's names (devices.AUTOCAST gives their autocast dtypes).
PRECISIONS = ('32-true', 'bf16-mixed', '16-mixed')
# The learning-rate schedules of training (lightning.SupernetModule): the official per-epoch cosine, or per step.
SCHEDULES = ('epoch', 'step')


def is_first_process() -> bool:
    """True in the process a user started, false in the other DDP ranks (Lightning's own launcher,
    torchrun and SLURM all set one of these)."""
    return all(os.environ.get(name, '0') == '0'
               for name in ('RANK', 'LOCAL_RANK', 'NODE_RANK', 'GROUP_RANK', 'SLURM_PROCID'))


def check_output_folder(output: Path, resume: Any, run: str, held: list[Path], recorded: Mapping[str, Any] | None,
                        fingerprint: Mapping[str, Any]) -> None:
    """One ``--output`` holds one run (``run`` names it: 'a training run', 'search <id>'). Without
    ``--resume``, refuse a folder holding results (``held``); with it, refuse settings other than those
    ``recorded`` for the run (a setting it did not record is taken as unchanged)."""
    if not resume:
        if held:
            raise UserError(f'{output} already holds {run} ({held[0].name}): pass --resume to continue it, or choose '
                            'another --output')
        return
    recorded = recorded or {}
    changed = [key for key in fingerprint if key in recorded and recorded[key] != fingerprint[key]]
    if changed:
        differences = ', '.join(f'another {key} ({recorded[key]!r}, now {fingerprint[key]!r})' for key in changed)
        raise UserError(f'--resume: {output} holds {run} with {differences}: resume with the same flags, or '
                        'choose another --output')


def seed_for(seed: int, step: int) -> int:
    """The seed of one step (an epoch, an optimizer step) of a run seeded ``seed``: distinct for every pair of
    small values, the same wherever it is computed (every DDP rank, a resumed run)."""
    return seed * 1_000_003 + step
