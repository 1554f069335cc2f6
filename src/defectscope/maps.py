"""Anomaly maps from feature-grid distances: bilinear upsampling to the model frame, Gaussian smoothing.

NumPy and OpenCV only, so the library and the torch-free runtime finish maps with the same code.
"""

from __future__ import annotations

import cv2
import numpy as np

MAP_SIGMA = 4.0


def gaussian_smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of N x H x W maps (radius 4 sigma, reflected borders), with OpenCV's SIMD filter."""
    size = 2 * int(4 * sigma + 0.5) + 1
    kernel = cv2.getGaussianKernel(size, sigma, cv2.CV_32F)
    frames = np.ascontiguousarray(maps, dtype=np.float32)
    return np.stack([cv2.sepFilter2D(frame, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101) for frame in frames]) \
        if len(frames) else frames


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """N x h x w maps -> N x H x W (bilinear, pixel centres aligned)."""
    frames = np.ascontiguousarray(maps, dtype=np.float32)
    if not len(frames):
        return np.zeros((0, *size), np.float32)
    return np.stack([cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for frame in frames])


def finish_maps(grid: np.ndarray, input_shape: tuple[int, int]) -> np.ndarray:
    """Feature-grid maps N x h x w -> model-frame maps: bilinear upsampling, then Gaussian smoothing (sigma 4)."""
    return gaussian_smooth(resize_maps(grid, input_shape), MAP_SIGMA)
