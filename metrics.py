"""What a confusion matrix says: top-1, balanced accuracy (the mean of the per-class accuracies), per-class
accuracy; and how uncertain a top-1 is. Shared by the accuracy loop (engine.py), Lightning's validation
(lightning.py), the search (search.py) and the study (study.py)."""
from __future__ import annotations

import math
from typing import Any

import torch


def confusion_counts(targets: torch.Tensor, predictions: torch.Tensor, classes: int) -> torch.Tensor:
    """The flattened (true class, predicted class) count matrix of one batch, on its device."""
    return torch.bincount(targets * classes + predictions, minlength=classes * classes)


def binomial_se(top1: float, images: int) -> float:
    """Standard error (points) of a top-1 (%) measured on ``images`` images: sqrt(p (1 - p) / n); at its largest,
    for any top-1, with ``top1=50``."""
    share = top1 / 100
    return 100 * math.sqrt(share * (1 - share) / images)


def running_value(confusion: torch.Tensor, metric: str) -> float:
    """Top-1 or balanced accuracy (%) of a confusion count matrix, on its device (no thousand-class list per
    report, as :func:`summarize` makes)."""
    if metric == 'top1':
        return 100 * confusion.trace().item() / confusion.sum().item()
    totals = confusion.sum(dim=1)
    present = totals > 0
    return 100 * (confusion.diagonal()[present] / totals[present]).mean().item()


def summarize(confusion: torch.Tensor, top5_hits: int | None = None) -> dict[str, Any]:
    """Top-1 (in %), top-5 (only with more than 5 classes: with 5 or fewer it is 100 by construction),
    balanced accuracy (the mean of the per-class accuracies, over the classes the data holds), per-class
    accuracy (None for a class the data does not hold) and the confusion matrix (rows: true class,
    columns: predicted) of a ``confusion`` count matrix."""
    classes, total = confusion.shape[0], confusion.sum().item()
    per_class_total = confusion.sum(dim=1).tolist()
    per_class = [100 * confusion[c, c].item() / n if n else None for c, n in enumerate(per_class_total)]
    present = [accuracy for accuracy in per_class if accuracy is not None]
    return {'top1': 100 * confusion.trace().item() / total,
            'top5': 100 * top5_hits / total if top5_hits is not None and classes > 5 else None,
            'balanced': sum(present) / len(present), 'per_class': per_class, 'confusion': confusion.tolist()}
