"""Image files: their transforms (DeiT's with ImageNet mean/std, CIFAR's at :data:`SMALL_IMAGE` px and below);
which folder each split of an ``imagenet`` or ``folder`` dataset reads (``datapath/<split>``, or ``datapath`` itself
when it is one ImageNet split folder or a folder of class folders); the validation images held out of the training
images of data without its own (a seeded tenth of each class, :func:`held_out_split`), as training never validates
on its own images; :class:`SafeImageFolder`, which decodes every image to RGB, leaves out (evaluation) or replaces
(training) a file it cannot decode, counted, and never reads an entry that is not a regular file, or a folder twice.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode

from utils import UserError

SPLITS = ('train', 'val', 'test')
# Sub-folders of a `folder` dataset read for each split, first found wins; a folder with train/ alone validates on
# images held out of it (:func:`held_out_split`).
_FOLDER_SPLITS = {'train': ('train',), 'val': ('val', 'test', 'train'), 'test': ('test', 'val')}
# Data without validation images of its own validates on this share of each class (at least one image), held out
# of its training images by a hash of each file's path and the seed: the same images in every call and every run.
HELD_OUT_SHARE, HELD_OUT_SEED = 0.1, 0
HELD_OUT_PERCENT = round(100 * HELD_OUT_SHARE)
# What Pillow raises for corrupt, truncated or non-image files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# What --datapath must hold, said when it does not.
EXPECTS = {
    'imagenet': 'the ImageNet folder holding train/ and val/ (one sub-folder per class in each), '
                'or one such split folder itself',
    'folder': 'a folder with one sub-folder of images per class, optionally split into train/ val/ test/',
}
_logger = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
# Inputs this small get the small-image transform, the whole image resized: ImageNet's RandomResizedCrop (down to 8%
# of the image) would crop a small detail out of most training views, and its centre crop would cut the border.
SMALL_IMAGE = 96
# The decoded, resized images of a split are kept in memory (each loader process its own) when they fit in this.
CACHE_BYTES = 2 << 30
AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'  # DeiT's RandAugment


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


def _holds_class_folders(root: Path) -> bool:
    with os.scandir(root) as entries:
        return any(entry.is_dir() and _holds_images(entry.path) for entry in entries)


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
            except _DECODE_ERRORS as err:
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


def carves_validation(dataset: str, datapath: str | os.PathLike | None) -> bool:
    """Whether training validates on images held out of its training images (:func:`held_out_split`): the data
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
        except _DECODE_ERRORS:
            continue  # counted and reported when the images are read
    if not sides:
        return FolderProfile(len(files) - held_out, 0, False)
    return FolderProfile(len(files) - held_out, int(np.median(sides)), modes <= set(_GRAYSCALE_MODES))


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
