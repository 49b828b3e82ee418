"""DeiT's "train and eval functions": the accuracy loop shared by evaluate.py, the search's candidates
(candidates.py) and study.py, and the training driver of scratch.py and finetune.py, in steps: data, loaders,
the model, the fit, the files written (the LightningModule, its checkpoints and what a stopped trainer means are in
lightning.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import folders
import image_folder
import samplers
from checkpoints import check_finite, load_checked, save_weights
from devices import AUTOCAST, default_precision, set_up_precision
from metrics import confusion_counts, running_value, summarize
from arch import canonical_arch
from outputs import RunFolder
from space import AutoformerSpace, build_supernet, init_weights, set_active_arch
from utils import (COMPILE_ON_CPU, UserError, atomic_write_json, check_output_folder, check_writable,
                   is_first_process, json_form, lock_output, read_json, remove_unfinished_writes)

if TYPE_CHECKING:
    import pytorch_lightning as pl

_logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = 'cpu', progress: bool = True,
             desc: str = 'eval', on_batch: Callable[[int, float], None] | None = None, report_every: int = 1,
             precision: str | None = None, per_image: bool = False, running: str = 'top1') -> dict[str, Any]:
    """What ``model`` does on ``loader`` (see :func:`summarize` for the figures), with images/s (wall time
    from the first batch on), the images evaluated and the undecodable images left out (``skipped``).

    ``on_batch(batch_index, value)`` is called every ``report_every`` batches and after the last (NNI
    intermediate results) with the ``running`` figure of :func:`summarize` (``top1`` or ``balanced``) over the
    batches so far; only those calls wait for the GPU, so batches otherwise overlap.
    ``precision``: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (autocast); default: mixed on CUDA, fp32 else.
    ``per_image``: also ``hits``, whether each image's top-1 is right (a bool tensor in the loader's order),
    what paired comparisons of two models on one test set need.
    """
    device = torch.device(device)
    dtype = AUTOCAST[precision or default_precision(device.type == 'cuda')]
    model.eval().to(device)
    confusion, top5, hits = None, torch.zeros((), dtype=torch.long, device=device), []
    seen, start, reported, index = 0, None, -1, -1
    for index, batch in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        if batch is None:  # no image of this batch could be decoded
            continue
        start = start or time.perf_counter()  # the loader's start-up is not throughput
        images, targets = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        classes = logits.shape[1]
        if confusion is None:
            confusion = torch.zeros(classes * classes, dtype=torch.long, device=device)
        ranked = logits.topk(min(5, classes), dim=1).indices.eq(targets[:, None])  # as timm's accuracy
        confusion += confusion_counts(targets, logits.topk(1, dim=1).indices[:, 0], classes)
        top5 += ranked.any(dim=1).sum()
        if per_image:
            hits.append(ranked[:, 0].cpu())
        seen += len(targets)
        if on_batch is not None and (index + 1) % report_every == 0:
            on_batch(index, running_value(confusion.view(classes, classes), running))
            reported = index
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start if start else 0.0
    skipped = image_folder.undecodable_count(loader.dataset) if isinstance(loader, DataLoader) else 0
    if seen == 0:
        raise UserError('no image of the evaluation data could be decoded' if skipped else
                        'the evaluation data is empty')
    metrics = summarize(confusion.view(classes, classes).cpu(), top5.item())
    if on_batch is not None and reported != index:
        on_batch(index, metrics[running])
    metrics.update(images=seen, skipped=skipped, images_per_s=seen / max(seconds, 1e-9))
    if per_image:
        metrics['hits'] = torch.cat(hits)
    return metrics


@dataclass(frozen=True)
class TrainingRun:
    """What scratch.py and finetune.py ask of one training run: their flags of the same names (see their --help).
    ``learning_rate`` None: ``base_lr`` x global batch / 512, as the official run. ``img_size`` is recorded only
    (the space given beside the run holds the size trained at)."""
    output: Path
    dataset: str
    datapath: str | None
    epochs: int
    warmup: int
    batch_size: int
    learning_rate: float | None
    base_lr: float
    balanced_sampling: bool | None  # None: decided from the data (with_balanced_default)
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
    gpus: int | None  # None: one GPU when CUDA is present, else the CPU
    cpu_processes: int
    num_nodes: int
    num_workers: int
    precision: str | None
    tf32: bool
    resume: bool
    compile: bool


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
    if run.gpus and not use_gpu:
        _logger.warning('--gpus %d asked for but no CUDA GPU is visible: training on the CPU', run.gpus)
    if use_gpu and devices > torch.cuda.device_count():
        raise UserError(f'--gpus {run.gpus}: only {torch.cuda.device_count()} CUDA GPUs are visible on this machine')
    precision = set_up_precision(run.precision, run.tf32, use_gpu, 'training')
    processes = devices * run.num_nodes
    return dict(accelerator='gpu' if use_gpu else 'cpu', devices=devices, num_nodes=run.num_nodes,
                strategy=ddp_strategy() if processes > 1 else 'auto', precision=precision,
                max_epochs=run.epochs, gradient_clip_val=run.clip_grad, deterministic=not use_gpu,
                use_distributed_sampler=False,  # samplers.RankSampler shards (and repeats) itself
                default_root_dir=run.output, log_every_n_steps=10), processes


def ddp_strategy(backend: str | None = None) -> 'pl.strategies.DDPStrategy':
    """DDP as every training uses it: a step trains one subnet, so the layers past its depth take no part in the
    loss and DDP must look for them (else it stops with "parameters that were not used in producing the loss").
    ``backend``: the process group's (default: NCCL on GPUs, gloo on CPUs)."""
    from pytorch_lightning.strategies import DDPStrategy  # here: the search's warm workers never train
    return DDPStrategy(find_unused_parameters=True, process_group_backend=backend)


