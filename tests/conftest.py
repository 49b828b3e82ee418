import fcntl
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / 'golden'


def pytest_configure(config):
    """Under xdist (make test runs one worker a core): each worker, and every process it starts, gets its share
    of the cores. Without it, every training of every worker takes all the cores, and the threads spin against
    each other (two workers ran slower than one)."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = threads
        torch.set_num_threads(int(threads))


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """Every test starts with Python's own SIGINT handler, as a process started from a shell does. Code run in this
    worker can leave SIGINT ignored (Lightning's Ctrl-C handling sets SIG_IGN, for one), and the processes a later
    test starts inherit that and never see a SIGINT: a training stopped by SIGINT then ran to its end (seen once in
    a full `make test`; reproduced by running the test with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """Modules holding the most tests marked slow first, each kept whole and in order: xdist's --dist loadfile
    hands out modules in this order, and the longest started first end with the rest (the workers finish
    together)."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + bool(item.get_closest_marker('slow'))
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: each module's order is kept


@pytest.fixture(scope='session')
def golden():
    """The official implementation's golden cases: space_kwargs, input, cases."""
    cases = json.loads((GOLDEN / 'small-cases.json').read_text())
    space = cases['config']['search_space']
    space_kwargs = dict(search_embed_dim=space['embed_dim'], search_depth=space['depth'],
                        search_num_heads=space['num_heads'], search_mlp_ratio=space['mlp_ratio'],
                        img_size=32, patch_size=4, num_labels=10, drop_path_rate=0.)
    inputs = torch.load(GOLDEN / 'small-input.pt', weights_only=True)['input']
    return space_kwargs, inputs, cases['cases']


def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of this test session, shared by its xdist workers (each has a folder of its own in
    it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='session')
def digits_supernet(tmp_path_factory):
    """The digits demo supernet, 12 epochs of scratch.py (about a minute): trained once per session, by the
    first worker that needs it while the others wait, and shared, so a test reads it and writes nothing into its
    folder."""
    import scratch

    folder = session_folder(tmp_path_factory)
    output = folder / 'digits-supernet'
    with open(folder / 'digits-supernet.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (output / 'supernet.pth').is_file():
            scratch.main(['--dataset', 'digits', '--num-workers', '0', '--epochs', '12', '--output', str(output)])
    return output / 'supernet.pth'


def free_port() -> int:
    """A TCP port nothing listens on now (no test depends on a fixed port)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]
