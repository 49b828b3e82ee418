"""Figures the scripts write beside their numbers (matplotlib, imported only when a figure is drawn)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from utils import atomic_path


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """``fig`` written to the PNG ``path`` atomically (never a half-written figure), then closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=dpi)
    plt.close(fig)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> None:
    """The confusion matrix as a heat map, each row (a true class) normalized to its images, with the counts
    written in the cells; written atomically (temp file + rename)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(2 + 0.5 * len(classes), 14)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap='Blues', vmin=0, vmax=1)
    if len(classes) <= 30:  # ImageNet's 1000 would be unreadable: the colours alone
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha='right')
        ax.set_yticks(range(len(classes)), classes)
        for row, col in np.ndindex(counts.shape):
            ax.text(col, row, f'{int(counts[row, col])}', ha='center', va='center',
                    color='white' if shares[row, col] > 0.5 else 'black', fontsize=8)
    ax.set(xlabel='predicted class', ylabel='true class', title=title)
    fig.colorbar(image, ax=ax, label='share of the true class')
    save_figure(fig, path, dpi=100)
