"""Tensors for the torch models: normalized image batches, masks in the model frame."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from defectscope.data.batches import iterate_batches
from defectscope.data.decode import ImageSource, read_mask
from defectscope.data.frame import Preprocess
from defectscope.data.layout import Sample


def normalize(batch: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW normalized with the frame's mean and std, in channels-last memory (the backbones'
    layout): the bytes are reordered before they become floats, and one float buffer is normalized in place."""
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return batch.contiguous(memory_format=torch.channels_last).float().sub_(mean).div_(std)


def load_normalized(images: Sequence[ImageSource], preprocess: Preprocess) -> torch.Tensor:
    """Every image decoded, resized / cropped and normalized: N x 3 x h x w."""
    return torch.cat([normalize(torch.from_numpy(batch), preprocess) for batch, _ in iterate_batches(images, preprocess)])


def masks_in_frame(masks: Sequence[str | Path | None], preprocess: Preprocess) -> np.ndarray:
    """Masks brought into the model frame, N x h x w bool; None stands for an empty mask (a good image)."""
    blank = np.zeros(preprocess.input_shape, dtype=bool)
    return np.stack([preprocess.mask_to_input(read_mask(m)) if m else blank for m in masks])


def type_masks(samples: Sequence[Sample], types: Sequence[str], preprocess: Preprocess) -> torch.Tensor:
    """Each image's mask in the model frame, in the channel of its defect type: uint8 N x K x h x w (good: empty)."""
    masks = torch.from_numpy(masks_in_frame([s.mask if s.label else None for s in samples], preprocess))
    channels = torch.zeros((len(samples), len(types), *masks.shape[1:]), dtype=torch.uint8)
    for row, sample in enumerate(samples):
        if sample.label:
            channels[row, list(types).index(sample.defect)] = masks[row]
    return channels
