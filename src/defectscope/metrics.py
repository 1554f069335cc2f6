"""Anomaly-detection metrics as defined in the MVTec AD literature.

- image AUROC: ROC area of image scores, good (0) vs defective (1).
- pixel AUROC: ROC area over every pixel of every test image, mask as label.
- AUPRO (Bergmann et al., 2021): per-region overlap (PRO) of each connected ground-truth region
  (8-connected, per image), averaged over regions, against the false-positive rate of the good
  pixels; the area under that curve up to FPR 0.3, divided by 0.3 so a perfect map scores 1.
- F1-max: the best F1 over all image-score thresholds, with that threshold.
- per-defect AUROC: image AUROC of the good test images against one defect type.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from defectscope.errors import DefectscopeError, InputError

AUPRO_FPR_LIMIT = 0.3


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC area over all pixels; masks are boolean N x H x W, maps float N x H x W."""
    return pixel_metrics(masks, maps, pro=False)["pixel_auroc"]


def region_weights(masks: np.ndarray) -> np.ndarray:
    """The weight 1 / (regions * area of its region) of each defect pixel (8-connected regions per image), in the
    order of the defect pixels in the flattened masks."""
    structure = np.ones((3, 3), dtype=bool)
    region_ids, regions = [], 0
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=structure)
        region_ids.append(labelled[mask] + regions - 1)
        regions += count
    if regions == 0:
        raise InputError("AUPRO needs at least one defect region in the masks")
    ids = np.concatenate(region_ids)
    return (1.0 / (regions * np.bincount(ids, minlength=regions)))[ids]


def ranked_curves(masks: np.ndarray, maps: np.ndarray, pro: bool = True) -> dict[str, np.ndarray]:
    """Exact FPR, TPR and (with `pro`) PRO, highest threshold first, from one sort of the pixels.

    A threshold at each distinct map value of a defect pixel and just above it: between two of them only good
    pixels pass, TPR and PRO stay put, and the points the other distinct values would add lie on a straight line
    (the areas are the same). Each defect pixel carries weight 1 / (regions * its region's area), so the sum of the
    weights above a threshold is the mean per-region overlap there. Memory: the sort's order and values, and
    arrays of the defect pixels' size, never a curve point per pixel.
    """
    masks = masks.astype(bool, copy=False).reshape(-1)
    positives = int(np.count_nonzero(masks))
    negatives = masks.size - positives
    if negatives == 0 or positives == 0:
        raise InputError("pixel metrics need both defect and defect-free pixels in the masks")
    if not np.isfinite(maps).all():
        raise InputError("maps hold values that are not finite numbers")
    flat = maps.reshape(-1)
    order = np.argsort(flat, kind="stable")
    values = flat[order]  # ascending
    defect_at = np.flatnonzero(masks[order])  # sorted positions of the defect pixels
    levels = np.unique(values[defect_at])[::-1]
    below = np.empty(2 * len(levels) + 2, np.int64)  # pixels under each threshold: none pass, ..., all pass
    below[0], below[-1] = masks.size, 0
    below[1:-1:2] = np.searchsorted(values, levels, side="right")  # just above a level
    below[2:-1:2] = np.searchsorted(values, levels, side="left")  # at it
    del values
    below = below[np.r_[True, np.diff(below) != 0]]  # a level with no good pixel just above it adds no point
    hits = len(defect_at) - np.searchsorted(defect_at, below)  # defect pixels at or above each threshold
    passed = masks.size - below
    curves = {"fpr": (passed - hits) / negatives, "tpr": hits / positives}
    if pro:
        weights = region_weights(masks.reshape(maps.shape))  # in pixel order; ranked below from the highest value
        pixel_rank = np.searchsorted(np.flatnonzero(masks), order[defect_at[::-1]])
        curves["pro"] = np.r_[0.0, np.cumsum(weights[pixel_rank])][hits]
    return curves


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) at every distinct map value, highest threshold first."""
    curves = ranked_curves(masks, maps)
    return curves["fpr"], curves["pro"]


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalized area under the PRO curve up to `fpr_limit`."""
    return area_under_pro(*pro_curve(masks, maps), fpr_limit)


def area_under_pro(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Area under a PRO curve up to `fpr_limit` (interpolated at the limit), divided by `fpr_limit`."""
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    xs, ys = fpr[:cut], pro[:cut]
    if cut < len(fpr) and xs[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        xs = np.r_[xs, fpr_limit]
        ys = np.r_[ys, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)]
    return float(np.trapezoid(ys, xs) / fpr_limit)


def f1_max(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """(best image F1, the threshold reaching it): a score >= threshold is called defective."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        raise DefectscopeError("the F1-optimal threshold needs both good and defective labelled images")
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores))
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    return float(f1[best]), float(thresholds[best])


def pixel_metrics(masks: np.ndarray, maps: np.ndarray, pro: bool = True) -> dict[str, float]:
    """Pixel AUROC and (with `pro`) AUPRO of model-frame maps against masks (N x H x W each), from one sort of the pixels."""
    curves = ranked_curves(masks, maps, pro)
    metrics = {"pixel_auroc": float(np.trapezoid(curves["tpr"], curves["fpr"]))}
    if pro:
        metrics["aupro"] = area_under_pro(curves["fpr"], curves["pro"])
    return metrics


def per_defect_auroc(defects: Sequence[str], scores: Sequence[float], good: str = "good") -> dict[str, float]:
    """Image AUROC of the good images against each defect type separately."""
    defects = np.asarray(defects)
    scores = np.asarray(scores)
    out = {}
    for defect in sorted(set(defects) - {good}):
        keep = (defects == good) | (defects == defect)
        if (defects == good).any():
            out[str(defect)] = image_auroc(defects[keep] == defect, scores[keep])
    return out
