"""A supervised defect detector: torchvision Mask R-CNN on an FPN over the pretrained EfficientNet-Lite stages.

A map model of the "instances" kind: it learns one class per defect type from labelled masks (each
connected region of an image's mask is an instance of that image's defect type). An image scores its
most confident instance; its map is the instances' masks weighted by confidence; `predict` also
returns the instances (type, confidence, box, mask). `held_out_instances` predicts every labelled
image with a fold model that did not train on it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, masks_to_boxes
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from defectscope.backbones import Backbone, freeze_through
from defectscope.data.folds import class_names, label_of, pick_good, stratified_folds
from defectscope.data.images import load_normalized, normalize, type_masks
from defectscope.data.layout import Dataset, Sample, require_masks
from defectscope.detectors.base import (
    DetectorConfig,
    MaskModel,
    Progress,
    learned_state,
    register,
    require_finite,
)
from defectscope.errors import DefectscopeError, SettingsError, check_fitted
from defectscope.prediction import Detection, Scored
from defectscope.regions import components
from defectscope.settings import derived_seed, require_range
from defectscope.calibration import Calibration
from defectscope.training.augment import augment
from defectscope.training.engine import TrainSettings, train

ANCHOR_SIZES = ((16,), (32,), (64,), (128,))  # one size per FPN level: strides 8, 16, 32 and the pooled 64


class PyramidBackbone(nn.Module):
    """The backbone's stride 8/16/32 maps through torchvision's FPN, plus a max-pooled coarsest level."""

    def __init__(self, backbone: Backbone, channels: int) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork([backbone.channels[s] for s in backbone.strides], channels, LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict((str(level), maps[stride]) for level, stride in enumerate(sorted(maps))))


@dataclass
class InstanceConfig(DetectorConfig, TrainSettings):
    """Frame 288 / crop 256; stages after stride `freeze` are fine-tuned; flips and 90-degree turns by default.

    min_score: instances below this confidence are dropped; min_area: smallest labelled region learned
    (frame pixels); good_train: good training images added to every training set as negatives.
    """

    inapplicable = {name: "a mask model states its threshold as a probability (0.5); move it with `defectscope calibrate`"
                    for name in ("calibration_folds", "threshold_method", "threshold_param")}

    image_size: int = 288
    crop: int | None = 256
    epochs: int = 24
    lr: float = 3e-4
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    batch_size: int = 4
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    freeze: int = 8
    channels: int = 64
    min_score: float = 0.05
    min_area: int = 4
    good_train: int = 20
    folds: int = 3
    types: list[str] = field(default_factory=list)  # learned: the defect types, in class order

    def check(self) -> None:
        super().check()
        if self.rotate or self.color_jitter:
            raise DefectscopeError("the detector augments with flips and 90-degree turns only (boxes stay exact); "
                                   "set rotate and color_jitter to 0")
        require_range("freeze", self.freeze, 0)
        require_range("channels", self.channels, 1)
        require_range("min_score", self.min_score, 0, 1)
        require_range("min_area", self.min_area, 1)
        require_range("good_train", self.good_train, -1)
        require_range("folds", self.folds, 2)
        if not all(isinstance(t, str) for t in self.types) or len(set(self.types)) != len(self.types):
            raise SettingsError(f"field 'types' must be distinct defect type names, got {self.types!r}")


def instance_targets(channels: torch.Tensor, min_area: int) -> dict[str, torch.Tensor]:
    """K x H x W per-type masks -> Mask R-CNN targets: one instance per connected region, labelled type + 1."""
    masks, labels = [], []
    for number, mask in enumerate(channels.numpy()):
        for region, _, _ in components(mask, min_area) if mask.any() else []:
            masks.append(region)
            labels.append(number + 1)
    height, width = channels.shape[1:]
    stacked = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.bool)
    boxes = masks_to_boxes(stacked) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel edges: a 1-pixel region is 1 wide
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": stacked.to(torch.uint8)}


@register
class InstanceDetector(MaskModel):
    name = "detector"
    kind = "instances"
    config_class = InstanceConfig
    config: InstanceConfig
    strides = (8, 16, 32)
    network: MaskRCNN | None = None

    def build(self) -> MaskRCNN:
        backbone = self.require_backbone()
        freeze_through(backbone, self.config.freeze)
        height, width = self.preprocess.input_shape
        levels = [str(level) for level in range(len(self.strides))]
        return MaskRCNN(
            PyramidBackbone(backbone, self.config.channels), num_classes=len(self.config.types) + 1,
            min_size=min(height, width), max_size=max(height, width), image_mean=[0.0] * 3, image_std=[1.0] * 3,
            rpn_anchor_generator=AnchorGenerator(ANCHOR_SIZES, ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)),
            box_roi_pool=MultiScaleRoIAlign(levels, 7, 2), mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
            rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=100, box_batch_size_per_image=128, box_detections_per_img=20,
            box_score_thresh=self.config.min_score)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def _loss(self, network: nn.Module, x: torch.Tensor, channels: torch.Tensor, training: bool) -> torch.Tensor:
        """Mask R-CNN's summed losses; images and masks are augmented together, so boxes follow the masks."""
        channels = channels.float()
        if training and self.config.augments:
            joint = augment(torch.cat([x, channels], 1), self.generator, self.config)
            x, channels = joint[:, :3], joint[:, 3:]
        targets = [instance_targets(m > 0.5, self.config.min_area) for m in channels]
        network.train()  # torchvision's detection models return their losses only in training mode
        return sum(network(list(x.contiguous()), targets).values())

    def fit_masks(self, samples: Sequence[Sample], types: Sequence[str]) -> dict[str, Any]:
        """Train on images and their masks, one class per defect type in `types` (good images: no instances)."""
        unknown = sorted({s.defect for s in samples if s.label} - set(types))
        if unknown:
            raise DefectscopeError(f"defect types {unknown} are not among the detector's types {list(types)}")
        self.config.types = list(types)
        self.learn_aspect([s.path for s in samples])
        images = load_normalized([s.path for s in samples], self.preprocess)
        targets = type_masks(samples, types, self.preprocess)
        torch.manual_seed(self.config.seed)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.network = self.build()
        history = train(self.network, self._loss, images, targets, self.config, batch_size=self.config.batch_size,
                        seed=self.config.seed, progress=self.epoch_progress)
        require_finite(learned_state(self.network), "the detector has learned")  # a diverged model would find nothing
        self.history = history
        self.calibration = Calibration(0.5, "confidence", 0.5, 0.0, 0.0, 0)
        self.train_summary = {"images": len(samples), "defective": sum(bool(s.label) for s in samples),
                              "types": list(types), "fit": {"history": history.to_dict()}}
        return history.to_dict()

    def detect_frames(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[list[Detection]]]:
        """Normalized frames -> image scores (most confident instance, 0 without one), confidence-weighted
        instance maps N x h x w, and each image's instances in frame coordinates.

        Proposals whose class scores are not finite numbers would be dropped silently and leave "no
        instance": the batch's scores become NaN instead (verdict 'error', never 'good')."""
        check_fitted(self.network, "the instance detector", "fit_masks()")
        self.network.eval()
        logits: list[torch.Tensor] = []
        hook = self.network.roi_heads.box_predictor.register_forward_hook(lambda _, __, out: logits.append(out[0]))
        try:
            outputs = self.network(list(batch))
        finally:
            hook.remove()
        scores = torch.stack([o["scores"].max() if len(o["scores"]) else torch.zeros(()) for o in outputs])
        if not all(bool(torch.isfinite(values).all()) for values in logits):
            scores = torch.full_like(scores, float("nan"))
        maps = torch.stack([(o["scores"][:, None, None] * o["masks"][:, 0]).amax(0) if len(o["scores"])
                            else torch.zeros(batch.shape[-2:]) for o in outputs])
        found = [[Detection(self.config.types[int(label) - 1], float(score), tuple(box.tolist()), mask[0].numpy() >= 0.5)
                  for box, label, score, mask in zip(o["boxes"], o["labels"], o["scores"], o["masks"])] for o in outputs]
        return scores, maps, found

    def score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps, _ = self.detect_frames(features)
        return scores, maps

    @torch.inference_mode()
    def score_frames(self, batch: np.ndarray) -> Scored:
        """uint8 frames -> scores, finished maps and the instances (see `prediction.predict_frames`)."""
        scores, maps, found = self.detect_frames(normalize(torch.from_numpy(batch), self.preprocess))
        scores, frame = self._finish(scores, maps)
        return Scored(scores.numpy(), frame, found)

    @property
    def label_types(self) -> list[str]:
        return list(self.config.types)

    def graph_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise DefectscopeError("the instance detector cannot be exported: its graph has no fixed shape "
                               "(a varying number of instances per image)")



