"""PatchCore (Roth et al., CVPR 2022): a coreset memory of locally aware patch features, nearest-neighbour scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from defectscope.detectors.base import Detector, DetectorConfig, register
from defectscope.detectors.coreset import coreset_indices
from defectscope.detectors.nearest import ClusteredBank, nearest
from defectscope.errors import DefectscopeError


@dataclass
class PatchCoreConfig(DetectorConfig):
    """coreset_ratio: memory kept; embedding_dim: channel pooling target (None keeps all)."""

    coreset_ratio: float = 0.1
    projection_dim: int = 128
    neighbourhood: int = 3
    embedding_dim: int | None = None
    reweight: bool = False
    reweight_neighbours: int = 9


def patch_embedding(maps: dict[int, torch.Tensor], neighbourhood: int, embedding_dim: int | None) -> torch.Tensor:
    """Aggregate each map over a p x p neighbourhood, bring all to the finest grid, concatenate.

    Returns N x h x w x d (channels last, one row per patch).
    """
    finest = min(maps)
    size = maps[finest].shape[-2:]
    parts = []
    for stride in sorted(maps):
        x = F.avg_pool2d(maps[stride].float(), neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        parts.append(x)
    features = torch.cat(parts, 1).permute(0, 2, 3, 1)
    if embedding_dim is not None and embedding_dim != features.shape[-1]:
        n, h, w, d = features.shape
        features = F.adaptive_avg_pool1d(features.reshape(-1, 1, d), embedding_dim).reshape(n, h, w, embedding_dim)
    return features.contiguous()


@register
class PatchCore(Detector):
    name = "patchcore"
    config_class = PatchCoreConfig
    config: PatchCoreConfig
    strides = (8, 16)
    index: ClusteredBank | None = None

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        maps = self.require_backbone()(batch)
        return patch_embedding(maps, self.config.neighbourhood, self.config.embedding_dim)

    def fit_features(self, features: torch.Tensor) -> dict[str, Any]:
        patches = features.reshape(-1, features.shape[-1])
        keep = coreset_indices(patches, self.config.coreset_ratio, self.config.seed, self.config.projection_dim)
        self.index = ClusteredBank.build(patches[keep], self.config.seed)
        return {"patches": len(patches), "memory_bank": len(keep), "embedding_dim": patches.shape[1]}

    def score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is None:
            raise DefectscopeError("PatchCore is not fitted; call fit() or load a model file")
        n, h, w, d = features.shape
        patches = features.reshape(n, h * w, d)
        distances, indices = self.index.search(patches.reshape(-1, d))
        maps = distances.reshape(n, h * w)
        scores, worst = maps.max(1)
        if self.config.reweight:
            scores = self._reweight(patches[torch.arange(n), worst], indices.reshape(n, h * w)[torch.arange(n), worst], scores)
        return scores, maps.reshape(n, h, w)

    def _reweight(self, worst_patches: torch.Tensor, nearest_index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The paper's eq. 7: damp the score when the nearest memory patch sits among close neighbours."""
        bank = self.index.bank
        k = min(self.config.reweight_neighbours, len(bank))
        _, support = nearest(bank[nearest_index], bank, k=k)
        distances = (worst_patches[:, None, :] - bank[support]).norm(dim=-1)
        weights = 1 - torch.softmax(distances, dim=1)[:, 0]
        return weights * scores

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.index.tensors() if self.index else {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.index = ClusteredBank.from_sorted(tensors["memory_bank"], tensors["cluster_offsets"])
