import json
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
