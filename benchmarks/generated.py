"""Seeded generated categories for the benchmarks: kinds of image the real datasets here do not cover.

`gray-large`: 1024x1024 grayscale PNGs of a lit dome with a ring and sensor noise.
`uniform-texture`: 600x800 RGB near-uniform rubber with fine grain and noise, where every patch is
about equally far from every other (the worst case of coreset selection and nearest-neighbour search).
`fine-defects` (`write_fine_defects`): 768x768 brushed metal plates with defects 1-4 px wide (scratches
and pits), with masks: a category where the frame decides whether the defects are seen at all. Its
scratches are anti-aliased arcs drawn here, not the search's own synthetic defects (`data.defects`),
so a frame search is not judged on the defects it was tuned with.
`logical-parts` (`write_logical_parts`): a tray holding four different parts in four fixed slots, with
defects in how they go together: a part missing, two parts swapped, one part too many. Every part of
a defective tray looks like a part of a good one; only the layout is wrong.
`threaded-parts` (`write_threaded_parts`): 1024x1024 grayscale photos of one small threaded part (a head, a
threaded shank, a tip) lying anywhere at any angle on a plain background, with fine defects on the part: a
damaged stretch of thread, a scratch 1-3 px wide, a shortened tip. A small part whose place and turn vary
from image to image, where the defects are a few pixels of a large image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

KINDS = ("gray-large", "uniform-texture")
FINE = 768  # fine-defects image side


def _image(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "gray-large":
        yy, xx = np.mgrid[0:1024, 0:1024]
        image = 90 + 40 * np.exp(-((yy - 512) ** 2 + (xx - 512) ** 2) / (2 * 260**2)) + rng.normal(0, 6, (1024, 1024))
        cv2.circle(image, (512 + int(rng.integers(-8, 8)), 512), 300, 150, 6)
    else:
        grain = cv2.GaussianBlur(rng.normal(0, 1, (600, 800, 3)), (0, 0), 1.2)
        image = 60 + 6 * grain + rng.normal(0, 2, (600, 800, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_category(kind: str, root: Path, train: int, test: int, seed: int = 0) -> Path:
    """root/<kind>/{train,test}/good/NNNN.png: `train` and `test` good images of one kind (written once)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        folder = root / kind / split / "good"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            target = folder / f"{i:04d}.png"
            image = _image(kind, rng)
            if not target.exists():
                cv2.imwrite(str(target), image)
    return root / kind


def _plate(rng: np.random.Generator) -> np.ndarray:
    """A brushed metal plate: horizontal streaks, a lighting gradient, grain, a slight shift and turn."""
    streaks = cv2.GaussianBlur(rng.normal(0, 1, (FINE, FINE)).astype(np.float32), (0, 0), sigmaX=25, sigmaY=0.8)
    yy, xx = np.mgrid[0:FINE, 0:FINE].astype(np.float32)
    light = 20 * (xx / FINE - 0.5) + 10 * (yy / FINE - 0.5) * rng.normal(1, 0.2)
    image = 150 + 10 * streaks / (streaks.std() + 1e-6) + light + rng.normal(0, 2.5, (FINE, FINE))
    turn = cv2.getRotationMatrix2D((FINE / 2, FINE / 2), rng.normal(0, 1.0), 1.0)
    turn[:, 2] += rng.normal(0, 4, 2)
    image = cv2.warpAffine(image, turn, (FINE, FINE), borderMode=cv2.BORDER_REFLECT)
    return np.repeat(image[:, :, None], 3, 2) * np.array([1.0, 0.98, 0.95], np.float32)


