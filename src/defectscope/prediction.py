"""Predictions: raw scores, maps, the threshold, verdicts that fail closed; the batch loop every predictor shares."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.data.batches import iterate_batches
from defectscope.data.decode import ImageSource
from defectscope.data.frame import Preprocess
from defectscope.errors import DefectscopeError
from defectscope.maps import resize_maps

@dataclass
class Detection:
    """One defect instance a detector found: its type, confidence, box (x0, y0, x1, y1, pixel edges) and mask."""

    type: str
    confidence: float
    box: tuple[float, float, float, float]
    mask: np.ndarray  # bool, the size of the image (or frame) the box refers to

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the mask as COCO's uncompressed RLE (column-major runs, starting with background)."""
        flat = np.asarray(self.mask, dtype=np.int8).T.ravel()
        edges = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        return {"type": self.type, "confidence": round(self.confidence, 6), "box": [round(v, 2) for v in self.box],
                "area": int(flat.sum()), "mask": {"size": list(self.mask.shape), "counts": [0, *runs] if flat[:1].any() else runs}}


@dataclass
class Scored:
    """What a predictor's `score_frames` gives for a batch of frames: image scores (N), finished model-frame maps
    (N x h x w, None for image-level models) and, from models that find instances, each frame's Detections."""

    scores: np.ndarray
    maps: np.ndarray | None
    detections: list[list[Detection]] | None = None


ScoreFrames = Callable[[np.ndarray], Scored]  # uint8 frames N x 3 x h x w -> Scored


@dataclass
class Prediction:
    """Raw scores (N), maps (one HxW array per image, or None for image-level models) and verdicts.

    An image that could not be scored has score NaN, map None and its reason in `errors`.
    Instance detectors also give each image's `detections` (at the maps' size).
    """

    scores: np.ndarray
    maps: list[np.ndarray | None] | None
    threshold: float | None = None
    errors: list[str | None] | None = None
    detections: list[list[Detection]] | None = None

    @property
    def normalized(self) -> np.ndarray:
        """Scores divided by the threshold: 1.0 is the decision boundary."""
        if self.threshold is None:
            raise DefectscopeError("this model has no threshold; fit it with calibration or set one with evaluate")
        with np.errstate(over="ignore"):  # a tiny threshold gives inf: still above 1.0, as it should be
            return self.scores.astype(np.float64) / self.threshold

    @property
    def verdicts(self) -> list[str]:
        """'defective', 'good', or 'error' for any score that is not a finite number (never 'good')."""
        if self.threshold is None:
            raise DefectscopeError("this model has no threshold; fit it with calibration or set one with evaluate")
        return ["error" if not np.isfinite(s) else "defective" if s >= self.threshold else "good" for s in self.scores.tolist()]


def place_maps(frame: np.ndarray, sizes: np.ndarray, failed: np.ndarray, preprocess: Preprocess,
               map_size: str | tuple[int, int]) -> list[np.ndarray | None]:
    """Model-frame maps N x h x w -> one map per image at `map_size` ('original', 'input' or (H, W)); None where failed."""
    if map_size == "input":
        placed = list(frame)
    elif isinstance(map_size, tuple):
        placed = list(resize_maps(frame, map_size))
    else:
        placed = [None if bad else preprocess.to_original(m, int(h), int(w)) for m, (h, w), bad in zip(frame, sizes, failed)]
    return [None if bad else m for m, bad in zip(placed, failed)]


def place_detections(found: list[Detection], size: tuple[int, int], preprocess: Preprocess,
                     map_size: str | tuple[int, int]) -> list[Detection]:
    """Frame-coordinate detections of one image -> at `map_size` ('original' = `size`, 'input', or (H, W))."""
    if map_size == "input":
        return found
    height, width = size if map_size == "original" else map_size
    if map_size == "original":
        return [Detection(d.type, d.confidence, preprocess.box_to_original(d.box, height, width),
                          preprocess.to_original(d.mask.astype(np.float32), height, width) >= 0.5) for d in found]
    rows, cols = preprocess.input_shape
    scale = np.array([width / cols, height / rows] * 2)
    return [Detection(d.type, d.confidence, tuple((np.array(d.box) * scale).tolist()),
                      resize_maps(d.mask[None].astype(np.float32), (height, width))[0] >= 0.5) for d in found]


def predict_frames(images: Sequence[ImageSource], preprocess: Preprocess, batch_size: int, score_frames: ScoreFrames,
                   threshold: float | None, localizes: bool, map_size: str | tuple[int, int] = "original",
                   keep_going: bool = False, progress: Callable[[int], None] | None = None) -> Prediction:
    """Decode and frame images batch by batch, score them with `score_frames`, and place the maps (and detections).

    An unreadable image stops the call, or with `keep_going` gets score NaN, map None and its reason.
    """
    if not (map_size in ("original", "input") or isinstance(map_size, tuple)):
        raise DefectscopeError(f"map_size must be 'original', 'input' or (height, width), got {map_size!r}")
    errors: list[str | None] | None = [] if keep_going else None
    scores, maps, detections, finds = [], [], [], False
    for batch, sizes in iterate_batches(images, preprocess, batch_size, errors=errors):
        scored = score_frames(batch)
        failed = sizes[:, 0] == 0
        scores.append(np.asarray(scored.scores, dtype=np.float32).reshape(len(batch)).copy())
        scores[-1][failed] = np.nan
        if scored.maps is not None:
            maps += place_maps(scored.maps, sizes, failed, preprocess, map_size)
        if scored.detections is not None:
            finds = True
            detections += [[] if bad else place_detections(image, (int(h), int(w)), preprocess, map_size)
                           for image, (h, w), bad in zip(scored.detections, sizes, failed)]
        if progress:
            progress(len(batch))
    joined = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    return Prediction(joined, maps if localizes else None, threshold, errors, detections if finds else None)


def prediction_rows(paths: Sequence[Path], prediction: Prediction) -> list[dict[str, Any]]:
    """One JSON-ready record per image: path, score, normalized score, verdict, and the reason of an error."""
    errors = prediction.errors or [None] * len(paths)
    normalized = prediction.normalized if prediction.threshold else [None] * len(paths)
    verdicts = prediction.verdicts if prediction.threshold else ["unknown (no threshold)"] * len(paths)
    rows = []
    for path, score, norm, verdict, error in zip(paths, prediction.scores, normalized, verdicts, errors):
        finite = bool(np.isfinite(score))
        row = {"path": str(path), "score": float(score) if finite else None,
               "normalized": float(norm) if finite and norm is not None else None,
               "verdict": "error" if error or not finite else verdict}
        if row["verdict"] == "error":
            row["error"] = error or "the model produced a score that is not a finite number"
        elif prediction.detections is not None:
            row["detections"] = [d.to_dict() for d in prediction.detections[len(rows)]]
        rows.append(row)
    return rows
