"""Overlays a person reads: the part stays visible, the uninspected margin is marked, verdict and colour bar beside."""

from __future__ import annotations

import numpy as np

from defectscope.data.frame import Preprocess
from defectscope.viz import VERDICT_COLOURS, readable_overlay


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((200, 300, 3), 200, np.uint8)
    heat = np.zeros((200, 300), np.float32)
    heat[90:110, 140:160] = 50.0  # a hot spot far above the threshold (10)
    return image, heat


def test_the_part_stays_visible_where_the_map_is_low_and_the_hot_spot_is_red() -> None:
    image, heat = _scene()
    inside = readable_overlay(image, heat, 50.0, 10.0, None)
    band = inside.shape[0] - image.shape[0]  # the caption band above the image (no note: nothing is hatched)
    shown = inside[band:, : image.shape[1]].astype(int)
    assert np.abs(shown[20, 20] - 200).max() < 60  # low map: mostly the part itself
    red, green, blue = shown[100, 150]
    assert red > 100 and red > 2 * green and red > 2 * blue  # at 5x the threshold: the top of the scale


def test_the_margin_outside_the_crop_is_hatched_and_explained() -> None:
    image, heat = _scene()
    frame = Preprocess(100, 80, (0.5,) * 3, (0.2,) * 3, aspect=1.5)  # 150 x 100 resized, 130 x 80 seen
    top, left, bottom, right = frame.inspected_box(200, 300)
    assert 0 < top < bottom < 200 and 0 < left < right < 300
    hatched = readable_overlay(image, heat, 50.0, 10.0, (top, left, bottom, right))
    plain = readable_overlay(image, heat, 50.0, 10.0, None)
    band = plain.shape[0] - image.shape[0]
    assert hatched.shape[0] > plain.shape[0]  # a line below explains the hatching
    outside = hatched[band : band + top, : image.shape[1]]
    assert len(np.unique(outside.reshape(-1, 3), axis=0)) >= 2  # stripes, not one flat colour
    assert np.array_equal(hatched[band + top + 5 : band + bottom - 5, left + 5 : right - 5],
                          plain[band + top + 5 : band + bottom - 5, left + 5 : right - 5])  # the inspected part untouched


def test_the_verdict_colours_the_caption_and_the_bar_marks_the_threshold() -> None:
    image, heat = _scene()
    for score, verdict in ((50.0, "defective"), (5.0, "good")):
        drawn = readable_overlay(image, heat, score, 10.0, None)
        band = drawn.shape[0] - image.shape[0]
        caption = drawn[:band].reshape(-1, 3)
        assert (caption == VERDICT_COLOURS[verdict]).all(axis=1).any()
    bar = drawn[band:, image.shape[1] + 6 : image.shape[1] + 12]
    dark_rows = np.flatnonzero((bar.astype(int).sum(axis=2) < 150).all(axis=1))
    assert any(abs(row - image.shape[0] // 2) <= 2 for row in dark_rows)  # 1.0x at half the 0 .. 2x scale