@dataclass
class HeldOut:
    """Held-out predictions of the labelled images: instances (at each image's size), scores, folds, costs."""

    samples: list[Sample]
    instances: list[list[Detection]]
    scores: np.ndarray
    folds: list[int]
    trained_on: list[set[str]]  # per fold: the paths its model trained on
    fit_seconds: float
    infer_ms: float


def held_out_instances(dataset: Dataset, config: InstanceConfig, progress: Progress | None = None) -> HeldOut:
    """Every test image's instances from the model of a fold that did not train on it (stratified by type).

    Training folds hold the other test images plus `good_train` good training images (a seeded choice).
    """
    pool = list(dataset.test)
    types = list(dataset.defect_types)
    if not types:
        raise DefectscopeError("the detector needs defective test images with masks; this dataset has no defect types")
    require_masks(pool, "the detector")
    classes = class_names(dataset, "type")
    labels = np.array([label_of(s, classes) for s in pool])
    goods = pick_good(dataset.train, config.good_train, config.seed)
    instances: list[list[Detection]] = [[] for _ in pool]
    scores, folds, trained_on = np.zeros(len(pool), np.float32), [0] * len(pool), []
    fit_seconds = predict_seconds = 0.0
    for fold, held in enumerate(stratified_folds(labels, config.folds, config.seed, classes)):
        held_set = set(held.tolist())
        training = [pool[i] for i in range(len(pool)) if i not in held_set] + goods
        trained_on.append({str(s.path) for s in training})
        detector = InstanceDetector(InstanceConfig(**{**config.to_dict(), "seed": derived_seed(config.seed, fold)}))
        start = time.perf_counter()
        detector.fit_masks(training, types)
        fit_seconds += time.perf_counter() - start
        start = time.perf_counter()
        prediction = detector.predict([pool[i].path for i in held])
        predict_seconds += time.perf_counter() - start
        for row, index in enumerate(held):
            instances[index], scores[index], folds[index] = prediction.detections[row], prediction.scores[row], fold
        if progress:
            progress(len(held))
    return HeldOut(pool, instances, scores, folds, trained_on, fit_seconds, predict_seconds / len(pool) * 1000)
