"""Image decoding with a pixel limit, read from the header before any pixel is decoded.

Every decode first reads the file header and refuses images above the pixel limit
(`DEFECTSCOPE_MAX_PIXELS`, default 50 megapixels), so a small file cannot claim gigabytes.
PNG files are decoded by imagecodecs' libpng when it is installed (twice OpenCV's speed, and it
releases the GIL), other files by OpenCV when it is installed; without them (the slim runtime)
Pillow decodes the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectscope.errors import DataWarning, DefectscopeError, InputError
from defectscope.files import file_sha256, open_regular, read_regular
from defectscope.names import few

try:
    import cv2
except ImportError:  # the torch-free runtime may be installed without OpenCV
    cv2 = None
try:
    import imagecodecs
except ImportError:  # nor imagecodecs
    imagecodecs = None

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MAX_PIXELS_ENV = "DEFECTSCOPE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000  # a 50-megapixel camera frame (8192 x 6104); MVTec's largest images are 1 MP
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # little and big endian, classic and BigTIFF
FEW_BITS = 12  # 16-bit images below 2**12 (unscaled 12-bit data) keep at most 16 gray levels in their top byte


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, read where the file is (or why they could not be), to be decoded wherever it is scored:
    the same pixels, and the same error, as `read_image` on the file."""

    path: str
    data: bytes | None
    error: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> EncodedImage:
        try:
            return cls(str(path), _read_bytes(Path(path)).tobytes())
        except DefectscopeError as exc:
            return cls(str(path), None, str(exc))

    def decode(self) -> np.ndarray:
        return decode_image(self._bytes(), self.path, checked=True)

    def size(self) -> tuple[int, int]:
        """(height, width), from the header."""
        width, height, _ = image_header(self.path, self._bytes())
        return height, width

    def _bytes(self) -> np.ndarray:
        if self.data is None:
            raise InputError(self.error or f"cannot read image {self.path}")
        return np.frombuffer(self.data, dtype=np.uint8)


ImageSource = str | Path | np.ndarray | EncodedImage


TRAIN_DIGESTS = "train.sha256"  # the tensor of a model or deployment file that holds `content_digests` of its training


def content_digests(sources: Sequence[ImageSource]) -> np.ndarray:
    """The sha256 of each image as an N x 32 uint8 array: of a file's bytes, an encoded image's bytes, or an array's
    pixels; what a model records of the images it learned from, to know them again wherever they lie."""
    digests = []
    for source in sources:
        if isinstance(source, EncodedImage):
            digests.append(hashlib.sha256(source.data or b"").digest())
        elif isinstance(source, np.ndarray):
            digests.append(hashlib.sha256(np.ascontiguousarray(source).tobytes()).digest())
        else:
            digests.append(bytes.fromhex(file_sha256(Path(source))))
    return np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32).copy()


def learned_among(digests: np.ndarray | None, paths: Sequence[str | Path]) -> list[Path]:
    """The image files among `paths` whose content is one of `digests` (a model's training images); none when the
    model recorded none."""
    if digests is None or not len(paths):
        return []
    known = {row.tobytes() for row in digests}
    return [Path(path) for path in paths if bytes.fromhex(file_sha256(Path(path))) in known]


class ImageTooLarge(InputError):
    """An image above the pixel limit (refused from its header, before decoding)."""

@lru_cache(maxsize=1)
def _opencv_for_decoding() -> None:
    """Set OpenCV up for decoding, on the first decode (not on import): one thread per call, since decoders already
    run one per worker thread (a pool of its own would take the cores twice); errors only in its log, since a
    failure becomes our error with the file's name, not a [ WARN ] line."""
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


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
        raise InputError(f"{MAX_PIXELS_ENV} must be a whole number of pixels >= 1, got {value!r}")
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
    return decode_image(_read_bytes(path), path, checked=True)


def decode_image(data: np.ndarray, path: str | Path, checked: bool = False) -> np.ndarray:
    """Decode an image file's bytes (uint8 array) to RGB uint8 HxWx3; `path` names it in errors.

    `checked` says the header already passed the pixel limit (read_image checks it before reading the pixels).
    """
    path = Path(path)
    if not checked:
        image_header(path, data)  # size limit before any pixel is decoded
    image = _png_decode(data)
    if image is None:
        image = _opencv_rgb(data) if cv2 is not None else _pillow_decode(data)
    if image is None:
        reason = _pil_failure(data)
        raise InputError(f"cannot decode image {path}: {reason}; replace or remove the file")
    if image.dtype == np.uint16 and image.size and int(image.max()) < 1 << FEW_BITS:
        warnings.warn(f"16-bit images whose values all stay below {1 << FEW_BITS} (a {FEW_BITS}-bit camera's, stored "
                      "unscaled) are read by their top 8 of 16 bits and keep at most 16 levels of gray, which hides "
                      "faint defects: save them scaled to the full 16-bit range, or as 8-bit", DataWarning)
    if image.dtype != np.uint8:
        image = _to_uint8(image)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def _png_decode(data: np.ndarray) -> np.ndarray | None:
    """A PNG's gray or RGB pixels (alpha dropped, 8 or 16 bits) by imagecodecs' libpng; None when it is not installed,
    the file is not a PNG, or it cannot decode it (then the other decoders try, and name the failure)."""
    if imagecodecs is None or data[:8].tobytes() != PNG_SIGNATURE:
        return None
    try:
        image = imagecodecs.png_decode(data)
    except (imagecodecs.PngError, ValueError, MemoryError):
        return None
    if image.ndim == 3 and image.shape[2] != 3:  # gray + alpha, or RGBA
        image = np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 2 else image[:, :, :3])
    return image


