"""PaDiM (Defard et al., 2020): a Gaussian per feature-map position, scored by Mahalanobis distance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from defectscope.detectors.base import Detector, DetectorConfig, register
from defectscope.errors import DefectscopeError

POSITION_CHUNK = 256


@dataclass
class PaDiMConfig(DetectorConfig):
    """feature_dim: size of the random channel subset (all channels when the backbone has fewer);
    regularization: added to each covariance diagonal."""

    feature_dim: int = 200
    regularization: float = 0.01


@register
class PaDiM(Detector):
    name = "padim"
    config_class = PaDiMConfig
    config: PaDiMConfig
    strides = (4, 8, 16)
    channels: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    precision: torch.Tensor | None = None

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

    def fit_features(self, features: torch.Tensor) -> dict[str, Any]:
        n, positions, d = features.shape
        if n < 2:
            raise DefectscopeError("PaDiM needs at least 2 training images")
        self.mean = features.mean(0)
        self.precision = torch.empty(positions, d, d)
        ridge = self.config.regularization * torch.eye(d)
        for start in range(0, positions, POSITION_CHUNK):  # bounded memory: a few hundred positions at a time
            stop = min(start + POSITION_CHUNK, positions)
            centred = (features[:, start:stop] - self.mean[start:stop]).transpose(0, 1)  # positions x N x d
            covariance = centred.transpose(1, 2) @ centred / (n - 1) + ridge
            factor, info = torch.linalg.cholesky_ex(covariance)
            if int(info.max()) > 0:
                raise DefectscopeError("PaDiM covariance is not positive definite; raise `regularization`")
            precision = torch.cholesky_inverse(factor)
            self.precision[start:stop] = (precision + precision.transpose(1, 2)) / 2  # exactly symmetric: one triangle is stored
        return {"positions": positions, "feature_dim": d}

    def score_features(self, features: torch.Tensor) -> tuple[None, torch.Tensor]:
        if self.precision is None:
            raise DefectscopeError("PaDiM is not fitted; call fit() or load a model file")
        delta = (features - self.mean).transpose(0, 1)  # positions x N x d
        squared = torch.einsum("pnd,pde,pne->np", delta, self.precision, delta)
        side = int(round(squared.shape[1] ** 0.5))
        return None, squared.clamp_min(0).sqrt().reshape(-1, side, side)

    def tensors(self) -> dict[str, torch.Tensor]:
        rows, cols = torch.triu_indices(*self.precision.shape[1:])
        return {"channels": self.channels, "mean": self.mean, "precision_upper": self.precision[:, rows, cols]}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.channels, self.mean = tensors["channels"], tensors["mean"]
        d = self.mean.shape[1]
        rows, cols = torch.triu_indices(d, d)
        precision = torch.zeros(len(self.mean), d, d)
        precision[:, rows, cols] = tensors["precision_upper"]
        precision[:, cols, rows] = tensors["precision_upper"]
        self.precision = precision
