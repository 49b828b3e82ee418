"""What a confusion matrix says: top-1, balanced accuracy (the mean of the per-class accuracies), per-class accuracy;
and how uncertain a measure is: a top-1's binomial standard error, a mean's, a paired difference's, a Kendall tau's
interval. One module, so that the training, the search and the study compute a figure and its spread one way. It
imports no torch itself, only works on the tensors it is given (search.py reads :data:`METRICS` checking its flags)."""
from __future__ import annotations

import math
import random
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# What a search can rank by (--metric), as its results files and plot name it; every figure is measured on the
# search split (the record's "measured_on" says what that holds), not on the validation split.
METRICS = {'top1': 'top-1', 'balanced': 'balanced accuracy'}


def confusion_counts(targets: torch.Tensor, predictions: torch.Tensor, classes: int) -> torch.Tensor:
    """The flattened (true class, predicted class) count matrix of one batch, on its device."""
    return (targets * classes + predictions).bincount(minlength=classes * classes)


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


def kendall(first: list[float], second: list[float], resamples: int = 1000) -> dict[str, float | None]:
    """Kendall tau-b with its two-sided p-value (scipy) and a bootstrap 95% interval over the pairs; tau is
    None when one side is constant (no ranking at all)."""
    from scipy.stats import kendalltau

    tau, p_value = kendalltau(first, second)
    if math.isnan(tau):
        return {'tau': None, 'p': None, 'low': None, 'high': None, 'n': len(first)}
    rng, taus = random.Random(0), []
    for _ in range(resamples):
        picks = [rng.randrange(len(first)) for _ in first]
        resampled = kendalltau([first[i] for i in picks], [second[i] for i in picks])[0]
        if not math.isnan(resampled):
            taus.append(resampled)
    taus.sort()
    low, high = (taus[int(0.025 * len(taus))], taus[int(0.975 * len(taus)) - 1]) if resamples else (None, None)
    return {'tau': float(tau), 'p': float(p_value), 'low': low, 'high': high, 'n': len(first)}


def paired_difference(first: torch.Tensor, second: torch.Tensor) -> tuple[float, float]:
    """Top-1 of ``first`` minus ``second`` on the same images, with its paired standard error (points)."""
    diff = first.float() - second.float()
    return 100 * diff.mean().item(), 100 * diff.std().item() / math.sqrt(len(diff))


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error; None for one value (no spread is measured, not a spread of 0)."""
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def plus_minus(mean: float, se: float | None, digits: int = 2) -> str:
    """``mean ± se``, or ``mean (one run: no standard error)``."""
    spread = f' ± {se:.{digits}f}' if se is not None else ' (one run: no standard error)'
    return f'{mean:.{digits}f}{spread}'
