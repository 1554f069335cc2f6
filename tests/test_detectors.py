"""Every detector separates generated defects; model files round-trip and reject bad files."""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope import artifacts
from defectscope.artifacts import load_model, save_model, set_threshold
from defectscope.data.layout import load_dataset
from defectscope.detectors import all_detectors, create_detector
from defectscope.errors import DefectscopeError
from defectscope.evaluation import evaluate
from defectscope.predictor import ContractBroken, check_predictor
from defectscope.calibration import Calibration

SMALL = {"image_size": 128, "crop": None}
SETTINGS = {  # patchcore: a 128-px frame, where 8-px patches are what the default 16 px are at 352 px
    "patchcore": {"coreset_ratio": 0.25, "patch_stride": 8}, "padim": {}, "knn": {}, "pca": {}, "ocsvm": {},
    "autoencoder": {"epochs": 25}, "augmented_autoencoder": {"epochs": 25}, "pretrained_autoencoder": {"epochs": 25},
    "vae": {"epochs": 25},
}
FLOORS = {"patchcore": 0.9, "padim": 0.9}  # image AUROC; the others must clear 0.6


@pytest.fixture(scope="module")
def fitted(demo_root: Path) -> dict:
    dataset = load_dataset(demo_root)
    models = {}
    for name, extra in SETTINGS.items():
        detector = create_detector(name, **SMALL, **extra)
        detector.fit([s.path for s in dataset.train])
        models[name] = detector
    return {"dataset": dataset, "models": models}


def test_registry_is_complete() -> None:
    # the segmenter and the instance detector learn from masks: tests/test_segmenter.py, tests/test_instances.py
    assert set(all_detectors()) == set(SETTINGS) | {"segmenter", "detector"}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_detector_separates_generated_defects(fitted: dict, name: str) -> None:
    metrics = evaluate(fitted["models"][name], fitted["dataset"]).metrics
    assert metrics["image_auroc"] >= FLOORS.get(name, 0.6), metrics
    if name in ("patchcore", "padim"):
        assert metrics["pixel_auroc"] >= 0.9 and metrics["aupro"] >= 0.6, metrics
    elif name == "vae":  # its 128-d code blurs every reconstruction: only image-level separation in 25 epochs
        assert "pixel_auroc" in metrics
    elif fitted["models"][name].localizes:
        assert metrics["pixel_auroc"] >= 0.6, metrics
    else:
        assert "pixel_auroc" not in metrics and any("pixel metrics do not apply" in n for n in metrics["notes"])


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_detector_keeps_the_predictor_contract(fitted: dict, name: str) -> None:
    check_predictor(fitted["models"][name], [s.path for s in fitted["dataset"].test[::6]])


def test_the_contract_check_names_a_breach(fitted: dict) -> None:
    detector = fitted["models"]["knn"]
    images = [s.path for s in fitted["dataset"].test[:3]]
    broken = copy.copy(detector)
    broken.score_frames = lambda batch: type(detector).score_frames(detector, batch).scores  # the old bare tuple/array
    with pytest.raises(ContractBroken, match="not Scored"):
        check_predictor(broken, images)
    hopeful = copy.copy(detector)
    hopeful.predict = lambda paths, **kw: replace(detector.predict(paths, **kw), scores=np.nan_to_num(
        detector.predict(paths, **kw).scores))  # an unreadable image scored 0.0: "good"
    with pytest.raises(ContractBroken, match="unreadable image"):
        check_predictor(hopeful, images)


