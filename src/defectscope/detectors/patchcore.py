"""PatchCore (Roth et al., CVPR 2022): a coreset memory of locally aware patch features, nearest-neighbour scoring."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from defectscope.data.decode import ImageSource
from defectscope.data.images import normalize
from defectscope.detectors.base import (
    Detector,
    DetectorConfig,
    Progress,
    register,
    rows_outside,
)
from defectscope.detectors.coreset import coreset_indices, greedy_coreset
from defectscope.detectors.nearest import ClusteredBank, nearest
from defectscope.errors import DefectscopeError
from defectscope.settings import require_range


PATCH_STRIDES = (8, 16, 32)  # the finest feature stride (8) times 1, 2 or 4
GRAPH_DISTANCE_CELLS = 1 << 24  # an exported graph's distance matrix: at most 64 MB per run


@dataclass
class PatchCoreConfig(DetectorConfig):
    """image_size 352 / crop 320: thin defects (cuts, scratches) need the backbone to see the image
    larger than its ImageNet scale; patch_stride 16: each memory patch averages 2x2 cells of the
    stride-8 features, which keeps localization (pixel AUROC, AUPRO) while cutting patches 4x, so
    the coreset and search cost of the higher resolution fall below the old 288-pixel frame's.
    coreset_ratio: memory kept; layer_dim: width each layer's neighbourhood vector is pooled to;
    shard_images: the coreset is chosen per shard of at most this many images (shards nest in the
    calibration folds), so its cost grows linearly with the number of images, and every fold's
    calibration scores come from the other folds' memory without any refit; memory_limit: most memory
    rows kept (beyond it the ratio shrinks), so memory and search cost stop growing with the training set."""

    image_size: int = 352
    crop: int | None = 320
    patch_stride: int = 16
    coreset_ratio: float = 0.1
    memory_limit: int = 50_000
    shard_images: int = 16
    projection_dim: int = 128
    neighbourhood: int = 3
    layer_dim: int = 64
    reweight: bool = False
    reweight_neighbours: int = 9

    def check(self) -> None:
        super().check()
        require_range("coreset_ratio", self.coreset_ratio, 0, 1, low_open=True)
        require_range("projection_dim", self.projection_dim, 1)
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise DefectscopeError(f"field 'neighbourhood' must be an odd number >= 1, got {self.neighbourhood}")
        require_range("layer_dim", self.layer_dim, 1)
        require_range("reweight_neighbours", self.reweight_neighbours, 1)
        require_range("shard_images", self.shard_images, 1)
        require_range("memory_limit", self.memory_limit, 1)
        if self.patch_stride not in PATCH_STRIDES:
            raise DefectscopeError(f"field 'patch_stride' must be one of {', '.join(map(str, PATCH_STRIDES))}, "
                                   f"got {self.patch_stride}")


def pooling_kernel(channels: int, neighbourhood: int, layer_dim: int) -> torch.Tensor:
    """The conv kernel (layer_dim x C x p x p) that adaptively average-pools each C*p*p neighbourhood to layer_dim.

    Adaptive pooling of the flattened neighbourhood is linear: output j averages inputs
    floor(j*L/D) .. ceil((j+1)*L/D) - 1 of the L = C*p*p values, in unfold's (channel, row, column) order.
    """
    length = channels * neighbourhood**2
    j = torch.arange(layer_dim)
    start, stop = (j * length) // layer_dim, ((j + 1) * length + layer_dim - 1) // layer_dim
    i = torch.arange(length)[None, :]
    weights = ((i >= start[:, None]) & (i < stop[:, None])).float()
    weights /= weights.sum(1, keepdim=True)
    return weights.reshape(layer_dim, channels, neighbourhood, neighbourhood)


def patch_embedding(maps: dict[int, torch.Tensor], neighbourhood: int, layer_dim: int, patch_stride: int | None = None
                    ) -> torch.Tensor:
    """Locally aware patch features, as in the reference code, on a grid of `patch_stride` (default: the finest stride).

    Each layer's p x p neighbourhood (C * p^2 values per position) is adaptively average-pooled to
    `layer_dim` (one convolution, see `pooling_kernel`), so every layer weighs the same in the distance;
    deeper layers are then upsampled (bilinear) to the finest grid and all are concatenated. A coarser
    `patch_stride` averages the finest grid's cells in non-overlapping windows (a partial window at
    the edge averages the cells it has). Returns N x h x w x d, one row per patch.
    """
    size = maps[min(maps)].shape[-2:]
    parts = []
    for stride in sorted(maps):
        x = maps[stride].float()
        kernel = pooling_kernel(x.shape[1], neighbourhood, layer_dim).to(memory_format=torch.channels_last)
        x = F.conv2d(x, kernel, padding=neighbourhood // 2)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        parts.append(x)
    features = torch.cat(parts, 1)
    window = (patch_stride or min(maps)) // min(maps)
    if window > 1:
        features = F.avg_pool2d(features, window, ceil_mode=True)
    return features.permute(0, 2, 3, 1).contiguous()


ShardMap = Callable[[Callable[[Any], Any], list], list]  # (function, jobs) -> results in order: a loop, or Ray tasks


def shard_coreset(job: tuple[torch.Tensor, float, int, int, int]) -> torch.Tensor:
    """One shard's coreset (patch indices) on a given number of threads: the same bits wherever it runs."""
    patches, ratio, seed, projection_dim, threads = job
    torch.set_num_threads(threads)
    return coreset_indices(patches, ratio, seed, projection_dim)


