"""Which images are read, in what order, and how they are batched: the loader, the DDP sampler of each rank
(repeated augmentation, class-balanced draws) and fixed class-balanced subsets."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from utils import seed_for

# The official repeated augmentation (DeiT's RASampler): each training image 3 times an epoch across the
# DDP ranks, an epoch rounded down to a multiple of 256 images.
REPEATS, REPEAT_ROUND = 3, 256


def collate_decodable(samples: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``default_collate`` of the samples that could be decoded; None when none of the batch could."""
    samples = [sample for sample in samples if sample is not None]
    return default_collate(samples) if samples else None


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, drop_last: bool = False,
                 sampler: Sampler | None = None, generator: torch.Generator | None = None) -> DataLoader:
    """Batches of ``dataset`` in ``sampler``'s order (default: as stored); undecodable images left out.
    ``generator`` draws the seed of the worker processes (default: torch's global generator)."""
    if getattr(dataset, 'in_memory', False):
        num_workers = 0  # tensors already in memory: worker processes only add start-up and contention
    workers = num_workers > 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      generator=generator, collate_fn=collate_decodable, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers,
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
            return len(self.dataset) // self._ranks()[0]
        shard = self._shard()
        return len(shard) if shard is not None else len(self.dataset)


def labels_of(dataset: Dataset) -> list[int]:
    """Every image's label, without reading an image (the label lists the datasets keep)."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    return list(dataset.targets)


def imbalance(dataset: Dataset) -> tuple[float, float]:
    """The shares (in %) of the largest and the smallest class."""
    counts = torch.bincount(torch.as_tensor(labels_of(dataset)))
    counts = counts[counts > 0].double()
    return 100 * counts.max().item() / counts.sum().item(), 100 * counts.min().item() / counts.sum().item()


# Classes this uneven (the largest over the smallest) are evened out by default: sampled equally often in training,
# and candidates ranked by balanced accuracy in a search. A top-1 then mostly measures the largest classes.
IMBALANCED = 3.0


def imbalanced(dataset: Dataset) -> str | None:
    """What makes ``dataset``'s classes imbalanced (:data:`IMBALANCED`), said for a line of output; None if not."""
    largest, smallest = imbalance(dataset)
    return f'the classes hold {smallest:.1f}% to {largest:.1f}% of the training images' \
        if largest >= IMBALANCED * smallest else None


def images_per_rank(train_size: int, processes: int, repeats: int) -> int:
    """Training images each of ``processes`` ranks reads in an epoch (what :class:`RankSampler` gives)."""
    if processes == 1:
        return train_size
    if repeats > 1 and train_size >= REPEAT_ROUND:
        return min(train_size // REPEAT_ROUND * REPEAT_ROUND // processes, math.ceil(train_size * repeats / processes))
    return math.ceil(train_size / processes)


def per_class_cap(max_images: int, classes: int) -> int:
    """How many images of each class a class-balanced subset of ``max_images`` takes (at least one)."""
    return max(max_images // classes, 1)


def balanced_indices(targets: list[int], max_images: int, seed: int) -> list[int]:
    """At most ``max_images`` indices, the same number from every class (:func:`per_class_cap`), fixed by
    ``seed``."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    per_class = per_class_cap(max_images, len(by_class))
    rng = np.random.default_rng(seed)
    chosen = [i for label in sorted(by_class)
              for i in rng.permutation(by_class[label])[:per_class].tolist()]
    return sorted(chosen)


def balanced_subset(dataset: Dataset, max_images: int, seed: int) -> Dataset:
    """A fixed class-balanced subset of ``dataset`` (it has ``targets``): :func:`balanced_indices`."""
    return torch.utils.data.Subset(dataset, balanced_indices(list(dataset.targets), max_images, seed))
