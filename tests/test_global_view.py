"""The global view: region statistics, fold exclusion, one fused score and map, model files, teaching, and
defects of layout (a generated category) that the patch view alone misses."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectscope import load_dataset
from defectscope.artifacts import load_model, save_model
from defectscope.detectors.base import create_detector
from defectscope.detectors.global_view import (MAP_GRID, SCORE_GRID, Moments, RegionModel, drift_moment, eigh,
                                               pooling_matrix, region_descriptors)
from defectscope.detectors.patchcore import PatchFeatures
from defectscope.detectors.selection import costs_within_noise, false_alarms, noise
from defectscope.metrics import image_auroc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from generated import write_logical_parts  # noqa: E402


@pytest.mark.parametrize("size, cells", [(40, 3), (20, 6), (7, 3), (44, 6)])
def test_region_pooling_is_adaptive_average_pooling(size: int, cells: int) -> None:
    x = torch.randn(2, 5, size, size + 3)
    rows, cols = torch.from_numpy(pooling_matrix(size, cells)), torch.from_numpy(pooling_matrix(size + 3, cells))
    pooled = torch.einsum("nchw,gh,kw->ncgk", x, rows, cols)
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x, cells), rtol=1e-5, atol=1e-6)
    maps = {8: x.contiguous(memory_format=torch.channels_last), 16: x[:, :, ::2, ::2]}  # as backbones give them
    expected = torch.cat([torch.cat([F.adaptive_avg_pool2d(maps[s], g).flatten(2).transpose(1, 2) for s in (8, 16)], 2)
                          for g in (SCORE_GRID, MAP_GRID)], 1)  # score grid first, regions row by row, strides' channels
    torch.testing.assert_close(region_descriptors(maps), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("count", [1, 2, 45])
def test_the_decomposition_split_over_threads_is_the_whole_stacks(count: int) -> None:
    """Each region's eigen-decomposition runs on one thread of a pool: the same values and subspaces as one call on
    the whole stack, and the caller keeps its thread count."""
    x = torch.randn(count, 12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(count))
    matrices = x @ x.mT / 40
    threads = torch.get_num_threads()
    values, vectors = eigh(matrices)
    expected_values, expected_vectors = torch.linalg.eigh(matrices)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(values, expected_values)
    torch.testing.assert_close((vectors * expected_vectors).sum(-2).abs(), torch.ones(count, 12, dtype=torch.float64))  # up to sign
    torch.testing.assert_close(vectors @ torch.diag_embed(values) @ vectors.mT, matrices)


def test_a_fold_is_scored_by_statistics_without_its_own_images() -> None:
    generator = torch.Generator().manual_seed(0)
    regions = torch.randn(30, 4, 6, generator=generator) @ torch.randn(6, 6, generator=generator)
    everything = Moments.of(regions)
    fold = torch.tensor([1, 7, 12])
    rest = torch.ones(30, dtype=torch.bool)
    rest[fold] = False
    without, refitted = RegionModel.from_moments(everything - Moments.of(regions[fold])), RegionModel.from_moments(Moments.of(regions[rest]))
    torch.testing.assert_close(without.residuals(regions[fold]), refitted.residuals(regions[fold]), rtol=1e-4, atol=1e-4)

    detector = create_detector("patchcore", global_view="on", calibration_folds=5, coreset_ratio=0.5)
    features = PatchFeatures(torch.randn(30, 3, 3, 8, generator=generator), regions)
    detector.fit_features(features)
    folds, scored = detector.crossfit_rows(30)
    got = detector.crossfit_residuals(regions, folds, scored)
    expected = []
    for held, chosen in zip(folds, scored):
        keep = torch.ones(30, dtype=torch.bool)
        keep[held] = False
        expected.append(RegionModel.from_moments(Moments.of(regions[keep])).residuals(regions[chosen]))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-4)
    outlier = regions.clone()
    outlier[folds[0][0]] += 50  # one image far from the rest: its own fold never learns it, so it stands out
    detector.fit_features(PatchFeatures(features.patches, outlier))
    residuals = detector.crossfit_residuals(outlier, folds, scored)
    first = int((torch.cat(scored) == folds[0][0]).nonzero())
    assert residuals[first].min() > 10 * residuals.median()


@pytest.fixture(scope="module")
def logical(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_logical_parts(tmp_path_factory.mktemp("logical"), train=60, test_good=12, per_defect=8, size=256)


@pytest.fixture(scope="module")
def views(logical: Path) -> dict:
    """PatchCore with and without the global view, and PatchCore alone (the patch view: neither the global nor the
    place view), fitted on the generated trays."""
    train = [s.path for s in load_dataset(logical).train]
    fitted = {}
    for name, views in {"on": {"global_view": "on"}, "off": {"global_view": "off"},
                        "alone": {"global_view": "off", "place_view": "off"}}.items():
        detector = create_detector("patchcore", image_size=256, crop=None, coreset_ratio=0.25, **views)
        detector.fit(train)
        fitted[name] = detector
    return fitted


def test_the_global_view_catches_parts_that_do_not_go_together(views: dict, logical: Path) -> None:
    test = load_dataset(logical).test
    labels = [s.label for s in test]
    paths = [s.path for s in test]
    fused, alone = views["on"].predict(paths, map_size="input"), views["alone"].predict(paths, map_size="input")
    assert image_auroc(labels, fused.scores) >= 0.98
    assert image_auroc(labels, alone.scores) <= 0.95  # every part looks normal on its own
    caught = np.array([v == "defective" for v in fused.verdicts])
    assert caught[np.array(labels) == 1].mean() >= 0.8 and caught[np.array(labels) == 0].mean() <= 0.2
    swapped = [i for i, s in enumerate(test) if s.defect == "swapped"]
    for i in swapped:  # the map lights up where the parts are, not in the empty middle or the margin
        heat = fused.maps[i]
        h, w = heat.shape
        assert heat[: h // 2, : w // 2].max() > heat[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].mean()


def test_the_global_view_travels_in_the_model_file_and_learns_taught_images(views: dict, logical: Path,
                                                                              tmp_path: Path) -> None:
    detector = views["on"]
    path = save_model(detector, tmp_path / "m.dsmodel")
    loaded = load_model(path)
    paths = [s.path for s in load_dataset(logical).test]
    want, got = detector.predict(paths), loaded.predict(paths)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
    assert loaded.config.global_view == "on" and loaded.fusion is not None
    # "auto" keeps the place view only where the global view is not: each view in the max adds to the threshold
    assert (loaded.config.place_view, loaded.place, views["off"].config.place_view) == ("off", None, "on")
    off = load_model(save_model(views["off"], tmp_path / "off.dsmodel"))
    assert off.moments is None and "global_sums" not in off.tensors()
    before = float(loaded.moments.count[0])
    new = [s.path for s in load_dataset(logical).test if s.label == 0][:4]
    residual_before = loaded.regions.residuals(loaded._features(new, None)[0].regions).mean()
    loaded.teach(new)
    assert float(loaded.moments.count[0]) == before + 4
    assert loaded.regions.residuals(loaded._features(new, None)[0].regions).mean() < residual_before


def test_a_model_without_the_global_view_computes_no_regions(views: dict, logical: Path, monkeypatch) -> None:
    paths = [s.path for s in load_dataset(logical).test][:4]
    want = views["off"].predict(paths).scores

    def refused(maps: dict) -> torch.Tensor:
        raise AssertionError("region descriptors computed for a model that does not use them")

    monkeypatch.setattr("defectscope.detectors.patchcore.region_descriptors", refused)
    np.testing.assert_array_equal(views["off"].predict(paths).scores, want)
    with pytest.raises(AssertionError, match="region descriptors"):
        views["on"].predict(paths)


@pytest.mark.parametrize("seed", [0, 2])  # seed 2: one held-out tray and its two drifted copies are flagged
def test_the_default_keeps_the_global_view_for_the_trays_and_records_why(tmp_path: Path, seed: int) -> None:
    # as many good trays as the benchmark's: the probe's 16 held-out ones leave a model like the cross-fitted ones
    dataset = load_dataset(write_logical_parts(tmp_path, train=200, test_good=12, per_defect=8, size=256, seed=seed))
    detector = create_detector("patchcore", image_size=352, crop=320)  # the frame the search picks for them
    assert detector.config.global_view == "auto"
    detector.fit([s.path for s in dataset.train])
    choice = detector.train_summary["global_view_choice"]
    assert choice["chosen"] == detector.config.global_view == "on"  # it costs the trays nothing: kept
    assert detector.config.place_view == "off" and detector.place is None  # so the place view is left out
    assert set(choice["evidence"]) == {"patch view", "patch + global view"}
    assert (choice["synthetic_images"], choice["held_out_images"], choice["drifted_images"]) == (16 * 4 * 2, 16, 16 * 2)
    alone = choice["evidence"]["patch view"]
    for view in choice["evidence"].values():
        assert 0 <= view["recall_at_1pct"] <= 1 and 0 <= view["false_alarms"] <= 1
    assert choice["recall_cost"] <= noise(alone["recall_at_1pct"], 128)
    assert choice["false_alarm_cost"] <= noise(alone["false_alarms"], 16)  # held-out images flagged, each once
    labels = [s.label for s in dataset.test]
    assert image_auroc(labels, detector.predict([s.path for s in dataset.test]).scores) >= 0.98
    loaded = load_model(save_model(detector, tmp_path / "auto.dsmodel"))
    assert loaded.config.global_view == choice["chosen"] and loaded.train_summary["global_view_choice"] == choice
    assert loaded.moments.drift is not None  # the drift it allows for travels with it


def test_a_good_image_and_its_drifted_copies_are_one_images_worth_of_false_alarms() -> None:
    owners = np.concatenate([np.arange(16), np.repeat(np.arange(16)[::-1], 2)])  # 16 held-out images, then 2 copies
    # of each in another order, as the probe lists them
    scores = np.zeros(48)
    scores[[3, 16 + 2 * 12, 16 + 2 * 12 + 1]] = 9.0  # image 3 as it is and both its copies (the 13th pair)
    assert false_alarms(scores, owners, threshold=5.0) == 1 / 16
    scores[16 + 2 * 12] = 0.0
    scores[16] = 9.0  # image 3 as it is and once drifted, image 15 drifted: two images
    assert false_alarms(scores, owners, threshold=5.0) == 2 / 16
    alone = {"recall_at_1pct": 124 / 128, "false_alarms": 0.0}
    one_image = {**alone, "false_alarms": 1 / 16}
    assert costs_within_noise(alone, one_image, defects=128, images=16)
    assert not costs_within_noise(alone, {**alone, "false_alarms": 2 / 16}, defects=128, images=16)
    caught = {"recall_at_1pct": 126 / 128, "false_alarms": 0.0}  # each synthetic defect is its own evidence:
    assert not costs_within_noise(caught, {**caught, "recall_at_1pct": 124 / 128}, defects=128, images=16)  # 2 lost
    assert costs_within_noise(caught, {**caught, "recall_at_1pct": 125 / 128}, defects=128, images=16)  # 1 lost


def test_the_drift_moment_makes_drift_normal_variation() -> None:
    rng = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=rng, dtype=torch.float64))[0]
    layout, direction = basis[:, :3], basis[:, 3]  # good regions vary in 3 directions; drift moves a fourth
    good = (torch.randn(200, 2, 3, generator=rng, dtype=torch.float64) @ layout.T * 3
            + 0.05 * torch.randn(200, 2, 8, generator=rng, dtype=torch.float64))
    sign = torch.where(torch.arange(40) % 2 == 0, 1.0, -1.0).double()[:, None, None]
    before, after = good[:40], good[:40] + 2 * sign * direction
    plain = RegionModel.from_moments(Moments.of(good))
    moments = Moments.of(good)
    moments.drift = drift_moment(before, after)
    aware = RegionModel.from_moments(moments)
    torch.testing.assert_close(moments.drift[0], 4 * torch.outer(direction, direction))
    assert aware.residuals(after.float()).mean() < 0.2 * plain.residuals(after.float()).mean()  # drift: no residual
    assert (moments - Moments.of(good[:5])).drift is moments.drift and (moments + Moments.of(good[:5])).drift is moments.drift


def test_two_good_images_fit_without_the_global_view_and_on_asks_for_three(demo_root: Path) -> None:
    """With two images each calibration fold's region statistics came from one image, whose decomposition failed with
    LAPACK's error; "auto" has no probe below selection.MIN_IMAGES and is off without learning them."""
    from defectscope.errors import DefectscopeError

    two = [s.path for s in load_dataset(demo_root).train][:2]
    detector = create_detector("patchcore", image_size=128, crop=None)
    detector.fit(two)
    assert detector.config.global_view == "off" and detector.moments is None
    assert detector.train_summary["global_view_choice"] == {"chosen": "off", "reason": "too few training images for the probe"}
    assert np.isfinite(detector.predict(two).scores).all()
    with pytest.raises(DefectscopeError, match="global_view: on needs at least 3 good images"):
        create_detector("patchcore", image_size=128, crop=None, global_view="on").fit(two)
    three = [s.path for s in load_dataset(demo_root).train][:3]
    on = create_detector("patchcore", image_size=128, crop=None, global_view="on")
    on.fit(three)
    assert on.config.global_view == "on" and on.regions is not None
