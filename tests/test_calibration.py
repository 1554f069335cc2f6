"""The operating point: cross-fitted good scores (never from a model that saw the image), a stated false-alarm
rate with its interval, and thresholds chosen from a few labelled images."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from defectscope.artifacts import load_model, model_info, save_model
from defectscope.data.layout import load_dataset
from defectscope.detectors import create_detector, patchcore
from defectscope.detectors.base import Detector
from defectscope.detectors.coreset import coreset_indices, greedy_coreset
from defectscope.detectors.nearest import ClusteredBank
from defectscope.detectors.padim import PaDiM, PaDiMConfig
from defectscope.detectors.patchcore import PatchCore, PatchCoreConfig, PatchFeatures
from defectscope.errors import DefectscopeError
from defectscope.thresholds import (calibrate, check_stated_rate, f1_calibration, false_alarm_cut, labelled_calibration,
                                   recall_threshold)


def test_false_alarm_threshold_is_the_conformal_quantile() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 100.0))  # n = 99
    calibration = calibrate(scores, "false_alarm_rate", 0.05)
    rank = math.ceil(100 * 0.95)  # 95: the 95th smallest of 99 scores
    assert rank == 95 and calibration.threshold == 95.0
    assert calibration.false_alarm_rate == pytest.approx(5 / 100)
    low, high = calibration.false_alarm_interval
    assert low == pytest.approx(stats.beta.ppf(0.025, 5, 95)) and high == pytest.approx(stats.beta.ppf(0.975, 5, 95))
    assert calibration.good_count == 99 and calibration.warning is None


def test_a_rate_below_one_over_n_is_stated_as_the_largest_scores_own() -> None:
    """Fewer than 99 scores cannot state 1%: the threshold is the largest, stated at the rate it truly has, 1/(n+1),
    with its exact interval, and a warning says how many scores 1% needs. Over many draws the stated rate is the true
    one (a fitted tail stated 0.4% where the true rate was 1.7%)."""
    normal = stats.norm(20.0, 2.0)
    rng = np.random.default_rng(1)
    stated, true = [], []
    for _ in range(300):
        scores = normal.rvs(60, random_state=rng)
        calibration = calibrate(scores, "false_alarm_rate", 0.01)
        assert calibration.threshold == scores.max() and calibration.false_alarm_rate == pytest.approx(1 / 61)
        stated.append(calibration.false_alarm_rate)
        true.append(normal.sf(calibration.threshold))
    assert abs(np.mean(stated) - np.mean(true)) < 0.004  # E[true] = 1/61 exactly; 4 standard errors of the mean
    assert calibration.false_alarm_interval == pytest.approx((stats.beta.ppf(0.025, 1, 60), stats.beta.ppf(0.975, 1, 60)))
    assert "needs at least 99" in calibration.warning and "1/61" in calibration.warning
    enough = calibrate(normal.rvs(99, random_state=rng), "false_alarm_rate", 0.01)
    assert enough.false_alarm_rate == pytest.approx(0.01) and enough.warning is None


@pytest.mark.parametrize("count, rate", [(400, 0.01), (400, 0.0005), (60, 0.01), (12, 0.01), (5, 0.2), (60, 0.3)])
def test_the_threshold_alone_is_the_calibrations(count: int, rate: float) -> None:
    """`false_alarm_cut` (the global view's choice judges each candidate score at 1% with it) sets the very threshold
    `calibrate` does, on every path: order statistic, too few scores for the rate, and scores with no spread."""
    rng = np.random.default_rng(count)
    for scores in (rng.exponential(1.0, count), rng.uniform(0, 1, count), np.full(count, 3.0)):
        assert false_alarm_cut(scores, rate) == calibrate(scores, "false_alarm_rate", rate).threshold


def test_no_threshold_rests_on_a_score_that_is_not_a_number() -> None:
    """A NaN among the scores would make a NaN threshold (every comparison then reads "good") or be skipped unseen:
    every way of setting a threshold refuses it with one clear error."""
    for count in (10, 61, 200):
        scores = np.r_[np.arange(float(count)), np.nan]
        for method, param in (("false_alarm_rate", 0.01), ("sigma", 3.0), ("percentile", 99.0)):
            with pytest.raises(DefectscopeError, match="not finite"):
                calibrate(scores, method, param)
    good, bad = np.arange(30.0), np.r_[np.arange(30.0, 60.0), np.inf]
    with pytest.raises(DefectscopeError, match="1 of the 31 defective scores"):
        recall_threshold(bad, 0.9)
    with pytest.raises(DefectscopeError, match="not finite"):
        labelled_calibration(good, bad, 40.0, "recall", 0.9, None)
    with pytest.raises(DefectscopeError, match="not finite"):
        f1_calibration(np.r_[np.zeros(30), np.ones(31)], np.r_[good, bad], None)


def test_sigma_and_percentile_still_state_their_rate() -> None:
    scores = np.arange(100.0)
    calibration = calibrate(scores, "percentile", 90)
    hits = int((scores >= calibration.threshold).sum())
    assert calibration.false_alarm_rate == pytest.approx((hits + 0.5) / 101)
    assert calibrate(scores, "sigma", 3.0).false_alarm_rate < 0.01


def test_labelled_threshold_says_how_sure_it_is() -> None:
    good, bad = np.arange(10.0), np.arange(5.0, 15.0)
    threshold = recall_threshold(bad, 0.9)
    assert threshold == 6.0 and (bad >= threshold).mean() >= 0.9
    calibration = labelled_calibration(good, bad, threshold, "recall", 0.9, None)
    assert calibration.recall == 0.9 and calibration.false_alarm_rate == 0.4
    low, high = calibration.recall_interval
    assert low < 0.9 < high and high - low > 0.3  # ten labelled defects leave a wide interval
    assert "label at least 20" in calibration.warning


def test_patchcore_merges_shard_coresets_and_scores_folds_without_their_rows() -> None:
    features = torch.randn(23, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=0.1, shard_images=2, calibration_folds=5,
                                         place_view="off"))  # the patch view's own cross-fitting (test_place_view: the place view's)
    detector.fit_features(features)
    folds = [set(f.tolist()) for f in detector.calibration_folds(23)]
    assert sorted(i for f in folds for i in f) == list(range(23))
    shards = detector.shards(23)
    for shard in shards:  # each shard lies inside one fold
        assert sum(set(shard.tolist()) <= fold for fold in folds) == 1
    pool = detector.pool
    start = 0
    for number, shard in enumerate(shards):  # the candidates: each shard's coreset of its own patches alone
        own = features[shard].reshape(-1, 8)
        expected = own[coreset_indices(own, 0.1 * detector.config.coreset_candidates, number, detector.config.projection_dim)]
        torch.testing.assert_close(pool.features[start : start + len(expected)], expected)
        start += len(expected)
    assert start == len(pool.features) and len(pool.selected) == round(23 * 16 * 0.1)
    expected = pool.projected[greedy_coreset(pool.projected, len(pool.selected), int(torch.randint(
        len(pool.features), (1,), generator=torch.Generator().manual_seed(0))))]  # the reduce: one greedy over all
    torch.testing.assert_close(pool.projected[pool.selected], expected)
    assert torch.cdist(pool.projected, expected).min(1).values.max() <= pool.radius + 1e-5
    scored, scores = detector.crossfit_scores(features)
    assert sorted(scored.tolist()) == list(range(23))
    for fold in detector.calibration_folds(23):  # scored against memory from the other folds only
        bank, sources = detector.holdout_bank(fold)
        assert len(sources) == len(bank.bank) and not torch.isin(sources, fold).any()
        removed, extra = int(torch.isin(detector.bank_sources, fold).sum()), pool.refill(fold)
        assert removed > 0 and 0 < len(extra) <= removed  # up to as many refilled as removed
        assert len(bank.bank) == len(detector.index.bank) - removed + len(extra)
        # the refill: other folds' candidates whose nearest row was one of the fold's
        assert torch.isin(pool.nearest_source[extra], fold).all() and not torch.isin(pool.sources[extra], fold).any()
        lost = torch.nonzero(~torch.isin(pool.sources, fold) & torch.isin(pool.nearest_source, fold)).flatten()
        kept = pool.selected[~torch.isin(pool.sources[pool.selected], fold)]
        covered = torch.cdist(pool.projected[lost], pool.projected[kept]).min(1).values  # brute force
        assert torch.equal(extra, lost[greedy_coreset(pool.projected[lost], min(removed, len(lost)), covered=covered)])
        for image in fold.tolist():
            brute = torch.cdist(features[image].reshape(-1, 8), bank.bank).min(1).values.max()
            got = scores[(scored == image).nonzero()[0, 0]]
            assert torch.isclose(got, detector._finish(brute[None], None)[0][0], rtol=1e-4)


def test_a_unique_image_is_never_scored_against_itself() -> None:
    """An image unlike every other: were its own rows in its fold's memory, its held-out score would be near 0."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(30, 4, 4, 8, generator=generator) * 0.1
    features[7] += 50.0
    detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=0.2, shard_images=4, calibration_folds=5))
    detector.fit_features(features)
    assert torch.isin(torch.tensor([7]), detector.bank_sources).all()  # the fitted memory does keep it
    scored, scores = detector.crossfit_scores(features)
    unique = scores[(scored == 7).nonzero()[0, 0]]
    assert unique > 10 * scores[scored != 7].max()


