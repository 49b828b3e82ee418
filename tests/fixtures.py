"""Helpers of the tests: small on-disk datasets (an ImageFolder tree, a CIFAR-10 folder), an official-layout
checkpoint, a time limit, the two error measures (the golden contract's, and a whole-tensor one for gradients),
an imbalanced folder of grayscale images, and what NNI's web UI shows of an experiment."""
from __future__ import annotations

import pickle
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def write_image_folder(root: str | Path, classes: list[str] | tuple[str, ...], per_class: int,
                       size: int = 16) -> Path:
    """Write ``root/<class>/<i>.png``: ``per_class`` random RGB PNGs of ``size`` px per class; return root."""
    root = Path(root)
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.png')
    return root


# A researcher's own data set in miniature: four classes of grayscale PNGs, the largest 54% of the images.
IMBALANCED_SHARES = {'horizontal': 0.54, 'vertical': 0.25, 'disc': 0.13, 'diagonal': 0.08}


def pattern_image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One noisy grayscale image of a class's pattern: stripes of a random period and phase, or a disc."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period, phase = rng.uniform(size / 6, size / 3), rng.uniform(0, 2 * np.pi)
    if kind == 'disc':
        cy, cx = rng.uniform(size / 3, 2 * size / 3, 2)
        signal = (np.hypot(y - cy, x - cx) < rng.uniform(size / 6, size / 3)).astype(np.float32) * 2 - 1
    else:
        axis = {'horizontal': y, 'vertical': x, 'diagonal': (x + y) / np.sqrt(2)}[kind]
        signal = np.sin(2 * np.pi * axis / period + phase)
    pixels = 128 + rng.uniform(40, 90) * signal + rng.normal(0, 30, (size, size))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_imbalanced_folder(root: str | Path, images: int = 800, size: int = 48, seed: int = 0,
                            splits: dict[str, float] | None = None) -> Path:
    """``root/{train,val}/<class>/<i>.png``: grayscale (mode L) pattern images of ``size`` px, split
    ``splits`` (default 80% train, 20% val) and classes in :data:`IMBALANCED_SHARES`; return root."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, share in (splits or {'train': 0.8, 'val': 0.2}).items():
        for kind, class_share in IMBALANCED_SHARES.items():
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(max(round(images * share * class_share), 2)):
                Image.fromarray(pattern_image(kind, size, rng), mode='L').save(folder / f'{i}.png')
    return root


def write_cifar10(root: str | Path, n_train_per_batch: int, n_test: int) -> Path:
    """Write ``root/cifar-10-batches-py`` in torchvision's format with random images; return that folder."""
    folder = Path(root) / 'cifar-10-batches-py'
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {f'data_batch_{i}': n_train_per_batch for i in range(1, 6)} | {'test_batch': n_test}
    for name, count in batches.items():
        batch = {b'batch_label': name.encode(),
                 b'data': rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b'labels': [int(label) for label in rng.integers(0, 10, count)],
                 b'filenames': [f'{name}_{i}.png'.encode() for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b'label_names': [name.encode() for name in CIFAR_CLASSES], b'num_vis': 3072,
            b'num_cases_per_batch': 10000}
    (folder / 'batches.meta').write_bytes(pickle.dumps(meta))
    return folder


class Timeout(Exception):
    """A call that :func:`within` cut off: it hung."""


def within(seconds: int, function):
    """``function()``, interrupted by SIGALRM with :class:`Timeout` after ``seconds`` (a hang fails a test)."""
    def alarm(*_):
        raise Timeout(f'still running after {seconds} s')
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return function()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The numerical contract with the official code: the largest difference over the largest magnitude."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def norm_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Difference over magnitude of whole tensors (gradients, where single entries may be near zero)."""
    return ((ours - reference).norm() / reference.norm()).item()


def write_idx(path: str | Path, array: np.ndarray, compress: bool = True) -> Path:
    """An IDX file of unsigned bytes (the MNIST format), gzipped when ``compress``."""
    import gzip

    header = (0x800 + array.ndim).to_bytes(4, 'big') + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    content = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = Path(f'{path}.gz' if compress else path)
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def write_fashion_mnist(folder: str | Path, n_train: int, n_test: int, compress: bool = True) -> Path:
    """Fashion-MNIST's four IDX files with random images, labels cycling through the 10 classes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (('train', n_train), ('t10k', n_test)):
        write_idx(folder / f'{prefix}-images-idx3-ubyte', rng.integers(0, 256, (count, 28, 28)), compress)
        write_idx(folder / f'{prefix}-labels-idx1-ubyte', np.arange(count) % 10, compress)
    return folder


def official_tiny_checkpoint(generator):
    """Random weights with the shapes of the released official tiny supernet (256 wide, 4 heads, depth 14)."""
    embed, heads, hidden = 256, 4, 1024

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.05

    model = {'pos_embed': rand(1, 197, embed), 'cls_token': rand(1, 1, embed),
             'patch_embed_super.proj.weight': rand(embed, 3, 16, 16), 'patch_embed_super.proj.bias': rand(embed),
             'norm.weight': 1 + rand(embed), 'norm.bias': rand(embed), 'head.weight': rand(1000, embed),
             'head.bias': rand(1000)}
    for i in range(14):
        block = {'attn.qkv.weight': rand(3 * heads * 64, embed), 'attn.qkv.bias': rand(3 * heads * 64),
                 'attn.proj.weight': rand(embed, heads * 64), 'attn.proj.bias': rand(embed),
                 'attn_layer_norm.weight': 1 + rand(embed), 'attn_layer_norm.bias': rand(embed),
                 'ffn_layer_norm.weight': 1 + rand(embed), 'ffn_layer_norm.bias': rand(embed),
                 'fc1.weight': rand(hidden, embed), 'fc1.bias': rand(hidden), 'fc2.weight': rand(embed, hidden),
                 'fc2.bias': rand(embed)}
        for table in ('k', 'v'):
            for axis in ('v', 'h'):
                block[f'attn.rel_pos_embed_{table}.embeddings_table_{axis}'] = rand(30, 64)
        model.update({f'blocks.{i}.{k}': v for k, v in block.items()})
    return {'model': model, 'epoch': 499}


def web_ui_trials(experiment_id: str, experiments: Path) -> list[tuple[dict, list[float]]]:
    """What NNI's web UI shows of a finished experiment, read through ``nnictl view`` on a free port and its
    REST API: each trial's final metrics and its intermediate results, in order."""
    import json
    import subprocess
    import sys
    import urllib.request

    from conftest import free_port

    port, nnictl = free_port(), str(Path(sys.executable).parent / 'nnictl')

    def rest(path: str) -> Any:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/v1/nni/{path}', timeout=30) as reply:
            return json.loads(reply.read())

    view = [nnictl, 'view', experiment_id, '--port', str(port), '--experiment_dir', str(experiments)]
    if subprocess.run(view, capture_output=True, timeout=120).returncode != 0:
        # NNI 3.0's nnictl gives its manager three seconds to start (nni_patches.patient_check): once more on a
        # loaded machine
        subprocess.run([nnictl, 'stop', '--port', str(port)], capture_output=True, timeout=120)
        subprocess.run(view, check=True, capture_output=True, timeout=120)
    try:
        trials = []
        for trial in rest('trial-jobs'):
            final = json.loads(json.loads(trial['finalMetricData'][0]['data']))
            intermediate = [float(json.loads(json.loads(m['data'])))
                            for m in rest(f"metric-data/{trial['trialJobId']}") if m['type'] == 'PERIODICAL']
            trials.append((final, intermediate))
        return trials
    finally:
        subprocess.run([nnictl, 'stop', '--port', str(port)], capture_output=True, timeout=120)
