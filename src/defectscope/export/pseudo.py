"""Pseudo-labels: a detector's anomaly maps, thresholded, as class-agnostic 'defect' instances.

The pixel threshold is the model's calibrated threshold unless one is given (maps and image
scores share their scale: the image score is the map's maximum, or PatchCore's largest patch
distance). Each instance's score is its peak map value divided by the threshold.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from defectscope.data.decode import read_mask
from defectscope.data.layout import Dataset, Sample
from defectscope.detectors.base import MapModel
from defectscope.errors import DefectscopeError
from defectscope.export.instances import Instance, components
from defectscope.export.labels import (
    ExportOptions,
    check_export_target,
    coco_document,
    collect,
    write_labels,
    write_whole,
)

CATEGORIES = ["defect"]


def map_threshold(detector: MapModel, threshold: float | None) -> float:
    if threshold is not None:
        if not (np.isfinite(threshold) and threshold > 0):
            raise DefectscopeError(f"--threshold must be a positive number, got {threshold}")
        return threshold
    if detector.calibration is None:
        raise DefectscopeError("the model has no threshold; pass --threshold")
    return detector.calibration.threshold


def predicted_instances(detector: MapModel, samples: Sequence[Sample], threshold: float, min_area: int
                        ) -> dict[Path, list[Instance]]:
    """Instances of each image's map above the threshold, at the image's original size."""
    if not detector.localizes:
        raise DefectscopeError(f"{detector.name} scores whole images; pseudo-labels need a model with anomaly maps")
    maps = detector.predict([s.path for s in samples]).maps
    return {sample.path: map_instances(heat, threshold, min_area, sample.path) for sample, heat in zip(samples, maps)}


def map_instances(heat: np.ndarray, threshold: float, min_area: int, name: object) -> list[Instance]:
    """The regions of one anomaly map at or above the threshold; each scored by its peak / threshold."""
    if not np.isfinite(heat).all():  # a NaN pixel is never below the threshold: no silent "no defect" region
        raise DefectscopeError(f"the model's map of {name} holds values that are not finite numbers; no regions were made")
    return [Instance(0, m, box, area, round(float(heat[m].max() / threshold), 4))
            for m, box, area in components(heat >= threshold, min_area)]


def export_pseudo_labels(dataset: Dataset, detector: MapModel, model_path: Path, out: Path, options: ExportOptions,
                         threshold: float | None = None, force: bool = False) -> dict:
    """Label the test split's images with the detector's maps, in any export format."""
    out = Path(out)
    check_export_target(out, dataset, force)
    threshold = map_threshold(detector, threshold)
    found = predicted_instances(detector, dataset.test, threshold, options.min_area)
    images = collect(dataset.test, CATEGORIES, options, lambda s: found[s.path])
    provenance = {"labels": "model", "model": str(model_path), "threshold": threshold, "dataset": str(dataset.root)}
    return write_whole(out, lambda staging: write_labels(images, CATEGORIES, staging, options, provenance, out))


def _quiet_eval(truth: dict, predictions: list[dict], kind: str) -> tuple[float, float]:
    """COCO AP@[.5:.95] and AP@.5 for 'bbox' or 'segm', with pycocotools' printing silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        if not predictions:
            return 0.0, 0.0
        dt = gt.loadRes(predictions)
        evaluation = COCOeval(gt, dt, kind)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


def agreement(dataset: Dataset, detector: MapModel, threshold: float | None = None, min_area: int = 1) -> dict:
    """How well pseudo-labels match the masks on the test split: COCO box/mask AP and mean per-image mask IoU."""
    threshold = map_threshold(detector, threshold)
    samples = list(dataset.test)
    found = predicted_instances(detector, samples, threshold, min_area)
    options = ExportOptions("coco", val_fraction=0, min_area=min_area, rle=True)
    truth = coco_document(collect(samples, CATEGORIES, options, lambda s: [
        Instance(0, m, box, area) for m, box, area in (components(read_mask(s.mask), min_area) if s.label else [])]),
        CATEGORIES, options)
    for annotation in truth["annotations"]:
        annotation["iscrowd"] = 0  # RLE is only the exact encoding here, not a crowd region
    # same samples, same order: image ids agree with the truth document's
    predicted = coco_document(collect(samples, CATEGORIES, options, lambda s: found[s.path]), CATEGORIES, options)["annotations"]
    common = [{"image_id": a["image_id"], "category_id": 1, "score": a["score"]} for a in predicted]
    boxes = [{**c, "bbox": a["bbox"]} for c, a in zip(common, predicted)]
    masks = [{**c, "segmentation": a["segmentation"]} for c, a in zip(common, predicted)]
    box_ap, box_ap50 = _quiet_eval(truth, boxes, "bbox")
    mask_ap, mask_ap50 = _quiet_eval(truth, masks, "segm")
    ious = []
    for sample in samples:
        if sample.label and sample.mask:
            truth_mask = read_mask(sample.mask)
            predicted = np.zeros_like(truth_mask)
            for instance in found[sample.path]:
                predicted |= instance.mask
            ious.append((truth_mask & predicted).sum() / max((truth_mask | predicted).sum(), 1))
    return {"threshold": threshold, "box_ap": box_ap, "box_ap50": box_ap50, "mask_ap": mask_ap, "mask_ap50": mask_ap50,
            "mean_mask_iou": float(np.mean(ious)) if ious else None, "predicted_instances": len(boxes),
            "true_instances": len(truth["annotations"])}
