"""A simulated two-machine run. Two ``torchrun`` launchers on this machine (one per "node", one process
each, gloo on the CPU, rendezvous on 127.0.0.1) train the digits supernet with ``scratch.py --num-nodes 2``: the
command README.md's "Several GPUs and several machines" gives, with 127.0.0.1 for the first machine's address."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import free_port

ROOT = Path(__file__).parent.parent
TORCHRUN = Path(sys.executable).parent / 'torchrun'
# Small batches of a short epoch: 4 steps a node (512 of the 1257 digits each, batch 128), no warmup (a run of
# one epoch).
TRAIN = ['--dataset', 'digits', '--num-workers', '0', '--batch-size', '128', '--warmup', '0', '--num-nodes', '2']

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason='needs torchrun beside the Python running the tests')


def node_command(rank: int, host: str, port: str, output: str, *args: str) -> list[str]:
    """One machine's command line: ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank RANK ... scratch.py``."""
    return ['torchrun', '--nnodes', '2', '--nproc-per-node', '1', '--node-rank', str(rank), '--master-addr', host,
            '--master-port', port, 'scratch.py', *TRAIN, '--output', output, *args]


def start_node(rank: int, port: int, output: Path, *args: str) -> subprocess.Popen:
    """One machine's launcher, both on this machine (127.0.0.1); its output goes to ``<output>.node-<rank>.log``
    (a file, not a pipe: a pipe nobody reads while the test waits on the other node could stall the run)."""
    command = [str(TORCHRUN), *node_command(rank, '127.0.0.1', str(port), str(output), *args)[1:]]
    env = {**os.environ, 'AUTOFORMER_TRACE': '1'}
    with open(node_log(output, rank), 'w') as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def node_log(output: Path, rank: int) -> Path:
    return output.parent / f'{output.name}.node-{rank}.log'


def run_two_nodes(output: Path, *args: str, timeout: float = 400) -> list[str]:
    """Both machines to the end; their outputs (node 0's first). A node that fails ends the wait at once with
    both outputs (torchrun would keep the other waiting for it at its exit barrier for five minutes)."""
    port = free_port()
    nodes = [start_node(rank, port, output, *args) for rank in (0, 1)]
    deadline = time.time() + timeout
    codes = [node.poll() for node in nodes]  # every node polled (any() would stop at the first still running)
    while None in codes and not set(codes) - {None, 0} and time.time() < deadline:
        time.sleep(0.5)
        codes = [node.poll() for node in nodes]
    for node in nodes:
        if node.poll() is None:
            kill_node(node)
    outputs = [node_log(output, rank).read_text() for rank in (0, 1)]
    assert codes == [0, 0], (f'exit codes {codes} (None: still running after {timeout:.0f} s)\n'
                             + '\n'.join(f'--- node {rank}:\n{text[-3000:]}' for rank, text in enumerate(outputs)))
    return outputs


def archs_by_rank(output: Path) -> dict[int, dict[int, str]]:
    """Each global rank's trained arch at every step (its last record of a step retraced by a resumed run)."""
    ranks = {}
    for path in (output / 'trace').glob('rank-*.jsonl'):
        for record in map(json.loads, path.read_text().splitlines()):
            ranks.setdefault(record['rank'], {})[record['step']] = json.dumps(record['arch'], sort_keys=True)
    return ranks


def kill_node(node: subprocess.Popen) -> None:
    """A machine lost: its launcher and the training process it started (in a session of its own) at once."""
    processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    node.wait()


@pytest.mark.slow
def test_two_nodes_train_the_same_archs_write_once_and_resume(tmp_path):
    run = tmp_path / 'run'
    first = run_two_nodes(run, '--epochs', '1')
    ranks = archs_by_rank(run)
    assert sorted(ranks) == [0, 1] and sorted(ranks[0]) == list(range(4)) and ranks[0] == ranks[1]
    assert 'DDP: all 2 ranks hold identical supernet weights' in first[0]
    assert f'wrote {run / "supernet.pth"}' in first[0] and 'wrote ' not in first[1]  # global rank 0 only
    assert sorted(path.name for path in (run / 'checkpoints').iterdir()) == ['best.ckpt', 'last.ckpt']
    # the last epoch's weights and the best epoch's
    assert sorted(path.name for path in run.glob('*.pth')) == ['supernet-best.pth', 'supernet.pth']

    run_two_nodes(run, '--epochs', '2', '--resume')
    ranks = archs_by_rank(run)
    assert sorted(ranks[0]) == list(range(8)) and ranks[0] == ranks[1]
    assert json.loads((run / 'metrics.json').read_text())['epochs'] == 2
    assert sorted(path.name for path in (run / 'checkpoints').iterdir()) == ['best.ckpt', 'last.ckpt']


@pytest.mark.slow
def test_losing_one_node_ends_the_other_with_one_line(tmp_path):
    run = tmp_path / 'run'
    port = free_port()
    nodes = [start_node(rank, port, run, '--epochs', '50') for rank in (0, 1)]
    trace = run / 'trace' / 'rank-0.jsonl'
    deadline = time.time() + 240
    while not (trace.is_file() and trace.read_text().count('\n') >= 2) and time.time() < deadline:
        assert all(node.poll() is None for node in nodes), 'a node ended before training'
        time.sleep(0.2)
    assert trace.is_file(), 'the nodes did not start training'
    kill_node(nodes[1])
    lost = time.time()
    try:
        nodes[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_node(nodes[0])
        pytest.fail('the remaining node hung after the other was killed')
    output = node_log(run, 0).read_text()
    assert nodes[0].returncode != 0 and time.time() - lost < 60
    # one error line; it may follow a progress bar cut mid-line (the bar is on stdout, the error on stderr)
    errors = re.findall(r'(?:^|\])(error: .*)$', output, flags=re.M)
    assert len(errors) == 1 and 'lost contact with another training process' in errors[0], output[-3000:]


@pytest.mark.fast
def test_the_readme_gives_the_command_these_tests_run():
    """README.md's two-machine example is exactly what the tests start (HOST, PORT and OUT for the values)."""
    readme = (ROOT / 'README.md').read_text()
    commands = [' '.join(command.replace('\\\n', ' ').split())
                for command in re.findall(r'^torchrun (?:.*\\\n)*.*$', readme, flags=re.M)]
    assert commands == [' '.join(node_command(rank, 'HOST', 'PORT', 'OUT', '--epochs', '1')) for rank in (0, 1)]