def test_patchcore_threshold_and_maps_at_original_size(fitted: dict) -> None:
    detector = fitted["models"]["patchcore"]
    assert detector.calibration is not None and detector.calibration.good_count == 40  # every image, cross-fitted
    test = fitted["dataset"].test
    prediction = detector.predict([test[0].path, test[-1].path])
    assert [m.shape for m in prediction.maps] == [(128, 128), (128, 128)]
    assert prediction.verdicts == ["defective" if n >= 1 else "good" for n in prediction.scores / detector.calibration.threshold]
    assert detector.predict([test[0].path], map_size=(40, 50)).maps[0].shape == (40, 50)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_model_file_round_trip_gives_identical_scores(fitted: dict, name: str, tmp_path: Path) -> None:
    detector = fitted["models"][name]
    paths = [s.path for s in fitted["dataset"].test[::5]]
    path = save_model(detector, tmp_path / f"{name}.dsmodel")
    loaded = load_model(path)
    before, after = detector.predict(paths), loaded.predict(paths)
    np.testing.assert_array_equal(before.scores, after.scores)
    assert loaded.calibration == detector.calibration
    assert b"pickle" not in path.read_bytes()[:200] and not list(tmp_path.glob(".*.tmp"))


def test_bad_model_files_are_rejected(fitted: dict, tmp_path: Path) -> None:
    good = save_model(fitted["models"]["knn"], tmp_path / "knn.dsmodel")
    data = good.read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "corrupt or truncated"),
        "tiny": (data[:5], "too short"),
        "foreign": (b"PK\x03\x04" + b"\0" * 64, "not a defectscope model file"),
    }
    header_size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_size])
    manifest = json.loads(header["__metadata__"]["defectscope"])
    manifest["format_version"] = artifacts.FORMAT_VERSION + 1
    header["__metadata__"]["defectscope"] = json.dumps(manifest)
    newer = json.dumps(header).encode()
    newer += b" " * (-len(newer) % 8)
    cases["newer"] = (struct.pack("<Q", len(newer)) + newer + data[8 + header_size :], "newer than this defectscope")
    for label, (content, message) in cases.items():
        target = tmp_path / f"{label}.dsmodel"
        target.write_bytes(content)
        with pytest.raises(DefectscopeError, match=message):
            load_model(target)
    with pytest.raises(DefectscopeError, match="does not exist"):
        load_model(tmp_path / "absent.dsmodel")


def test_set_threshold_rewrites_only_the_threshold(fitted: dict, tmp_path: Path) -> None:
    path = save_model(fitted["models"]["pca"], tmp_path / "pca.dsmodel")
    set_threshold(path, Calibration(1.5, "f1", 0.9, 0.0, 0.0, 0))
    loaded = load_model(path)
    assert loaded.calibration.threshold == 1.5
    np.testing.assert_array_equal(loaded.tensors()["components"], fitted["models"]["pca"].tensors()["components"])


def test_unknown_model_and_field() -> None:
    with pytest.raises(DefectscopeError, match="unknown model 'nope'"):
        create_detector("nope")
    with pytest.raises(DefectscopeError, match="unknown field"):
        create_detector("patchcore", coreset=0.1)


def test_finished_maps_match_torch_upsampling_and_torchvision_blur() -> None:
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.functional import gaussian_blur

    from defectscope.detectors.base import finish_maps

    grid = torch.rand(2, 10, 13, generator=torch.Generator().manual_seed(0))
    upsampled = F.interpolate(grid[:, None], size=(64, 80), mode="bilinear", align_corners=False)
    expected = gaussian_blur(upsampled, kernel_size=33, sigma=4.0)[:, 0]
    torch.testing.assert_close(finish_maps(grid, (64, 80)), expected, atol=1e-5, rtol=1e-5)


def test_map_resizing_without_opencv_gives_opencvs_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from defectscope import maps

    frames = np.random.default_rng(0).random((2, 40, 52), dtype=np.float32)
    for size in ((100, 130), (21, 17), (40, 52)):
        with_opencv = maps.resize_maps(frames, size)
        monkeypatch.setattr(maps, "cv2", None)
        np.testing.assert_allclose(maps.resize_maps(frames, size), with_opencv, atol=1e-6)
        monkeypatch.undo()


