"""Teaching a fitted model new good images without a refit (`defectscope update`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defectscope import load_dataset
from defectscope.artifacts import load_model, model_info, save_model
from defectscope.detectors.base import create_detector

SMALL = {"image_size": 128, "crop": None, "coreset_ratio": 0.25, "patch_stride": 8}  # 8-px patches in a 128-px frame


def _with_new_fixture(source: Path, target: Path) -> Path:
    """A good part photographed with a new, harmless fixture in the corner (a bar the model never saw)."""
    image = cv2.imread(str(source))
    image[6:22, 8:56] = (230, 90, 30)  # BGR: a blue bar; no defect of the demo part is blue
    cv2.imwrite(str(target), image)
    return target


@pytest.fixture(scope="module")
def taught(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    dataset = load_dataset(demo_root)
    folder = tmp_path_factory.mktemp("update")
    detector = create_detector("patchcore", **SMALL)
    detector.fit([s.path for s in dataset.train])
    model = save_model(detector, folder / "parent.dsmodel")
    goods = [s.path for s in dataset.test if s.label == 0]
    variants = [_with_new_fixture(p, folder / f"variant{i}.png") for i, p in enumerate(goods[:5])]
    return {"dataset": dataset, "model": model, "detector": detector, "variants": variants, "folder": folder}


def test_taught_false_alarms_pass_and_defects_stay_flagged(taught: dict, demo_root: Path, cli) -> None:
    detector, variants = taught["detector"], taught["variants"]
    defective = [s.path for s in taught["dataset"].test if s.label == 1]
    before = detector.predict(variants + defective, map_size="input")
    assert (before.scores[: len(variants)] > before.threshold).all()  # the new fixture is a false alarm today
    flagged = before.scores[len(variants) :] > before.threshold
    assert flagged.mean() > 0.7
    out = taught["folder"] / "child.dsmodel"
    taught_images = ["--good", variants[0], "--good", variants[1], "--good", variants[2]]
    refused = cli("update", taught["model"], *taught_images, "-o", out)  # a new fixture scores far above the threshold
    assert refused.code == 2 and "--accept-defect-like" in refused.err and not out.exists()
    result = cli("update", taught["model"], *taught_images, "--accept-defect-like", "--check", demo_root, "-o", out)
    assert result.code == 0, result.err
    assert "at your request" in result.err
    child = load_model(out)
    after = child.predict(variants + defective, map_size="input")
    assert (after.scores[:3] < after.threshold).all()  # the taught images
    assert (after.scores[3:5] < after.threshold).all()  # and parts like them that it never saw
    assert (after.scores[len(variants) :][flagged] > after.threshold).all()  # every defect flagged before still is
    lineage = model_info(out)["train_summary"]["taught"][-1]
    assert lineage["images"] == 3 and lineage["taught_images"] == [str(v) for v in variants[:3]]
    assert len(lineage["parent_sha256"]) == 64 and lineage["patches_added"] > 0
    assert child.calibration_scores.numel() == detector.calibration_scores.numel() + 3
    assert child.map_scores.numel() == detector.map_scores.numel() + 3  # the map's own good scores learn them too
    assert child.calibration.map_threshold <= detector.calibration.map_threshold  # and its level never rises


def test_padim_with_covariances_updates_like_a_refit(taught: dict, tmp_path: Path) -> None:
    dataset, variants = taught["dataset"], taught["variants"]
    train = [s.path for s in dataset.train]
    settings = {"image_size": 128, "crop": None, "keep_covariance": True}
    updated = create_detector("padim", **settings)
    updated.fit(train)
    before = updated.predict(variants, map_size="input")
    assert (before.scores > before.threshold).all()  # the new fixture is a false alarm
    updated = load_model(save_model(updated, tmp_path / "padim.dsmodel"))  # the covariances travel in the file
    updated.teach(variants[:3])
    refit = create_detector("padim", **settings)
    refit.fit(train + variants[:3])
    torch.testing.assert_close(updated.mean, refit.mean, rtol=1e-4, atol=1e-4)
    after, again = updated.predict(variants, map_size="input"), refit.predict(variants, map_size="input")
    np.testing.assert_allclose(after.scores, again.scores, rtol=0.02)  # float16 factors: a refit up to their rounding (~1-2%)
    assert (after.scores < before.scores).all() and after.threshold <= before.threshold


def test_models_that_need_a_refit_say_so(demo_root: Path, tmp_path: Path, cli) -> None:
    dataset = load_dataset(demo_root)
    detector = create_detector("padim", **{k: SMALL[k] for k in ("image_size", "crop")})
    detector.fit([s.path for s in dataset.train])
    model = save_model(detector, tmp_path / "padim.dsmodel")
    result = cli("update", model, "--good", dataset.test[0].path, "-o", tmp_path / "new.dsmodel")
    assert result.code == 2 and "without a refit" in result.err and "keep_covariance" in result.err
    assert not (tmp_path / "new.dsmodel").exists()


def test_update_refuses_to_overwrite_a_file_that_is_not_a_model(taught: dict, cli) -> None:
    precious = taught["folder"] / "notes.dsmodel"
    precious.write_text("not a model")
    result = cli("update", taught["model"], "--good", taught["variants"][0], "-o", precious)
    assert result.code == 2 and precious.read_text() == "not a model"


def _copies(paths: list[Path], folder: Path) -> list[Path]:
    """Copies of images with one pixel changed: other files (other sha256) that look the same."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, path in enumerate(paths):
        image = cv2.imread(str(path))
        image[0, 0] = 255 - image[0, 0]
        cv2.imwrite(str(folder / f"copy{i}.png"), image)
        copies.append(folder / f"copy{i}.png")
    return copies


