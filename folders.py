"""What a ``--datapath`` holds, read from its files alone (os, Pillow and numpy: the scripts read it while they check
their flags, before torch loads): the dataset it is (:func:`dataset_name`); which folder each split of an ``imagenet``
or ``folder`` dataset reads (``datapath/<split>``, or ``datapath`` itself when it is one ImageNet split folder or a
folder of class folders); whether training validates on images held out of its training images (data without
validation images of its own: a seeded tenth of each class, :func:`carves_validation`); and a folder's profile, which
the recipe and the input size are chosen by. Its images as a dataset are ``image_folder.py``'s.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from utils import UserError

DATASETS = ('imagenet', 'cifar10', 'digits', 'fashion-mnist', 'folder')
CIFAR_DIR = 'cifar-10-batches-py'
# Fashion-MNIST: Debian's dataset-fashion-mnist installs the release's four IDX files here.
FASHION_SYSTEM_PATH = Path('/usr/share/datasets/fashion-mnist')
FASHION_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                 'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
WORDNET_ID = re.compile(r'n\d{8}')  # ImageNet's class folders, e.g. n01440764

SPLITS = ('train', 'val', 'test')
# Sub-folders of a `folder` dataset read for each split, first found wins; a folder with train/ alone validates on
# images held out of it (``image_folder.held_out_split``).
_FOLDER_SPLITS = {'train': ('train',), 'val': ('val', 'test', 'train'), 'test': ('test', 'val')}
# Data without validation images of its own validates on this share of each class (at least one image), held out
# of its training images by a hash of each file's path and the seed: the same images in every call and every run.
HELD_OUT_SHARE, HELD_OUT_SEED = 0.1, 0
HELD_OUT_PERCENT = round(100 * HELD_OUT_SHARE)
# torchvision's IMG_EXTENSIONS (torchvision.datasets.folder), written out: importing torchvision takes seconds.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
# What Pillow raises for corrupt, truncated or non-image files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# What --datapath must hold, said when it does not.
EXPECTS = {
    'imagenet': 'the ImageNet folder holding train/ and val/ (one sub-folder per class in each), '
                'or one such split folder itself',
    'folder': 'a folder with one sub-folder of images per class, optionally split into train/ val/ test/',
}


def dataset_name(dataset: str | None, datapath: str | None) -> str:
    """``--dataset``, else what ``datapath`` holds: torchvision's CIFAR-10 folder, Fashion-MNIST's IDX files,
    ImageNet (every class folder a WordNet id), or any other folder of class folders; digits without a folder.
    A folder that holds none of them is refused: its kind is never guessed."""
    if dataset:
        return dataset
    if not datapath:
        return 'digits'
    root = Path(datapath).expanduser()
    if not root.is_dir():
        raise UserError(f'--datapath {datapath} does not exist or is not a folder: give the folder of the dataset')
    if (cifar_folder(root) / 'batches.meta').is_file():
        return 'cifar10'
    if fashion_mnist_files(root) is not None:
        return 'fashion-mnist'
    classes = [entry.name for entry in os.scandir(root / 'train' if (root / 'train').is_dir() else root)
               if entry.is_dir() and not entry.name.startswith('.')]
    if classes:
        return 'imagenet' if all(WORDNET_ID.fullmatch(name) for name in classes) else 'folder'
    raise UserError(f'--datapath {datapath} holds no CIFAR-10 batches, Fashion-MNIST files or class folders (in it '
                    'or in its train/): pass --dataset, or point --datapath at the dataset\'s folder')


def cifar_folder(root: Path) -> Path:
    return root / CIFAR_DIR if (root / CIFAR_DIR).is_dir() else root


def fashion_mnist_files(root: Path) -> Path | None:
    """The folder of ``root`` that holds every Fashion-MNIST IDX file: itself, ``FashionMNIST/raw/`` or ``raw/``."""
    return next((folder for folder in (root, root / 'FashionMNIST' / 'raw', root / 'raw')
                 if all(idx_file(folder, name) for pair in FASHION_FILES.values() for name in pair)), None)


def idx_file(folder: Path, name: str) -> Path | None:
    return next((path for path in (folder / name, folder / f'{name}.gz') if path.is_file()), None)


def datapath_root(dataset: str, datapath: str | os.PathLike | None, expects: str | None = None) -> Path:
    """``datapath`` as a folder that exists, else a one-line error saying what it must hold (``expects``)."""
    expects = expects or EXPECTS[dataset]
    if not datapath:
        raise UserError(f'--dataset {dataset} needs --datapath: {expects}')
    root = Path(datapath).expanduser()
    if not root.is_dir():
        state = 'is not a folder' if root.exists() else 'does not exist'
        raise UserError(f'--datapath {root} {state}; pass {expects}')
    return root


def _holds_images(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS) for entry in entries)


def _is_split_folder(root: Path) -> bool:
    """Whether an ImageNet ``datapath`` is one split folder itself, such as imagenet/val."""
    if (root / 'train').is_dir() or (root / 'val').is_dir():  # never classes named train and val
        return False
    with os.scandir(root) as entries:
        return any(entry.is_dir() and _holds_images(entry.path) for entry in entries)


def _imagenet_split(root: Path, split: str) -> Path:
    if _is_split_folder(root):
        return root
    folder = root / ('train' if split == 'train' else 'val')
    if not folder.is_dir():
        raise UserError(f'{root} holds neither {folder.name}/ nor class folders of images: --dataset imagenet '
                        f'needs --datapath to be {EXPECTS["imagenet"]}')
    return folder


# Only train/ and test/ can be missing: val/ falls back to test/ or train/. A test split never holds training images.
_MISSING_SPLIT_ADVICE = {
    'train': f', or point --datapath at a folder of class folders (training then validates on {HELD_OUT_PERCENT}% '
             'of each class, held out of it)',
    'test': ' that training never saw (evaluate.py --split val reads the images training holds out of train/)',
}


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


def split_folder(dataset: str, root: Path, split: str) -> Path:
    return _imagenet_split(root, split) if dataset == 'imagenet' else _folder_split(root, split)


def class_folder_names(root: Path) -> list[str]:
    with os.scandir(root) as entries:
        names = sorted(entry.name for entry in entries if entry.is_dir())
    if not names:
        raise UserError(f'{root} holds no class folders: put the images of each class in their own '
                        f'sub-folder, e.g. {root / "<class>" / "image.jpg"}')
    return names


def carves_validation(dataset: str, datapath: str | os.PathLike | None) -> bool:
    """Whether training validates on images held out of its training images (``image_folder.held_out_split``): the data
    has none of its own (a folder without ``val/`` and ``test/``, an ImageNet split folder itself)."""
    if dataset not in ('imagenet', 'folder'):
        return False
    root = datapath_root(dataset, datapath)
    if dataset == 'imagenet':
        return _is_split_folder(root)
    return not any((root / name).is_dir() for name in ('val', 'test'))


def held_out_count(images: int) -> int:
    """How many of a class's ``images`` are held out for validation."""
    return max(round(images * HELD_OUT_SHARE), 1)


