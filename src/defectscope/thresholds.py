"""Decision thresholds: from good images only (percentile or mean + k*std), or F1-optimal with labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import precision_recall_curve

from defectscope.errors import DefectscopeError

METHODS = ("sigma", "percentile", "f1", "manual")


@dataclass(frozen=True)
class Calibration:
    """A threshold on raw scores, how it was chosen, and the good-score statistics behind it."""

    threshold: float
    method: str
    param: float
    good_mean: float
    good_std: float
    good_count: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


def calibrate(good_scores: np.ndarray, method: str = "sigma", param: float = 3.0) -> Calibration:
    """Threshold from held-out good scores: mean + param*std ('sigma') or the param-th percentile."""
    scores = np.asarray(good_scores, dtype=np.float64)
    if scores.size == 0:
        raise DefectscopeError("no held-out good images to calibrate a threshold on")
    if method == "sigma":
        threshold = scores.mean() + param * scores.std()
    elif method == "percentile":
        if not 0 < param <= 100:
            raise DefectscopeError(f"percentile must be in (0, 100], got {param}")
        threshold = np.percentile(scores, param)
    else:
        raise DefectscopeError(f"threshold method from good images must be 'sigma' or 'percentile', got '{method}'")
    return Calibration(float(threshold), method, float(param), float(scores.mean()), float(scores.std()), int(scores.size))


def f1_optimal(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1, threshold reaching it): a score >= threshold is called defective."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        raise DefectscopeError("the F1-optimal threshold needs both good and defective labelled images")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    return float(f1[best]), float(thresholds[best])
