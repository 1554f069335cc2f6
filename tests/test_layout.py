"""Dataset layouts, image decoding and every bad input the loader must explain."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from defectscope.data.decode import read_image, read_mask
from defectscope.data.layout import load_dataset
from defectscope.errors import DefectscopeError


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _mvtec(root: Path, size: int = 32) -> Path:
    rgb = np.full((size, size, 3), 120, np.uint8)
    for i in range(3):
        _png(root / "train" / "good" / f"{i:03d}.png", rgb)
    _png(root / "test" / "good" / "000.png", rgb)
    _png(root / "test" / "crack" / "000.png", rgb)
    _png(root / "ground_truth" / "crack" / "000_mask.png", np.zeros((size, size), np.uint8))
    return root


def test_bottle_samples(bottle: Path) -> None:
    dataset = load_dataset(bottle)
    assert dataset.layout == "mvtec"
    assert len(dataset.train) == 209 and all(s.label == 0 and s.defect == "good" for s in dataset.train)
    defective = [s for s in dataset.test if s.label == 1]
    assert len(defective) == 63 and all(s.mask is not None and s.mask.stem == s.path.stem + "_mask" for s in defective)
    assert dataset.defect_types == ["broken_large", "broken_small", "contamination"]


def test_tire_samples(tire: Path) -> None:
    dataset = load_dataset(tire)
    assert len(dataset.train) == 210 and len(dataset.test) == 112
    defective = [s for s in dataset.test if s.label == 1]
    assert len(defective) == 87 and all(s.mask is not None for s in defective)
    assert dataset.defect_types == ["combined", "contamination", "cut", "hole"]


@pytest.mark.parametrize("layout", ["mvtec", "folder"])
def test_mask_folders_of_no_defect_folder_are_said(tmp_path: Path, layout: str) -> None:
    """Masks under `good` or a misspelt type were never read, and nothing said so."""
    if layout == "mvtec":
        root, masks = _mvtec(tmp_path / "m"), tmp_path / "m" / "ground_truth"
    else:
        root, masks = tmp_path / "f", tmp_path / "f" / "masks"
        for i in range(5):
            _png(root / "good" / f"g{i}.png", np.zeros((8, 8, 3), np.uint8))
    _png(masks / "good" / "000_mask.png", np.zeros((8, 8), np.uint8))
    _png(masks / "crak" / "000_mask.png", np.zeros((8, 8), np.uint8))
    said = [w for w in load_dataset(root).warnings if "belongs to no defect folder" in w]
    assert sorted(Path(w.split()[2]).name for w in said) == ["crak", "good"]


def test_what_the_mvtec_layout_never_reads_is_said(tmp_path: Path) -> None:
    """A LOCO-style validation folder, defects put under train, an image loose in test: all silently not read."""
    root = _mvtec(tmp_path / "m")
    rgb = np.full((32, 32, 3), 120, np.uint8)
    for place in ("validation/good/000.png", "train/scratch/000.png", "test/loose.png"):
        _png(root / place, rgb)
    said = [w for w in load_dataset(root).warnings if "is not read" in w]
    assert [Path(w.split()[1]).relative_to(root).as_posix() for w in said] == ["validation", "train/scratch",
                                                                               "test/loose.png"]


def test_every_command_that_reads_a_dataset_says_what_it_skips(demo_root: Path, served_folder: Path, tmp_path: Path,
                                                               cli) -> None:
    """Only `data summary` showed what a dataset skips or never reads: `fit`, `evaluate` and the rest said nothing."""
    import shutil

    from defectscope.errors import DataWarning

    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    _png(root / "validation" / "good" / "000.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.warns(DataWarning, match="validation is not read"):
        load_dataset(root)
    evaluated = cli("evaluate", served_folder / "part.dsmodel", root)
    assert evaluated.code == 0 and f"warning: folder {root / 'validation'} is not read" in evaluated.err
    summary = cli("data", "summary", root)
    assert summary.err.count("validation is not read") == 1  # its own list, not twice


def test_training_images_of_another_shape_are_said_once(demo_root: Path, tmp_path: Path, cli) -> None:
    """A quarter of the training photos from another camera (256x128 among 256x256) were squashed into the frame and
    learned as good, silently."""
    import shutil

    from defectscope.data.frame import other_shapes

    assert other_shapes([(256, 256)] * 3 + [(128, 256), (250, 252)]) == {(128, 256): 1}  # within 5%: one shape
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    for path in sorted((root / "train" / "good").iterdir())[:10]:
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (256, 128)))
    fitted = cli("fit", root, "-o", tmp_path / "m.dsmodel")  # the frame search fits each candidate
    assert fitted.code == 0
    said = [line for line in fitted.err.splitlines() if "another shape" in line]
    assert said == ["warning: 10 of the 40 training images have another shape than the rest (256x128 (10); width x "
                    "height): every image is resized to one frame, which squashes theirs; learn from images of one "
                    "product and camera setup"]  # once, though the frame search fits several times


def test_plain_folder_layout(tmp_path: Path) -> None:
    for i in range(10):
        _png(tmp_path / "good" / f"g{i}.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "dent" / "d0.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "masks" / "dent" / "d0.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "scratch" / "s0.png", np.zeros((8, 8, 3), np.uint8))
    dataset = load_dataset(tmp_path)
    assert dataset.layout == "folder"
    assert len(dataset.train) == 8 and len([s for s in dataset.test if s.label == 0]) == 2
    dent = next(s for s in dataset.samples if s.defect == "dent")
    assert dent.mask == tmp_path / "masks" / "dent" / "d0.png"
    assert any("scratch" in w and "pixel metrics" in w for w in dataset.warnings)
    assert load_dataset(tmp_path).samples == dataset.samples  # the hold-out is stable


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda r: shutil.rmtree(r / "train"), "neither train/good"),
        (lambda r: shutil.rmtree(r / "train" / "good"), "no train/good folder"),
        (lambda r: [p.unlink() for p in (r / "train" / "good").iterdir()], "holds no images"),
        (lambda r: (r / "ground_truth" / "crack" / "000_mask.png").unlink(), "no mask for"),
        (lambda r: _png(r / "ground_truth" / "crack" / "000_mask.png", np.zeros((16, 16), np.uint8)), "masks must have their image's size"),
        (lambda r: (r / "test" / "crack" / "000.png").write_bytes(b"not an image"), "cannot read image header"),
    ],
)
def test_bad_layouts_are_explained(tmp_path: Path, breakage, message: str) -> None:
    root = _mvtec(tmp_path / "product")
    breakage(root)
    with pytest.raises(DefectscopeError, match=message):
        load_dataset(root)


def test_missing_and_file_paths(tmp_path: Path) -> None:
    with pytest.raises(DefectscopeError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DefectscopeError, match="is a file"):
        load_dataset(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefectscopeError, match="neither train/good"):
        load_dataset(tmp_path / "empty")


def test_hidden_and_foreign_files_are_skipped_with_warnings(tmp_path: Path) -> None:
    root = _mvtec(tmp_path / "product")
    (root / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "good" / "notes.txt").write_text("hello")
    dataset = load_dataset(root)
    assert len(dataset.train) == 3
    assert any("hidden file" in w for w in dataset.warnings) and any("non-image file" in w for w in dataset.warnings)


def test_truncated_and_empty_images_are_explained(tmp_path: Path) -> None:
    good = _png(tmp_path / "ok.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(DefectscopeError, match="truncated.png.*(corrupt|truncated)"):
        read_image(truncated)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DefectscopeError, match="empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(DefectscopeError, match="cannot read image"):
        read_image(tmp_path / "missing.png")


def test_image_modes_decode_to_rgb(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    cases = {
        "gray.png": Image.fromarray(gray, "L"),
        "rgba.png": Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)]), "RGBA"),
        "palette.png": Image.fromarray(np.dstack([gray] * 3), "RGB").convert("P", palette=Image.Palette.ADAPTIVE),
        "bmp.bmp": Image.fromarray(gray, "L"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        decoded = read_image(tmp_path / name)
        assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8, name
        assert np.abs(decoded[..., 0].astype(int) - gray).max() <= 4, name
    cv2.imwrite(str(tmp_path / "deep.png"), gray.astype(np.uint16) * 257)
    assert np.array_equal(read_image(tmp_path / "deep.png")[..., 1], gray)


def test_mask_decoding(tmp_path: Path) -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[2:4, 1:5] = 255
    assert read_mask(_png(tmp_path / "m.png", mask)).sum() == 8
    assert read_mask(_png(tmp_path / "ones.png", mask // 255)).sum() == 8  # a 0/1 mask reads as a 0/255 one
    assert not read_mask(_png(tmp_path / "empty.png", mask * 0)).any()


def test_a_jpeg_mask_reads_as_its_regions_without_the_compression_noise(tmp_path: Path) -> None:
    """A lossy mask's faint ringing around a region is no defect: read as any non-zero pixel, every faint pixel
    became a defect pixel and a label export made one-pixel instances of them."""
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:44] = 255
    mask[45:50, 5:9] = 255
    path = tmp_path / "m.jpg"
    Image.fromarray(mask).save(path, quality=90)
    assert len(np.unique(np.asarray(Image.open(path)))) > 2  # the file holds the noise
    assert np.array_equal(read_mask(path), mask > 0)
