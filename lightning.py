"""The Lightning evaluator that trains an AutoFormer supernet (weight entanglement) or one fixed subnet,
DeiT's recipe; the driver that runs it for scratch.py and finetune.py is ``engine.train_supernet``.

Every training step samples one architecture uniformly and updates the slices it uses. The
supernet is NNI's ``RandomOneShot`` mutation of :class:`space.AutoformerSpace`; the sampling is
done here, from ``(seed, step)``, so that every DDP rank trains the same subnet in a step and a
resumed run samples exactly what an uninterrupted one would. Validation reports top-1 of fixed
subnets: the smallest, the largest and, for a preset, the pre-searched one.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import Lightning, LightningModule, Trainer
from pytorch_lightning.plugins.io import TorchCheckpointIO
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, accuracy

import nni_patches  # noqa: F401  its warning filters (NNI's evaluator on Lightning)
from checkpoints import check_finite, load_checked
from space import SEARCHED, AutoformerSpace, extreme_arch, preset_name, sample_arch, set_active_arch
from utils import atomic_torch_save, seed_for

_logger = logging.getLogger(__name__)

# The official run's weight-decay groups (timm 0.3.2's ``add_weight_decay``): no decay for 1-D tensors
# and for the tensors its ``no_weight_decay`` names exactly, the class token and position embedding. Its
# third entry, 'rel_pos_embed', matched no parameter name, so the relative-position tables are decayed
# (``rel_pos_decay=False``, ``--no-rel-pos-decay``, exempts them as the entry meant to).
NO_DECAY = ('cls_token.cls_token', 'pos_embed.pos_embed')


def decays(name: str, param: torch.Tensor, rel_pos_decay: bool = True) -> bool:
    """Whether the parameter ``name`` is in the weight-decay group."""
    if param.ndim <= 1 or name in NO_DECAY:
        return False
    return rel_pos_decay or 'rel_pos_embed' not in name


def validation_archs(space_kwargs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The subnets validation reports: ``min``, ``max`` and, for a preset, ``searched``."""
    archs = {'min': extreme_arch(space_kwargs, min), 'max': extreme_arch(space_kwargs, max)}
    name = preset_name(space_kwargs)
    if name in SEARCHED:
        archs['searched'] = AutoformerSpace.searched_arch(name)
    return archs


