"""The accuracy loop shared by evaluate.py, search.py and the Lightning validation."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
from timm.utils import accuracy
from tqdm import tqdm


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = 'cpu', progress: bool = True,
             desc: str = 'eval', on_batch: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """Top-1 / top-5 (in %) of ``model`` over ``loader``, with images/s of the forward passes.

    ``on_batch(batch_index, running_top1)`` is called after every batch (NNI intermediate results).
    """
    model.eval().to(device)
    correct1 = correct5 = seen = 0
    seconds = 0.0
    for index, (images, targets) in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        start = time.perf_counter()
        logits = model(images)
        if logits.device.type == 'cuda':
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        correct1 += top1.item() * len(targets) / 100
        correct5 += top5.item() * len(targets) / 100
        seen += len(targets)
        if on_batch is not None:
            on_batch(index, 100 * correct1 / seen)
    if seen == 0:
        raise ValueError('the evaluation data is empty')
    return {'top1': 100 * correct1 / seen, 'top5': 100 * correct5 / seen, 'images': seen,
            'images_per_s': seen / max(seconds, 1e-9)}
