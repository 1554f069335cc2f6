"""Defect instances: connected components of a mask, with boxes, polygons and RLE."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as coco_mask


@dataclass
class Instance:
    """One connected defect region of one image."""

    category: int
    mask: np.ndarray  # bool H x W
    box: tuple[int, int, int, int]  # x, y, width, height in pixels
    area: int
    score: float | None = None  # pseudo-labels carry the detector's score


def components(mask: np.ndarray, min_area: int = 1) -> list[tuple[np.ndarray, tuple[int, int, int, int], int]]:
    """(mask, box, area) of each 8-connected component with at least `min_area` pixels, largest first."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    keep.sort(key=lambda i: (-stats[i, cv2.CC_STAT_AREA], i))
    return [(labels == i, tuple(int(v) for v in stats[i, :4]), int(stats[i, cv2.CC_STAT_AREA])) for i in keep]


def polygons(mask: np.ndarray, tolerance: float = 0.5, scale: int = 4, min_iou: float = 0.97) -> list[list[float]]:
    """Outer outlines of a component as flat [x1, y1, x2, y2, ...] lists (>= 3 points), simplified.

    The outline is traced on the component's box upscaled `scale` times, so vertices sit 1/(2*scale)
    pixel inside the mask's edge instead of at the centres of its boundary pixels (a polygon through
    pixel centres misses half of every boundary pixel, a lot for small blobs). `tolerance` (pixels)
    is an upper bound: it is halved until the rasterized polygons overlap the mask with `min_iou`.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    x0, y0 = int(xs.min()), int(ys.min())
    box = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
    big = cv2.resize(box.astype(np.uint8), (box.shape[1] * scale, box.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(np.pad(big, 1), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    while True:
        result = []
        for contour in contours:
            simplified = cv2.approxPolyDP(contour, tolerance * scale, True) if tolerance > 0 else contour
            points = (simplified.reshape(-1, 2).astype(np.float64) - 1 + 0.5) / scale
            if len(points) >= 3:
                result.append([round(float(v), 2) for v in points.ravel()])
        if tolerance < 0.05 or not result:
            break
        drawn = rasterize(result, *box.shape)
        if (drawn & box).sum() >= min_iou * (drawn | box).sum():
            break
        tolerance /= 2
    return [(np.array(p).reshape(-1, 2) + (x0, y0)).ravel().round(2).tolist() for p in result]


def rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding (column-major, exact, holes included) with a JSON-ready string."""
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def rasterize(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons or RLE) back to a bool mask, with pycocotools."""
    if isinstance(segmentation, list):
        encoded = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    else:
        encoded = {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    return coco_mask.decode(encoded).astype(bool)
