"""Errors say what kind they are, and every kind is a DefectscopeError (one line and exit 2 on the command line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defectscope.data.layout import load_dataset
from defectscope.detectors.base import create_detector
from defectscope.artifacts import save_model
from defectscope.errors import DefectscopeError, InputError, ModelFileError, NotFittedError, SettingsError
from defectscope.metrics import pixel_metrics
from defectscope.model_header import model_info


def test_each_kind_of_mistake_raises_its_own_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="coreset_ratio"):
        create_detector("patchcore", coreset_ratio=2.0)
    with pytest.raises(SettingsError, match="global_view"):
        create_detector("patchcore", global_view="sometimes")
    with pytest.raises(InputError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "m.dsmodel").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ModelFileError):
        model_info(tmp_path / "m.dsmodel")
    with pytest.raises(InputError, match="defect-free"):  # once a ValueError that escaped the command line's handler
        pixel_metrics(np.ones((1, 4, 4), bool), np.zeros((1, 4, 4), np.float32))
    assert all(issubclass(kind, DefectscopeError) for kind in (InputError, SettingsError, ModelFileError, NotFittedError))


@pytest.mark.parametrize("name", ["patchcore", "padim", "knn", "autoencoder", "segmenter"])
def test_an_unfitted_model_says_so(name: str, tmp_path: Path) -> None:
    model = create_detector(name, image_size=64, crop=None)
    with pytest.raises(NotFittedError, match="not fitted; call fit"):
        model.score_frames(np.zeros((1, 3, 64, 64), np.uint8))
    with pytest.raises(NotFittedError, match="not fitted"):
        save_model(model, tmp_path / "m.dsmodel")
    assert not (tmp_path / "m.dsmodel").exists()


def test_a_setting_a_model_does_not_use_is_refused_not_ignored() -> None:
    with pytest.raises(SettingsError, match="'threshold_method' does not apply to SegmenterConfig"):
        create_detector("segmenter", threshold_method="sigma")
    with pytest.raises(SettingsError, match="'calibration_folds' does not apply to ReconstructionConfig"):
        create_detector("autoencoder", calibration_folds=5)
    with pytest.raises(SettingsError, match="'threshold_param' does not apply to InstanceConfig"):
        create_detector("detector", threshold_param=0.05)
    with pytest.raises(SettingsError, match="'calibration_folds' does not apply to PaDiMConfig"):  # always leave one out
        create_detector("padim", calibration_folds=5)
    segmenter = create_detector("segmenter", epochs=3)
    assert type(segmenter.config).from_dict(segmenter.config.to_dict()) == segmenter.config  # defaults round-trip
    assert create_detector("patchcore", calibration_folds=5).config.calibration_folds == 5  # where it applies

def test_a_model_file_holding_a_setting_it_never_used_still_loads(demo_root: Path, tmp_path: Path) -> None:
    """A PaDiM fitted before its `calibration_folds` was refused may hold one: it had no effect, so the file loads."""
    import json

    from safetensors.torch import load, save

    from defectscope.artifacts import load_model

    model = create_detector("padim", image_size=64, crop=None)
    model.fit([sample.path for sample in load_dataset(demo_root).train])
    written = save_model(model, tmp_path / "padim.dsmodel")
    data = written.read_bytes()
    manifest = json.loads(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["defectscope"])
    manifest["config"]["calibration_folds"] = 5
    manifest["format_version"] = 1  # a file of that time: its manifest carried no digest
    older = tmp_path / "older.dsmodel"
    older.write_bytes(save(load(data), metadata={"defectscope": json.dumps(manifest)}))
    loaded = load_model(older)
    assert loaded.config.calibration_folds == model.config.calibration_folds  # the default: what it always did
    np.testing.assert_array_equal(loaded.calibration_scores.numpy(), model.calibration_scores.numpy())
