"""Imbalance-aware losses against hand-computed values; cross-validation bookkeeping; reported metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectscope.classify.crossval import cross_validate, keep_shots, stratified_folds
from defectscope.classify.losses import ImbalanceLoss, balanced_contrastive_loss, class_weights, sample_weights
from defectscope.classify.model import ClassifierConfig
from defectscope.classify.report import classification_metrics
from defectscope.data.layout import load_dataset
from defectscope.errors import DefectscopeError

LOGITS = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
TARGETS = torch.tensor([0, 1])
COUNTS = torch.tensor([3, 1])  # prior 0.75 / 0.25


def _nll(rows: list[list[float]], targets: list[int]) -> float:
    """Mean -log softmax, by hand."""
    return sum(-(r[t] - math.log(sum(math.exp(v) for v in r))) for r, t in zip(rows, targets)) / len(rows)


def test_plain_cross_entropy() -> None:
    assert float(ImbalanceLoss("ce", COUNTS)(LOGITS, TARGETS)) == pytest.approx(_nll([[1, 0], [0.5, 2]], [0, 1]), rel=1e-6)


def test_balanced_softmax_is_cross_entropy_on_prior_shifted_logits() -> None:
    a, b = math.log(0.75), math.log(0.25)
    expected = _nll([[1 + a, 0 + b], [0.5 + a, 2 + b]], [0, 1])
    assert float(ImbalanceLoss("balanced_softmax", COUNTS)(LOGITS, TARGETS)) == pytest.approx(expected, rel=1e-6)


def test_logit_adjustment_loss_with_tau_and_uniform_prior() -> None:
    a, b = math.log(0.75), math.log(0.25)
    expected = _nll([[1 + 2 * a, 2 * b], [0.5 + 2 * a, 2 + 2 * b]], [0, 1])
    assert float(ImbalanceLoss("logit_adjusted", COUNTS, tau=2.0)(LOGITS, TARGETS)) == pytest.approx(expected, rel=1e-6)
    uniform = ImbalanceLoss("logit_adjusted", torch.tensor([5, 5]))
    assert float(uniform(LOGITS, TARGETS)) == pytest.approx(_nll([[1, 0], [0.5, 2]], [0, 1]), rel=1e-6)


def test_post_hoc_logit_adjustment_trains_plainly_and_shifts_decisions() -> None:
    loss = ImbalanceLoss("logit_adjusted_posthoc", COUNTS)
    assert float(loss(LOGITS, TARGETS)) == pytest.approx(_nll([[1, 0], [0.5, 2]], [0, 1]), rel=1e-6)
    adjusted = loss.decision_logits(torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(adjusted, torch.tensor([[0.5 - math.log(0.75), -math.log(0.25)]]))
    assert int(adjusted.argmax()) == 1  # the rare class wins a close call after adjustment


def test_focal_loss_by_hand() -> None:
    p0 = math.exp(1) / (math.exp(1) + 1)
    p1 = math.exp(2) / (math.exp(0.5) + math.exp(2))
    expected = (-(1 - p0) ** 2 * math.log(p0) - (1 - p1) ** 2 * math.log(p1)) / 2
    assert float(ImbalanceLoss("focal", COUNTS, gamma=2.0)(LOGITS, TARGETS)) == pytest.approx(expected, rel=1e-6)
    assert float(ImbalanceLoss("focal", COUNTS, gamma=0.0)(LOGITS, TARGETS)) == pytest.approx(_nll([[1, 0], [0.5, 2]], [0, 1]))


def test_class_weights_inverse_and_effective_number() -> None:
    torch.testing.assert_close(class_weights(COUNTS, "inverse"), torch.tensor([0.5, 1.5]))
    raw = [(1 - 0.9) / (1 - 0.9**3), 1.0]
    expected = torch.tensor([2 * w / sum(raw) for w in raw])
    torch.testing.assert_close(class_weights(COUNTS, "effective", beta=0.9), expected)
    weighted = ImbalanceLoss("weighted_ce", COUNTS)(LOGITS, TARGETS)
    nll = [_nll([[1, 0]], [0]), _nll([[0.5, 2]], [1])]
    assert float(weighted) == pytest.approx((0.5 * nll[0] + 1.5 * nll[1]) / 2.0, rel=1e-6)  # torch divides by sum of weights


def _bcl_reference(z: torch.Tensor, prototypes: torch.Tensor, targets: list[int], t: float) -> float:
    """The balanced contrastive loss written out with loops."""
    z = F.normalize(z, dim=1)
    items = torch.cat([z, F.normalize(prototypes, dim=1)])
    labels = targets + list(range(len(prototypes)))
    total = 0.0
    for i, yi in enumerate(targets):
        others = [j for j in range(len(items)) if j != i]
        per_class = {c: [j for j in others if labels[j] == c] for c in set(labels)}
        denominator = sum(sum(math.exp(float(z[i] @ items[j]) / t) for j in js) / len(js) for js in per_class.values() if js)
        positives = per_class[yi]
        total += -sum(float(z[i] @ items[p]) / t - math.log(denominator) for p in positives) / len(positives)
    return total / len(targets)


def test_balanced_contrastive_loss_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    z, prototypes = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    targets = [0, 0, 1, 0, 2]
    value = balanced_contrastive_loss(z, prototypes, torch.tensor(targets), 0.5)
    assert float(value) == pytest.approx(_bcl_reference(z, prototypes, targets, 0.5), rel=1e-5)


def test_sampling_weights() -> None:
    y = torch.tensor([0, 0, 0, 0, 1])
    torch.testing.assert_close(sample_weights(y, "balanced"), torch.tensor([0.25] * 4 + [1.0]))
    torch.testing.assert_close(sample_weights(y, "sqrt"), torch.tensor([0.5] * 4 + [1.0]))
    assert sample_weights(y, "none") is None
    with pytest.raises(DefectscopeError, match="sampling"):
        sample_weights(y, "oversample")


def test_folds_and_shots() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 5)
    folds = stratified_folds(labels, 5, seed=0, classes=["good", "scratch", "dent"])
    assert sorted(np.concatenate(folds).tolist()) == list(range(20))
    assert all(np.bincount(labels[f], minlength=3).tolist() == [2, 1, 1] for f in folds)
    kept = keep_shots(np.arange(20), labels, 2, seed=0)
    assert np.bincount(labels[kept]).tolist() == [10, 2, 2]
    with pytest.raises(DefectscopeError, match=r"6 labelled images of every class; scratch \(5\), dent \(5\) have fewer"):
        stratified_folds(labels, 6, seed=0, classes=["good", "scratch", "dent"])
    with pytest.raises(DefectscopeError, match=r"crack \(0\) has fewer"):  # a type with no labelled image at all
        stratified_folds(labels, 5, seed=0, classes=["good", "scratch", "dent", "crack"])


def test_config_errors_name_the_field() -> None:
    with pytest.raises(DefectscopeError, match="field 'loss'"):
        ClassifierConfig.from_dict({"loss": "hinge"})
    with pytest.raises(DefectscopeError, match="field 'folds' must be int"):
        ClassifierConfig.from_dict({"folds": 2.5})
    with pytest.raises(DefectscopeError, match="unknown field"):
        ClassifierConfig.from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize("settings", [
    {"task": "type", "freeze": 32, "epochs": 3, "folds": 3, "shots": 2, "loss": "bcl", "sampling": "sqrt"},
    {"task": "binary", "freeze": 0, "epochs": 1, "folds": 2, "image_size": 64, "hflip": True, "good_train": 5},
])
def test_cross_validation_never_scores_an_image_it_trained_on(demo_root: Path, settings: dict) -> None:
    dataset = load_dataset(demo_root)
    config = ClassifierConfig.from_dict(settings)
    result = cross_validate(dataset, config)
    pool = sorted(str(s.path) for s in dataset.test)
    assert sorted(r["path"] for r in result.records) == pool  # every labelled image scored exactly once
    for record in result.records:
        assert record["path"] not in result.usage[record["fold"]]["trained_on"]
        assert record["path"] in result.usage[record["fold"]]["scored"]
    train_good = {str(s.path) for s in dataset.train}
    for fold in result.usage:
        used = train_good & set(fold["trained_on"])
        assert used == train_good if config.good_train < 0 else len(used) == config.good_train
    if config.shots:
        assert all(max(counts[1:]) <= config.shots for counts in result.train_counts)
    assert result.classes == (["good", "broken", "contamination", "scratch"] if config.task == "type" else ["good", "defective"])
    metrics = classification_metrics(result.records, result.classes)
    true = np.array([r["true"] for r in result.records])
    predicted = np.array([r["predicted"] for r in result.records])
    assert metrics["accuracy"] == pytest.approx((true == predicted).mean())
    assert np.array(metrics["confusion"]).sum() == len(pool)
    assert set(metrics["folds"]["accuracy"]) == {"mean", "std"}
