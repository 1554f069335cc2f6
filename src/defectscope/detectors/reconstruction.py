"""Reconstruction detectors: learn to rebuild good images; the rebuild error marks defects.

Registered as `autoencoder`, `augmented_autoencoder` (the same with flips, rotation and jitter
on by default), `pretrained_autoencoder` (frozen or fine-tuned backbone encoder) and `vae`.
The calibration hold-out of the good images doubles as the validation set of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.data.decode import ImageSource
from defectscope.detectors.base import (
    Detector,
    DetectorConfig,
    learned_state,
    load_learned_state,
    register,
    rows_outside,
)
from defectscope.detectors.networks import (
    ConvAutoencoder,
    PretrainedAutoencoder,
    VariationalAutoencoder,
)
from defectscope.errors import DefectscopeError, check_fitted
from defectscope.settings import require_choice, require_range
from defectscope.training.augment import augment
from defectscope.training.engine import TrainSettings, train

ERRORS = ("mse", "ssim")
VALIDATION_FRACTION = 0.1  # of the good images: validation set of training and calibration scores


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel structural similarity (Wang et al. 2004) of N x C x H x W images, averaged over channels."""
    offsets = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()
    channels = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, [window // 2] * 4, mode="reflect"), kernel, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2  # the published constants for images in [0, 1]
    ssim = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim.mean(1)


@dataclass
class ReconstructionConfig(DetectorConfig, TrainSettings):
    """Detector and training settings; images default to 128 px, uncropped."""

    inapplicable = {"calibration_folds": "a reconstruction model calibrates on the one validation share its network "
                                         "never trains on (training a network per fold would multiply the fit time)"}

    backbone: str = "none"
    image_size: int = 128
    crop: int | None = None
    keep_aspect: bool = False
    error: str = "mse"
    width: int = 32
    latent: int = 32
    freeze_encoder: bool = True
    beta: float = 1.0

    def check(self) -> None:
        super().check()
        require_choice("error", self.error, ERRORS)
        require_range("width", self.width, 1)
        require_range("latent", self.latent, 1)
        require_range("beta", self.beta, 0)
        if self.keep_aspect:
            raise DefectscopeError("reconstruction models need a square frame: set keep_aspect to false")
        if (self.crop or self.image_size) % 16:
            raise DefectscopeError(f"reconstruction models need an input size divisible by 16, got {self.crop or self.image_size}")


class ReconstructionDetector(Detector):
    """Shared fit / score logic; subclasses build the network and may add loss terms."""

    config: ReconstructionConfig
    config_class: ClassVar[type[DetectorConfig]] = ReconstructionConfig
    uses_backbone: ClassVar[bool] = False
    strides = (16,)

    def __init__(self, config: DetectorConfig | None = None, backbone: Any = None) -> None:
        super().__init__(config, backbone)
        self.network: nn.Module | None = None

    def build(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, extra loss term) for a normalized batch."""
        return self.network(x), x.new_zeros(())

    def error_map(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction error, N x H x W."""
        if self.config.error == "ssim":
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (self.preprocess.mean, self.preprocess.std))
            return 1 - ssim_map(x * std + mean, (recon * std + mean).clamp(0, 1))
        return (x - recon).pow(2).mean(1)

    def loss(self, _network: nn.Module, x: torch.Tensor, _targets: torch.Tensor, training: bool) -> torch.Tensor:
        """Training objective: mean reconstruction error (plus the model's extra term); `self.network` is trained."""
        if training and self.config.augments:
            x = augment(x, self.generator, self.config, self.preprocess.mean, self.preprocess.std)
        recon, extra = self.reconstruct(x)
        return self.error_map(x, recon).mean() + extra

    def fit_features(self, features: torch.Tensor) -> dict[str, Any]:
        images = features.clone()  # leave inference mode: training needs ordinary tensors
        holdout = self.calibration_folds(len(images))[0]
        rest = rows_outside(len(images), holdout)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.network = self.build().to(memory_format=torch.channels_last)
        no_targets = torch.zeros(len(images))
        self.history = train(
            self.network, self.loss, images[rest], no_targets[rest], self.config, batch_size=self.config.batch_size,
            seed=self.config.seed, validation=(images[holdout], no_targets[holdout]), progress=self.epoch_progress,
        )
        return {"history": self.history.to_dict(), "train_loss": self.history.train_loss[-1],
                "validation_loss": self.history.val_loss[-1] if self.history.val_loss else None}

    def calibration_folds(self, count: int) -> list[torch.Tensor]:
        """One fold: the seeded validation share of the images, which the network never trains on.

        Training a network per fold would multiply the fit time; these images are unseen in the same sense.
        """
        held = max(1, round(count * VALIDATION_FRACTION))
        return [torch.from_numpy(np.random.default_rng(self.config.seed).permutation(count)[:held]).sort().values]

    def holdout_scores(self, features: torch.Tensor, holdout: torch.Tensor, scored: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """The held-out images were the validation set: the network never trained on them."""
        return self._score_and_map(features[holdout if scored is None else scored])[0]

    def score_features(self, features: torch.Tensor) -> tuple[None, torch.Tensor]:
        check_fitted(self.network, self.name)
        self.network.eval()
        return None, self.error_map(features, self.reconstruct(features)[0])

    def mean_loss(self, images: Sequence[ImageSource]) -> float:
        """The training objective on other images (e.g. the test split), without augmentation."""
        total, count = 0.0, 0
        for batch, _ in self._embedded_batches(images, None):
            total += float(self.loss(self.network, batch, batch, False)) * len(batch)
            count += len(batch)
        return total / count

    def tensors(self) -> dict[str, torch.Tensor]:
        return learned_state(self.network) if self.network is not None else {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network = self.build().to(memory_format=torch.channels_last)
        load_learned_state(self.network, tensors, self.name)


@register
class Autoencoder(ReconstructionDetector):
    name = "autoencoder"

    def build(self) -> nn.Module:
        return ConvAutoencoder(self.config.width, self.config.latent)


@dataclass
class AugmentedConfig(ReconstructionConfig):
    hflip: bool = True
    vflip: bool = True
    rotate: float = 10.0
    color_jitter: float = 0.1


@register
class AugmentedAutoencoder(Autoencoder):
    name = "augmented_autoencoder"
    config_class = AugmentedConfig


@dataclass
class PretrainedConfig(ReconstructionConfig):
    backbone: str = "efficientnet_lite0"
    latent: int = 64


@register
class PretrainedEncoderAutoencoder(ReconstructionDetector):
    name = "pretrained_autoencoder"
    config_class = PretrainedConfig
    uses_backbone = True

    def build(self) -> nn.Module:
        return PretrainedAutoencoder(self.require_backbone(), self.config.latent, self.config.freeze_encoder)


@dataclass
class VAEConfig(ReconstructionConfig):
    latent: int = 128


@register
class VAE(ReconstructionDetector):
    name = "vae"
    config_class = VAEConfig

    def build(self) -> nn.Module:
        return VariationalAutoencoder(self.preprocess.input_shape[0], self.config.width, self.config.latent)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and beta x KL divergence per pixel value (so it weighs like the mean error)."""
        recon, mu, logvar = self.network(x)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean() / x[0].numel()
        return recon, self.config.beta * kl
