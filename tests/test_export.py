"""Label export: instances, every format round-trips through `check`, determinism, bad input, pseudo-labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectscope.cli import app
from defectscope.data.layout import load_dataset
from defectscope.detectors import create_detector
from defectscope.errors import DefectscopeError
from defectscope.export.check import check_export
from defectscope.export.labels import ExportOptions, export_ground_truth
from defectscope.export.pseudo import agreement, export_pseudo_labels
from defectscope.regions import components, polygons, rasterize, rle


def test_components_use_8_connectivity_and_min_area() -> None:
    mask = np.zeros((10, 10), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one instance
    mask[6:9, 6:9] = True
    found = components(mask, min_area=1)
    assert [area for _, _, area in found] == [9, 2]
    assert found[0][1] == (6, 6, 3, 3) and found[1][1] == (1, 1, 2, 2)
    assert len(components(mask, min_area=3)) == 1


def test_polygons_and_rle_rasterize_back() -> None:
    mask = np.zeros((40, 50), bool)
    cv2.circle(mask.view(np.uint8), (20, 18), 9, 1, -1)
    ring = mask.copy()
    ring[16:21, 18:23] = False  # a hole: exact only in RLE
    for shape in (mask, ring):
        assert np.array_equal(rasterize(rle(shape), 40, 50), shape)
    outline = polygons(mask, tolerance=1.0)
    assert len(outline) == 1 and len(outline[0]) >= 6
    drawn = rasterize(outline, 40, 50)
    assert (drawn & mask).sum() / (drawn | mask).sum() >= 0.97


@pytest.mark.parametrize("fmt,rle_masks", [("yolo", False), ("yolo-seg", False), ("coco", False), ("coco", True), ("masks", False)])
def test_every_format_passes_check_and_is_deterministic(demo_root: Path, tmp_path: Path, fmt: str, rle_masks: bool) -> None:
    dataset = load_dataset(demo_root)
    options = ExportOptions(fmt, rle=rle_masks)
    counts = export_ground_truth(dataset, tmp_path / "a", options)
    export_ground_truth(dataset, tmp_path / "b", options)
    assert counts["train"]["images"] + counts["val"]["images"] == len(dataset.test)
    report = check_export(tmp_path / "a")
    assert report["ok"], report["failures"]
    assert report["instances"] == sum(c["instances"] for c in counts.values()) > 0
    if rle_masks or fmt == "masks":
        assert report["min_iou"] == 1.0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for relative in files_a:
        if relative.name not in ("export.json", "data.yaml"):  # those two name their own folder
            assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative


def test_yolo_files(demo_root: Path, tmp_path: Path) -> None:
    export_ground_truth(load_dataset(demo_root), tmp_path, ExportOptions("yolo"))
    data = (tmp_path / "data.yaml").read_text()
    assert "train: images/train" in data and "0: broken" in data and "2: scratch" in data
    good = list((tmp_path / "labels").rglob("test_good_*.txt"))
    assert good and all(p.read_text() == "" for p in good)
    for path in (tmp_path / "labels").rglob("test_scratch_*.txt"):
        for line in path.read_text().splitlines():
            cls, *box = line.split()
            assert cls == "2" and len(box) == 4 and all(0 <= float(v) <= 1 for v in box)
    # the split is stratified: every class appears in val
    val = {p.name.split("_")[1] for p in (tmp_path / "images" / "val").iterdir()}
    assert val == {"good", "broken", "contamination", "scratch"}


def test_check_catches_a_wrong_label(demo_root: Path, tmp_path: Path) -> None:
    export_ground_truth(load_dataset(demo_root), tmp_path, ExportOptions("yolo"))
    label = next(p for p in (tmp_path / "labels").rglob("test_broken_*.txt"))
    cls, cx, cy, w, h = label.read_text().split()
    label.write_text(f"{cls} {float(cx) + 0.1:.6f} {cy} {w} {h}\n")
    report = check_export(tmp_path)
    assert not report["ok"] and "box" in report["failures"][0]


@pytest.mark.parametrize("fmt,damage", [
    ("coco", lambda out: (out / "annotations" / "instances_train.json").write_text('{"x": 1}')),
    ("coco", lambda out: (out / "annotations" / "instances_val.json").unlink()),
    ("coco", lambda out: (out / "annotations" / "instances_val.json").write_text("not json")),
    ("masks", lambda out: (out / "masks" / "index.json").write_text('{"instances": 5}')),
    ("masks", lambda out: next((out / "masks").glob("*.png")).write_bytes(b"not a png")),
    ("yolo", lambda out: next((out / "labels").rglob("test_broken_*.txt")).write_text("0 a b c d\n")),
])
def test_check_reports_damaged_label_files_as_failures(demo_root: Path, tmp_path: Path, fmt: str, damage, cli) -> None:
    """A damaged label file is a failure the check reports (exit 1), never a crash of the checker."""
    export_ground_truth(load_dataset(demo_root), tmp_path, ExportOptions(fmt))
    damage(tmp_path)
    report = check_export(tmp_path)
    assert not report["ok"] and report["failures"]
    checked = cli("export", "check", tmp_path)
    assert checked.code == 1 and "FAIL" in checked.err and "Traceback" not in checked.err + checked.out


def test_jpeg_masks_export_the_instances_of_their_png_originals(demo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    for mask in (root / "ground_truth").rglob("*.png"):
        cv2.imwrite(str(mask.with_suffix(".jpg")), cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE), [cv2.IMWRITE_JPEG_QUALITY, 90])
        mask.unlink()
    png = export_ground_truth(load_dataset(demo_root), tmp_path / "png", ExportOptions("coco"))
    jpeg = export_ground_truth(load_dataset(root), tmp_path / "jpeg", ExportOptions("coco"))
    assert jpeg == png


def test_a_defective_image_whose_mask_marks_nothing_is_refused_not_exported_as_background(
        demo_root: Path, tmp_path: Path, cli) -> None:
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    mask = sorted((root / "ground_truth" / "scratch").iterdir())[1]
    cv2.imwrite(str(mask), np.zeros_like(cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)))
    refused = cli("export", "labels", root, "-o", tmp_path / "out", "--format", "yolo")
    assert refused.code == 2 and mask.name in refused.err and "background" in refused.err
    assert not (tmp_path / "out").exists()
    assert "1 mask(s) of defective images mark no pixel" in cli("data", "summary", root).err
    small = cli("export", "labels", demo_root, "-o", tmp_path / "small", "--min-area", "100000")  # every region below it
    assert small.code == 2 and "at least 100000 pixel(s)" in small.err and not (tmp_path / "small").exists()


def test_bad_mask_input(demo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    masks = root / "ground_truth" / "scratch"
    shutil.copy(next(masks.iterdir()), masks / "999_mask.png")  # a mask without an image
    with pytest.raises(DefectscopeError, match="999_mask.png has no image"):
        export_ground_truth(load_dataset(root), tmp_path / "o1", ExportOptions("coco"))
    (masks / "999_mask.png").unlink()
    first = sorted(masks.iterdir())[0]
    cv2.imwrite(str(first), np.zeros((10, 10), np.uint8))  # wrong size
    with pytest.raises(DefectscopeError, match="masks must have their image's size"):
        load_dataset(root)
    for path in masks.iterdir():
        path.unlink()  # empty mask folder
    with pytest.raises(DefectscopeError, match="no mask for"):
        load_dataset(root)


def test_pseudo_labels_from_a_model(demo_root: Path, tmp_path: Path) -> None:
    dataset = load_dataset(demo_root)
    detector = create_detector("padim", image_size=128, crop=None)
    detector.fit([s.path for s in dataset.train])
    counts = export_pseudo_labels(dataset, detector, Path("padim.dsmodel"), tmp_path, ExportOptions("coco", val_fraction=0))
    document = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert document["categories"] == [{"id": 1, "name": "defect", "supercategory": "defect"}]
    assert counts["train"]["instances"] == len(document["annotations"]) > 0
    assert all(a["score"] >= 1.0 for a in document["annotations"])  # peak at or above the threshold
    with pytest.raises(DefectscopeError, match="pseudo-labels"):
        check_export(tmp_path)
    scores = agreement(dataset, detector)
    assert 0 < scores["mask_ap50"] <= 1 and 0 < scores["box_ap50"] <= 1 and 0 < scores["mean_mask_iou"] <= 1
    knn = create_detector("knn", image_size=64, crop=None)
    knn.fit([s.path for s in dataset.train])
    with pytest.raises(DefectscopeError, match="anomaly maps"):
        agreement(dataset, knn)


def test_cli_export_and_check(demo_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["export", "labels", str(demo_root), "--format", "masks", "-o", str(tmp_path)])
    assert result.exit_code == 0 and "instances" in result.output
    index = json.loads((tmp_path / "masks" / "index.json").read_text())["instances"]
    assert all(len(e["box_xyxy"]) == 4 and (tmp_path / e["mask"]).is_file() for e in index)
    checked = runner.invoke(app, ["export", "check", str(tmp_path)])
    assert checked.exit_code == 0 and "ok: every label matches" in checked.output
    next((tmp_path / "masks").glob("*.png")).write_bytes(cv2.imencode(".png", np.zeros((128, 128), np.uint8))[1].tobytes())
    assert runner.invoke(app, ["export", "check", str(tmp_path)]).exit_code == 1


def test_export_labels_refuses_options_that_would_not_apply(demo_root: Path, tmp_path: Path, cli) -> None:
    stray = cli("export", "labels", demo_root, "-o", tmp_path / "labels", "--threshold", "5")
    assert stray.code == 2 and stray.err.strip() == ("error: --threshold sets the level of a model's maps: it applies "
                                                     "with --from-model only")
    unused = cli("export", "labels", demo_root, "-o", tmp_path / "labels", "--from-model", tmp_path / "any.dsmodel",
                 "--include-train-good")
    assert unused.code == 2 and "--include-train-good adds the good training images" in unused.err
    assert not (tmp_path / "labels").exists()


@pytest.mark.parametrize("fmt", ["yolo-seg", "masks"])
def test_images_with_names_as_long_as_allowed_are_exported_under_unique_names(demo_root: Path, tmp_path: Path,
                                                                             fmt: str) -> None:
    """`<split>_<class>_<name>` of a 244-byte image name passed 255 bytes: the export stopped with 'File name too
    long'. Two such names that differ only at their end stay two files."""
    root = tmp_path / "part"
    shutil.copytree(demo_root, root)
    long = "d" * 240
    for i in ("000", "001"):
        (root / "test" / "scratch" / f"{i}.png").rename(root / "test" / "scratch" / f"{long}{i}.png")
        (root / "ground_truth" / "scratch" / f"{i}_mask.png").rename(root / "ground_truth" / "scratch" / f"{long}{i}_mask.png")
    export_ground_truth(load_dataset(root), tmp_path / "out", ExportOptions(fmt))
    assert check_export(tmp_path / "out")["ok"]
    images = [p.name for p in (tmp_path / "out" / "images").rglob("*ddd*")]
    assert len(images) == len(set(images)) == 2 and all(len(name.encode()) <= 255 for name in images)
    assert all(len(p.name.encode()) <= 255 for p in (tmp_path / "out").rglob("*"))
