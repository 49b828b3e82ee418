"""Two DDP ranks (run by tests/test_training.py under torchrun, gloo on the CPU) where one rank's loss is
non-finite at one step: writes each rank's step count, skipped steps and a digest of its weights to OUTPUT.

    torchrun --nproc_per_node 2 tests/ddp_nonfinite.py OUTPUT
"""
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

import data
import samplers
import engine
from lightning import SupernetModule
from arch import complete_space_kwargs
from space import AutoformerSpace, build_supernet

STEPS, NON_FINITE_STEP = 5, 2


class NonFiniteOnRankOne(SupernetModule):
    def training_step(self, batch, batch_idx):
        images, targets = batch
        if self.global_rank == 1 and self.global_step == NON_FINITE_STEP:
            images = torch.full_like(images, float('nan'))
        return super().training_step((images, targets), batch_idx)


def main(output: str) -> None:
    space = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    train = data.build_dataset('digits', None, 'train', 32, training=True)
    module = NonFiniteOnRankOne(space, epochs=1, warmup_epochs=0, steps_per_epoch=STEPS, mixup=0, cutmix=0)
    module.set_model(build_supernet(space))
    trainer = pl.Trainer(accelerator='cpu', devices=2, strategy=engine.ddp_strategy('gloo'), max_epochs=1,
                         limit_train_batches=STEPS, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=output,
                         use_distributed_sampler=False)
    sampler = samplers.RankSampler(train, shuffle=True)
    trainer.fit(module, samplers.build_loader(train, 16, 0, drop_last=True, sampler=sampler))
    digest = [float(tensor.double().sum()) for tensor in module.model.state_dict().values()]
    Path(output, f'rank-{trainer.global_rank}.json').write_text(json.dumps(
        {'step': trainer.global_step, 'skipped': module.skipped_together, 'digest': digest}))


if __name__ == '__main__':
    main(sys.argv[1])
