"""Reconstruction networks: a convolutional autoencoder, a pretrained-encoder autoencoder and a VAE."""

from __future__ import annotations

import torch
from torch import nn

from defectscope.backbones import Backbone


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True))


def _up(c_in: int, c_out: int, last: bool = False) -> nn.Sequential:
    if last:
        return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1))
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def decoder(channels: list[int]) -> nn.Sequential:
    """Transposed-conv upsampling x2 per step through `channels`, ending without activation."""
    steps = list(zip(channels[:-1], channels[1:]))
    return nn.Sequential(*[_up(a, b, last=i == len(steps) - 1) for i, (a, b) in enumerate(steps)])


class ConvAutoencoder(nn.Module):
    """Four stride-2 convolutions down to a `latent`-channel grid at 1/16 size, and back up."""

    def __init__(self, width: int = 32, latent: int = 32) -> None:
        super().__init__()
        w = [3, width, 2 * width, 4 * width, 8 * width]
        self.encoder = nn.Sequential(*[_down(a, b) for a, b in zip(w[:-1], w[1:])], nn.Conv2d(w[-1], latent, 1))
        self.decoder = nn.Sequential(nn.Conv2d(latent, w[-1], 1), nn.ReLU(inplace=True), decoder(w[::-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class PretrainedAutoencoder(nn.Module):
    """A pretrained backbone's stride-16 map as the code, a learned transposed-conv decoder to pixels."""

    def __init__(self, backbone: Backbone, latent: int = 64, freeze_encoder: bool = True) -> None:
        super().__init__()
        self.encoder = backbone
        self.freeze_encoder = freeze_encoder
        backbone.requires_grad_(not freeze_encoder)
        self.bottleneck = nn.Sequential(nn.Conv2d(backbone.channels[16], latent, 1), nn.ReLU(inplace=True))
        self.decoder = decoder([latent, 128, 64, 32, 3])

    def train(self, mode: bool = True) -> PretrainedAutoencoder:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.encoder(x)[16]))


class VariationalAutoencoder(nn.Module):
    """Convolutional VAE with a `latent`-dimensional Gaussian code; forward returns (recon, mu, logvar)."""

    def __init__(self, image_size: int, width: int = 32, latent: int = 128) -> None:
        super().__init__()
        w = [3, width, 2 * width, 4 * width, 8 * width]
        self.grid = image_size // 16
        flat = w[-1] * self.grid * self.grid
        self.encoder = nn.Sequential(*[_down(a, b) for a, b in zip(w[:-1], w[1:])], nn.Flatten())
        self.to_code = nn.Linear(flat, 2 * latent)
        self.from_code = nn.Sequential(nn.Linear(latent, flat), nn.ReLU(inplace=True))
        self.decoder = decoder(w[::-1])
        self.width = w[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_code(self.encoder(x)).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        recon = self.decoder(self.from_code(z).view(-1, self.width, self.grid, self.grid))
        return recon, mu, logvar
