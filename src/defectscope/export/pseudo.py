"""Pseudo-labels: a detector's anomaly maps, thresholded, as class-agnostic 'defect' instances.

The pixel threshold is the model's region threshold unless one is given: its calibrated threshold where maps and
image scores share their scale (the image score is the map's maximum, or PatchCore's largest patch distance), else
the same rule on the cross-fitted scores of the view the map shows (`Calibration.map_threshold`). Each instance's
score is its peak map value divided by that threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from defectscope.data.decode import image_size, read_mask
from defectscope.data.layout import Dataset, Sample
from defectscope.errors import DefectscopeError
from defectscope.export.labels import (
    ExportOptions,
    check_export_target,
    collect,
    write_labels,
    write_whole,
)
from defectscope.instance_metrics import coco_ap, detected_instance, true_instances
from defectscope.predictor import Predictor
from defectscope.regions import Instance, components

CATEGORIES = ["defect"]


def map_threshold(detector: Predictor, threshold: float | None) -> float:
    if threshold is not None:
        if not (np.isfinite(threshold) and threshold > 0):
            raise DefectscopeError(f"--threshold must be a positive number, got {threshold}")
        return threshold
    if detector.calibration is None:
        raise DefectscopeError("the model has no threshold; pass --threshold")
    return detector.calibration.region_threshold


def label_categories(detector: Predictor) -> list[str]:
    """The label categories a model's pseudo-labels use: the defect types it tells apart, else one 'defect'."""
    return detector.label_types or CATEGORIES


def predicted_instances(detector: Predictor, samples: Sequence[Sample], threshold: float, min_area: int
                        ) -> dict[Path, list[Instance]]:
    """Each image's instances at its original size: an instance detector's own (confidence at or above the
    threshold), or the regions of the map above the threshold."""
    if not detector.localizes:
        raise DefectscopeError(f"{detector.name} scores whole images; pseudo-labels need a model with anomaly maps")
    prediction = detector.predict([s.path for s in samples])
    if prediction.detections is not None:
        types = label_categories(detector)
        return {sample.path: [detected_instance(d, types) for d in found if d.confidence >= threshold and d.mask.sum() >= min_area]
                for sample, found in zip(samples, prediction.detections)}
    return {sample.path: map_instances(heat, threshold, min_area, sample.path) for sample, heat in zip(samples, prediction.maps)}


def map_instances(heat: np.ndarray, threshold: float, min_area: int, name: object) -> list[Instance]:
    """The regions of one anomaly map at or above the threshold; each scored by its peak / threshold."""
    if not np.isfinite(heat).all():  # a NaN pixel is never below the threshold: no silent "no defect" region
        raise DefectscopeError(f"the model's map of {name} holds values that are not finite numbers; no regions were made")
    return [Instance(0, m, box, area, round(float(heat[m].max() / threshold), 4))
            for m, box, area in components(heat >= threshold, min_area)]


def export_pseudo_labels(dataset: Dataset, detector: Predictor, model_path: Path, out: Path, options: ExportOptions,
                         threshold: float | None = None, force: bool = False) -> dict:
    """Label the test split's images with the detector's maps, in any export format."""
    out = Path(out)
    check_export_target(out, dataset, force)
    threshold = map_threshold(detector, threshold)
    found = predicted_instances(detector, dataset.test, threshold, options.min_area)
    categories = label_categories(detector)
    images = collect(dataset.test, categories, options, lambda s: found[s.path])
    provenance = {"labels": "model", "model": str(model_path), "threshold": threshold, "dataset": str(dataset.root)}
    return write_whole(out, lambda staging: write_labels(images, categories, staging, options, provenance, out))


def agreement(dataset: Dataset, detector: Predictor, threshold: float | None = None, min_area: int = 1) -> dict:
    """How well pseudo-labels match the masks on the test split: COCO box/mask AP and mean per-image mask IoU."""
    threshold = map_threshold(detector, threshold)
    samples = list(dataset.test)
    found = predicted_instances(detector, samples, threshold, min_area)
    truth = true_instances(samples, list(dataset.defect_types), min_area)
    scores = coco_ap(truth, [found[s.path] for s in samples], [image_size(s.path) for s in samples])
    ious = []
    for sample in samples:
        if sample.label and sample.mask:
            truth_mask = read_mask(sample.mask)
            predicted = np.zeros_like(truth_mask)
            for instance in found[sample.path]:
                predicted |= instance.mask
            ious.append((truth_mask & predicted).sum() / max((truth_mask | predicted).sum(), 1))
    return {"threshold": threshold, **scores, "mean_mask_iou": float(np.mean(ious)) if ious else None,
            "predicted_instances": sum(len(found[s.path]) for s in samples), "true_instances": sum(map(len, truth))}
