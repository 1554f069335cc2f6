"""Metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from defectscope.errors import InputError
from defectscope.metrics import (aupro, f1_max, image_auroc, per_defect_auroc, pixel_auroc, pixel_metrics, pro_curve,
                                 ranked_curves)
from defectscope.thresholds import calibrate


def test_aupro_hand_built_case() -> None:
    # Image 0: a 2-pixel region, image 1: a 4-pixel region; 10 good pixels in all.
    masks = np.zeros((2, 2, 4), bool)
    masks[0, 0, :2] = True
    masks[1, 1, :] = True
    maps = np.zeros((2, 2, 4))
    maps[0, 0, :2] = [0.9, 0.2]       # region A: one pixel high, one low
    maps[1, 1, :] = [0.8, 0.8, 0.8, 0.8]  # region B: all high
    maps[0, 1, 0] = 0.85               # one good pixel scores high
    fpr, pro = pro_curve(masks, maps)
    # thresholds 0.9, 0.85, 0.8, 0.2, 0.0 -> PRO = mean over regions of overlap
    assert np.allclose(fpr, [0, 0, 0.1, 0.1, 0.1, 1.0])
    assert np.allclose(pro, [0, 0.25, 0.25, 0.75, 1.0, 1.0])
    # Area up to FPR 0.3: PRO 0.25 over FPR 0..0.1, then 1.0 over FPR 0.1..0.3.
    expected = (0.25 * 0.1 + 1.0 * 0.2) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected)


def test_perfect_and_inverted_maps() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((3, 16, 16)) > 0.9
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, (~masks).astype(float)) == pytest.approx(0.0)
    maps = rng.random((3, 16, 16))
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_pixel_metrics_from_one_sort_match_sklearn_and_aupro_with_ties() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((4, 12, 10)) > 0.8
    maps = np.round(rng.random((4, 12, 10)) + 0.3 * masks, 1).astype(np.float32)  # coarse values: many ties
    metrics = pixel_metrics(masks, maps)
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert metrics["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert pixel_metrics(masks, maps, pro=False) == {"pixel_auroc": metrics["pixel_auroc"]}
    with pytest.raises(InputError, match="both defect and defect-free"):
        pixel_metrics(np.zeros_like(masks), maps)
    maps[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="not finite"):
        pixel_metrics(masks, maps)


def test_the_curves_hold_points_for_the_defect_pixels_not_for_every_pixel() -> None:
    """A test set's maps hold tens of millions of distinct values: a curve point per value would take gigabytes."""
    rng = np.random.default_rng(2)
    masks = np.zeros((6, 64, 64), bool)
    masks[2, 10:13, 20:24] = masks[4, 40:42, 5:9] = True  # 20 defect pixels among 24,576
    maps = rng.random(masks.shape) + 0.5 * masks
    curves = ranked_curves(masks, maps)
    assert len(curves["fpr"]) <= 2 * masks.sum() + 2
    assert np.trapezoid(curves["tpr"], curves["fpr"]) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert curves["pro"][-1] == pytest.approx(1.0) and (np.diff(curves["fpr"]) >= 0).all()


def test_image_metrics_match_sklearn() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.9, 0.7])
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(f1_score(labels, scores >= threshold))
    assert f1 == pytest.approx(max(f1_score(labels, scores >= t) for t in scores))


def test_per_defect_auroc() -> None:
    defects = ["good", "good", "dent", "dent", "hole"]
    scores = [0.1, 0.5, 0.6, 0.2, 0.9]
    assert per_defect_auroc(defects, scores) == {"dent": 0.75, "hole": 1.0}  # dent beats good in 3 of 4 pairs


def test_threshold_from_good_scores_only() -> None:
    good = np.array([1.0, 2.0, 3.0, 4.0])
    assert calibrate(good, "sigma", 2.0).threshold == pytest.approx(2.5 + 2 * np.std(good))
    assert calibrate(good, "percentile", 100).threshold == 4.0
