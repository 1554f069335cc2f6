"""Dataset statistics from file headers (and the masks' pixels): classes, counts per split, sizes, masks, imbalance,
and the images that are copies of each other (by content)."""

from __future__ import annotations

from collections import Counter, defaultdict

from defectscope.data.decode import image_header
from defectscope.data.layout import GOOD, Dataset, Sample, empty_masks, is_combined
from defectscope.files import file_sha256
from defectscope.names import few

MODE_CHANNELS = {"1": 1, "L": 1, "P": 1, "I": 1, "F": 1, "I;16": 1, "I;16B": 1, "LA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4}


def _class_order(dataset: Dataset) -> list[str]:
    return [GOOD, *dataset.defect_types]


def copies(dataset: Dataset) -> list[list[Sample]]:
    """The groups of two or more images with the same bytes, each in the dataset's order."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in dataset.samples:
        groups[file_sha256(sample.path)].append(sample)
    return [group for group in groups.values() if len(group) > 1]


def _copy_warnings(groups: list[list[Sample]], dataset: Dataset) -> list[str]:
    """What copies mean for a model: a test image that is a training image flatters every metric; an image under two
    classes is a defect learned as good, or a part counted as two defects; copies within a class count twice."""
    def named(group: list[Sample]) -> str:
        return " = ".join(s.path.relative_to(dataset.root).as_posix() for s in group)

    mixed = [g for g in groups if len({s.defect for s in g}) > 1]
    across = [g for g in groups if len({s.split for s in g}) > 1 and g not in mixed]
    within = [g for g in groups if g not in mixed and g not in across]
    said = []
    if mixed:
        said.append(f"{len(mixed)} image(s) appear under two classes ({few([named(g) for g in mixed])}): an image has "
                    "one true class, and a defective one among the training goods is learned as good")
    if across:
        said.append(f"{len(across)} test image(s) are copies of training images ({few([named(g) for g in across])}): "
                    "a model learns them, and its metrics on them flatter it; remove them from one split")
    if within:
        said.append(f"{len(within)} image(s) are stored more than once within their class and split "
                    f"({few([named(g) for g in within])}): each copy counts again")
    return said


def summarize(dataset: Dataset) -> dict:
    """A JSON-ready summary of the dataset; reads image headers, the masks' pixels and every image's bytes (copies)."""
    classes = _class_order(dataset)
    empty = empty_masks(dataset.samples)
    same = copies(dataset)
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
        "copies": [[s.path.relative_to(dataset.root).as_posix() for s in group] for group in same],
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
                                               "fix them or move their images"] if empty else [])
                    + _copy_warnings(same, dataset),
    }


def imbalance_line(dataset: dict | None) -> str:
    """The dataset's class counts and imbalance, for the top of every table."""
    if not dataset:
        return ""
    counts = ", ".join(f"{name} {info['total']}" for name, info in dataset["per_class"].items())
    imbalance = dataset["imbalance"]
    return (f"Data: {dataset['root']} ({counts} images); imbalance {imbalance['largest_to_smallest']} "
            f"({imbalance['largest_class']} / {imbalance['smallest_class']})")
