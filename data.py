"""The datasets, by name: ``build_dataset(dataset, datapath, split, img_size, training)`` is a map-style dataset of
``(normalized float tensor CxHxW, int label)`` pairs with ``.classes``, and :func:`description` what weights files
keep about it. Nothing is ever downloaded. Which dataset a ``--datapath`` holds is ``folders.py``'s.

``imagenet`` and ``folder`` are image folders (image_folder.py). ``cifar10``: torchvision's python batches in
``datapath`` or its ``cifar-10-batches-py/``; ``val`` and ``test`` read test_batch. ``digits``: scikit-learn's bundled
8x8 digits, split once by class with ``train_test_split(random_state=0)``: 360 test, 180 val, 1,257 train.
``fashion-mnist``: the release's IDX files (gzipped or not) in ``datapath``, its ``FashionMNIST/raw/``, or without
``datapath`` Debian's ``/usr/share/datasets/fashion-mnist``; ``val`` is a fixed class-balanced twelfth of the 60,000
training images.
"""
from __future__ import annotations

import gzip
import io
import math
import numbers
import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from folders import (CIFAR_DIR, DATASETS, FASHION_FILES, FASHION_SYSTEM_PATH, HELD_OUT_PERCENT, SPLITS,
                     carves_validation, cifar_folder, class_folder_names, datapath_root, fashion_mnist_files, idx_file,
                     split_folder)
from image_folder import IMAGENET_MEAN, IMAGENET_STD, SMALL_IMAGE, build_folder_dataset, cifar_transform
from samplers import balanced_indices
from utils import UserError

TENSOR_DATASETS = ('digits', 'fashion-mnist')  # small grayscale images held as tensors, normalized by 0.5 / 0.5
CIFAR_TRAIN_FILES = tuple(f'data_batch_{i}' for i in range(1, 6))
DIGITS_SPLIT_SIZES = {'train': 1257, 'val': 180, 'test': 360}
FASHION_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                   'Ankle boot')  # torchvision's FashionMNIST.classes
# The validation split (what training validates and the search ranks on) is one twelfth of the training
# images, class-balanced and fixed (5,000 of 60,000); the 10,000 test images select nothing.
FASHION_VAL_SHARE = 12
# The only globals a CIFAR-10 pickle needs (numpy arrays written by Python 2 or 3); anything
# else would run code from the file, so it is refused.
_CIFAR_PICKLE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
}
CIFAR_EXPECTS = f'the folder holding {CIFAR_DIR}/ (torchvision\'s CIFAR-10 python format), or {CIFAR_DIR} itself'
FASHION_EXPECTS = ("the folder holding the four IDX files of Fashion-MNIST (train-images-idx3-ubyte.gz, ...), "
                   "or torchvision's layout (FashionMNIST/raw/)")


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}': use one of {', '.join(DATASETS)}")


class TensorDataset(Dataset):
    """Small grayscale images held in memory as one normalized Nx1xSxS tensor (shared with the in-process
    cache), returned as 3 channels. ``augment`` maps a training batch (Bx3xSxS) to an augmented copy, drawing
    for each image on its own. The loader fetches whole batches (``__getitems__``): on images this small a
    Python call per image is a large share of a training step (bench/results/fashion-mnist-choices.md)."""
    in_memory = True  # build_loader reads it without worker processes

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
                            f'{CIFAR_EXPECTS}, which holds {", ".join(CIFAR_TRAIN_FILES)}, test_batch '
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


def fashion_mnist_folder(datapath: str | os.PathLike | None) -> Path:
    """The folder holding Fashion-MNIST's IDX files (each plain or .gz): ``datapath``, its ``FashionMNIST/raw/``
    or ``raw/``; without ``datapath``, Debian's ``/usr/share/datasets/fashion-mnist``."""
    root = datapath_root('fashion-mnist', datapath, FASHION_EXPECTS) if datapath else FASHION_SYSTEM_PATH
    folder = fashion_mnist_files(root)
    if folder is not None:
        return folder
    where = f'--datapath {root}' if datapath else f'{FASHION_SYSTEM_PATH} (no --datapath given)'
    raise UserError(f'{where} lacks Fashion-MNIST: install it with apt-get install dataset-fashion-mnist, or pass '
                    f'--datapath {FASHION_EXPECTS}; nothing is downloaded')


def read_idx(path: Path, dims: int) -> torch.Tensor:
    """An IDX file (the MNIST format; gzipped or not) of unsigned bytes with ``dims`` dimensions, checked."""
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
    images, labels = read_idx(idx_file(folder, image_name), 3), read_idx(idx_file(folder, label_name), 1).long()
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
    # A mirror only: clothes are left-right symmetric, and shifted crops made a short run learn less
    # (bench/results/fashion-mnist-choices.md).
    augment = flip_half if training else None
    return TensorDataset(images, labels, augment, list(FASHION_CLASSES))


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
    if dataset == 'cifar10':
        return Cifar10(cifar_folder(datapath_root(dataset, datapath, CIFAR_EXPECTS)), split,
                       cifar_transform(img_size, training))
    return build_folder_dataset(dataset, datapath, split, img_size, training)


