"""Evidence from good images alone for choices made per product: held-out good images with synthetic defects
pasted in (`data.defects`), how well scores separate them, and the one-standard-error rule.

The frame search (`frame_search.py`) and PatchCore's global view (`patchcore.PatchCore.choose_global_view`)
judge their candidates on the same probe by the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from defectscope.data.decode import load_image
from defectscope.data.defects import KINDS, synthetic_defect

HELD_IMAGES = 16  # good images held out of a probe (at most a third of the training images)
DEFECTS_PER_KIND = 2  # synthetic defects of each kind per held-out image (16 x 4 x 2 = 128: a recall's se <= 0.044)
MIN_IMAGES = 12  # fewer training images: no probe, the defaults
MAX_PIXELS = 4_000_000  # held-out images are shrunk to this before defects are pasted (memory stays bounded)
TAIL_RATE = 0.01  # the false-alarm rate candidates are judged at
TAIL_Z = 2.326  # a normal distribution's 1% upper tail, in standard deviations
DRIFTS_PER_IMAGE = 2  # drifted copies of each held-out good image (16 x 2 = 32)
DRIFT_GAIN, DRIFT_CONTRAST = 0.05, 0.10  # the drift a line's camera and light see between fits: +-5% brightness, +-10% contrast


class Pasted(Sequence):
    """Synthetic-defect images kept as the box of pixels each changed in a held-out image (`good[owner]`), made whole
    when read: 128 whole copies of a 1024 x 1024 photo held 400 MB through the frame search and the fit."""

    def __init__(self, good: list[np.ndarray]) -> None:
        self.good: list[np.ndarray] = good
        self.changes: list[tuple[int, int, int, np.ndarray]] = []  # owner, top, left, the changed box's pixels

    def append(self, owner: int, image: np.ndarray) -> None:
        """Keep `image`, a copy of `good[owner]` with a defect pasted in, as the box around what changed."""
        changed = image != self.good[owner]
        changed = changed.any(2) if changed.ndim == 3 else changed
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        top, bottom = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        left, right = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
        self.changes.append((owner, top, left, image[top:bottom, left:right].copy()))

    def __len__(self) -> int:
        return len(self.changes)

    def __getitem__(self, index: int) -> np.ndarray:  # Sequence's iteration stops at the IndexError of changes[index]
        owner, top, left, pixels = self.changes[index]
        image = self.good[owner].copy()
        image[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        return image


@dataclass
class Probe:
    """Held-out good training images (the seeded order of all images, the first `len(good)` held out; decoded)
    and synthetic defects pasted into them."""

    order: np.ndarray
    good: list[np.ndarray]
    defective: Sequence[np.ndarray]
    drifted: list[np.ndarray]  # good images under drift: still good

    @property
    def held(self) -> np.ndarray:
        """Indices of the held-out training images."""
        return self.order[: len(self.good)]

    @property
    def drifted_from(self) -> np.ndarray:
        """The training image each of `drifted` shows (its DRIFTS_PER_IMAGE copies of each held-out image in turn)."""
        return np.repeat(self.held, DRIFTS_PER_IMAGE)


def probe_draws(count: int, seed: int) -> tuple[np.random.Generator, np.ndarray, int]:
    """A probe's seeded generator after its first draw, that draw (the order of the `count` training images), and how
    many of them it holds out (the first)."""
    rng = np.random.default_rng(seed)
    return rng, rng.permutation(count), min(HELD_IMAGES, count // 3)


def make_probe(images: Sequence[Any], seed: int, kinds: Sequence[str] = KINDS) -> Probe | None:
    """A seeded share of the training images held out, each with DEFECTS_PER_KIND defects of each of `kinds` (None
    below MIN_IMAGES). The same seed holds out the same images for every choice."""
    if len(images) < MIN_IMAGES:
        return None
    rng, order, held = probe_draws(len(images), seed)
    good = []
    for index in order[:held]:
        image = load_image(images[index])
        scale = min(1.0, (MAX_PIXELS / (image.shape[0] * image.shape[1])) ** 0.5)
        good.append(image if scale == 1.0 else cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    defective = Pasted(good)
    for i, image in enumerate(good):
        for kind in tuple(kinds) * DEFECTS_PER_KIND:
            defective.append(i, synthetic_defect(image, kind, rng, good[(i + 1) % len(good)]).image)
    drift = np.random.default_rng([seed, 1])  # its own stream: the defects are the same with or without it
    return Probe(order, good, defective, [drifted(image, drift) for image in good for _ in range(DRIFTS_PER_IMAGE)])


def drifted(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A good image as the line may see it later: brightness and contrast changed within the stated drift."""
    pixels = image.astype(np.float32)
    mean = pixels.mean()
    gain = rng.uniform(1 - DRIFT_GAIN, 1 + DRIFT_GAIN)
    contrast = rng.uniform(1 - DRIFT_CONTRAST, 1 + DRIFT_CONTRAST)
    return np.clip((mean + (pixels - mean) * contrast) * gain, 0, 255).round().astype(np.uint8)


def separation(good: np.ndarray, defective: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """How well scores tell defective from good: recall at `threshold` (default: the good scores' 1% tail under a
    normal fit, for the few good scores of a frame candidate), and the mean margin in sd of the good scores."""
    mean, std = float(good.mean()), max(float(good.std()), 1e-12)
    margins = np.clip((defective - mean) / std, -10, 10)
    cut = mean + TAIL_Z * std if threshold is None else threshold
    return {"recall_at_1pct": float((defective >= cut).mean()), "mean_margin_sd": float(margins.mean())}


def false_alarms(versions: np.ndarray, owners: np.ndarray, threshold: float) -> float:
    """The share of held-out good images with a version (as it is, drifted) scored at or above `threshold`;
    `owners[i]` is the image `versions[i]` shows. A drifted copy is its image again under other light, so an image
    counts once however many of its versions are flagged."""
    return len(np.unique(owners[versions >= threshold])) / len(np.unique(owners))


def noise(recall: float, count: int) -> float:
    """One standard error of a recall measured on `count` defects (at least one defect's worth)."""
    return max(math.sqrt(recall * (1 - recall) / count), 1 / count)


def costs_within_noise(alone: dict[str, float], both: dict[str, float], defects: int, images: int) -> bool:
    """Whether `both` catches no fewer of `defects` synthetic defects than `alone` and flags no more of the `images`
    held-out good images (`false_alarms`: an image with any of its versions flagged), each within one standard error:
    one unusual good image, whether as it is or drifted, is one image's worth of evidence."""
    return (alone["recall_at_1pct"] - both["recall_at_1pct"] <= noise(alone["recall_at_1pct"], defects)
            and both["false_alarms"] - alone["false_alarms"] <= noise(alone["false_alarms"], images))