@register
class PatchCore(Detector):
    name = "patchcore"
    config_class = PatchCoreConfig
    config: PatchCoreConfig
    strides = (8, 16)
    index: ClusteredBank | None = None
    bank_sources: torch.Tensor | None = None  # training image of each memory patch (fit time only)
    map_shards: ShardMap | None = None  # runs the shard coresets (default: one after the other, here)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        maps = self.require_backbone()(batch)
        return patch_embedding(maps, self.config.neighbourhood, self.config.layer_dim, self.config.patch_stride)

    def shards(self, count: int) -> list[torch.Tensor]:
        """Image indices of each coreset shard: every calibration fold split into shards of at most shard_images."""
        shards = []
        for fold in self.calibration_folds(count):
            pieces = math.ceil(len(fold) / self.config.shard_images)
            shards += [fold[i::pieces] for i in range(pieces)]
        return shards

    def fit_features(self, features: torch.Tensor) -> dict[str, Any]:
        """Greedy coreset of each shard's patches; the memory bank is their union (a composable coreset)."""
        n, h, w, d = features.shape
        per_image = h * w
        start = time.perf_counter()
        shards, threads = self.shards(n), torch.get_num_threads()
        ratio = min(self.config.coreset_ratio, self.config.memory_limit / (n * per_image))
        jobs = [(features[shard].reshape(-1, d), ratio, self.config.seed + number,
                 self.config.projection_dim, threads) for number, shard in enumerate(shards)]
        chosen = (self.map_shards or (lambda function, items: [function(item) for item in items]))(shard_coreset, jobs)
        kept = [shard[local // per_image] * per_image + local % per_image for shard, local in zip(shards, chosen)]
        keep = torch.cat(kept)
        selected = time.perf_counter()
        self.index = ClusteredBank.build(features.reshape(-1, d)[keep], self.config.seed)
        self.bank_sources = (keep // per_image)[self.index.order]
        return {"patches": n * per_image, "memory_bank": len(keep), "coreset_ratio": ratio, "embedding_dim": d, "shards": len(kept),
                "coreset_s": selected - start, "index_s": time.perf_counter() - selected}

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

    def holdout_scores(self, features: torch.Tensor, holdout: torch.Tensor, scored: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Score held-out images against the memory bank without the patches taken from them.

        For a whole calibration fold this is exactly a model fitted without the fold: its shards'
        coresets never saw the fold's images. The bank is a (K-1)/K part of the final one.
        """
        fitted = self.index
        self.index = fitted.subset(~torch.isin(self.bank_sources, holdout))
        try:
            return self._score_and_map(features[holdout if scored is None else scored])[0]
        finally:
            self.index = fitted

    def teach(self, images: Sequence[ImageSource], progress: Progress | None = None) -> dict[str, Any]:
        """Add the patches of new good images that the memory bank does not yet cover, then recalibrate.

        A greedy coreset step against the existing bank adds new patches, farthest first, until every
        new patch lies within the coverage a good image already has (the median cross-fitted good
        score: a typical good image's worst patch distance), so ordinary patches add nothing. For the threshold, each calibration fold of the taught images
        is scored by the bank extended from the other folds only (cross-fitting, as at fit time).
        """
        if self.index is None:
            raise DefectscopeError("PatchCore is not fitted; call fit() or load a model file")
        if not images:
            raise DefectscopeError("give at least one good image to learn")
        if self.calibration_scores is None:
            raise DefectscopeError("this PatchCore model holds no cross-fitted good scores (fitted by an older version); "
                                   "fit it again")
        features, _ = self._features(images, progress)
        n, h, w, d = features.shape
        patches = features.reshape(n, h * w, d)
        fitted = self.index
        with torch.inference_mode():
            covered = fitted.search(patches.reshape(-1, d))[0].reshape(n, h * w)
            held_out = []
            for fold in self.calibration_folds(n):
                rest = rows_outside(n, fold)
                extra = self._uncovered(patches[rest], covered[rest])
                ends = torch.tensor([len(fitted.bank) + len(extra)])  # the new patches as one more cluster: still exact
                self.index = ClusteredBank(torch.cat([fitted.bank, extra]), torch.cat([fitted.offsets, ends]))
                held_out.append(self._score_and_map(features[fold])[0])
        added = self._uncovered(patches, covered)
        self.index = ClusteredBank.build(torch.cat([fitted.bank, added]), self.config.seed)
        self.calibration = self.taught_calibration(torch.cat(held_out))
        return {"images": n, "patches_added": len(added), "memory_bank": len(self.index.bank)}

    def _uncovered(self, patches: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
        """The N x P patches to add, farthest-first from the bank (`covered`: distances to it), until all are covered."""
        flat = patches.reshape(-1, patches.shape[-1])
        if not len(flat):
            return flat
        radius = float(self.calibration_scores.median())
        return flat[greedy_coreset(flat, len(flat), covered=covered.reshape(-1), stop_within=radius)]

    def _reweight(self, worst_patches: torch.Tensor, nearest_index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The paper's eq. 7: damp the score when the nearest memory patch sits among close neighbours."""
        bank = self.index.bank
        k = min(self.config.reweight_neighbours, len(bank))
        _, support = nearest(bank[nearest_index], bank, k=k)
        distances = (worst_patches[:, None, :] - bank[support]).norm(dim=-1)
        weights = 1 - torch.softmax(distances, dim=1)[:, 0]
        return weights * scores

    def graph_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest-neighbour distances by brute force, one GEMM against the whole bank and a min (the
        pruned search has no fixed graph); the score is the largest, as in `score_features`."""
        if self.config.reweight:
            raise DefectscopeError("PatchCore with reweight: true cannot be exported; refit with reweight: false")
        n, h, w, d = features.shape
        patches = features.reshape(n, h * w, d)
        bank = self.index.bank.float()
        squared = (patches * patches).sum(-1, keepdim=True) - 2 * patches @ bank.T + (bank * bank).sum(1)
        distances = squared.min(-1).values.clamp_min(0).sqrt()
        return distances.max(1).values, distances.reshape(n, h, w)

    def graph_batch_limit(self) -> int:
        """Images per graph run that keep its patch x bank distance matrix under GRAPH_DISTANCE_CELLS."""
        frame = torch.zeros(1, 3, *self.preprocess.input_shape, dtype=torch.uint8)
        with torch.inference_mode():
            patches = self.embed(normalize(frame, self.preprocess)).shape[1:3].numel()
        return max(1, GRAPH_DISTANCE_CELLS // (patches * len(self.index.bank)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.index.tensors() if self.index else {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.index = ClusteredBank(tensors["memory_bank"], tensors["cluster_offsets"])