class SupernetModule(LightningModule):
    """Trains the supernet set by :meth:`set_model` (NNI's evaluator protocol).

    ``pretrained``: supernet weights (this project's layout) loaded in ``on_fit_start``; without
    ``head.*`` tensors the classifier keeps its fresh initialisation (fine-tuning).
    """

    def __init__(self, space_kwargs: Mapping[str, Any], learning_rate: float = 5e-4, min_lr: float = 1e-5,
                 warmup_lr: float = 1e-6, weight_decay: float = 0.05, epochs: int = 500, warmup_epochs: int = 5,
                 steps_per_epoch: int = 1, smoothing: float = 0.1, mixup: float = 0.8, cutmix: float = 1.0,
                 ema_decay: float = 0.0, rel_pos_decay: bool = True, seed: int = 0,
                 pretrained: Mapping[str, torch.Tensor] | None = None, arch: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=['pretrained'])
        self.space_kwargs = dict(space_kwargs)
        self.arch = dict(arch) if arch else None
        self.val_archs = {'subnet': self.arch} if arch else validation_archs(space_kwargs)
        self.pretrained = pretrained
        num_classes = space_kwargs['num_labels']
        self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                           num_classes=num_classes) if mixup > 0 or cutmix > 0 else None
        self.criterion = SoftTargetCrossEntropy() if self.mixup else \
            LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
        self.ema: ModelEmaV3 | None = None

    def set_model(self, model: nn.Module) -> None:
        super().set_model(model)  # registered as the child ``_model``: Lightning moves, saves and restores it
        if self.hparams.ema_decay > 0:
            self.ema = ModelEmaV3(model, decay=self.hparams.ema_decay)

    def on_fit_start(self) -> None:
        if self.pretrained is not None:
            # only the classifier head may be absent: it keeps its fresh initialisation (fine-tuning)
            load_checked(self.model, self.pretrained, 'the pretrained weights', optional=('head.',))
            if self.ema is not None:
                self.ema.module.load_state_dict(self.model.state_dict())
            self.pretrained = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images, targets = batch
        arch = self.arch
        if arch is None:  # the supernet: one arch a step, the same on every rank, the same after a resume
            arch = sample_arch(self.space_kwargs, random.Random(seed_for(self.hparams.seed, self.global_step)))
            set_active_arch(self.model, arch)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.criterion(self.model(images), targets)
        if not torch.isfinite(loss):
            _logger.error('non-finite loss %s at step %d for arch %s: step skipped', loss.item(), self.global_step,
                          arch)
            return None
        self.log('train_loss', loss, prog_bar=True)
        self.log('lr', self.optimizers().param_groups[0]['lr'], prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def on_validation_epoch_start(self) -> None:
        classes = self.space_kwargs['num_labels']
        self.confusions = {name: torch.zeros(classes * classes, dtype=torch.long, device=self.device)
                           for name in self.val_archs}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        if batch is None:  # no image of this batch could be decoded
            return
        images, targets = batch
        model = self.ema.module if self.ema is not None else self.model
        classes = self.space_kwargs['num_labels']
        for name, arch in self.val_archs.items():
            if self.arch is None:
                set_active_arch(model, arch)
            logits = model(images)
            top1 = accuracy(logits, targets, topk=(1,))[0]
            self.log(f'val_acc_{name}', top1, prog_bar=name != 'searched', sync_dist=True, batch_size=len(targets))
            self.confusions[name] += torch.bincount(targets * classes + logits.argmax(dim=1),
                                                    minlength=classes * classes)

    def on_validation_epoch_end(self) -> None:
        """Balanced accuracy (the mean of the per-class accuracies) beside top-1: on imbalanced data a model
        that predicts the largest classes only scores a high top-1 and a low balanced accuracy."""
        classes = self.space_kwargs['num_labels']
        for name, confusion in self.confusions.items():
            confusion = self.trainer.strategy.reduce(confusion, reduce_op='sum').view(classes, classes)
            per_class_total = confusion.sum(dim=1)
            present = per_class_total > 0
            if present.any():
                balanced = 100 * (confusion.diagonal()[present].double() / per_class_total[present]).mean()
                self.log(f'val_balanced_{name}', balanced.float(), sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if decays(name, param, self.hparams.rel_pos_decay) else no_decay).append(param)
        hp = self.hparams
        # Base lr 1: the schedule gives absolute values (also when the peak lr is 0).
        optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': hp.weight_decay},
                                       {'params': no_decay, 'weight_decay': 0.0}], lr=1.0, fused=True)
        warmup, total = hp.warmup_epochs * hp.steps_per_epoch, max(hp.epochs * hp.steps_per_epoch, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(
            step, warmup, total, hp.learning_rate, hp.warmup_lr, hp.min_lr))
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': schedule, 'interval': 'step'}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        # Plain tensors and tuples only: Lightning restores checkpoints with torch.load(weights_only=True).
        checkpoint['rng'] = {'python': random.getstate(), 'torch': torch.get_rng_state(),
                             'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if 'rng' in checkpoint:
            random.setstate(checkpoint['rng']['python'])
            kind, keys, position, has_gauss, cached = checkpoint['rng']['numpy']
            np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
            torch.set_rng_state(checkpoint['rng']['torch'])
        self.pretrained = None  # a resumed run continues from its own weights


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, lr: float, warmup_lr: float,
                  min_lr: float) -> float:
    """Linear warmup from ``warmup_lr`` to ``lr``, then cosine decay to ``min_lr``, per step."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, fsynced before the rename, and a full disk ends in one clear message."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        check_finite(checkpoint['state_dict'], f'training diverged at epoch {checkpoint["epoch"]} ({Path(path).name} '
                     'not written; lower --learning-rate or set --clip-grad, and --resume from the last checkpoint)')
        atomic_torch_save(checkpoint, path)


def build_evaluator(module: SupernetModule, train_loader, val_loader, trainer_kwargs: Mapping[str, Any],
                    ckpt_path: str | None = None) -> Lightning:
    """NNI's Lightning evaluator around ``module`` (``evaluator.evaluate(supernet)`` trains it)."""
    trainer = Trainer(**trainer_kwargs)
    return Lightning(module, trainer, train_dataloaders=train_loader, val_dataloaders=val_loader,
                     fit_kwargs={'ckpt_path': ckpt_path} if ckpt_path else None)
