"""Dataset statistics from file headers (and the masks' pixels): classes, counts per split, sizes, masks, imbalance."""

from __future__ import annotations

from collections import Counter

from defectscope.data.decode import image_header
from defectscope.data.layout import GOOD, Dataset, empty_masks, is_combined
from defectscope.names import few

MODE_CHANNELS = {"1": 1, "L": 1, "P": 1, "I": 1, "F": 1, "I;16": 1, "I;16B": 1, "LA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4}


def _class_order(dataset: Dataset) -> list[str]:
    return [GOOD, *dataset.defect_types]


def summarize(dataset: Dataset) -> dict:
    """A JSON-ready summary of the dataset; reads image headers, and of the masks their pixels."""
    classes = _class_order(dataset)
    empty = empty_masks(dataset.samples)
    per_split: dict[str, Counter] = {"train": Counter(), "test": Counter()}
    for sample in dataset.samples:
        per_split[sample.split][sample.defect] += 1
    formats = Counter(image_header(s.path) for s in dataset.samples)
    totals = Counter(s.defect for s in dataset.samples)
    defects = dataset.defect_types
    smallest = min((totals[c] for c in classes if totals[c]), default=0)
    largest = max((totals[c] for c in classes), default=0)
    total = len(dataset.samples)
    return {
        "root": str(dataset.root),
        "layout": dataset.layout,
        "total_images": total,
        "defect_classes": {
            "count": len(defects),
            "names": defects,
            "combined": [d for d in defects if is_combined(d)],
        },
        "splits": {
            split: {"images": sum(counts.values()), "per_class": {c: counts[c] for c in classes if counts[c]}}
            for split, counts in per_split.items()
        },
        "per_class": {
            c: {"train": per_split["train"][c], "test": per_split["test"][c], "total": totals[c]} for c in classes
        },
        "distribution": {
            "train_fraction": round(per_split["train"].total() / total, 4) if total else 0.0,
            "test_good": per_split["test"][GOOD],
            "test_defective": sum(per_split["test"][d] for d in defects),
        },
        "masks": sum(1 for s in dataset.samples if s.mask is not None),
        "defective_without_mask": sum(1 for s in dataset.samples if s.label == 1 and s.mask is None),
        "empty_masks": len(empty),
        "image_formats": [
            {"width": w, "height": h, "mode": mode, "channels": MODE_CHANNELS.get(mode, 0), "count": n}
            for (w, h, mode), n in sorted(formats.items(), key=lambda item: (-item[1], item[0]))
        ],
        "imbalance": {
            "good_per_defect": {d: round(totals[GOOD] / totals[d], 3) for d in defects},
            "largest_to_smallest": round(largest / smallest, 3) if smallest else None,
            "largest_class": max(classes, key=lambda c: totals[c]) if total else None,
            "smallest_class": min(classes, key=lambda c: (totals[c] or float("inf"))) if total else None,
        },
        "warnings": list(dataset.warnings) + ([f"{len(empty)} mask(s) of defective images mark no pixel: {few(empty)}; "
                                               "fix them or move their images"] if empty else []),
    }


def imbalance_line(dataset: dict | None) -> str:
    """The dataset's class counts and imbalance, for the top of every table."""
    if not dataset:
        return ""
    counts = ", ".join(f"{name} {info['total']}" for name, info in dataset["per_class"].items())
    imbalance = dataset["imbalance"]
    return (f"Data: {dataset['root']} ({counts} images); imbalance {imbalance['largest_to_smallest']} "
            f"({imbalance['largest_class']} / {imbalance['smallest_class']})")