def test_update_never_teaches_a_labelled_defect(taught: dict, demo_root: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "child.dsmodel"
    defect_folder = next(p for p in sorted((demo_root / "test").iterdir()) if p.name != "good")
    result = cli("update", taught["model"], "--good", defect_folder, "--check", demo_root, "-o", out)
    assert result.code == 2 and "labelled defective" in result.err and not out.exists()
    result = cli("update", taught["model"], "--good", defect_folder, "--defective", defect_folder, "-o", out)
    assert result.code == 2 and "labelled defective" in result.err and not out.exists()


def test_update_refuses_defect_like_images_and_lost_defects(taught: dict, demo_root: Path, tmp_path: Path, cli) -> None:
    defective = [s.path for s in taught["dataset"].test if s.label == 1]
    copies = _copies(defective, tmp_path / "looks-good")  # not labelled: only their scores give them away
    out = tmp_path / "child.dsmodel"
    result = cli("update", taught["model"], "--good", tmp_path / "looks-good", "-o", out)
    assert result.code == 2 and "look defective" in result.err and "--accept-defect-like" in result.err
    assert not out.exists()
    result = cli("update", taught["model"], "--good", tmp_path / "looks-good", "--accept-defect-like", "--check", demo_root,
                 "-o", out)
    assert result.code == 2 and "would pass as good" in result.err and not out.exists()
    result = cli("update", taught["model"], "--good", tmp_path / "looks-good", "--accept-defect-like", "--accept-misses",
                 "--check", demo_root, "-o", out)
    assert result.code == 0 and "at your request" in result.err and out.is_file()
    lineage = model_info(out)["train_summary"]["taught"][-1]
    assert lineage["checked_defects"] == len(defective) and lineage["missed_after"] > 0
    assert len(copies) == lineage["images"]


def test_teaching_keeps_a_threshold_chosen_with_labels(taught: dict, demo_root: Path, tmp_path: Path, cli) -> None:
    """A threshold set for a target recall was replaced, after teaching one image, by the good-only threshold of the
    model's settings (33.2 -> 24.3 on the demo: a quarter lower, more parts flagged), and nothing said so."""
    labelled = tmp_path / "labelled.dsmodel"
    defects = [p for s in ("broken", "scratch") for p in ("--defective", demo_root / "test" / s)]
    assert cli("calibrate", taught["model"], "--good", demo_root / "test" / "good", *defects, "--target-recall", "0.5",
               "-o", labelled).code == 0
    chosen = load_model(labelled).calibration
    assert chosen.method == "recall" and chosen.threshold > load_model(taught["model"]).calibration.threshold
    good = sorted((demo_root / "test" / "good").iterdir())[5]  # an ordinary good part: it lowers no good-only rule
    updated = cli("update", labelled, "--good", good, "-o", tmp_path / "taught.dsmodel")
    assert updated.code == 0 and "chosen with labelled images (recall) and is kept" in updated.err, updated.err
    kept = load_model(tmp_path / "taught.dsmodel").calibration
    assert (kept.method, kept.threshold, kept.param) == (chosen.method, chosen.threshold, chosen.param)
