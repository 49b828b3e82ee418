"""The Lightning evaluator that trains an AutoFormer supernet (weight entanglement) or one fixed subnet,
DeiT's recipe, with its checkpoints and what a trainer stopped by a signal or a lost DDP peer means; the driver
that runs it for scratch.py and finetune.py is ``engine.train_supernet``.

Every training step samples one architecture uniformly and updates the slices it uses. The supernet is NNI's
``RandomOneShot`` mutation of :class:`space.AutoformerSpace`; the sampling is done here, from ``(seed, step)``, so that
every DDP rank trains the same subnet in a step and a resumed run samples exactly what an uninterrupted one would. The
rest of a step's randomness (data augmentation, Mixup/CutMix, drop path) is drawn per rank, as the official run seeds
each process with ``seed + rank``. Validation reports top-1 of fixed subnets: the smallest, the largest and, for a
preset, the pre-searched one.

Setting the environment variable ``AUTOFORMER_TRACE`` (to anything but empty or 0) makes every rank append
one JSON line per training step to ``<output>/trace/rank-<global rank>.jsonl``: the step, epoch, arch,
Mixup/CutMix lambda and learning rate (what the DDP and multi-node tests compare across ranks and resumes).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import Lightning, LightningModule, Trainer
from pytorch_lightning.plugins.io import TorchCheckpointIO
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, accuracy

import nni_patches  # noqa: F401  its warning filters (NNI's evaluator on Lightning)
from checkpoints import atomic_torch_save, check_finite, load_checked, save_weights
from masked_supernet import MaskedSupernet
from metrics import confusion_counts, running_value
from arch import SEARCHED, extreme_arch, preset_name, sample_arch
from space import AutoformerSpace, set_active_arch
from utils import SCHEDULES, Stopped, UserError, seed_for

_logger = logging.getLogger(__name__)

# The official run's weight-decay groups (timm 0.3.2's ``add_weight_decay``): no decay for 1-D tensors
# and for the tensors its ``no_weight_decay`` names exactly, the class token and position embedding. Its
# third entry, 'rel_pos_embed', matched no parameter name, so the relative-position tables are decayed
# (``rel_pos_decay=False``, ``--no-rel-pos-decay``, exempts them as the entry meant to).
NO_DECAY = ('cls_token.cls_token', 'pos_embed.pos_embed')


class RecordingMixup(Mixup):
    """timm's Mixup/CutMix (per batch, as the official run), keeping the last batch's lambda for the trace."""

    lam: float | None = None

    def _mix_batch(self, x: torch.Tensor) -> float:
        self.lam = super()._mix_batch(x)
        return self.lam


def seed_rank_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device) for one rank's epoch: ``seed + rank`` as the
    official run seeds each process, so ranks draw their own augmentations, Mixup/CutMix and drop-path masks;
    and the epoch, so that a run resumed at an epoch draws what an uninterrupted one would."""
    value = seed_for(seed + rank, epoch)
    random.seed(value)
    np.random.seed(value % 2 ** 32)
    torch.manual_seed(value)


