"""DeiT's "train and eval functions": the accuracy loop shared by evaluate.py, search.py and the
Lightning validation, the search trial built on it, and the training driver of scratch.py and finetune.py.

The trial lives here, not in search.py: NNI's in-process trials import it by name, and the warm
workers of ``trial.py`` run it for web-UI trials.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import nni
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from checkpoints import check_finite, read_weights, save_weights
from cli import check_classes, check_output_folder
from space import (AutoformerSpace, build_supernet, canonical_arch, count_flops, count_params, init_weights,
                   sub_state_dict, typed_arch)
from trial import record_failure
from utils import (AUTOCAST, UserError, atomic_write_json, atomic_write_text, check_writable, default_precision,
                   json_form, lock_output, pick_device, read_json, remove_unfinished_writes, set_up_precision)

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


# --------------------------------------------------------------------------------------------
# The search trial: one candidate with weights inherited from the supernet
# --------------------------------------------------------------------------------------------

def arch_key(arch: Mapping[str, Any]) -> str:
    """A stable name of an arch (labels of unused layers ignored)."""
    return hashlib.sha1(json.dumps(canonical_arch(arch), sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=2)
def _supernet(weights: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict, meta = read_weights(weights)
    return state_dict, meta['space']


@lru_cache(maxsize=2)
def _search_data(cache: str) -> data.CachedSplit:
    return data.CachedSplit(cache)


INTERMEDIATE_RESULTS = 20  # per candidate at most: the web UI's chart, not one point per batch


def evaluate_arch(arch: Mapping[str, Any], supernet: Mapping[str, torch.Tensor], space_kwargs: Mapping[str, Any],
                  split: data.CachedSplit, output: Path, batch_size: int, device: torch.device,
                  report: Callable[[float], None], precision: str | None = None) -> dict[str, Any]:
    """Top-1 of one subnet (weights inherited from the supernet) on the search split; writes its record.

    A candidate already recorded in ``output`` (a resumed search) is answered from its record.
    """
    start = time.perf_counter()
    key = arch_key(arch)
    record_file = output / 'candidates' / f'{key}.json'
    if record_file.is_file():
        return read_json(record_file)
    model = AutoformerSpace(**space_kwargs).freeze(arch)
    model.load_state_dict(sub_state_dict(supernet, arch))
    every = max(1, -(-len(split) // batch_size) // INTERMEDIATE_RESULTS)
    metrics = evaluate(model, split.batches(batch_size), device, progress=False,
                       on_batch=lambda index, top1: report(top1), report_every=every, precision=precision)
    latency = read_json(latency_file).get(key) \
        if (latency_file := output / 'latency.json').is_file() else None
    record = {'arch': arch, 'params': count_params(arch, **space_kwargs) / 1e6,
              'flops': count_flops(arch, **space_kwargs) / 1e9, 'latency': latency,
              'top1': metrics['top1'], 'seconds': time.perf_counter() - start,
              'finished': time.time()}  # the order candidates finished in: best-so-far curves
    atomic_write_json(record, record_file)
    write_results(output, every_seconds=2.0)
    return record


def final_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """What NNI shows of a candidate: top-1 as the default metric, then its cost."""
    return {'default': record['top1'], 'params': record['params'], 'flops': record['flops'],
            **({'latency': record['latency']} if record['latency'] is not None else {})}


def evaluate_candidate(model: torch.nn.Module, weights: str, cache: str, output: str, batch_size: int,
                       device: str, precision: str | None = None) -> None:
    """NNI trial run in the search's own process (``--engine sequential``): evaluates and reports."""
    supernet, space_kwargs = _supernet(weights)
    arch = typed_arch(nni.get_current_parameter().sample)
    try:
        record = evaluate_arch(arch, supernet, space_kwargs, _search_data(cache), Path(output), batch_size,
                               pick_device(device), nni.report_intermediate_result, precision)
    except Exception as err:
        record_failure({'output': output}, arch_key(arch), f'{type(err).__name__}: {err}')
        raise
    nni.report_final_result(final_metrics(record))


def candidate_server(spec: Mapping[str, Any]) -> Callable[[str, Callable[[dict], None]], None]:
    """What a warm worker (trial.py) runs per candidate: the supernet, the split and the imports stay loaded."""
    supernet, space_kwargs = _supernet(spec['weights'])
    split = _search_data(spec['cache'])
    device = pick_device(spec['device'])
    output = Path(spec['output'])

    def evaluate_parameter(parameter: str, send: Callable[[dict], None]) -> None:
        arch = typed_arch(nni.load(parameter)['parameters'].sample)
        record = evaluate_arch(arch, supernet, space_kwargs, split, output, spec['batch_size'], device,
                               lambda top1: send({'intermediate': top1}), spec.get('precision'))
        send({'final': final_metrics(record)})

    return evaluate_parameter


def read_results(output: Path) -> list[dict]:
    records = [read_json(p) for p in sorted((output / 'candidates').glob('*.json'))]
    return sorted(records, key=lambda r: -r['top1'])


_last_results_write = 0.0


