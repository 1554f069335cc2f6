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
    """Per-pixel weight 1 / (regions * area of its region) for defect pixels (8-connected regions per image), 0 elsewhere."""
    structure = np.ones((3, 3), dtype=bool)
    region_ids = np.zeros(masks.shape, dtype=np.int32)
    regions = 0
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=structure)
        region_ids[index] = np.where(labelled > 0, labelled + regions, 0)
        regions += count
    if regions == 0:
        raise InputError("AUPRO needs at least one defect region in the masks")
    areas = np.bincount(region_ids.reshape(-1), minlength=regions + 1).astype(np.float64)
    per_region = np.r_[0.0, 1.0 / (regions * areas[1:])]
    return per_region[region_ids.reshape(-1)]


def ranked_curves(masks: np.ndarray, maps: np.ndarray, pro: bool = True) -> dict[str, np.ndarray]:
    """Exact FPR, TPR and (with `pro`) PRO at every distinct map value, highest threshold first, from one sort.

    PRO: each defect pixel carries weight 1 / (regions * its region's area), so the running sum of
    weights above a threshold is the mean per-region overlap at that threshold.
    """
    masks = masks.astype(bool).reshape(-1)
    positives = int(masks.sum())
    negatives = masks.size - positives
    if negatives == 0 or positives == 0:
        raise InputError("pixel metrics need both defect and defect-free pixels in the masks")
    if not np.isfinite(maps).all():
        raise InputError("maps hold values that are not finite numbers")
    weights = region_weights(masks.reshape(maps.shape)) if pro else None
    order = np.argsort(-maps.reshape(-1), kind="stable")
    values = maps.reshape(-1)[order]
    ends = np.flatnonzero(np.r_[values[1:] != values[:-1], True])
    del values
    defect = masks[order]
    curves = {"fpr": np.r_[0.0, np.cumsum(~defect, dtype=np.int64)[ends] / negatives],
              "tpr": np.r_[0.0, np.cumsum(defect, dtype=np.int64)[ends] / positives]}
    if pro:
        sorted_weights = weights[order]
        del weights, order
        curves["pro"] = np.r_[0.0, np.cumsum(sorted_weights, out=sorted_weights)[ends]]
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
