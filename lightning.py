"""The Lightning evaluator that trains an AutoFormer supernet (weight entanglement), DeiT's recipe.

Every training step samples one architecture uniformly and updates the slices it uses. The
supernet is NNI's ``RandomOneShot`` mutation of :class:`space.AutoformerSpace`; the sampling is
done here, from ``(seed, step)``, so that every DDP rank trains the same subnet in a step and a
resumed run samples exactly what an uninterrupted one would. Validation reports top-1 of fixed
subnets: the smallest, the largest and, for a preset, the pre-searched one.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import Lightning, LightningModule, Trainer
from pytorch_lightning.plugins.io import TorchCheckpointIO
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, accuracy

from space import SEARCHED, AutoformerSpace, extreme_arch, preset_name, sample_arch, set_active_arch
from utils import (UserError, add_precision_args, atomic_torch_save, atomic_write_json, check_writable,
                   lock_output, remove_unfinished_writes, set_up_precision)

_logger = logging.getLogger(__name__)
# NNI's evaluator asks for traced DataLoaders, which only matter for trials it spawns; training runs here.
warnings.filterwarnings('ignore', message='When using training service to spawn trials')

# Parameters without weight decay besides norms and biases (the official ``no_weight_decay``).
NO_DECAY = ('cls_token', 'pos_embed', 'rel_pos_embed')


def fixed_archs(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The subnets validation reports: ``min``, ``max`` and, for a preset, ``searched``."""
    archs = {'min': extreme_arch(config, min), 'max': extreme_arch(config, max)}
    name = preset_name(config)
    if name in SEARCHED:
        archs['searched'] = AutoformerSpace.searched_arch(name)
    return archs


class SupernetModule(LightningModule):
    """Trains the supernet set by :meth:`set_model` (NNI's evaluator protocol).

    ``pretrained``: supernet weights (this project's layout) loaded in ``on_fit_start``; without
    ``head.*`` tensors the classifier keeps its fresh initialisation (fine-tuning).
    """

    def __init__(self, space_config: Mapping[str, Any], learning_rate: float = 5e-4, min_lr: float = 1e-5,
                 warmup_lr: float = 1e-6, weight_decay: float = 0.05, epochs: int = 500, warmup_epochs: int = 5,
                 steps_per_epoch: int = 1, smoothing: float = 0.1, mixup: float = 0.8, cutmix: float = 1.0,
                 ema_decay: float = 0.0, seed: int = 0,
                 pretrained: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=['pretrained'])
        self.space_config = dict(space_config)
        self.val_archs = fixed_archs(space_config)
        self.pretrained = pretrained
        num_classes = space_config['num_labels']
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
            load_pretrained(self.model, self.pretrained)
            if self.ema is not None:
                self.ema.module.load_state_dict(self.model.state_dict())
            self.pretrained = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images, targets = batch
        arch = sample_arch(self.space_config, random.Random(self.hparams.seed * 1_000_003 + self.global_step))
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

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        if batch is None:  # no image of this batch could be decoded
            return
        images, targets = batch
        model = self.ema.module if self.ema is not None else self.model
        for name, arch in self.val_archs.items():
            set_active_arch(model, arch)
            top1 = accuracy(model(images), targets, topk=(1,))[0]
            self.log(f'val_acc_{name}', top1, prog_bar=name != 'searched', sync_dist=True, batch_size=len(targets))

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 or any(k in name for k in NO_DECAY) else decay).append(param)
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


