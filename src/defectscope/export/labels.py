"""Write labelled images as YOLO, YOLO-seg, COCO or per-instance mask datasets; deterministic for a seed.

    out/images/{train,val}/<image>            copies (or symlinks) of the images
    yolo, yolo-seg: out/labels/{train,val}/<image stem>.txt and out/data.yaml
    coco:           out/annotations/instances_{train,val}.json
    masks:          out/masks/<image stem>_<k>.png and out/masks/index.json (one entry per instance, with its box)

Images get unique names `<split>_<class>_<name>` because MVTec reuses file names across folders.
An export is written whole: into a temporary folder beside `out`, then moved into place, so a
re-export never mixes files of two runs; `out` must be new, empty or an earlier export (else `force`).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn.model_selection import train_test_split

from defectscope.data.decode import image_header, read_mask
from defectscope.data.layout import Dataset, Sample, require_masks
from defectscope.errors import DefectscopeError
from defectscope.files import (NAME_MAX, check_apart, check_creatable, check_reusable, claim_folder, tagged_name,
                               temporary_prefix, write_atomic, write_json, write_text)
from defectscope.names import LABEL_FORMATS, few
from defectscope.regions import Instance, components, polygons, rle
from defectscope.settings import require_range, require_seed

FORMATS = LABEL_FORMATS
LABEL_EXPORT = "label export"  # the kind an export's folder is marked as (`files.claim_folder`)
MASK_TAIL = 8  # room an image's export name leaves for its masks' `_<k>` (`masks` format)


@dataclass
class LabelledImage:
    """An image to export, its unique export name, split, and its instances."""

    source: Path
    name: str
    subset: str
    height: int
    width: int
    instances: list[Instance]


@dataclass
class ExportOptions:
    format: str
    val_fraction: float = 0.2
    seed: int = 0
    min_area: int = 1
    tolerance: float = 0.5
    rle: bool = False
    link: bool = False

    def __post_init__(self) -> None:
        """Checked when built, so every export path fails the same way before any work."""
        if self.format not in FORMATS:
            raise DefectscopeError(f"unknown format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        require_range("val_fraction", self.val_fraction, 0, 1, high_open=True)
        require_range("min_area", self.min_area, 1)
        require_range("tolerance", self.tolerance, 0)
        require_seed("seed", self.seed)


def check_masks(dataset: Dataset, samples: Sequence[Sample]) -> None:
    """Every defective image needs a mask marking its defect, and every file in a mask folder needs its image."""
    require_masks(samples, "a model trained on these labels", read=False)  # their regions: checked once collected
    used = {s.mask for s in dataset.samples if s.mask}
    for folder in sorted({m.parent for m in used}):
        orphans = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p not in used)
        if orphans:
            raise DefectscopeError(f"mask {orphans[0]} has no image ({len(orphans)} such file(s) in {folder}); "
                                   "remove it or add its image")


def ground_truth(sample: Sample, categories: list[str], min_area: int) -> list[Instance]:
    """Instances of a sample's mask; none for good images."""
    if not sample.label:
        return []
    mask = read_mask(sample.mask)
    return [Instance(categories.index(sample.defect), m, box, area) for m, box, area in components(mask, min_area)]


def split_subsets(samples: Sequence[Sample], val_fraction: float, seed: int) -> list[str]:
    """'train' or 'val' per sample: seeded, stratified by class."""
    index = np.arange(len(samples))
    if not 0 < val_fraction < 1 or round(len(samples) * val_fraction) < 1 or len(samples) < 2:
        return ["train"] * len(samples)
    if math.ceil(len(samples) * val_fraction) >= len(samples):
        raise DefectscopeError(f"--val-fraction {val_fraction:g} of {len(samples)} images leaves none for training; "
                               "choose a smaller one")
    classes = [s.defect for s in samples]
    counts = {c: classes.count(c) for c in classes}
    stratify = classes if min(counts.values()) >= 2 else None
    try:
        _, val = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few images to give every class a share of val: split without stratifying
        _, val = train_test_split(index, test_size=val_fraction, random_state=seed)
    held = set(val.tolist())
    return ["val" if i in held else "train" for i in index]


