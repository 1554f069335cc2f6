"""A seeded demo dataset in MVTec layout: textured round parts with scratches, spots and missing pieces."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from defectscope.files import claim_folder
from defectscope.settings import require_seed

DEFECTS = ("scratch", "contamination", "broken")


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise smoothed with a Gaussian of the given scale (pixels)."""
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), scale)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _good_part(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A round part with a radial-ridge texture and grain, slightly shifted and lit differently each time."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, size * 0.01, 2)
    r = np.hypot(xx - cx, yy - cy) / size
    theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi)
    ridges = 0.5 + 0.5 * np.cos(24 * theta + 6 * np.sin(3 * theta))
    rings = 0.5 + 0.5 * np.cos(2 * np.pi * r * 9)
    grain = _smooth_noise(rng, size, 1.0)
    shade = 0.55 + 0.25 * ridges * (r > 0.12) + 0.15 * rings + 0.04 * grain + rng.normal(0, 0.02)
    part = (r < 0.42).astype(np.float32)
    base = np.array([0.55, 0.42, 0.25], np.float32) + rng.normal(0, 0.015, 3).astype(np.float32)
    image = part[..., None] * shade[..., None] * base + (1 - part[..., None]) * 0.06
    return np.clip(image, 0, 1), part


def _scratch(rng: np.random.Generator, image: np.ndarray, part: np.ndarray) -> np.ndarray:
    """A thin curved scratch, brighter than the surface."""
    size = image.shape[0]
    start = rng.uniform(0.3, 0.7, 2) * size
    heading = rng.uniform(0, 2 * np.pi)
    turns = np.cumsum(rng.normal(0, 0.25, 12)) + heading
    steps = np.stack([np.cos(turns), np.sin(turns)], 1) * size * 0.025
    points = np.round(start + np.cumsum(steps, 0)).astype(np.int32)
    mask = np.zeros((size, size), np.uint8)
    cv2.polylines(mask, [points], False, 1, thickness=max(1, size // 96))
    mask = mask.astype(bool) & part.astype(bool)
    image[mask] = np.clip(image[mask] * 0.4 + 0.6 * np.array([0.95, 0.93, 0.85]), 0, 1)
    return mask


def _contamination(rng: np.random.Generator, image: np.ndarray, part: np.ndarray) -> np.ndarray:
    """An irregular dark blob with a soft edge."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.04, 0.08) * size
    blob = np.hypot(xx - centre[0], yy - centre[1]) / radius + 0.5 * _smooth_noise(rng, size, size / 40)
    mask = (blob < 1.0) & part.astype(bool)
    alpha = np.clip(1.5 - blob, 0, 1)[..., None] * part[..., None]
    stain = np.array([0.18, 0.22, 0.12], np.float32) * (1 + 0.2 * _smooth_noise(rng, size, 2.0))[..., None]
    image[:] = image * (1 - alpha * 0.85) + stain * alpha * 0.85
    return mask


def _broken(rng: np.random.Generator, image: np.ndarray, part: np.ndarray) -> np.ndarray:
    """A chunk missing from the rim: the background shows through a jagged edge."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    centre = size / 2 + np.array([np.cos(angle), np.sin(angle)]) * size * 0.42
    radius = rng.uniform(0.06, 0.11) * size
    chunk = np.hypot(xx - centre[0], yy - centre[1]) / radius + 0.3 * _smooth_noise(rng, size, size / 50)
    mask = (chunk < 1.0) & part.astype(bool)
    image[mask] = 0.06 + 0.02 * rng.standard_normal((int(mask.sum()), 3))
    return mask


PAINTERS = {"scratch": _scratch, "contamination": _contamination, "broken": _broken}


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor((np.clip(image, 0, 1) * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR)


def make_demo_dataset(
    root: str | Path, size: int = 128, train: int = 40, test_good: int = 10, per_defect: int = 8, seed: int = 0
) -> Path:
    """Write a small MVTec-layout dataset with masks under root and return root.

    Root must be new, empty, or a demo dataset written earlier: existing images are never replaced otherwise.
    """
    require_seed("seed", seed)
    root = claim_folder(Path(root), None, "demo dataset")  # no --force: never writes among foreign files
    rng = np.random.default_rng(seed)
    for i in range(train):
        _write(root / "train" / "good" / f"{i:03d}.png", _to_uint8(_good_part(rng, size)[0]))
    for i in range(test_good):
        _write(root / "test" / "good" / f"{i:03d}.png", _to_uint8(_good_part(rng, size)[0]))
    for defect in DEFECTS:
        for i in range(per_defect):
            image, part = _good_part(rng, size)
            mask = PAINTERS[defect](rng, image, part)
            _write(root / "test" / defect / f"{i:03d}.png", _to_uint8(image))
            _write(root / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root
