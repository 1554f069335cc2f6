"""A supervised defect segmenter: pretrained backbone encoder + light FPN decoder, Dice + BCE loss.

It is a map model of the "masks" kind: it learns from masks (`fit_masks`), not from good images
alone; its probability maps go through the same `predict` pipeline as every detector. With
`per_type` it has one output channel per defect type: the map is their maximum, and `predict` also
returns each region of probability 0.5 or more with the type whose channel holds most of it.
`held_out_maps` scores every test image with a model of a fold that did not train on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.backbones import Backbone, freeze_through
from defectscope.data.folds import class_names, label_of, pick_good, stratified_folds
from defectscope.data.images import (
    load_normalized,
    masks_in_frame,
    normalize,
    type_masks,
)
from defectscope.data.layout import Dataset, Sample, require_masks
from defectscope.detectors.base import (
    DetectorConfig,
    MaskModel,
    Progress,
    register,
)
from defectscope.errors import DefectscopeError, check_fitted
from defectscope.prediction import Detection, Scored
from defectscope.regions import components
from defectscope.settings import derived_seed, require_range
from defectscope.calibration import Calibration
from defectscope.training.augment import augment
from defectscope.training.engine import TrainSettings, train


class FPNSegmenter(nn.Module):
    """Top-down FPN over the backbone's stride 4/8/16 maps; `outputs` logits per input pixel (N x outputs x H x W)."""

    def __init__(self, backbone: Backbone, channels: int = 64, outputs: int = 1) -> None:
        super().__init__()
        self.encoder = backbone
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(backbone.channels[s], channels, 1) for s in backbone.strides})
        self.head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, outputs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.encoder(x)
        strides = sorted(maps, reverse=True)
        y = self.lateral[str(strides[0])](maps[strides[0]])
        for stride in strides[1:]:
            y = F.interpolate(y, size=maps[stride].shape[-2:], mode="bilinear", align_corners=False)
            y = y + self.lateral[str(stride)](maps[stride])
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def dice_bce(logits: torch.Tensor, masks: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Binary cross-entropy plus dice_weight x (1 - soft Dice over the batch)."""
    probabilities = torch.sigmoid(logits)
    dice = (2 * (probabilities * masks).sum() + 1) / (probabilities.sum() + masks.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + dice_weight * (1 - dice)


@dataclass
class SegmenterConfig(DetectorConfig, TrainSettings):
    """Frame 288 / crop 256; stages after stride `freeze` are fine-tuned; `per_type`: one channel per defect type."""

    inapplicable = {name: "a mask model states its threshold as a probability (0.5); move it with `defectscope calibrate`"
                    for name in ("calibration_folds", "threshold_method", "threshold_param")}

    image_size: int = 288
    crop: int | None = 256
    epochs: int = 30
    freeze: int = 8
    channels: int = 64
    dice_weight: float = 1.0
    good_train: int = 40
    folds: int = 5
    per_type: bool = False
    types: list[str] = field(default_factory=list)  # learned with per_type: the defect types, in channel order

    def check(self) -> None:
        super().check()
        if self.color_jitter:
            raise DefectscopeError("the segmenter augments with flips and rotation only; set color_jitter to 0")
        require_range("freeze", self.freeze, 0)
        require_range("channels", self.channels, 1)
        require_range("dice_weight", self.dice_weight, 0)
        require_range("good_train", self.good_train, -1)
        require_range("folds", self.folds, 2)


@register
class Segmenter(MaskModel):
    name = "segmenter"
    kind = "masks"
    config_class = SegmenterConfig
    config: SegmenterConfig
    strides = (4, 8, 16)
    network: FPNSegmenter | None = None

    def build(self) -> FPNSegmenter:
        backbone = self.require_backbone()
        freeze_through(backbone, self.config.freeze)
        outputs = len(self.config.types) if self.config.per_type else 1
        return FPNSegmenter(backbone, self.config.channels, outputs).to(memory_format=torch.channels_last)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def _loss(self, network: nn.Module, x: torch.Tensor, masks: torch.Tensor, training: bool) -> torch.Tensor:
        masks = masks.float()
        if training and self.config.augments:
            joint = augment(torch.cat([x, masks], 1), self.generator, self.config)
            x, masks = joint[:, :3], (joint[:, 3:] > 0.5).float()
        return dice_bce(network(x), masks, self.config.dice_weight)

    def fit_masks(self, samples: Sequence[Sample], types: Sequence[str] | None = None, progress: Progress | None = None
                  ) -> dict[str, Any]:
        """Train on images and their masks (good images: empty masks); with per_type, one channel per type in `types`
        (default: the samples' defect types)."""
        self.learn_aspect([s.path for s in samples])
        images = load_normalized([s.path for s in samples], self.preprocess)
        if self.config.per_type:
            self.config.types = list(types if types is not None else sorted({s.defect for s in samples if s.label}))
            masks = type_masks(samples, self.config.types, self.preprocess)
        else:
            masks = torch.from_numpy(masks_in_frame([s.mask for s in samples], self.preprocess))[:, None]
        torch.manual_seed(self.config.seed)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.network = self.build()
        history = train(self.network, self._loss, images, masks, self.config, batch_size=self.config.batch_size, seed=self.config.seed)
        self.calibration = Calibration(0.5, "probability", 0.5, 0.0, 0.0, 0)
        self.train_summary = {"images": len(samples), "defective": sum(bool(s.label) for s in samples),
                              "fit": {"history": history.to_dict()}}
        return history.to_dict()

    def score_features(self, features: torch.Tensor) -> tuple[None, torch.Tensor]:
        check_fitted(self.network, "the segmenter", "fit_masks()")
        self.network.eval()
        return None, torch.sigmoid(self.network(features.contiguous(memory_format=torch.channels_last))).amax(1)

    @property
    def label_types(self) -> list[str] | None:
        return list(self.config.types) if self.config.per_type else None

    @torch.inference_mode()
    def score_frames(self, batch: np.ndarray) -> Scored:
        """uint8 frames -> scores and finished maps; per type, also the typed regions of the raw probabilities."""
        if not self.config.per_type:
            return super().score_frames(batch)
        check_fitted(self.network, "the segmenter", "fit_masks()")
        self.network.eval()
        features = normalize(torch.from_numpy(batch), self.preprocess)
        probabilities = torch.sigmoid(self.network(features))
        scores, frame = self._finish(None, probabilities.amax(1))
        return Scored(scores.numpy(), frame, [typed_regions(p.numpy(), self.config.types) for p in probabilities])



def typed_regions(probabilities: np.ndarray, types: list[str]) -> list[Detection]:
    """Regions where the most likely type's probability (K x H x W) is at least 0.5, each typed by the channel
    with the largest sum inside it; confidence: the region's peak probability."""
    peak = probabilities.max(0)
    found = []
    for region, (x, y, width, height), _ in components(peak >= 0.5):
        kind = int(probabilities[:, region].sum(1).argmax())
        found.append(Detection(types[kind], float(peak[region].max()), (x, y, x + width, y + height), region))
    return found


def held_out_maps(dataset: Dataset, config: SegmenterConfig, progress: Progress | None = None
                  ) -> tuple[np.ndarray, list[int], float]:
    """Model-frame probability maps of every test image, each from a fold model that did not train on it.

    Training folds hold the other test images plus `good_train` good training images (a seeded choice).
    Returns the maps (N x s x s, test order), each image's fold, and the prediction ms per image.
    """
    pool = list(dataset.test)
    require_masks(pool, "the segmenter")
    classes = class_names(dataset, "type")
    labels = np.array([label_of(s, classes) for s in pool])
    goods = pick_good(dataset.train, config.good_train, config.seed)
    maps: list[np.ndarray | None] = [None] * len(pool)
    fold_of = [0] * len(pool)
    predict_seconds = 0.0
    for fold, held in enumerate(stratified_folds(labels, config.folds, config.seed, classes)):
        segmenter = Segmenter(SegmenterConfig(**{**config.to_dict(), "seed": derived_seed(config.seed, fold)}))
        segmenter.fit_masks([pool[i] for i in range(len(pool)) if i not in set(held)] + goods, dataset.defect_types)
        start = time.perf_counter()
        prediction = segmenter.predict([pool[i].path for i in held], map_size="input")
        predict_seconds += time.perf_counter() - start
        for row, index in enumerate(held):
            maps[index], fold_of[index] = prediction.maps[row], fold
        if progress:
            progress(len(held))
    return np.stack(maps), fold_of, predict_seconds / len(pool) * 1000