def collect(samples: Sequence[Sample], categories: list[str], options: ExportOptions,
            label: Callable[[Sample], list[Instance]]) -> list[LabelledImage]:
    """Labelled images in a stable order, with their subset and instances."""
    ordered = sorted(samples, key=lambda s: (s.split, s.defect, s.path.name))
    subsets = split_subsets(ordered, options.val_fraction, options.seed)
    images = []
    for sample, subset in zip(ordered, subsets):
        width, height = image_header(sample.path)[:2]
        images.append(LabelledImage(sample.path, _export_name(sample), subset, height, width, label(sample)))
    return images


def _export_name(sample: Sample) -> str:
    """`<split>_<class>_<name>`; where that, or a mask named from it (`_<k>.png`), would be too long for a file system,
    its stem shortened and the digest of the whole kept (names stay unique)."""
    name = f"{sample.split}_{sample.defect}_{sample.path.name}"
    room = NAME_MAX - MASK_TAIL
    if len(os.fsencode(name)) <= room:
        return name
    return tagged_name(name, hashlib.sha256(os.fsencode(name)).hexdigest()[:8], room)


def _place_image(source: Path, target: Path, link: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if link:
        os.symlink(source.resolve(), target)
    else:
        shutil.copyfile(source, target)


def _yolo_lines(image: LabelledImage, segmentation: bool, tolerance: float) -> list[str]:
    lines = []
    for inst in image.instances:
        if segmentation:
            for polygon in polygons(inst.mask, tolerance):
                xy = np.array(polygon).reshape(-1, 2) / (image.width, image.height)
                lines.append(f"{inst.category} " + " ".join(f"{v:.6f}" for v in xy.clip(0, 1).ravel()))
        else:
            x, y, w, h = inst.box
            lines.append(f"{inst.category} {(x + w / 2) / image.width:.6f} {(y + h / 2) / image.height:.6f} "
                         f"{w / image.width:.6f} {h / image.height:.6f}")
    return lines


def _annotation(inst: Instance, image_id: int, annotation_id: int, options: ExportOptions) -> dict:
    entry = {"id": annotation_id, "image_id": image_id, "category_id": inst.category + 1, "bbox": list(inst.box),
             "area": inst.area, "iscrowd": 1 if options.rle else 0,
             "segmentation": rle(inst.mask) if options.rle else polygons(inst.mask, options.tolerance)}
    if inst.score is not None:
        entry["score"] = inst.score
    return entry


def coco_document(images: list[LabelledImage], categories: list[str], options: ExportOptions) -> dict:
    """A COCO instances document (category ids start at 1)."""
    document = {"info": {"description": "defectscope label export"}, "images": [], "annotations": [],
                "categories": [{"id": i + 1, "name": name, "supercategory": "defect"} for i, name in enumerate(categories)]}
    for image_id, image in enumerate(images, 1):
        document["images"].append({"id": image_id, "file_name": image.name, "height": image.height, "width": image.width})
        for inst in image.instances:
            document["annotations"].append(_annotation(inst, image_id, len(document["annotations"]) + 1, options))
    return document


def check_export_target(out: Path, dataset: Dataset, force: bool) -> None:
    """Refuse before any work: an export inside the dataset (or around it), a file, or a foreign non-empty folder."""
    check_apart(out, dataset.root, "export folder", "dataset")
    check_creatable(out)
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise DefectscopeError(f"export output {out} exists and is not a folder; give a folder")
        check_reusable(out, LABEL_EXPORT, force,  # what is in it is replaced: only an earlier export, unless forced
                       forcing="replace it: everything in it is deleted")


def write_whole(out: Path, write: Callable[[Path], dict]) -> dict:
    """Run `write(staging)` into a new folder beside `out`, then put it in place of `out` (whose old contents go)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=temporary_prefix(out), suffix=".tmp"))
    try:
        claim_folder(staging, what=LABEL_EXPORT)
        counts = write(staging)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=temporary_prefix(out), suffix=".old"))
            os.replace(out, old / "replaced")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def write_labels(images: list[LabelledImage], categories: list[str], out: Path, options: ExportOptions,
                 provenance: dict, final: Path | None = None) -> dict:
    """Write one format into `out` (whose final place is `final`, named in data.yaml); `provenance` (where labels
    came from) goes into export.json. Returns counts per subset."""
    final = final or out
    for image in images:
        _place_image(image.source, out / "images" / image.subset / image.name, options.link)
    subsets = sorted({i.subset for i in images})
    if options.format in ("yolo", "yolo-seg"):
        for image in images:
            text = "\n".join(_yolo_lines(image, options.format == "yolo-seg", options.tolerance))
            write_atomic(out / "labels" / image.subset / f"{Path(image.name).stem}.txt", (text + "\n" if text else "").encode())
        names = "\n".join(f"  {i}: {name}" for i, name in enumerate(categories))
        folders = "\n".join(f"{s}: images/{s}" for s in subsets)
        write_text(out / "data.yaml", f"path: {final.resolve()}\n{folders}\nnames:\n{names}\n")
    elif options.format == "coco":
        for subset in subsets:
            document = coco_document([i for i in images if i.subset == subset], categories, options)
            write_json(out / "annotations" / f"instances_{subset}.json", document, indent=None)
    else:
        index = []
        for image in images:
            for k, inst in enumerate(image.instances):
                name = f"{Path(image.name).stem}_{k}.png"
                ok, png = cv2.imencode(".png", inst.mask.astype(np.uint8) * 255)
                write_atomic(out / "masks" / name, png.tobytes())
                x, y, w, h = inst.box
                index.append({"image": f"images/{image.subset}/{image.name}", "mask": f"masks/{name}", "subset": image.subset,
                              "category": categories[inst.category], "box_xyxy": [x, y, x + w, y + h], "area": inst.area,
                              **({"score": inst.score} if inst.score is not None else {})})
        write_json(out / "masks" / "index.json", {"categories": categories, "instances": index})
    write_json(out / "export.json", {
        "format": options.format, **provenance, "categories": categories, "seed": options.seed, "val_fraction": options.val_fraction,
        "min_area": options.min_area, "tolerance": options.tolerance, "rle": options.rle,
        "images": [{"name": i.name, "source": str(i.source), "subset": i.subset, "instances": len(i.instances)} for i in images],
    })
    return {s: {"images": sum(i.subset == s for i in images), "instances": sum(len(i.instances) for i in images if i.subset == s)}
            for s in subsets}


def export_ground_truth(dataset: Dataset, out: Path, options: ExportOptions, include_train_good: bool = False,
                        force: bool = False) -> dict:
    """Export the test split's labelled images (and optionally the good training images) from their masks."""
    out = Path(out)
    check_export_target(out, dataset, force)
    samples = list(dataset.test) + (list(dataset.train) if include_train_good else [])
    if not samples:
        raise DefectscopeError(f"{dataset.root} has no labelled images to export")
    check_masks(dataset, samples)
    categories = list(dataset.defect_types)
    images = collect(samples, categories, options, lambda s: ground_truth(s, categories, options.min_area))
    masks = {s.path: s.mask for s in samples if s.label}
    unmarked = [masks[i.source] for i in images if i.source in masks and not i.instances]
    if unmarked:
        raise DefectscopeError(f"{len(unmarked)} mask(s) of defective images hold no defect region of at least "
                               f"{options.min_area} pixel(s): {few(unmarked)}; their images' empty labels would teach "
                               "a detector that their defect is background: fix the masks, lower --min-area, or move "
                               "their images")
    provenance = {"labels": "masks", "dataset": str(dataset.root)}
    return write_whole(out, lambda staging: write_labels(images, categories, staging, options, provenance, out))

