"""Image decoding, the model's pre-processing and its inverse (model frame -> original image).

Every decode first reads the file header and refuses images above the pixel limit
(`DEFECTSCOPE_MAX_PIXELS`, default 50 megapixels), so a small file cannot claim gigabytes.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from defectscope.errors import DefectscopeError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MAX_PIXELS_ENV = "DEFECTSCOPE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel camera frame (8192 x 6104); MVTec's largest images are 1 MP

ImageSource = str | Path | np.ndarray


class ImageTooLarge(DefectscopeError):
    """An image above the pixel limit (refused from its header, before decoding)."""

cv2.setNumThreads(1)
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # failures become our errors, not [ WARN ] lines


def max_pixels() -> int:
    """The pixel limit per image: `DEFECTSCOPE_MAX_PIXELS` if set, else DEFAULT_MAX_PIXELS."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise DefectscopeError(f"{MAX_PIXELS_ENV} must be a whole number of pixels >= 1, got {value!r}")
    return limit


def _pil_failure(data: np.ndarray) -> str:
    """Ask Pillow why an image file's bytes cannot be decoded, for a precise error message."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            image.load()
    except UnidentifiedImageError:
        return "not an image file Pillow or OpenCV can read"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"corrupt or truncated ({exc})"
    return "OpenCV could not decode it"


def read_image(path: str | Path) -> np.ndarray:
    """Decode any common image (gray, RGBA, palette, 16-bit) to an RGB uint8 array HxWx3."""
    path = Path(path)
    return decode_image(_read_bytes(path), path)


def decode_image(data: np.ndarray, path: str | Path) -> np.ndarray:
    """Decode an image file's bytes (uint8 array) to RGB uint8 HxWx3; `path` names it in errors."""
    path = Path(path)
    image_header(path, data)  # size limit before any pixel is decoded
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        reason = _pil_failure(data)
        raise DefectscopeError(f"cannot decode image {path}: {reason}; replace or remove the file")
    if image.dtype != np.uint8:
        image = _to_uint8(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale 16-bit or float images to 8 bits using the dtype's full range."""
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    info = np.iinfo(image.dtype)
    scaled = (image.astype(np.float64) - info.min) / (info.max - info.min) * 255.0
    return scaled.round().astype(np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask to a boolean HxW array (any non-zero pixel is defective)."""
    path = Path(path)
    data = _read_bytes(path)
    image_header(path, data)
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise DefectscopeError(f"cannot decode mask {path}: {_pil_failure(path)}; replace or remove the file")
    return image > 0


def _read_bytes(path: Path) -> np.ndarray:
    """A file's bytes, read once for the header check and the decoder."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise DefectscopeError(f"cannot read image {path}: it does not exist") from exc
    except OSError as exc:
        raise DefectscopeError(f"cannot read image {path}: {exc.strerror or exc}") from exc


def image_header(path: str | Path, data: np.ndarray | None = None) -> tuple[int, int, str]:
    """Width, height and Pillow mode read from the file header only (no pixel decoding); checks the pixel limit.

    `data`, the file's bytes when the caller has already read them, spares a second read.
    """
    path = Path(path)
    try:
        if (data is not None and not data.size) or (data is None and path.is_file() and path.stat().st_size == 0):
            raise DefectscopeError(f"cannot decode image {path}: empty file; replace or remove the file")
        with warnings.catch_warnings():  # the limit below is ours; Pillow's bomb warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
                width, height, mode = image.width, image.height, image.mode
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image {path} is above the limit of {max_pixels():,} pixels ({exc})") from exc
    except FileNotFoundError as exc:
        raise DefectscopeError(f"cannot read image {path}: it does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "not an image file" if isinstance(exc, UnidentifiedImageError) else str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        raise DefectscopeError(f"cannot read image header of {path}: {reason}; replace or remove the file") from exc
    limit = max_pixels()
    if width * height > limit:
        raise ImageTooLarge(f"image {path} is {width}x{height} = {width * height:,} pixels, above the limit of {limit:,}; "
                               f"shrink it, or raise {MAX_PIXELS_ENV}")
    if width < 1 or height < 1:
        raise DefectscopeError(f"image {path} has no pixels ({width}x{height})")
    return width, height, mode


def image_size(source: ImageSource) -> tuple[int, int]:
    """(height, width) of an image file (from its header) or array."""
    if isinstance(source, np.ndarray):
        return source.shape[0], source.shape[1]
    width, height, _ = image_header(source)
    return height, width


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files and folders (searched recursively, hidden files skipped) -> image paths in a stable order."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not found:
                raise DefectscopeError(f"folder {item} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif item.exists() or item.is_symlink():
            paths.append(item)
        else:
            raise DefectscopeError(f"{item} does not exist")
    return paths


FRAME_MULTIPLE = 16  # the long side of a non-square frame is a multiple of the coarsest feature stride
MAX_ASPECT = 4.0  # frames are at most 4:1; longer images are squashed to that


def frame_aspect(sizes: Sequence[tuple[int, int]]) -> float:
    """The frame aspect (height / width) learned from (height, width) image sizes: their median, capped at 4:1."""
    ratios = np.array([h / w for h, w in sizes if h > 0 and w > 0], dtype=np.float64)
    if not len(ratios):
        return 1.0
    return float(np.clip(np.median(ratios), 1 / MAX_ASPECT, MAX_ASPECT))


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
        return cls(
            image_size=int(data["image_size"]),
            crop=None if data.get("crop") is None else int(data["crop"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            aspect=float(data.get("aspect", 1.0)),
        )

    def resize_crop(self, image: np.ndarray, interpolation: int | None = None) -> np.ndarray:
        """Resize an HxW[xC] array to the model frame and center-crop it."""
        height, width = self.frame_shape
        if interpolation is None:
            shrinking = image.shape[0] > height or image.shape[1] > width
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        resized = cv2.resize(image, (width, height), interpolation=interpolation)
        (top, left), (rows, cols) = self._crop_offsets(), self.input_shape
        return resized[top : top + rows, left : left + cols]

    def _crop_offsets(self) -> tuple[int, int]:
        (height, width), (rows, cols) = self.frame_shape, self.input_shape
        return (height - rows) // 2, (width - cols) // 2

    def mask_to_input(self, mask: np.ndarray) -> np.ndarray:
        """Bring a boolean mask into the model frame (area-resize, then majority vote)."""
        frame = self.resize_crop(mask.astype(np.float32), cv2.INTER_AREA)
        return frame >= 0.5

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> normalized float32 NCHW."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (batch.float() - mean) / std

    def to_original(self, maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Map model-frame maps N x h x w back onto an original HxW image.

        The crop is undone by padding with each map's minimum (the border outside the
        crop is not inspected), then the frame is resized to HxW.
        """
        (frame_h, frame_w), (rows, cols) = self.frame_shape, self.input_shape
        (top, left), (map_h, map_w) = self._crop_offsets(), maps.shape[-2:]
        scale_h, scale_w = map_h / rows, map_w / cols
        lead_h, lead_w = round(top * scale_h), round(left * scale_w)
        trail_h = round(frame_h * scale_h) - map_h - lead_h
        trail_w = round(frame_w * scale_w) - map_w - lead_w
        if lead_h or lead_w or trail_h or trail_w:
            floor = maps.amin(dim=(-2, -1), keepdim=True)
            maps = F.pad(maps - floor, (lead_w, trail_w, lead_h, trail_h), value=0.0) + floor
        return F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]



class PreprocessedImages(torch.utils.data.Dataset):
    """Decodes and resizes images in DataLoader workers; yields uint8 CHW tensors and original sizes."""

    def __init__(self, images: Sequence[ImageSource], preprocess: Preprocess) -> None:
        self.images = list(images)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.images[index]
        image = source if isinstance(source, np.ndarray) else read_image(source)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DefectscopeError(f"image {index} must be an RGB uint8 array HxWx3, got {image.shape}")
        frame = self.preprocess.resize_crop(image)
        return torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1))), torch.tensor(image.shape[:2])


def iterate_batches(
    images: Sequence[ImageSource], preprocess: Preprocess, batch_size: int = 32, workers: int = 2,
    errors: list[str | None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 NCHW batch, original sizes N x 2); decoding runs ahead in a thread pool.

    OpenCV releases the GIL while decoding and resizing, so threads overlap decoding with
    the model's compute without the start-up cost of worker processes. An unreadable image
    stops the iteration, or, given an `errors` list, becomes a blank frame of size 0 x 0 and
    its reason is appended there (None for every readable image, in input order).
    """
    dataset = PreprocessedImages(images, preprocess)
    blank = torch.zeros(3, *preprocess.input_shape, dtype=torch.uint8)

    def load(index: int) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        try:
            return (*dataset[index], None)
        except DefectscopeError as exc:
            if errors is None:
                raise
            return blank, torch.zeros(2, dtype=torch.long), str(exc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = [pool.submit(load, i) for i in range(min(len(dataset), 2 * batch_size))]
        submitted = len(pending)
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            items = [pending[i - start].result() for i in range(start, stop)]
            pending = pending[stop - start :]
            while submitted < min(len(dataset), stop + 2 * batch_size):
                pending.append(pool.submit(load, submitted))
                submitted += 1
            if errors is not None:
                errors += [error for _, _, error in items]
            yield torch.stack([frame for frame, _, _ in items]), torch.stack([size for _, size, _ in items])


def load_normalized(images: Sequence[ImageSource], preprocess: Preprocess) -> torch.Tensor:
    """Every image decoded, resized / cropped and normalized: N x 3 x h x w."""
    return torch.cat([preprocess.normalize(batch) for batch, _ in iterate_batches(images, preprocess)])


def masks_in_frame(masks: Sequence[str | Path | None], preprocess: Preprocess) -> np.ndarray:
    """Masks brought into the model frame, N x h x w bool; None stands for an empty mask (a good image)."""
    blank = np.zeros(preprocess.input_shape, dtype=bool)
    return np.stack([preprocess.mask_to_input(read_mask(m)) if m else blank for m in masks])
