"""Labels and instances on one MVTec-layout category: PatchCore pseudo-labels, the segmenter, the supervised detector.

    python benchmarks/labels.py --data ../shared/datasets/mvtec_ad/bottle

1. PatchCore (defaults) is fitted on the good training images; its maps on the test images,
   thresholded at its region threshold (`Calibration.region_threshold`), become pseudo-labels,
   scored against the masks with COCOeval (box and mask AP) and the mean per-image mask IoU.
2. The segmenter is trained k-fold on the test images' masks (+ some good training images);
   every test image's map comes from a fold that did not train on it. Both models' maps are
   compared in the segmenter's frame (resize 288, crop 256): pixel AUROC, AUPRO, and the mean IoU
   and Dice over defective images at the pixel threshold that maximizes the pooled Dice.
3. Instances per defect type, all from COCOeval at each image's original size: PatchCore's regions
   (class-agnostic, scored by peak / threshold), the segmenter's held-out regions above 0.5
   (class-agnostic, scored by their peak) and the detector's held-out typed instances (k-fold, same
   folds as the segmenter); image AUROC of each (max region score, or max instance confidence),
   the spread over folds, fit seconds per model and ms per image.
Writes benchmarks/results/labels-<category>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from defectscope import __version__, load_dataset
from defectscope.data.decode import image_size
from defectscope.data.folds import pick_good
from defectscope.data.images import masks_in_frame
from defectscope.detectors.instances import InstanceConfig, held_out_instances
from defectscope.detectors.segmenter import Segmenter, SegmenterConfig, held_out_maps
from defectscope.export.pseudo import agreement, map_instances
from defectscope.instance_metrics import AGNOSTIC, detected_instance, instance_metrics, per_fold
from defectscope.metrics import image_auroc, pixel_metrics
from defectscope.pipeline import fit_detector
from defectscope.regions import Instance


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


def agnostic(instances: list[Instance]) -> list[Instance]:
    return [replace(instance, category=AGNOSTIC) for instance in instances]


def region_rows(name: str, samples: list, predicted: list[list[Instance]], scores: np.ndarray, folds: list[int] | None,
                types: list[str], fit_s: float, ms: float, labelled: str) -> tuple[list[dict], dict]:
    """Per-type AP rows and the summary row of one method."""
    metrics = instance_metrics(samples, predicted, types)
    labels = np.array([s.label for s in samples])
    spread = per_fold(samples, predicted, scores, folds, types) if folds is not None else None
    rows = [{"method": name, "subset": subset, **values} for subset, values in metrics.items()]
    summary = {"method": name, "labelled": labelled, "image_auroc": image_auroc(labels, scores), "fit_s": fit_s, "ms_per_image": ms,
               "fold_mask_ap50": None if spread is None else [f["mask_ap50"] for f in spread],
               "fold_image_auroc": None if spread is None else [f["image_auroc"] for f in spread]}
    return rows, summary


def _spread(values: list[float] | None) -> str:
    return "n/a (no folds)" if values is None else f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=20, help="segmenter epochs")
    parser.add_argument("--detector-epochs", type=int, default=InstanceConfig.epochs)
    parser.add_argument("--folds", type=int, default=3, help="folds of the segmenter and the detector")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = load_dataset(args.data)
    test, types = list(dataset.test), list(dataset.defect_types)
    defective = np.array([bool(s.label) for s in test])
    paths = [s.path for s in test]

    start = time.perf_counter()
    patchcore, _ = fit_detector(dataset, "patchcore", {})
    patchcore_fit = time.perf_counter() - start
    pseudo = agreement(dataset, patchcore)
    start = time.perf_counter()
    patchcore_prediction = patchcore.predict(paths)
    patchcore_ms = (time.perf_counter() - start) / len(paths) * 1000
    threshold = patchcore.calibration.region_threshold
    patchcore_regions = [agnostic(map_instances(m, threshold, 1, p)) for m, p in zip(patchcore_prediction.maps, paths)]

    config = SegmenterConfig(epochs=args.epochs, folds=args.folds)
    segmenter = Segmenter(config)
    segmenter.learn_aspect(paths)
    frame = segmenter.preprocess
    start = time.perf_counter()
    segmenter_maps, segmenter_folds, segmenter_ms = held_out_maps(dataset, config)
    segmenter_fit = (time.perf_counter() - start - segmenter_ms * len(paths) / 1000) / args.folds
    original = [frame.to_original(m, *image_size(p)) for m, p in zip(segmenter_maps, paths)]
    segmenter_regions = [agnostic(map_instances(m, 0.5, 1, p)) for m, p in zip(original, paths)]

    detector_config = InstanceConfig(folds=args.folds, epochs=args.detector_epochs)
    held = held_out_instances(dataset, detector_config)
    detector_instances = [[detected_instance(d, types) for d in image] for image in held.instances]

    masks = masks_in_frame([s.mask for s in test], frame)
    in_frame = np.stack([frame.resize_crop(m) for m in patchcore_prediction.maps])
    maps = {"patchcore (good images only)": in_frame, f"segmenter ({args.folds}-fold, masks)": segmenter_maps}
    rows = {name: {**pixel_metrics(masks, m), **best_dice(masks, m, defective)} for name, m in maps.items()}

    good_train = len(pick_good(dataset.train, config.good_train, config.seed))
    labelled = f"{len(test)} test images' masks ({args.folds}-fold) + good"
    per_type, summaries = [], []
    for name, predicted, scores, folds, fit_s, ms, used in (
            ("patchcore regions", patchcore_regions, patchcore_prediction.scores, None, patchcore_fit, patchcore_ms,
             f"{len(dataset.train)} good training images, no labels"),
            ("segmenter regions", segmenter_regions, segmenter_maps.max(axis=(1, 2)), segmenter_folds, segmenter_fit,
             segmenter_ms, f"{labelled} ({good_train} good training images)"),
            ("detector instances", detector_instances, held.scores, held.folds, held.fit_seconds / args.folds,
             held.infer_ms, f"{labelled} ({detector_config.good_train} good training images)")):
        method_rows, summary = region_rows(name, test, predicted, np.asarray(scores), folds, types, fit_s, ms, used)
        per_type += method_rows
        summaries.append(summary)

    category = args.data.name
    result = {"category": category, "library_version": __version__, "pseudo_labels": pseudo, "maps": rows,
              "instances": per_type, "summary": summaries, "segmenter_config": config.to_dict(),
              "detector_config": detector_config.to_dict(), "command": f"python benchmarks/labels.py --data {args.data}"}
    lines = [f"`{result['command']}`", "", f"## Pseudo-labels from PatchCore ({category}, region threshold {pseudo['threshold']:.3f})", "",
             "| box AP | box AP50 | mask AP | mask AP50 | mean mask IoU | predicted / true instances |", "|---|---|---|---|---|---|",
             f"| {pseudo['box_ap']:.3f} | {pseudo['box_ap50']:.3f} | {pseudo['mask_ap']:.3f} | {pseudo['mask_ap50']:.3f} | "
             f"{pseudo['mean_mask_iou']:.3f} | {pseudo['predicted_instances']} / {pseudo['true_instances']} |", "",
             f"## Segmenter vs PatchCore maps ({category}, {len(test)} test images, the segmenter's frame 288/256)", "",
             "| model | pixel AUROC | AUPRO | mean IoU | mean Dice | pooled Dice | threshold |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['mean_iou']:.3f} | {r['mean_dice']:.3f} | "
              f"{r['pooled_dice']:.3f} | {r['threshold']:.3f} |" for name, r in rows.items()]
    lines += ["", f"## Defect instances per type ({category}; COCOeval at original size, held-out predictions)", "",
              "Overall ignores the type; a type's row uses the good images and that type's images, where the "
              "detector's instances must carry that type and the class-agnostic regions count as it.", "",
              "| method | subset | box AP | box AP50 | mask AP | mask AP50 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['subset']} | {r['box_ap']:.3f} | {r['box_ap50']:.3f} | {r['mask_ap']:.3f} | {r['mask_ap50']:.3f} |"
              for r in per_type]
    lines += ["", "| method | learns from | image AUROC | fold image AUROC | fold mask AP50 | fit s (one model) | ms/img |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['labelled']} | {r['image_auroc']:.3f} | {_spread(r['fold_image_auroc'])} | "
              f"{_spread(r['fold_mask_ap50'])} | {r['fit_s']:.1f} | {r['ms_per_image']:.0f} |" for r in summaries]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"labels-{category}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"labels-{category}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
