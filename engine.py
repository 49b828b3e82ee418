"""DeiT's "train and eval functions": the accuracy loop shared by evaluate.py, the search's candidates
(candidates.py) and study.py, and the training driver of scratch.py and finetune.py (the LightningModule it
drives is in lightning.py).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from checkpoints import check_finite, save_weights
from space import AutoformerSpace, build_supernet, canonical_arch, init_weights
from utils import (AUTOCAST, UserError, atomic_write_json, check_output_folder, check_writable, default_precision,
                   json_form, lock_output, read_json, remove_unfinished_writes, set_up_precision)

if TYPE_CHECKING:
    import pytorch_lightning as pl

_logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = 'cpu', progress: bool = True,
             desc: str = 'eval', on_batch: Callable[[int, float], None] | None = None, report_every: int = 1,
             precision: str | None = None) -> dict[str, float]:
    """Top-1 / top-5 (in %) of ``model`` over ``loader``, images/s (wall time from the first batch on), the
    number of images evaluated and of undecodable images left out (``skipped``).

    ``on_batch(batch_index, running_top1)`` is called every ``report_every`` batches and after the last
    (NNI intermediate results); only those calls wait for the GPU, so batches otherwise overlap.
    ``precision``: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (autocast); default: mixed on CUDA, fp32 else.
    """
    device = torch.device(device)
    dtype = AUTOCAST[precision or default_precision(device.type == 'cuda')]
    model.eval().to(device)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    seen, start, reported, index = 0, None, -1, -1
    for index, batch in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        if batch is None:  # no image of this batch could be decoded
            continue
        start = start or time.perf_counter()  # the loader's start-up is not throughput
        images, targets = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        correct += correct_counts(logits, targets)
        seen += len(targets)
        if on_batch is not None and (index + 1) % report_every == 0:
            on_batch(index, 100 * correct[0].item() / seen)
            reported = index
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start if start else 0.0
    skipped = data.undecodable_count(loader.dataset) if isinstance(loader, DataLoader) else 0
    if seen == 0:
        raise UserError('no image of the evaluation data could be decoded' if skipped else
                        'the evaluation data is empty')
    top1, top5 = (100 * count / seen for count in correct.tolist())
    if on_batch is not None and reported != index:
        on_batch(index, top1)
    return {'top1': top1, 'top5': top5, 'images': seen, 'skipped': skipped, 'images_per_s': seen / max(seconds, 1e-9)}


@torch.no_grad()
def correct_per_image(model: nn.Module, batches: Iterable, device: torch.device | str = 'cpu',
                      precision: str | None = None) -> torch.Tensor:
    """Whether ``model``'s top-1 is right, image by image (a bool tensor in ``batches``' order): what paired
    comparisons of two models on one test set need."""
    device = torch.device(device)
    dtype = AUTOCAST[precision or default_precision(device.type == 'cuda')]
    model.eval().to(device)
    hits = []
    for images, targets in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images.to(device, non_blocking=True))
        hits.append(logits.argmax(dim=1).eq(targets.to(device)).cpu())
    if not hits:
        raise UserError('the evaluation data is empty')
    return torch.cat(hits)


def correct_counts(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many of the batch are right in the top 1 and in the top 5 (top k for fewer classes), on the device."""
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


@dataclass(frozen=True)
class TrainingRun:
    """What scratch.py and finetune.py ask of one training run: their flags of the same names (see their --help).
    ``learning_rate`` None: 5e-4 x global batch / 512, as the official run. ``img_size`` is recorded only (the
    space given beside the run holds the size trained at)."""
    output: Path
    dataset: str
    datapath: str | None
    epochs: int
    warmup: int
    batch_size: int
    learning_rate: float | None
    min_lr: float
    warmup_lr: float
    weight_decay: float
    smoothing: float
    mixup: float
    cutmix: float
    drop_path: float
    img_size: int | None
    clip_grad: float | None
    ema_decay: float | None
    rel_pos_decay: bool
    skip_unsampled: bool
    schedule: str
    repeated_aug: bool
    seed: int
    gpus: int
    cpu_processes: int
    num_nodes: int
    num_workers: int
    precision: str | None
    tf32: bool
    resume: bool
    compile: bool


