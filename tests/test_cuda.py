"""The GPU path: run with ``pytest -m cuda`` on a CUDA machine (``bench/gpu.sh`` does); skipped, with the
reason shown, where there is no GPU. A test whose body the CPU can run also runs there, in ``make test``."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from checkpoints import save_weights
from masked_supernet import MaskedSupernet
from arch import complete_space_kwargs, extreme_arch, sample_arch
from space import AutoformerSpace, build_supernet, set_active_arch

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (bench/gpu.sh runs these)')
CUDA = [pytest.mark.cuda, NEEDS_CUDA]
ON_CPU_AND_CUDA = pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=CUDA)])
DEMO = complete_space_kwargs(**AutoformerSpace.preset('demo'))
TINY = complete_space_kwargs(**AutoformerSpace.preset('tiny'))


def training_step(supernet: torch.nn.Module, space_kwargs: dict, dtype: torch.dtype | None,
                  device: str = 'cuda') -> torch.Tensor:
    images = torch.randn(8, 3, space_kwargs['img_size'], space_kwargs['img_size'], device=device)
    targets = torch.randint(0, space_kwargs['num_labels'], (8,), device=device)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = torch.nn.functional.cross_entropy(supernet(images), targets)
    loss.backward()
    return loss


@ON_CPU_AND_CUDA
@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
def test_a_supernet_training_step(dtype, device):
    supernet = build_supernet(DEMO).to(device).train()
    optimizer = torch.optim.AdamW(supernet.parameters(), lr=1e-3, fused=True)
    set_active_arch(supernet, sample_arch(DEMO, random.Random(0)))
    loss = training_step(supernet, DEMO, dtype, device)
    optimizer.step()
    grads = [p.grad for p in supernet.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('mode', [None, 'reduce-overhead'], ids=['default', 'cuda-graphs'])
@pytest.mark.cuda
@NEEDS_CUDA
def test_one_compiled_graph_on_cuda_gives_the_sliced_supernets_logits(mode):
    """Inductor on CUDA (with and without CUDA graphs) over archs of every depth: one graph, and each arch's
    logits those of the sliced supernet (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    supernet = build_supernet(DEMO).cuda().eval()
    masked = MaskedSupernet(supernet)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(masked, mode=mode)
    images = torch.randn(16, 3, 32, 32, device='cuda')
    archs = [extreme_arch(DEMO, min), extreme_arch(DEMO, max)] + [sample_arch(DEMO, random.Random(i)) for i in range(4)]
    with torch.no_grad():
        for arch in archs:
            masked.set_arch(arch)
            logits = compiled(images).clone()  # CUDA graphs reuse their output memory on the next replay
            set_active_arch(supernet, arch)
            expected = supernet(images)
            assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-3, arch
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 1


@pytest.mark.cuda
@NEEDS_CUDA
def test_bf16_forward_stays_near_fp32_on_cuda():
    supernet = build_supernet(TINY).cuda().eval()
    set_active_arch(supernet, extreme_arch(TINY, max))
    images = torch.randn(4, 3, 224, 224, device='cuda')
    with torch.no_grad():
        full = supernet(images)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            half = supernet(images).float()
    assert (half - full).norm() / full.norm() < 3e-2


@pytest.mark.cuda
@NEEDS_CUDA
def test_flash_or_memory_efficient_attention_serves_the_tiny_preset():
    """Only the flash and memory-efficient SDPA backends are allowed: with the relative positions folded
    into q, k and v, the tiny preset's attention (197 tokens, 96 columns) must run on one of them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    supernet = build_supernet(TINY).cuda().train()
    set_active_arch(supernet, extreme_arch(TINY, max))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        loss = training_step(supernet, TINY, torch.bfloat16)  # raises where neither kernel can serve
    assert torch.isfinite(loss)


@pytest.mark.cuda
@NEEDS_CUDA
def test_evaluation_on_cuda_matches_the_cpu(tmp_path):
    import data
    import samplers
    model = AutoformerSpace(**DEMO).freeze(extreme_arch(DEMO, min))
    loader = samplers.build_loader(data.build_dataset('digits', None, 'test', 32), 64, 0)
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


# The compiled search on the CPU: tests/test_search.py (dynamo without code generation: inductor takes a minute).
@pytest.mark.parametrize('device, compile', [('cpu', False), pytest.param('cuda', False, marks=CUDA),
                                             pytest.param('cuda', True, marks=CUDA)])
def test_a_search_trial(tmp_path, device, compile):
    weights = tmp_path / 'supernet.pth'
    save_weights(weights, build_supernet(DEMO).state_dict(), DEMO)
    argv = ['--weights', str(weights), '--device', device, '--strategy', 'random', '--trials', '2',
            '--engine', 'sequential', '--num-workers', '0', '--output', str(tmp_path / 'search')]
    argv += ['--compile'] * compile
    log = tmp_path / 'search.log'
    with open(log, 'w') as out:  # a file, not a pipe: nothing the search leaves behind can hold the test
        done = subprocess.run([sys.executable, '-c', WATCHED_SEARCH, '150', *argv], stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=200,
                              cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, log.read_text()[-6000:]
    records = json.loads((tmp_path / 'search' / 'candidates.json').read_text())
    best = json.loads((tmp_path / 'search' / 'best.json').read_text())
    assert len(records) == 2 and best['top1'] == max(record['top1'] for record in records)
