"""COCO box and mask AP of predicted defect instances against the masks, overall and per defect type.

One rule for every source of instances (a detector's typed instances, or class-agnostic regions of
anomaly maps), so their numbers compare: overall AP ignores the type (every predicted region against
every true region); a defect type's AP is computed on the good images and that type's images, where
typed predictions must carry that type and class-agnostic ones count as it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from defectscope.data.decode import image_size, read_mask
from defectscope.data.layout import Sample
from defectscope.metrics import image_auroc
from defectscope.prediction import Detection
from defectscope.regions import Instance, components, rle

AGNOSTIC = -1  # the category of a region that carries no defect type
AP_KEYS = ("box_ap", "box_ap50", "mask_ap", "mask_ap50")


def true_instances(samples: Sequence[Sample], types: list[str], min_area: int = 1) -> list[list[Instance]]:
    """Each image's true instances: the connected regions of its mask, of its defect type (none for good images)."""
    return [[Instance(types.index(s.defect), mask, box, area) for mask, box, area in components(read_mask(s.mask), min_area)]
            if s.label and s.mask else [] for s in samples]


def detected_instance(detection: Detection, types: list[str]) -> Instance:
    """A detector's typed detection as an Instance (box x, y, width, height; scored by its confidence)."""
    x0, y0, x1, y1 = detection.box
    return Instance(types.index(detection.type), detection.mask, (x0, y0, x1 - x0, y1 - y0), int(detection.mask.sum()),
                    detection.confidence)


def _document(images: Sequence[list[Instance]], shapes: Sequence[tuple[int, int]], scored: bool) -> dict | list[dict]:
    """A COCO ground-truth document (or, `scored`, a result list) of one category, ids in image order."""
    annotations = []
    for image_id, (instances, (height, width)) in enumerate(zip(images, shapes), start=1):
        for instance in instances:
            x, y, w, h = instance.box
            entry = {"image_id": image_id, "category_id": 1, "bbox": [x, y, w, h], "area": instance.area,
                     "segmentation": rle(instance.mask)}
            if scored:
                entry["score"] = float(instance.score if instance.score is not None else 1.0)
            else:
                entry.update(id=len(annotations) + 1, iscrowd=0)
            annotations.append(entry)
    if scored:
        return annotations
    return {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(shapes, start=1)],
            "categories": [{"id": 1, "name": "defect"}], "annotations": annotations}


def coco_ap(truth: Sequence[list[Instance]], predicted: Sequence[list[Instance]], shapes: Sequence[tuple[int, int]]
            ) -> dict[str, float]:
    """Box and mask AP@[.5:.95] and AP@.5 of predicted against true instances (one category), quietly."""
    document = _document(truth, shapes, scored=False)
    results = _document(predicted, shapes, scored=True)
    if not document["annotations"]:
        return dict.fromkeys(AP_KEYS, float("nan"))  # nothing to find: AP is undefined
    if not results:
        return dict.fromkeys(AP_KEYS, 0.0)
    scores = {}
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = document
        ground.createIndex()
        found = ground.loadRes(results)
        for kind, prefix in (("bbox", "box"), ("segm", "mask")):
            evaluation = COCOeval(ground, found, kind)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            scores[f"{prefix}_ap"], scores[f"{prefix}_ap50"] = float(evaluation.stats[0]), float(evaluation.stats[1])
    return scores


def instance_metrics(samples: Sequence[Sample], predicted: Sequence[list[Instance]], types: list[str],
                     min_area: int = 1) -> dict[str, dict[str, float]]:
    """{'overall': AP, and one entry per defect type} for instances predicted on `samples` (at each image's size)."""
    truth = true_instances(samples, types, min_area)
    shapes = [image_size(s.path) for s in samples]
    metrics = {"overall": coco_ap(truth, predicted, shapes)}
    for number, name in enumerate(types):
        keep = [i for i, s in enumerate(samples) if not s.label or s.defect == name]
        metrics[name] = coco_ap([truth[i] for i in keep],
                                [[p for p in predicted[i] if p.category in (number, AGNOSTIC)] for i in keep],
                                [shapes[i] for i in keep])
    return metrics


def per_fold(samples: Sequence[Sample], predicted: Sequence[list[Instance]], scores: np.ndarray, folds: Sequence[int],
             types: list[str]) -> list[dict[str, float]]:
    """Image AUROC and overall AP of each fold's held-out images (the spread of a k-fold estimate)."""
    truth, shapes, folds = true_instances(samples, types), [image_size(s.path) for s in samples], np.asarray(folds)
    labels, scores = np.array([s.label for s in samples]), np.asarray(scores)
    results = []
    for fold in sorted(set(folds.tolist())):
        rows = np.flatnonzero(folds == fold)
        results.append({"image_auroc": image_auroc(labels[rows], scores[rows]),
                        **coco_ap([truth[i] for i in rows], [predicted[i] for i in rows], [shapes[i] for i in rows])})
    return results
