"""Pre-processing and its inverse: maps return to the original image's pixels."""

from __future__ import annotations

import numpy as np
import torch

from defectscope.data.images import Preprocess, iterate_batches


def test_resize_crop_and_inverse_mapping_line_up() -> None:
    pre = Preprocess(image_size=64, crop=48)
    original = np.zeros((90, 120), np.float32)
    original[40:50, 50:70] = 1.0  # a blob well inside the crop
    frame = pre.resize_crop(original)
    assert frame.shape == (48, 48)
    back = pre.to_original(torch.from_numpy(frame)[None], 90, 120)[0].numpy()
    assert back.shape == (90, 120)
    assert back[45, 60] > 0.5 and back[10, 10] == 0.0
    recovered = back > 0.5
    overlap = (recovered & (original > 0)).sum() / (recovered | (original > 0)).sum()
    assert overlap > 0.7


def test_border_outside_crop_is_filled_with_map_minimum() -> None:
    pre = Preprocess(image_size=64, crop=32)
    maps = torch.full((1, 32, 32), 5.0)
    maps[0, 10, 10] = 9.0
    back = pre.to_original(maps, 64, 64)[0]
    assert float(back[0, 0]) == 5.0 and float(back.max()) > 5.0


def test_mask_to_input_keeps_majority_pixels() -> None:
    pre = Preprocess(image_size=32, crop=None)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    assert pre.mask_to_input(mask)[:, :16].all() and not pre.mask_to_input(mask)[:, 16:].any()


def test_batches_keep_order_and_sizes() -> None:
    images = [np.full((20 + i, 30, 3), i, np.uint8) for i in range(7)]
    batches = list(iterate_batches(images, Preprocess(image_size=16, crop=None), batch_size=3, workers=2))
    assert [len(b) for b, _ in batches] == [3, 3, 1]
    values = torch.cat([b[:, 0, 0, 0] for b, _ in batches]).tolist()
    assert values == list(range(7))
    assert torch.cat([s for _, s in batches])[:, 0].tolist() == [20 + i for i in range(7)]