def held_out_note(dataset: str, datapath: str | os.PathLike | None, train_images: int, val_images: int) -> str:
    """The line a training run prints, and records, when :func:`carves_validation`."""
    root = datapath_root(dataset, datapath)
    missing = 'val/' if dataset == 'imagenet' else 'val/ or test/'
    return (f'no {missing} in {root}: validating on {val_images} images ({HELD_OUT_PERCENT}% of each class, seeded) '
            f'held out of its {train_images + val_images} images, training on the other {train_images}')


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
    folder = split_folder(dataset, datapath_root(dataset, datapath), 'train')
    per_class = [[os.path.join(folder, name, entry) for entry in sorted(os.listdir(folder / name))
                  if entry.lower().endswith(IMG_EXTENSIONS)] for name in class_folder_names(folder)]
    files = [path for paths in per_class for path in paths]
    held_out = sum(held_out_count(len(paths)) for paths in per_class) if carves_validation(dataset, datapath) else 0
    sides, modes = [], set()
    for path in files[::max(len(files) // PROFILE_SAMPLES, 1)][:PROFILE_SAMPLES]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
                modes.add(image.mode)
        except DECODE_ERRORS:
            continue  # counted and reported when the images are read
    side = int(np.median(sides)) if sides else 0
    return FolderProfile(len(files) - held_out, side, bool(modes) and modes <= set(_GRAYSCALE_MODES))
