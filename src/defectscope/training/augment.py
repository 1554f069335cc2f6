"""Seeded, per-image augmentation of normalized batches, vectorized over the batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from defectscope.training.engine import TrainSettings


def augment(batch: torch.Tensor, generator: torch.Generator, settings: TrainSettings,
            mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """The settings' random flips, quarter turns, rotation by up to `rotate` degrees and brightness/contrast
    jitter, drawn per image. Flips and quarter turns move pixels exactly (no interpolation); a non-square
    frame turns by 0 or 180 degrees only, so it keeps its shape.

    `batch` is N x C x H x W normalized with mean/std; jitter (3 channels only) is applied to the [0, 1] image.
    """
    n = len(batch)
    hflip, vflip, rotate, color_jitter = settings.hflip, settings.vflip, settings.rotate, settings.color_jitter
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    if vflip:
        flip = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-2), batch)
    if settings.rot90:
        square = batch.shape[-1] == batch.shape[-2]
        turns = torch.randint(0, 4, (n,), generator=generator) if square else 2 * torch.randint(0, 2, (n,), generator=generator)
        batch = batch.clone()
        for k in (1, 2, 3):
            chosen = turns == k
            if chosen.any():
                batch[chosen] = torch.rot90(batch[chosen], k, dims=(-2, -1))
    if rotate:
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotate)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(n)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        batch = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if color_jitter:
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        image = batch * s + m
        brightness = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * color_jitter
        contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * color_jitter
        image = image * brightness
        grey = image.mean(dim=(1, 2, 3), keepdim=True)
        image = ((image - grey) * contrast + grey).clamp(0, 1)
        batch = (image - m) / s
    return batch
