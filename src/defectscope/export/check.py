"""Round-trip validation of an export: parse every file back and compare it with the source masks."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools.coco import COCO

from defectscope.data.decode import image_header, read_mask
from defectscope.data.layout import load_dataset
from defectscope.errors import DefectscopeError
from defectscope.files import MARKER
from defectscope.regions import components, rasterize

POLYGON_IOU = 0.95


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _truth(record: dict, manifest: dict, mask_of: dict[str, Path | None]) -> list[tuple[np.ndarray, tuple]]:
    """The source mask's components (mask, box) in export order, or none for a good image."""
    mask = mask_of.get(record["source"])
    if mask is None:
        return []
    return [(m, box) for m, box, _ in components(read_mask(mask), manifest["min_area"])]


def _mask_index(manifest: dict) -> dict[str, Path | None]:
    """Source image -> its mask, from the dataset the export came from."""
    return {str(s.path): s.mask for s in load_dataset(manifest["dataset"]).samples}


def _listing_failures(out: Path, manifest: dict, index: list[dict]) -> list[str]:
    """Leaks between subsets, and files in the export that its manifest (or mask index) does not list."""
    failures = []
    records = manifest["images"]
    for key in ("name", "source"):
        subsets: dict[str, set[str]] = {}
        for record in records:
            subsets.setdefault(record[key], set()).add(record["subset"])
        failures += [f"leak: {value} is in both {' and '.join(sorted(s))}" for value, s in subsets.items() if len(s) > 1]
    listed = {f"images/{r['subset']}/{r['name']}" for r in records}
    fmt = manifest["format"]
    if fmt in ("yolo", "yolo-seg"):
        listed |= {f"labels/{r['subset']}/{Path(r['name']).stem}.txt" for r in records} | {"data.yaml"}
    elif fmt == "coco":
        listed |= {f"annotations/instances_{subset}.json" for subset in {r["subset"] for r in records}}
    else:
        listed |= {entry["mask"] for entry in index} | {"masks/index.json"}
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - listed - {"export.json", MARKER})
    failures += [f"unlisted file {name}: not part of this export (left by another run?)" for name in extra]
    failures += [f"missing file {name}" for name in sorted(listed - present - {"data.yaml"})]
    return failures


def check_export(out: str | Path) -> dict:
    """Compare every exported label with its source mask, and the files with the manifest; returns counts, the
    lowest IoU and any failures."""
    out = Path(out)
    manifest_path = out / "export.json"
    if not manifest_path.is_file():
        raise DefectscopeError(f"{out} is not a label export (no export.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["images"], manifest["format"], manifest["min_area"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DefectscopeError(f"{manifest_path} is damaged ({exc}); export again") from exc
    if manifest.get("labels") != "masks":
        raise DefectscopeError(f"{out} holds pseudo-labels ({manifest.get('labels')}); only exports of ground-truth masks can be checked")
    mask_of = _mask_index(manifest)
    subsets = sorted({r["subset"] for r in manifest["images"]})
    fmt, unreadable = manifest["format"], []

    def label_file(name: str, read: Callable[[], Any]) -> Any:
        """What `read` reads of the label file `name`, or None (and a failure) when it cannot."""
        try:
            return read()
        except READ_BACK_ERRORS as exc:
            unreadable.append(f"{name} cannot be read ({' '.join(str(exc).split())[:200]})")
            return None

    coco = {s: label_file(f"annotations/instances_{s}.json", lambda s=s: _coco(out / "annotations" / f"instances_{s}.json"))
            for s in subsets} if fmt == "coco" else {}
    index = (label_file("masks/index.json", lambda: _mask_entries(out / "masks" / "index.json")) or []) \
        if fmt == "masks" else []
    failures, ious, checked = [*unreadable, *_listing_failures(out, manifest, index)], [], 0
    exact = fmt == "masks" or (fmt == "coco" and manifest["rle"])
    for record in manifest["images"]:
        truth = _truth(record, manifest, mask_of)
        try:
            found = _read_back(out, fmt, record, coco, index)
        except READ_BACK_ERRORS as exc:  # a damaged label file is a failure of the check, not of the checker
            failures.append(f"{record['name']}: cannot read its labels back ({' '.join(str(exc).split())[:200]})")
            continue
        if len(found) != len(truth):
            failures.append(f"{record['name']}: {len(found)} labels for {len(truth)} mask components")
            continue
        for k, ((mask, box), (got_mask, got_box)) in enumerate(zip(truth, found)):
            checked += 1
            if got_box is not None and max(abs(a - b) for a, b in zip(got_box, box)) > 1.0:
                failures.append(f"{record['name']} #{k}: box {got_box} != mask box {box}")
            if got_mask is not None:
                iou = _iou(mask, got_mask)
                ious.append(iou)
                if iou < (1.0 if exact else POLYGON_IOU):
                    failures.append(f"{record['name']} #{k}: IoU {iou:.4f} with its mask")
    return {"format": fmt, "images": len(manifest["images"]), "instances": checked,
            "min_iou": min(ious) if ious else None, "mean_iou": float(np.mean(ious)) if ious else None,
            "failures": failures, "ok": not failures}


READ_BACK_ERRORS = (DefectscopeError, OSError, ValueError, StopIteration, KeyError, TypeError, IndexError, AttributeError)


def _mask_entries(path: Path) -> list[dict]:
    """The instances of a masks export's index, each with its image, mask file and box."""
    entries = json.loads(path.read_text())["instances"]
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("mask"), str)
            and isinstance(e.get("box_xyxy"), list) and len(e["box_xyxy"]) == 4 for e in entries):
        raise ValueError("its instances are not a list of {image, mask, box_xyxy} entries")
    return entries


def _coco(path: Path) -> COCO:
    """A COCO document read by pycocotools (which prints its progress)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _read_back(out: Path, fmt: str, record: dict, coco: dict[str, COCO | None], index: list[dict]
               ) -> list[tuple[np.ndarray | None, tuple | None]]:
    """(mask or None, box (x, y, w, h) or None) per label of one image, in file order."""
    width, height = image_header(out / "images" / record["subset"] / record["name"])[:2]
    if fmt in ("yolo", "yolo-seg"):
        path = out / "labels" / record["subset"] / f"{Path(record['name']).stem}.txt"
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        found = []
        for row in rows:
            values = np.array([float(v) for v in row[1:]])
            if values.min() < 0 or values.max() > 1:
                raise DefectscopeError(f"{path}: coordinates outside [0, 1]")
            if fmt == "yolo":
                cx, cy, w, h = values * (width, height, width, height)
                found.append((None, (cx - w / 2, cy - h / 2, w, h)))
            else:
                points = (values.reshape(-1, 2) * (width, height)).ravel().tolist()
                found.append((rasterize([points], height, width), None))
        return found
    if fmt == "coco":
        coco = coco[record["subset"]]
        if coco is None:
            raise DefectscopeError(f"annotations/instances_{record['subset']}.json cannot be read")
        image_id = next(i["id"] for i in coco.dataset["images"] if i["file_name"] == record["name"])
        annotations = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
        return [(coco.annToMask(a).astype(bool), tuple(a["bbox"])) for a in annotations]
    entries = [e for e in index if e["image"] == f"images/{record['subset']}/{record['name']}"]
    found = []
    for entry in entries:
        mask = cv2.imread(str(out / entry["mask"]), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise DefectscopeError(f"cannot read mask {entry['mask']}")
        mask = mask > 127
        x0, y0, x1, y1 = entry["box_xyxy"]
        found.append((mask, (x0, y0, x1 - x0, y1 - y0)))
    return found