# --------------------------------------------------------------------------------------------
# The training driver shared by scratch.py and finetune.py
# --------------------------------------------------------------------------------------------

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


def trainer_settings(run: TrainingRun) -> tuple[dict[str, Any], int]:
    """Lightning ``Trainer`` keywords for the hardware asked for, and the number of processes."""
    check_launcher(run.num_nodes)
    use_gpu, devices = training_devices(run)
    if run.gpus > 0 and not use_gpu:
        _logger.warning('--gpus %d asked for but no CUDA GPU is visible: training on the CPU', run.gpus)
    if use_gpu and run.gpus > torch.cuda.device_count():
        raise UserError(f'--gpus {run.gpus}: only {torch.cuda.device_count()} CUDA GPUs are visible on this machine')
    precision = set_up_precision(run.precision, run.tf32, use_gpu, 'training')
    processes = devices * run.num_nodes
    return dict(accelerator='gpu' if use_gpu else 'cpu', devices=devices, num_nodes=run.num_nodes,
                strategy='ddp_find_unused_parameters_true' if processes > 1 else 'auto', precision=precision,
                max_epochs=run.epochs, gradient_clip_val=run.clip_grad, deterministic=not use_gpu,
                use_distributed_sampler=False,  # data.RankSampler shards (and repeats) itself
                default_root_dir=run.output, log_every_n_steps=10), processes


def training_devices(run: TrainingRun) -> tuple[bool, int]:
    """Whether training runs on CUDA GPUs, and its processes per machine: a GPU each, or ``--cpu-processes``."""
    use_gpu = run.gpus > 0 and torch.cuda.is_available()
    return use_gpu, run.gpus if use_gpu else run.cpu_processes


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


def check_run_output(output: Path, resume: bool, fingerprint: Mapping[str, Any]) -> None:
    """An output folder holds one training run: see :func:`utils.check_output_folder`."""
    last = output / 'checkpoints' / 'last.ckpt'
    if resume and not last.is_file():
        raise UserError(f'--resume: no checkpoint {last} to continue from')
    held = [path for path in (last, output / 'supernet.pth', output / 'subnet.pth') if path.exists()]  # not run.json
    recorded = read_json(output / 'run.json') if (output / 'run.json').is_file() else None
    check_output_folder(output, resume, 'a training run', held, recorded, fingerprint)
    if resume:
        remove_unfinished_writes(last.parent)


# What a resumed run must keep: another batch size or schedule would make one supernet of two recipes.
# (--epochs may change: a resumed run may be extended.)
RECIPE_FLAGS = ('batch_size', 'learning_rate', 'min_lr', 'warmup_lr', 'warmup', 'schedule', 'weight_decay', 'smoothing',
                'mixup', 'cutmix', 'drop_path', 'clip_grad', 'ema_decay', 'img_size', 'rel_pos_decay', 'skip_unsampled')


