"""The GPU path: run with ``pytest -m cuda`` on a CUDA machine (``bench/gpu.sh`` does); skipped, with the
reason shown, where there is no GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from checkpoints import save_weights
from space import (AutoformerSpace, build_supernet, complete_space_kwargs, extreme_arch, sample_arch,
                   set_active_arch)

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (bench/gpu.sh runs these)')
pytestmark = [pytest.mark.cuda, NEEDS_CUDA]
DEMO = complete_space_kwargs(**AutoformerSpace.preset('demo'))
TINY = complete_space_kwargs(**AutoformerSpace.preset('tiny'))


def training_step(supernet: torch.nn.Module, space_kwargs: dict, dtype: torch.dtype | None) -> torch.Tensor:
    images = torch.randn(8, 3, space_kwargs['img_size'], space_kwargs['img_size'], device='cuda')
    targets = torch.randint(0, space_kwargs['num_labels'], (8,), device='cuda')
    with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = torch.nn.functional.cross_entropy(supernet(images), targets)
    loss.backward()
    return loss


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_a_supernet_training_step_on_cuda(dtype):
    import random
    supernet = build_supernet(DEMO).cuda().train()
    optimizer = torch.optim.AdamW(supernet.parameters(), lr=1e-3, fused=True)
    set_active_arch(supernet, sample_arch(DEMO, random.Random(0)))
    loss = training_step(supernet, DEMO, dtype)
    optimizer.step()
    grads = [p.grad for p in supernet.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bf16_forward_stays_near_fp32_on_cuda():
    supernet = build_supernet(TINY).cuda().eval()
    set_active_arch(supernet, extreme_arch(TINY, max))
    images = torch.randn(4, 3, 224, 224, device='cuda')
    with torch.no_grad():
        full = supernet(images)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            half = supernet(images).float()
    assert (half - full).norm() / full.norm() < 3e-2


def test_flash_or_memory_efficient_attention_serves_the_tiny_preset():
    """Only the flash and memory-efficient SDPA backends are allowed: with the relative positions folded
    into q, k and v, the tiny preset's attention (197 tokens, 96 columns) must run on one of them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    supernet = build_supernet(TINY).cuda().train()
    set_active_arch(supernet, extreme_arch(TINY, max))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        loss = training_step(supernet, TINY, torch.bfloat16)  # raises where neither kernel can serve
    assert torch.isfinite(loss)


def test_evaluation_on_cuda_matches_the_cpu(tmp_path):
    import data
    model = AutoformerSpace(**DEMO).freeze(extreme_arch(DEMO, min))
    loader = data.build_loader(data.build_dataset('digits', None, 'test', 32), 64, 0)
    on_cpu = engine.evaluate(model, loader, 'cpu', progress=False)
    on_gpu = engine.evaluate(model, loader, 'cuda', progress=False, precision='32-true')
    mixed = engine.evaluate(model, loader, 'cuda', progress=False)  # bf16 by default on CUDA
    assert abs(on_gpu['top1'] - on_cpu['top1']) <= 100 / 360 and abs(mixed['top1'] - on_cpu['top1']) <= 200 / 360


# The search in a child process that dumps every thread's stack and exits if it runs past its time: a hang shows
# where it is instead of stopping the whole GPU check.
WATCHED_SEARCH = """import faulthandler, sys
faulthandler.dump_traceback_later(float(sys.argv[1]), exit=True)
import search
search.main(sys.argv[2:])
"""


def test_a_search_trial_on_cuda(tmp_path):
    weights = tmp_path / 'supernet.pth'
    save_weights(weights, build_supernet(DEMO).state_dict(), DEMO)
    argv = ['--weights', str(weights), '--device', 'cuda', '--strategy', 'random', '--trials', '2',
            '--engine', 'sequential', '--num-workers', '0', '--output', str(tmp_path / 'search')]
    log = tmp_path / 'search.log'
    with open(log, 'w') as out:  # a file, not a pipe: nothing the search leaves behind can hold the test
        done = subprocess.run([sys.executable, '-c', WATCHED_SEARCH, '150', *argv], stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=200,
                              cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, log.read_text()[-6000:]
    records = json.loads((tmp_path / 'search' / 'candidates.json').read_text())
    best = json.loads((tmp_path / 'search' / 'best.json').read_text())
    assert len(records) == 2 and best['top1'] == max(record['top1'] for record in records)
