"""Pre-processing and its inverse: maps return to the original image's pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectscope.data.frame import Preprocess, frame_aspect
from defectscope.data.batches import iterate_batches
from defectscope.data.images import normalize
from defectscope.errors import InputError


def test_resize_crop_and_inverse_mapping_line_up() -> None:
    pre = Preprocess(image_size=64, crop=48)
    original = np.zeros((90, 120), np.float32)
    original[40:50, 50:70] = 1.0  # a blob well inside the crop
    frame = pre.resize_crop(original)
    assert frame.shape == (48, 48)
    back = pre.to_original(frame, 90, 120)
    assert back.shape == (90, 120)
    assert back[45, 60] > 0.5 and back[10, 10] == 0.0
    recovered = back > 0.5
    overlap = (recovered & (original > 0)).sum() / (recovered | (original > 0)).sum()
    assert overlap > 0.7


def test_border_outside_crop_is_filled_with_map_minimum() -> None:
    pre = Preprocess(image_size=64, crop=32)
    frame_map = np.full((32, 32), 5.0, np.float32)
    frame_map[10, 10] = 9.0
    back = pre.to_original(frame_map, 64, 64)
    assert float(back[0, 0]) == 5.0 and float(back.max()) > 5.0


def test_frames_are_normalized_into_the_backbones_channels_last_layout() -> None:
    pre = Preprocess(image_size=40, crop=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    frames = torch.randint(0, 256, (2, 3, 24, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    normalized = normalize(frames, pre)
    assert normalized.is_contiguous(memory_format=torch.channels_last)  # the backbone would otherwise copy it again
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255.0 for v in (pre.mean, pre.std))
    assert torch.equal(normalized, (frames.float() - mean) / std)  # the same floats, to the bit


def test_mask_to_input_keeps_majority_pixels() -> None:
    pre = Preprocess(image_size=32, crop=None)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    assert pre.mask_to_input(mask)[:, :16].all() and not pre.mask_to_input(mask)[:, 16:].any()


def test_batches_keep_order_and_sizes() -> None:
    images = [np.full((20 + i, 30, 3), i, np.uint8) for i in range(7)]
    batches = list(iterate_batches(images, Preprocess(image_size=16, crop=None), batch_size=3, workers=2))
    assert [len(b) for b, _ in batches] == [3, 3, 1]
    values = np.concatenate([b[:, 0, 0, 0] for b, _ in batches]).tolist()
    assert values == list(range(7))
    assert np.concatenate([s for _, s in batches])[:, 0].tolist() == [20 + i for i in range(7)]


def test_frame_keeps_the_learned_aspect_ratio() -> None:
    assert frame_aspect([(400, 300)] * 3 + [(300, 300)]) == 400 / 300
    assert frame_aspect([(100, 1000)]) == 1 / 4  # capped at 4:1
    pre = Preprocess(image_size=288, crop=256, aspect=400 / 300)
    assert pre.frame_shape == (384, 288) and pre.input_shape == (352, 256)
    wide = Preprocess(image_size=288, crop=None, aspect=300 / 400)
    assert wide.frame_shape == wide.input_shape == (288, 384)
    assert Preprocess(image_size=64, crop=48).frame_shape == (64, 64)  # square products are unchanged
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_dict({"image_size": 64, "crop": None, "mean": (0, 0, 0), "std": (1, 1, 1)}).aspect == 1.0


def test_aspect_frame_maps_back_onto_the_original_grid() -> None:
    """Without a crop the frame is a pure rescale: a map (and a mask) returns onto the original pixel grid."""
    pre = Preprocess(image_size=48, crop=None, aspect=400 / 300)
    assert pre.input_shape == (64, 48)  # 6.25 original pixels per frame pixel on both axes
    rows, cols = np.mgrid[0:400, 0:300].astype(np.float32)
    ramp = rows / 400 + 2 * cols / 300  # any linear map survives the round trip up to border interpolation
    back = pre.to_original(pre.resize_crop(ramp), 400, 300)
    # Within half an original pixel (the area average takes whole pixels): 0.5 * (1/400 + 2/300) on this ramp.
    assert np.abs(back - ramp)[10:-10, 10:-10].max() < 0.5 * (1 / 400 + 2 / 300)
    mask = np.zeros((400, 300), bool)
    mask[125:200, 150:225] = True  # edges on the frame's pixel grid
    frame_mask = pre.mask_to_input(mask)
    assert frame_mask.sum() == 12 * 12 and frame_mask[20:32, 24:36].all()
    returned = pre.to_original(frame_mask.astype(np.float32), 400, 300) >= 0.5
    ys, xs = np.nonzero(returned)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (125, 200, 150, 225)  # the same box, pixel for pixel
    assert (returned != mask).sum() <= 4 * 3  # bilinear upsampling only rounds the four corners


def test_aspect_frame_with_crop_puts_a_defect_where_it_was() -> None:
    pre = Preprocess(image_size=64, crop=48, aspect=400 / 300)
    original = np.zeros((400, 300), np.float32)
    original[180:240, 100:160] = 1.0
    frame = pre.resize_crop(original)
    assert frame.shape == pre.input_shape == (64, 48)
    back = pre.to_original(frame, 400, 300) > 0.5
    overlap = (back & (original > 0)).sum() / (back | (original > 0)).sum()
    assert overlap > 0.9
    ys, xs = np.nonzero(back)
    assert abs(ys.mean() - 209.5) < 2 and abs(xs.mean() - 129.5) < 2


def test_tire_masks_survive_the_default_patchcore_frame(tire: Path) -> None:
    """Real masks (thin cuts included) go into the default aspect frame and back onto each 400 x 300 image."""
    from defectscope.data.decode import read_mask
    from defectscope.data.layout import load_dataset
    from defectscope.detectors import create_detector

    dataset = load_dataset(tire)
    detector = create_detector("patchcore")
    detector.learn_aspect([s.path for s in dataset.train])
    pre = detector.preprocess
    assert pre.input_shape == (432, 320)
    inside = np.zeros((400, 300), bool)
    inside[14:-14, 14:-14] = True  # the crop keeps all but 16 frame pixels (13.6 original pixels) on each side
    for sample in [s for s in dataset.test if s.mask is not None][::4]:
        mask = read_mask(sample.mask) & inside
        if not mask.any():
            continue
        back = pre.to_original(pre.mask_to_input(mask).astype(np.float32), *mask.shape) >= 0.5
        assert (back & mask).sum() / (back | mask).sum() > 0.8, sample.path


def _encoded(image: Image.Image, fmt: str, **options: object) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def _with_gamma(png: np.ndarray) -> np.ndarray:
    """The PNG with a gAMA chunk after its header (which no decoder here applies)."""
    import struct
    import zlib

    body = b"gAMA" + struct.pack(">I", 30000)
    chunk = struct.pack(">I", 4) + body + struct.pack(">I", zlib.crc32(body))
    data = png.tobytes()
    return np.frombuffer(data[:33] + chunk + data[33:], np.uint8)


def test_every_decoder_gives_the_same_pixels(monkeypatch) -> None:
    """imagecodecs (PNG), OpenCV and Pillow (the slim runtime) give the same RGB pixels, in every common format."""
    from defectscope.data import decode

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb[10:20, 10:30] = (200, 30, 90)  # flat areas too, for JPEG
    gray16 = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    rgba = np.dstack([rgb, rng.integers(0, 256, (37, 53), dtype=np.uint8)])
    files = {
        "png rgb": _encoded(Image.fromarray(rgb), "PNG"),
        "png rgba": _encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
        "png gray": _encoded(Image.fromarray(rgb[..., 0]), "PNG"),
        "png gray+alpha": _encoded(Image.fromarray(rgba[..., 2:4].copy(), "LA"), "PNG"),
        "png gray 16-bit": _encoded(Image.fromarray(gray16), "PNG"),
        "png palette": _encoded(Image.fromarray(rgb).quantize(16), "PNG"),
        "png palette 4-bit": _encoded(Image.fromarray(rgb).quantize(16), "PNG", bits=4),
        "png palette, a transparent entry": _encoded(Image.fromarray(rgb).quantize(16), "PNG", transparency=3),
        "png rgb, a transparent colour": _encoded(Image.fromarray(rgb), "PNG", transparency=tuple(rgb[0, 0].tolist())),
        "png gray, a transparent value": _encoded(Image.fromarray(rgb[..., 0]), "PNG", transparency=int(rgb[0, 0, 0])),
        "png rgb with gamma": _with_gamma(_encoded(Image.fromarray(rgb), "PNG")),
        "png 1-bit": _encoded(Image.fromarray(rgb[..., 0] > 128), "PNG"),
        "jpeg 4:2:0": _encoded(Image.fromarray(rgb), "JPEG", quality=75, subsampling=2),
        "jpeg 4:4:4": _encoded(Image.fromarray(rgb), "JPEG", quality=95, subsampling=0),
        "jpeg gray": _encoded(Image.fromarray(rgb[..., 1]), "JPEG", quality=90),
        "bmp": _encoded(Image.fromarray(rgb), "BMP"),
        "tiff": _encoded(Image.fromarray(rgb), "TIFF"),
        "tiff rgba": _encoded(Image.fromarray(rgba, "RGBA"), "TIFF"),
        "tiff gray+alpha": _encoded(Image.fromarray(rgba[..., 2:4].copy(), "LA"), "TIFF"),
        "tiff gray 16-bit": _encoded(Image.fromarray(gray16), "TIFF"),
        "webp rgb": _encoded(Image.fromarray(rgb), "WEBP", lossless=True),
        "webp rgba": _encoded(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True, exact=True),
    }
    assert decode.imagecodecs is not None and decode.cv2 is not None  # both installed with the library
    decoded = {"imagecodecs": {name: decode.decode_image(data, name) for name, data in files.items()}}
    monkeypatch.setattr(decode, "imagecodecs", None)
    decoded["OpenCV"] = {name: decode.decode_image(data, name) for name, data in files.items()}
    monkeypatch.setattr(decode, "cv2", None)
    decoded["Pillow"] = {name: decode.decode_image(data, name) for name, data in files.items()}
    for decoder, images in decoded.items():
        for name, image in images.items():
            assert image.dtype == np.uint8 and image.shape == (37, 53, 3), (decoder, name)
            np.testing.assert_array_equal(image, decoded["OpenCV"][name], err_msg=f"{decoder}: {name}")
    np.testing.assert_array_equal(decoded["OpenCV"]["png gray 16-bit"][..., 0], gray16 >> 8)
    np.testing.assert_array_equal(decoded["imagecodecs"]["png rgb"], rgb)
    for name in ("png rgba", "tiff rgba", "webp rgba"):  # alpha dropped, the colour as stored (never premultiplied)
        np.testing.assert_array_equal(decoded["OpenCV"][name], rgb, err_msg=name)


def test_png_files_are_decoded_by_imagecodecs(monkeypatch) -> None:
    """PNG, the format of most inspection datasets, takes the faster decoder; other formats and broken PNGs do not."""
    from defectscope.data import decode

    calls = []
    real = decode.imagecodecs.png_decode
    monkeypatch.setattr(decode.imagecodecs, "png_decode", lambda data: calls.append(len(data)) or real(data))
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png, jpeg = _encoded(Image.fromarray(rgb), "PNG"), _encoded(Image.fromarray(rgb), "JPEG")
    np.testing.assert_array_equal(decode.decode_image(png, "a.png"), rgb)
    decode.decode_image(jpeg, "a.jpg")
    assert calls == [len(png)]
    broken = png.copy()
    broken[60] ^= 0xFF  # a corrupt pixel stream: every decoder refuses it, and the error names the file
    with pytest.raises(InputError, match="cannot decode image b.png"):
        decode.decode_image(broken, "b.png")


def test_masks_read_the_same_without_opencv(tmp_path: Path, monkeypatch) -> None:
    from defectscope.data import decode

    mask = np.zeros((30, 40, 3), np.uint8)
    mask[5:15, 5:25] = (255, 255, 255)
    mask[20, 30] = (0, 0, 1)  # a color mask with one faint pixel
    paths = [tmp_path / "color.png", tmp_path / "gray.png"]
    Image.fromarray(mask).save(paths[0])
    Image.fromarray(mask[..., 0]).save(paths[1])
    with_opencv = [decode.read_mask(p) for p in paths]
    monkeypatch.setattr(decode, "cv2", None)
    for path, expected in zip(paths, with_opencv):
        np.testing.assert_array_equal(decode.read_mask(path), expected)
    assert with_opencv[1].sum() == 200


def test_an_image_read_as_bytes_decodes_as_the_file_does(demo_root: Path, tmp_path: Path) -> None:
    """What travels to a Ray node (`EncodedImage`) gives the pixels, the size and, for a broken or missing file, the
    very error `read_image` gives on the file."""
    from defectscope.data.decode import EncodedImage, image_size, load_image, read_image
    from defectscope.errors import DefectscopeError

    image = next((demo_root / "test" / "good").iterdir())
    encoded = EncodedImage.read(image)
    assert np.array_equal(load_image(encoded), read_image(image)) and image_size(encoded) == image_size(image)
    broken, missing = tmp_path / "broken.png", tmp_path / "missing.png"
    broken.write_bytes(image.read_bytes()[:200])  # a truncated PNG: its header reads, its pixels do not
    for path in (broken, missing):
        with pytest.raises(DefectscopeError) as direct:
            read_image(path)
        with pytest.raises(DefectscopeError) as shipped:
            load_image(EncodedImage.read(path))
        assert str(shipped.value) == str(direct.value)


def test_16_bit_images_that_use_12_bits_or_fewer_are_said(tmp_path: Path, cli, served_folder: Path) -> None:
    """A 12-bit camera's values stored unscaled in 16 bits keep 16 gray levels in the top byte read: said, not
    silently scored; a full-range 16-bit image is not."""
    import warnings

    from defectscope.data.decode import decode_image
    from defectscope.errors import DataWarning

    def png(values: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
        return np.frombuffer(buffer.getvalue(), np.uint8)

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    for values, said in ((ramp * 4095, True), (ramp * 65535, False), (ramp * 4096 + 1, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decode_image(png(values), "part.png")
        assert any(issubclass(w.category, DataWarning) and "below 4096" in str(w.message) for w in caught) == said
    Image.fromarray((ramp * 4095).astype(np.uint16)).save(tmp_path / "part.png")
    predicted = cli("predict", served_folder / "part.dsmodel", tmp_path / "part.png")
    assert predicted.code == 0 and "warning: 16-bit images whose values all stay below 4096" in predicted.err
