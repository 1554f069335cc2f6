"""PatchCore's frame chosen per product from its good images alone.

Each candidate frame (resize / crop / patch grid) is fitted on a seeded part of the training images
and scores the held-out rest: as they are, and with each kind of synthetic defect pasted into each
(`data.defects`: thin scratches, small spots, cut-paste patches, noise blobs, at the product's own
scale). Each candidate's recall is the share of synthetic defects above the held-out good scores' 1%
tail (a normal fit, mean + 2.33 sd). The cheapest candidate (fewest patches per image) whose recall is
within one standard error of the best wins: a costlier frame must beat it by more than the
measurement's noise. No defective image and no test label is used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from defectscope.backbones import Backbone
from defectscope.data.decode import read_image
from defectscope.data.defects import KINDS, synthetic_defect
from defectscope.detectors.patchcore import PatchCore, PatchCoreConfig

CANDIDATES = {  # name -> the frame fields it sets; every other setting is the user's
    "288/256 s8": {"image_size": 288, "crop": 256, "patch_stride": 8},
    "352/320 s8": {"image_size": 352, "crop": 320, "patch_stride": 8},
    "352/320 s16": {"image_size": 352, "crop": 320, "patch_stride": 16},
    "416/384 s16": {"image_size": 416, "crop": 384, "patch_stride": 16},
}
FRAME_FIELDS = ("image_size", "crop", "patch_stride")  # setting any of them pins the frame
REFERENCE_PATCHES = (320 // 16) ** 2  # the patches per image that the coreset ratio is stated for (352/320 s16)
FIT_IMAGES, HELD_IMAGES = 32, 16  # the search fits on at most 32 good images and scores 16 others
DEFECTS_PER_KIND = 2  # synthetic defects of each kind per held-out image (16 x 4 x 2 = 128: a recall's se <= 0.044)
MIN_IMAGES = 12  # fewer training images: no search, the default frame
MAX_PIXELS = 4_000_000  # held-out images are shrunk to this before defects are pasted (memory stays bounded)
TAIL_Z = 2.326  # a normal distribution's 1% upper tail, in standard deviations


def _held_out(paths: Sequence[Any], rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The held-out good images (decoded, at most MAX_PIXELS) and, for each, DEFECTS_PER_KIND copies per kind of
    synthetic defect."""
    good = []
    for path in paths:
        image = read_image(path) if not isinstance(path, np.ndarray) else path
        scale = min(1.0, (MAX_PIXELS / (image.shape[0] * image.shape[1])) ** 0.5)
        good.append(image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    defective = [synthetic_defect(image, kind, rng, good[(i + 1) % len(good)]).image
                 for i, image in enumerate(good) for kind in KINDS * DEFECTS_PER_KIND]
    return good, defective


def frame_settings(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """A candidate's frame fields and its coreset ratio: every candidate keeps the memory rows per image that the
    ratio gives at 352/320 s16, so the memory stays the same size whatever the patch grid."""
    frame, patches = CANDIDATES[name], patches_per_image(name)
    ratio = float(settings.get("coreset_ratio", PatchCoreConfig.coreset_ratio))
    return {**frame, "coreset_ratio": min(1.0, ratio * REFERENCE_PATCHES / patches)}


def separation(good: np.ndarray, defective: np.ndarray) -> dict[str, float]:
    """How well scores tell defective from good: recall above the good scores' 1% tail, and the mean margin in sd."""
    mean, std = float(good.mean()), max(float(good.std()), 1e-12)
    margins = np.clip((defective - mean) / std, -10, 10)
    return {"recall_at_1pct": float((margins >= TAIL_Z).mean()), "mean_margin_sd": float(margins.mean())}


def patches_per_image(name: str) -> int:
    """A candidate's cost: the patches of one (square) image, which the coreset, the memory and the search scale with."""
    frame = CANDIDATES[name]
    return (frame["crop"] // frame["patch_stride"]) ** 2


RULE = "the cheapest candidate whose recall is within one standard error of the best (then the larger margin)"


def _cheapest_near_best(evidence: dict[str, dict[str, float]], count: int) -> str:
    """The one-standard-error rule: a costlier frame must beat the cheapest by more than the measurement's noise."""
    best = max(entry["recall_at_1pct"] for entry in evidence.values())
    noise = max(math.sqrt(best * (1 - best) / count), 1 / count)
    near = [name for name, entry in evidence.items() if entry["recall_at_1pct"] >= best - noise]
    return min(near, key=lambda name: (patches_per_image(name), -evidence[name]["mean_margin_sd"]))


def choose_frame(images: Sequence[Any], settings: dict[str, Any], backbone: Backbone | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the chosen candidate's settings: frame fields and coreset ratio, the evidence for the choice) from good
    training images alone."""
    seed = int(settings.get("seed", 0))
    if len(images) < MIN_IMAGES:
        return {}, {"chosen": None, "reason": f"{len(images)} training images; the search needs {MIN_IMAGES}"}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    held = min(HELD_IMAGES, len(images) // 3)
    fit = [images[i] for i in order[held : held + FIT_IMAGES]]
    good, defective = _held_out([images[i] for i in order[:held]], rng)
    evidence = {}
    for name in CANDIDATES:
        start = time.perf_counter()
        detector = PatchCore(PatchCoreConfig.from_dict({**settings, **frame_settings(name, settings),
                                                        "frame_search": False}), backbone)
        backbone = detector.require_backbone()
        detector.learn_aspect(fit)
        detector.fit_features(detector._features(fit, None)[0])
        scores = detector.predict(good + defective, map_size="input").scores
        evidence[name] = {**separation(scores[:held], scores[held:]), "seconds": time.perf_counter() - start}
    chosen = _cheapest_near_best(evidence, held * len(KINDS) * DEFECTS_PER_KIND)
    return frame_settings(chosen, settings), {
        "chosen": chosen, "rule": RULE, "fit_images": len(fit), "held_out_images": held,
        "synthetic_images": held * len(KINDS) * DEFECTS_PER_KIND, "synthetic_defects": list(KINDS), "candidates": evidence}
