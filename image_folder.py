"""An image folder as a dataset: :class:`SafeImageFolder`, which decodes every image to RGB, leaves out (evaluation)
or replaces (training) a file it cannot decode, counted, and never reads an entry that is not a regular file, or a
folder twice; the validation images held out of a folder's training images (:func:`held_out_split`); and the
transforms of image files (DeiT's with ImageNet mean/std, CIFAR's at :data:`SMALL_IMAGE` px and below). Which folder a
split reads is ``folders.py``'s.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD, create_transform
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode

from folders import (DECODE_ERRORS, HELD_OUT_SEED, IMG_EXTENSIONS, carves_validation, class_folder_names,
                     datapath_root, held_out_count, profile_folder, split_folder)
from utils import UserError

_logger = logging.getLogger(__name__)
# Inputs this small get the small-image transform, the whole image resized: ImageNet's RandomResizedCrop (down to 8%
# of the image) would crop a small detail out of most training views, and its centre crop would cut the border.
SMALL_IMAGE = 96
# The decoded, resized images of a split are kept in memory (each loader process its own) when they fit in this.
CACHE_BYTES = 2 << 30
AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'  # DeiT's RandAugment


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
        self.resize: Callable | None = None  # set: the images are decoded and resized once, then kept
        self._resized: dict[int, Image.Image] = {}

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
                image = self._resized[position] if position in self._resized else self.loader(path)
            except DECODE_ERRORS as err:
                self._flag(position, path, err)
                if not self.substitute:
                    return None
                continue
            if self.resize is not None and position not in self._resized:
                image = self._resized[position] = self.resize(image)
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


def _draw(path: str, root: str) -> bytes:
    # Within the folder: the same draw wherever the folder is moved or mounted.
    return hashlib.sha256(f'{HELD_OUT_SEED}:{path.removeprefix(root)}'.encode()).digest()


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


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, with the 0-bit case (a black image) that older Pillow gave and Pillow 11 refuses."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def allow_zero_bit_posterize() -> None:
    """RandAugment's increasing posterize reaches 0 bits at magnitude 10 (m9 + noise), which Pillow 11 refuses:
    timm's posterize ops take :func:`_posterize` so that DeiT's recipe keeps working. RandAugment looks its ops
    up when it is built, so this runs just before; running it again changes nothing."""
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        timm_auto_augment.NAME_TO_OP[name] = _posterize


def train_transform(img_size: int, grayscale: bool = False) -> Callable:
    """The official run's augmentation: RandAugment, random erasing of a quarter of the images with per-pixel
    random values ('pixel', not timm's default 'const'), bicubic resizing. Grayscale images get neither
    RandAugment's colour operations nor colour noise: crops, flips and erasing with grey only."""
    if grayscale:
        return create_transform(img_size, is_training=True, auto_augment=None, color_jitter=None, re_prob=0.25,
                                re_mode='const', re_count=1, interpolation='bicubic')
    allow_zero_bit_posterize()
    return create_transform(img_size, is_training=True, auto_augment=AUTO_AUGMENT, re_prob=0.25, re_mode='pixel',
                            re_count=1, interpolation='bicubic')


def small_image_transform(img_size: int, training: bool) -> Callable:
    """CIFAR's recipe: the whole image resized to the input, a crop shifted by up to 1/8 of it and a mirror in
    training (a no-op resize for CIFAR-10 at 32 px)."""
    return transforms.Compose([small_image_resize(img_size), small_image_augment(img_size, training)])


def small_image_resize(img_size: int) -> Callable:
    return transforms.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC)


def small_image_augment(img_size: int, training: bool) -> Callable:
    """What the small-image transform does after its resize (the same every epoch, so it can be cached)."""
    steps = [transforms.RandomCrop(img_size, padding=max(img_size // 8, 1)), transforms.RandomHorizontalFlip()]
    return transforms.Compose((steps if training else [])
                              + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_transform(img_size: int, training: bool, grayscale: bool = False) -> Callable:
    """The transform of an image file: the small-image one, the training augmentation, or DeiT's evaluation
    (bicubic resize to ``int(img_size / 0.875)``, centre crop, normalize)."""
    if img_size <= SMALL_IMAGE:
        return small_image_transform(img_size, training)
    if training:
        return train_transform(img_size, grayscale)
    return create_transform(img_size, is_training=False, interpolation='bicubic', crop_pct=0.875)


def cifar_transform(img_size: int, training: bool) -> Callable:
    """CIFAR-10's: evaluated upsampled whole, since a centre crop would cut the border of an image already
    32 px; trained as any image."""
    return image_transform(img_size, training) if training else small_image_transform(img_size, training=False)


def split_images(dataset: str, datapath: str | os.PathLike | None, split: str, img_size: int,
                 training: bool) -> SafeImageFolder:
    """Every image of the folder that ``split`` reads, validation images held out of it or not; refused with a
    clear error when the folder holds no class folder, or a class folder no image."""
    root = split_folder(dataset, datapath_root(dataset, datapath), split)
    grayscale = training and img_size > SMALL_IMAGE and profile_folder(dataset, datapath).grayscale
    class_folder_names(root)
    images = SafeImageFolder(root, image_transform(img_size, training, grayscale), substitute=training)
    if img_size <= SMALL_IMAGE and len(images) * 3 * img_size ** 2 <= CACHE_BYTES:
        images.transform, images.resize = small_image_augment(img_size, training), small_image_resize(img_size)
    counts = np.bincount(images.targets, minlength=len(images.classes))
    empty = [name for name, count in zip(images.classes, counts) if count == 0]
    if empty:
        others = f' (and {len(empty) - 1} more empty class folders)' if len(empty) > 1 else ''
        raise UserError(f'class folder {root / empty[0]} has no images{others}; add images '
                        f'({" ".join(IMG_EXTENSIONS)}) or remove the folder')
    return images


def build_folder_dataset(dataset: str, datapath: str | os.PathLike | None, split: str, img_size: int,
                         training: bool) -> SafeImageFolder:
    """``build_dataset`` of an ImageNet or ``folder`` dataset: :func:`split_images` less the images held out for
    validation (``train``), or those alone (``val``), when :func:`carves_validation`."""
    images = split_images(dataset, datapath, split, img_size, training)
    if split != 'test' and carves_validation(dataset, datapath):
        images.keep(held_out_split(images)[split])
    return images
