"""Seeded generated categories for the benchmarks: kinds of image the real datasets here do not cover.

`gray-large`: 1024x1024 grayscale PNGs of a lit dome with a ring and sensor noise.
`uniform-texture`: 600x800 RGB near-uniform rubber with fine grain and noise, where every patch is
about equally far from every other (the worst case of coreset selection and nearest-neighbour search).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

KINDS = ("gray-large", "uniform-texture")


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
