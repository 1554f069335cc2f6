"""The supervised instance detector: training, instances out, model files, augmentation and held-out folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defectscope import load_dataset
from defectscope.artifacts import load_model, save_model
from defectscope.detectors.instances import InstanceConfig, InstanceDetector, held_out_instances, instance_targets
from defectscope.errors import DefectscopeError
from defectscope.prediction import Detection, prediction_rows
from defectscope.predictor import check_predictor
from defectscope.training.augment import augment

SMALL = {"image_size": 96, "crop": None, "epochs": 3, "good_train": 4, "min_score": 0.0, "channels": 32}


@pytest.fixture(scope="module")
def trained(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[InstanceDetector, Path]:
    dataset = load_dataset(demo_root)
    detector = InstanceDetector(InstanceConfig(**SMALL))
    detector.fit_masks([*dataset.test, *dataset.train[:4]], dataset.defect_types)
    return detector, save_model(detector, tmp_path_factory.mktemp("detector") / "detector.dsmodel")


def test_detector_predicts_typed_instances_and_survives_its_model_file(trained, demo_root: Path) -> None:
    detector, path = trained
    dataset = load_dataset(demo_root)
    images = [s.path for s in dataset.test[::3]]
    prediction = detector.predict(images)
    assert prediction.detections is not None and len(prediction.detections) == len(images)
    found = [d for image in prediction.detections for d in image]
    assert found, "a detector with min_score 0 finds instances"
    for image_detections, image_map in zip(prediction.detections, prediction.maps):
        for d in image_detections:
            x0, y0, x1, y1 = d.box
            assert d.type in dataset.defect_types and 0 <= d.confidence <= 1
            assert 0 <= x0 <= x1 <= 128 and 0 <= y0 <= y1 <= 128
            assert d.mask.shape == image_map.shape == (128, 128) and d.mask.dtype == bool
    scores = [max((d.confidence for d in image), default=0.0) for image in prediction.detections]
    np.testing.assert_allclose(prediction.scores, scores, rtol=1e-6)  # an image scores its most confident instance
    check_predictor(detector, images[:3])
    loaded = load_model(path)
    assert loaded.config.types == dataset.defect_types
    again = loaded.predict(images)
    np.testing.assert_allclose(again.scores, prediction.scores, rtol=1e-5, atol=1e-6)
    assert [[d.type for d in image] for image in again.detections] == [[d.type for d in image] for image in prediction.detections]
    rows = prediction_rows(images, prediction)
    assert all(len(row["detections"]) == len(image) for row, image in zip(rows, prediction.detections))


def test_detection_masks_are_coco_rle(trained) -> None:
    from pycocotools import mask as coco_mask

    mask = np.zeros((7, 9), bool)
    mask[0, 0] = mask[2:5, 3:8] = mask[6, 8] = True
    encoded = Detection("scratch", 0.5, (0.0, 0.0, 9.0, 7.0), mask).to_dict()["mask"]
    decoded = coco_mask.decode(coco_mask.frPyObjects(encoded, *encoded["size"]))
    np.testing.assert_array_equal(decoded.astype(bool), mask)


def test_augmentation_moves_boxes_with_masks_and_pixels() -> None:
    """Flips and 90-degree turns move image and masks together; boxes are the augmented regions' bounds."""
    generator = torch.Generator().manual_seed(0)
    config = InstanceConfig()  # flips and 90-degree turns
    image = torch.zeros(16, 3, 24, 24)
    masks = torch.zeros(16, 2, 24, 24)
    image[:, :, 2:6, 3:11] = 1.0  # an 4 x 8 region of type 0 and a 5 x 3 region of type 1, off-centre
    masks[:, 0, 2:6, 3:11] = 1.0
    image[:, :, 15:20, 18:21] = 1.0
    masks[:, 1, 15:20, 18:21] = 1.0
    joint = augment(torch.cat([image, masks], 1), generator, config)
    assert len({tuple(j[3].nonzero()[0].tolist()) for j in joint}) > 4  # the batch got different transforms
    for moved in joint:
        targets = instance_targets(moved[3:] > 0.5, 1)
        assert targets["labels"].tolist() == [1, 2]
        bright = moved[0] > 0.5
        assert torch.equal(bright, targets["masks"].bool().any(0))  # pixels and masks moved together
        for box, region in zip(targets["boxes"], targets["masks"].bool()):
            rows, cols = region.nonzero(as_tuple=True)
            assert box.tolist() == [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]
        sizes = sorted(tuple(int(v) for v in (b[2] - b[0], b[3] - b[1])) for b in targets["boxes"])
        assert sizes in ([(3, 5), (8, 4)], [(4, 8), (5, 3)])  # (width, height): both turned, or neither