def _fine_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> np.ndarray:
    """Draw a scratch (an arc 1-4 px wide) or a few pits (1-4 px across) into the plate; returns the mask."""
    canvas = np.zeros((FINE, FINE), np.float32)
    if kind == "scratch":
        centre = rng.uniform(0.25, 0.75, 2) * FINE
        radius = rng.uniform(0.2, 0.6) * FINE
        start = rng.uniform(0, 360)
        cv2.ellipse(canvas, (int(centre[0]), int(centre[1])), (int(radius), int(radius * rng.uniform(0.5, 1.0))),
                    0, start, start + rng.uniform(10, 30), 1.0, int(rng.integers(1, 5)), cv2.LINE_AA)
    else:
        for _ in range(int(rng.integers(2, 5))):
            x, y = (rng.uniform(0.2, 0.8, 2) * FINE).astype(int)
            cv2.circle(canvas, (int(x), int(y)), int(rng.integers(1, 3)), 1.0, -1, cv2.LINE_AA)
    change = rng.uniform(35, 70) * (1 if rng.random() < 0.5 else -1)
    image += canvas[:, :, None] * change
    return canvas > 0.25


def write_fine_defects(root: Path, train: int = 200, test_good: int = 40, per_defect: int = 25, seed: int = 0) -> Path:
    """root/fine-defects in MVTec layout (train/good, test/{good,scratch,pit}, ground_truth masks), written once."""
    folder = root / "fine-defects"
    rng = np.random.default_rng(seed)
    plan = [("train", "good", train), ("test", "good", test_good), ("test", "scratch", per_defect), ("test", "pit", per_defect)]
    for split, defect, count in plan:
        for i in range(count):
            image = _plate(rng)
            mask = _fine_defect(rng, image, defect) if defect != "good" else None
            target = folder / split / defect / f"{i:03d}.png"
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), np.clip(image, 0, 255).astype(np.uint8))
            if mask is not None:
                (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "ground_truth" / defect / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return folder


PART_COLOURS = ((200, 60, 50), (50, 90, 200), (60, 170, 70), (220, 190, 40))  # RGB of the four parts
LOGICAL_DEFECTS = ("missing", "swapped", "extra")


def _draw_part(image: np.ndarray, mask: np.ndarray, kind: int, centre: tuple[int, int], radius: int) -> None:
    """Part `kind` (a disc, a square, a triangle or a ring in its own colour) centred at `centre`, also into `mask`."""
    colour = PART_COLOURS[kind][::-1]  # OpenCV draws BGR
    x, y = centre
    for canvas, value in ((image, colour), (mask, 1)):
        if kind == 0:
            cv2.circle(canvas, centre, radius, value, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(canvas, (x - radius, y - radius), (x + radius, y + radius), value, -1)
        elif kind == 2:
            points = np.array([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], np.int32)
            cv2.fillPoly(canvas, [points], value, cv2.LINE_AA)
        else:
            cv2.circle(canvas, centre, radius, value, max(2, radius // 3), cv2.LINE_AA)


def _tray(rng: np.random.Generator, size: int, defect: str) -> tuple[np.ndarray, np.ndarray]:
    """A tray with parts 0-3 in slots top-left, top-right, bottom-left, bottom-right (a little jitter, light and
    noise) and `defect` ("good" or one of LOGICAL_DEFECTS: a part gone, two swapped, one more in the middle);
    returns the BGR image and the defect's mask."""
    image = np.full((size, size, 3), 185, np.float32) + rng.normal(0, 4) + cv2.GaussianBlur(
        rng.normal(0, 6, (size, size, 3)).astype(np.float32), (0, 0), 3)
    slots = [(int(size * fx + rng.normal(0, size * 0.01)), int(size * fy + rng.normal(0, size * 0.01)))
             for fy in (0.28, 0.72) for fx in (0.28, 0.72)]
    parts = [0, 1, 2, 3]
    defect_mask = np.zeros((size, size), np.uint8)
    gone = int(rng.integers(4)) if defect == "missing" else -1
    if defect == "swapped":
        a, b = rng.choice(4, 2, replace=False)
        parts[a], parts[b] = parts[b], parts[a]
    radius = size // 9
    for slot, (centre, kind) in enumerate(zip(slots, parts)):
        mask = np.zeros((size, size), np.uint8)
        target = image if slot != gone else np.zeros_like(image)  # a missing part is drawn into its mask only
        _draw_part(target, mask, kind, centre, radius + int(rng.integers(-2, 3)))
        if slot == gone or (defect == "swapped" and kind != slot):
            defect_mask |= mask
    if defect == "extra":
        mask = np.zeros((size, size), np.uint8)
        _draw_part(image, mask, int(rng.integers(4)), (size // 2, size // 2), radius)
        defect_mask |= mask
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), defect_mask.astype(bool)


def write_logical_parts(root: Path, train: int = 200, test_good: int = 40, per_defect: int = 20, size: int = 256,
                        seed: int = 0) -> Path:
    """root/logical-parts in MVTec layout (train/good, test/{good,missing,swapped,extra}, ground_truth masks),
    written once."""
    folder = root / "logical-parts"
    rng = np.random.default_rng(seed)
    plan = [("train", "good", train), ("test", "good", test_good)] + [("test", d, per_defect) for d in LOGICAL_DEFECTS]
    for split, defect, count in plan:
        for i in range(count):
            image, mask = _tray(rng, size, defect)
            target = folder / split / defect / f"{i:03d}.png"
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), image)
            if defect != "good":
                (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "ground_truth" / defect / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return folder


THREADED = 1024  # threaded-parts image side
THREAD_DEFECTS = ("thread", "scratch", "tip")
Damage = float | tuple[float, ...]  # a tip's shortening, or a thread's or scratch's numbers (see `_threaded_part`)


def _threaded_part(rng: np.random.Generator, damage: dict[str, Damage]) -> np.ndarray:
    """A gray photo (float32) of a threaded part at a random place and turn on a plain, unevenly lit background.
    `damage` changes the part: "thread" (start, length, side) flattens a stretch of thread, "scratch" (u0, v0, u1,
    v1, width, change) draws a thin line on it, "tip" (shortening) cuts its tip; coordinates along (u) and across
    (v) the part, in pixels from its middle."""
    yy, xx = np.mgrid[0:THREADED, 0:THREADED].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    centre = THREADED / 2 + rng.uniform(-120, 120, 2)
    u = (xx - centre[0]) * np.cos(angle) + (yy - centre[1]) * np.sin(angle)
    v = -(xx - centre[0]) * np.sin(angle) + (yy - centre[1]) * np.cos(angle)
    pitch = 14.0 + rng.normal(0, 0.3)
    phase = ((u + 0.3 * v) / pitch) % 1.0
    ridge = 1 - 2 * np.abs(phase - 0.5)  # a triangle wave: 1 on a crest, 0 in a groove
    tip_end = 250.0 - damage.get("tip", 0.0)
    shank = (u >= -180) & (u < 200)
    if "thread" in damage:
        start, length, side = damage["thread"]
        flat = (u >= start) & (u < start + length) & (np.sign(v) == side)
        ridge = np.where(flat, 0.15, ridge)
    radius = np.where(shank, 25 + 5 * ridge, 0.0)
    radius = np.where((u >= 200) & (u < tip_end), 28 * np.clip((250 - u) / 50, 0.08, 1), radius)
    head = (u >= -262) & (u < -180)
    radius = np.where(head, 56 - np.clip(-238 - u, 0, None), radius)
    inside = np.clip(radius - np.abs(v) + 0.5, 0, 1) * (radius > 0)  # anti-aliased silhouette
    across = np.clip(np.abs(v) / np.maximum(radius, 1), 0, 1)
    metal = 95 + 70 * (1 - across**2) + np.where(shank, 28 * (ridge - 0.5), 6 * np.cos(u / 9))
    if "scratch" in damage:
        u0, v0, u1, v1, width, change = damage["scratch"]
        du, dv = u1 - u0, v1 - v0
        along = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0, 1)
        distance = np.hypot(u - u0 - along * du, v - v0 - along * dv)
        metal = metal + change * np.clip(width / 2 + 0.5 - distance, 0, 1)
    light = 208 + 10 * np.cos((xx - rng.uniform(0, THREADED)) / 400) + rng.normal(0, 3)
    shadow = 18 * np.exp(-np.clip(np.abs(v) - radius, 0, None) / 6) * (radius > 0)
    image = inside * metal + (1 - inside) * (light - shadow)
    return image + rng.normal(0, 3, image.shape).astype(np.float32)


def _thread_damage(rng: np.random.Generator, kind: str) -> dict[str, Damage]:
    """The damage of one `kind` (THREAD_DEFECTS) at a random place on the part."""
    if kind == "thread":
        return {"thread": (rng.uniform(-170, 160), rng.uniform(14, 32), float(rng.choice([-1, 1])))}
    if kind == "scratch":
        u0, v0 = rng.uniform(-250, 180), rng.uniform(-18, 18)
        turn, length = rng.uniform(0, 2 * np.pi), rng.uniform(25, 60)
        change = rng.uniform(40, 70) * (1 if rng.random() < 0.5 else -1)
        return {"scratch": (u0, v0, u0 + length * np.cos(turn), v0 + 0.4 * length * np.sin(turn),
                            int(rng.integers(1, 4)), change)}
    return {"tip": rng.uniform(14, 30)}


def write_threaded_parts(root: Path, train: int = 320, test_good: int = 40, per_defect: int = 25, seed: int = 0) -> Path:
    """root/threaded-parts in MVTec layout (train/good, test/{good,thread,scratch,tip}, ground_truth masks), written
    once; gray PNGs. A defect's mask is where its image differs from the same part drawn undamaged (same light and
    noise), closed over gaps of a few pixels (a damaged stretch of thread is one region, as an annotator marks it)."""
    folder = root / "threaded-parts"
    rng = np.random.default_rng(seed)
    plan = [("train", "good", train), ("test", "good", test_good)] + [("test", d, per_defect) for d in THREAD_DEFECTS]
    for split, defect, count in plan:
        for i in range(count):
            damage = _thread_damage(rng, defect) if defect != "good" else {}
            draw = rng.bit_generator.state
            image = _threaded_part(rng, damage)
            target = folder / split / defect / f"{i:03d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                cv2.imwrite(str(target), np.clip(image, 0, 255).astype(np.uint8))
            if damage:
                after = rng.bit_generator.state
                rng.bit_generator.state = draw  # the same part, light and noise, undamaged
                changed = (np.abs(image - _threaded_part(rng, {})) > 12).astype(np.uint8)
                mask = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
                rng.bit_generator.state = after
                (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(folder / "ground_truth" / defect / f"{i:03d}_mask.png"), mask * 255)
    return folder


CATEGORIES = ("rotated-parts", "fine-defects", "logical-parts", "threaded-parts")  # the generated categories the benchmarks take by name


def write_generated(name: str, root: Path, seed: int = 0) -> Path:
    """The generated category `name` (one of CATEGORIES) under root, as every benchmark measures it (seed 0), or
    drawn at another seed, in a folder named `name`-seed`seed`."""
    base = root / f"seed{seed}" if seed else root
    if name == "rotated-parts":
        from defectscope.data.synthetic import make_demo_dataset  # the demo category: rotated round parts
        folder = make_demo_dataset(base / name, size=256, train=200, test_good=50, per_defect=20, seed=seed)
    elif name == "fine-defects":
        folder = write_fine_defects(base, seed=seed)
    elif name == "logical-parts":
        folder = write_logical_parts(base, seed=seed)
    elif name == "threaded-parts":
        folder = write_threaded_parts(base, seed=seed)
    else:
        raise ValueError(f"unknown generated category {name!r}; choose one of {', '.join(CATEGORIES)}")
    if not seed:
        return folder
    folder = folder.rename(root / f"{name}-seed{seed}")
    base.rmdir()  # the draw's scratch folder, empty once its category moved out
    return folder
