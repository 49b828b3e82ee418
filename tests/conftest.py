import json
import socket
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / 'golden'


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


@pytest.fixture(scope='session')
def digits_supernet(tmp_path_factory):
    """The digits demo supernet, 12 epochs of scratch.py (about two minutes): trained once per session and
    shared, so a test reads it and writes nothing into its folder."""
    import scratch

    output = tmp_path_factory.mktemp('digits-supernet')
    scratch.main(['--dataset', 'digits', '--num-workers', '0', '--epochs', '12', '--output', str(output)])
    return output / 'supernet.pth'


def free_port() -> int:
    """A TCP port nothing listens on now (no test depends on a fixed port)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]
