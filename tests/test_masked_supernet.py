"""The supernet with the arch as data (masked_supernet.py): the sliced supernet's logits and gradients for every
kind of arch, the official golden logits, and one compiled graph for archs of every depth, width and head count."""
import random

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from conftest import GOLDEN
from fixtures import max_relative_error
from masked_supernet import MaskedSupernet
from arch import SpaceError, complete_space_kwargs, extreme_arch, sample_arch
from space import AutoformerSpace, build_supernet, set_active_arch

pytestmark = pytest.mark.fast  # make test-fast

DEMO = complete_space_kwargs(**AutoformerSpace.preset('demo'))
# Every switch of the space the other way: post-norm, class-token pooling, no absolute or relative positions,
# no qkv bias.
DEMO_OTHER = complete_space_kwargs(**{**AutoformerSpace.preset('demo'), 'pre_norm': False, 'global_pooling': False,
                                      'absolute_position': False, 'rpe': False, 'qkv_bias': False})
DEMO_STEM = complete_space_kwargs(**{**AutoformerSpace.preset('demo'), 'conv_stem': 16})


def six_archs(space_kwargs: dict) -> list[dict]:
    """The smallest, the largest, and four drawn archs, which between them differ in depth, width and heads."""
    archs = [extreme_arch(space_kwargs, min), extreme_arch(space_kwargs, max)]
    archs += [sample_arch(space_kwargs, random.Random(seed)) for seed in range(4)]
    for label in ('depth', 'embed_dim', 'num_head_0', 'mlp_ratio_0'):
        assert len({arch[label] for arch in archs}) > 1, label
    return archs


