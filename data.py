"""Datasets and transforms shared by every script.

``build_dataset(dataset, datapath, split, img_size, training)`` returns a map-style dataset of
``(normalized float tensor CxHxW, int label)`` pairs with a ``.classes`` list; ``build_loader``
wraps one in a DataLoader. Nothing is ever downloaded.

* ``imagenet``: an ImageFolder tree ``datapath/train/<class>/*`` and ``datapath/val/<class>/*``
  (split ``test`` reads ``val``). ``datapath`` may also be one split folder itself
  (``.../imagenet/val``): then every split reads it (``train`` and ``val`` held apart, below).
* ``folder``: any ImageFolder. ``datapath/<split>`` when it exists (``val`` and ``test`` stand in
  for each other when only one exists), else ``datapath`` itself when it has no split folders.
* ``cifar10``: torchvision's on-disk python format; ``datapath`` is ``cifar-10-batches-py`` or
  the folder holding it. ``train`` reads data_batch_1..5; ``val`` and ``test`` read test_batch.
* ``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 10 classes;
  ``datapath`` is ignored). Split once, stratified by class, with
  ``sklearn.model_selection.train_test_split(random_state=0)``: 360 images for test, then 180
  of the remaining 1,437 for val, leaving 1,257 for train.
* ``fashion-mnist``: Zalando's 28x28 clothing images from the release's four IDX files (gzipped or not) in
  ``datapath``, its ``FashionMNIST/raw/`` (torchvision's layout), or without ``datapath`` Debian's
  ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``). ``val`` is a fixed class-balanced
  twelfth of the 60,000 training images (5,000), ``train`` the rest (55,000), ``test`` the 10,000 test images.

Training never validates on its own images: a folder without ``val/`` and ``test/`` (class folders alone, or
``train/`` alone) and an ImageNet split folder given as ``datapath`` hold out a seeded tenth of each class as
``val``, and ``train`` is the rest (:func:`held_out_split`); ``test`` of a folder of class folders is all of it
(what evaluating a folder means).

ImageNet/folder/CIFAR images use ImageNet mean/std and DeiT's transforms (timm
``create_transform``), or at 32 px and below CIFAR's (the whole image, a shifted crop and a mirror); digits
and Fashion-MNIST use mean 0.5 / std 0.5. Image files are decoded to RGB; a file
that cannot be decoded (corrupt, truncated, a decompression bomb) is left out of evaluation and
replaced by the next image in training, counted (``undecodable_count``) and reported by one
warning per process. Entries that are not regular files, and folders reached twice through
symlinks, are left out when the folder is scanned.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import numbers
import os
import pickle
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import auto_augment as timm_auto_augment
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from tqdm import tqdm
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode, v2

from utils import UserError, atomic_torch_save, seed_for, torch_load

DATASETS = ('imagenet', 'cifar10', 'digits', 'fashion-mnist', 'folder')
SPLITS = ('train', 'val', 'test')
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
CIFAR_DIR = 'cifar-10-batches-py'
CIFAR_TRAIN_FILES = tuple(f'data_batch_{i}' for i in range(1, 6))
DIGITS_SPLIT_SIZES = {'train': 1257, 'val': 180, 'test': 360}
# Fashion-MNIST: Debian's dataset-fashion-mnist installs the release's four IDX files here.
FASHION_SYSTEM_PATH = Path('/usr/share/datasets/fashion-mnist')
FASHION_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                 'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
FASHION_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                   'Ankle boot')  # torchvision's FashionMNIST.classes
# The validation split (what training validates and the search ranks on) is one twelfth of the training
# images, class-balanced and fixed (5,000 of 60,000); the 10,000 test images select nothing.
FASHION_VAL_SHARE = 12
# The official repeated augmentation (DeiT's RASampler): each training image 3 times an epoch across the
# DDP ranks, an epoch rounded down to a multiple of 256 images.
REPEATS, REPEAT_ROUND = 3, 256
# Sub-folders of a `folder` dataset read for each split, first found wins; a folder with train/ alone validates on
# images held out of it (:func:`held_out_split`).
_FOLDER_SPLITS = {'train': ('train',), 'val': ('val', 'test', 'train'), 'test': ('test', 'val')}
# Data without validation images of its own validates on this share of each class (at least one image), held out
# of its training images by a hash of each file's path and the seed: the same images in every call and every run.
HELD_OUT_SHARE, HELD_OUT_SEED = 0.1, 0
HELD_OUT_PERCENT = round(100 * HELD_OUT_SHARE)

_AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with the 0-bit case (a black image) that older Pillow gave and Pillow 11 refuses."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# RandAugment's increasing posterize reaches 0 bits at magnitude 10 (m9 + noise): keep DeiT's recipe working.
for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    timm_auto_augment.NAME_TO_OP[_name] = _posterize
# What Pillow raises for corrupt, truncated or non-image files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# The only globals a CIFAR-10 pickle needs (numpy arrays written by Python 2 or 3); anything
# else would run code from the file, so it is refused.
_CIFAR_PICKLE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
}
_EXPECTS = {
    'imagenet': 'the ImageNet folder holding train/ and val/ (one sub-folder per class in each), '
                'or one such split folder itself',
    'folder': 'a folder with one sub-folder of images per class, optionally split into train/ val/ test/',
    'cifar10': f'the folder holding {CIFAR_DIR}/ (torchvision\'s CIFAR-10 python format), or {CIFAR_DIR} itself',
    'fashion-mnist': "the folder holding the four IDX files of Fashion-MNIST (train-images-idx3-ubyte.gz, ...), "
                     "or torchvision's layout (FashionMNIST/raw/)",
}
_logger = logging.getLogger(__name__)


def dataset_name(dataset: str | None, datapath: str | None) -> str:
    """``--dataset``, else what ``datapath`` holds: torchvision's CIFAR-10 folder, else ImageNet; digits
    without a folder."""
    if dataset:
        return dataset
    if not datapath:
        return 'digits'
    return 'cifar10' if (_cifar_folder(Path(datapath).expanduser()) / 'batches.meta').is_file() else 'imagenet'



def build_dataset(dataset: str, datapath: str | os.PathLike | None, split: str, img_size: int,
                  training: bool = False) -> Dataset:
    """The ``split`` of ``dataset`` as ``(normalized CxHxW float tensor, int label)`` pairs, with ``.classes``."""
    _check_dataset(dataset)
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if dataset == 'digits':
        return _digits(split, img_size, training)
    if dataset == 'fashion-mnist':
        return _fashion_mnist(datapath, split, img_size, training)
    root = _datapath(dataset, datapath)
    if dataset == 'cifar10':
        return Cifar10(_cifar_folder(root), split, _cifar_transform(img_size, training))
    images = _split_images(dataset, datapath, split, img_size, training)
    if split != 'test' and carves_validation(dataset, datapath):
        images.keep(held_out_split(images)[split])
    return images


def _split_images(dataset: str, datapath: str | os.PathLike | None, split: str, img_size: int,
                  training: bool) -> SafeImageFolder:
    """Every image of the folder that ``split`` reads, validation images held out of it or not."""
    folder = _split_folder(dataset, _datapath(dataset, datapath), split)
    grayscale = training and img_size > SMALL_IMAGE and profile_folder(dataset, datapath).grayscale
    return _image_folder(folder, _image_transform(img_size, training, grayscale), training)


@dataclass(frozen=True)
class FolderProfile:
    """What the recipe and the space are chosen by: the training images, a typical side in pixels (the
    median of up to :data:`PROFILE_SAMPLES` images' shorter sides) and whether those are all grayscale."""
    train_images: int
    side: int
    grayscale: bool


PROFILE_SAMPLES = 32  # images opened to profile a folder: spread over the classes, read in milliseconds
_GRAYSCALE_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F')


@lru_cache(maxsize=4)
def profile_folder(dataset: str, datapath: str | os.PathLike | None) -> FolderProfile:
    """The :class:`FolderProfile` of an ImageFolder's training split (the file list, not the pixels)."""
    folder = _split_folder(dataset, _datapath(dataset, datapath), 'train')
    per_class = [[os.path.join(folder, name, entry) for entry in sorted(os.listdir(folder / name))
                  if entry.lower().endswith(IMG_EXTENSIONS)] for name in _class_names(folder)]
    files = [path for paths in per_class for path in paths]
    held_out = sum(held_out_count(len(paths)) for paths in per_class) if carves_validation(dataset, datapath) else 0
    sides, modes = [], set()
    for path in files[::max(len(files) // PROFILE_SAMPLES, 1)][:PROFILE_SAMPLES]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
                modes.add(image.mode)
        except _DECODE_ERRORS:
            continue  # counted and reported when the images are read
    if not sides:
        return FolderProfile(len(files) - held_out, 0, False)
    return FolderProfile(len(files) - held_out, int(np.median(sides)), modes <= set(_GRAYSCALE_MODES))


def split_read(dataset: str, datapath: str | os.PathLike | None, split: str) -> str:
    """The split that ``build_dataset(..., split)`` reads: ``split`` itself, or what stands in for it (a
    folder without ``test/`` is tested on ``val/``; CIFAR-10 and ImageNet validate on their test batch or
    ``val/``; data without validation images of its own holds them out of its training images)."""
    if dataset in ('digits', 'fashion-mnist'):
        return split
    if dataset == 'cifar10':
        return 'train' if split == 'train' else 'test'
    root = _datapath(dataset, datapath)
    folder = _split_folder(dataset, root, split)
    if split != 'test' and carves_validation(dataset, datapath):
        if split == 'val':
            return f'the {HELD_OUT_PERCENT}% of each class of {folder} held out for validation (seeded)'
        return f'{folder} less the {HELD_OUT_PERCENT}% of each class held out for validation (seeded)'
    return folder.name if folder != root else f'all of {root} (no split folders)'


def carves_validation(dataset: str, datapath: str | os.PathLike | None) -> bool:
    """Whether training validates on images held out of its training images (:func:`held_out_split`): the data
    has none of its own (a folder without ``val/`` and ``test/``, an ImageNet split folder itself)."""
    if dataset not in ('imagenet', 'folder'):
        return False
    root = _datapath(dataset, datapath)
    if dataset == 'imagenet':
        return _is_split_folder(root)
    return not any((root / name).is_dir() for name in ('val', 'test'))


def held_out_count(images: int) -> int:
    """How many of a class's ``images`` are held out for validation."""
    return max(round(images * HELD_OUT_SHARE), 1)


def held_out_split(images: SafeImageFolder) -> dict[str, list[int]]:
    """The indices of ``images`` as ``val``, :func:`held_out_count` images of each class, and ``train``, the rest.
    Each class holds out its images of the lowest hashes of (seed, path within the folder): the choice depends
    on no other class, no file order and no random generator's version."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(images.targets):
        by_class.setdefault(label, []).append(index)
    val: list[int] = []
    for label, members in sorted(by_class.items()):
        if len(members) < 2:
            raise UserError(f'class {images.classes[label]} has a single image ({images.samples[members[0]][0]}): '
                            'training holds out an image of each class to validate on and would keep none of it; '
                            'add images of it, remove it, or give the data val/ and train/ folders of its own')
        val += sorted(members, key=lambda i: _draw(images.samples[i][0], images.root))[:held_out_count(len(members))]
    held = set(val)
    return {'val': sorted(val), 'train': [i for i in range(len(images.targets)) if i not in held]}


def _draw(path: str, root: str) -> bytes:
    # Within the folder: the same draw wherever the folder is moved or mounted.
    return hashlib.sha256(f'{HELD_OUT_SEED}:{path.removeprefix(root)}'.encode()).digest()


def held_out_note(dataset: str, datapath: str | os.PathLike | None, train_images: int, val_images: int) -> str:
    """The line a training run prints, and records, when :func:`carves_validation`."""
    root = _datapath(dataset, datapath)
    missing = 'val/' if dataset == 'imagenet' else 'val/ or test/'
    return (f'no {missing} in {root}: validating on {val_images} images ({HELD_OUT_PERCENT}% of each class, seeded) '
            f'held out of its {train_images + val_images} images, training on the other {train_images}')


def num_classes(dataset: str, datapath: str | os.PathLike | None) -> int:
    """The number of classes, without scanning the images (cheap even for ImageNet)."""
    _check_dataset(dataset)
    if dataset in ('digits', 'cifar10', 'fashion-mnist'):
        return 10
    return len(class_names(dataset, datapath))


def class_names(dataset: str, datapath: str | os.PathLike | None) -> list[str]:
    """The class names in label order, without scanning the images."""
    _check_dataset(dataset)
    if dataset == 'digits':
        return [str(digit) for digit in range(10)]
    if dataset == 'fashion-mnist':
        return list(FASHION_CLASSES)
    root = _datapath(dataset, datapath)
    if dataset == 'cifar10':
        return _cifar_class_names(_cifar_folder(root))
    return _class_names(next((root / s for s in SPLITS if (root / s).is_dir()), root))


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, drop_last: bool = False,
                 sampler: Sampler | None = None, generator: torch.Generator | None = None) -> DataLoader:
    """Batches of ``dataset`` in ``sampler``'s order (default: as stored); undecodable images left out.
    ``generator`` draws the seed of the worker processes (default: torch's global generator)."""
    if isinstance(dataset, (TensorDataset, CachedSplit)):
        num_workers = 0  # tensors already in memory: worker processes only add start-up and contention
    workers = num_workers > 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      generator=generator,
                      collate_fn=collate_decodable, pin_memory=torch.cuda.is_available(), persistent_workers=workers,
                      # RandAugment on large images is CPU-heavy: keep more batches queued for the GPU.
                      prefetch_factor=4 if workers else None)


class RankSampler(Sampler[int]):
    """The images one DDP rank reads in an epoch, chosen when an epoch starts: the ranks are known only
    once Lightning has started them, after the loaders are made (Lightning's own sharding is off).

    One process: every image once, shuffled from ``(seed, epoch)`` when ``shuffle``. Several: torch's
    ``DistributedSampler``, or with ``repeats`` > 1 timm's ``RepeatAugSampler`` (the official RASampler:
    each chosen image ``repeats`` times across the ranks, so each rank sees its own augmentations of it).
    ``balanced``: an epoch of as many draws as images, each class equally likely (images drawn with
    replacement, by ``(seed, epoch)``), split between the ranks; it replaces the repeats.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, repeats: int = 1, seed: int = 0,
                 balanced: bool = False) -> None:
        self.dataset, self.shuffle, self.repeats, self.seed, self.epoch = dataset, shuffle, repeats, seed, 0
        self.balanced = balanced

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_seed(self) -> int:
        return seed_for(self.seed, self.epoch)

    def _ranks(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _shard(self) -> Sampler[int] | None:
        world, rank = self._ranks()
        if world == 1:
            return None
        if self.shuffle and self.repeats > 1:
            sampler = RepeatAugSampler(self.dataset, num_replicas=world, rank=rank, num_repeats=self.repeats,
                                       selected_round=REPEAT_ROUND)
        else:
            sampler = DistributedSampler(self.dataset, world, rank, shuffle=self.shuffle, seed=self.seed)
        sampler.set_epoch(self._epoch_seed() if self.shuffle else self.epoch)
        return sampler

    def _balanced_draws(self) -> list[int]:
        labels = torch.as_tensor(labels_of(self.dataset))
        weights = 1.0 / torch.bincount(labels).clamp(min=1).double()[labels]
        generator = torch.Generator().manual_seed(self._epoch_seed())
        draws = torch.multinomial(weights, len(labels), replacement=True, generator=generator).tolist()
        world, rank = self._ranks()
        return draws[rank:len(draws) // world * world:world]

    def __iter__(self) -> Iterator[int]:
        if self.balanced:
            return iter(self._balanced_draws())
        shard = self._shard()
        if shard is not None:
            return iter(shard)
        if not self.shuffle:
            return iter(range(len(self.dataset)))
        generator = torch.Generator().manual_seed(self._epoch_seed())
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())

    def __len__(self) -> int:
        if self.balanced:
            world = self._ranks()[0]
            return len(self.dataset) // world
        shard = self._shard()
        return len(shard) if shard is not None else len(self.dataset)


def labels_of(dataset: Dataset) -> list[int]:
    """Every image's label, without reading an image (the label lists the datasets keep)."""
    if isinstance(dataset, TensorDataset):
        return dataset.labels.tolist()
    if isinstance(dataset, torch.utils.data.Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    return list(dataset.targets)


def imbalance(dataset: Dataset) -> tuple[float, float]:
    """The shares (in %) of the largest and the smallest class."""
    counts = torch.bincount(torch.as_tensor(labels_of(dataset)))
    counts = counts[counts > 0].double()
    return 100 * counts.max().item() / counts.sum().item(), 100 * counts.min().item() / counts.sum().item()


def images_per_rank(train_size: int, processes: int, repeats: int) -> int:
    """Training images each of ``processes`` ranks reads in an epoch (what :class:`RankSampler` gives)."""
    if processes == 1:
        return train_size
    if repeats > 1 and train_size >= REPEAT_ROUND:
        return min(train_size // REPEAT_ROUND * REPEAT_ROUND // processes, math.ceil(train_size * repeats / processes))
    return math.ceil(train_size / processes)


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}': use one of {', '.join(DATASETS)}")


def _datapath(dataset: str, datapath: str | os.PathLike | None) -> Path:
    if not datapath:
        raise UserError(f'--dataset {dataset} needs --datapath: {_EXPECTS[dataset]}')
    root = Path(datapath).expanduser()
    if not root.is_dir():
        state = 'is not a folder' if root.exists() else 'does not exist'
        raise UserError(f'--datapath {root} {state}; pass {_EXPECTS[dataset]}')
    return root


def _split_folder(dataset: str, root: Path, split: str) -> Path:
    return _imagenet_split(root, split) if dataset == 'imagenet' else _folder_split(root, split)


def _is_split_folder(root: Path) -> bool:
    """Whether an ImageNet ``datapath`` is one split folder itself, such as imagenet/val."""
    has_splits = (root / 'train').is_dir() or (root / 'val').is_dir()  # never classes named train and val
    return not has_splits and _holds_class_folders(root)


def _imagenet_split(root: Path, split: str) -> Path:
    if _is_split_folder(root):
        return root
    folder = root / ('train' if split == 'train' else 'val')
    if not folder.is_dir():
        raise UserError(f'{root} holds neither {folder.name}/ nor class folders of images: --dataset imagenet '
                        f'needs --datapath to be {_EXPECTS["imagenet"]}')
    return folder


def _folder_split(root: Path, split: str) -> Path:
    for name in _FOLDER_SPLITS[split]:
        if (root / name).is_dir():
            return root / name
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present:  # using root itself would silently treat the split folders as classes
        missing = '/ or '.join(_FOLDER_SPLITS[split])
        raise UserError(f'{root} has {"/, ".join(present)}/ but no {missing}/ folder: add {root / split}/<class>/ '
                        f'with images{_MISSING_SPLIT_ADVICE[split]}')
    return root


# Only train/ and test/ can be missing: val/ falls back to test/ or train/. A test split never holds training images.
_MISSING_SPLIT_ADVICE = {
    'train': f', or point --datapath at a folder of class folders (training then validates on {HELD_OUT_PERCENT}% '
             'of each class, held out of it)',
    'test': ' that training never saw (evaluate.py --split val reads the images training holds out of train/)',
}


def _holds_class_folders(root: Path) -> bool:
    with os.scandir(root) as entries:
        return any(entry.is_dir() and _holds_images(entry.path) for entry in entries)


def _holds_images(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS) for entry in entries)


def _class_names(root: Path) -> list[str]:
    if not root.is_dir():
        raise UserError(f'{root} does not exist; check --datapath')
    with os.scandir(root) as entries:
        names = sorted(entry.name for entry in entries if entry.is_dir())
    if not names:
        raise UserError(f'{root} holds no class folders: put the images of each class in their own '
                        f'sub-folder, e.g. {root / "<class>" / "image.jpg"}')
    return names


def _image_folder(root: Path, transform: Callable, training: bool) -> SafeImageFolder:
    _class_names(root)  # a clear error for a missing folder or one without class folders
    dataset = SafeImageFolder(root, transform, substitute=training)
    counts = np.bincount(dataset.targets, minlength=len(dataset.classes))
    empty = [name for name, count in zip(dataset.classes, counts) if count == 0]
    if empty:
        others = f' (and {len(empty) - 1} more empty class folders)' if len(empty) > 1 else ''
        raise UserError(f'class folder {root / empty[0]} has no images{others}; add images '
                        f'({" ".join(IMG_EXTENSIONS)}) or remove the folder')
    return dataset


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        if image.mode.startswith('I'):
            # 16-bit greyscale: convert('RGB') would clip every value above 255 to white.
            image = image.convert('I').point(lambda value: value / 256).convert('L')
        return image.convert('RGB')


def _class_samples(folder: str, label: int, visited: set[str], class_folders: set[str],
                   odd: list[str]) -> list[tuple[str, int]]:
    """The image files under one class folder, symlinks followed once: a folder already walked (a
    symlink loop) or another class's folder is not entered again, and entries that are not regular
    files (a FIFO named ``pipe.jpg`` would block the loader forever) are left out and listed in ``odd``."""
    samples, stack = [], [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current)
        if real in visited or (current != folder and real in class_folders):
            odd.append(current)
            continue
        visited.add(real)
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    if entry.is_file():
                        samples.append((entry.path, label))
                    else:
                        odd.append(entry.path)
    return sorted(samples)


class SafeImageFolder(ImageFolder):
    """ImageFolder that decodes every image to RGB, never blocks on a file that is not a regular file
    and never walks a folder twice, and deals with files that cannot be decoded in one of two ways:

    * ``substitute=True`` (training): the next decodable sample is returned instead, so that batches
      keep their size;
    * ``substitute=False`` (evaluation): the sample is dropped (``__getitem__`` returns None, which
      :func:`build_loader`'s collate leaves out), so that no image is counted twice.

    Either way the file is flagged in ``undecodable``, a tensor in shared memory that the DataLoader's
    worker processes write too, and one warning per process names the first one.
    """

    def __init__(self, root: Path, transform: Callable, substitute: bool) -> None:
        super().__init__(str(root), transform=transform, loader=_load_rgb, allow_empty=True)
        self.substitute = substitute
        self.undecodable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self._warned = False

    def keep(self, indices: list[int]) -> None:
        """Only the images at ``indices`` (a split held out of the folder, or what it left), before any is read:
        an undecodable training image is then replaced by another of the same split."""
        self.samples = self.imgs = [self.samples[i] for i in indices]
        self.targets = [label for _, label in self.samples]
        self.undecodable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        folders = {name: os.path.join(directory, name) for name in sorted(class_to_idx)}
        class_folders = {os.path.realpath(path) for path in folders.values()}
        visited: set[str] = set()
        odd: list[str] = []
        samples = [sample for name, path in folders.items()
                   for sample in _class_samples(path, class_to_idx[name], visited, class_folders, odd)]
        if odd:
            _logger.warning('left out %d entries of %s that are not image files or are folders already read '
                            '(a FIFO, a broken symlink, a symlink loop or a link to another class), e.g. %s',
                            len(odd), directory, odd[0])
        return samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            path, target = self.samples[position]
            try:
                image = self.loader(path)
            except _DECODE_ERRORS as err:
                self._flag(position, path, err)
                if not self.substitute:
                    return None
                continue
            return self.transform(image), target
        raise UserError(f'no image under {self.root} can be decoded: the files are corrupt or not images')

    @property
    def skipped(self) -> list[str]:
        """The files found undecodable so far, by this process and its DataLoader workers."""
        return [self.samples[i][0] for i in self.undecodable.nonzero().flatten().tolist()]

    def _flag(self, position: int, path: str, err: Exception) -> None:
        if not self._warned:
            self._warned = True
            action = 'replaced by the next image' if self.substitute else 'left out'
            _logger.warning('undecodable image %s (%s: %s) %s; later ones are %s without a warning and counted',
                            path, type(err).__name__, err, action, action)
        self.undecodable[position] = True


def undecodable_count(dataset: Dataset) -> int:
    """How many files of ``dataset`` (or of the dataset a ``Subset`` takes from) were found undecodable."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return int(base.undecodable.sum()) if isinstance(base, SafeImageFolder) else 0


def collate_decodable(samples: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``default_collate`` of the samples that could be decoded; None when none of the batch could."""
    samples = [sample for sample in samples if sample is not None]
    return default_collate(samples) if samples else None


def _train_transform(img_size: int, grayscale: bool = False) -> Callable:
    """The official run's augmentation: RandAugment, random erasing of a quarter of the images with per-pixel
    random values ('pixel', not timm's default 'const'), bicubic resizing. Grayscale images get neither
    RandAugment's colour operations nor colour noise: crops, flips and erasing with grey only."""
    if grayscale:
        return create_transform(img_size, is_training=True, auto_augment=None, color_jitter=None, re_prob=0.25,
                                re_mode='const', re_count=1, interpolation='bicubic')
    return create_transform(img_size, is_training=True, auto_augment=_AUTO_AUGMENT, re_prob=0.25, re_mode='pixel',
                            re_count=1, interpolation='bicubic')


# Inputs this small (CIFAR-sized and below) get the small-image transform: ImageNet's RandomResizedCrop
# (down to 8% of the image) and its centre crop would leave a few pixels of each image.
SMALL_IMAGE = 32


def _image_transform(img_size: int, training: bool, grayscale: bool = False) -> Callable:
    if img_size <= SMALL_IMAGE:
        return _small_image_transform(img_size, training)
    if training:
        return _train_transform(img_size, grayscale)
    # DeiT's eval transform: bicubic resize to int(img_size / 0.875), center crop, normalize.
    return create_transform(img_size, is_training=False, interpolation='bicubic', crop_pct=0.875)


def _small_image_transform(img_size: int, training: bool) -> Callable:
    """CIFAR's recipe: the whole image resized to the input, a crop shifted by up to 1/8 of it and a mirror in
    training (a no-op resize for CIFAR-10 at 32 px)."""
    steps = [transforms.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC)]
    if training:
        steps += [transforms.RandomCrop(img_size, padding=max(img_size // 8, 1)), transforms.RandomHorizontalFlip()]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _cifar_folder(root: Path) -> Path:
    return root / CIFAR_DIR if (root / CIFAR_DIR).is_dir() else root


def _cifar_transform(img_size: int, training: bool) -> Callable:
    if training or img_size <= SMALL_IMAGE:
        return _image_transform(img_size, training)
    # Evaluated upsampled whole: a centre crop would cut the border of an image already 32 px.
    return transforms.Compose([transforms.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return super().find_class(module, name)


def _read_cifar_file(path: Path, *keys: str) -> list[Any]:
    try:
        # latin1 reads the Python 2 pickles that the CIFAR-10 archive ships.
        content = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding='latin1').load()
        content = {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}
        return [content[key] for key in keys]
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f'{path} is not a CIFAR-10 python batch ({type(err).__name__}: {err}); '
                        'extract cifar-10-python.tar.gz again') from None


def _cifar_class_names(folder: Path) -> list[str]:
    """The class names of ``batches.meta`` (bytes in the Python 2 pickles the archive ships)."""
    (names,) = _read_cifar_file(folder / 'batches.meta', 'label_names')
    return [name.decode() if isinstance(name, bytes) else name for name in names]


class Cifar10(Dataset):
    """CIFAR-10 in torchvision's on-disk format, read without torchvision's download/MD5 logic."""

    def __init__(self, folder: Path, split: str, transform: Callable) -> None:
        files = CIFAR_TRAIN_FILES if split == 'train' else ('test_batch',)
        missing = [name for name in files + ('batches.meta',) if not (folder / name).is_file()]
        if missing:
            raise UserError(f'{folder} lacks the CIFAR-10 file(s) {", ".join(missing)}: point --datapath at '
                            f'{_EXPECTS["cifar10"]}, which holds {", ".join(CIFAR_TRAIN_FILES)}, test_batch '
                            'and batches.meta (extracted from cifar-10-python.tar.gz; nothing is downloaded)')
        batches = [_read_cifar_file(folder / name, 'data', 'labels') for name in files]
        pixels = np.concatenate([np.asarray(rows, dtype=np.uint8) for rows, _ in batches])
        self.targets = [label for _, labels in batches for label in labels]
        self.classes = _cifar_class_names(folder)
        if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or len(pixels) != len(self.targets) or not all(
                isinstance(label, numbers.Integral) and 0 <= label < len(self.classes) for label in self.targets):
            raise UserError(f'{folder} is not CIFAR-10 data: its batches need rows of 3072 bytes, one label per row, '
                            f'each below {len(self.classes)}; extract cifar-10-python.tar.gz again')
        self.targets = [int(label) for label in self.targets]
        self.images = np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # NHWC for PIL
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.targets[index]


_load_digits = lru_cache(maxsize=1)(load_digits)


@lru_cache(maxsize=1)
def _digits_indices() -> dict[str, np.ndarray]:
    labels = _load_digits().target
    rest, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_SPLIT_SIZES['test'],
                                  stratify=labels, random_state=0)
    train, val = train_test_split(rest, test_size=DIGITS_SPLIT_SIZES['val'], stratify=labels[rest],
                                  random_state=0)
    return {'train': train, 'val': val, 'test': test}


@lru_cache(maxsize=None)
def _digits_tensors(split: str, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One channel of the split, resized and normalized: Nx1xSxS floats and N labels."""
    digits, index = _load_digits(), _digits_indices()[split]
    images = torch.from_numpy(digits.images[index]).float().div(16).unsqueeze(1)
    images = F.interpolate(images, size=(img_size, img_size), mode='bilinear', antialias=True, align_corners=False)
    return images.sub(0.5).div(0.5), torch.from_numpy(digits.target[index])


def _digits(split: str, img_size: int, training: bool) -> TensorDataset:
    images, labels = _digits_tensors(split, img_size)
    # No flips: digits are not mirror-symmetric. Fill -1 is the normalized black background.
    augment = each_image(v2.RandomAffine(degrees=10, translate=(0.1, 0.1), interpolation=InterpolationMode.BILINEAR,
                                         fill=-1.0)) if training else None
    return TensorDataset(images, labels, augment, [str(digit) for digit in range(10)])


class TensorDataset(Dataset):
    """Small grayscale images held in memory as one normalized Nx1xSxS tensor (shared with the in-process
    cache), returned as 3 channels. ``augment`` maps a training batch (Bx3xSxS) to an augmented copy, drawing
    for each image on its own; the loader fetches whole batches (``__getitems__``), a Python call per image
    cost a sixth of a Fashion-MNIST training step."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: Callable | None,
                 classes: list[str]) -> None:
        self.images, self.labels, self.augment, self.classes = images, labels, augment, list(classes)
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        batch = self.images[indices].repeat(1, 3, 1, 1)  # a copy, so callers cannot alter the cache
        if self.augment:
            batch = self.augment(batch)
        return list(zip(batch.unbind(0), self.labels[indices].tolist()))


def each_image(transform: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch transform that draws ``transform``'s random parameters for every image on its own."""
    return lambda batch: torch.stack([transform(image) for image in batch])


def flip_half(batch: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(len(batch)) < 0.5
    batch[flip] = batch[flip].flip(-1)
    return batch


def fashion_mnist_folder(datapath: str | os.PathLike | None) -> Path:
    """The folder holding Fashion-MNIST's IDX files (each plain or .gz): ``datapath``, its ``FashionMNIST/raw/``
    or ``raw/``; without ``datapath``, Debian's ``/usr/share/datasets/fashion-mnist``."""
    roots = [Path(datapath).expanduser()] if datapath else [FASHION_SYSTEM_PATH]
    if datapath and not roots[0].is_dir():
        state = 'is not a folder' if roots[0].exists() else 'does not exist'
        raise UserError(f'--datapath {roots[0]} {state}; pass {_EXPECTS["fashion-mnist"]}')
    for root in roots:
        for folder in (root, root / 'FashionMNIST' / 'raw', root / 'raw'):
            if all(_idx_file(folder, name) for pair in FASHION_FILES.values() for name in pair):
                return folder
    where = f'--datapath {roots[0]}' if datapath else f'{FASHION_SYSTEM_PATH} (no --datapath given)'
    raise UserError(f'{where} lacks Fashion-MNIST: install it with apt-get install dataset-fashion-mnist, or pass '
                    f'--datapath {_EXPECTS["fashion-mnist"]}; nothing is downloaded')


def _idx_file(folder: Path, name: str) -> Path | None:
    return next((path for path in (folder / name, folder / f'{name}.gz') if path.is_file()), None)


def read_idx(path: Path, dims: int) -> torch.Tensor:
    """An IDX file (the MNIST format; gzipped or not) of unsigned bytes with ``dims`` dimensions, checked."""
    import gzip
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == '.gz' else path.read_bytes()
    except (OSError, EOFError) as err:
        raise UserError(f'{path} cannot be read ({type(err).__name__}: {err}); reinstall dataset-fashion-mnist '
                        'or copy the file again') from None
    header = 4 * (dims + 1)
    magic = int.from_bytes(raw[:4], 'big') if len(raw) >= 4 else None
    shape = [int.from_bytes(raw[4 * (i + 1):4 * (i + 2)], 'big') for i in range(dims)] if len(raw) >= header else []
    if magic != 0x800 + dims or len(raw) != header + math.prod(shape):
        raise UserError(f'{path} is not an IDX file of {dims}-D unsigned bytes of the size its header gives '
                        '(truncated or another file); reinstall dataset-fashion-mnist or copy the file again')
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(*shape)


@lru_cache(maxsize=2)
def _fashion_arrays(folder: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_name, label_name = FASHION_FILES[part]
    images, labels = read_idx(_idx_file(folder, image_name), 3), read_idx(_idx_file(folder, label_name), 1).long()
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or int(labels.max()) >= len(FASHION_CLASSES):
        raise UserError(f'{folder}: the {part} images ({tuple(images.shape)}) and labels ({len(labels)}, up to '
                        f'{int(labels.max())}) are not Fashion-MNIST\'s 28x28 images with one label in 0-9 each')
    return images, labels


def fashion_mnist_indices(labels: torch.Tensor) -> dict[str, list[int]]:
    """The training images split into ``train`` and a fixed class-balanced ``val`` (500 a class of 60,000)."""
    val = balanced_indices(labels.tolist(), len(labels) // FASHION_VAL_SHARE, seed=0)
    held = set(val)
    return {'train': [i for i in range(len(labels)) if i not in held], 'val': val}


@lru_cache(maxsize=4)
def _fashion_tensors(folder: Path, split: str, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _fashion_arrays(folder, 'test' if split == 'test' else 'train')
    if split != 'test':
        index = torch.tensor(fashion_mnist_indices(labels)[split])
        images, labels = images[index], labels[index]
    images = images.float().div(255).unsqueeze(1)
    if img_size != 28:
        images = F.interpolate(images, size=(img_size, img_size), mode='bilinear', antialias=True,
                               align_corners=False)
    return images.sub(0.5).div(0.5), labels


def _fashion_mnist(datapath: str | os.PathLike | None, split: str, img_size: int, training: bool) -> TensorDataset:
    images, labels = _fashion_tensors(fashion_mnist_folder(datapath), split, img_size)
    # A mirror only (clothes are left-right symmetric): shifted crops (padding 4) halved what a short run learns.
    augment = flip_half if training else None
    return TensorDataset(images, labels, augment, list(FASHION_CLASSES))


# --------------------------------------------------------------------------------------------
# The search split, decoded once into a cache every candidate reads
# --------------------------------------------------------------------------------------------

def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the dataset's tensors are normalized with."""
    if dataset in ('digits', 'fashion-mnist'):
        return (0.5,) * 3, (0.5,) * 3
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def description(dataset: str, datapath: str | os.PathLike | None, img_size: int,
                classes: list[str] | None = None) -> dict[str, Any]:
    """What weights files store about their data: the dataset, the class names in label order and the
    evaluation preprocessing, so an exported subnet can be fed and its outputs named without the data."""
    return {'dataset': dataset, 'classes': list(classes) if classes is not None else class_names(dataset, datapath),
            'preprocessing': preprocessing(dataset, img_size)}


def preprocessing(dataset: str, img_size: int) -> dict[str, Any]:
    """How an image becomes the model's input at evaluation, in numbers a deployment can repeat: the
    resize (shorter side to ``resize``, or the whole image to ``resize`` x ``resize`` when ``crop`` is
    None), the centre crop, pixel values scaled to [0, 1], then per-channel ``(x - mean) / std``."""
    mean, std = normalization(dataset)
    steps: dict[str, Any] = {'input_size': img_size, 'channels': 'RGB; grayscale images repeated on 3 channels'}
    if dataset in ('digits', 'fashion-mnist'):
        native = 8 if dataset == 'digits' else 28
        steps.update(resize=img_size, crop=None, interpolation='bilinear (antialiased)',
                     source=f'{native}x{native} grayscale')
    elif img_size <= SMALL_IMAGE or dataset == 'cifar10':
        steps.update(resize=img_size, crop=None, interpolation='bicubic')
    else:  # DeiT's: the shorter side to img_size / 0.875, then the centre crop
        steps.update(resize=int(img_size / 0.875), crop=img_size, interpolation='bicubic')
    return {**steps, 'mean': list(mean), 'std': list(std)}


SEARCH_IMAGES_PER_CLASS = 100  # the paper's subImageNet: 100 training images of each ImageNet class


def search_split(dataset: str, datapath: str | os.PathLike | None, img_size: int, max_images: int | None = None,
                 seed: int = 0) -> Dataset:
    """What search ranks candidates on (eval transform): the validation split of digits and Fashion-MNIST (held
    out of training, never the test set); a folder without ``train/`` as it is; otherwise a fixed
    class-balanced subset of the training split, ``max_images`` in all or 100 per class ("subImageNet")."""
    if dataset in ('digits', 'fashion-mnist'):
        return build_dataset(dataset, datapath, 'val', img_size)
    root = _datapath(dataset, datapath)
    if dataset in ('imagenet', 'folder') and not (root / 'train').is_dir():
        print(f'searching on {root} itself: the top-1 reported for the best candidate is then measured on the '
              'images the search selected it on (optimistic); give the dataset root with train/ to search on '
              'a subset of its training images instead', file=sys.stderr)
        return _split_images(dataset, datapath, 'val', img_size, training=False)  # all of it, none held out
    train = build_dataset(dataset, datapath, 'train', img_size)
    return balanced_subset(train, max_images or SEARCH_IMAGES_PER_CLASS * len(set(train.targets)), seed)


def balanced_subset(dataset: Dataset, max_images: int, seed: int) -> Dataset:
    """A fixed class-balanced subset of ``dataset`` (it has ``targets``): :func:`balanced_indices`."""
    return torch.utils.data.Subset(dataset, balanced_indices(list(dataset.targets), max_images, seed))


def balanced_indices(targets: list[int], max_images: int, seed: int) -> list[int]:
    """At most ``max_images`` indices, the same number from every class, fixed by ``seed``."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    per_class = max(max_images // len(by_class), 1)
    rng = np.random.default_rng(seed)
    chosen = [i for label in sorted(by_class)
              for i in rng.permutation(by_class[label])[:per_class].tolist()]
    return sorted(chosen)


def write_cache(split: Dataset, dataset: str, path: str | os.PathLike, batch_size: int = 256,
                num_workers: int = 0, desc: str = 'caching the search split', shuffle_seed: int | None = None) -> None:
    """Decode and transform ``split`` once into uint8 tensors at the final resolution (atomically).

    The images go straight into one preallocated tensor: subImageNet at 224 px is 15 GB, which
    must not be held twice. ``shuffle_seed``: the images are stored in an order fixed by it rather than the
    split's (class by class for a folder), so that the top-1 over the first batches, the running figure a
    search reports mid-candidate, is a fair estimate of the whole split's.
    """
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization(dataset))
    images = labels = None
    filled = 0
    for decoded in tqdm(build_loader(split, batch_size, num_workers), desc=desc):
        if decoded is None:  # no image of this batch could be decoded
            continue
        batch, targets = decoded
        if images is None:
            images = torch.empty((len(split), *batch.shape[1:]), dtype=torch.uint8)
            labels = torch.empty(len(split), dtype=torch.long)
        images[filled:filled + len(batch)] = (batch * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
        labels[filled:filled + len(batch)] = torch.as_tensor(targets)
        filled += len(batch)
    if images is None:
        raise UserError('no image of the search split could be decoded: check --dataset / --datapath')
    if filled < len(split):
        print(f'{len(split) - filled} undecodable images left out of the search split', file=sys.stderr)
    images, labels = images[:filled], labels[:filled]
    if shuffle_seed is not None:  # in place, one image at a time: a second copy of the split may not fit
        order = torch.randperm(filled, generator=torch.Generator().manual_seed(shuffle_seed))
        images, labels = _permuted(images, order), labels[order]
    atomic_torch_save({'images': images, 'labels': labels, 'mean': normalization(dataset)[0],
                       'std': normalization(dataset)[1]}, path)


def _permuted(images: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``images[order]`` computed in place by following the permutation's cycles (one spare image)."""
    done = torch.zeros(len(order), dtype=torch.bool)
    for start in range(len(order)):
        if done[start]:
            continue
        spare, position = images[start].clone(), start
        while True:  # position takes the image order names for it
            done[position] = True
            source = int(order[position])
            if source == start:
                images[position] = spare
                break
            images[position] = images[source]
            position = source
    return images


def search_split_description(dataset: str, datapath: str | os.PathLike | None, labels: torch.Tensor,
                             max_images: int | None = None) -> str:
    """One line saying what the search split holds and how it relates to training and validation (what a
    search's top-1 is measured on), from the labels of its cache (``max_images``: as for :func:`search_split`)."""
    counts = [n for n in torch.bincount(labels).tolist() if n]
    cap_per_class = max((max_images or SEARCH_IMAGES_PER_CLASS * len(counts)) // len(counts), 1)  # as search_split
    per_class = f'{counts[0]}' if min(counts) == max(counts) else f'{min(counts)} to {max(counts)}'
    held = f'{len(labels)} images, {per_class} per class'
    if dataset in ('digits', 'fashion-mnist'):
        return (f'the search split: the {dataset} validation split ({held}), held out of training; not the '
                'test split')
    if dataset in ('imagenet', 'folder') and not (_datapath(dataset, datapath) / 'train').is_dir():
        return (f'the search split: the --datapath folder itself ({held}), the images the search also selects '
                'on (optimistic)')
    return (f'the search split: training images, up to {cap_per_class} per class ({held}), which the supernet '
            'trained on; not the validation split')


class CachedSplit(Dataset):
    """A split written by :func:`write_cache`: uint8 images normalized on the fly."""

    def __init__(self, path: str | os.PathLike) -> None:
        cache = torch_load(path, 'search data cache', mmap=True)  # the workers of a search share one copy
        self.images, self.labels = cache['images'], cache['labels']
        self.mean = torch.tensor(cache['mean']).view(3, 1, 1) * 255
        self.std = torch.tensor(cache['std']).view(3, 1, 1) * 255
        self._device_copy: tuple[torch.device, tuple[torch.Tensor, ...]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return (self.images[index].float() - self.mean) / self.std, int(self.labels[index])

    def batches(self, batch_size: int, device: torch.device | str | None = None):
        """Whole normalized batches without a DataLoader (no per-sample Python work). On a GPU ``device`` the uint8
        images go there once, for every later candidate too, and are normalized there: the CPU converting a
        224 px split to floats for each candidate would take longer than the GPU evaluating it."""
        images, labels, mean, std = self.images, self.labels, self.mean, self.std
        if device is not None and torch.device(device).type == 'cuda':
            images, labels, mean, std = self._on_device(torch.device(device))
        for start in range(0, len(labels), batch_size):
            yield (images[start:start + batch_size].float() - mean) / std, labels[start:start + batch_size]

    def _on_device(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if self._device_copy is None or self._device_copy[0] != device:
            self._device_copy = device, tuple(t.to(device) for t in (self.images, self.labels, self.mean, self.std))
        return self._device_copy[1]


def check_classes(dataset: str, classes: int, space_kwargs: Mapping[str, Any], what: str = 'model') -> None:
    """Refuse data whose class count is not the model's output count."""
    if classes != space_kwargs['num_labels']:
        raise UserError(f'the {dataset} data has {classes} classes but the {what} has {space_kwargs["num_labels"]} '
                        f'outputs: pass weights trained for this dataset')
