"""Synthetic defects land where their masks say, at the width they say, and leave every other pixel alone."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from defectscope.data.defects import KINDS, scratch, synthetic_defect


def _good(seed: int = 0, shape: tuple[int, int] = (240, 320)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = cv2.GaussianBlur(rng.normal(0, 1, (*shape, 3)).astype(np.float32), (0, 0), 3)
    return np.clip(120 + 40 * smooth, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_defects_change_their_mask_and_nothing_else(kind: str) -> None:
    image, source = _good(0), _good(1)
    for seed in range(5):
        made = synthetic_defect(image, kind, np.random.default_rng(seed), source)
        assert made.kind == kind and made.image.shape == image.shape and made.mask.any()
        changed = np.any(made.image != image, axis=2)
        assert not (changed & ~made.mask).any()  # outside the mask: the same pixels
        assert changed[made.mask].mean() > 0.9  # inside: (almost) every pixel differs
        assert made.mask.mean() < 0.05  # small next to the part


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_scratches_have_the_width_they_say(width: int) -> None:
    for seed in range(4):
        made = scratch(_good(seed), np.random.default_rng(seed), width)
        mask = made.mask.astype(np.uint8)
        assert made.width == width
        assert cv2.erode(mask, np.ones((width, width), np.uint8)).any()  # a width x width square fits in the stroke
        assert not cv2.erode(mask, np.ones((width + 2, width + 2), np.uint8)).any()  # a wider one fits nowhere
        centre = np.argwhere(made.mask).mean(0) / made.mask.shape
        assert (0.1 < centre).all() and (centre < 0.9).all()  # in the central part, where the product is


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown synthetic defect"):
        synthetic_defect(_good(), "dent", np.random.default_rng(0))


def test_a_probe_keeps_its_synthetic_defects_as_the_boxes_they_changed(tmp_path) -> None:
    """The probe's synthetic-defect images read back pixel for pixel as they were made, while it holds only the box
    each defect changed (128 whole copies of a large photo held hundreds of MB through the fit)."""
    from defectscope.detectors.selection import DEFECTS_PER_KIND, Pasted, make_probe

    good = [_good(seed, (480, 640)) for seed in range(12)]
    paths = []
    for index, image in enumerate(good):
        paths.append(tmp_path / f"{index}.png")
        cv2.imwrite(str(paths[-1]), image[:, :, ::-1])
    probe = make_probe(paths, seed=0)
    assert isinstance(probe.defective, Pasted) and len(probe.defective) == len(probe.good) * len(KINDS) * DEFECTS_PER_KIND
    kept = sum(pixels.size for *_, pixels in probe.defective.changes)
    assert kept < 0.1 * len(probe.defective) * good[0].size
    rng = np.random.default_rng(0)
    rng.permutation(len(paths))  # make_probe's draws: the held-out order, then the defects in turn
    kinds = [kind for _ in probe.good for kind in KINDS * DEFECTS_PER_KIND]
    for index, image in enumerate(probe.defective):
        owner = index // (len(KINDS) * DEFECTS_PER_KIND)
        made = synthetic_defect(probe.good[owner], kinds[index], rng, probe.good[(owner + 1) % len(probe.good)]).image
        assert np.array_equal(image, made) and not np.array_equal(image, probe.good[owner])
    assert len(list(probe.defective)) == len(probe.defective) and np.array_equal(probe.defective[-1], image)