def logits_and_gradients(model, run_arch, arch, images, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward of ``arch``; a parameter without a gradient counts as a zero gradient."""
    run_arch(arch)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same drop-path draws in both: layers run in order, the unused ones last
    logits = model(images)
    logits.square().sum().backward()
    params = model.supernet if isinstance(model, MaskedSupernet) else model
    return logits.detach(), {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                             for name, p in params.named_parameters()}


@pytest.mark.parametrize('space_kwargs', [DEMO, DEMO_OTHER, DEMO_STEM], ids=['demo', 'every-switch-flipped', 'stem'])
def test_logits_and_gradients_equal_the_sliced_supernet_in_float64(space_kwargs):
    torch.manual_seed(0)
    supernet = build_supernet({**space_kwargs, 'drop_path_rate': 0.2}).double().train()
    masked = MaskedSupernet(supernet)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for seed, arch in enumerate(six_archs(space_kwargs)):
        sliced, sliced_grads = logits_and_gradients(supernet, lambda a: set_active_arch(supernet, a), arch, images,
                                                    seed)
        logits, grads = logits_and_gradients(masked, masked.set_arch, arch, images, seed)
        assert max_relative_error(logits, sliced) < 1e-6, arch
        for name, grad in sliced_grads.items():
            if grad.abs().max() == 0:  # a weight the arch does not use: exactly zero, not merely small
                assert grads[name].abs().max() == 0, (name, arch)
            else:
                assert max_relative_error(grads[name], grad) < 1e-6, (name, arch)


@pytest.mark.parametrize('checkpoint', ['small-official.pth', 'small-nnihub.pth'])
def test_the_official_golden_logits_hold(golden, checkpoint):
    space_kwargs, inputs, cases = golden
    supernet = build_supernet(space_kwargs).eval()
    supernet.load_state_dict(AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / checkpoint))
    masked = MaskedSupernet(supernet)
    for case in cases:
        masked.set_arch(case['arch'])
        with torch.no_grad():
            assert max_relative_error(masked(inputs), torch.tensor(case['logits'])) < 1e-4, case['arch']


def test_dynamo_compiles_one_graph_for_every_arch():
    """Training steps (forward and backward) through six archs of different depths, widths and heads: one frame
    compiled, no graph break (``fullgraph``), and no recompile after the first."""
    torch._dynamo.reset()
    masked = MaskedSupernet(build_supernet(DEMO).train())
    counter = CompileCounter()
    compiled = torch.compile(masked, backend=counter, fullgraph=True)
    images = torch.randn(2, 3, 32, 32)
    buffers = {name: buffer.data_ptr() for name, buffer in masked.named_buffers()}
    for arch in six_archs(DEMO):
        masked.set_arch(arch)
        compiled(images).square().sum().backward()
    assert counter.frame_count == 1
    # the arch is written in place: a captured CUDA graph reads the same memory
    assert {name: buffer.data_ptr() for name, buffer in masked.named_buffers()} == buffers


def test_an_arch_outside_the_space_is_refused_and_the_parameters_are_shared():
    supernet = build_supernet(DEMO)
    masked = MaskedSupernet(supernet)
    with pytest.raises(SpaceError, match='embed_dim=100 is outside the space'):
        masked.set_arch({**extreme_arch(DEMO, max), 'embed_dim': 100})
    assert {id(p) for p in masked.parameters()} == {id(p) for p in supernet.parameters()}
    with pytest.raises(SpaceError, match='needs a classifier head'):
        MaskedSupernet(build_supernet({**DEMO, 'num_labels': 0}))


def train_one_epoch(tmp_path, compile: bool, skip_unsampled: bool = False):
    import data
    import samplers
    from lightning import SupernetModule, build_evaluator
    torch.manual_seed(0)
    train = data.build_dataset('digits', None, 'train', 32, training=True)
    val = data.build_dataset('digits', None, 'val', 32)
    module = SupernetModule(DEMO, epochs=1, warmup_epochs=0, steps_per_epoch=len(train) // 64, mixup=0, cutmix=0,
                            compile=compile, skip_unsampled=skip_unsampled)
    trainer_kwargs = dict(accelerator='cpu', devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, default_root_dir=tmp_path, use_distributed_sampler=False,
                          deterministic=True, precision='64-true')
    loaders = (samplers.build_loader(train, 64, 0, drop_last=True, sampler=samplers.RankSampler(train, shuffle=True)),
               samplers.build_loader(val, len(val), 0, sampler=samplers.RankSampler(val, shuffle=False)))  # one size
    supernet = build_supernet({**DEMO, 'drop_path_rate': 0.0})  # no drop path: both runs draw the same numbers
    evaluator = build_evaluator(module, *loaders, trainer_kwargs)
    evaluator.evaluate(supernet)
    return supernet, evaluator.trainer


@pytest.mark.parametrize('skip_unsampled', [False, True], ids=['official', 'skip-unsampled'])
def test_compiled_supernet_training_trains_what_the_sliced_one_does(tmp_path, monkeypatch, skip_unsampled):
    """``--compile`` on the supernet: two graphs (training, validation) for the epoch's many archs, the weights of
    the sliced run (float64: AdamW turns float32's rounding into differences of about 1e-3), with or without
    --skip-unsampled, and the same state dict keys."""
    counter = CompileCounter()
    compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model: compile(model, backend=counter, fullgraph=True))
    torch._dynamo.reset()
    sliced, _ = train_one_epoch(tmp_path / 'sliced', False, skip_unsampled)
    compiled, trainer = train_one_epoch(tmp_path / 'compiled', True, skip_unsampled)
    assert counter.frame_count == 2 and trainer.global_step == 19  # 1,257 training images, batches of 64
    assert list(compiled.state_dict()) == list(sliced.state_dict())
    for name, value in sliced.state_dict().items():
        assert max_relative_error(compiled.state_dict()[name], value) < 1e-6, name


def test_the_arch_buffers_follow_the_supernets_device():
    """Wrapped around a supernet already on a device, the arch buffers are made there (a CUDA supernet would
    otherwise meet CPU masks on its first forward); the meta device stands in for CUDA."""
    masked = MaskedSupernet(build_supernet(DEMO).to('meta'))
    assert {buffer.device.type for buffer in masked.buffers()} == {'meta'}