def restore_zero_grads(optimizer: torch.optim.Optimizer) -> None:
    """A zero gradient for every parameter without one that ``optimizer`` has stepped before: what torch 1.7's
    in-place ``zero_grad`` left on them in the official run (see ``SupernetModule.optimizer_zero_grad``)."""
    for group in optimizer.param_groups:
        for param in group['params']:
            if param.grad is None and optimizer.state.get(param):
                param.grad = torch.zeros_like(param)


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
    ``head.*`` tensors the classifier keeps its fresh initialisation (fine-tuning). ``schedule``: ``epoch``, the
    official per-epoch cosine (:func:`official_epoch_lr`), or ``step``, a per-step warmup and cosine
    (:func:`warmup_cosine`). ``skip_unsampled``: AdamW leaves the layers a step's arch did not use alone
    (their gradients are None) instead of decaying them and moving them by momentum as the official run did.
    ``compile``: the supernet's steps run one compiled graph for every arch (:class:`masked_supernet.MaskedSupernet`,
    the same weights and the same results, the largest arch's arithmetic); a fixed subnet is compiled by the driver.
    """

    def __init__(self, space_kwargs: Mapping[str, Any], learning_rate: float = 5e-4, min_lr: float = 1e-5,
                 warmup_lr: float = 1e-6, weight_decay: float = 0.05, epochs: int = 500, warmup_epochs: int = 5,
                 steps_per_epoch: int = 1, smoothing: float = 0.1, mixup: float = 0.8, cutmix: float = 1.0,
                 ema_decay: float = 0.0, rel_pos_decay: bool = True, seed: int = 0, schedule: str = 'epoch',
                 skip_unsampled: bool = False, pretrained: Mapping[str, torch.Tensor] | None = None,
                 arch: Mapping[str, Any] | None = None, compile: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=['pretrained'])
        self.space_kwargs = dict(space_kwargs)
        self.arch = dict(arch) if arch else None
        self.val_archs = {'subnet': self.arch} if arch else validation_archs(space_kwargs)
        self.pretrained = pretrained
        if schedule not in SCHEDULES:
            raise ValueError(f'schedule {schedule!r}: use one of {", ".join(SCHEDULES)}')
        self.mixup = RecordingMixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing,
                                    num_classes=space_kwargs['num_labels']) if mixup > 0 or cutmix > 0 else None
        self.criterion = SoftTargetCrossEntropy() if self.mixup else \
            LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
        self.ema: ModelEmaV3 | None = None
        self.skipping = False  # this step's loss was non-finite on some DDP rank (skip_together)
        self.skipped_together = 0  # steps skipped that way in this run: Lightning counts them
        self.step_arch: dict[str, Any] | None = None  # the arch the supernet trains in this step
        # compile: the supernet with the arch as data, and its compiled graph; set in on_fit_start, outside the
        # module's children (their parameters are the supernet's, saved once under their own names)
        self.graph: MaskedSupernet | None = None
        self.compiled: nn.Module | None = None

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
        if self.hparams.compile and self.arch is None and self.graph is None:
            self.__dict__['graph'] = MaskedSupernet(self.model).to(self.device)
            self.__dict__['compiled'] = torch.compile(self.graph)

    def run_arch(self, arch: Mapping[str, Any], images: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The logits of ``arch`` on ``model`` (default: the supernet trained): through the one compiled graph of
        the supernet trained, or sliced (the EMA copy has no graph)."""
        model = self.model if model is None else model
        if self.graph is not None and model is self.model:
            self.graph.set_arch(arch)
            return self.compiled(images)
        set_active_arch(model, arch)
        return model(images)

    def on_train_epoch_start(self) -> None:
        seed_rank_epoch(self.hparams.seed, self.global_rank, self.current_epoch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images, targets = batch
        arch = self.arch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if arch is None:  # the supernet: one arch a step, the same on every rank, the same after a resume
            arch = sample_arch(self.space_kwargs, random.Random(seed_for(self.hparams.seed, self.global_step)))
            self.step_arch = arch
            logits = self.run_arch(arch, images)
        else:
            logits = self.model(images)
        loss = self.criterion(logits, targets)
        finite = everywhere = bool(torch.isfinite(loss))
        if self.world_size() > 1:  # every rank skips the step if one must (see skip_together)
            everywhere = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not everywhere:
            where = f'non-finite loss {loss.item()}' if not finite else 'a non-finite loss on another rank'
            _logger.error('%s at step %d for arch %s: step skipped', where, self.global_step, arch)
            return self.skip_together(logits)
        lr = self.optimizers().param_groups[0]['lr']
        self.log('train_loss', loss, prog_bar=True)
        self.log('lr', lr, prog_bar=True)
        if os.environ.get('AUTOFORMER_TRACE', '0') not in ('', '0'):
            self._trace(arch, lr, loss)
        return loss

    def skip_together(self, logits: torch.Tensor) -> torch.Tensor | None:
        """A step skipped for a non-finite loss. Alone, Lightning skips it (None: no backward, no optimizer step, no
        step counted). Under DDP that would leave the other ranks waiting in their gradient reduction, and their
        step count, which picks each step's arch, ahead of this rank's: so every rank runs the backward of a zero
        loss and then drops all gradients (``on_before_optimizer_step``), the step counted on all of them alike."""
        if self.world_size() == 1:
            return None
        self.skipping = True
        self.skipped_together += 1
        return logits.sum() * 0.0

    def world_size(self) -> int:
        """The DDP processes training together (1 when no trainer is attached)."""
        return self._trainer.world_size if self._trainer is not None else 1

    def _trace(self, arch: Mapping[str, Any], lr: float, loss: torch.Tensor) -> None:
        """One line of this rank's step trace (see the module docstring)."""
        folder = Path(self.trainer.default_root_dir) / 'trace'
        folder.mkdir(parents=True, exist_ok=True)
        record = {'step': self.global_step, 'epoch': self.current_epoch, 'rank': self.global_rank, 'arch': arch,
                  'lam': self.mixup.lam if self.mixup is not None else None, 'lr': lr, 'loss': loss.item()}
        with open(folder / f'rank-{self.global_rank}.jsonl', 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        # The official run (torch 1.7) zeroed gradients in place: a layer used once keeps a zero gradient,
        # so AdamW decays it and moves it by momentum in every later step, sampled or not. Lightning's
        # default (None) makes AdamW skip it instead: what --skip-unsampled asks for.
        optimizer.zero_grad(set_to_none=self.hparams.skip_unsampled)

    def on_after_backward(self) -> None:
        # The compiled graph gives the layers past the arch's depth a zero gradient where the sliced supernet gives
        # none. AdamW must step them as it does there: never with --skip-unsampled, and by default only once they
        # have been trained (have a state), as restore_zero_grads does; a layer not yet used is not decayed.
        if self.graph is None or self.arch is not None:
            return
        state = self.optimizers().optimizer.state
        for block in self.model.blocks.blocks[self.step_arch['depth']:]:
            for param in block.parameters():
                if self.hparams.skip_unsampled or not state.get(param):
                    param.grad = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.skipping:  # AdamW skips every parameter without a gradient: nothing moves
            self.skipping = False
            optimizer.zero_grad(set_to_none=True)
            return
        # Lightning sets every gradient to None before each validation (on_validation_model_zero_grad), and a
        # checkpoint holds no gradients: either would make AdamW skip a layer the steps since then have not used,
        # so each layer AdamW has stepped before gets its zero gradient back (tests/test_training.py fails without).
        if not self.hparams.skip_unsampled:
            restore_zero_grads(optimizer)

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
        for name, arch in self.val_archs.items():
            logits = model(images) if self.arch is not None else self.run_arch(arch, images, model)
            top1 = accuracy(logits, targets, topk=(1,))[0]
            self.log(f'val_acc_{name}', top1, prog_bar=name != 'searched', sync_dist=True, batch_size=len(targets))
            self.confusions[name] += confusion_counts(targets, logits.argmax(dim=1), self.space_kwargs['num_labels'])

    def on_validation_epoch_end(self) -> None:
        """Balanced accuracy (the mean of the per-class accuracies) beside top-1: on imbalanced data a model
        that predicts the largest classes only scores a high top-1 and a low balanced accuracy."""
        classes = self.space_kwargs['num_labels']
        self.val_confusions = {}  # the last validation's, for the per-class figures in metrics.json
        for name, confusion in self.confusions.items():
            confusion = self.trainer.strategy.reduce(confusion, reduce_op='sum').view(classes, classes)
            self.val_confusions[name] = confusion.cpu()
            if confusion.sum() > 0:
                self.log(f'val_balanced_{name}', running_value(confusion.double(), 'balanced'), sync_dist=False,
                         prog_bar=name != 'searched')

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                decays = param.ndim > 1 and name not in NO_DECAY and (hp.rel_pos_decay or 'rel_pos_embed' not in name)
                (decay if decays else no_decay).append(param)
        # Base lr 1: the schedule gives absolute values (also when the peak lr is 0).
        optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': hp.weight_decay},
                                       {'params': no_decay, 'weight_decay': 0.0}], lr=1.0, fused=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.learning_rate_at(step))
        # Stepped per optimizer step in both schedules: Lightning restores the step count, so a resume
        # continues the schedule exactly (the per-epoch one holds one value through each epoch).
        return {'optimizer': optimizer, 'lr_scheduler': {'scheduler': schedule, 'interval': 'step'}}

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (counted from 0 over the whole run)."""
        hp = self.hparams
        if hp.schedule == 'epoch':
            return official_epoch_lr(step // max(hp.steps_per_epoch, 1), hp.epochs, hp.warmup_epochs,
                                     hp.learning_rate, hp.warmup_lr, hp.min_lr)
        warmup, total = hp.warmup_epochs * hp.steps_per_epoch, max(hp.epochs * hp.steps_per_epoch, 1)
        return warmup_cosine(step, warmup, total, hp.learning_rate, hp.warmup_lr, hp.min_lr)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # No generator state is restored: every epoch reseeds them (on_train_epoch_start).
        self.pretrained = None  # a resumed run continues from its own weights


def official_epoch_lr(epoch: int, epochs: int, warmup_epochs: int, lr: float, warmup_lr: float,
                      min_lr: float) -> float:
    """The learning rate of epoch ``epoch`` (from 0) in the official run: timm's ``CosineLRScheduler`` with
    ``t_initial=epochs`` (the warmup counted in it), ``warmup_t=warmup_epochs``, ``warmup_lr_init=warmup_lr``,
    ``lr_min=min_lr``, one cycle. The official loop (DeiT's) calls ``step(epoch)`` after each epoch, so epoch
    ``e`` trains at the schedule's value for ``e - 1``: epochs 0 and 1 both at ``warmup_lr`` (with a warmup),
    and the last epoch one value above the end of the cosine."""
    t = max(epoch - 1, 0)
    if t < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * t / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


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


def add_checkpoints_and_logger(trainer_kwargs: dict[str, Any], monitor: str, last_checkpoint: Path,
                               logs: Path) -> pl.callbacks.ModelCheckpoint:
    """Checkpoint callbacks, the atomic checkpoint writer and the CSV logger into ``trainer_kwargs``; returns the
    best.ckpt callback (the best epoch by ``monitor``), beside ``last_checkpoint``."""
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=last_checkpoint.parent, filename='best', mode='max',
                                               monitor=monitor)
    # last.ckpt after every epoch: Lightning 2.6's save_last writes it only when the best improved, so a run
    # stopped after epochs without a new best resumed from the last one that had one.
    last = pl.callbacks.ModelCheckpoint(dirpath=last_checkpoint.parent, filename=last_checkpoint.stem,
                                        enable_version_counter=False)
    # The CSV logger starts a new version per (resumed) run: no log is overwritten.
    trainer_kwargs.update(callbacks=[checkpoints, last], plugins=[AtomicCheckpointIO()],
                          logger=pl.loggers.CSVLogger(logs.parent, name=logs.name))
    return checkpoints


def write_best_weights(checkpoints: pl.callbacks.ModelCheckpoint, target: Path, last: Path,
                       space_kwargs: Mapping[str, Any], arch: Mapping[str, Any] | None,
                       described: Mapping[str, Any]) -> dict[str, Any] | None:
    """``target`` (``<kind>-best.pth``): the weights of the epoch with the best validation (``best.ckpt``, by
    balanced accuracy; the EMA weights when they were validated) beside the last epoch's ``last``."""
    path = Path(checkpoints.best_model_path or '')
    if not path.is_file():
        return None
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    state = checkpoint['state_dict']
    prefix = 'ema.module.' if any(key.startswith('ema.module.') for key in state) else '_model.'
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    save_weights(target, weights, space_kwargs, arch=arch, data=described)
    best = {'epoch': checkpoint['epoch'], checkpoints.monitor: float(checkpoints.best_model_score),
            'weights': target.name}
    print(f'wrote {target}: the best epoch by {checkpoints.monitor} (epoch {best["epoch"]}, '
          f'{best[checkpoints.monitor]:.2f}); {last.name} holds the last epoch')
    return best


def raise_if_stopped(trainer: Trainer, output: Path, checkpoints: Path, error: BaseException) -> None:
    """:class:`utils.Stopped` with the command that continues, when Ctrl-C or SIGTERM stopped ``trainer``. On
    SIGTERM sent to the whole process group the loader's workers die too, and their error is this stop as well;
    any other error (Lightning marks the trainer interrupted by it too) is left as it is."""
    sigterm = trainer._signal_connector.received_sigterm
    if not (sigterm or trainer.interrupted and isinstance(error, (KeyboardInterrupt, SystemExit))):
        return
    argv = [arg for arg in sys.argv if arg != '--resume']
    if '--output' not in argv and not any(arg.startswith('--output=') for arg in argv):
        argv += ['--output', str(output)]
    command = ' '.join(shlex.quote(arg) for arg in ['python', *argv, '--resume'])
    name, number = ('SIGTERM', signal.SIGTERM) if sigterm else ('SIGINT', signal.SIGINT)
    raise Stopped(f'training stopped by {name} in epoch {trainer.current_epoch}; the checkpoints of the epochs it '
                  f'finished are in {checkpoints}. Continue with: {command}', 128 + number) from None


def check_ranks_agree(trainer: Trainer, supernet: nn.Module) -> None:
    """Refuse to go on if DDP ranks ended with different weights (compares a digest of every tensor)."""
    digest = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()])
                          for t in supernet.state_dict().values()]).flatten().to(trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(digest)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError('DDP ranks ended with different supernet weights')
    if trainer.is_global_zero:
        print(f'DDP: all {len(gathered)} ranks hold identical supernet weights')


# What gloo (and a lost rendezvous store) raise in the survivors when a process or machine of the run dies.
LOST_PEER = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'NCCL communicator was aborted')


