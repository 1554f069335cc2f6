"""PatchCore (Roth et al., CVPR 2022): a coreset memory of locally aware patch features, nearest-neighbour scoring."""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectscope.data.decode import ImageSource
from defectscope.data.frame import Preprocess
from defectscope.data.defects import KINDS
from defectscope.detectors.base import (
    Detector,
    DetectorConfig,
    Embedded,
    FitReport,
    Progress,
    register,
    rows_outside,
)
from defectscope.detectors.coreset import coreset_indices, greedy_coreset, greedy_cover, random_projection
from defectscope.detectors.global_view import (Moments, RegionModel, drift_moment, global_scores, map_grid,
                                               region_descriptors, standardize)
from defectscope.detectors.nearest import ClusteredBank, nearest
from defectscope.detectors.place_view import MIN_IMAGES as PLACE_MIN_IMAGES, PlaceStats, place_scores
from defectscope.detectors.selection import (TAIL_RATE, TAIL_Z, Probe, costs_within_noise, false_alarms, make_probe,
                                              separation)
from defectscope.errors import DefectscopeError, SettingsError, check_fitted
from defectscope.maps import bilinear_matrix
from defectscope.search import one_blas_thread
from defectscope.settings import derived_seed, require_choice, require_range
from defectscope.thresholds import false_alarm_cut, with_map_level


TEACH_COVERAGE = 0.1  # taught patches are added until covered as closely as the best-covered tenth of good images
PATCH_STRIDES = (8, 16, 32)  # the finest feature stride (8) times 1, 2 or 4
MAX_NEIGHBOURHOOD = 15  # patches pooled over at most 15 x 15 feature cells (120 px at stride 8)
MIN_GLOBAL_IMAGES = 3  # a calibration fold's region statistics need two images besides its own
VIEW_CHOICES = ("auto", "on", "off")  # global_view, place_view and rotations: chosen by fit, or given
SWITCHES = ("global_view", "place_view", "rotations")  # the fields that take VIEW_CHOICES


