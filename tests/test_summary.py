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
    assert summary["copies"] == [] and summary["warnings"] == []
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


def test_copies_are_named_by_what_they_do_to_a_model(demo_root: Path, tmp_path: Path) -> None:
    """A defective image among the training goods, a test image that is a training image, and an image stored twice:
    the summary said nothing of them; a fit on such training goods says it learned a defect as good."""
    import warnings

    from defectscope.errors import DataWarning
    from defectscope.pipeline import fit_detector

    root = tmp_path / "part"
    shutil.copytree(demo_root, root)
    shutil.copy(root / "test" / "broken" / "000.png", root / "train" / "good" / "902.png")
    shutil.copy(root / "train" / "good" / "000.png", root / "test" / "good" / "900.png")
    shutil.copy(root / "train" / "good" / "001.png", root / "train" / "good" / "901.png")
    summary = summarize(load_dataset(root))
    assert sorted(summary["copies"]) == sorted([["train/good/902.png", "test/broken/000.png"],
                                                ["train/good/000.png", "test/good/900.png"],
                                                ["train/good/001.png", "train/good/901.png"]])
    said = " | ".join(summary["warnings"])
    assert "1 image(s) appear under two classes (train/good/902.png = test/broken/000.png)" in said
    assert "1 test image(s) are copies of training images (train/good/000.png = test/good/900.png)" in said
    assert "stored more than once within their class and split (train/good/001.png = train/good/901.png)" in said
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        fit_detector(load_dataset(root), "knn", {"image_size": 64, "crop": None})
    learned = [str(w.message) for w in caught if "copies of defective images" in str(w.message)]
    assert len(learned) == 1 and f"{root / 'train' / 'good' / '902.png'} = {root / 'test' / 'broken' / '000.png'}" in learned[0]