def training_devices(run: TrainingRun) -> tuple[bool, int]:
    """Whether training runs on CUDA GPUs, and its processes per machine: a GPU each, or ``--cpu-processes``."""
    gpus = int(torch.cuda.is_available()) if run.gpus is None else run.gpus
    use_gpu = gpus > 0 and torch.cuda.is_available()
    return use_gpu, gpus if use_gpu else run.cpu_processes


def check_run_output(folder: RunFolder, resume: bool, fingerprint: Mapping[str, Any]) -> None:
    """An output folder holds one training run: see :func:`utils.check_output_folder`."""
    if resume and not folder.last_checkpoint.is_file():
        raise UserError(f'--resume: no checkpoint {folder.last_checkpoint} to continue from')
    held = [path for path in (folder.last_checkpoint, folder.weights('supernet'), folder.weights('subnet'))
            if path.exists()]  # not run.json: a run refused before its first checkpoint left nothing to keep
    recorded = read_json(folder.record) if folder.record.is_file() else None
    check_output_folder(folder.root, resume, 'a training run', held, recorded, fingerprint)
    if resume:
        remove_unfinished_writes(folder.checkpoints)


# What a resumed run must keep: another batch size or schedule would make one supernet of two recipes.
# (--epochs may change: a resumed run may be extended.)
RECIPE_FLAGS = ('batch_size', 'learning_rate', 'min_lr', 'warmup_lr', 'warmup', 'schedule', 'weight_decay', 'smoothing',
                'mixup', 'cutmix', 'drop_path', 'clip_grad', 'ema_decay', 'img_size', 'rel_pos_decay', 'skip_unsampled',
                'balanced_sampling')


def validate_inherited(space_kwargs: Mapping[str, Any], pretrained: Mapping[str, torch.Tensor],
                       arch: Mapping[str, Any] | None, val_loader: DataLoader) -> dict[str, float]:
    """Validation of the inherited weights before the first epoch, of the archs training validates: the baseline a
    fine-tune improves on (a new classifier head starts at chance)."""
    from lightning import validation_archs

    archs = {'subnet': arch} if arch else validation_archs(space_kwargs)
    model = AutoformerSpace(**space_kwargs).freeze(arch) if arch else build_supernet(space_kwargs)
    load_checked(model, pretrained, 'the pretrained weights', optional=('head.',))
    before = {}
    for name, val_arch in archs.items():
        if arch is None:
            set_active_arch(model, val_arch)
        metrics = evaluate(model, val_loader, progress=False, desc=f'validating {name} before training')
        before[f'val_acc_{name}'], before[f'val_balanced_{name}'] = metrics['top1'], metrics['balanced']
    head = '' if any(key.startswith('head.') for key in pretrained) else ' (a new head: chance level)'
    print('before training, inherited weights' + head + ': '
          + ', '.join(f'{key} {value:.2f}' for key, value in before.items()), flush=True)
    return before


def peak_learning_rate(run: TrainingRun, processes: int) -> float:
    """``--learning-rate`` as given, else the recipe's ``base_lr`` x global batch / 512 (the official rule)."""
    return run.base_lr * run.batch_size * processes / 512 if run.learning_rate is None else run.learning_rate


