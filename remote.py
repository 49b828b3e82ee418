"""The ``--machines`` file of a search over SSH (NNI's remote training service): read and checked before anything
loads, and turned into NNI's machine configs."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path

from utils import UserError

ROOT = Path(__file__).resolve().parent

MACHINE_EXAMPLE = ('[{"host": "10.0.0.2", "port": 22, "user": "me", "ssh_key_file": "~/.ssh/id_rsa", '
                   '"python": "/opt/conda/envs/af/bin/python", "gpus": [0, 1]}]')
MACHINE_KEYS = ('host', 'port', 'user', 'ssh_key_file', 'password', 'python', 'gpus')


def read_machines(path: str, engine: str, web_ui_host: str, port: int,
                  manager: str | None) -> tuple[list[dict], str]:
    """The ``--machines`` file, checked (each refusal one line, before anything loads), and the address of this
    machine they connect back to (``manager``, else found)."""
    if engine == 'sequential':
        raise UserError('--machines needs --engine ts: the sequential engine evaluates every candidate in this process')
    machines = read_machine_list(Path(path).expanduser())
    if Path.cwd().resolve() != ROOT:
        raise UserError(f'--machines: start search.py from the project folder {ROOT} (NNI uploads the current '
                        f'folder, {Path.cwd()}, to every machine)')
    manager = manager or manager_ip(machines)
    if web_ui_host == 'loopback' and not _is_loopback(manager):
        raise UserError(f'--machines: the machines connect back to NNI\'s manager at {manager}:{port}, '
                        'which --web-ui-host loopback (the default) keeps to this machine: pass --web-ui-host all '
                        '(NNI\'s server has no authentication: let a firewall admit only the machines to --port)')
    return machines, manager


def read_machine_list(path: Path) -> list[dict]:
    """The machines of a ``--machines`` file, each checked."""
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
        if machine.get('password') is None and not key_file(machine).is_file():
            raise UserError(f'{where}: SSH key file {key_file(machine)} does not exist (give "ssh_key_file" or '
                            '"password")')
    pythons = sorted({m['python'] for m in machines})
    if len(pythons) > 1:
        raise UserError(f'--machines file {path}: the machines disagree on "python" ({", ".join(pythons)}): one '
                        'trial command serves every machine, so the python environment must have the same path '
                        'on each')
    return machines


def _is_loopback(host: str) -> bool:
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


def remote_machines(machines: list[dict]) -> list:
    """NNI's machine configs: python_path is the folder of the machines' python (NNI puts it first in PATH
    and runs ``python -m pip install nni --upgrade`` with it when it connects); ``gpus`` restricts NNI to
    those GPUs, busy or not."""
    from nni.experiment.config import RemoteMachineConfig
    return [RemoteMachineConfig(host=m['host'], port=m.get('port', 22), user=m['user'], password=m.get('password'),
                                ssh_key_file=None if m.get('password') is not None else str(key_file(m)),
                                python_path=os.path.dirname(m['python']), gpu_indices=m.get('gpus'),
                                use_active_gpu=m.get('gpus') is not None) for m in machines]


def key_file(machine: dict) -> Path:
    """The machine's SSH key file: ``ssh_key_file``, else ``~/.ssh/id_rsa``."""
    return Path(machine.get('ssh_key_file') or '~/.ssh/id_rsa').expanduser()
