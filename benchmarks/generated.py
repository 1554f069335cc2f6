"""Seeded generated categories for the benchmarks: kinds of image the real datasets here do not cover.

`gray-large`: 1024x1024 grayscale PNGs of a lit dome with a ring and sensor noise.
`uniform-texture`: 600x800 RGB near-uniform rubber with fine grain and noise, where every patch is
about equally far from every other (the worst case of coreset selection and nearest-neighbour search).
`fine-defects` (`write_fine_defects`): 768x768 brushed metal plates with defects 1-4 px wide (scratches
and pits), with masks: a category where the frame decides whether the defects are seen at all. Its
scratches are anti-aliased arcs drawn here, not the search's own synthetic defects (`data.defects`),
so a frame search is not judged on the defects it was tuned with.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

KINDS = ("gray-large", "uniform-texture")
FINE = 768  # fine-defects image side


def _image(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "gray-large":
        yy, xx = np.mgrid[0:1024, 0:1024]
        image = 90 + 40 * np.exp(-((yy - 512) ** 2 + (xx - 512) ** 2) / (2 * 260**2)) + rng.normal(0, 6, (1024, 1024))
        cv2.circle(image, (512 + int(rng.integers(-8, 8)), 512), 300, 150, 6)
    else:
        grain = cv2.GaussianBlur(rng.normal(0, 1, (600, 800, 3)), (0, 0), 1.2)
        image = 60 + 6 * grain + rng.normal(0, 2, (600, 800, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_category(kind: str, root: Path, train: int, test: int, seed: int = 0) -> Path:
    """root/<kind>/{train,test}/good/NNNN.png: `train` and `test` good images of one kind (written once)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        folder = root / kind / split / "good"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            target = folder / f"{i:04d}.png"
            image = _image(kind, rng)
            if not target.exists():
                cv2.imwrite(str(target), image)
    return root / kind


def _plate(rng: np.random.Generator) -> np.ndarray:
    """A brushed metal plate: horizontal streaks, a lighting gradient, grain, a slight shift and turn."""
    streaks = cv2.GaussianBlur(rng.normal(0, 1, (FINE, FINE)).astype(np.float32), (0, 0), sigmaX=25, sigmaY=0.8)
    yy, xx = np.mgrid[0:FINE, 0:FINE].astype(np.float32)
    light = 20 * (xx / FINE - 0.5) + 10 * (yy / FINE - 0.5) * rng.normal(1, 0.2)
    image = 150 + 10 * streaks / (streaks.std() + 1e-6) + light + rng.normal(0, 2.5, (FINE, FINE))
    turn = cv2.getRotationMatrix2D((FINE / 2, FINE / 2), rng.normal(0, 1.0), 1.0)
    turn[:, 2] += rng.normal(0, 4, 2)
    image = cv2.warpAffine(image, turn, (FINE, FINE), borderMode=cv2.BORDER_REFLECT)
    return np.repeat(image[:, :, None], 3, 2) * np.array([1.0, 0.98, 0.95], np.float32)


def _fine_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> np.ndarray:
    """Draw a scratch (an arc 1-4 px wide) or a few pits (1-4 px across) into the plate; returns the mask."""
    canvas = np.zeros((FINE, FINE), np.float32)
    if kind == "scratch":
        centre = rng.uniform(0.25, 0.75, 2) * FINE
        radius = rng.uniform(0.2, 0.6) * FINE
        start = rng.uniform(0, 360)
        cv2.ellipse(canvas, (int(centre[0]), int(centre[1])), (int(radius), int(radius * rng.uniform(0.5, 1.0))),
                    0, start, start + rng.uniform(10, 30), 1.0, int(rng.integers(1, 5)), cv2.LINE_AA)
    else:
        for _ in range(int(rng.integers(2, 5))):
            x, y = (rng.uniform(0.2, 0.8, 2) * FINE).astype(int)
            cv2.circle(canvas, (int(x), int(y)), int(rng.integers(1, 3)), 1.0, -1, cv2.LINE_AA)
    change = rng.uniform(35, 70) * (1 if rng.random() < 0.5 else -1)
    image += canvas[:, :, None] * change
    return canvas > 0.25


def write_fine_defects(root: Path, train: int = 200, test_good: int = 40, per_defect: int = 25, seed: int = 0) -> Path:
    """root/fine-defects in MVTec layout (train/good, test/{good,scratch,pit}, ground_truth masks), written once."""
    folder = root / "fine-defects"
    rng = np.random.default_rng(seed)
    plan = [("train", "good", train), ("test", "good", test_good), ("test", "scratch", per_defect), ("test", "pit", per_defect)]
    for split, defect, count in plan:
        for i in range(count):
            image = _plate(rng)
            mask = _fine_defect(rng, image, defect) if defect != "good" else None
            target = folder / split / defect / f"{i:03d}.png"
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), np.clip(image, 0, 255).astype(np.uint8))
            if mask is not None:
                (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "ground_truth" / defect / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return folder