def load_pretrained(supernet: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load pretrained supernet weights; only the classifier head may be absent (it keeps its fresh init)."""
    own = supernet.state_dict()
    missing = sorted(k for k in own if k not in state_dict and not k.startswith('head.'))
    if missing:
        raise UserError(f'pretrained weights lack tensor {missing[0]} ({len(missing)} missing in all)')
    for key, tensor in state_dict.items():
        if key not in own or own[key].shape != tensor.shape:
            raise UserError(f'pretrained tensor {key} has shape {tuple(tensor.shape)} but the supernet needs '
                            f'{tuple(own[key].shape) if key in own else "no such tensor"}: the weights are for '
                            'another space')
    supernet.load_state_dict(state_dict, strict=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, fsynced before the rename, and a full disk ends in one clear message."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        from space import check_finite
        check_finite(checkpoint['state_dict'], f'training diverged at epoch {checkpoint["epoch"]} ({Path(path).name} '
                     'not written; lower --learning-rate or set --clip-grad, and --resume from the last checkpoint)')
        atomic_torch_save(checkpoint, path)


def build_evaluator(module: SupernetModule, train_loader, val_loader, trainer_kwargs: Mapping[str, Any],
                    ckpt_path: str | None = None) -> Lightning:
    """NNI's Lightning evaluator around ``module`` (``evaluator.evaluate(supernet)`` trains it)."""
    trainer = Trainer(**trainer_kwargs)
    return Lightning(module, trainer, train_dataloaders=train_loader, val_dataloaders=val_loader,
                     fit_kwargs={'ckpt_path': ckpt_path} if ckpt_path else None)


# --------------------------------------------------------------------------------------------
# The training driver shared by scratch.py and finetune.py
# --------------------------------------------------------------------------------------------

def add_training_args(parser: argparse.ArgumentParser, recipe: Mapping[str, Any]) -> None:
    """Training flags with the recipe's defaults (the paper's for ImageNet); seed spellings accepted."""
    def flag(name: str, *aliases: str, **kwargs: Any) -> None:
        dest = name.lstrip('-').replace('-', '_')
        spellings = [name, *aliases, '--' + dest]
        parser.add_argument(*dict.fromkeys(spellings), dest=dest, default=recipe.get(dest), **kwargs)

    flag('--epochs', type=int, help='training epochs')
    flag('--warmup', '--warmup-epochs', type=int, help='linear warmup epochs')
    flag('--learning-rate', '--lr', type=float,
         help='peak learning rate (default: 5e-4 x global batch / 512)')
    flag('--min-lr', type=float, help='final learning rate of the cosine schedule')
    flag('--warmup-lr', type=float, help='learning rate at the start of the warmup')
    flag('--weight-decay', type=float, help='AdamW weight decay (none on norms, biases, position embeddings)')
    flag('--smoothing', type=float, help='label smoothing')
    flag('--mixup', type=float, help='Mixup alpha (0 turns it off)')
    flag('--cutmix', type=float, help='CutMix alpha (0 turns it off)')
    flag('--drop-path', type=float, help='drop path rate of the deepest layer')
    flag('--clip-grad', type=float, help='gradient norm clipping (default: off)')
    flag('--ema-decay', type=float, help='EMA of the supernet weights with this decay (default 0: off)')
    flag('--img-size', type=int, help="input size (default: the space's)")
    parser.add_argument('--gpus', type=int, default=0, help='GPUs per machine (Lightning DDP when more than one)')
    parser.add_argument('--devices', type=int, default=1, help='CPU processes when there is no GPU (DDP, gloo)')
    parser.add_argument('--num-nodes', '--num_nodes', dest='num_nodes', type=int, default=1,
                        help='machines (launched with torchrun or SLURM)')
    add_precision_args(parser)
    parser.add_argument('--resume', action='store_true', help='continue the run in --output from its last checkpoint')
    parser.add_argument('--seed', type=int, default=0, help='random seed (data order, architectures, init)')
    parser.add_argument('--output', default=recipe.get('output'), help='folder for checkpoints, logs and weights')


def check_launcher(num_nodes: int) -> None:
    """Several machines need a launcher that tells each one its rank; without one, every machine would
    wait forever for the others."""
    env = os.environ
    launched = ('TORCHELASTIC_RUN_ID' in env or 'GROUP_RANK' in env or 'SLURM_NTASKS' in env
                or ('NODE_RANK' in env and 'MASTER_ADDR' in env))
    if num_nodes > 1 and not launched:
        raise UserError(f'--num-nodes {num_nodes} needs a launcher on every machine: torchrun --nnodes {num_nodes} '
                        '--node-rank R --master-addr HOST ..., srun under SLURM, or MASTER_ADDR, MASTER_PORT and '
                        'NODE_RANK set on each machine')


def trainer_settings(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Lightning ``Trainer`` keywords for the hardware asked for, and the number of processes."""
    check_launcher(args.num_nodes)
    if args.gpus > 0 and not torch.cuda.is_available():
        _logger.warning('--gpus %d asked for but no CUDA GPU is visible: training on the CPU', args.gpus)
    use_gpu = args.gpus > 0 and torch.cuda.is_available()
    if use_gpu and args.gpus > torch.cuda.device_count():
        raise UserError(f'--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA GPUs are visible on this machine')
    precision = set_up_precision(args, use_gpu, 'training')
    devices = args.gpus if use_gpu else args.devices
    processes = devices * args.num_nodes
    return dict(accelerator='gpu' if use_gpu else 'cpu', devices=devices, num_nodes=args.num_nodes,
                strategy='ddp_find_unused_parameters_true' if processes > 1 else 'auto', precision=precision,
                max_epochs=args.epochs, gradient_clip_val=args.clip_grad, deterministic=not use_gpu,
                default_root_dir=args.output, log_every_n_steps=10), processes


def check_ranks_agree(trainer: pl.Trainer, supernet: nn.Module) -> None:
    """Refuse to go on if DDP ranks ended with different weights (compares a digest of every tensor)."""
    digest = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()])
                          for t in supernet.state_dict().values()]).flatten().to(trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(digest)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError('DDP ranks ended with different supernet weights')
    if trainer.is_global_zero:
        print(f'DDP: all {len(gathered)} ranks hold identical supernet weights')


def is_first_process() -> bool:
    """True in the process a user started, false in the other DDP ranks (Lightning's own launcher,
    torchrun and SLURM all set one of these)."""
    return all(os.environ.get(name, '0') == '0'
               for name in ('RANK', 'LOCAL_RANK', 'NODE_RANK', 'GROUP_RANK', 'SLURM_PROCID'))


def check_run_output(output: Path, resume: bool, fingerprint: Mapping[str, Any]) -> None:
    """An output folder holds one run: refuse another run's results without --resume, and a --resume
    with another dataset or space than the run had."""
    last = output / 'checkpoints' / 'last.ckpt'
    record = output / 'run.json'
    if resume:
        if not last.is_file():
            raise UserError(f'--resume: no checkpoint {last} to continue from')
        recorded = json.loads(record.read_text()) if record.is_file() else fingerprint
        changed = [key for key in fingerprint if recorded.get(key, fingerprint[key]) != fingerprint[key]]
        if changed:
            raise UserError(f'--resume: the run in {output} had another {changed[0]} ({recorded[changed[0]]!r}, now '
                            f'{fingerprint[changed[0]]!r}): resume with the same flags, or choose another --output')
        remove_unfinished_writes(last.parent)
        return
    held = [path for path in (last, output / 'supernet.pth') if path.exists()]  # run.json alone: nothing done
    if held:
        raise UserError(f'{output} already holds a run ({held[0].name}): pass --resume to continue it, or choose '
                        'another --output')


def run_fingerprint(args: argparse.Namespace, space_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    return {'dataset': args.dataset, 'datapath': str(Path(args.datapath).resolve()) if args.datapath else None,
            'space': json.loads(json.dumps(dict(space_kwargs))), 'seed': args.seed}


def check_batches(train_size: int, batch_size: int, processes: int) -> int:
    """Optimizer steps per epoch; refuses a training split smaller than one global batch (no step at all)."""
    global_batch = batch_size * processes
    if train_size < global_batch:
        across = f' ({batch_size} on each of {processes} processes)' if processes > 1 else ''
        raise UserError(f'the training split has {train_size} images, fewer than one batch of {global_batch}'
                        f'{across}: lower --batch-size')
    return train_size // global_batch


def train_supernet(args: argparse.Namespace, space_kwargs: Mapping[str, Any],
                   pretrained: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Train the supernet of ``space_kwargs`` as ``args`` say; return the final supernet weights file."""
    output = Path(args.output)
    check_writable(output)
    if not is_first_process():
        return _train(args, space_kwargs, pretrained)
    with lock_output(output, 'a training run'):
        fingerprint = run_fingerprint(args, space_kwargs)
        check_run_output(output, args.resume, fingerprint)
        return _train(args, space_kwargs, pretrained, fingerprint)


def _train(args: argparse.Namespace, space_kwargs: Mapping[str, Any], pretrained: Mapping[str, torch.Tensor] | None,
           fingerprint: Mapping[str, Any] | None = None) -> Path:
    import data
    from space import build_supernet, check_finite, save_weights

    output = Path(args.output)
    last = output / 'checkpoints' / 'last.ckpt'
    pl.seed_everything(args.seed, workers=True, verbose=False)
    trainer_kwargs, processes = trainer_settings(args)
    train_set = data.build_dataset(args.dataset, args.datapath, 'train', space_kwargs['img_size'], training=True)
    val_set = data.build_dataset(args.dataset, args.datapath, 'val', space_kwargs['img_size'])
    if len(train_set.classes) != space_kwargs['num_labels']:
        raise UserError(f'{args.dataset} has {len(train_set.classes)} classes, the supernet '
                        f'{space_kwargs["num_labels"]}')
    steps_per_epoch = check_batches(len(train_set), args.batch_size, processes)
    if fingerprint is not None:
        atomic_write_json(fingerprint, output / 'run.json')
    train_loader = data.build_loader(train_set, args.batch_size, args.num_workers, shuffle=True, drop_last=True)
    val_loader = data.build_loader(val_set, args.batch_size, args.num_workers)
    global_batch = args.batch_size * processes
    module = SupernetModule(
        space_kwargs, learning_rate=5e-4 * global_batch / 512 if args.learning_rate is None else args.learning_rate,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, weight_decay=args.weight_decay, epochs=args.epochs, warmup_epochs=args.warmup,
        steps_per_epoch=steps_per_epoch, smoothing=args.smoothing, mixup=args.mixup,
        cutmix=args.cutmix, ema_decay=args.ema_decay or 0.0, seed=args.seed, pretrained=pretrained)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=output / 'checkpoints', filename='best', monitor='val_acc_max',
                                               mode='max', save_last=True)
    # The CSV logger starts a new version per (resumed) run: no log is overwritten.
    trainer_kwargs.update(callbacks=[checkpoints], plugins=[AtomicCheckpointIO()],
                          logger=pl.loggers.CSVLogger(output, name='logs'))
    evaluator = build_evaluator(module, train_loader, val_loader, trainer_kwargs, str(last) if args.resume else None)
    supernet = build_supernet({**space_kwargs, 'drop_path_rate': args.drop_path})
    evaluator.evaluate(supernet)
    trainer = evaluator.trainer
    if processes > 1:
        check_ranks_agree(trainer, supernet)
    substituted = int(trainer.strategy.reduce(torch.tensor(data.undecodable_count(train_set)), reduce_op='sum'))
    weights = output / 'supernet.pth'
    if trainer.is_global_zero:
        check_finite(supernet.state_dict(), f'the trained supernet (not written to {weights})')
        save_weights(weights, supernet.state_dict(), space_kwargs)
        if module.ema is not None:
            save_weights(output / 'supernet-ema.pth', module.ema.module.state_dict(), space_kwargs)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        atomic_write_json({'epochs': trainer.current_epoch, **metrics, 'undecodable_images': substituted,
                           'undecodable_val_images': data.undecodable_count(val_set)}, output / 'metrics.json')
        if substituted:
            print(f'{substituted} undecodable training images were replaced by the next image (see the warning '
                  'above for the first)', file=sys.stderr)
        print(f'wrote {weights}; ' + ', '.join(f'{k} {v:.2f}' for k, v in metrics.items() if k.startswith('val_acc')))
    return weights
