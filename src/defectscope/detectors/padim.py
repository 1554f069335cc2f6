"""PaDiM (Defard et al., 2020): a Gaussian per feature-map position, scored by Mahalanobis distance."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from defectscope.data.decode import ImageSource
from defectscope.detectors.base import (
    Detector,
    DetectorConfig,
    Progress,
    register,
    rows_outside,
)
from defectscope.errors import DefectscopeError, check_fitted
from defectscope.settings import require_range

POSITION_CHUNK = 128  # positions fitted at once: bounds the temporaries of fitting
SCORE_CHUNK = 64  # positions scored at once
MIN_REGULARIZATION = 2e-5  # precision entries stay below 1 / regularization: within float16's range


def _mahalanobis_squared(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """N x positions x d features against per-position Gaussians -> N x positions squared distances.

    Precisions are stored in float16 and widened SCORE_CHUNK positions at a time into one reused
    buffer: half the memory traffic, which bounds scoring at small batches. (An exported graph
    widens each chunk itself: a traced in-place buffer would not keep its slice shapes.)
    """
    delta = (features - mean).transpose(0, 1)  # positions x N x d
    exporting = torch.onnx.is_in_onnx_export()
    widened = torch.empty(min(SCORE_CHUNK, len(precision)), *precision.shape[1:])
    parts = []
    for start in range(0, len(precision), SCORE_CHUNK):
        where = slice(start, min(start + SCORE_CHUNK, len(precision)))
        block = precision[where].float() if exporting else widened[: where.stop - start].copy_(precision[where])
        parts.append((torch.bmm(delta[where], block) * delta[where]).sum(-1))
    return torch.cat(parts).T


def grid_shape(positions: int, frame: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a feature grid with `positions` cells and the frame's aspect ratio (h x w = positions)."""
    guess = max(1, round(math.sqrt(positions * frame[1] / frame[0])))
    width = min((w for w in range(1, positions + 1) if positions % w == 0), key=lambda w: abs(w - guess))
    return positions // width, width


def _grid(squared: torch.Tensor, frame: tuple[int, int]) -> torch.Tensor:
    """N x positions squared distances -> N x h x w distance maps."""
    return squared.clamp_min(0).sqrt().reshape(-1, *grid_shape(squared.shape[1], frame))


@dataclass
class PaDiMConfig(DetectorConfig):
    """feature_dim: size of the random channel subset (all channels when the backbone has fewer);
    regularization: added to each covariance diagonal. The paper uses 0.01 on ResNet features; the
    EfficientNet-Lite features here have a median channel variance near 3, and 0.1 scores better
    (bottle: image AUROC 0.998 -> 0.999, AUPRO 0.924 -> 0.931); keep_covariance: also store each
    position's covariance (its Cholesky factor, float16: the model file doubles) so that `update` can
    learn new good images without a refit."""

    inapplicable = {"calibration_folds": "PaDiM scores each training image with the Gaussians of all the others, in "
                                         "closed form (leave one out): there are no folds to choose"}
    feature_dim: int = 200
    regularization: float = 0.1
    keep_covariance: bool = False

    def check(self) -> None:
        super().check()
        require_range("feature_dim", self.feature_dim, 1)
        if not self.regularization >= MIN_REGULARIZATION:
            raise DefectscopeError(f"PaDiM regularization must be at least {MIN_REGULARIZATION:g}, got {self.regularization:g}")