def test_held_out_instances_come_from_folds_that_never_saw_the_image(demo_root: Path) -> None:
    dataset = load_dataset(demo_root)
    held = held_out_instances(dataset, InstanceConfig(**{**SMALL, "epochs": 1, "folds": 2}))
    assert [s.path for s in held.samples] == [s.path for s in dataset.test]
    assert sorted(set(held.folds)) == [0, 1]
    for sample, fold in zip(held.samples, held.folds):
        assert str(sample.path) not in held.trained_on[fold]
    assert all(any(str(s.path) in trained for s in held.samples) for trained in held.trained_on)
    assert len(held.instances) == len(dataset.test) and held.infer_ms > 0


def test_detector_settings_are_checked() -> None:
    with pytest.raises(DefectscopeError, match="90-degree turns only"):
        InstanceConfig.from_dict({"rotate": 10.0})
    with pytest.raises(DefectscopeError, match="distinct defect type names"):
        InstanceConfig.from_dict({"types": ["a", "a"]})
    with pytest.raises(DefectscopeError, match="cannot be exported"):
        InstanceDetector().graph_scores(torch.zeros(1, 3, 32, 32))


def test_detector_attempt_writes_typed_metrics_a_model_labels_and_overlays(demo_root: Path, tmp_path: Path, cli) -> None:
    """`model: detector` in an experiment: held-out COCO AP per type, then a model file that predicts
    instances (--json, overlays) and labels images with its defect types."""
    from defectscope.experiments.config import load_experiment
    from defectscope.experiments.runner import run_experiment
    from defectscope.experiments.table import load_results

    config = tmp_path / "attempts.yaml"
    config.write_text("name: det\nmetric: mask_ap50\nattempts:\n"
                      "  - {name: det, model: detector, image_size: 64, crop: null, epochs: 1, folds: 2, good_train: 4,"
                      " min_score: 0.0, channels: 32}\n")
    out = tmp_path / "run"
    result = run_experiment(load_experiment(config), demo_root, out, say=lambda line: None)[0]
    dataset = load_dataset(demo_root)
    assert set(result["metrics"]["per_type"]) == {"overall", *dataset.defect_types}
    assert all(0 <= result["summary"][key] <= 1 for key in ("image_auroc", "box_ap", "box_ap50", "mask_ap", "mask_ap50"))
    assert len(result["metrics"]["folds"]) == 2 and set(result["spread"]["mask_ap50"]) == {"mean", "std"}
    from defectscope.experiments.table import build_table, markdown

    assert "mask AP50" in markdown(build_table(*load_results(out)))
    model = out / "det" / "model.dsmodel"
    assert load_model(model).config.types == dataset.defect_types

    labels = tmp_path / "labels"
    assert cli("export", "labels", demo_root, "-o", labels, "--format", "coco", "--from-model", model, "--threshold", "0.01").code == 0
    document = json.loads((labels / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in document["categories"]] == dataset.defect_types

    heatmaps = tmp_path / "heatmaps"
    run = cli("predict", model, dataset.test[0].path, "--json", "--heatmaps", heatmaps)
    assert run.code == 0, run.err
    row = json.loads(run.out.splitlines()[0])
    assert "detections" in row and all(set(d) == {"type", "confidence", "box", "area", "mask"} for d in row["detections"])
    assert len(list(heatmaps.glob("*.png"))) == 1


def test_a_diverged_detector_is_refused_not_silent(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN weights would find no instance and call every image good: training that ends there raises instead."""
    from defectscope.detectors import instances
    from defectscope.training.engine import History

    def diverge(network, *args, **kwargs) -> History:
        with torch.no_grad():
            next(p for p in network.parameters() if p.requires_grad).fill_(float("nan"))
        return History(train_loss=[float("nan")])

    monkeypatch.setattr(instances, "train", diverge)
    dataset = load_dataset(demo_root)
    with pytest.raises(DefectscopeError, match="not finite"):
        InstanceDetector(InstanceConfig(**SMALL)).fit_masks([*dataset.test[:6], *dataset.train[:2]], dataset.defect_types)


def test_non_finite_class_scores_become_errors_not_good(trained, demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    detector, _ = trained
    predictor = detector.network.roi_heads.box_predictor
    monkeypatch.setattr(predictor.cls_score, "forward", lambda x: torch.full((len(x), predictor.cls_score.out_features), float("nan")))
    prediction = detector.predict([s.path for s in load_dataset(demo_root).test[:3]])
    assert np.isnan(prediction.scores).all() and prediction.verdicts == ["error"] * 3
