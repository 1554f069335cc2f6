"""Synthetic defects pasted into good images at the product's own scale, with exact masks.

They stand in for defects when a choice must be made from good images alone (the frame search):
thin scratches 1-4 px wide, small spots, cut-paste patches from another good image, and blobs of
smooth noise. Sizes are fractions of the image's short side (scratch widths are in pixels of the
original image), placed in the central part of the image, where the product usually is. Pixels
outside a defect's mask are left exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

KINDS = ("scratch", "spot", "cut-paste", "blob")
CENTRAL = 0.7  # defects are placed inside the central 70% of each side


@dataclass(frozen=True)
class Synthetic:
    """A good image with one synthetic defect: the new pixels, where they changed, and what was drawn."""

    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W bool
    kind: str
    width: int | None = None  # a scratch's width in pixels


def _centre(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A random (x, y) inside the central part of the image."""
    height, width = shape[:2]
    margin = (1 - CENTRAL) / 2
    return rng.uniform(margin, 1 - margin, 2) * (width, height)


def _contrast(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour well away from the masked pixels' mean: darker on bright surfaces, brighter on dark ones."""
    mean = image[mask].mean(0) if mask.any() else image.reshape(-1, 3).mean(0)
    shift = rng.uniform(30, 90) * (-1 if mean.mean() > 128 else 1)
    return np.clip(mean + shift + rng.normal(0, 10, 3), 0, 255)


def _paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, opacity: float = 1.0) -> np.ndarray:
    out = image.copy()
    out[mask] = np.clip(image[mask] * (1 - opacity) + colour * opacity, 0, 255).astype(np.uint8)
    return out


def scratch(image: np.ndarray, rng: np.random.Generator, width: int | None = None) -> Synthetic:
    """A thin polyline of `width` pixels (1-4 when not given), 10-30% of the short side long, in a contrasting colour."""
    width = int(rng.integers(1, 5)) if width is None else width
    short = min(image.shape[:2])
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.3, 4))
    steps = np.stack([np.cos(heading), np.sin(heading)], 1) * rng.uniform(0.1, 0.3) * short / 4
    points = np.round(_centre(rng, image.shape) + np.cumsum(steps, 0)).astype(np.int32)
    canvas = np.zeros(image.shape[:2], np.uint8)
    cv2.polylines(canvas, [points], False, 1, thickness=1, lineType=cv2.LINE_8)  # a one-pixel centre line
    mask = cv2.dilate(canvas, np.ones((width, width), np.uint8)).astype(bool)  # `width` pixels across, exactly
    return Synthetic(_paint(image, mask, _contrast(image, mask, rng)), mask, "scratch", width)


def spot(image: np.ndarray, rng: np.random.Generator) -> Synthetic:
    """A small filled ellipse, 1-3% of the short side across."""
    short = min(image.shape[:2])
    axes = np.maximum(1, np.round(rng.uniform(0.005, 0.015, 2) * short)).astype(int)
    canvas = np.zeros(image.shape[:2], np.uint8)
    cv2.ellipse(canvas, tuple(np.round(_centre(rng, image.shape)).astype(int)), tuple(int(a) for a in axes),
                float(rng.uniform(0, 180)), 0, 360, 1, -1)
    mask = canvas.astype(bool)
    return Synthetic(_paint(image, mask, _contrast(image, mask, rng), rng.uniform(0.7, 1.0)), mask, "spot")


def cut_paste(image: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> Synthetic:
    """A rectangle (5-12% of the short side) cut from another place of `source`, turned, pasted here."""
    height, width = image.shape[:2]
    size = np.maximum(2, np.round(rng.uniform(0.05, 0.12, 2) * min(height, width))).astype(int)
    patch_h, patch_w = int(size[0]), int(size[1])
    top, left = int(rng.integers(0, source.shape[0] - patch_h + 1)), int(rng.integers(0, source.shape[1] - patch_w + 1))
    patch = np.rot90(source[top : top + patch_h, left : left + patch_w], int(rng.integers(1, 4)))
    x, y = np.round(_centre(rng, image.shape) - np.array(patch.shape[1::-1]) / 2).astype(int)
    y, x = int(np.clip(y, 0, height - patch.shape[0])), int(np.clip(x, 0, width - patch.shape[1]))
    out = image.copy()
    out[y : y + patch.shape[0], x : x + patch.shape[1]] = patch
    mask = np.any(out != image, axis=2)
    return Synthetic(out, mask, "cut-paste")


def blob(image: np.ndarray, rng: np.random.Generator) -> Synthetic:
    """An irregular region of smooth noise (3-8% of the short side), tinted towards a contrasting colour."""
    short = min(image.shape[:2])
    radius = rng.uniform(0.03, 0.08) * short
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float32)
    cx, cy = _centre(rng, image.shape)
    noise = cv2.GaussianBlur(rng.standard_normal(image.shape[:2]).astype(np.float32), (0, 0), max(1.0, radius / 3))
    noise /= noise.std() + 1e-6
    mask = (np.hypot(xx - cx, yy - cy) / radius + 0.4 * noise) < 1.0
    return Synthetic(_paint(image, mask, _contrast(image, mask, rng), rng.uniform(0.5, 0.9)), mask, "blob")


def synthetic_defect(image: np.ndarray, kind: str, rng: np.random.Generator, source: np.ndarray | None = None) -> Synthetic:
    """One defect of `kind` (see KINDS) in a copy of `image`; cut-paste takes its patch from `source` (default: itself)."""
    if kind == "scratch":
        return scratch(image, rng)
    if kind == "spot":
        return spot(image, rng)
    if kind == "cut-paste":
        return cut_paste(image, image if source is None else source, rng)
    if kind == "blob":
        return blob(image, rng)
    raise ValueError(f"unknown synthetic defect {kind!r}; choose one of {', '.join(KINDS)}")