@register
class PaDiM(Detector):
    name = "padim"
    config_class = PaDiMConfig
    config: PaDiMConfig
    strides = (4, 8, 16)
    min_images = 3  # each image is left out of a Gaussian of the others, whose covariance needs two
    channels: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    precision: torch.Tensor | None = None
    covariance_factor: torch.Tensor | None = None  # lower Cholesky factors of the covariances, with keep_covariance

    def _channel_subset(self) -> torch.Tensor:
        if self.channels is None:
            total = sum(self.require_backbone().channels.values())
            count = min(self.config.feature_dim, total)
            generator = torch.Generator().manual_seed(self.config.seed)
            self.channels = torch.randperm(total, generator=generator)[:count].sort().values
        return self.channels

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Stride-4 grid of concatenated features (deeper maps upsampled, nearest), random channel subset."""
        maps = self.require_backbone()(batch)
        size = maps[min(maps)].shape[-2:]
        stacked = torch.cat([F.interpolate(maps[s].float(), size=size, mode="nearest") for s in sorted(maps)], 1)
        return stacked[:, self._channel_subset()].flatten(2).transpose(1, 2).contiguous()  # N x positions x d

    def _gaussians(self, features: torch.Tensor, rows: torch.Tensor | None = None
                   ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(positions, mean, precision, covariance factor) of the Gaussians learned from `rows` (default all), POSITION_CHUNK positions at a time."""
        n, positions, d = features.shape if rows is None else (len(rows), *features.shape[1:])
        if n < 2:
            raise DefectscopeError("PaDiM needs at least 2 training images")
        ridge = self.config.regularization * torch.eye(d)
        for start in range(0, positions, POSITION_CHUNK):  # bounded memory
            where = slice(start, min(start + POSITION_CHUNK, positions))
            part = features[:, where] if rows is None else features[rows, where]
            mean = part.mean(0)
            centred = torch.empty(part.shape[1], n, d)  # positions x N x d: contiguous for the batched GEMM
            torch.sub(part.transpose(0, 1), mean[:, None], out=centred)
            covariance = torch.baddbmm(ridge, centred.mT, centred, alpha=1 / (n - 1))
            del centred
            factor, info = torch.linalg.cholesky_ex(covariance)
            if int(info.max()) > 0:
                raise DefectscopeError("PaDiM covariance is not positive definite; raise `regularization`")
            yield where, mean, torch.cholesky_inverse(factor), factor  # the inverse is exactly symmetric: one triangle is stored

    def fit_features(self, features: torch.Tensor) -> dict[str, Any]:
        _, positions, d = features.shape
        self.mean, self.precision = torch.empty(positions, d), torch.empty(positions, d, d, dtype=torch.float16)
        self.covariance_factor = torch.empty(positions, d, d, dtype=torch.float16) if self.config.keep_covariance else None
        for where, mean, precision, factor in self._gaussians(features):
            self.mean[where], self.precision[where] = mean, precision
            if self.covariance_factor is not None:
                self.covariance_factor[where] = factor
        return {"positions": positions, "feature_dim": d}

    def holdout_scores(self, features: torch.Tensor, holdout: torch.Tensor, scored: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Images `scored` (default: the held-out ones) scored by Gaussians of the images outside `holdout`, built and
        used chunk by chunk (no second model)."""
        held = features[holdout if scored is None else scored]
        rest = torch.nonzero(rows_outside(len(features), holdout)).squeeze(1)
        squared = torch.empty(held.shape[:2])
        for where, mean, precision, _ in self._gaussians(features, rest):
            squared[:, where] = _mahalanobis_squared(held[:, where], mean, precision.half())
        return self._finish(None, _grid(squared, self.preprocess.input_shape))[0]

    def calibration_folds(self, count: int) -> list[torch.Tensor]:
        """Leave one out: with d-dimensional Gaussians fitted on about d images, every image held out counts."""
        return list(torch.arange(count)[:, None])

    def crossfit_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image scored exactly by the Gaussians of all the others, in closed form.

        Leaving image i out turns the scatter T into T - n/(n-1) u uᵀ (u = x_i - mean), so with
        M = T/(n-2) + ridge = L Lᵀ (one Cholesky factor per chunk of positions) and s = |L⁻¹u|², the
        held-out squared distance is (n/(n-1))² s / (1 - n s / ((n-1)(n-2))) (Sherman-Morrison).
        """
        n, positions, d = features.shape
        squared = torch.empty(n, positions)
        ridge = self.config.regularization * torch.eye(d)
        downdate = n / ((n - 1) * (n - 2))
        for start in range(0, positions, POSITION_CHUNK):
            where = slice(start, min(start + POSITION_CHUNK, positions))
            centred = (features[:, where] - features[:, where].mean(0)).transpose(0, 1).contiguous()  # positions x N x d
            factor, info = torch.linalg.cholesky_ex(centred.mT @ centred / (n - 2) + ridge)
            if int(info.max()) > 0:
                raise DefectscopeError("PaDiM covariance is not positive definite; raise `regularization`")
            whitened = torch.linalg.solve_triangular(factor, centred.mT, upper=False)
            leverage = (whitened * whitened).sum(1)  # positions x N
            squared[:, where] = ((n / (n - 1)) ** 2 * leverage / (1 - downdate * leverage)).T
        return torch.arange(n), self._finish(None, _grid(squared, self.preprocess.input_shape))[0]

    def check_teachable(self) -> None:
        check_fitted(self.precision, "PaDiM")
        if self.covariance_factor is None:
            raise DefectscopeError("this PaDiM model keeps no covariances, so it cannot learn new good images without a "
                                   "refit: fit it again (with keep_covariance: true to allow updates)")

    def teach(self, images: Sequence[ImageSource], progress: Progress | None = None) -> dict[str, Any]:
        """Merge new good images into every position's Gaussian (pairwise update of mean and scatter), then recalibrate.

        Needs the covariances (fit with keep_covariance); the taught images' held-out scores are their
        scores before the update.
        """
        self.check_teachable()
        count = int(self.train_summary.get("images", 0)) + sum(int(t.get("images", 0)) for t in self.train_summary.get("taught", []))
        if count < 2:
            raise DefectscopeError("this PaDiM model does not record how many images it learned; fit it again")
        features, _ = self._features(images, progress)
        with torch.inference_mode():
            before = self._score_and_map(features)[0]
        added, positions, d = features.shape
        total = count + added
        ridge = self.config.regularization * torch.eye(d)
        for start in range(0, positions, POSITION_CHUNK):
            where = slice(start, min(start + POSITION_CHUNK, positions))
            stored = self.covariance_factor[where].float()
            part = features[:, where].transpose(0, 1)  # positions x added x d
            new_mean = part.mean(1)
            centred, shift = part - new_mean[:, None], (new_mean - self.mean[where])[:, :, None]
            scatter = (stored @ stored.mT - ridge) * (count - 1) + centred.mT @ centred + shift @ shift.mT * (count * added / total)
            factor, info = torch.linalg.cholesky_ex(scatter / (total - 1) + ridge)
            if int(info.max()) > 0:
                raise DefectscopeError("PaDiM covariance is not positive definite after the update; raise `regularization`")
            self.mean[where] += (new_mean - self.mean[where]) * (added / total)
            self.precision[where] = torch.cholesky_inverse(factor).half()
            self.covariance_factor[where] = factor.half()
        self.calibration = self.taught_calibration(before)
        return {"images": added, "gaussians_updated": positions}

    def score_features(self, features: torch.Tensor) -> tuple[None, torch.Tensor]:
        check_fitted(self.precision, "PaDiM")
        return None, _grid(_mahalanobis_squared(features, self.mean, self.precision), self.preprocess.input_shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.precision is None:
            return {}
        rows, cols = torch.triu_indices(*self.precision.shape[1:])
        tensors = {"channels": self.channels, "mean": self.mean, "precision_upper": self.precision[:, rows, cols]}
        if self.covariance_factor is not None:
            tensors["covariance_lower"] = self.covariance_factor[:, cols, rows]
        return tensors

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.channels, self.mean = tensors["channels"], tensors["mean"]
        d = self.mean.shape[1]
        rows, cols = torch.triu_indices(d, d)
        precision = torch.zeros(len(self.mean), d, d, dtype=torch.float16)
        precision[:, rows, cols] = tensors["precision_upper"]
        precision[:, cols, rows] = tensors["precision_upper"]
        self.precision = precision
        self.covariance_factor = None
        if "covariance_lower" in tensors:
            self.covariance_factor = torch.zeros(len(self.mean), d, d, dtype=torch.float16)
            self.covariance_factor[:, cols, rows] = tensors["covariance_lower"]
