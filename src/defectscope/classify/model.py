"""A pretrained backbone with a new classification head (and a projection head for contrastive losses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.backbones import Backbone, freeze_through
from defectscope.efficientnet_lite import EfficientNetLite
from defectscope.classify.losses import LOSSES
from defectscope.errors import DefectscopeError, SettingsError
from defectscope.settings import FrameConfig, require_choice, require_range
from defectscope.training.engine import TrainSettings

TASKS = ("binary", "type")
SAMPLING = ("none", "balanced", "sqrt")


@dataclass
class ClassifierConfig(FrameConfig, TrainSettings):
    """Backbone, task, cross-validation, loss and training settings of a supervised classifier.

    freeze: stem and stages up to this stride stay fixed (0 fine-tunes everything). With an
    EfficientNet-Lite backbone and no augmentation, the frozen part runs once per image and only
    the later stages are trained on its cached output.
    good_train: good training images added to every training fold (a seeded choice; -1: all of them).
    shots: keep only this many images of each defect class in every training fold (long-tail study).
    """

    image_size: int = 128
    crop: int | None = None
    task: str = "binary"
    freeze: int = 16
    dropout: float = 0.2
    epochs: int = 30
    folds: int = 5
    good_train: int = -1
    shots: int | None = None
    loss: str = "ce"
    tau: float = 1.0
    gamma: float = 2.0
    weighting: str = "inverse"
    beta: float = 0.999
    contrastive_weight: float = 0.5
    temperature: float = 0.1
    sampling: str = "none"

    def check(self) -> None:
        super().check()
        for name, value, allowed in (("task", self.task, TASKS), ("loss", self.loss, LOSSES), ("sampling", self.sampling, SAMPLING)):
            require_choice(name, value, allowed)
        if self.folds < 2:
            raise SettingsError(f"field 'folds' must be at least 2, got {self.folds}")
        if self.good_train < -1:
            raise SettingsError(f"field 'good_train' must be -1 (all), 0 or a count, got {self.good_train}")
        if self.shots is not None and self.shots < 1:
            raise SettingsError(f"field 'shots' must be at least 1 (or null for all), got {self.shots}")
        require_range("freeze", self.freeze, 0)
        require_range("dropout", self.dropout, 0, 1, high_open=True)
        for name in ("tau", "gamma", "contrastive_weight"):
            require_range(name, getattr(self, name), 0)
        require_range("beta", self.beta, 0, 1, high_open=True)
        require_range("temperature", self.temperature, 0, low_open=True)
        require_choice("weighting", self.weighting, ("inverse", "effective"))


def pooled(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """Global average of the backbone's deepest map: N x channels."""
    return F.adaptive_avg_pool2d(backbone(x)[max(backbone.strides)], 1).flatten(1)


class Head(nn.Module):
    """Dropout + linear classifier on pooled features, and an MLP projection for contrastive losses."""

    def __init__(self, channels: int, classes: int, dropout: float, projection: int = 128) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, classes)
        self.projection = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, projection))

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(self.dropout(pooled)), self.projection(pooled)

    def prototypes(self) -> torch.Tensor:
        """Class-centre prototypes: the classifier weights mapped through the projection."""
        return self.projection(self.classifier.weight)


class Classifier(nn.Module):
    """Backbone (partly frozen, batch norm kept in eval mode) -> global average pool -> Head."""

    def __init__(self, backbone: Backbone, classes: int, dropout: float, freeze: int) -> None:
        super().__init__()
        self.backbone = backbone
        freeze_through(backbone, freeze)
        self.head = Head(backbone.channels[max(backbone.strides)], classes, dropout)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(pooled(self.backbone, x))

    def prototypes(self) -> torch.Tensor:
        return self.head.prototypes()


class TailClassifier(nn.Module):
    """The EfficientNet-Lite stages after stride `start` + head, trained on cached stride-`start` maps."""

    def __init__(self, backbone: Backbone, start: int, classes: int, dropout: float) -> None:
        super().__init__()
        network = backbone.network
        if not isinstance(network, EfficientNetLite):
            raise DefectscopeError("cached training needs an EfficientNet-Lite backbone")
        self.blocks = nn.Sequential(*network._blocks[network.stage_ends[start] + 1 :]).requires_grad_(True)
        self.head = Head(network.stage_channels[32], classes, dropout)

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(F.adaptive_avg_pool2d(self.blocks(maps), 1).flatten(1))

    def prototypes(self) -> torch.Tensor:
        return self.head.prototypes()


def trunk_maps(backbone: Backbone, start: int, images: torch.Tensor) -> torch.Tensor:
    """The frozen part's output (stride `start`) for normalized images, computed in chunks."""
    with torch.no_grad():
        return torch.cat([backbone.network.features(chunk.contiguous(memory_format=torch.channels_last), (start,))[start]
                          for chunk in images.split(16)])