def write_results(output: Path, every_seconds: float = 0.0) -> list[dict]:
    """Every finished candidate as candidates.json and candidates.csv (each written atomically).

    Each candidate's own record is written the moment it finishes; these summaries, which grow
    with the search, are rewritten at most every ``every_seconds`` in one process (and at the end).
    """
    global _last_results_write
    if time.monotonic() - _last_results_write < every_seconds:
        return []
    _last_results_write = time.monotonic()
    records = read_results(output)
    atomic_write_json(records, output / 'candidates.json')
    fields = ['top1', 'params', 'flops', 'latency', 'seconds', 'arch']
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(fields)
    for r in records:
        writer.writerow([json.dumps(r['arch']) if f == 'arch' else '' if r[f] is None else f'{r[f]:.6g}'
                         for f in fields])
    atomic_write_text(buffer.getvalue(), output / 'candidates.csv')
    return records


def pareto_front(records: list[dict]) -> list[dict]:
    """Candidates no other beats on both top-1 and (fewer) params."""
    front, best = [], float('-inf')
    for record in sorted(records, key=lambda r: (r['params'], -r['top1'])):
        if record['top1'] > best:
            front.append(record)
            best = record['top1']
    return front


def plot_pareto(records: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    front = pareto_front(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r['params'] for r in records], [r['top1'] for r in records], s=12, alpha=0.6, label='candidates')
    ax.plot([r['params'] for r in front], [r['top1'] for r in front], 'r.-', label='Pareto front')
    ax.set(xlabel='parameters (M)', ylabel='top-1 (%)', title=title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix('.tmp.png')
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


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


def trainer_settings(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Lightning ``Trainer`` keywords for the hardware asked for, and the number of processes."""
    check_launcher(args.num_nodes)
    use_gpu, devices = training_devices(args)
    if args.gpus > 0 and not use_gpu:
        _logger.warning('--gpus %d asked for but no CUDA GPU is visible: training on the CPU', args.gpus)
    if use_gpu and args.gpus > torch.cuda.device_count():
        raise UserError(f'--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA GPUs are visible on this machine')
    precision = set_up_precision(args, use_gpu, 'training')
    processes = devices * args.num_nodes
    return dict(accelerator='gpu' if use_gpu else 'cpu', devices=devices, num_nodes=args.num_nodes,
                strategy='ddp_find_unused_parameters_true' if processes > 1 else 'auto', precision=precision,
                max_epochs=args.epochs, gradient_clip_val=args.clip_grad, deterministic=not use_gpu,
                use_distributed_sampler=False,  # data.RankSampler shards (and repeats) itself
                default_root_dir=args.output, log_every_n_steps=10), processes


def training_devices(args: argparse.Namespace) -> tuple[bool, int]:
    """Whether training runs on CUDA GPUs, and its processes per machine: a GPU each, or ``--cpu-processes``."""
    use_gpu = args.gpus > 0 and torch.cuda.is_available()
    return use_gpu, args.gpus if use_gpu else args.cpu_processes


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
    """An output folder holds one training run: see :func:`cli.check_output_folder`."""
    last = output / 'checkpoints' / 'last.ckpt'
    if resume and not last.is_file():
        raise UserError(f'--resume: no checkpoint {last} to continue from')
    held = [path for path in (last, output / 'supernet.pth', output / 'subnet.pth') if path.exists()]  # not run.json
    recorded = read_json(output / 'run.json') if (output / 'run.json').is_file() else None
    check_output_folder(output, resume, 'a training run', held, recorded, fingerprint, RECORDED_SINCE)
    if resume:
        remove_unfinished_writes(last.parent)


# What runs did before they recorded these: PyTorch's weight-decay groups exempted the tables, no
# repeated augmentation, the supernet, fp32.
RECORDED_SINCE = {'rel_pos_decay': False, 'repeated_aug': False, 'arch': None, 'precision': '32-true'}

# What a resumed run must keep: another batch size or schedule would make one supernet of two recipes.
# (--epochs may change: a resumed run may be extended.)
RECIPE_FLAGS = ('batch_size', 'learning_rate', 'min_lr', 'warmup_lr', 'warmup', 'weight_decay', 'smoothing', 'mixup',
                'cutmix', 'drop_path', 'clip_grad', 'ema_decay', 'img_size', 'rel_pos_decay')


def run_fingerprint(args: argparse.Namespace, space_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    recipe = {name: getattr(args, name) for name in RECIPE_FLAGS}
    use_gpu, devices = training_devices(args)
    return {'dataset': args.dataset, 'datapath': str(Path(args.datapath).resolve()) if args.datapath else None,
            'space': json_form(dict(space_kwargs)), 'seed': args.seed, **recipe,
            'repeated_aug': args.repeated_aug and devices * args.num_nodes > 1,  # what is run, not the flag
            'precision': args.precision or default_precision(use_gpu)}


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


def train_supernet(args: argparse.Namespace, space_kwargs: Mapping[str, Any],
                   pretrained: Mapping[str, torch.Tensor] | None = None, arch: Mapping[str, Any] | None = None) -> Path:
    """Train the supernet of ``space_kwargs`` as ``args`` say, or with ``arch`` that one subnet (``pretrained``
    then holds its own weights); return the final weights file, ``supernet.pth`` or ``subnet.pth``."""
    output = Path(args.output)
    check_writable(output)
    if args.compile and arch is None:
        raise UserError('--compile needs --arch: the supernet runs another arch every step, so there is no one graph '
                        'to compile')
    if not is_first_process():
        return _train(args, space_kwargs, pretrained, arch)
    with lock_output(output, 'a training run'):
        fingerprint = {**run_fingerprint(args, space_kwargs), 'arch': arch and canonical_arch(arch)}
        check_run_output(output, args.resume, fingerprint)
        return _train(args, space_kwargs, pretrained, arch, fingerprint)


def _train(args: argparse.Namespace, space_kwargs: Mapping[str, Any], pretrained: Mapping[str, torch.Tensor] | None,
           arch: Mapping[str, Any] | None, fingerprint: Mapping[str, Any] | None = None) -> Path:
    import pytorch_lightning as pl  # here: the search's warm workers import this module and never train

    from lightning import AtomicCheckpointIO, SupernetModule, build_evaluator

    output = Path(args.output)
    last = output / 'checkpoints' / 'last.ckpt'
    pl.seed_everything(args.seed, workers=True, verbose=False)
    trainer_kwargs, processes = trainer_settings(args)
    train_set = data.build_dataset(args.dataset, args.datapath, 'train', space_kwargs['img_size'], training=True)
    val_set = data.build_dataset(args.dataset, args.datapath, 'val', space_kwargs['img_size'])
    kind, stored_arch = ('subnet', canonical_arch(arch)) if arch else ('supernet', None)
    check_classes(args.dataset, len(train_set.classes), space_kwargs, kind)
    if list(val_set.classes) != list(train_set.classes):  # a class missing from val/ would shift every label
        raise UserError(f'the validation classes of {args.dataset} differ from its training classes '
                        f'({len(val_set.classes)} against {len(train_set.classes)}, first difference: '
                        f'{next(iter(set(val_set.classes) ^ set(train_set.classes)), "their order")}): give val/ the '
                        'same class folders as train/')
    repeats = data.REPEATS if args.repeated_aug and processes > 1 else 1  # as the official run: under DDP only
    steps_per_epoch = check_batches(len(train_set), args.batch_size, processes, repeats)
    if fingerprint is not None:
        atomic_write_json(fingerprint, output / 'run.json')
    if repeats > 1 and is_first_process():
        print(f'repeated augmentation: {data.images_per_rank(len(train_set), processes, repeats) * processes} '
              f'images an epoch across {processes} processes, each {repeats} times (--no-repeated-aug turns it off)')
    train_loader = data.build_loader(train_set, args.batch_size, args.num_workers, drop_last=True,
                                     sampler=data.RankSampler(train_set, shuffle=True, repeats=repeats, seed=args.seed))
    val_loader = data.build_loader(val_set, args.batch_size, args.num_workers,
                                   sampler=data.RankSampler(val_set, shuffle=False))
    global_batch = args.batch_size * processes
    module = SupernetModule(
        space_kwargs, learning_rate=5e-4 * global_batch / 512 if args.learning_rate is None else args.learning_rate,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, weight_decay=args.weight_decay, epochs=args.epochs, warmup_epochs=args.warmup,
        steps_per_epoch=steps_per_epoch, smoothing=args.smoothing, mixup=args.mixup,
        cutmix=args.cutmix, ema_decay=args.ema_decay or 0.0, rel_pos_decay=args.rel_pos_decay, seed=args.seed,
        pretrained=pretrained, arch=arch)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=output / 'checkpoints', filename='best',
                                               monitor='val_acc_subnet' if arch else 'val_acc_max', mode='max',
                                               save_last=True)
    # The CSV logger starts a new version per (resumed) run: no log is overwritten.
    trainer_kwargs.update(callbacks=[checkpoints], plugins=[AtomicCheckpointIO()],
                          logger=pl.loggers.CSVLogger(output, name='logs'))
    evaluator = build_evaluator(module, train_loader, val_loader, trainer_kwargs, str(last) if args.resume else None)
    training_space = {**space_kwargs, 'drop_path_rate': args.drop_path}
    supernet = AutoformerSpace(**training_space).freeze(arch) if arch else build_supernet(training_space)
    if arch and pretrained is None:  # retrained from scratch: the official init, as the supernet's
        init_weights(supernet)
    if args.compile:
        supernet.compile()  # in place: the state dict keeps its keys, so checkpoints and weights files stay the same
    try:
        evaluator.evaluate(supernet)
    except SystemExit:  # Lightning's graceful shutdown after Ctrl-C; its checkpoints stay
        if evaluator.trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    trainer = evaluator.trainer
    if trainer.global_step == 0:
        raise UserError(f'no training step was taken: every loss was non-finite (see the errors above) or no batch '
                        f'was trained; {output / f"{kind}.pth"} not written')
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
