"""Shared fixtures: a small generated dataset, the real bottle category when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defectscope.data.synthetic import make_demo_dataset

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mvtec_ad" / "bottle"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 good training images, 10 good and 24 defective test images, 128 px, with masks."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "part", size=128, seed=3)


@pytest.fixture(scope="session")
def bottle() -> Path:
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found at {BOTTLE}")
    return BOTTLE
