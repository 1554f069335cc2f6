"""Folders on disk -> typed Sample records, for MVTec AD and plain-folder layouts."""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from defectscope.data.decode import IMAGE_SUFFIXES, image_header, read_mask
from defectscope.errors import DataWarning, InputError
from defectscope.names import as_text, few

GOOD = "good"
COMBINED_NAMES = frozenset({"combined", "multiple", "mixed", "multi"})
MASK_FOLDERS = ("ground_truth", "masks")


@dataclass(frozen=True)
class Sample:
    """One image: where it is, its split, label (0 good, 1 defective), defect folder and mask."""

    path: Path
    split: str
    label: int
    defect: str
    mask: Path | None = None


@dataclass
class Dataset:
    """The samples of one product, with the layout they came from and any skipped files."""

    root: Path
    layout: str
    samples: list[Sample]
    warnings: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    @property
    def train(self) -> list[Sample]:
        return self.split("train")

    @property
    def test(self) -> list[Sample]:
        return self.split("test")

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect for s in self.samples if s.label == 1})

    @property
    def has_masks(self) -> bool:
        """True when every defective test image has a mask (pixel metrics are meaningful)."""
        defective = [s for s in self.test if s.label == 1]
        return bool(defective) and all(s.mask is not None for s in defective)


def empty_masks(samples: list[Sample]) -> list[Path]:
    """The masks of defective samples that mark no pixel: pixel metrics count such a defect as all good, and a model
    learning from masks (or a label export) would learn it as background."""
    return [s.mask for s in samples if s.label == 1 and s.mask is not None and not read_mask(s.mask).any()]


def require_masks(samples: list[Sample], learner: str, read: bool = True) -> None:
    """Refuse defective samples that have no mask, or (`read`: decoding them; a caller that reads them anyway checks
    their regions itself) a mask marking nothing: `learner` would learn their defects as background."""
    missing = [s.path for s in samples if s.label == 1 and s.mask is None]
    if missing:
        raise InputError(f"{len(missing)} defective image(s) have no mask: {few(missing)}; {learner} would learn "
                         "their defects as background: add their masks or move them out of the dataset")
    empty = empty_masks(samples) if read else []
    if empty:
        raise InputError(f"{len(empty)} mask(s) of defective images mark no pixel: {few(empty)}; {learner} would "
                         "learn their defects as background: fix the masks or move their images")


def is_combined(defect: str) -> bool:
    """Whether a defect folder holds several defect kinds at once (MVTec's cable `combined`)."""
    return defect.lower() in COMBINED_NAMES


def _list_images(folder: Path, warnings: list[str]) -> list[Path]:
    """Image files of a folder, sorted; hidden and non-image files are skipped with a warning."""
    images = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            warnings.append(f"skipped hidden file {entry}")
        elif entry.is_dir():
            warnings.append(f"skipped nested folder {entry} (images must sit directly in {folder})")
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            images.append(entry)
        else:
            warnings.append(f"skipped non-image file {entry}")
    return images


def _require_images(folder: Path, warnings: list[str], what: str) -> list[Path]:
    images = _list_images(folder, warnings)
    if not images:
        raise InputError(
            f"{what} folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove it"
        )
    return images


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_mask(mask_dir: Path, image: Path) -> Path | None:
    """The mask of an image: same stem, with or without a `_mask` suffix, any image extension."""
    for stem in (f"{image.stem}_mask", image.stem):
        for suffix in (".png", image.suffix, ".bmp", ".tif", ".tiff", ".jpg"):
            candidate = mask_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _attach_masks(images: list[Path], mask_dir: Path, defect: str, warnings: list[str]) -> list[Path | None]:
    """Match each defective image with its mask and check that sizes agree."""
    if not mask_dir.is_dir():
        warnings.append(f"no mask folder {mask_dir}: pixel metrics for '{defect}' will be skipped")
        return [None] * len(images)
    masks: list[Path | None] = []
    for image in images:
        mask = _find_mask(mask_dir, image)
        if mask is None:
            raise InputError(
                f"no mask for {image} in {mask_dir} (expected {image.stem}_mask.png or {image.stem}.png); "
                "add the mask or move the image out of the dataset"
            )
        image_size = image_header(image)[:2]
        mask_size = image_header(mask)[:2]
        if image_size != mask_size:
            raise InputError(
                f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is "
                f"{image_size[0]}x{image_size[1]}; masks must have their image's size"
            )
        masks.append(mask)
    matched = {m.name for m in masks if m is not None}
    orphans = [p.name for p in _list_images(mask_dir, []) if p.name not in matched]
    if orphans:
        warnings.append(f"{len(orphans)} mask(s) in {mask_dir} have no image, e.g. {orphans[0]}")
    return masks


