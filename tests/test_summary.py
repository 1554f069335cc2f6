"""Dataset summary figures, on the real bottle category and on edge cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from defectscope.data.layout import load_dataset
from defectscope.data.summary import summarize


def test_bottle_summary(bottle: Path) -> None:
    summary = summarize(load_dataset(bottle))
    assert summary["defect_classes"] == {"count": 3, "names": ["broken_large", "broken_small", "contamination"], "combined": []}
    assert summary["total_images"] == 292
    assert summary["splits"]["train"] == {"images": 209, "per_class": {"good": 209}}
    assert summary["splits"]["test"]["images"] == 83
    assert summary["distribution"]["test_good"] == 20 and summary["distribution"]["test_defective"] == 63
    assert summary["masks"] == 63
    assert summary["image_formats"] == [{"width": 900, "height": 900, "mode": "RGB", "channels": 3, "count": 292}]
    assert summary["imbalance"]["largest_to_smallest"] == round(229 / 20, 3)
    assert json.loads(json.dumps(summary)) == summary


def test_combined_folder_is_flagged_and_modes_counted(demo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "part"
    shutil.copytree(demo_root, root)
    shutil.copytree(root / "test" / "scratch", root / "test" / "combined")
    shutil.copytree(root / "ground_truth" / "scratch", root / "ground_truth" / "combined")
    summary = summarize(load_dataset(root))
    assert summary["defect_classes"]["combined"] == ["combined"]
    assert summary["defect_classes"]["count"] == 4
    assert summary["per_class"]["combined"] == {"train": 0, "test": 8, "total": 8}
    assert summary["image_formats"][0]["channels"] == 3
