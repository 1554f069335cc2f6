"""The supervised segmenter: learns masks, round-trips through a model file, k-fold maps are held out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from defectscope.artifacts import load_model, save_model
from defectscope.data.layout import load_dataset
from defectscope.detectors import Detector, create_detector, good_only_models
from defectscope.detectors.segmenter import SegmenterConfig, dice_bce, held_out_maps
from defectscope.metrics import pixel_auroc
from defectscope.predictor import check_predictor
from defectscope.service.app import create_app
from defectscope.service.models import load_served

SMALL = {"image_size": 128, "crop": None, "epochs": 10, "lr": 3e-3}


def test_dice_bce_by_hand() -> None:
    logits, masks = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]])
    p = torch.sigmoid(logits)
    bce = -(torch.log(1 - p[0, 0]) + torch.log(p[0, 1])) / 2
    dice = (2 * p[0, 1] + 1) / (p.sum() + 1 + 1)
    assert float(dice_bce(logits, masks, 1.0)) == pytest.approx(float(bce + 1 - dice), rel=1e-6)


def test_segmenter_learns_masks_and_round_trips(demo_root: Path, tmp_path: Path) -> None:
    dataset = load_dataset(demo_root)
    segmenter = create_detector("segmenter", **SMALL, hflip=True)
    assert not isinstance(segmenter, Detector) and "segmenter" not in good_only_models()  # it learns from masks
    history = segmenter.fit_masks(list(dataset.test) + list(dataset.train[:8]))
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert not any(k.startswith("encoder.network._conv_stem") for k in segmenter.tensors())  # frozen part not stored
    assert any(k.startswith("encoder.network._blocks") for k in segmenter.tensors())  # fine-tuned stages are
    paths = [s.path for s in dataset.test[::4]]
    path = save_model(segmenter, tmp_path / "seg.dsmodel")
    np.testing.assert_array_equal(load_model(path).predict(paths).scores, segmenter.predict(paths).scores)


def test_held_out_maps_separate_defects(demo_root: Path) -> None:
    dataset = load_dataset(demo_root)
    config = SegmenterConfig(**SMALL, folds=2, good_train=8, freeze=16)
    maps, folds, _ = held_out_maps(dataset, config)
    assert maps.shape == (len(dataset.test), 128, 128) and set(folds) == {0, 1}
    from defectscope.data.decode import read_mask

    masks = np.stack([read_mask(s.mask) if s.mask else np.zeros((128, 128), bool) for s in dataset.test])
    assert pixel_auroc(masks, maps) > 0.8, pixel_auroc(masks, maps)


def test_per_type_segmenter_has_a_channel_per_defect_type_and_types_its_regions(demo_root: Path, tmp_path: Path) -> None:
    dataset = load_dataset(demo_root)
    segmenter = create_detector("segmenter", **SMALL, per_type=True)
    segmenter.fit_masks(list(dataset.test) + list(dataset.train[:8]), dataset.defect_types)
    assert segmenter.label_types == dataset.defect_types
    assert segmenter.network.head[-1].out_channels == len(dataset.defect_types)
    paths = [s.path for s in dataset.test]
    prediction = segmenter.predict(paths)
    assert prediction.detections is not None and len(prediction.detections) == len(paths)
    for image, heat in zip(prediction.detections, prediction.maps):
        for region in image:
            assert region.type in dataset.defect_types and region.mask.shape == heat.shape
            assert 0.5 <= region.confidence <= 1 and region.mask.any()
    typed = [(s.defect, {r.type for r in image}) for s, image in zip(dataset.test, prediction.detections) if s.label and image]
    assert typed and sum(defect in found for defect, found in typed) / len(typed) > 0.5  # mostly the right type
    loaded = load_model(save_model(segmenter, tmp_path / "typed.dsmodel"))
    assert loaded.label_types == dataset.defect_types
    np.testing.assert_allclose(loaded.predict(paths[:4]).scores, prediction.scores[:4], rtol=1e-5)
    check_predictor(loaded, paths[:3])
    with TestClient(create_app(load_served([tmp_path / "typed.dsmodel"]))) as client:  # the service keeps the types
        flagged = [p for p, image in zip(paths, prediction.detections) if image][:3]
        body = client.post("/v1/models/typed/inspect", files=[("files", (p.name, p.read_bytes(), "image/png"))
                                                               for p in flagged]).json()
    expected = segmenter.predict(flagged).detections
    assert [[(d["type"], d["box"]) for d in r["detections"]] for r in body["results"]] == \
        [[(d.type, [round(v, 2) for v in d.box]) for d in image] for image in expected]