@contextmanager
def lost_peers_reported(processes: int) -> Iterator[None]:
    """Turn the error a DDP rank gets when another rank's process or machine dies (at its next collective, within
    seconds) into one line, instead of a traceback from every surviving process."""
    try:
        yield
    except RuntimeError as err:
        cause = next((phrase for phrase in LOST_PEER if phrase in str(err)), None)
        if processes == 1 or (cause is None and not isinstance(err, torch.distributed.DistNetworkError)):
            raise
        raise UserError(f'lost contact with another training process ({cause or str(err).splitlines()[0]}): a '
                        'machine or process of this run stopped; start the run again on every machine with --resume '
                        'to continue from its last checkpoint') from None


class TimeEstimate(pl.Callback):
    """One line, once, with the time an epoch of training takes and what is left of the run, measured on steps after
    the first two (which warm the caches, and compile with --compile); validation comes on top."""

    def __init__(self, steps_per_epoch: int, epochs: int, steps: int = 10) -> None:
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.steps = min(steps, steps_per_epoch - 3)
        self.start: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.steps < 1 or not trainer.is_global_zero:
            return
        if self.start is None:
            self.start = time.perf_counter() if args[-1] == 2 else None  # args[-1]: the batch's index in its epoch
        elif args[-1] == 2 + self.steps:
            epoch = (time.perf_counter() - self.start) / self.steps * self.steps_per_epoch
            left = self.epochs - trainer.current_epoch
            print(f'\ntime: about {epoch:.0f} s an epoch of training, {epoch * left / 60:.1f} min for the {left} '
                  f'epochs left (measured on {self.steps} steps; validation comes on top)', flush=True)
            self.steps = 0