def split_read(dataset: str, datapath: str | os.PathLike | None, split: str) -> str:
    """The split that ``build_dataset(..., split)`` reads: ``split`` itself, or what stands in for it (a
    folder without ``test/`` is tested on ``val/``; CIFAR-10 and ImageNet validate on their test batch or
    ``val/``; data without validation images of its own holds them out of its training images)."""
    if dataset in TENSOR_DATASETS:
        return split
    if dataset == 'cifar10':
        return 'train' if split == 'train' else 'test'
    root = datapath_root(dataset, datapath)
    folder = split_folder(dataset, root, split)
    if split != 'test' and carves_validation(dataset, datapath):
        if split == 'val':
            return f'the {HELD_OUT_PERCENT}% of each class of {folder} held out for validation (seeded)'
        return f'{folder} less the {HELD_OUT_PERCENT}% of each class held out for validation (seeded)'
    return folder.name if folder != root else f'all of {root} (no split folders)'


def reads_training_images(dataset: str, datapath: str | os.PathLike | None, split: str) -> bool:
    """Whether ``split`` holds the images training reads: the training split itself, or a folder's only folder
    (whose validation images, held out of training, are not)."""
    if dataset in TENSOR_DATASETS or dataset == 'cifar10' or split == 'val' and carves_validation(dataset, datapath):
        return split == 'train'
    root = datapath_root(dataset, datapath)
    return split_folder(dataset, root, split) == split_folder(dataset, root, 'train')


def optimism(stored: Mapping[str, Any] | None, dataset: str, datapath: str | os.PathLike | None,
             split: str) -> str | None:
    """Why a figure of weights trained as ``stored`` says (their :func:`trained_on` and the split their best epoch was
    chosen on, stored with them) is optimistic on ``split`` of this data, or None when it is not."""
    if not stored or {key: stored.get(key) for key in ('dataset', 'datapath')} != trained_on(dataset, datapath):
        return None
    if reads_training_images(dataset, datapath, split):
        return 'these images include the ones the weights were trained on: the figure is optimistic'
    if stored.get('best_chosen_on') == split_read(dataset, datapath, split):
        return ('these weights are the epoch that scored best on this same split: the figure is optimistic; '
                'report it on a split that chose nothing')
    return None


def trained_on(dataset: str, datapath: str | os.PathLike | None) -> dict[str, Any]:
    """What weights files store of the data they were trained on, for :func:`optimism`."""
    return {'dataset': dataset, 'datapath': str(Path(datapath).expanduser().resolve()) if datapath else None}


def num_classes(dataset: str, datapath: str | os.PathLike | None) -> int:
    """The number of classes, without scanning the images (cheap even for ImageNet)."""
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
    if dataset == 'cifar10':
        return _cifar_class_names(cifar_folder(datapath_root(dataset, datapath, CIFAR_EXPECTS)))
    root = datapath_root(dataset, datapath)
    return class_folder_names(next((root / s for s in SPLITS if (root / s).is_dir()), root))


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the dataset's tensors are normalized with."""
    if dataset in TENSOR_DATASETS:
        return (0.5,) * 3, (0.5,) * 3
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def preprocessing(dataset: str, img_size: int) -> dict[str, Any]:
    """How an image becomes the model's input at evaluation, in numbers a deployment can repeat: the
    resize (shorter side to ``resize``, or the whole image to ``resize`` x ``resize`` when ``crop`` is
    None), the centre crop, pixel values scaled to [0, 1], then per-channel ``(x - mean) / std``."""
    mean, std = normalization(dataset)
    steps: dict[str, Any] = {'input_size': img_size, 'channels': 'RGB; grayscale images repeated on 3 channels'}
    if dataset in TENSOR_DATASETS:
        native = 8 if dataset == 'digits' else 28
        steps.update(resize=img_size, crop=None, interpolation='bilinear (antialiased)',
                     source=f'{native}x{native} grayscale')
    elif img_size <= SMALL_IMAGE or dataset == 'cifar10':
        steps.update(resize=img_size, crop=None, interpolation='bicubic')
    else:  # DeiT's: the shorter side to img_size / 0.875, then the centre crop
        steps.update(resize=int(img_size / 0.875), crop=img_size, interpolation='bicubic')
    return {**steps, 'mean': list(mean), 'std': list(std)}


def description(dataset: str, datapath: str | os.PathLike | None, img_size: int,
                classes: list[str] | None = None) -> dict[str, Any]:
    """What weights files store about their data: the dataset, the class names in label order and the
    evaluation preprocessing, so an exported subnet can be fed and its outputs named without the data."""
    return {'dataset': dataset, 'classes': list(classes) if classes is not None else class_names(dataset, datapath),
            'preprocessing': preprocessing(dataset, img_size)}


def check_classes(dataset: str, classes: int, space_kwargs: Mapping[str, Any], what: str = 'model') -> None:
    """Refuse data whose class count is not the model's output count."""
    if classes != space_kwargs['num_labels']:
        raise UserError(f'the {dataset} data has {classes} classes but the {what} has {space_kwargs["num_labels"]} '
                        f'outputs: pass weights trained for this dataset')
