"""search.py --machines: NNI's remote training service, over SSH to a loopback sshd started here.

The sshd listens on 127.0.0.1 with its own host key and accepts one client key, both made in a
temporary folder; it is stopped at the end. The machine's "python" is a small wrapper around this
interpreter that skips NNI's ``python -m pip install nni --upgrade`` (no network needed) and gives
the remote side its own HOME, so the remote experiment folder lands in the temporary folder.
"""
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import search
from cli import from_flags
from experiment import ExperimentSettings, experiment_config
from conftest import free_port
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
SSHD = '/usr/sbin/sshd'


def processes_mentioning(text, exclude=()):
    """Live processes (zombies aside) whose command line contains ``text``."""
    found = []
    for proc in Path('/proc').iterdir():
        if not proc.name.isdigit() or int(proc.name) in exclude or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / 'stat').read_text().split(') ')[1][0] == 'Z':
                continue
            cmdline = (proc / 'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
        except (OSError, IndexError):
            continue
        if text in cmdline:
            found.append(f'{proc.name}: {cmdline.strip()}')
    return found


def children_of(pid):
    found = []
    for proc in Path('/proc').iterdir():
        try:
            fields = (proc / 'stat').read_text().split(') ')[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != 'Z' and int(fields[1]) == pid:
            found.append(int(proc.name))
    return found


def wait_until_empty(check, seconds=20):
    deadline = time.monotonic() + seconds
    while (left := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope='module')
def sshd(tmp_path_factory):
    """A loopback sshd on a free port (foreground, so it is ours to stop): (port, user, client key)."""
    if not os.access(SSHD, os.X_OK) or shutil.which('ssh-keygen') is None:
        pytest.skip(f'{SSHD} or ssh-keygen is absent (apt-get install openssh-server openssh-client; .ci/run does)')
    folder = tmp_path_factory.mktemp('sshd')
    try:
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)  # Debian's privilege separation folder
    except OSError as err:
        pytest.skip(f'cannot create /run/sshd, which sshd needs ({err})')
    for key in ('host_key', 'client_key'):
        subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(folder / key)], check=True)
    (folder / 'authorized_keys').write_text((folder / 'client_key.pub').read_text())
    os.chmod(folder / 'authorized_keys', 0o600)
    port, user = free_port(), getpass.getuser()
    config = folder / 'sshd_config'
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {folder / 'host_key'}
PidFile none
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {folder / 'authorized_keys'}
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    subprocess.run([SSHD, '-t', '-f', str(config)], check=True)
    log = folder / 'sshd.log'
    process = subprocess.Popen([SSHD, '-D', '-f', str(config), '-E', str(log)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(('127.0.0.1', port)) == 0:
                    break
            assert process.poll() is None, f'sshd exited: {log.read_text()}'
            time.sleep(0.05)
        if shutil.which('ssh'):  # fail fast when the key login does not work
            subprocess.run(['ssh', '-p', str(port), '-i', str(folder / 'client_key'), '-o', 'BatchMode=yes',
                            '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o',
                            'LogLevel=ERROR', '-o', 'ConnectTimeout=5', f'{user}@127.0.0.1', 'true'],
                           check=True, timeout=30)
        yield {'port': port, 'user': user, 'key': folder / 'client_key', 'pid': process.pid, 'log': log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope='module')
def supernet(digits_supernet):
    return digits_supernet


def loopback_python(folder):
    """This interpreter behind a wrapper: NNI's pip upgrade skipped, HOME (the remote side's
    ~/nni-experiments and its .bashrc) in ``folder``."""
    home = folder / 'remote-home'
    home.mkdir()
    wrapper = folder / 'bin' / 'python'
    wrapper.parent.mkdir()
    wrapper.write_text(f"""#!/bin/sh
export HOME={home}
if [ "$1 $2 $3 $4" = "-m pip install nni" ]; then echo "skipped: python -m pip install nni --upgrade"; exit 0; fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    return wrapper, home


@pytest.mark.slow
def test_search_over_ssh_runs_every_trial_on_the_remote_machine(sshd, supernet, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # NNI uploads the current folder: search.py --machines runs from the project
    python, home = loopback_python(tmp_path)
    machines = tmp_path / 'machines.json'
    machines.write_text(json.dumps([{'host': '127.0.0.1', 'port': sshd['port'], 'user': sshd['user'],
                                     'ssh_key_file': str(sshd['key']), 'python': str(python)}]))
    output = tmp_path / 'search'
    start = time.monotonic()
    best = search.main(['--weights', str(supernet), '--engine', 'ts', '--machines', str(machines), '--trials', '4',
                        '--port', str(free_port()), '--experiment-dir', str(tmp_path / 'nni-experiments'),
                        '--output', str(output), '--num-workers', '0'])
    print(f'remote search: {time.monotonic() - start:.1f} s')
    assert best['candidates'] == 4
    assert len(json.loads((output / 'candidates.json').read_text())) == 4
    # The trials ran through the remote service: NNI's trial keeper, reached over SSH, made a folder per trial
    # under the remote side's HOME (a local run has none), and the code it unpacked there is only the code.
    environments = list((home / 'nni-experiments' / best['experiment_id'] / 'environments').glob('remote-worker*'))
    assert len(environments) == 1, environments
    trials = [d for d in (environments[0] / 'trials').iterdir() if (d / 'trial.stdout').is_file()]
    assert len(trials) == 4, trials
    code = environments[0] / 'upload' / 'trial_code'
    assert (code / 'trial.py').is_file() and (code / 'search.py').is_file()
    assert not any((code / name).exists() for name in ('.venv', '.git', 'outputs', 'weights'))
    assert 'Accepted publickey' in sshd['log'].read_text()
    # Nothing of the search is left: no worker, no NNI manager or trial keeper, no SSH session.
    assert not wait_until_empty(lambda: processes_mentioning(str(tmp_path))), 'processes left running'
    assert not wait_until_empty(lambda: children_of(sshd['pid'])), 'SSH sessions left open'


# --------------------------------------------------------------------------------------------
# Refusals (no sshd)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def key(tmp_path):
    path = tmp_path / 'id_ed25519'
    path.write_text('not checked here\n')
    return path


def machines_file(tmp_path, machines):
    path = tmp_path / 'machines.json'
    path.write_text(machines if isinstance(machines, str) else json.dumps(machines))
    return str(path)


def machine(key, **changes):
    entry = {'host': '127.0.0.1', 'port': 22, 'user': 'me', 'ssh_key_file': str(key),
             'python': '/opt/conda/envs/af/bin/python'}
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


def parse(*argv):
    return search.parse_args(['--dataset', 'digits', *argv])


def test_machines_file_builds_the_remote_training_service(tmp_path, key, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = machines_file(tmp_path, [machine(key, gpus=[1, 2]), machine(key, host='127.0.0.2', port=2200)])
    args = parse('--machines', path)
    # the devices resolve_devices would give on a GPU machine
    config = experiment_config(from_flags(ExperimentSettings, args, gpus=1, concurrency=2), tmp_path / 'worker.json')
    service = config.training_service
    assert service.platform == 'remote' and service.reuse_mode is False
    assert config.nni_manager_ip == '127.0.0.1'  # every machine is this one
    first, second = service.machine_list
    assert (first.host, first.port, first.user, first.python_path) == ('127.0.0.1', 22, 'me', '/opt/conda/envs/af/bin')
    assert first.gpu_indices == [1, 2] and first.use_active_gpu
    assert second.port == 2200 and second.gpu_indices is None and not second.use_active_gpu
    assert config._trial_command_params['python'].startswith('/opt/conda/envs/af/bin/python ')
    assert config._trial_command_params['python'].endswith('/trial.py')


@pytest.mark.parametrize('content, message', [
    (None, 'cannot be read'),
    ('[{"host": ', 'is not valid JSON'),
    ('{"host": "a"}', 'non-empty JSON list'),
    ('[]', 'non-empty JSON list'),
    ({'host': None}, 'has no "host"'),
    ({'user': ''}, 'has no "user"'),
    ({'python': None}, 'has no "python"'),
    ({'python': 'python3'}, 'absolute path'),
    ({'ssh_key_file': '/nonexistent/id_rsa'}, 'SSH key file /nonexistent/id_rsa does not exist'),
    ({'port': '22'}, '"port" must be a port number'),
    ({'gpus': 0}, '"gpus" must be a non-empty list'),
    ({'sshkey': 'x'}, 'unknown key(s) sshkey'),
])
def test_a_bad_machines_file_is_refused_in_one_line(tmp_path, key, monkeypatch, content, message):
    monkeypatch.chdir(ROOT)
    if content is None:
        path = str(tmp_path / 'missing.json')
    elif isinstance(content, dict):
        path = machines_file(tmp_path, [machine(key, **content)])
    else:
        path = machines_file(tmp_path, content)
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')) as refusal:
        parse('--machines', path)
    assert '\n' not in str(refusal.value)


def test_a_password_replaces_the_key_file(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = machines_file(tmp_path, [{'host': 'localhost', 'user': 'me', 'password': 'pw',
                                     'python': '/usr/bin/python3'}])
    args = parse('--machines', path)
    config = experiment_config(from_flags(ExperimentSettings, args, gpus=0, concurrency=1), tmp_path / 'worker.json')
    (entry,) = config.training_service.machine_list
    assert entry.password == 'pw' and entry.ssh_key_file is None


def test_machines_that_disagree_on_python_are_refused(tmp_path, key, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = machines_file(tmp_path, [machine(key), machine(key, python='/usr/bin/python3')])
    with pytest.raises(UserError, match='disagree on "python"'):
        parse('--machines', path)


def test_machines_need_the_ts_engine_the_project_folder_and_a_reachable_manager(tmp_path, key, monkeypatch):
    path = machines_file(tmp_path, [machine(key, host='10.0.0.2')])
    with pytest.raises(UserError, match='--machines needs --engine ts'):
        parse('--machines', path, '--engine', 'sequential')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match='start search.py from the project folder'):
        parse('--machines', path, '--manager-ip', '10.0.0.1')
    monkeypatch.chdir(ROOT)
    with pytest.raises(UserError, match='pass --web-ui-host all'):
        parse('--machines', path, '--manager-ip', '10.0.0.1')
    assert parse('--machines', path, '--manager-ip', '10.0.0.1', '--web-ui-host', 'all').manager_ip == '10.0.0.1'
