"""Errors say what kind they are, and every kind is a DefectscopeError (one line and exit 2 on the command line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defectscope.data.layout import load_dataset
from defectscope.detectors.base import create_detector
from defectscope.errors import DefectscopeError, InputError, ModelFileError, SettingsError
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
    assert all(issubclass(kind, DefectscopeError) for kind in (InputError, SettingsError, ModelFileError))