def test_patchcore_holdout_grids_exclude_the_images_own_patches() -> None:
    import torch

    from defectscope.detectors.patchcore import PatchCore, PatchCoreConfig

    features = torch.randn(6, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    detector = PatchCore(PatchCoreConfig(image_size=32, crop=None, coreset_ratio=0.5))
    detector.fit_features(features)
    holdout = torch.tensor([1, 3])
    patches = features.reshape(-1, 8)
    sources = torch.arange(6).repeat_interleave(16)
    assert torch.isin(detector.bank_sources, holdout).any()  # the held-out images did contribute patches
    kept, rows_from = detector.holdout_bank(holdout)
    kept = kept.bank
    assert not torch.isin(rows_from, holdout).any()
    for row, image in enumerate(holdout.tolist()):
        own = patches[sources == image]
        brute = torch.cdist(own, kept).min(1).values.max()
        assert torch.isclose(detector.holdout_grids(features, holdout)[0][row], brute, rtol=1e-4)
    # the fitted bank itself is untouched
    assert len(detector.index.bank) == 48


def _padim_fitted_on_random_features() -> tuple:
    import torch

    from defectscope.detectors.padim import PaDiM, PaDiMConfig

    features = torch.randn(12, 256, 6, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 3, 6)  # 16 x 16 grid, two fitting chunks
    detector = PaDiM(PaDiMConfig(image_size=40, crop=None))
    detector.fit_features(features)
    return detector, features


def test_padim_scores_are_mahalanobis_distances() -> None:
    import torch

    detector, features = _padim_fitted_on_random_features()
    queries = torch.randn(3, 256, 6, generator=torch.Generator().manual_seed(1))
    _, grid = detector.score_features(queries)
    data = features.double()
    delta = queries.double() - data.mean(0)
    centred = (data - data.mean(0)).transpose(0, 1)
    covariance = centred.mT @ centred / (len(data) - 1) + detector.config.regularization * torch.eye(6)
    expected = torch.einsum("npd,pde,npe->np", delta, torch.linalg.inv(covariance), delta).sqrt()
    # precisions are kept in float16: about three significant digits
    torch.testing.assert_close(grid.reshape(3, -1).double(), expected, rtol=2e-3, atol=1e-3)


def test_padim_holdout_scores_equal_a_model_refitted_without_them() -> None:
    import torch

    from defectscope.detectors.base import Detector

    detector, features = _padim_fitted_on_random_features()
    holdout = torch.tensor([2, 7, 9])
    chunked = detector.holdout_scores(features, holdout)
    refitted = Detector.holdout_scores(detector, features, holdout)  # generic path: a second full model
    torch.testing.assert_close(chunked, refitted)


def test_padim_rejects_a_regularization_float16_cannot_hold() -> None:
    import torch

    from defectscope.detectors.padim import PaDiM, PaDiMConfig

    with pytest.raises(DefectscopeError, match="regularization must be at least"):
        PaDiM(PaDiMConfig(regularization=1e-6)).fit_features(torch.randn(4, 9, 3))


def test_patchcore_memory_stops_growing_at_its_limit() -> None:
    import torch

    from defectscope.detectors.patchcore import PatchCore, PatchCoreConfig

    features = torch.randn(40, 8, 8, 16, generator=torch.Generator().manual_seed(1))  # 2560 patches: 10% would be 256
    unlimited = PatchCore(PatchCoreConfig(image_size=32, crop=None, calibration_folds=4))
    assert unlimited.fit_features(features)["memory_bank"] == 256
    limited = PatchCore(PatchCoreConfig(image_size=32, crop=None, calibration_folds=4, memory_limit=100))
    details = limited.fit_features(features)
    assert details["memory_bank"] == len(limited.index.bank) == 100 and details["coreset_ratio"] == 100 / 2560


def test_patchcore_reweighting_damps_scores(fitted: dict) -> None:
    from defectscope.detectors.patchcore import PatchCore

    plain = fitted["models"]["patchcore"]
    reweighted = PatchCore(plain.config.__class__(**{**plain.config.to_dict(), "reweight": True}), plain.backbone)
    reweighted.index = plain.index
    paths = [s.path for s in fitted["dataset"].test[::4]]
    raw, damped = plain.predict(paths, map_size="input").scores, reweighted.predict(paths, map_size="input").scores
    assert np.all(damped > 0) and np.all(damped <= raw) and np.any(damped < raw)  # weight is 1 when neighbours are far


def test_evaluation_without_masks_skips_pixel_metrics_and_says_so(fitted: dict, demo_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "part"
    shutil.copytree(demo_root / "train" / "good", root / "good")
    shutil.copytree(demo_root / "test" / "broken", root / "broken")  # plain layout, no masks folder
    dataset = load_dataset(root)
    assert not dataset.has_masks
    metrics = evaluate(fitted["models"]["patchcore"], dataset).metrics
    assert "pixel_auroc" not in metrics and "aupro" not in metrics
    assert any("no mask" in note for note in metrics["notes"])
    assert metrics["good"] == 8 and metrics["defective"] == 8


def test_evaluation_says_which_defects_its_frame_cannot_see(fitted: dict, demo_root: Path, tmp_path: Path) -> None:
    """A defect the crop leaves out of the frame was counted like any miss, with nothing saying no model of that frame
    could find it."""
    import shutil

    import cv2

    root = tmp_path / "part"
    shutil.copytree(demo_root, root)
    mask = sorted((root / "ground_truth" / "scratch").iterdir())[0]
    corner = np.zeros(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE).shape, np.uint8)
    corner[:4, :4] = 255  # the defect at the very corner, where a centre crop cuts it away
    cv2.imwrite(str(mask), corner)
    cropped = create_detector("patchcore", image_size=64, crop=48, coreset_ratio=0.25)
    cropped.fit([s.path for s in fitted["dataset"].train])
    notes = evaluate(cropped, load_dataset(root)).metrics["notes"]
    assert any("1 defective test image(s) show none of their masked pixels" in note and mask.stem.split("_")[0] in note
               for note in notes), notes


def test_a_type_without_masks_leaves_only_itself_out_of_pixel_metrics(fitted: dict, demo_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "part"
    shutil.copytree(demo_root, root)
    shutil.rmtree(root / "ground_truth" / "contamination")
    metrics = evaluate(fitted["models"]["patchcore"], load_dataset(root)).metrics
    assert "pixel_auroc" in metrics and "aupro" in metrics
    assert {"pixel_auroc", "aupro"} <= set(metrics["per_defect"]["broken"]) and "aupro" in metrics["per_defect"]["scratch"]
    assert "pixel_auroc" not in metrics["per_defect"]["contamination"]
    assert any("no mask for every image of contamination" in note for note in metrics["notes"])


def test_model_files_get_normal_permissions(fitted: dict, tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        path = save_model(fitted["models"]["knn"], tmp_path / "knn.dsmodel")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["autoencoder", "vae"])
def test_reconstruction_history_and_test_loss(fitted: dict, name: str) -> None:
    detector = fitted["models"][name]
    history = detector.history
    assert len(history.train_loss) == 25 and len(history.val_loss) == 25
    assert history.train_loss[-1] < history.train_loss[0] / 2
    assert detector.train_summary["fit"]["train_loss"] == history.train_loss[-1]
    test = [s.path for s in fitted["dataset"].test]
    assert detector.mean_loss(test) > 0
    assert detector.calibration is not None and detector.calibration.good_count == 4  # the validation images


def test_pretrained_autoencoder_stores_only_what_it_learned(fitted: dict, tmp_path: Path) -> None:
    frozen = fitted["models"]["pretrained_autoencoder"]
    assert not any(k.startswith("encoder.") for k in frozen.tensors())
    tuned = create_detector("pretrained_autoencoder", **SMALL, epochs=1, freeze_encoder=False)
    tuned.fit([s.path for s in fitted["dataset"].train[:12]])
    assert any(k.startswith("encoder.") for k in tuned.tensors())
    path = save_model(tuned, tmp_path / "tuned.dsmodel")
    paths = [s.path for s in fitted["dataset"].test[:3]]
    np.testing.assert_array_equal(load_model(path).predict(paths).scores, tuned.predict(paths).scores)


def test_reconstruction_settings_are_checked() -> None:
    with pytest.raises(DefectscopeError, match="optimizer must be one of"):
        create_detector("autoencoder", optimizer="lbfgs")
    with pytest.raises(DefectscopeError, match="divisible by 16"):
        create_detector("autoencoder", image_size=120)
    with pytest.raises(DefectscopeError, match="field 'epochs' must be int"):
        create_detector("vae", epochs="ten")


@pytest.mark.parametrize(("field", "value"), [("neighbourhood", 999), ("neighbourhood", 17), ("layer_dim", 10**6),
                                            ("projection_dim", 10**6), ("reweight_neighbours", 10**6)])
def test_patchcore_settings_that_only_grow_a_fit_are_refused(field: str, value: int) -> None:
    """neighbourhood: 999 pooled with a 24 GiB kernel, and the fit was killed by the kernel's OOM killer."""
    with pytest.raises(DefectscopeError, match=f"field '{field}' must be"):
        create_detector("patchcore", **{field: value})


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_non_square_products_keep_their_aspect_through_fit_and_model_files(demo_root: Path, tmp_path: Path, name: str) -> None:
    from defectscope.data.decode import read_image

    wide = [read_image(s.path)[16:112] for s in load_dataset(demo_root).train[:12]]  # 96 x 128: 3:4
    detector = create_detector(name, image_size=64, crop=None)
    detector.fit(wide)
    assert detector.preprocess.input_shape == (64, 80)  # short side 64, long side 64 * 4/3 rounded to 16 px
    prediction = detector.predict(wide[:2])
    assert prediction.maps[0].shape == (96, 128)
    loaded = load_model(save_model(detector, tmp_path / "wide.dsmodel"))
    assert loaded.preprocess == detector.preprocess
    np.testing.assert_allclose(loaded.predict(wide[:2]).scores, prediction.scores, rtol=1e-5)
    square = create_detector(name, image_size=64, crop=None, keep_aspect=False)
    square.fit(wide)
    assert square.preprocess.input_shape == (64, 64)


def test_patch_stride_averages_the_finest_cells_in_windows() -> None:
    from defectscope.detectors.patchcore import patch_embedding

    generator = torch.Generator().manual_seed(0)
    maps = {8: torch.randn(2, 6, 5, 7, generator=generator), 16: torch.randn(2, 10, 3, 4, generator=generator)}
    fine = patch_embedding(maps, 3, 8)
    coarse = patch_embedding(maps, 3, 8, patch_stride=16)
    assert fine.shape == (2, 5, 7, 16) and coarse.shape == (2, 3, 4, 16)
    torch.testing.assert_close(coarse[:, 0, 0], fine[:, 0:2, 0:2].mean((1, 2)))
    torch.testing.assert_close(coarse[:, 1, 2], fine[:, 2:4, 4:6].mean((1, 2)))
    torch.testing.assert_close(coarse[:, 2, 3], fine[:, 4, 6])  # the corner window holds one cell
    with pytest.raises(DefectscopeError, match="patch_stride"):
        create_detector("patchcore", patch_stride=12)


def test_images_per_backbone_pass_do_not_change_the_model(demo_root: Path) -> None:
    """PatchCore passes 16 images at a time (its fit's memory peak); any batch size learns the same model."""
    images = [s.path for s in load_dataset(demo_root).train][:24]
    assert create_detector("patchcore").config.batch_size == 16
    settings = {**SMALL, **SETTINGS["patchcore"], "global_view": "on", "threshold_method": "sigma"}
    models = [create_detector("patchcore", **settings, batch_size=size) for size in (5, 32)]
    for model in models:
        model.fit(images)
    for model in models[1:]:
        torch.testing.assert_close(model.index.bank, models[0].index.bank, rtol=1e-5, atol=1e-5)
        assert model.calibration.threshold == pytest.approx(models[0].calibration.threshold, rel=1e-5)


@pytest.mark.parametrize("patch_stride", [8, 16])
def test_patchcore_map_peak_lands_on_the_defect_in_a_cropped_non_square_frame(patch_stride: int) -> None:
    rng = np.random.default_rng(0)
    good = [np.repeat(rng.integers(90, 110, (96, 128, 1), dtype=np.uint8), 3, axis=2) for _ in range(8)]
    defective = good[0].copy()
    defective[52:68, 24:40] = 255  # centre (60, 32) of a 96 x 128 image
    detector = create_detector("patchcore", image_size=128, crop=112, patch_stride=patch_stride, calibration_folds=4)
    detector.fit(good)
    assert detector.preprocess.input_shape == (112, 160)
    prediction = detector.predict([defective, good[1]])
    peak = np.unravel_index(np.argmax(prediction.maps[0]), prediction.maps[0].shape)
    assert prediction.maps[0].shape == (96, 128)
    assert abs(peak[0] - 60) <= 6 and abs(peak[1] - 32) <= 6, peak
    assert prediction.scores[0] > 2 * prediction.scores[1]


def test_fit_shows_each_phase_and_fills_each_bar(demo_root: Path) -> None:
    from contextlib import contextmanager

    from defectscope.pipeline import fit_detector

    bars: list[dict] = []

    @contextmanager
    def bar(name: str, total: int | None):
        shown = {"name": name, "total": total, "done": 0}
        bars.append(shown)
        yield lambda steps: shown.__setitem__("done", shown["done"] + steps)

    settings = {"image_size": 128, "crop": None, "coreset_ratio": 0.25, "calibration_folds": 4, "global_view": "off"}
    fit_detector(load_dataset(demo_root), "patchcore", settings, bar=bar)
    assert [b["name"].split(":")[0].split(" ")[0] for b in bars] == ["fitting", "learning", "coreset", "calibrating"]
    assert bars[0]["name"] == "fitting patchcore: embedding 40 images" and bars[3]["name"] == "calibrating on 4 cross-fitted folds"
    assert all(b["done"] == b["total"] for b in bars if b["total"] is not None) and bars[2]["total"] > 1


def test_patchcore_with_rotations_knows_a_part_turned_and_still_sees_a_defect() -> None:
    """Good parts that all lie one way: the memory with `rotations` holds their turns (each the patches of the
    turned frame), so the part turned by a quarter passes; without it, it does not. The defect is still caught."""
    rng = np.random.default_rng(0)

    def part(turn: int = 0) -> np.ndarray:
        image = rng.integers(95, 105, (128, 128, 1), dtype=np.uint8).repeat(3, axis=2)
        image[20:36, 16:112], image[36:80, 16:32] = 30, 30  # an L: a long bar and a short leg
        return np.ascontiguousarray(np.rot90(image, turn))

    good, turned, defective = [part() for _ in range(12)], part(1), part()
    defective[90:102, 70:82] = 250
    settings = {"image_size": 128, "crop": None, "patch_stride": 8, "coreset_ratio": 0.5, "calibration_folds": 4,
                "place_view": "off"}
    plain, turning = create_detector("patchcore", **settings, global_view="off"), create_detector("patchcore", **settings, rotations=True)
    for detector in (plain, turning):
        detector.fit(good)
    assert turning.train_summary["fit"]["turns"] == 3 and plain.train_summary["fit"]["turns"] == 0
    assert turning.config.global_view == "off"  # "auto" with rotations: a part at any turn has no layout to learn
    assert plain.predict([turned]).verdicts == ["defective"]
    scores = turning.predict([turned, defective]).scores
    assert scores[0] < turning.calibration.threshold < scores[1]
    batch = torch.from_numpy(np.stack([good[0], turned]).transpose(0, 3, 1, 2).copy()).float() / 255
    with torch.inference_mode():
        features, quarter = turning.embed_turned(batch), turning.embed(torch.rot90(batch, 1, (-2, -1)))
    assert features.turned.shape[:2] == (2, 3)
    torch.testing.assert_close(features.turned[:, 0], quarter.patches)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_detector_fits_on_as_few_images_as_it_says_and_refuses_fewer(demo_root: Path, name: str) -> None:
    """PCA and the one-class SVM crashed with scikit-learn's error on two images (a calibration fold's refit on one
    image divided by a NaN spread), k-NN blamed a learning rate; each model kind now states the images it needs."""
    images = [s.path for s in load_dataset(demo_root).train]
    settings = {**SETTINGS[name], **({"epochs": 2} if "epochs" in SETTINGS[name] else {})}
    detector = create_detector(name, **SMALL, **settings)
    with pytest.raises(DefectscopeError, match=f"{name} needs at least {detector.min_images} good images"):
        detector.fit(images[:detector.min_images - 1])
    detector.fit(images[:detector.min_images])
    assert np.isfinite(detector.calibration_scores.numpy()).all() and np.isfinite(detector.predict(images[:2]).scores).all()


@pytest.mark.parametrize("name", ["knn", "pca", "ocsvm", "padim"])
def test_images_all_alike_fit_and_judge_with_finite_normalized_scores(demo_root: Path, tmp_path: Path, name: str,
                                                                      recwarn: pytest.WarningsRecorder) -> None:
    """Five copies of one image: the one-class SVM divided by their zero variance (ZeroDivisionError), PCA filled the
    output with scikit-learn's RuntimeWarnings, and a threshold at the smallest float made normalized scores infinite."""
    import shutil

    train = [s.path for s in load_dataset(demo_root).train]
    copies = []
    for i in range(5):
        copies.append(tmp_path / f"{i}.png")
        shutil.copy(train[0], copies[-1])
    detector = create_detector(name, **SMALL, **SETTINGS[name])
    detector.fit(copies)
    assert detector.calibration.threshold >= 1e-6 and "all the same" in detector.calibration.warning
    prediction = detector.predict([copies[0], train[1]])
    assert list(prediction.verdicts) == ["good", "defective"] and np.isfinite(prediction.normalized).all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_an_image_size_given_alone_keeps_the_default_frames_margin(demo_root, tmp_path, cli) -> None:
    """`fit --image-size 288` was refused ("crop must be in [16, 288], got 320": a crop nobody gave), and
    `--image-size 400` cropped 40 px of every border away unseen; now the crop keeps the default's margin."""
    from defectscope.detectors.patchcore import PatchCoreConfig
    from defectscope.model_header import model_info

    assert [PatchCoreConfig.from_dict({"image_size": size}).crop for size in (288, 400, 416, 40)] == [256, 368, 384, None]
    assert PatchCoreConfig.from_dict({"image_size": 288, "crop": None}).crop is None  # a crop given stays as given
    assert create_detector("padim", image_size=160).config.crop == 128  # 256 -> 224: the same margin of 32
    fitted = cli("fit", demo_root, "--image-size", "96", "-o", tmp_path / "part.dsmodel")
    assert fitted.code == 0, fitted.err
    assert (model_info(tmp_path / "part.dsmodel")["config"]["crop"], model_info(tmp_path / "part.dsmodel")["config"][
        "image_size"]) == (64, 96)
