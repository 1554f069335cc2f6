"""The model frame: resize to the frame (keeping the products' aspect), center crop, and the way back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from defectscope.errors import DefectscopeError
from defectscope.maps import resize_maps

FRAME_MULTIPLE = 16  # the long side of a non-square frame is a multiple of the coarsest feature stride
MAX_ASPECT = 4.0  # frames are at most 4:1; longer images are squashed to that
SHAPE_TOLERANCE = 0.05  # images whose aspect is within 5% of the others' count as one shape


def other_shapes(sizes: Sequence[tuple[int, int]]) -> Counter[tuple[int, int]]:
    """The (height, width) sizes whose aspect differs from the median aspect by more than SHAPE_TOLERANCE, counted:
    images of another shape than the rest, which one frame squashes."""
    ratios = np.array([h / w if h > 0 and w > 0 else np.nan for h, w in sizes], dtype=np.float64)
    if not len(ratios) or np.isnan(ratios).all():
        return Counter()
    off = np.abs(ratios / np.nanmedian(ratios) - 1) > SHAPE_TOLERANCE
    return Counter(size for size, odd in zip(sizes, off) if odd)


def frame_aspect(sizes: Sequence[tuple[int, int]]) -> float:
    """The frame aspect (height / width) learned from (height, width) image sizes: their median, capped at 4:1."""
    ratios = np.array([h / w for h, w in sizes if h > 0 and w > 0], dtype=np.float64)
    if not len(ratios):
        return 1.0
    return float(np.clip(np.median(ratios), 1 / MAX_ASPECT, MAX_ASPECT))


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and np.isfinite(value)


def _is_whole(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= 1 << 14


@dataclass(frozen=True)
class Preprocess:
    """Resize to the frame, optional center crop and normalization; travels inside every model file.

    `image_size` is the frame's short side; the long side follows `aspect` (height / width, learned
    from the training images), so a 300x400 product is not squashed. `crop` is the short side after
    the center crop; the long side loses the same margin.
    """

    image_size: int = 256
    crop: int | None = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    aspect: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise DefectscopeError(f"image size must be at least 16 pixels, got {self.image_size}")
        if self.crop is not None and not 16 <= self.crop <= self.image_size:
            raise DefectscopeError(
                f"crop must be between 16 and the image size {self.image_size}, got {self.crop}"
            )
        if not 1 / MAX_ASPECT <= self.aspect <= MAX_ASPECT:
            raise DefectscopeError(f"frame aspect must be between 1/{MAX_ASPECT:g} and {MAX_ASPECT:g}, got {self.aspect}")

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(height, width) of the resized image, before the crop."""
        short = self.image_size
        long = max(short, round(short * max(self.aspect, 1 / self.aspect) / FRAME_MULTIPLE) * FRAME_MULTIPLE)
        return (long, short) if self.aspect > 1 else (short, long)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the tensor the model sees."""
        margin = self.image_size - (self.crop or self.image_size)
        height, width = self.frame_shape
        return height - margin, width - margin

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        """A frame from its stored form; types and values checked (DefectscopeError otherwise)."""
        if not isinstance(data, dict) or "image_size" not in data or "mean" not in data or "std" not in data:
            raise DefectscopeError("a frame needs image_size, mean and std")
        triples = {key: data[key] for key in ("mean", "std")}
        if not all(isinstance(v, list | tuple) and len(v) == 3 and all(_is_number(x) and x > -1e6 for x in v) for v in triples.values()) \
                or not all(x > 0 for x in triples["std"]):
            raise DefectscopeError("a frame's mean and std must be three finite numbers each (std > 0)")
        if not _is_whole(data["image_size"]) or not (data.get("crop") is None or _is_whole(data["crop"])) \
                or not _is_number(data.get("aspect", 1.0)):
            raise DefectscopeError("a frame's image_size and crop must be whole numbers and its aspect a number")
        return cls(image_size=data["image_size"], crop=data.get("crop"), mean=tuple(map(float, triples["mean"])),
                   std=tuple(map(float, triples["std"])), aspect=float(data.get("aspect", 1.0)))

    def resize_crop(self, image: np.ndarray) -> np.ndarray:
        """Resize an HxW[x3] uint8 or HxW float32 array to the model frame (Pillow: area average when
        shrinking, bilinear when enlarging) and center-crop it."""
        height, width = self.frame_shape
        shrinking = image.shape[0] >= height and image.shape[1] >= width
        resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
        resized = np.asarray(Image.fromarray(image).resize((width, height), resample))
        (top, left), (rows, cols) = self._crop_offsets(), self.input_shape
        return resized[top : top + rows, left : left + cols]

    def _crop_offsets(self) -> tuple[int, int]:
        (height, width), (rows, cols) = self.frame_shape, self.input_shape
        return (height - rows) // 2, (width - cols) // 2

    def mask_to_input(self, mask: np.ndarray) -> np.ndarray:
        """Bring a boolean mask into the model frame (resized as images are, then majority vote)."""
        frame = self.resize_crop(mask.astype(np.float32))
        return frame >= 0.5

    def inspected_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The part of an original HxW image the model sees: (top, left, bottom, right) in its pixels (the crop)."""
        rows, cols = self.input_shape
        x0, y0, x1, y1 = self.box_to_original((0, 0, cols, rows), height, width)
        return round(y0), round(x0), round(y1), round(x1)

    def box_to_original(self, box: tuple[float, ...], height: int, width: int) -> tuple[float, float, float, float]:
        """A box (x0, y0, x1, y1) in model-frame pixels -> on the original HxW image (undo the crop, then the resize)."""
        (frame_h, frame_w), (top, left) = self.frame_shape, self._crop_offsets()
        x0, y0, x1, y1 = box
        sx, sy = width / frame_w, height / frame_h
        return (x0 + left) * sx, (y0 + top) * sy, (x1 + left) * sx, (y1 + top) * sy

    def to_original(self, frame_map: np.ndarray, height: int, width: int) -> np.ndarray:
        """Map one model-frame map h x w back onto an original HxW image (bilinear).

        The crop is undone by padding with the map's minimum (the border outside the crop is not
        inspected), then the frame is resized to HxW.
        """
        (frame_h, frame_w), (rows, cols) = self.frame_shape, self.input_shape
        (top, left), (map_h, map_w) = self._crop_offsets(), frame_map.shape
        scale_h, scale_w = map_h / rows, map_w / cols
        lead_h, lead_w = round(top * scale_h), round(left * scale_w)
        trail_h = round(frame_h * scale_h) - map_h - lead_h
        trail_w = round(frame_w * scale_w) - map_w - lead_w
        frame_map = np.asarray(frame_map, dtype=np.float32)
        if lead_h or lead_w or trail_h or trail_w:
            frame_map = np.pad(frame_map, ((lead_h, trail_h), (lead_w, trail_w)), constant_values=frame_map.min())
        return resize_maps(frame_map[None], (height, width))[0]