def test_generic_crossfit_equals_models_refitted_without_each_fold() -> None:
    features = torch.randn(17, 12, generator=torch.Generator().manual_seed(2))
    detector = create_detector("knn", image_size=32, crop=None, calibration_folds=4)
    detector.fit_features(features)
    scored, scores = detector.crossfit_scores(features)
    for fold in detector.calibration_folds(17):
        fresh = create_detector("knn", image_size=32, crop=None)
        rest = torch.ones(17, dtype=torch.bool)
        rest[fold] = False
        fresh.fit_features(features[rest])
        expected = fresh.score_features(features[fold])[0]
        got = torch.stack([scores[(scored == i).nonzero()[0, 0]] for i in fold.tolist()])
        torch.testing.assert_close(got, expected)
    assert len(detector.learned["bank"]) == 17  # the final model is restored


def test_padim_crossfit_equals_gaussians_refitted_without_each_fold() -> None:
    features = torch.randn(23, 256, 6, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 3, 6) + 2
    detector = PaDiM(PaDiMConfig(image_size=40, crop=None))  # folds: leave one out, whatever the config says
    detector.fit_features(features)
    fast_order, fast = detector.crossfit_scores(features)
    slow_order, slow = Detector.crossfit_scores(detector, features)  # generic path: refit per fold
    assert torch.equal(fast_order, slow_order)
    torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-3)  # the refit keeps precisions in float16