@dataclass
class PatchCoreConfig(DetectorConfig):
    """image_size / crop / patch_stride: the frame; with frame_search (the default, when none of the three is
    given) `fit` chooses them per product from good images alone among `frame_search.CANDIDATES`, else
    352 / 320 with 16-pixel patches (each averaging 2x2 cells of the stride-8 features).
    coreset_ratio: memory kept; layer_dim: width each layer's neighbourhood vector is pooled to;
    shard_images: the coreset is chosen by merge and reduce: per shard of at most this many images
    (shards nest in the calibration folds) each keeps coreset_candidates times the ratio, then one greedy
    coreset over all candidates picks the bank, so the cost grows linearly with the images while the bank
    is chosen over all of them; a calibration fold is scored by the bank without its images' rows,
    refilled from the other folds' candidates. memory_limit: most memory rows kept (beyond it the ratio
    shrinks), so memory and search cost stop growing with the training set. global_view: the layout of
    regions beside the patches (`global_view.py`), fused into one score; "auto": `fit` keeps it when the probe
    of held-out good images shows it pays (more synthetic defects caught, no more false alarms under a line's
    light and camera drift; see `choose_global_view`; below selection.MIN_IMAGES, no probe: off); "on" (at least
    MIN_GLOBAL_IMAGES images) / "off" decide it here. A fitted model's config holds "on" or "off".
    place_view: each patch's distance also judged against how good images vary at its place (`place_view.py`),
    fused into the patch score (the larger of the two, each on its cross-fitted good scores' scale); "auto": kept
    when the global view is not (both judge a place against good images, and each view in the max adds its good
    images' tail to the threshold); "on" / "off" decide it here; none below place_view.MIN_IMAGES cross-fitted good
    images. A fitted model's config holds "on" or "off".
    rotations: the memory also learns each good image turned by a quarter, a half and three quarters (a frame
    that is not square: a half), for a part that lies at any turn and whose training images show only some of its
    turns; its rows are chosen over four times the patches and at the same ratio it keeps four times as many (fits
    took 1.9-5.7x as long and batched images 1.0-5.1x in benchmarks/results/frames.md), and a calibration fold leaves out an
    image's turns with it. With it, global_view "auto" is off: such a part has no layout of regions. "auto": the
    frame search's probe decides at the chosen frame (`frame_search.choose_turns`): on only when the turns catch
    more synthetic defects by more than two standard errors, since they multiply the cost and a defect that looks
    like a turned good patch passes; without a search (a pinned frame, too few images) off. "on" / "off" (or
    true / false) decide it here. A fitted model's config holds "on" or "off".
    batch_size: images embedded at once (the backbone takes them in passes of `images_per_pass`). 16, not 32: the fit
    holds every image's features while one batch's activations come and go, so the batch sets the peak (juice_bottle's
    fit: 2.6 -> 1.9 GB, same model), at about the same speed on 2 cores."""

    image_size: int = 352
    crop: int | None = 320
    patch_stride: int = 16
    batch_size: int = 16
    frame_search: bool = True
    global_view: str = "auto"
    place_view: str = "auto"
    coreset_ratio: float = 0.1
    coreset_candidates: float = 2.0
    memory_limit: int = 50_000
    shard_images: int = 16
    projection_dim: int = 128
    neighbourhood: int = 3
    layer_dim: int = 64
    reweight: bool = False
    reweight_neighbours: int = 9
    rotations: str = "auto"

    @classmethod
    def from_dict(cls, data: dict) -> PatchCoreConfig:
        """`Settings.from_dict`; the auto / on / off fields also take true / false: YAML reads `on` and `off` as
        booleans, and model files before `rotations: auto` hold it as one."""
        if isinstance(data, dict):
            data = {k: ("on" if v else "off") if k in SWITCHES and isinstance(v, bool) else v for k, v in data.items()}
        return super().from_dict(data)

    def check(self) -> None:
        super().check()
        require_range("coreset_ratio", self.coreset_ratio, 0, 1, low_open=True)
        require_range("coreset_candidates", self.coreset_candidates, 1)
        # upper bounds: beyond them a fit only grows (the pooling kernel as layer_dim x channels x neighbourhood^2; 999 took
        # 24 GiB and was killed), and no product gains (the PatchCore reference uses 3, 1024 and 128)
        require_range("projection_dim", self.projection_dim, 1, 1024)
        if not 1 <= self.neighbourhood <= MAX_NEIGHBOURHOOD or self.neighbourhood % 2 == 0:
            raise SettingsError(f"field 'neighbourhood' must be an odd number from 1 to {MAX_NEIGHBOURHOOD}, got "
                                f"{self.neighbourhood}")
        require_range("layer_dim", self.layer_dim, 1, 2048)
        require_range("reweight_neighbours", self.reweight_neighbours, 1, 256)
        require_range("shard_images", self.shard_images, 1)
        require_range("memory_limit", self.memory_limit, 1)
        require_choice("global_view", self.global_view, VIEW_CHOICES)
        require_choice("place_view", self.place_view, VIEW_CHOICES)
        require_choice("rotations", self.rotations, VIEW_CHOICES)
        if self.patch_stride not in PATCH_STRIDES:
            raise SettingsError(f"field 'patch_stride' must be one of {', '.join(map(str, PATCH_STRIDES))}, "
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


@dataclass
class PatchFeatures:
    """What PatchCore embeds per image: patch features N x h x w x d and region descriptors N x R x C
    (the global view's; N x 0 x 0 for a model without it), and while fitting with `rotations` each image's
    patches turned (N x T x h x w x d, `PatchCore.embed_turned`); indexed and filled by image like one tensor."""

    patches: torch.Tensor
    regions: torch.Tensor
    turned: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.patches)

    @classmethod
    def cat(cls, parts: Sequence[PatchFeatures]) -> PatchFeatures:
        """The images of several, one after the other (turned patches only when every part has them)."""
        turned = None if any(part.turned is None for part in parts) else torch.cat([part.turned for part in parts])
        return cls(torch.cat([part.patches for part in parts]), torch.cat([part.regions for part in parts]), turned)

    def __getitem__(self, index: Any) -> PatchFeatures:
        return PatchFeatures(self.patches[index], self.regions[index], None if self.turned is None else self.turned[index])

    def __setitem__(self, index: Any, value: PatchFeatures) -> None:
        self.patches[index], self.regions[index] = value.patches, value.regions
        if self.turned is not None:
            self.turned[index] = value.turned

    def coarsened(self, window: int) -> PatchFeatures:
        """The patch grid averaged in non-overlapping `window` x `window` cells, as `patch_embedding` averages the
        finest grid into a coarser patch stride (the same numbers)."""
        if window == 1:
            return self
        turned = None if self.turned is None else _coarsened(self.turned.flatten(0, 1), window).unflatten(0, self.turned.shape[:2])
        return PatchFeatures(_coarsened(self.patches, window), self.regions, turned)

    def empty(self, count: int) -> PatchFeatures:
        """Room for `count` images of this kind (filled batch by batch)."""
        return PatchFeatures(self.patches.new_empty((count, *self.patches.shape[1:])),
                             self.regions.new_empty((count, *self.regions.shape[1:])),
                             None if self.turned is None else self.turned.new_empty((count, *self.turned.shape[1:])))

    @property
    def cells(self) -> int:
        """Patches per image (h x w)."""
        return self.patches[0].numel() // self.patches.shape[-1]

    @property
    def turns(self) -> int:
        """Turned copies of each image's patches (0 without `rotations`)."""
        return 0 if self.turned is None else self.turned.shape[1]

    @property
    def rows_per_image(self) -> int:
        """The memory rows an image offers: its patches, and with `rotations` as many again per turn."""
        return self.cells * (1 + self.turns)

    def learned_rows(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The patch rows `images` offer the memory, image after image: its own patches, then its turned ones; written
        into the front of `out` (rows x d) when given, so that shard after shard reuses one buffer."""
        d, cells = self.patches.shape[-1], self.cells
        count = len(images) * self.rows_per_image
        rows = self.patches.new_empty((count, d)) if out is None else out[:count]
        grid = rows.view(len(images), -1, d)
        for slot, image in enumerate(images.tolist()):  # an image at a time: no second copy of the shard
            grid[slot, :cells] = self.patches[image].reshape(cells, d)
            if self.turned is not None:
                grid[slot, cells:] = self.turned[image].reshape(-1, d)
        return rows

    def rows_at(self, image: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Learned rows by image and position among that image's (`learned_rows`), gathered without building them."""
        d, cells = self.patches.shape[-1], self.cells
        rows = self.patches.reshape(len(self), cells, d)[image, offset % cells]
        if self.turned is not None:
            turned = offset >= cells
            turn, cell = (offset[turned] - cells) // cells, offset[turned] % cells
            rows[turned] = self.turned.reshape(len(self), -1, cells, d)[image[turned], turn, cell]
        return rows


def _coarsened(patches: torch.Tensor, window: int) -> torch.Tensor:
    """N x h x w x d patch features averaged in `window` x `window` cells (partial ones at the edge)."""
    return F.avg_pool2d(patches.permute(0, 3, 1, 2), window, ceil_mode=True).permute(0, 2, 3, 1).contiguous()


def split_features(features: PatchFeatures | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(patch features, region descriptors or None when only patches were given)."""
    return (features.patches, features.regions) if isinstance(features, PatchFeatures) else (features, None)


@dataclass
class CandidatePool:
    """The merged shard coresets (fit time only): features, source image and projected rows of every candidate,
    which candidates the reduce selected, the source image of each candidate's nearest selected one, the
    largest candidate-to-bank distance (the coverage radius), and the selected rows' projections grouped as the
    memory bank is clustered (`group_like`)."""

    features: torch.Tensor
    sources: torch.Tensor
    projected: torch.Tensor
    selected: torch.Tensor
    nearest_source: torch.Tensor
    radius: float
    projected_bank: ClusteredBank | None = None

    @classmethod
    def reduce(cls, features: torch.Tensor, sources: torch.Tensor, count: int, config: PatchCoreConfig) -> CandidatePool:
        """Greedy k-center over the candidates (the reduce step) down to `count` rows."""
        projected = random_projection(features, config.projection_dim, config.seed)
        count = min(count, len(features))
        start = int(torch.randint(len(features), (1,), generator=torch.Generator().manual_seed(config.seed)))
        if count < len(features):
            selected, distance, nearest_row = greedy_cover(projected, count, start)
        else:
            selected, distance, nearest_row = torch.arange(len(features)), torch.zeros(len(features)), torch.arange(len(features))
        return cls(features, sources, projected, selected, sources[selected][nearest_row], float(distance.max()))

    def group_like(self, bank: ClusteredBank) -> None:
        """Group the selected rows' projections in the clusters of `bank` (built from the selected rows), so that
        `refill` finds each candidate's nearest kept row by the pruned exact search, not a candidate x bank GEMM."""
        self.projected_bank = ClusteredBank(self.projected[self.selected][bank.order], bank.offsets, bank.order)

    def refill(self, holdout: torch.Tensor, workers: int | None = None) -> torch.Tensor:
        """Candidates of the other images that take the place of the held-out images' rows: as many as were removed,
        farthest first among the candidates whose nearest row was removed (the holes), so the bank keeps its size
        and its density where the held-out images' rows were."""
        removed = int(torch.isin(self.sources[self.selected], holdout).sum())
        others = torch.nonzero(~torch.isin(self.sources, holdout)).flatten()
        lost = others[torch.isin(self.nearest_source[others], holdout)]  # their nearest row came from a held-out image
        if not removed or not len(lost):
            return torch.zeros(0, dtype=torch.long)
        kept = ~torch.isin(self.sources[self.selected][self.projected_bank.order], holdout)
        covered = (self.projected_bank.subset(kept).search(self.projected[lost], workers)[0] if kept.any()
                   else torch.full((len(lost),), float("inf")))
        return lost[greedy_coreset(self.projected[lost], min(removed, len(lost)), covered=covered)]


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
    pool: CandidatePool | None = None  # the shard coresets' candidates the bank was reduced from (fit time only)
    map_shards: ShardMap | None = None  # runs the shard coresets (default: one after the other, here)
    moments: Moments | None = None  # the global view's good-image statistics (None: patch view alone)
    regions: RegionModel | None = None  # derived from `moments`
    fusion: dict[str, torch.Tensor] | None = None  # the views' cross-fitted good-score location and spread
    place: dict[str, torch.Tensor] | None = None  # the place view: per-cell mean and spread, and its fusion's scales
    probe: Probe | None = None  # held-out images with synthetic defects while `fit` decides the global view
    searched: tuple[Probe, PatchFeatures | None, Preprocess | None] | None = None  # the frame search's (`use_probe`)
    embedded: Embedded | None = None  # the frame search's fit images as this model learns them (`use_embedded`)
    embedded_frame: tuple[Preprocess, int] | None = None  # the frame and patch stride they were embedded at
    global_choice: dict[str, Any] | None = None  # the evidence for that decision
    nearest_scores: torch.Tensor | None = None  # while fitting: the patch view's cross-fitted scores (the map's scale)

    def embed(self, batch: torch.Tensor) -> PatchFeatures:
        maps = self.require_backbone()(batch)
        patches = patch_embedding(maps, self.config.neighbourhood, self.config.layer_dim, self.config.patch_stride)
        regions = region_descriptors(maps) if self.uses_global_view else patches.new_empty((len(patches), 0, 0))
        return PatchFeatures(patches, regions)

    def embed_turned(self, batch: torch.Tensor) -> PatchFeatures:
        """`embed`, with each image's patches turned by a quarter, a half and three quarters (a frame that is not
        square: by a half only, the one turn that keeps its shape)."""
        features = self.embed(batch)
        turns = (1, 2, 3) if batch.shape[-1] == batch.shape[-2] else (2,)
        turned = [patch_embedding(self.require_backbone()(torch.rot90(batch, turn, (-2, -1))), self.config.neighbourhood,
                                  self.config.layer_dim, self.config.patch_stride) for turn in turns]
        features.turned = torch.stack(turned, 1)
        return features

    def learning_features(self, images: Sequence[ImageSource], progress: Progress | None) -> tuple[PatchFeatures, torch.Tensor]:
        """`Detector.learning_features`: `embed`, with `rotations` `embed_turned`; the images the frame search
        embedded as this model learns them (`use_embedded`) are not embedded again."""
        known, self.embedded = self.embedded, None
        if known is not None and not self._learns_like(known):
            known = None
        return self._features(images, progress, self.embed_turned if self.learns_turns else self.embed, known)

    def use_embedded(self, embedded: Embedded, preprocess: Preprocess, patch_stride: int) -> None:
        """Let the next `fit` (on the same images) take the features of some of them from the frame search, which
        embedded them in `preprocess` at `patch_stride`: used when that is this model's frame and grid and they hold
        what it learns."""
        self.embedded, self.embedded_frame = embedded, (preprocess, patch_stride)

    def _learns_like(self, known: Embedded) -> bool:
        """Whether features embedded before are what this model learns: in its frame and patch grid, with region
        descriptors exactly when it uses the global view and turned patches exactly when it learns the turns."""
        return (self.embedded_frame == (self.preprocess, self.config.patch_stride)
                and (known.features.regions.shape[1] > 0) == self.uses_global_view
                and (known.features.turned is not None) == self.learns_turns)

    @property
    def learns_turns(self) -> bool:
        """Whether fitting learns each image's turns ("auto" left undecided by a frame search fits without them)."""
        return self.config.rotations == "on"

    @property
    def uses_global_view(self) -> bool:
        """Whether fitting learns the global view ("auto" learns it, then keeps it or not; with `rotations` it does
        not: a part that lies at any turn has no layout of regions to learn)."""
        return self.config.global_view == "on" or (self.config.global_view == "auto" and not self.learns_turns)

    def fit(self, images: Sequence[ImageSource], progress: Progress | None = None) -> FitReport:
        """`Detector.fit`; with the global view, the probe of `selection` (the frame search's held-out images) states
        the drift its scale allows for and, with "auto", decides whether it is kept."""
        if self.config.rotations == "auto":  # no frame search decided it (a pinned frame, too few images)
            self.config.rotations = "off"
        if self.config.global_view == "on" and len(images) < MIN_GLOBAL_IMAGES:
            raise DefectscopeError(f"global_view: on needs at least {MIN_GLOBAL_IMAGES} good images (each calibration "
                                   f"fold's region statistics come from the others), got {len(images)}")
        kinds = KINDS if self.config.global_view == "auto" else ()  # "on" needs the drifted images only
        searched = self.searched[0] if self.searched is not None else None
        self.probe = (searched or make_probe(images, self.config.seed, kinds)) if self.uses_global_view else None
        try:
            report = super().fit(images, progress)
            # the map shows the patch view alone: its own region level, from its own good scores (kept to restate it)
            self.map_scores = self.nearest_scores if self.place is not None or self.fusion is not None else None
            self.calibration = with_map_level(self.calibration, None if self.map_scores is None else self.map_scores.numpy())
        finally:
            self.probe = self.searched = self.nearest_scores = self.embedded = self.embedded_frame = None
        if self.global_choice is not None:
            self.train_summary["global_view_choice"] = report.details["global_view_choice"] = self.global_choice
        return report

    def use_probe(self, probe: Probe, defective: PatchFeatures | None = None, preprocess: Preprocess | None = None
                  ) -> None:
        """Let the next `fit` (on the same images, with the same seed) judge the global view on the frame search's
        probe instead of making its own; its synthetic-defect images' features are used when they were embedded in
        the frame this model learns (`preprocess`), else they are embedded again."""
        self.searched = probe, defective, preprocess

    def _probe_defective(self) -> PatchFeatures:
        """The probe's synthetic-defect images embedded in this model's frame (the frame search's, when it has them)."""
        if self.searched is not None and self.searched[1] is not None and self.searched[2] == self.preprocess:
            return self.searched[1]
        return self._features(self.probe.defective, None)[0]

    def shards(self, count: int) -> list[torch.Tensor]:
        """Image indices of each coreset shard: every calibration fold split into shards of at most shard_images."""
        shards = []
        for fold in self.calibration_folds(count):
            pieces = math.ceil(len(fold) / self.config.shard_images)
            shards += [fold[i::pieces] for i in range(pieces)]
        return shards

    def fit_features(self, features: PatchFeatures | torch.Tensor) -> dict[str, Any]:
        """Merge and reduce: each shard keeps `coreset_candidates` times the final share of its patches (linear cost),
        then one greedy coreset over all those candidates chooses the memory bank, as a global coreset would.
        With the global view on, each region's good-image statistics are kept too (fused after cross-fitting). With
        the turns, `features.turned` is let go once the memory is chosen (nothing after it reads them)."""
        patches, regions = split_features(features)
        self.fusion = None
        undecidable = self.config.global_view == "auto" and self.probe is None  # "auto" without a probe: off
        self.moments = Moments.of(regions) if self.uses_global_view and regions is not None and not undecidable else None
        self.regions = None  # derived from the moments once the drift is known (`crossfit_scores`)
        learned = features if isinstance(features, PatchFeatures) else PatchFeatures(patches, patches.new_empty(0))
        n, d = len(patches), patches.shape[-1]
        turns = learned.turns
        per_image = learned.rows_per_image  # memory rows an image offers: its own patches and its turned ones
        start = time.perf_counter()
        shards = self.shards(n)
        ratio = min(self.config.coreset_ratio, self.config.memory_limit / (n * per_image))
        advance = self.phase(f"coreset: {len(shards)} shards, then one over their candidates", len(shards) + 1)
        chosen = self._shard_coresets(learned, shards, min(1.0, ratio * self.config.coreset_candidates), advance)
        sources = torch.cat([shard[local // per_image] for shard, local in zip(shards, chosen)])
        candidates = learned.rows_at(sources, torch.cat([local % per_image for local in chosen]))
        learned.turned = None  # the turns are learned: scoring and cross-fitting use each image's own patches
        merged = time.perf_counter()
        self.pool = CandidatePool.reduce(candidates, sources, max(1, round(n * per_image * ratio)), self.config)
        selected = time.perf_counter()
        advance(1)
        self.index = ClusteredBank.build(self.pool.features[self.pool.selected], self.config.seed)
        self.bank_sources = self.pool.sources[self.pool.selected][self.index.order]
        self.pool.group_like(self.index)
        return {"patches": n * per_image, "turns": turns, "memory_bank": len(self.pool.selected), "coreset_ratio": ratio,
                "embedding_dim": d, "shards": len(shards), "candidates": len(candidates),
                "coverage_radius": self.pool.radius, "shard_coreset_s": merged - start, "reduce_s": selected - merged,
                "index_s": time.perf_counter() - selected, "global_view": self.moments is not None}

    def _shard_coresets(self, learned: PatchFeatures, shards: list[torch.Tensor], share: float, advance: Progress
                        ) -> list[torch.Tensor]:
        """Each shard's coreset (positions among its images' `learned_rows`, keeping `share` of them): as Ray tasks
        with `map_shards`, else here, one shard a thread on as many threads as torch has, each writing into its own
        buffer (a copy of every shard's rows at once doubled the features in memory, and fresh copies shard by shard
        left holes in the heap its later blocks could not reuse). A shard's greedy loop runs on one core, partly in
        NumPy calls that let go of the GIL: four of threaded-parts' 102,400-row shards 7.9 -> 6.0 s on 2 cores; the
        same bits as one shard after the other, or as Ray's tasks (each job names its threads)."""
        threads = torch.get_num_threads()

        def job(number: int, rows: torch.Tensor) -> tuple[torch.Tensor, float, int, int, int]:
            return rows, share, derived_seed(self.config.seed, number), self.config.projection_dim, threads

        if self.map_shards is not None:
            chosen = self.map_shards(shard_coreset, [job(i, learned.learned_rows(shard)) for i, shard in enumerate(shards)])
            advance(len(shards))
            return chosen
        workers, rows = max(1, min(threads, len(shards))), max(map(len, shards)) * learned.rows_per_image
        free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(workers):
            free.put(learned.patches.new_empty((rows, learned.patches.shape[-1])))

        def shard_job(number: int) -> torch.Tensor:
            buffer = free.get()
            try:
                return shard_coreset(job(number, learned.learned_rows(shards[number], buffer)))
            finally:
                free.put(buffer)

        chosen = []
        with one_blas_thread(), ThreadPoolExecutor(workers, thread_name_prefix="defectscope-shard") as pool:
            for indices in pool.map(shard_job, range(len(shards))):  # in order; NumPy's BLAS on one thread throughout
                chosen.append(indices)
                advance(1)
        return chosen

    def score_features(self, features: PatchFeatures | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_fitted(self.index, "PatchCore")
        return self._views(features)[:2]

    def _views(self, features: PatchFeatures | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image scores and maps (`score_features`), and the patch view's image scores alone: the view the map shows."""
        patches, regions = split_features(features)
        view, grids = self._patch_view(patches)
        return *self._fuse(self._with_place(view, grids), grids, regions), view

    def _patch_view(self, patches: torch.Tensor, index: ClusteredBank | None = None, workers: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """N x h x w x d patch features -> the patch view's image scores (the largest distance; reweighted when
        configured) and its distance grids N x h x w, against `index` (default: the memory bank) on `workers` threads."""
        index = self.index if index is None else index
        n, h, w, d = patches.shape
        patches = patches.reshape(n, h * w, d)
        distances, indices = index.search(patches.reshape(-1, d), workers)
        maps = distances.reshape(n, h * w)
        scores, worst = maps.max(1)
        if self.config.reweight:
            scores = self._reweight(index, patches[torch.arange(n), worst], indices.reshape(n, h * w)[torch.arange(n), worst],
                                    scores)
        return scores, maps.reshape(n, h, w)

    def _with_place(self, scores: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """The patch view's image scores with the place view fused in (see `_place_fused`)."""
        if self.place is None:
            return scores
        return self._place_fused(scores, place_scores(grids, self.place["mean"], self.place["spread"]))

    def _place_fused(self, scores: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """The larger of the patch score and the place score, the place score put on the patch score's scale: as many
        of the patch view's good standard deviations above its good mean as it stands above its own."""
        patch_location, patch_spread, place_location, place_spread = self.place["fusion"]
        return torch.maximum(scores.float(), patch_location + patch_spread * (places - place_location) / place_spread)

    def patch_crossfit(self, features: PatchFeatures | torch.Tensor, folds: list[torch.Tensor],
                       scored: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch view's cross-fitted scores (`holdout_grids`), as the calibration phase, a fold a thread on torch's
        threads, each fold's bank and search on one core (fold after fold, the bank's refill and subset ran on one core
        and the search's GEMMs are small: the other core sat idle); then the place view fitted on their distance grids
        (`fit_place`). Returns the scores with the place view fused in (each
        image's place score from the statistics without it) and the nearest-patch scores alone."""
        advance = self.phase(f"calibrating on {len(folds)} cross-fitted folds", len(folds))
        self.place = None

        def fold(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            part = self.holdout_grids(features, *pair, workers=1)
            advance(1)
            return part

        with one_blas_thread(), ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="defectscope-fold") as pool:
            parts = list(pool.map(fold, zip(folds, scored)))
        scores, grids = torch.cat([part[0] for part in parts]).float(), torch.cat([part[1] for part in parts])
        stats = self.fit_place(scores, grids)
        return (scores if stats is None else self._place_fused(scores, stats.left_out_scores(grids))), scores

    def fit_place(self, scores: torch.Tensor, grids: torch.Tensor) -> PlaceStats | None:
        """The place view from the patch view's cross-fitted scores and distance grids (None, and the config says
        so, when it is off or there are fewer than place_view.MIN_IMAGES). Its fusion scales come from each image's
        place score without it in the statistics, as an unseen image's would be."""
        if self.config.place_view == "off" or len(grids) < PLACE_MIN_IMAGES:
            self.config.place_view = "off"
            return None
        stats = PlaceStats.of(grids)
        places = stats.left_out_scores(grids)
        mean, spread = stats.mean_and_spread()
        self.place = {"mean": mean, "spread": spread, "fusion": torch.stack(
            [scores.mean(), scores.std().clamp_min(1e-6), places.mean(), places.std().clamp_min(1e-6)])}
        return stats

    def _fuse(self, scores: torch.Tensor, maps: torch.Tensor, regions: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One score and one map from both views (the patch view alone until the fusion is fitted).

        The image score is the larger of the patch score and the global score (see `_fused`). On images the patch
        view alone would pass (below its good scores' 1% tail), the map adds, on the feature grid, each map region's
        excess over the 1% tail of its good residuals (z above TAIL_Z) on the patch score's scale: where the patch
        view sees the defect, its own map says where.
        """
        if self.fusion is None or regions is None:
            return scores, maps
        z = self._region_z(self.regions.residuals(regions))
        grid = (map_grid(z) - TAIL_Z).clamp_min(0)  # only what lies beyond the region's own 1% tail shows
        rows = torch.from_numpy(bilinear_matrix(int(maps.shape[1]), int(grid.shape[1])).astype(np.float32))
        cols = torch.from_numpy(bilinear_matrix(int(maps.shape[2]), int(grid.shape[2])).astype(np.float32))
        fused, (location, spread) = self._fused(scores, z), self.fusion["patch"]
        unseen = (scores.float() < location + TAIL_Z * spread).float()[:, None, None]  # the patch view alone would pass it
        return fused, maps.float() + unseen * spread * (rows @ grid @ cols.T)

    def _fused(self, scores: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The larger of the patch score and the global score on the patch score's scale: a region z above its good
        residuals counts as a patch score as many standard deviations above the good patch scores' mean."""
        location, spread = self.fusion["patch"]
        return torch.maximum(scores.float(), location + spread * global_scores(z))

    def _region_z(self, residuals: torch.Tensor) -> torch.Tensor:
        """Region residuals in the fusion's units: standard deviations of the cross-fitted good residuals (and drift)."""
        return standardize(residuals, self.fusion["region_location"], self.fusion["region_spread"])

    def crossfit_scores(self, features: PatchFeatures | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch view's cross-fitted scores (see `Detector.crossfit_scores`), with the place view fused in unless
        it is off or (with "auto") the global view is kept; with the global view, each fold's region residuals from
        statistics without the fold too, then the fusion fitted on both, and the fused scores (or, when "auto" decides
        against the global view, the patch view's).

        The folds' region models are fitted in a second thread while the patch view scores the folds: a few images'
        nearest-neighbour search runs on one BLAS thread (`search.py`), which leaves the other core to them."""
        folds, scored = self.crossfit_rows(len(features))
        self.global_choice = None
        if self.moments is None:
            if self.config.global_view == "auto" and self.uses_global_view:  # not learned: no probe to decide it
                self.global_choice = {"chosen": "off", "reason": "too few training images for the probe"}
            self.config.global_view = "off"
            patch, self.nearest_scores = self.patch_crossfit(features, folds, scored)
            return torch.cat(scored), self._settle_place(patch, self.nearest_scores, keep=True)
        regions = split_features(features)[1]
        self.phase("global view: held-out, drifted and synthetic-defect images")
        drifted = self._drifted() if self.probe is not None else None
        if drifted is not None:
            self.moments.drift = drift_moment(regions[torch.from_numpy(self.probe.drifted_from)], drifted.regions)
        self.regions = RegionModel.from_moments(self.moments)
        held_out = self._held_out_regions(regions) if drifted is not None else None
        with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)) as pool:
            fitting = pool.submit(self.crossfit_residuals, regions, folds, scored)
            patch, nearest = self.patch_crossfit(features, folds, scored)
            residuals = fitting.result()
        self.nearest_scores = nearest
        drift = (self._drift_variance(held_out, regions, drifted.regions) if drifted is not None
                 else torch.zeros(residuals.shape[1]))
        self.fusion = {"patch": torch.stack([nearest.mean(), nearest.std().clamp_min(1e-6)]),
                       "region_location": residuals.mean(0),
                       "region_spread": (residuals.var(0) + drift).sqrt().clamp_min(1e-6)}
        z = self._region_z(residuals)
        if self.config.global_view == "auto":
            self.global_choice = self.choose_global_view(features, nearest, self._fused(nearest, z), drifted, held_out)
            self.config.global_view = self.global_choice["chosen"]
            if self.global_choice["chosen"] == "off":
                self.moments = self.regions = self.fusion = None
                return torch.cat(scored), self._settle_place(patch, nearest, keep=True)
        return torch.cat(scored), self._fused(self._settle_place(patch, nearest, keep=False), z)

    def _settle_place(self, patch: torch.Tensor, nearest: torch.Tensor, keep: bool) -> torch.Tensor:
        """The patch view's cross-fitted scores once "auto" has settled the place view (`keep`: whether the global
        view leaves it in): with it (`patch`) or without (`nearest`, and the place view dropped)."""
        if self.place is not None and (keep or self.config.place_view == "on"):
            self.config.place_view = "on"
            return patch
        self.place, self.config.place_view = None, "off"
        return nearest

    def crossfit_residuals(self, regions: torch.Tensor, folds: list[torch.Tensor], scored: list[torch.Tensor]
                           ) -> torch.Tensor:
        """Each fold's scored images' region residuals from the statistics of the other folds (the fold's own
        descriptors subtracted from the moments: exact, no refit)."""
        return torch.cat([RegionModel.from_moments(self.moments - Moments.of(regions[held])).residuals(regions[chosen])
                          for held, chosen in zip(folds, scored)])

    def _drifted(self) -> PatchFeatures:
        """The probe's drifted good images, embedded."""
        return self._features(self.probe.drifted, None)[0]

    def _held_out_regions(self, regions: torch.Tensor) -> RegionModel:
        """The region model without the probe's held-out images (their descriptors subtracted from the moments)."""
        return RegionModel.from_moments(self.moments - Moments.of(regions[torch.from_numpy(self.probe.held).sort().values]))

    def _drift_variance(self, held_out: RegionModel, regions: torch.Tensor, drifted: torch.Tensor) -> torch.Tensor:
        """Per region: the mean squared change of a held-out image's residual under the stated drift (`held_out`:
        statistics without the held-out images). Added to the good residuals' variance, it makes the global view's
        scale allow for the light and camera drift of a line: a region must change more than drift does to count."""
        held = torch.from_numpy(self.probe.held)
        before = held_out.residuals(regions[held]).repeat_interleave(len(drifted) // len(held), 0)
        return ((held_out.residuals(drifted) - before) ** 2).mean(0)

    def choose_global_view(self, features: PatchFeatures, patch: torch.Tensor, fused: torch.Tensor,
                           drifted: PatchFeatures, held_out: RegionModel) -> dict[str, Any]:
        """Keep the global view unless the probe shows that it costs, by the frame search's one-standard-error rule.

        No defect pasted into a good image stands for a part that is missing or in the wrong place (the probe's would
        be caught by the patch view at their seams), so good images cannot show what the global view gains; they can
        show what it costs. At each score's own 1% threshold on its cross-fitted good scores (as the model states
        it), the fused score must catch no fewer of the probe's synthetic defects than the patch score alone, and
        raise no more false alarms on the held-out good images, as they are and drifted (`selection.drifted`: the
        light and camera drift of a line), each within one standard error (`selection.costs_within_noise`: a held-out
        image counts once, as it is or drifted). The held-out images' own patches and regions are left out of the
        models that score them (`held_out`: the region model without them). The global view is judged against the
        nearest-patch score (`patch`, `fused`: cross-fitted, without the place view): the place view is kept only
        where the global view is not, and it catches some of what the global view catches, which would leave the
        global view only its cost to show."""
        held = torch.from_numpy(self.probe.held).sort().values
        probed = PatchFeatures.cat([self._probe_defective(), features[held], drifted])
        fitted, fusion, place = self.index, self.fusion, self.place
        self.index, self.fusion, self.place = self.holdout_bank(held)[0], None, None
        try:
            patch_probed = self.score_features(probed)[0].float()
        finally:
            self.index, self.fusion, self.place = fitted, fusion, place
        residuals = held_out.residuals(probed.regions)
        fused_probed = self._fused(patch_probed, self._region_z(residuals))
        count = len(self.probe.defective)
        owners = np.concatenate([held.numpy(), self.probe.drifted_from])
        alone = self._probe_evidence(patch, patch_probed, count, owners)
        both = self._probe_evidence(fused, fused_probed, count, owners)
        recall_cost = alone["recall_at_1pct"] - both["recall_at_1pct"]
        alarm_cost = both["false_alarms"] - alone["false_alarms"]
        keep = costs_within_noise(alone, both, count, len(held))
        return {"chosen": "on" if keep else "off", "recall_cost": recall_cost, "false_alarm_cost": alarm_cost,
                "synthetic_images": count, "held_out_images": len(held), "drifted_images": len(self.probe.drifted),
                "evidence": {"patch view": alone, "patch + global view": both}}

    @staticmethod
    def _probe_evidence(good: torch.Tensor, probed: torch.Tensor, count: int, owners: np.ndarray) -> dict[str, float]:
        """Recall on the probe's first `count` (synthetic defects) and the share of held-out images flagged among the
        rest (good images as they are and drifted; `owners`: the image each shows), at the 1% threshold calibrated on
        `good` (cross-fitted good scores)."""
        good, probed = good.numpy(), probed.numpy()
        threshold = false_alarm_cut(good, TAIL_RATE)
        return {**separation(good, probed[:count], threshold), "false_alarms": false_alarms(probed[count:], owners, threshold)}

    def holdout_grids(self, features: PatchFeatures | torch.Tensor, holdout: torch.Tensor,
                      scored: torch.Tensor | None = None, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch view's scores and distance grids of images `scored` (default: the held-out ones) against
        `holdout_bank`: memory chosen without any patch of theirs. The fitted model is only read (folds run at once)."""
        patches = split_features(features[holdout if scored is None else scored])[0]
        return self._patch_view(patches, self.holdout_bank(holdout, workers)[0], workers)

    def holdout_bank(self, holdout: torch.Tensor, workers: int | None = None) -> tuple[ClusteredBank, torch.Tensor]:
        """The memory bank without the rows taken from the held-out images, refilled with as many of the other
        images' candidates where those rows were (`CandidatePool.refill`): a bank of the same size chosen
        without the held-out images. Every row comes from another image (tested). Returns the bank and each
        row's source image."""
        keep, extra = ~torch.isin(self.bank_sources, holdout), self.pool.refill(holdout, workers)
        bank = self.index.subset(keep, self.pool.features[extra])  # the refill as one more cluster: the search stays exact
        return bank, torch.cat([self.bank_sources[keep], self.pool.sources[extra]])

    def check_teachable(self) -> None:
        check_fitted(self.index, "PatchCore")
        if self.calibration_scores is None:
            raise DefectscopeError("this PatchCore model holds no cross-fitted good scores (fitted by an older version); "
                                   "fit it again")

    def teach(self, images: Sequence[ImageSource], progress: Progress | None = None) -> dict[str, Any]:
        """Add the patches of new good images that the memory bank does not yet cover, then recalibrate.

        A greedy coreset step against the existing bank adds new patches, farthest first, until every
        new patch lies within the coverage the best-covered tenth of good images has (the 10th percentile of
        the cross-fitted good scores): taught parts then score like ordinary good ones, not at the border,
        so parts like them that were not taught pass too. For the threshold, each calibration fold of the
        taught images is scored by the bank extended from the other folds only (cross-fitting, as at fit time).
        """
        self.check_teachable()
        if not images:
            raise DefectscopeError("give at least one good image to learn")
        features, _ = self.learning_features(images, progress)
        n, d = len(features), features.patches.shape[-1]
        patches = features.learned_rows(torch.arange(n)).reshape(n, -1, d)  # with `rotations`, their turns too
        fitted = self.index
        with torch.inference_mode():
            covered = fitted.search(patches.reshape(-1, d))[0].reshape(n, -1)
            held_out, held_view = [], []
            for fold in self.calibration_folds(n):
                rest = rows_outside(n, fold)
                extra = self._uncovered(patches[rest], covered[rest])
                ends = torch.tensor([len(fitted.bank) + len(extra)])  # the new patches as one more cluster: still exact
                self.index = ClusteredBank(torch.cat([fitted.bank, extra]), torch.cat([fitted.offsets, ends]))
                scores, _, view = self._views(features[fold])
                held_out.append(scores.float())
                held_view.append(view)
        added = self._uncovered(patches, covered)
        self.index = ClusteredBank.build(torch.cat([fitted.bank, added]), self.config.seed)
        if self.moments is not None:  # the taught images' regions join the good statistics, exactly
            self.moments = self.moments + Moments.of(features.regions)
            self.regions = RegionModel.from_moments(self.moments)
        self.calibration = self.taught_calibration(torch.cat(held_out), torch.cat(held_view))
        return {"images": n, "patches_added": len(added), "memory_bank": len(self.index.bank)}

    def _uncovered(self, patches: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
        """The N x P patches to add, farthest-first from the bank (`covered`: distances to it), until all are covered."""
        flat = patches.reshape(-1, patches.shape[-1])
        if not len(flat):
            return flat
        radius = float(self.calibration_scores.quantile(TEACH_COVERAGE))
        return flat[greedy_coreset(flat, len(flat), covered=covered.reshape(-1), stop_within=radius)]

    def _reweight(self, index: ClusteredBank, worst_patches: torch.Tensor, nearest_index: torch.Tensor, scores: torch.Tensor
                  ) -> torch.Tensor:
        """The paper's eq. 7: damp the score when the nearest memory patch (of `index`) sits among close neighbours."""
        bank = index.bank
        k = min(self.config.reweight_neighbours, len(bank))
        _, support = nearest(bank[nearest_index], bank, k=k)
        distances = (worst_patches[:, None, :] - bank[support]).norm(dim=-1)
        weights = 1 - torch.softmax(distances, dim=1)[:, 0]
        return weights * scores

    def searched_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory bank (rows grouped by cluster) and its cluster offsets: an export searches them outside its
        graph with `search.ClusterIndex`, the pruned exact search the model uses (it has no fixed graph)."""
        check_fitted(self.index, "PatchCore")
        if self.config.reweight:
            raise DefectscopeError("PatchCore with reweight: true cannot be exported; refit with reweight: false")
        return self.index.bank, self.index.offsets

    def searched_outputs(self, features: PatchFeatures) -> tuple[torch.Tensor, ...]:
        """What an export's first graph gives the search: the patch features N x h x w x d, and with the global view
        the region descriptors."""
        return (features.patches,) if self.fusion is None else (features.patches, features.regions)

    def score_searched(self, distances: torch.Tensor, regions: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores and raw maps from each patch's nearest-neighbour distance N x h x w, as `score_features`
        gives them (an export's second graph)."""
        return self._fuse(self._with_place(distances.flatten(1).max(1).values, distances), distances, regions)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.index.tensors() if self.index else {}
        if self.moments is not None and self.fusion is not None:
            tensors.update(global_count=self.moments.count, global_sums=self.moments.sums,
                           global_squares=self.moments.squares, fusion_patch=self.fusion["patch"],
                           **({"global_drift": self.moments.drift} if self.moments.drift is not None else {}),
                           fusion_region_location=self.fusion["region_location"],
                           fusion_region_spread=self.fusion["region_spread"])
        if self.place is not None:
            tensors.update(place_mean=self.place["mean"], place_spread=self.place["spread"], place_fusion=self.place["fusion"])
        return tensors

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.index = ClusteredBank(tensors["memory_bank"], tensors["cluster_offsets"])
        self.moments = self.regions = self.fusion = None
        self.place = ({"mean": tensors["place_mean"], "spread": tensors["place_spread"], "fusion": tensors["place_fusion"]}
                      if "place_mean" in tensors else None)
        self.config.place_view = "on" if self.place is not None else "off"  # fitted without it (or before it): the patch view alone
        if self.config.global_view == "on":
            if "global_sums" not in tensors:
                raise DefectscopeError("this PatchCore model says global_view: on but holds no global view; fit it again")
            self.moments = Moments(tensors["global_count"], tensors["global_sums"], tensors["global_squares"],
                                   tensors.get("global_drift"))
            self.regions = RegionModel.from_moments(self.moments)
            self.fusion = {"patch": tensors["fusion_patch"], "region_location": tensors["fusion_region_location"],
                           "region_spread": tensors["fusion_region_spread"]}