def _opencv_rgb(data: np.ndarray) -> np.ndarray | None:
    """OpenCV's decode of any image, gray as one channel, color as RGB (alpha dropped); None when it cannot decode."""
    image = _opencv_decode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim == 2:
        return image
    if image.shape[2] == 4 and image.dtype == np.uint8 and data[:4].tobytes() in TIFF_SIGNATURES:
        return _pillow_decode(data)  # OpenCV reads it through libtiff's RGBA reader, which multiplies colour by alpha
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def _opencv_decode(data: np.ndarray, flags: int) -> np.ndarray | None:
    _opencv_for_decoding()
    return cv2.imdecode(data, flags)


def _pillow_decode(data: np.ndarray, gray: bool = False) -> np.ndarray | None:
    """Pillow's decode: 8- and 16-bit gray as one channel, others as RGB (or as 8-bit gray); None when it cannot decode."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            if image.mode.startswith("I;16"):
                return np.asarray(image).astype(np.uint16)
            if image.mode in ("I", "F"):
                return np.asarray(image)
            wanted = "L" if gray or image.mode in ("L", "LA", "1") else "RGB"
            return np.asarray(image if image.mode == wanted else image.convert(wanted))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


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
    """Decode a mask to a boolean HxW array: a pixel is defective above half the mask's largest value, so 0/1 and
    0/255 masks read alike and a JPEG mask's compression noise around its regions marks nothing."""
    path = Path(path)
    data = _read_bytes(path)
    image = _opencv_decode(data, cv2.IMREAD_GRAYSCALE) if cv2 is not None else _pillow_decode(data, gray=True)
    if image is None:
        raise InputError(f"cannot decode mask {path}: {_pil_failure(data)}; replace or remove the file")
    return image > image.max() / 2


def max_file_bytes() -> int:
    """The largest image file read: 8 bytes per allowed pixel (16-bit RGBA, uncompressed) plus room for metadata."""
    return max_pixels() * 8 + (64 << 20)


def _read_bytes(path: Path) -> np.ndarray:
    """A regular file's bytes, after its size and header passed the limits (never a pipe, never unbounded)."""
    data = read_regular(path, "image", max_file_bytes(), inspect=lambda stream: image_header(path, stream=stream))
    return np.frombuffer(data, dtype=np.uint8)


def image_header(path: str | Path, data: np.ndarray | None = None, stream: BinaryIO | None = None) -> tuple[int, int, str]:
    """Width, height and Pillow mode read from the file header only (no pixel decoding); checks the pixel limit.

    `data` (the file's bytes) or `stream` (the open file), when the caller has them, spares opening it again.
    """
    path = Path(path)
    if data is None and stream is None:
        with open_regular(path, "image", max_file_bytes()) as opened:
            return image_header(path, stream=opened)
    try:
        source = io.BytesIO(data) if data is not None else stream
        if not source.read(1):
            raise InputError(f"cannot decode image {path}: empty file; replace or remove the file")
        source.seek(0)
        with warnings.catch_warnings():  # the limit below is ours; Pillow's bomb warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height, mode = image.width, image.height, image.mode
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image {path} is above the limit of {max_pixels():,} pixels ({exc})") from exc
    except FileNotFoundError as exc:
        raise InputError(f"cannot read image {path}: it does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "not an image file" if isinstance(exc, UnidentifiedImageError) else str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        raise InputError(f"cannot read image header of {path}: {reason}; replace or remove the file") from exc
    limit = max_pixels()
    if width * height > limit:
        raise ImageTooLarge(f"image {path} is {width}x{height} = {width * height:,} pixels, above the limit of {limit:,}; "
                               f"shrink it, or raise {MAX_PIXELS_ENV}")
    if width < 1 or height < 1:
        raise InputError(f"image {path} has no pixels ({width}x{height})")
    return width, height, mode


def load_image(source: ImageSource) -> np.ndarray:
    """An image as RGB uint8 HxWx3: an array as it is, a file or its bytes decoded."""
    if isinstance(source, np.ndarray):
        return source
    return source.decode() if isinstance(source, EncodedImage) else read_image(source)


def image_size(source: ImageSource) -> tuple[int, int]:
    """(height, width) of an image file or its bytes (from the header) or of an array."""
    if isinstance(source, np.ndarray):
        return source.shape[0], source.shape[1]
    if isinstance(source, EncodedImage):
        return source.size()
    width, height, _ = image_header(source)
    return height, width


def expand_inputs(inputs: Sequence[str | Path], skipped: list[Path] | None = None) -> list[Path]:
    """Image files and folders (searched recursively, hidden files skipped) -> image paths in a stable order. In a
    folder, every entry named as an image is one (a pipe or a broken link too: it gets its own error when read);
    the other files are added to `skipped`, when given, to be named."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            entries = [p for p in item.rglob("*") if not p.is_dir()
                       and not any(part.startswith(".") for part in p.relative_to(item).parts)]
            found = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"folder {item} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
            if skipped is not None:
                skipped += sorted(p for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES)
        elif item.exists() or item.is_symlink():
            paths.append(item)
        else:
            raise InputError(f"{item} does not exist")
    return paths


def skipped_note(skipped: Sequence[str | Path]) -> str:
    """One line naming the files of the folders given that were not read as images."""
    return (f"skipped {len(skipped)} file(s) of the folders given that are not named as images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}): {few(skipped)}")
