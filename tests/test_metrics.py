"""The accuracy loop's metrics: what a model does to each class, not only how often it is right."""
from __future__ import annotations

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from engine import evaluate

pytestmark = pytest.mark.fast  # make test-fast


class FixedLogits(torch.nn.Module):
    """Answers each batch with the logits given for it, in order."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        super().__init__()
        self.logits = iter(logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return next(self.logits)


def run(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> dict:
    batches = [(torch.zeros(len(t), 1), t) for t in targets]
    return evaluate(FixedLogits(logits), batches, progress=False, per_image=True)


def test_a_majority_class_predictor_scores_high_top1_and_chance_balanced_accuracy():
    targets = [torch.tensor([0] * 53 + [1] * 27), torch.tensor([2] * 12 + [3] * 8)]  # 53% in class 0
    logits = [torch.eye(4)[torch.zeros(len(t), dtype=torch.long)] for t in targets]
    metrics = run(logits, targets)
    assert metrics['top1'] == pytest.approx(53.0) and metrics['balanced'] == pytest.approx(25.0)
    assert metrics['per_class'] == [100.0, 0.0, 0.0, 0.0]
    assert metrics['top5'] is None  # with 4 classes every label is in the top 5


def test_metrics_agree_with_scikit_learn_on_random_predictions():
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 7, (n,), generator=generator) for n in (32, 32, 17)]
    logits = [torch.randn(len(t), 7, generator=generator) for t in targets]
    metrics = run(logits, targets)
    y_true, y_pred = torch.cat(targets), torch.cat(logits).argmax(dim=1)
    assert metrics['confusion'] == confusion_matrix(y_true, y_pred, labels=range(7)).tolist()
    assert metrics['balanced'] == pytest.approx(100 * balanced_accuracy_score(y_true, y_pred))
    assert metrics['hits'].tolist() == y_pred.eq(y_true).tolist()
    assert metrics['top1'] == pytest.approx(100 * y_pred.eq(y_true).float().mean().item())
    top5 = torch.cat(logits).topk(5, dim=1).indices.eq(y_true[:, None]).any(dim=1).float().mean().item()
    assert metrics['top5'] == pytest.approx(100 * top5) and metrics['images'] == len(y_true)


def test_a_class_absent_from_the_data_is_left_out_of_balanced_accuracy():
    targets = [torch.tensor([0, 0, 1, 1])]
    logits = [torch.eye(3)[torch.tensor([0, 1, 1, 1])]]
    metrics = run(logits, targets)
    assert metrics['per_class'] == [50.0, 100.0, None] and metrics['balanced'] == pytest.approx(75.0)