def run_fingerprint(run: TrainingRun, space_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    use_gpu, devices = training_devices(run)
    recipe = {name: getattr(run, name) for name in RECIPE_FLAGS}
    recipe['learning_rate'] = peak_learning_rate(run, devices * run.num_nodes)
    return {'dataset': run.dataset, 'datapath': str(Path(run.datapath).resolve()) if run.datapath else None,
            'held_out_validation': folders.carves_validation(run.dataset, run.datapath),
            'space': json_form(dict(space_kwargs)), 'seed': run.seed, **recipe,
            'repeated_aug': run.repeated_aug and devices * run.num_nodes > 1,  # what is run, not the flag
            'precision': run.precision or default_precision(use_gpu)}


def with_balanced_default(run: TrainingRun, train_set: Any) -> TrainingRun:
    """``run`` with --balanced-sampling decided: as given, else on for imbalanced classes, said in one line."""
    uneven = samplers.imbalanced(train_set)
    balanced = bool(uneven) if run.balanced_sampling is None else run.balanced_sampling
    if is_first_process():
        if balanced and run.balanced_sampling is None:
            print(f'imbalanced classes ({uneven}): each is drawn equally often (--no-balanced-sampling draws the '
                  'images as they are); the best epoch is chosen by balanced accuracy', flush=True)
        elif balanced:
            largest, smallest = samplers.imbalance(train_set)
            print(f'balanced sampling: each class drawn equally often (the classes hold {smallest:.1f}% to '
                  f'{largest:.1f}% of the training images)', flush=True)
        elif uneven:
            print(f'imbalanced classes ({uneven}), drawn as they are (--no-balanced-sampling): watch the balanced '
                  'accuracy (val_balanced_*), not top-1 alone', flush=True)
    return dataclasses.replace(run, balanced_sampling=balanced)


def check_batches(train_size: int, batch_size: int, processes: int, repeats: int = 1) -> int:
    """Optimizer steps per epoch; refuses a training split smaller than one global batch (no step at all)."""
    per_rank = samplers.images_per_rank(train_size, processes, repeats)
    if per_rank < batch_size:
        global_batch = batch_size * processes
        across = f' ({batch_size} on each of {processes} processes)' if processes > 1 else ''
        if repeats > 1:
            raise UserError(f'the training split has {train_size} images; with repeated augmentation an epoch '
                            f'reads {per_rank * processes} of them (a multiple of {samplers.REPEAT_ROUND}), fewer than '
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
    if not is_first_process():
        return _train(run, space_kwargs, pretrained, arch)
    with lock_output(output, 'a training run'):
        fingerprint = {**run_fingerprint(run, space_kwargs), 'arch': arch and canonical_arch(arch)}
        check_run_output(RunFolder(output), run.resume, fingerprint)
        return _train(run, space_kwargs, pretrained, arch, fingerprint)


def _train(run: TrainingRun, space_kwargs: Mapping[str, Any], pretrained: Mapping[str, torch.Tensor] | None,
           arch: Mapping[str, Any] | None, fingerprint: Mapping[str, Any] | None = None) -> Path:
    import pytorch_lightning as pl  # here: the search's warm workers import this module and never train

    from lightning import SupernetModule, TimeEstimate, add_checkpoints_and_logger, build_evaluator

    folder, kind = RunFolder(Path(run.output)), 'subnet' if arch else 'supernet'
    pl.seed_everything(run.seed, workers=True, verbose=False)
    trainer_kwargs, processes = trainer_settings(run)
    if run.compile and arch is None and trainer_kwargs['accelerator'] == 'cpu' and is_first_process():
        print(COMPILE_ON_CPU.format(what='step'))
    train_set, val_set, held_out = training_data(run, space_kwargs, kind)
    run = with_balanced_default(run, train_set)
    repeats, steps_per_epoch = epoch_plan(run, train_set, processes)
    if fingerprint is not None:
        atomic_write_json(fingerprint, folder.record)
    train_loader, val_loader = training_loaders(run, train_set, val_set, processes, repeats)
    module = SupernetModule(
        space_kwargs, learning_rate=peak_learning_rate(run, processes), min_lr=run.min_lr, warmup_lr=run.warmup_lr,
        weight_decay=run.weight_decay, epochs=run.epochs, warmup_epochs=run.warmup, steps_per_epoch=steps_per_epoch,
        smoothing=run.smoothing, mixup=run.mixup, cutmix=run.cutmix, ema_decay=run.ema_decay or 0.0,
        rel_pos_decay=run.rel_pos_decay, seed=run.seed, schedule=run.schedule, skip_unsampled=run.skip_unsampled,
        pretrained=pretrained, arch=arch, compile=run.compile)
    checkpoints = add_checkpoints_and_logger(trainer_kwargs, 'val_balanced_subnet' if arch else 'val_balanced_max',
                                             folder.last_checkpoint, folder.logs)
    trainer_kwargs['callbacks'].append(TimeEstimate(steps_per_epoch, run.epochs))
    evaluator = build_evaluator(module, train_loader, val_loader, trainer_kwargs,
                                str(folder.last_checkpoint) if run.resume else None)
    before = validate_inherited(space_kwargs, pretrained, arch, val_loader) \
        if pretrained is not None and not run.resume and is_first_process() else None
    supernet = model_to_train(run, space_kwargs, pretrained, arch)
    trainer = fit(evaluator, supernet, module, folder, kind, processes)
    substituted = int(trainer.strategy.reduce(torch.tensor(image_folder.undecodable_count(train_set)), reduce_op='sum'))
    if trainer.is_global_zero:
        described = {**data.description(run.dataset, run.datapath, space_kwargs['img_size'], train_set.classes),
                     **held_out, 'trained_on': data.trained_on(run.dataset, run.datapath)}
        best = save_trained(supernet, module, checkpoints, folder, kind, space_kwargs, arch, described,
                            data.split_read(run.dataset, run.datapath, 'val'))
        per_class = say_per_class(module, train_set.classes)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        atomic_write_json({'epochs': trainer.current_epoch, **metrics, 'per_class': per_class,
                           'classes': list(train_set.classes), 'undecodable_images': substituted,
                           'undecodable_val_images': image_folder.undecodable_count(val_set), **held_out,
                           **({'best': best} if best else {}), **({'before_training': before} if before else {})},
                          folder.metrics)
        if substituted:
            print(f'{substituted} undecodable training images were replaced by the next image (see the warning '
                  'above for the first)', file=sys.stderr)
        print(f'wrote {folder.weights(kind)}; '
              + ', '.join(f'{k} {v:.2f}' for k, v in metrics.items() if k.startswith('val_')))
    leave_process_group(trainer)
    return folder.weights(kind)


def leave_process_group(trainer: Any) -> None:
    """Every rank waits for the first to finish writing, then leaves the process group: a rank whose gloo group was
    torn down at interpreter exit while a peer still used it was aborted ('terminate called without an active
    exception'), failing its launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier('training written')
        torch.distributed.destroy_process_group()


def training_data(run: TrainingRun, space_kwargs: Mapping[str, Any], kind: str) -> tuple[Any, Any, dict[str, str]]:
    """Both splits, checked, and the note on validation images held out of the training images (printed once)."""
    train_set = data.build_dataset(run.dataset, run.datapath, 'train', space_kwargs['img_size'], training=True)
    val_set = data.build_dataset(run.dataset, run.datapath, 'val', space_kwargs['img_size'])
    data.check_classes(run.dataset, len(train_set.classes), space_kwargs, kind)
    if list(val_set.classes) != list(train_set.classes):  # a class missing from val/ would shift every label
        raise UserError(f'the validation classes of {run.dataset} differ from its training classes '
                        f'({len(val_set.classes)} against {len(train_set.classes)}, first difference: '
                        f'{next(iter(set(val_set.classes) ^ set(train_set.classes)), "their order")}): give val/ the '
                        'same class folders as train/')
    held_out = {'validation': folders.held_out_note(run.dataset, run.datapath, len(train_set), len(val_set))} \
        if folders.carves_validation(run.dataset, run.datapath) else {}
    if held_out and is_first_process():
        print(held_out['validation'], flush=True)
    return train_set, val_set, held_out


def epoch_plan(run: TrainingRun, train_set: Any, processes: int) -> tuple[int, int]:
    """The reads of each image an epoch, and the optimizer steps of an epoch."""
    # The official repeated augmentation runs under DDP only; balanced sampling draws its own epoch instead.
    repeats = samplers.REPEATS if run.repeated_aug and processes > 1 and not run.balanced_sampling else 1
    drawn = len(train_set) // processes * processes if run.balanced_sampling else len(train_set)
    steps_per_epoch = check_batches(drawn, run.batch_size, processes, repeats)
    return repeats, steps_per_epoch


def training_loaders(run: TrainingRun, train_set: Any, val_set: Any, processes: int,
                     repeats: int) -> tuple[DataLoader, DataLoader]:
    """This rank's share of the training images, shuffled, and of the validation images, in order."""
    if repeats > 1 and is_first_process():
        print(f'repeated augmentation: {samplers.images_per_rank(len(train_set), processes, repeats) * processes} '
              f'images an epoch across {processes} processes, each {repeats} times (--no-repeated-aug turns it off)')
    # Its own generator: a DataLoader draws a seed from it whenever it starts an epoch's iterator, which Lightning
    # does before the epoch reseeds the generators (lightning.seed_rank_epoch) when a run starts or resumes, and
    # after it otherwise; drawn from torch's global generator, it would shift a resumed run's draws by one.
    train_sampler = samplers.RankSampler(train_set, shuffle=True, repeats=repeats, seed=run.seed,
                                         balanced=run.balanced_sampling)
    train_loader = samplers.build_loader(train_set, run.batch_size, run.num_workers, drop_last=True,
                                         sampler=train_sampler, generator=torch.Generator().manual_seed(run.seed))
    return train_loader, samplers.build_loader(val_set, run.batch_size, run.num_workers,
                                           sampler=samplers.RankSampler(val_set, shuffle=False))


def model_to_train(run: TrainingRun, space_kwargs: Mapping[str, Any], pretrained: Mapping[str, torch.Tensor] | None,
                   arch: Mapping[str, Any] | None) -> nn.Module:
    """The supernet, or the one subnet of ``arch``."""
    training_space = {**space_kwargs, 'drop_path_rate': run.drop_path}
    supernet = AutoformerSpace(**training_space).freeze(arch) if arch else build_supernet(training_space)
    if arch and pretrained is None:  # retrained from scratch: the official init, as the supernet's
        init_weights(supernet)
    if run.compile and arch:  # the supernet compiles its one graph for every arch itself (SupernetModule)
        supernet.compile()  # in place: the state dict keeps its keys, so checkpoints and weights files stay the same
    return supernet


def fit(evaluator: Any, supernet: nn.Module, module: Any, folder: RunFolder, kind: str, processes: int) -> Any:
    """Train; a stop by a signal, a lost DDP peer, no finite step or DDP ranks that disagree end in one error."""
    from lightning import check_ranks_agree, lost_peers_reported, raise_if_stopped

    with lost_peers_reported(processes):
        try:
            evaluator.evaluate(supernet)
        except (SystemExit, KeyboardInterrupt, RuntimeError) as error:  # Lightning's graceful stop on Ctrl-C or SIGTERM
            raise_if_stopped(evaluator.trainer, folder.root, folder.checkpoints, error)
            raise
        trainer = evaluator.trainer
        if trainer.global_step == module.skipped_together:
            raise UserError(f'no training step was taken: every loss was non-finite (see the errors above) or no '
                            f'batch was trained; {folder.weights(kind)} not written')
        if processes > 1:
            check_ranks_agree(trainer, supernet)
    return trainer


def save_trained(supernet: nn.Module, module: Any, checkpoints: Any, folder: RunFolder, kind: str,
                 space_kwargs: Mapping[str, Any], arch: Mapping[str, Any] | None,
                 described: Mapping[str, Any], validated_on: str) -> dict[str, Any] | None:
    """The last epoch's weights (and their EMA average) unless not finite, and the best epoch's (returns its record,
    which says the split it was chosen on: a figure on that split from those weights is optimistic)."""
    from lightning import write_best_weights

    weights, stored_arch = folder.weights(kind), canonical_arch(arch) if arch else None
    check_finite(supernet.state_dict(), f'the trained {kind} (not written to {weights})')
    save_weights(weights, supernet.state_dict(), space_kwargs, arch=stored_arch, data=described)
    if module.ema is not None:
        save_weights(folder.ema_weights(kind), module.ema.module.state_dict(), space_kwargs, arch=stored_arch,
                     data=described)
    best = write_best_weights(checkpoints, folder.weights(f'{kind}-best'), weights, space_kwargs, stored_arch,
                              {**described, 'trained_on': {**described['trained_on'], 'best_chosen_on': validated_on}})
    return best and {**best, 'chosen_on': f'{validated_on} (a figure on it from these weights is optimistic)'}


def say_per_class(module: Any, classes: list[str]) -> dict[str, list[float | None]]:
    """The last epoch's per-class validation top-1 of each validated arch, printed on one line."""
    per_class = {name: summarize(confusion)['per_class']
                 for name, confusion in getattr(module, 'val_confusions', {}).items() if confusion.sum() > 0}
    if per_class:
        print('per-class validation top-1 of the last epoch: ' + '; '.join(
            f'{name}: ' + ', '.join(f'{cls} {acc:.1f}' for cls, acc in zip(classes, accs) if acc is not None)
            for name, accs in per_class.items()))
    return per_class
