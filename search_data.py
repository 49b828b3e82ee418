"""The search split, what a search ranks candidates on, decoded once into a cache every candidate reads. Which
images it holds is one rule (:func:`search_source`), which the search, the study and the records' description follow:
digits and Fashion-MNIST: their validation split, held out of training, never the test split; an ImageNet or
``folder`` ``--datapath`` without ``train/``: that folder itself (the best candidate's top-1 is then measured on the
images that selected it: optimistic); otherwise, as the paper's subImageNet, a fixed class-balanced subset of the
training split, ``recipes.SEARCH_IMAGES_PER_CLASS`` images of each class or ``--search-images`` in all.
"""
from __future__ import annotations

import os
import sys
from typing import Iterator

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from checkpoints import atomic_torch_save, torch_load
from data import TENSOR_DATASETS, build_dataset, normalization
from folders import datapath_root
from image_folder import split_images
from recipes import SEARCH_IMAGES_PER_CLASS
from samplers import balanced_subset, build_loader, per_class_cap
from utils import UserError


def search_source(dataset: str, datapath: str | os.PathLike | None) -> str:
    """Which images the search split holds (the rule above): ``'val'``, ``'folder'`` (the ``--datapath`` folder
    itself) or ``'train'`` (a class-balanced subset of the training split)."""
    if dataset in TENSOR_DATASETS:
        return 'val'
    if dataset in ('imagenet', 'folder') and not (datapath_root(dataset, datapath) / 'train').is_dir():
        return 'folder'
    return 'train'


def search_images(max_images: int | None, classes: int) -> int:
    """How many training images a search split of ``classes`` classes takes: ``max_images`` (``--search-images``),
    else ``SEARCH_IMAGES_PER_CLASS`` of each class."""
    return max_images or SEARCH_IMAGES_PER_CLASS * classes


def search_split(dataset: str, datapath: str | os.PathLike | None, img_size: int, max_images: int | None = None,
                 seed: int = 0) -> Dataset:
    """The search split (:func:`search_source`); ``seed`` fixes which training images it takes."""
    source = search_source(dataset, datapath)
    if source == 'val':
        return build_dataset(dataset, datapath, 'val', img_size)
    if source == 'folder':
        print(f'searching on {datapath_root(dataset, datapath)} itself: the top-1 reported for the best candidate is '
              'then measured on the images the search selected it on (optimistic); give the dataset root with train/ '
              'to search on a subset of its training images instead', file=sys.stderr)
        return split_images(dataset, datapath, 'val', img_size, training=False)  # all of it, none held out
    train = build_dataset(dataset, datapath, 'train', img_size)
    return balanced_subset(train, search_images(max_images, len(set(train.targets))), seed)


def search_split_description(dataset: str, datapath: str | os.PathLike | None, labels: torch.Tensor,
                             max_images: int | None = None) -> str:
    """One line saying what the search split holds and how it relates to training and validation (what a
    search's top-1 is measured on), from the labels of its cache (``max_images``: as for :func:`search_split`)."""
    counts = [n for n in torch.bincount(labels).tolist() if n]
    per_class = f'{counts[0]}' if min(counts) == max(counts) else f'{min(counts)} to {max(counts)}'
    held = f'{len(labels)} images, {per_class} per class'
    source = search_source(dataset, datapath)
    if source == 'val':
        return (f'the search split: the {dataset} validation split ({held}), held out of training; not the '
                'test split')
    if source == 'folder':
        return (f'the search split: the --datapath folder itself ({held}), the images the search also selects '
                'on (optimistic)')
    cap = per_class_cap(search_images(max_images, len(counts)), len(counts))
    return (f'the search split: training images, up to {cap} per class ({held}), which the supernet '
            'trained on; not the validation split')


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
    classes = list(getattr(split, 'classes', None) or getattr(getattr(split, 'dataset', None), 'classes', []))
    atomic_torch_save({'images': images, 'labels': labels, 'mean': normalization(dataset)[0],
                       'std': normalization(dataset)[1], 'classes': classes}, path)


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


class CachedSplit(Dataset):
    """A split written by :func:`write_cache`: uint8 images normalized on the fly."""
    in_memory = True  # build_loader reads it without worker processes

    def __init__(self, path: str | os.PathLike) -> None:
        cache = torch_load(path, 'search data cache', mmap=True)  # the workers of a search share one copy
        self.images, self.labels = cache['images'], cache['labels']
        # the class names every per-class figure is given with (a cache written before they were kept: the labels)
        self.classes = cache.get('classes') or [str(label) for label in range(int(self.labels.max()) + 1)]
        self.mean = torch.tensor(cache['mean']).view(3, 1, 1) * 255
        self.std = torch.tensor(cache['std']).view(3, 1, 1) * 255
        self._device_copy: tuple[torch.device, tuple[torch.Tensor, ...]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return (self.images[index].float() - self.mean) / self.std, int(self.labels[index])

    def batches(self, batch_size: int,
                device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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