def run_fingerprint(run: TrainingRun, space_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    recipe = {name: getattr(run, name) for name in RECIPE_FLAGS}
    use_gpu, devices = training_devices(run)
    return {'dataset': run.dataset, 'datapath': str(Path(run.datapath).resolve()) if run.datapath else None,
            'space': json_form(dict(space_kwargs)), 'seed': run.seed, **recipe,
            'repeated_aug': run.repeated_aug and devices * run.num_nodes > 1,  # what is run, not the flag
            'precision': run.precision or default_precision(use_gpu)}


def check_batches(train_size: int, batch_size: int, processes: int, repeats: int = 1) -> int:
    """Optimizer steps per epoch; refuses a training split smaller than one global batch (no step at all)."""
    per_rank = data.images_per_rank(train_size, processes, repeats)
    if per_rank < batch_size:
        global_batch = batch_size * processes
        across = f' ({batch_size} on each of {processes} processes)' if processes > 1 else ''
        if repeats > 1:
            raise UserError(f'the training split has {train_size} images; with repeated augmentation an epoch '
                            f'reads {per_rank * processes} of them (a multiple of {data.REPEAT_ROUND}), fewer than '
                            f'one batch of {global_batch}{across}: lower --batch-size or pass --no-repeated-aug')
        raise UserError(f'the training split has {train_size} images, fewer than one batch of {global_batch}'
                        f'{across}: lower --batch-size')
    return per_rank // batch_size


def train_supernet(run: TrainingRun, space_kwargs: Mapping[str, Any],
                   pretrained: Mapping[str, torch.Tensor] | None = None, arch: Mapping[str, Any] | None = None) -> Path:
    """Train the supernet of ``space_kwargs`` as ``run`` says, or with ``arch`` that one subnet (``pretrained``
    then holds its own weights); return the final weights file, ``supernet.pth`` or ``subnet.pth``."""
    output = Path(run.output)
    check_writable(output)
    if run.compile and arch is None:
        raise UserError('--compile needs --arch: the supernet runs another arch every step, so there is no one graph '
                        'to compile')
    if not is_first_process():
        return _train(run, space_kwargs, pretrained, arch)
    with lock_output(output, 'a training run'):
        fingerprint = {**run_fingerprint(run, space_kwargs), 'arch': arch and canonical_arch(arch)}
        check_run_output(output, run.resume, fingerprint)
        return _train(run, space_kwargs, pretrained, arch, fingerprint)


def _train(run: TrainingRun, space_kwargs: Mapping[str, Any], pretrained: Mapping[str, torch.Tensor] | None,
           arch: Mapping[str, Any] | None, fingerprint: Mapping[str, Any] | None = None) -> Path:
    import pytorch_lightning as pl  # here: the search's warm workers import this module and never train

    from lightning import AtomicCheckpointIO, SupernetModule, build_evaluator

    output = Path(run.output)
    last = output / 'checkpoints' / 'last.ckpt'
    pl.seed_everything(run.seed, workers=True, verbose=False)
    trainer_kwargs, processes = trainer_settings(run)
    train_set = data.build_dataset(run.dataset, run.datapath, 'train', space_kwargs['img_size'], training=True)
    val_set = data.build_dataset(run.dataset, run.datapath, 'val', space_kwargs['img_size'])
    kind, stored_arch = ('subnet', canonical_arch(arch)) if arch else ('supernet', None)
    data.check_classes(run.dataset, len(train_set.classes), space_kwargs, kind)
    if list(val_set.classes) != list(train_set.classes):  # a class missing from val/ would shift every label
        raise UserError(f'the validation classes of {run.dataset} differ from its training classes '
                        f'({len(val_set.classes)} against {len(train_set.classes)}, first difference: '
                        f'{next(iter(set(val_set.classes) ^ set(train_set.classes)), "their order")}): give val/ the '
                        'same class folders as train/')
    repeats = data.REPEATS if run.repeated_aug and processes > 1 else 1  # as the official run: under DDP only
    steps_per_epoch = check_batches(len(train_set), run.batch_size, processes, repeats)
    if fingerprint is not None:
        atomic_write_json(fingerprint, output / 'run.json')
    if repeats > 1 and is_first_process():
        print(f'repeated augmentation: {data.images_per_rank(len(train_set), processes, repeats) * processes} '
              f'images an epoch across {processes} processes, each {repeats} times (--no-repeated-aug turns it off)')
    # Its own generator: a DataLoader draws a seed from it whenever it starts an epoch's iterator, which Lightning
    # does before the epoch reseeds the generators (lightning.seed_rank_epoch) when a run starts or resumes, and
    # after it otherwise; drawn from torch's global generator, it would shift a resumed run's draws by one.
    train_loader = data.build_loader(train_set, run.batch_size, run.num_workers, drop_last=True,
                                     sampler=data.RankSampler(train_set, shuffle=True, repeats=repeats, seed=run.seed),
                                     generator=torch.Generator().manual_seed(run.seed))
    val_loader = data.build_loader(val_set, run.batch_size, run.num_workers,
                                   sampler=data.RankSampler(val_set, shuffle=False))
    global_batch = run.batch_size * processes
    module = SupernetModule(
        space_kwargs, learning_rate=5e-4 * global_batch / 512 if run.learning_rate is None else run.learning_rate,
        min_lr=run.min_lr,
        warmup_lr=run.warmup_lr, weight_decay=run.weight_decay, epochs=run.epochs, warmup_epochs=run.warmup,
        steps_per_epoch=steps_per_epoch, smoothing=run.smoothing, mixup=run.mixup,
        cutmix=run.cutmix, ema_decay=run.ema_decay or 0.0, rel_pos_decay=run.rel_pos_decay, seed=run.seed,
        schedule=run.schedule, skip_unsampled=run.skip_unsampled, pretrained=pretrained, arch=arch)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=output / 'checkpoints', filename='best',
                                               monitor='val_acc_subnet' if arch else 'val_acc_max', mode='max',
                                               save_last=True)
    # The CSV logger starts a new version per (resumed) run: no log is overwritten.
    trainer_kwargs.update(callbacks=[checkpoints], plugins=[AtomicCheckpointIO()],
                          logger=pl.loggers.CSVLogger(output, name='logs'))
    evaluator = build_evaluator(module, train_loader, val_loader, trainer_kwargs, str(last) if run.resume else None)
    training_space = {**space_kwargs, 'drop_path_rate': run.drop_path}
    supernet = AutoformerSpace(**training_space).freeze(arch) if arch else build_supernet(training_space)
    if arch and pretrained is None:  # retrained from scratch: the official init, as the supernet's
        init_weights(supernet)
    if run.compile:
        supernet.compile()  # in place: the state dict keeps its keys, so checkpoints and weights files stay the same
    with lost_peers_reported(processes):
        try:
            evaluator.evaluate(supernet)
        except SystemExit:  # Lightning's graceful shutdown after Ctrl-C; its checkpoints stay
            if evaluator.trainer.interrupted:
                raise KeyboardInterrupt from None
            raise
        trainer = evaluator.trainer
        if trainer.global_step == 0:
            raise UserError(f'no training step was taken: every loss was non-finite (see the errors above) or no '
                            f'batch was trained; {output / f"{kind}.pth"} not written')
        if processes > 1:
            check_ranks_agree(trainer, supernet)
    substituted = int(trainer.strategy.reduce(torch.tensor(data.undecodable_count(train_set)), reduce_op='sum'))
    weights = output / f'{kind}.pth'
    if trainer.is_global_zero:
        check_finite(supernet.state_dict(), f'the trained {kind} (not written to {weights})')
        save_weights(weights, supernet.state_dict(), space_kwargs, arch=stored_arch)
        if module.ema is not None:
            save_weights(output / f'{kind}-ema.pth', module.ema.module.state_dict(), space_kwargs, arch=stored_arch)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        atomic_write_json({'epochs': trainer.current_epoch, **metrics, 'undecodable_images': substituted,
                           'undecodable_val_images': data.undecodable_count(val_set)}, output / 'metrics.json')
        if substituted:
            print(f'{substituted} undecodable training images were replaced by the next image (see the warning '
                  'above for the first)', file=sys.stderr)
        print(f'wrote {weights}; ' + ', '.join(f'{k} {v:.2f}' for k, v in metrics.items() if k.startswith('val_acc')))
    return weights
