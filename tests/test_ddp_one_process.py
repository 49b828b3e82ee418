"""DDP as every multi-process training sets it up (``engine.ddp_strategy``), in one process: gloo on the CPU in
``make test``, NCCL on a GPU where there is one (``bench/gpu.sh``). A step trains one subnet, so the layers past
its depth take no part in the loss; a DDP without the unused-parameter search stops at the first such step."""
from __future__ import annotations

import pytest
import torch

import data
import samplers
import engine
from lightning import SupernetModule, build_evaluator
from arch import complete_space_kwargs
from space import AutoformerSpace, build_supernet

DEMO = complete_space_kwargs(**AutoformerSpace.preset('demo'))
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (bench/gpu.sh runs these)')


@pytest.mark.parametrize('accelerator, backend', [
    ('cpu', 'gloo'),
    pytest.param('gpu', 'nccl', marks=[pytest.mark.cuda, NEEDS_CUDA]),
])
def test_lightning_ddp_in_one_process(tmp_path, accelerator, backend):
    train = data.build_dataset('digits', None, 'train', 32, training=True)
    val = data.build_dataset('digits', None, 'val', 32)
    steps = len(train) // 32
    module = SupernetModule(DEMO, epochs=1, warmup_epochs=0, steps_per_epoch=steps, mixup=0, cutmix=0)
    trainer_kwargs = dict(accelerator=accelerator, devices=1, strategy=engine.ddp_strategy(backend),
                          precision='bf16-mixed' if accelerator == 'gpu' else '32-true', max_epochs=1, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                          use_distributed_sampler=False)
    loaders = (samplers.build_loader(train, 32, 0, drop_last=True, sampler=samplers.RankSampler(train, shuffle=True)),
               samplers.build_loader(val, 32, 0, sampler=samplers.RankSampler(val, shuffle=False)))
    evaluator = build_evaluator(module, *loaders, trainer_kwargs)
    try:
        evaluator.evaluate(build_supernet(DEMO))
        trainer = evaluator.trainer
        assert trainer.global_step == steps and torch.distributed.get_backend() == backend
        assert trainer.strategy.root_device.type == ('cuda' if accelerator == 'gpu' else 'cpu')
        assert trainer.callback_metrics['val_acc_max'] > 10  # above chance (10 classes) after one epoch
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