def _defect_samples(folder: Path, split: str, mask_dir: Path, warnings: list[str]) -> list[Sample]:
    images = _require_images(folder, warnings, f"defect '{folder.name}'")
    masks = _attach_masks(images, mask_dir, folder.name, warnings)
    return [Sample(path, split, 1, folder.name, mask) for path, mask in zip(images, masks)]


def _unused_mask_folders(masks: Path, samples: list[Sample], warnings: list[str]) -> None:
    """Warn of mask folders that belong to no defect folder (`good`, a misspelt type): their masks are never read."""
    if not masks.is_dir():
        return
    defects = {s.defect for s in samples if s.label == 1}
    for folder in _subfolders(masks):
        if folder.name not in defects:
            warnings.append(f"mask folder {folder} belongs to no defect folder (good images have no mask): its masks "
                            "are not read")


def _unread(folder: Path, read: set[str], warnings: list[str]) -> None:
    """Warn of what in `folder` a layout never reads: folders not named in `read` (an MVTec LOCO `validation`, a
    defect folder under `train`) and images lying loose beside them."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and entry.name not in read:
            warnings.append(f"folder {entry} is not read (this layout reads {', '.join(sorted(read))} in {folder})")
        elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            warnings.append(f"image {entry} is not read (images go into the folders of {folder})")


def load_mvtec(root: Path) -> Dataset:
    """MVTec AD layout: train/good, test/<good|defect>, ground_truth/<defect>/<name>_mask.png."""
    warnings: list[str] = []
    train_good = root / "train" / GOOD
    if not train_good.is_dir():
        raise InputError(
            f"{root} has no train/good folder; an MVTec-style dataset needs <root>/train/good "
            "with defect-free images (or use the plain-folder layout: <root>/good, <root>/<defect>)"
        )
    samples = [Sample(p, "train", 0, GOOD) for p in _require_images(train_good, warnings, "train/good")]
    _unread(root, {"train", "test", "ground_truth"}, warnings)
    _unread(root / "train", {GOOD}, warnings)
    test = root / "test"
    if test.is_dir():
        _unread(test, {folder.name for folder in _subfolders(test)}, warnings)
        for folder in _subfolders(test):
            if folder.name == GOOD:
                samples += [Sample(p, "test", 0, GOOD) for p in _require_images(folder, warnings, "test/good")]
            else:
                samples += _defect_samples(folder, "test", root / "ground_truth" / folder.name, warnings)
    else:
        warnings.append(f"{root} has no test folder: only fitting is possible")
    _unused_mask_folders(root / "ground_truth", samples, warnings)
    return Dataset(root, "mvtec", samples, warnings)


def holdout_good(images: list[Path], fraction: float = 0.2) -> set[Path]:
    """A stable hold-out of good images for testing, chosen by a hash of each file name."""
    ranked = sorted(images, key=lambda p: (zlib.crc32(as_text(p.name).encode()), p.name))
    count = round(len(ranked) * fraction) if len(ranked) > 1 else 0
    return set(ranked[:count])


def load_folder(root: Path, test_fraction: float = 0.2) -> Dataset:
    """Plain layout: <root>/good, <root>/<defect type>/, optional <root>/masks/<defect type>/.

    A stable fraction of the good images is held out for testing; the rest train.
    """
    warnings: list[str] = []
    good_dir = root / GOOD
    if not good_dir.is_dir():
        raise InputError(
            f"{root} has neither train/good (MVTec layout) nor good/ (plain layout); "
            "put defect-free images in <root>/good and defective ones in <root>/<defect type>"
        )
    good = _require_images(good_dir, warnings, "good")
    held_out = holdout_good(good, test_fraction)
    samples = [Sample(p, "test" if p in held_out else "train", 0, GOOD) for p in good]
    for folder in _subfolders(root):
        if folder.name in (GOOD, *MASK_FOLDERS):
            continue
        samples += _defect_samples(folder, "test", root / "masks" / folder.name, warnings)
    _unused_mask_folders(root / "masks", samples, warnings)
    return Dataset(root, "folder", samples, warnings)


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset folder, detecting its layout (MVTec AD or plain folder). What it skips or never reads is in
    `Dataset.warnings` and is also issued as a `DataWarning` (once per message in a process), so every command that
    reads a dataset says it."""
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"dataset path {root} does not exist; check the path")
    if not root.is_dir():
        raise InputError(f"dataset path {root} is a file; give the dataset's folder")
    dataset = load_mvtec(root) if (root / "train").is_dir() else load_folder(root)
    for text in dataset.warnings:
        warnings.warn(text, DataWarning)  # issued here: once per message in a process, whoever reads it
    return dataset
