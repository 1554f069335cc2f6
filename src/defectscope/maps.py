"""Anomaly maps: the matrices that finish feature-grid maps (bilinear upsampling, Gaussian smoothing), resizing.

NumPy only (OpenCV, when installed, resizes large maps faster to the same values). Finishing is
linear and separable, so each axis is one small matrix, applied by the PyTorch model and traced
into exported graphs alike (`detectors.base.finish_maps`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

try:
    import cv2
except ImportError:  # the torch-free runtime may be installed without OpenCV
    cv2 = None

MAP_SIGMA = 4.0


def bilinear_taps(size_out: int, size_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output pixel along one axis: the two input pixels and the weight of the second (pixel centres aligned, edges clamped)."""
    source = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
    first = np.floor(source).astype(np.intp)
    return first, np.minimum(first + 1, size_in - 1), (source - first).astype(np.float32)


@lru_cache(maxsize=32)
def bilinear_matrix(size_out: int, size_in: int) -> np.ndarray:
    """Bilinear upsampling along one axis as a size_out x size_in matrix (pixel centres aligned, edges clamped)."""
    first, second, weight = bilinear_taps(size_out, size_in)
    matrix = np.zeros((size_out, size_in), np.float64)
    np.add.at(matrix, (np.arange(size_out), first), 1 - weight)
    np.add.at(matrix, (np.arange(size_out), second), weight)
    return matrix


def _gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """The Gaussian blur along one axis as a matrix: radius 4 sigma, normalized, reflected borders (abcb|a)."""
    radius = int(4 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    period = max(1, 2 * size - 2)
    columns = (np.arange(size)[:, None] + offsets) % period
    columns = np.where(columns >= size, period - columns, columns) if size > 1 else np.zeros_like(columns)
    matrix = np.zeros((size, size), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(size), len(offsets)), columns.ravel()), np.tile(kernel, size))
    return matrix


@lru_cache(maxsize=32)
def finishing_matrix(size_out: int, size_in: int, sigma: float = MAP_SIGMA) -> np.ndarray:
    """Bilinear upsampling followed by the Gaussian blur along one axis, as one size_out x size_in matrix."""
    return (_gaussian_matrix(size_out, sigma) @ bilinear_matrix(size_out, size_in)).astype(np.float32)


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N x h x w maps -> N x H x W (bilinear, pixel centres aligned, edges clamped)."""
    frames = np.ascontiguousarray(maps, dtype=np.float32)
    if not len(frames):
        return np.zeros((0, *size), np.float32)
    if cv2 is not None:  # the same interpolation, an order of magnitude faster on large maps
        return np.stack([cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for frame in frames])
    first, second, weight = bilinear_taps(size[0], frames.shape[1])
    rows = frames[:, first]
    rows += (frames[:, second] - rows) * weight[:, None]
    first, second, weight = bilinear_taps(size[1], frames.shape[2])
    out = rows[:, :, first]
    out += (rows[:, :, second] - out) * weight
    return out
