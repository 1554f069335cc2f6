"""Score a dataset's test split with a fitted detector and compute every metric.

Maps and masks are compared in the model frame (resize, then center crop, as in the PatchCore
paper and anomalib): masks go through the model's own resize and crop, so figures are
comparable with published ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from defectscope.data.decode import learned_among
from defectscope.data.images import masks_in_frame
from defectscope.data.layout import GOOD, Dataset
from defectscope.detectors.base import Progress
from defectscope.errors import DefectscopeError
from defectscope.metrics import f1_max, image_auroc, per_defect_auroc, pixel_metrics
from defectscope.predictor import Predictor
from defectscope.thresholds import check_stated_rate


@dataclass
class Evaluation:
    """Metrics, one record per test image, and the model-frame maps and masks behind them."""

    metrics: dict
    records: list[dict]
    maps: np.ndarray | None
    masks: np.ndarray | None


def _decisions(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    called = np.asarray(scores, np.float64) >= threshold  # float64: any finite threshold compares without overflow
    tp = int((called & (labels == 1)).sum())
    fp = int((called & (labels == 0)).sum())
    fn = int((~called & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else None  # undefined (None, shown n/a) when nothing was called defective
    recall = tp / (tp + fn) if tp + fn else None  # undefined when there is no defective image
    f1 = None if precision is None or recall is None else 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": threshold,
        "accuracy": float((called == (labels == 1)).mean()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_positives": fp,
        "false_negatives": fn,
        "false_alarm_rate": fp / int((labels == 0).sum()) if (labels == 0).any() else None,
    }


def evaluate(detector: Predictor, dataset: Dataset, progress: Progress | None = None) -> Evaluation:
    """Predict the test split and compute image, pixel and per-defect metrics."""
    test = dataset.test
    if not test:
        raise DefectscopeError(f"{dataset.root} has no test images to evaluate on")
    start = time.perf_counter()
    prediction = detector.predict([s.path for s in test], map_size="input", progress=progress)
    predict_ms = (time.perf_counter() - start) / len(test) * 1000
    labels = np.array([s.label for s in test])
    defects = np.array([s.defect for s in test])
    scores = prediction.scores
    broken = np.flatnonzero(~np.isfinite(scores))
    if len(broken):
        raise DefectscopeError(f"the model gave {len(broken)} test image(s) a score that is not a finite number, e.g. "
                               f"{test[broken[0]].path}; it cannot be evaluated (refit it)")
    metrics: dict = {
        "model": detector.name,
        "backbone": detector.backbone_name,
        "frame": {"resize": list(detector.preprocess.frame_shape), "input": list(detector.preprocess.input_shape)},
        "images": len(test),
        "good": int((labels == 0).sum()),
        "defective": int((labels == 1).sum()),
        "predict_ms_per_image": predict_ms,
        "notes": [],
    }
    learned = learned_among(detector.train_digests, [s.path for s in test])
    if learned:
        metrics["notes"].append(f"{len(learned)} of the {len(test)} test images are images this model learned from "
                                f"(e.g. {learned[0]}): its metrics flatter it, and are not those of new parts")
    both = 0 < labels.sum() < len(labels)
    if both:
        f1, threshold = f1_max(labels, scores)
        metrics.update(image_auroc=image_auroc(labels, scores), image_f1_max=f1)
        metrics["at_f1_threshold"] = _decisions(labels, scores, threshold)
    else:
        metrics["notes"].append("image AUROC and F1 need both good and defective test images")
    if prediction.threshold is not None:
        metrics["at_model_threshold"] = _decisions(labels, scores, prediction.threshold)
        calibration = detector.calibration
        if calibration is not None:
            metrics["at_model_threshold"]["threshold_method"] = calibration.method
        if calibration is not None and calibration.false_alarm_rate is not None:
            metrics["at_model_threshold"].update(stated_false_alarm_rate=calibration.false_alarm_rate,
                                                 stated_interval=list(calibration.false_alarm_interval or ()))
        check = check_stated_rate(calibration, scores[labels == 0])
        if check is not None:
            metrics["at_model_threshold"]["stated_rate_check"] = asdict(check)
    per_defect = {d: {"images": int((defects == d).sum())} for d in sorted(set(defects) - {GOOD})}
    for defect, value in per_defect_auroc(defects, scores).items():
        per_defect[defect]["image_auroc"] = value
    maps = masks = None
    if prediction.maps is None:
        metrics["notes"].append(f"{detector.name} scores whole images; pixel metrics do not apply")
    else:
        maps = np.stack(prediction.maps)
        masked = [d for d in per_defect if all(s.mask is not None for s in test if s.defect == d)]
        unmasked = sorted(set(per_defect) - set(masked))
        if masked:
            masks = masks_in_frame([s.mask for s in test], detector.preprocess)  # a missing mask: empty, never scored
            unseen = [s.path for s, mask in zip(test, masks) if s.label == 1 and s.mask is not None and not mask.any()]
            if unseen:
                metrics["notes"].append(f"{len(unseen)} defective test image(s) show none of their masked pixels in "
                                        f"the model's frame (its crop leaves the defect out, or the mask marks "
                                        f"nothing), e.g. {unseen[0]}: no model of this frame can see those defects")
            kept = (defects == GOOD) | np.isin(defects, masked)
            metrics.update(pixel_metrics(masks[kept], maps[kept]))
            for defect in masked:
                keep = (defects == GOOD) | (defects == defect)
                per_defect[defect].update(pixel_metrics(masks[keep], maps[keep]))
        if unmasked:
            metrics["notes"].append(f"no mask for every image of {', '.join(unmasked)}: pixel metrics leave "
                                    f"{'that type' if len(unmasked) == 1 else 'those types'} out"
                                    + ("" if masked else " (no type has all its masks: no pixel metrics)"))
    metrics["per_defect"] = per_defect
    normalized = prediction.normalized if prediction.threshold is not None else [None] * len(test)
    records = [
        {"path": str(s.path), "defect": s.defect, "label": s.label, "score": float(score),
         "normalized": None if norm is None else float(norm)}
        for s, score, norm in zip(test, scores, normalized)
    ]
    return Evaluation(metrics, records, maps, masks)
