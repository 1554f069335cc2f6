"""The global view beside PatchCore's patch view: how the whole image is laid out, region by region.

A part that is missing, swapped or one too many leaves every patch looking normal, so a nearest-patch
score misses it. Here the backbone's feature maps (strides 8 and 16, already computed for the patches)
are averaged over a coarse grid of regions (3 x 3 for the score, 6 x 6 for the map), and each region
gets its own model of what it holds on good images: the residual of its standardized descriptor
outside the principal subspace that keeps VARIANCE of the good images' variance (PCA). A region's
residual is stated in standard deviations of its cross-fitted good residuals (z), so every region
weighs the same; the global score is the largest z over the score grid.

The model is kept as sufficient statistics (image count, sums, second moments per region): a
calibration fold is fitted without its images by subtraction, and taught images are added exactly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

SCORE_GRID, MAP_GRID = 3, 6  # regions per side: the score's grid and the map's finer one
VARIANCE = 0.95  # share of the good descriptors' variance the principal subspace keeps
STD_FLOOR = 1e-3  # a descriptor dimension with less spread than this is not divided by it


def pooling_matrix(size: int, cells: int) -> np.ndarray:
    """cells x size: averages each cell's span along one axis (cell g covers floor(g*size/cells) ..
    ceil((g+1)*size/cells) - 1, as adaptive average pooling does)."""
    matrix = np.zeros((cells, size), np.float32)
    for g in range(cells):
        start, stop = (g * size) // cells, -((-(g + 1) * size) // cells)
        matrix[g, start:stop] = 1.0 / (stop - start)
    return matrix


@lru_cache(maxsize=64)
def region_pooling(height: int, width: int) -> torch.Tensor:
    """R x (height * width): row r averages region r's cells of a row-major feature map, the score grid's
    SCORE_GRID**2 regions first, then the map grid's MAP_GRID**2, row by row (a constant in traced graphs)."""
    grids = [(pooling_matrix(height, cells)[:, None, :, None] * pooling_matrix(width, cells)[None, :, None, :])
             .reshape(cells * cells, height * width) for cells in (SCORE_GRID, MAP_GRID)]
    return torch.from_numpy(np.concatenate(grids))


def region_descriptors(maps: dict[int, torch.Tensor]) -> torch.Tensor:
    """Feature maps by stride -> N x R x C: each region's mean feature (C: all strides' channels), as
    `region_pooling` orders the regions. One GEMM per stride on the channels-last maps (plain matmuls: the same in
    every exported runtime); a batched matmul per axis was 20-50 times slower at batch 1."""
    parts = []
    for stride in sorted(maps):
        x = maps[stride].float()
        parts.append(region_pooling(int(x.shape[2]), int(x.shape[3])) @ x.permute(0, 2, 3, 1).flatten(1, 2))
    return torch.cat(parts, 2)


@dataclass
class Moments:
    """Per region: image count, sums (R x C) and second moments (R x C x C) of the descriptors; and, once measured,
    the mean second moment of the change the stated light and camera drift makes to a good image's descriptor (R x C
    x C), counted as part of every good image's spread: the model then treats drift as normal variation, as if each
    good image had been seen under every such drift."""

    count: torch.Tensor  # one float64 value
    sums: torch.Tensor
    squares: torch.Tensor
    drift: torch.Tensor | None = None

    @classmethod
    def of(cls, descriptors: torch.Tensor) -> Moments:
        x = descriptors.double().transpose(0, 1)  # R x N x C
        return cls(torch.tensor([float(descriptors.shape[0])], dtype=torch.float64), x.sum(1), x.transpose(1, 2) @ x)

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.sums + other.sums, self.squares + other.squares, self.drift)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.count - other.count, self.sums - other.sums, self.squares - other.squares, self.drift)


def drift_moment(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """N x R x C descriptors of good images and of the same images drifted -> R x C x C: the changes' mean second
    moment (drifts are drawn both ways, so it is their covariance)."""
    change = (after.double() - before.double()).transpose(0, 1)  # R x N x C
    return change.transpose(1, 2) @ change / max(1, change.shape[1])


@dataclass
class RegionModel:
    """What scoring needs per region: the standardization (mean, scale) and the projector onto the residual
    subspace (I - V V^T over the kept components V), all R x C (x C)."""

    mean: torch.Tensor
    scale: torch.Tensor
    residual: torch.Tensor

    @classmethod
    def from_moments(cls, moments: Moments) -> RegionModel:
        count = float(moments.count)
        mean = moments.sums / count
        covariance = moments.squares / count - mean[:, :, None] * mean[:, None, :]
        if moments.drift is not None:
            covariance = covariance + moments.drift
        scale = covariance.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(STD_FLOOR)
        correlation = covariance / (scale[:, :, None] * scale[:, None, :])
        values, vectors = eigh(correlation.float())  # single precision: twice as fast; the kept subspace is the same
        values = values.double().clamp_min(0).flip(-1)
        vectors = vectors.double().flip(-1)
        share = values.cumsum(-1) / values.sum(-1, keepdim=True).clamp_min(1e-12)
        kept = (share < VARIANCE).sum(-1, keepdim=True) + 1  # the fewest components reaching VARIANCE
        mask = (torch.arange(values.shape[-1]) < kept).double()
        basis = vectors * mask[:, None, :]
        eye = torch.eye(values.shape[-1], dtype=torch.float64)
        return cls(mean.float(), scale.float(), (eye - basis @ basis.transpose(1, 2)).float())

    def residuals(self, descriptors: torch.Tensor) -> torch.Tensor:
        """N x R x C descriptors -> N x R squared residuals outside each region's principal subspace."""
        z = ((descriptors - self.mean) / self.scale).transpose(0, 1)  # R x N x C
        r = z @ self.residual.transpose(1, 2)
        return (r * r).sum(-1).transpose(0, 1)


def eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a stack of symmetric matrices, the stack split over this process's
    threads with one thread each: torch would run each small matrix on all its threads, which then mostly wait (under
    the entry points' passive wait policy, asleep), and NumPy's are serial (20 stacks of 45: 0.6 s against 1.5 s)."""
    threads = max(1, min(torch.get_num_threads(), len(matrices)))
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        parts = list(pool.map(torch.linalg.eigh, torch.tensor_split(matrices, threads)))
    return torch.cat([values for values, _ in parts]), torch.cat([vectors for _, vectors in parts])


def standardize(residuals: torch.Tensor, location: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """Residuals in standard deviations of the cross-fitted good residuals of each region."""
    return (residuals - location) / spread


def global_scores(z: torch.Tensor) -> torch.Tensor:
    """N x R region z -> the global score of each image: the largest z over the score grid."""
    return z[:, : SCORE_GRID**2].amax(1)


def map_grid(z: torch.Tensor) -> torch.Tensor:
    """N x R region z -> N x MAP_GRID x MAP_GRID: the map grid's regions, as an image of their z."""
    return z[:, SCORE_GRID**2 :].reshape(-1, MAP_GRID, MAP_GRID)