def test_clustered_bank_subset_stays_exact() -> None:
    bank = torch.randn(600, 16, generator=torch.Generator().manual_seed(3))
    index = ClusteredBank.build(bank, 0, cluster_size=32)
    keep = torch.rand(600, generator=torch.Generator().manual_seed(4)) > 0.3
    subset = index.subset(keep)
    queries = torch.randn(50, 16, generator=torch.Generator().manual_seed(5))
    distances, rows = subset.search(queries)
    brute = torch.cdist(queries, index.bank[keep]).min(1).values
    torch.testing.assert_close(distances, brute, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(subset.bank[rows], index.bank[keep][torch.cdist(queries, index.bank[keep]).argmin(1)])


@pytest.fixture(scope="module")
def fitted_model(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    detector = create_detector("patchcore", image_size=128, crop=None, coreset_ratio=0.25, threshold_param=0.05)
    detector.fit([s.path for s in load_dataset(demo_root).train])
    return save_model(detector, tmp_path_factory.mktemp("cal") / "pc.dsmodel")


def test_manifest_carries_the_rate_and_the_scores(fitted_model: Path) -> None:
    calibration = model_info(fitted_model)["calibration"]
    assert calibration["method"] == "false_alarm_rate" and calibration["param"] == 0.05
    assert calibration["good_count"] == 40 and calibration["false_alarm_rate"] <= 0.05
    low, high = calibration["false_alarm_interval"]
    assert 0 < low < calibration["false_alarm_rate"] < high < 1
    scores = load_model(fitted_model).calibration_scores
    assert len(scores) == 40
    assert calibration["threshold"] == float(np.sort(scores.numpy())[math.ceil(41 * 0.95) - 1])


def test_calibrate_command_restates_the_rate_and_uses_labels(fitted_model: Path, demo_root: Path, tmp_path: Path, cli) -> None:
    restated = tmp_path / "one-percent.dsmodel"
    result = cli("-q", "calibrate", fitted_model, "-o", restated, "--false-alarm-rate", "0.1")
    assert result.code == 0 and "expected false-alarm rate" in result.out
    scores = load_model(fitted_model).calibration_scores.numpy()
    assert model_info(restated)["calibration"]["threshold"] == float(np.sort(scores)[math.ceil(41 * 0.9) - 1])
    labelled = tmp_path / "recall.dsmodel"
    result = cli("-q", "calibrate", fitted_model, "-o", labelled, "--good", demo_root / "test" / "good",
                 "--defective", demo_root / "test" / "scratch", "--target-recall", "0.9")
    assert result.code == 0 and "recall" in result.out and "label at least 20" in result.err
    calibration = model_info(labelled)["calibration"]
    assert calibration["method"] == "recall" and calibration["recall"] >= 0.9 and calibration["recall_interval"][0] < 0.9
    good_near, defective_near = calibration["gap_interval"]  # it says how close the labelled scores come
    assert defective_near == calibration["threshold"] > good_near and "sits on a defective score" in result.out
    roomy = tmp_path / "roomy.dsmodel"
    result = cli("-q", "calibrate", fitted_model, "-o", roomy, "--good", demo_root / "test" / "good",
                 "--defective", demo_root / "test" / "scratch", "--target-recall", "0.9", "--margin", "0.5")
    moved = model_info(roomy)["calibration"]
    assert result.code == 0 and moved["threshold"] == pytest.approx((good_near + defective_near) / 2)  # halfway
    assert moved["false_alarm_rate"] == calibration["false_alarm_rate"] and moved["recall"] >= calibration["recall"]
    bad = cli("calibrate", fitted_model, "-o", tmp_path / "x.dsmodel", "--target-recall", "0.9")
    assert bad.code == 2 and "give either --false-alarm-rate" in bad.err
    for labels in (["--good", demo_root / "test" / "good"], ["--defective", demo_root / "test" / "scratch"]):
        half = cli("calibrate", fitted_model, "-o", tmp_path / "x.dsmodel", *labels, "--target-recall", "0.9")
        assert half.code == 2 and half.err.strip() == ("error: a threshold from labelled images needs both --good and "
                                                       "--defective images") and not (tmp_path / "x.dsmodel").exists()
    with pytest.raises(DefectscopeError, match="a target recall needs defective images"):
        recall_threshold(np.array([], np.float32), 0.9)
    stray = cli("calibrate", fitted_model, "-o", tmp_path / "x.dsmodel", "--false-alarm-rate", "0.1", "--margin", "0.5")
    assert stray.code == 2 and "--margin applies to a threshold chosen with labelled images" in stray.err


def test_restating_the_rate_restates_the_map_region_level_from_its_own_scores(fitted_model: Path, demo_root: Path,
                                                                               tmp_path: Path, cli) -> None:
    view = load_model(fitted_model).map_scores  # the place view is on: the map (the patch view) has its own level
    assert view is not None and len(view) == 40
    level = lambda rate: float(np.sort(view.numpy())[math.ceil(41 * (1 - rate)) - 1])
    assert model_info(fitted_model)["calibration"]["map_threshold"] == level(0.05)
    restated, back = tmp_path / "ten.dsmodel", tmp_path / "back.dsmodel"
    assert cli("-q", "calibrate", fitted_model, "-o", restated, "--false-alarm-rate", "0.1").code == 0
    assert model_info(restated)["calibration"]["map_threshold"] == level(0.1) < level(0.05)
    assert cli("-q", "calibrate", restated, "-o", back, "--false-alarm-rate", "0.05").code == 0
    assert model_info(back)["calibration"] == model_info(fitted_model)["calibration"]
    labelled = tmp_path / "labelled.dsmodel"  # a threshold chosen with labels states no rate: the level stays
    assert cli("-q", "calibrate", restated, "-o", labelled, "--good", demo_root / "test" / "good",
               "--defective", demo_root / "test" / "scratch", "--f1").code == 0
    assert model_info(labelled)["calibration"]["map_threshold"] == level(0.1)
    evaluated = cli("-q", "evaluate", labelled, demo_root).out  # its threshold no longer comes from good images only
    assert "model threshold (set with labelled images: f1)" in evaluated and "good images only" not in evaluated


def test_predict_and_evaluate_report_the_stated_rate(fitted_model: Path, demo_root: Path, cli) -> None:
    predicted = cli("-q", "predict", fitted_model, demo_root / "test" / "good" / "000.png")
    assert "expected false-alarm rate" in predicted.out
    evaluated = cli("-q", "evaluate", fitted_model, demo_root)
    assert "false-alarm rate on the good test images" in evaluated.out and "stated when calibrated" in evaluated.out
    assert "model threshold (set from good images only)" in evaluated.out


def test_models_of_earlier_versions_still_load(fitted_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load, save
    data = fitted_model.read_bytes()
    size = int.from_bytes(data[:8], "little")
    manifest = json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["defectscope"])
    manifest["config"]["calibration_fraction"] = 0.1
    manifest["format_version"] = 1  # written before manifests carried their digest
    tensors = {k: v for k, v in load(data).items() if k != "calibration.scores"}
    old = tmp_path / "old.dsmodel"
    old.write_bytes(save(tensors, metadata={"defectscope": json.dumps(manifest)}))
    loaded = load_model(old)
    assert loaded.calibration_scores is None
    with pytest.raises(DefectscopeError, match="older version"):
        from defectscope.pipeline import recalibrate
        recalibrate(old, tmp_path / "new.dsmodel", false_alarm_rate=0.05)


def test_the_frame_search_choice_is_recorded_and_restored(demo_root: Path, tmp_path: Path, cli) -> None:
    from defectscope.detectors.frame_search import CANDIDATES, turns_pay
    out = tmp_path / "auto.dsmodel"
    fitted = cli("fit", demo_root, "-o", out)
    assert fitted.code == 0 and "global view " in fitted.out  # every choice is said
    place = model_info(out)["config"]["place_view"]
    assert place in ("on", "off") and f"place view {place}: " in fitted.out  # and the place view it settled on
    choice = model_info(out)["train_summary"]["frame_choice"]
    frame = CANDIDATES[choice["chosen"]]
    assert set(choice["candidates"]) == set(CANDIDATES) and choice["synthetic_images"] > 0
    assert all(0 <= c["recall_at_1pct"] <= 1 for c in choice["candidates"].values())
    # the demo's 128-px images are smaller than every candidate's frame: each enlarges them (a tie buys no larger frame)
    assert all(c["enlarges"] and c["input_pixels"] == CANDIDATES[name]["crop"] ** 2 for name, c in choice["candidates"].items())
    assert choice["chosen"] not in choice["within_noise"] and set(choice["within_noise"]) < set(CANDIDATES)
    if choice["within_noise"]:  # a near tie is said, with the frames it was near
        assert "near tie" in fitted.out and all(name in fitted.out for name in choice["within_noise"])
    else:
        assert "near tie" not in fitted.out
    loaded = load_model(out)  # the chosen frame is the model's config, and the evidence travels with it
    assert {k: getattr(loaded.config, k) for k in frame} == frame
    assert loaded.train_summary["frame_choice"] == choice
    assert choice["chosen"] in cli("info", out).out
    turns = choice["rotations"]  # "auto": judged at the chosen frame by the same probe, said, and the model's config
    assert turns["chosen"] == loaded.config.rotations == ("on" if turns_pay(turns["recall_at_1pct_without"],
                                                                          turns["recall_at_1pct_with"], choice["synthetic_images"]) else "off")
    assert turns["recall_at_1pct_without"] == choice["candidates"][choice["chosen"]]["recall_at_1pct"]
    assert f"rotations {turns['chosen']}: " in fitted.out
    if turns["chosen"] == "on":  # learned with the turns, the global view is not learned, and that is said
        assert "global_view_choice" not in loaded.train_summary and "global view off: " in fitted.out
    pinned = tmp_path / "pinned.dsmodel"
    pinning = cli("fit", demo_root, "-o", pinned, "--image-size", "160", "--crop", "128")
    assert pinning.code == 0
    view = model_info(pinned)["train_summary"]["global_view_choice"]  # its cost said with the sign of the change it makes
    assert f"the synthetic defects caught change by {-view['recall_cost']:+.0%} " in pinning.out
    assert model_info(pinned)["train_summary"]["frame_choice"] == {"chosen": None, "reason": "pinned by the settings"}
    assert model_info(pinned)["config"]["image_size"] == 160
    assert model_info(pinned)["config"]["rotations"] == "off"  # no search to judge the turns: the part lies one way


def test_fit_settings_pin_the_frame_and_are_checked(demo_root: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "s8.dsmodel"
    assert cli("fit", demo_root, "-o", out, "--settings", '{"patch_stride": 8, "shard_images": 8}').code == 0
    assert model_info(out)["config"]["patch_stride"] == 8 and model_info(out)["config"]["shard_images"] == 8
    assert model_info(out)["train_summary"]["frame_choice"]["reason"] == "pinned by the settings"
    for bad in ("[1]", "{not json", '{"patch_stride": 12}', '{"nope": 1}'):
        result = cli("fit", demo_root, "-o", tmp_path / "bad.dsmodel", "--settings", bad)
        assert result.code == 2 and "Traceback" not in result.err and not (tmp_path / "bad.dsmodel").exists()


def test_fit_checks_its_settings_before_reading_the_data(tmp_path: Path, cli) -> None:
    """The command line types and checks the config first: a refused field is named even when the data is missing."""
    result = cli("fit", tmp_path / "no-such-data", "-o", tmp_path / "m.dsmodel", "--set", "patch_stride=12")
    assert result.code == 2 and "patch_stride" in result.err and not (tmp_path / "m.dsmodel").exists()


def test_a_config_knows_which_fields_were_given() -> None:
    """`given` is what pins a choice made per product: the keys of the mapping it was built from, or else the fields
    set away from their defaults; a model takes only a config of its own class."""
    from defectscope.detectors import create_detector
    from defectscope.detectors.patchcore import PatchCoreConfig
    from defectscope.errors import SettingsError

    assert PatchCoreConfig.from_dict({"seed": 3, "image_size": 352}).given == {"seed", "image_size"}
    assert PatchCoreConfig(image_size=288, crop=256).given == {"image_size", "crop"}
    assert create_detector("patchcore", PatchCoreConfig(coreset_ratio=0.2)).config.coreset_ratio == 0.2
    with pytest.raises(SettingsError, match="PaDiMConfig"):
        create_detector("padim", PatchCoreConfig())
    with pytest.raises(SettingsError, match="patch_stride"):
        create_detector("patchcore", PatchCoreConfig(patch_stride=12))
    with pytest.raises(SettingsError, match="not both"):
        create_detector("patchcore", PatchCoreConfig(), seed=1)


def test_shard_coresets_mapped_elsewhere_choose_the_memory_the_local_loop_chooses() -> None:
    """`map_shards` (Ray's path: every shard's rows sent at once) and the local loop (one shard's rows at a time)
    give the same candidates, memory and sources."""
    generator = torch.Generator().manual_seed(5)
    patches, turned = torch.randn(18, 4, 4, 8, generator=generator), torch.randn(18, 3, 4, 4, 8, generator=generator)
    fitted = []
    for mapped in (None, lambda function, jobs: [function(job) for job in jobs]):
        detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=0.1, shard_images=4, calibration_folds=3,
                                             global_view="off", place_view="off", rotations="on"))
        detector.map_shards = mapped
        detector.fit_features(PatchFeatures(patches, patches.new_empty((18, 0, 0)), turned))
        fitted.append(detector)
    local, elsewhere = fitted
    assert torch.equal(local.index.bank, elsewhere.index.bank) and torch.equal(local.bank_sources, elsewhere.bank_sources)
    assert torch.equal(local.pool.features, elsewhere.pool.features) and len(local.pool.features) > len(local.index.bank)


def test_the_local_shard_loop_runs_a_shard_a_thread_each_in_its_own_buffer_and_lets_the_turns_go(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards run one a thread on torch's threads, each thread writing its shards' rows into its own buffer (a copy of
    every shard's rows at once doubled the features in memory); the candidates are gathered from the features by image
    and position, the rows the shards offered; once the memory is chosen the turned patches are let go."""
    generator = torch.Generator().manual_seed(6)
    patches, turned = torch.randn(20, 4, 4, 8, generator=generator), torch.randn(20, 3, 4, 4, 8, generator=generator)
    features = PatchFeatures(patches, patches.new_empty((20, 0, 0)), turned)
    images, positions = torch.tensor([3, 0, 17, 9]), torch.tensor([0, 15, 16, 63, 70, 200, 255])
    offered = features.learned_rows(images)
    torch.testing.assert_close(features.rows_at(images[positions // 64], positions % 64), offered[positions], rtol=0, atol=0)
    buffers, threads, running = [], set(), []
    learned_rows, shard_coreset = PatchFeatures.learned_rows, patchcore.shard_coreset
    together = threading.Barrier(2, timeout=10)  # the first two shards wait for each other: they must run at once

    def recorded(job: tuple) -> torch.Tensor:
        threads.add(threading.get_ident())
        running.append(job[2])
        if len(running) <= 2:
            together.wait()
        return shard_coreset(job)

    monkeypatch.setattr(PatchFeatures, "learned_rows",
                        lambda self, shard, out=None: buffers.append(None if out is None else out.data_ptr()) or learned_rows(self, shard, out))
    monkeypatch.setattr(patchcore, "shard_coreset", recorded)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=0.1, shard_images=3, calibration_folds=2,
                                         global_view="off", place_view="off", rotations="on"))
    details = detector.fit_features(features)
    assert len(buffers) == details["shards"] > 2 and None not in buffers and len(set(buffers)) == len(threads) == 2
    assert features.turned is None and detector.learns_turns
    rows = torch.cat([patches[:, None], turned], 1).reshape(-1, 8)
    assert (detector.pool.features[:, None] == rows[None]).all(-1).any(1).all()  # every candidate is a row offered


def test_with_rotations_a_fold_is_scored_without_its_images_turns() -> None:
    """Each image's turned patches join the memory's candidates as rows of that image, so a fold leaves them out."""
    generator = torch.Generator().manual_seed(3)
    patches = torch.randn(24, 4, 4, 8, generator=generator)
    turned = torch.randn(24, 3, 4, 4, 8, generator=generator) + 5.0  # unlike any image's own patches
    features = PatchFeatures(patches, patches.new_empty((24, 0, 0)), turned)
    detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=0.1, shard_images=3, calibration_folds=4,
                                         global_view="off", place_view="off", rotations="on"))
    details = detector.fit_features(features)
    assert details["turns"] == 3 and details["patches"] == 24 * 4 * 16 and details["memory_bank"] == round(24 * 64 * 0.1)
    rows = torch.cat([patches[:, None], turned], 1).reshape(24, 64, 8)  # every row an image offers
    owner = torch.cdist(detector.index.bank, rows.reshape(-1, 8)).argmin(1) // 64
    assert torch.equal(owner, detector.bank_sources)  # each memory row is known by the image it was turned from
    assert (torch.cdist(detector.index.bank, turned.reshape(-1, 8)).min(1).values < 1e-5).sum() > 0  # turns are learned
    scored, scores = detector.crossfit_scores(features)
    for fold in detector.calibration_folds(24):
        bank, sources = detector.holdout_bank(fold)
        assert not torch.isin(sources, fold).any()
        assert torch.cdist(rows[fold].reshape(-1, 8), bank.bank).min() > 1e-3  # not one of its rows, turned or not


def test_the_calibration_folds_run_a_fold_a_thread_with_the_same_scores_as_one_after_the_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cross-fitted folds run one a thread on torch's threads (each its own bank and search on one core), reading
    the fitted model without changing it, and give the same bits as the folds scored one after the other."""
    generator = torch.Generator().manual_seed(8)
    features = torch.randn(24, 6, 6, 16, generator=generator)
    detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=0.2, shard_images=4, calibration_folds=4,
                                         global_view="off", place_view="off"))
    detector.fit_features(features)
    folds, scored = detector.crossfit_rows(len(features))
    alone = torch.cat([detector.holdout_grids(features, held, chosen, workers=1)[0] for held, chosen in zip(folds, scored)])
    bank, threads = detector.index, set()
    together = threading.Barrier(2, timeout=10)  # the first two folds wait for each other: they must run at once
    holdout_bank = PatchCore.holdout_bank

    def recorded(self: PatchCore, holdout: torch.Tensor, workers: int | None = None) -> tuple:
        threads.add(threading.get_ident())
        if len(threads) <= 2 and int(holdout[0]) in {int(folds[0][0]), int(folds[1][0])}:
            together.wait()
        return holdout_bank(self, holdout, workers)

    monkeypatch.setattr(PatchCore, "holdout_bank", recorded)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    scores = detector.patch_crossfit(features, folds, scored)[1]
    assert len(threads) == 2 and detector.index is bank
    torch.testing.assert_close(scores, alone.float(), rtol=0, atol=0)


def test_the_stated_rate_check_fails_good_test_sets_like_the_training_goods_at_most_once_in_a_hundred() -> None:
    """Over many draws of 40 calibration and 25 test scores from one law, the check of the stated 1% fails at most 1% of
    the time: the threshold's own luck is counted (a binomial test at the stated rate fails 1.9% of these draws)."""
    rng = np.random.default_rng(0)
    draws, fails, shifted = 4000, 0, 0
    for _ in range(draws):
        check = check_stated_rate(calibrate(rng.gamma(3, size=40)), rng.gamma(3, size=25))
        fails += not check.holds
    for _ in range(400):  # the same parts scoring 1.5 standard deviations higher (a changed light, another product)
        shifted += not check_stated_rate(calibrate(rng.gamma(3, size=40)), rng.gamma(3, size=25) + 1.5 * 3 ** 0.5).holds
    assert fails / draws <= 0.01 and shifted / 400 >= 0.2


def test_the_stated_rate_check_says_how_far_the_good_test_images_lie_and_when_it_does_not_apply() -> None:
    training, test = np.arange(1.0, 100.0), np.arange(1.0, 100.0)[::4] + 30.0
    calibration = calibrate(training)
    check = check_stated_rate(calibration, test)
    assert check.flagged == int((test >= calibration.threshold).sum()) == 8 and not check.holds and check.p_value < 1e-5
    assert check.bias_sd == pytest.approx((training.mean() - test.mean()) / test.std())  # the benchmarks' calibration bias
    assert check.bias_se == pytest.approx(math.sqrt(1 / len(test) + training.var() / test.var() / len(training)))
    assert "more than the stated 1.0% allows" in check.message and "score higher than" in check.message
    alike = check_stated_rate(calibration, np.arange(1.0, 100.0)[::4])
    assert alike.holds and alike.flagged == 0 and "score like the cross-fitted training goods" in alike.message
    labelled = labelled_calibration(training, training + 200, 150.0, "manual", 150.0, calibration)
    assert check_stated_rate(labelled, test) is None and check_stated_rate(calibration, np.array([])) is None


def test_labels_that_rank_the_wrong_way_are_said_to_be_suspect() -> None:
    """Good and defective images given the wrong way round chose a threshold flagging every good part, with only the
    small-sample warning; now the warning asks whether the labels are swapped."""
    good, bad = np.arange(30.0, 60.0), np.arange(0.0, 30.0)
    swapped = labelled_calibration(good, bad, 10.0, "manual", 10.0, None)
    assert "are the labels swapped" in swapped.warning and "image AUROC 0.00" in swapped.warning
    right = labelled_calibration(bad, good, 30.0, "manual", 30.0, None)
    assert right.warning is None
    tied = labelled_calibration(np.full(25, 5.0), np.full(25, 5.0), 5.0, "manual", 5.0, None)  # AUROC 0.5: no claim
    assert tied.warning is None
