"""Pseudo-label agreement and the supervised segmenter vs PatchCore, on one MVTec-layout category.

    python benchmarks/labels.py --data ../shared/datasets/mvtec_ad/bottle

1. PatchCore (defaults) is fitted on the good training images; its maps on the test images,
   thresholded at its calibrated threshold, become pseudo-labels, scored against the masks with
   COCOeval (box and mask AP) and the mean per-image mask IoU.
2. The segmenter is trained k-fold on the test images' masks (+ some good training images);
   every test image's map comes from a fold that did not train on it. Both models' maps are
   compared in the same frame (resize 288, crop 256): pixel AUROC, AUPRO, and the mean IoU and
   Dice over defective images at the pixel threshold that maximizes the pooled Dice.
Writes benchmarks/results/labels-<category>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from defectscope import __version__, load_dataset
from defectscope.data.images import masks_in_frame
from defectscope.detectors.segmenter import SegmenterConfig, held_out_maps
from defectscope.export.pseudo import agreement
from defectscope.metrics import pixel_metrics
from defectscope.pipeline import fit_detector


def best_dice(masks: np.ndarray, maps: np.ndarray, defective: np.ndarray) -> dict:
    """Threshold maximizing pooled Dice over 200 quantiles of the maps; mean IoU and Dice of defective images there."""
    best = (-1.0, 0.0)
    for threshold in np.unique(np.quantile(maps, np.linspace(0.9, 0.9999, 200))):
        predicted = maps >= threshold
        dice = 2 * (predicted & masks).sum() / max(predicted.sum() + masks.sum(), 1)
        best = max(best, (dice, threshold))
    predicted = maps >= best[1]
    inter = (predicted & masks).sum((1, 2))[defective]
    union = (predicted | masks).sum((1, 2))[defective]
    sizes = (predicted.sum((1, 2)) + masks.sum((1, 2)))[defective]
    return {"threshold": float(best[1]), "pooled_dice": float(best[0]), "mean_iou": float(np.mean(inter / np.maximum(union, 1))),
            "mean_dice": float(np.mean(2 * inter / np.maximum(sizes, 1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = load_dataset(args.data)
    test = dataset.test
    patchcore, _ = fit_detector(dataset, "patchcore", {})
    start = time.perf_counter()
    pseudo = agreement(dataset, patchcore)
    pseudo["seconds"] = time.perf_counter() - start
    masks = masks_in_frame([s.mask for s in test], patchcore.preprocess)
    defective = np.array([bool(s.label) for s in test])
    config = SegmenterConfig(epochs=args.epochs, folds=args.folds)
    start = time.perf_counter()
    segmenter_maps, _, _ = held_out_maps(dataset, config)
    segmenter_seconds = time.perf_counter() - start
    rows = {}
    for name, maps in (("patchcore (good images only)", np.stack(patchcore.predict([s.path for s in test], map_size="input").maps)),
                       (f"segmenter ({args.folds}-fold, masks)", segmenter_maps)):
        rows[name] = {**pixel_metrics(masks, maps), **best_dice(masks, maps, defective)}
    rows[f"segmenter ({args.folds}-fold, masks)"]["seconds"] = segmenter_seconds
    category = args.data.name
    result = {"category": category, "library_version": __version__, "pseudo_labels": pseudo, "maps": rows,
              "segmenter_config": config.to_dict(), "command": f"python benchmarks/labels.py --data {args.data}"}
    lines = [f"`{result['command']}`", "", f"## Pseudo-labels from PatchCore ({category}, threshold {pseudo['threshold']:.3f})", "",
             "| box AP | box AP50 | mask AP | mask AP50 | mean mask IoU | predicted / true instances |", "|---|---|---|---|---|---|",
             f"| {pseudo['box_ap']:.3f} | {pseudo['box_ap50']:.3f} | {pseudo['mask_ap']:.3f} | {pseudo['mask_ap50']:.3f} | "
             f"{pseudo['mean_mask_iou']:.3f} | {pseudo['predicted_instances']} / {pseudo['true_instances']} |", "",
             f"## Segmenter vs PatchCore maps ({category}, {len(test)} test images, frame 288/256)", "",
             "| model | pixel AUROC | AUPRO | mean IoU | mean Dice | pooled Dice | threshold |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['mean_iou']:.3f} | {r['mean_dice']:.3f} | "
              f"{r['pooled_dice']:.3f} | {r['threshold']:.3f} |" for name, r in rows.items()]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"labels-{category}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"labels-{category}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
