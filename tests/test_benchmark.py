"""The MVTec benchmark runs on any MVTec-layout category and writes its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mvtec.py"


def test_benchmark_runs_on_a_generated_category(demo_root: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--root", str(demo_root.parent), "--categories", demo_root.name,
               "--models", "padim", "knn", "--settings", '{"image_size": 128, "crop": null}', "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads((tmp_path / f"mvtec-{demo_root.name}.json").read_text())
    padim, knn = result["rows"]
    assert (padim["model"], knn["model"]) == ("padim", "knn") and result["command"].startswith("python benchmarks/mvtec.py")
    assert padim["image_auroc"] >= 0.9 and padim["pixel_auroc"] >= 0.9 and knn["pixel_auroc"] is None
    for row in (padim, knn):
        assert row["fit_s"] > 0 and row["ms_batched"] > 0 and row["ms_batch1"] > 0 and row["peak_mb"] > 100
    table = (tmp_path / f"mvtec-{demo_root.name}.md").read_text()
    assert "| part | padim | 128 | n/a |" in table and "| part | knn | 128 | n/a |" in table  # the frame; no global view


def test_a_generated_category_is_named_by_what_it_is(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from generated import write_generated

    unknown = subprocess.run([sys.executable, str(SCRIPT), "--generate", "fine-defect", "--out", str(tmp_path)],
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr  # no silent stand-in under a wrong name
    logical = write_generated("logical-parts", tmp_path)
    assert logical.name == "logical-parts" and {p.name for p in (logical / "test").iterdir()} == {
        "good", "missing", "swapped", "extra"}
    again = write_generated("logical-parts", tmp_path, seed=2)  # another draw beside it, named apart
    assert again.name == "logical-parts-seed2" and logical.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logical-parts", "logical-parts-seed2"]  # nothing left over
    first = "train/good/000.png"
    assert (again / first).read_bytes() != (logical / first).read_bytes()


def test_threaded_parts_are_gray_parts_with_one_small_marked_defect_each(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    import cv2
    from generated import THREAD_DEFECTS, write_threaded_parts

    folder = write_threaded_parts(tmp_path, train=2, test_good=1, per_defect=2)
    assert {p.name for p in (folder / "test").iterdir()} == {"good", *THREAD_DEFECTS}
    assert not (folder / "ground_truth" / "good").exists()
    poses = [cv2.imread(str(folder / "train" / "good" / f"00{i}.png"), cv2.IMREAD_UNCHANGED) for i in range(2)]
    assert all(image.shape == (1024, 1024) for image in poses) and not np.array_equal(*poses)  # gray, placed anew
    for defect in THREAD_DEFECTS:
        for image in sorted((folder / "test" / defect).iterdir()):
            mask = cv2.imread(str(folder / "ground_truth" / defect / f"{image.stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
            regions = cv2.connectedComponents(mask.astype(np.uint8))[0] - 1
            assert regions == 1 and 10 < mask.sum() < 0.001 * mask.size, (defect, image.name, regions, mask.sum())
            part = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
            beside = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > mask
            assert (part[beside] < 170).any()  # at the part (metal is darker than the background)
            assert (part[mask].mean() > 190) == (defect == "tip")  # on the part; a cut tip leaves background
    again = write_threaded_parts(tmp_path / "again", train=2, test_good=1, per_defect=2)
    assert (again / "test/thread/001.png").read_bytes() == (folder / "test/thread/001.png").read_bytes()  # seeded


def test_view_cost_pairs_alternate_and_state_what_the_default_adds() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from view_cost import MODELS, median_row, pair_order, pair_row

    assert [pair_order(pair)[0] for pair in range(3)] == [MODELS[0], MODELS[1], MODELS[0]]  # neither always first
    run = {"frame": "352/320 s16", "global_view": "on", "place_view": "off"}
    rows = [pair_row("juice", pair, {MODELS[0]: {**run, "fit_s": fit, "ms_batched": ms},
                                     MODELS[1]: {**run, "fit_s": 100.0, "ms_batched": 40.0}})
            for pair, (fit, ms) in enumerate([(110.0, 41.0), (104.0, 46.0), (120.0, 39.0)])]
    assert [row["order"] for row in rows] == ["default first", "alone first", "default first"]
    assert [round(row["fit_cost"], 3) for row in rows] == [0.1, 0.04, 0.2] and [row["ms_cost"] for row in rows] == [1, 6, -1]
    median = median_row("juice", rows)
    assert (round(median["fit_cost"], 3), median["ms_cost"], median["fit_default"]) == (0.1, 1.0, 110.0)
