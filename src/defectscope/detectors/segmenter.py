"""A supervised defect segmenter: pretrained backbone encoder + light FPN decoder, Dice + BCE loss.

It is a map model of the "masks" kind: it learns from masks (`fit_masks`), not from good images
alone; its probability maps go through the same `predict` pipeline as every detector.
`held_out_maps` scores every test image with a model of a fold that did not train on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.backbones import Backbone, freeze_through
from defectscope.data.folds import class_names, label_of, pick_good, stratified_folds
from defectscope.data.images import load_normalized, masks_in_frame
from defectscope.data.layout import Dataset, Sample
from defectscope.detectors.base import (
    DetectorConfig,
    MapModel,
    Progress,
    learned_state,
    load_learned_state,
    register,
)
from defectscope.errors import DefectscopeError
from defectscope.settings import require_range
from defectscope.thresholds import Calibration
from defectscope.training.augment import augment
from defectscope.training.engine import TrainSettings, train


class FPNSegmenter(nn.Module):
    """Top-down FPN over the backbone's stride 4/8/16 maps; one logit per input pixel."""

    def __init__(self, backbone: Backbone, channels: int = 64) -> None:
        super().__init__()
        self.encoder = backbone
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(backbone.channels[s], channels, 1) for s in backbone.strides})
        self.head = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.encoder(x)
        strides = sorted(maps, reverse=True)
        y = self.lateral[str(strides[0])](maps[strides[0]])
        for stride in strides[1:]:
            y = F.interpolate(y, size=maps[stride].shape[-2:], mode="bilinear", align_corners=False)
            y = y + self.lateral[str(stride)](maps[stride])
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def dice_bce(logits: torch.Tensor, masks: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Binary cross-entropy plus dice_weight x (1 - soft Dice over the batch)."""
    probabilities = torch.sigmoid(logits)
    dice = (2 * (probabilities * masks).sum() + 1) / (probabilities.sum() + masks.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + dice_weight * (1 - dice)


@dataclass
class SegmenterConfig(DetectorConfig, TrainSettings):
    """Frame 288 / crop 256; stages after stride `freeze` are fine-tuned."""

    image_size: int = 288
    crop: int | None = 256
    epochs: int = 30
    freeze: int = 8
    channels: int = 64
    dice_weight: float = 1.0
    good_train: int = 40
    folds: int = 5

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
class Segmenter(MapModel):
    name = "segmenter"
    kind = "masks"
    config_class = SegmenterConfig
    config: SegmenterConfig
    strides = (4, 8, 16)
    network: FPNSegmenter | None = None

    def build(self) -> FPNSegmenter:
        backbone = self.require_backbone()
        freeze_through(backbone, self.config.freeze)
        return FPNSegmenter(backbone, self.config.channels).to(memory_format=torch.channels_last)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def _loss(self, network: nn.Module, x: torch.Tensor, masks: torch.Tensor, training: bool) -> torch.Tensor:
        if training and self.config.augments:
            joint = augment(torch.cat([x, masks[:, None]], 1), self.generator, self.config)
            x, masks = joint[:, :3], (joint[:, 3] > 0.5).float()
        return dice_bce(network(x), masks, self.config.dice_weight)

    def fit_masks(self, samples: Sequence[Sample], progress: Progress | None = None) -> dict[str, Any]:
        """Train on images and their masks (good images: empty masks)."""
        self.learn_aspect([s.path for s in samples])
        images = load_normalized([s.path for s in samples], self.preprocess)
        masks = torch.from_numpy(masks_in_frame([s.mask for s in samples], self.preprocess)).float()
        torch.manual_seed(self.config.seed)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.network = self.build()
        history = train(self.network, self._loss, images, masks, self.config, batch_size=self.config.batch_size, seed=self.config.seed)
        self.calibration = Calibration(0.5, "probability", 0.5, 0.0, 0.0, 0)
        self.train_summary = {"images": len(samples), "defective": sum(bool(s.label) for s in samples),
                              "fit": {"history": history.to_dict()}}
        return history.to_dict()

    def score_features(self, features: torch.Tensor) -> tuple[None, torch.Tensor]:
        if self.network is None:
            raise DefectscopeError("the segmenter is not trained; call fit_masks() or load a model file")
        self.network.eval()
        return None, torch.sigmoid(self.network(features.contiguous(memory_format=torch.channels_last)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return learned_state(self.network) if self.network is not None else {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network = self.build()
        load_learned_state(self.network, tensors, self.name)


def held_out_maps(dataset: Dataset, config: SegmenterConfig, progress: Progress | None = None
                  ) -> tuple[np.ndarray, list[int], float]:
    """Model-frame probability maps of every test image, each from a fold model that did not train on it.

    Training folds hold the other test images plus `good_train` good training images (a seeded choice).
    Returns the maps (N x s x s, test order), each image's fold, and the prediction ms per image.
    """
    pool = list(dataset.test)
    classes = class_names(dataset, "type")
    labels = np.array([label_of(s, classes) for s in pool])
    goods = pick_good(dataset.train, config.good_train, config.seed)
    maps: list[np.ndarray | None] = [None] * len(pool)
    fold_of = [0] * len(pool)
    predict_seconds = 0.0
    for fold, held in enumerate(stratified_folds(labels, config.folds, config.seed)):
        segmenter = Segmenter(SegmenterConfig(**{**config.to_dict(), "seed": config.seed + fold}))
        segmenter.fit_masks([pool[i] for i in range(len(pool)) if i not in set(held)] + goods)
        start = time.perf_counter()
        prediction = segmenter.predict([pool[i].path for i in held], map_size="input")
        predict_seconds += time.perf_counter() - start
        for row, index in enumerate(held):
            maps[index], fold_of[index] = prediction.maps[row], fold
        if progress:
            progress(len(held))
    return np.stack(maps), fold_of, predict_seconds / len(pool) * 1000
