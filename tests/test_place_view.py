"""The place view: per-place statistics left out exactly, calibration from images unseen by their own statistics, a
patch that is ordinary elsewhere but not at its place, and the model file with the map's region level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from defectscope.artifacts import load_model, save_model, set_threshold
from defectscope.detectors.patchcore import PatchCore, PatchCoreConfig
from defectscope.detectors.place_view import MIN_IMAGES, SPREAD_FLOOR, PlaceStats, place_scores
from defectscope.export.pseudo import map_threshold
from defectscope.thresholds import calibrate


def _grids(count: int = 30) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, 5, 4, generator=generator) * torch.linspace(0.2, 3.0, 20).reshape(5, 4)


def test_place_statistics_are_each_places_mean_and_floored_spread() -> None:
    grids = _grids()
    mean, spread = PlaceStats.of(grids).mean_and_spread()
    torch.testing.assert_close(mean, grids.mean(0))
    torch.testing.assert_close(spread, grids.std(0, unbiased=False).clamp_min(SPREAD_FLOOR * float(grids.std(0, unbiased=False).median())))


def test_each_calibration_image_is_scored_by_statistics_without_it() -> None:
    grids = _grids()
    grids[3, 0, 0] += 10.0  # an unusual good image: in its own statistics it would look far more ordinary
    stats = PlaceStats.of(grids)
    got = stats.left_out_scores(grids)
    floor = stats.floor()
    for image in range(len(grids)):
        others = torch.cat([grids[:image], grids[image + 1 :]])
        mean, spread = others.mean(0), others.std(0, unbiased=False).clamp_min(floor)
        torch.testing.assert_close(got[image], place_scores(grids[image : image + 1], mean, spread)[0])
    assert got[3] > 2 * place_scores(grids[3:4], *stats.mean_and_spread())[0]


def _features(count: int, odd: int | None = None) -> torch.Tensor:
    """Patch features of good images on a 4 x 4 grid: every place varies widely, except the corner, which always
    holds nearly the same patch; with `odd`, image `odd`'s corner holds a patch seen elsewhere on good images."""
    generator = torch.Generator().manual_seed(count)
    features = torch.randn(count, 4, 4, 8, generator=generator)
    features[:, 0, 0] = 0.01 * torch.randn(count, 8, generator=generator)
    if odd is not None:
        features[odd, 0, 0] = features[odd, 2, 2]
    return features


def test_a_patch_ordinary_elsewhere_is_caught_at_a_place_that_never_varies() -> None:
    train, test = _features(60), _features(20, odd=0)
    scores = {}
    for place_view in ("off", "on"):  # the place view last: its statistics and grids are checked below
        detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=1.0, calibration_folds=5,
                                             global_view="off", place_view=place_view))
        detector.fit_features(train)
        folds, scored = detector.crossfit_rows(len(train))
        calibration, nearest = detector.patch_crossfit(train, folds, scored)
        scores[place_view] = (detector.score_features(test)[0], calibration)
        assert (detector.place is not None) == (detector.config.place_view == place_view == "on")
    alone, patch_calibration = scores["off"]
    assert alone[0] < alone[1:].max()  # to the patch view alone, the odd corner is an ordinary patch
    fused, calibration = scores["on"]
    assert fused[0] > calibration.max() and fused[0] > fused[1:].max()
    # calibrated on each image's place score without it in the statistics, fused with the same nearest-patch scores
    torch.testing.assert_close(nearest, patch_calibration)
    grids = torch.cat([detector.holdout_grids(train, held, chosen)[1] for held, chosen in zip(folds, scored)])
    stats = PlaceStats.of(grids)
    torch.testing.assert_close(calibration, detector._place_fused(nearest, stats.left_out_scores(grids)))
    assert not torch.allclose(calibration, detector._place_fused(nearest, place_scores(grids, *stats.mean_and_spread())))


def test_too_few_images_leave_the_place_view_out() -> None:
    detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=0.5, global_view="off"))
    few = _features(MIN_IMAGES - 1)
    detector.fit_features(few)
    folds, scored = detector.crossfit_rows(len(few))
    torch.testing.assert_close(detector.patch_crossfit(few, folds, scored)[0],
                               torch.cat([detector.holdout_grids(few, held, chosen)[0] for held, chosen in zip(folds, scored)]))
    assert detector.place is None and detector.config.place_view == "off"


def test_the_place_view_travels_in_the_model_file(demo_root: Path, tmp_path: Path) -> None:
    """Place statistics and the map's region level are saved and restored; a new threshold keeps that level."""
    from defectscope import load_dataset

    dataset = load_dataset(demo_root)
    detector = PatchCore(PatchCoreConfig(image_size=128, crop=112, coreset_ratio=0.25, global_view="off"))
    detector.fit([s.path for s in dataset.train])
    assert detector.config.place_view == "on" and detector.place is not None  # "auto": the global view is off
    loaded = load_model(save_model(detector, tmp_path / "m.dsmodel"))
    assert loaded.config.place_view == "on" and set(loaded.place) == {"mean", "spread", "fusion"}
    paths = [s.path for s in dataset.test]
    np.testing.assert_allclose(loaded.predict(paths).scores, detector.predict(paths).scores, rtol=1e-6)
    without = PatchCore(PatchCoreConfig(image_size=128, crop=112, coreset_ratio=0.25, global_view="off", place_view="off"))
    without.fit([s.path for s in dataset.train])
    reloaded = load_model(save_model(without, tmp_path / "alone.dsmodel"))
    assert reloaded.place is None and reloaded.config.place_view == "off" and "place_mean" not in reloaded.tensors()
    # the map shows the patch distances alone: its regions start where the patch view's own threshold does
    assert without.calibration.map_threshold is None
    assert loaded.calibration.map_threshold == detector.calibration.map_threshold == without.calibration.threshold
    assert map_threshold(loaded, None) == without.calibration.threshold <= loaded.calibration.threshold
    assert f"defect regions from map level {without.calibration.threshold:.4g}" in loaded.calibration.describe()
    kept = set_threshold(tmp_path / "m.dsmodel", calibrate(loaded.calibration_scores.numpy(), "false_alarm_rate", 0.05),
                         tmp_path / "moved.dsmodel")
    moved = load_model(kept).calibration
    assert moved.threshold != loaded.calibration.threshold and moved.map_threshold == loaded.calibration.map_threshold


def test_places_that_never_vary_give_finite_scores() -> None:
    """Identical good images: every spread is 0, and no place z may become NaN or infinite (a NaN is no verdict)."""
    grids = torch.zeros(25, 3, 3)
    stats = PlaceStats.of(grids)
    mean, spread = stats.mean_and_spread()
    assert bool((spread > 0).all()) and bool(torch.isfinite(stats.left_out_scores(grids)).all())
    changed = grids[:1].clone()
    changed[0, 1, 1] = 0.5
    assert place_scores(changed, mean, spread)[0] > 1000  # a place that never varied, changed: far beyond its spread

