"""Decision thresholds: from good images only (percentile or mean + k*std), or F1-optimal with labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from defectscope.errors import DefectscopeError
from defectscope.metrics import f1_max

GOOD_ONLY_METHODS = ("sigma", "percentile")
MIN_CALIBRATION_IMAGES = 20  # fewer held-out good images leave the threshold to chance


@dataclass(frozen=True)
class Calibration:
    """A threshold on raw scores, how it was chosen, and the good-score statistics behind it."""

    threshold: float
    method: str
    param: float
    good_mean: float
    good_std: float
    good_count: int
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


def few_images_warning(count: int, std: float) -> str | None:
    """A warning when a threshold rests on too few held-out good images (or on no spread at all)."""
    if count >= MIN_CALIBRATION_IMAGES and std > 0:
        return None
    spread = " with zero spread" if std <= 0 else ""
    return (f"the threshold rests on {count} held-out good image(s){spread}; at least {MIN_CALIBRATION_IMAGES} are "
            "needed for a stable one: add good training images, or set the threshold with labelled images")


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
    std = float(scores.std())
    return Calibration(float(threshold), method, float(param), float(scores.mean()), std, int(scores.size),
                       few_images_warning(int(scores.size), std))


def f1_calibration(labels: np.ndarray, scores: np.ndarray, previous: Calibration | None) -> Calibration:
    """The F1-optimal threshold on labelled scores, keeping the good-image statistics of the previous calibration."""
    f1, threshold = f1_max(labels, scores)
    return Calibration(threshold, "f1", f1, previous.good_mean if previous else 0.0, previous.good_std if previous else 0.0,
                       previous.good_count if previous else 0)
