"""PatchCore's frame chosen per product from its good images alone.

Each candidate frame (resize / crop / patch grid) is fitted on a seeded part of the training images
and scores the held-out rest: as they are, and with each kind of synthetic defect pasted into each
(`data.defects`: thin scratches, small spots, cut-paste patches, noise blobs, at the product's own
scale; `selection.make_probe`). Each candidate's recall is the share of synthetic defects above the
held-out good scores' 1% tail (a normal fit, mean + 2.33 sd). Among the candidates whose recall is within one
standard error of the best, the cheapest (fewest patches per image) wins, unless a larger frame is among them
that enlarges no image and whose input holds at most FRAME_BUDGET pixels: then the largest such frame wins.
A near tie says the probe cannot tell the frames apart (on easy products every candidate catches nearly all
its synthetic defects), and a defect finer than the probe's is seen best at the larger frame, if the images
hold that detail (a frame larger than the images adds none); the budget keeps a tie from buying more than
the largest candidate costs on a 4:3 image. With `rotations: auto` the same probe then judges, at the chosen
frame, a memory that also learns each fit image's turns (`choose_turns`). No defective image and no test label is
used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from defectscope.backbones import Backbone
from defectscope.data.decode import image_size
from defectscope.data.frame import Preprocess
from defectscope.detectors.base import Embedded
from defectscope.detectors.patchcore import PatchCore, PatchCoreConfig, PatchFeatures
from defectscope.data.defects import KINDS
from defectscope.detectors.selection import MIN_IMAGES, Probe, make_probe, noise, probe_draws, separation

CANDIDATES = {  # name -> the frame fields it sets; every other setting is the user's
    "288/256 s8": {"image_size": 288, "crop": 256, "patch_stride": 8},
    "352/320 s8": {"image_size": 352, "crop": 320, "patch_stride": 8},
    "352/320 s16": {"image_size": 352, "crop": 320, "patch_stride": 16},
    "416/384 s16": {"image_size": 416, "crop": 384, "patch_stride": 16},
}
FRAME_FIELDS = ("image_size", "crop", "patch_stride")  # setting any of them pins the frame
REFERENCE_PATCHES = (320 // 16) ** 2  # the patches per image that the coreset ratio is stated for (352/320 s16)
FIT_IMAGES = 64  # the search fits on at most 64 good images besides the probe's held-out ones: enough to cover
# the poses of a part that moves and turns, else the held-out photos score by which turns the fit happened to see


def frame_settings(name: str, config: PatchCoreConfig) -> dict[str, Any]:
    """A candidate's frame fields and its coreset ratio: every candidate keeps the memory rows per image that the
    ratio gives at 352/320 s16, so the memory stays the same size whatever the patch grid."""
    frame, patches = CANDIDATES[name], patches_per_image(name)
    return {**frame, "coreset_ratio": min(1.0, config.coreset_ratio * REFERENCE_PATCHES / patches)}


def patches_per_image(name: str) -> int:
    """A candidate's cost: the patches of one (square) image, which the coreset, the memory and the search scale with."""
    frame = CANDIDATES[name]
    return (frame["crop"] // frame["patch_stride"]) ** 2


_LARGEST = max(CANDIDATES.values(), key=lambda frame: frame["image_size"])
_BUDGET_SHAPE = Preprocess(_LARGEST["image_size"], _LARGEST["crop"], aspect=4 / 3).input_shape  # on a camera's 4:3 image
FRAME_BUDGET = math.prod(_BUDGET_SHAPE)  # the most input pixels a near tie buys (384 x 528)
TURNS_RULE = ("on when the turns catch more of the synthetic defects than the chosen frame without them by more than two "
              "standard errors of its recall (they multiply the fit's and the search's cost, and a defect that looks like "
              "a turned good patch passes)")
RULE = (f"within one standard error of the best recall: the largest frame that enlarges no image and holds at most "
        f"{_BUDGET_SHAPE[1]} x {_BUDGET_SHAPE[0]} pixels, when it is larger than the cheapest candidate's; else the "
        "cheapest (fewest patches, then the larger margin)")


def near_best(evidence: dict[str, dict[str, float]], count: int) -> list[str]:
    """The candidates whose recall is within one standard error of the best, the chosen one first, then the rest
    cheapest first (then the larger margin). The cheapest is chosen unless a larger frame is among them that
    enlarges no image (`enlarges`) and fits the budget (`input_pixels`): then the largest such frame, at its
    cheapest patch grid."""
    best = max(entry["recall_at_1pct"] for entry in evidence.values())
    near = sorted((name for name, entry in evidence.items() if entry["recall_at_1pct"] >= best - noise(best, count)),
                  key=lambda name: (patches_per_image(name), -evidence[name]["mean_margin_sd"]))
    larger = [name for name in near if _frame_key(name) > _frame_key(near[0]) and not evidence[name]["enlarges"]
              and evidence[name]["input_pixels"] <= FRAME_BUDGET]
    chosen = max(larger, key=_frame_key, default=near[0])  # max keeps the first, cheapest, of equal frames
    return [chosen, *(name for name in near if name != chosen)]


@dataclass
class FrameChoice:
    """The frame search's outcome: the chosen candidate's settings (frame fields, coreset ratio; empty when there was
    no probe), the evidence, and the probe with its synthetic-defect images embedded at the chosen frame, which the
    global view's choice judges on too (one probe, embedded once)."""

    settings: dict[str, Any]
    evidence: dict[str, Any]
    probe: Probe | None = None
    defective: PatchFeatures | None = None
    preprocess: Preprocess | None = None  # the frame `defective` was embedded in
    fit: Embedded | None = None  # the search's fit images as the chosen frame (and turns) learn them
    fit_frame: tuple[Preprocess, int] | None = None  # the frame and patch stride `fit` was embedded at


def choose_frame(images: Sequence[Any], config: PatchCoreConfig, backbone: Backbone | None = None,
                 progress: Callable[[int], None] = lambda _steps: None) -> FrameChoice:
    """The frame chosen from good training images alone; `progress` advances by one per candidate. Candidates that
    share a resize and crop share one embedding: the coarser patch grid is the finer one averaged (as `embed` does).
    The fit images are embedded at every frame while a second thread makes the probe (its decoding and pasting run
    on one core: threaded-parts' first 5 s of the search left the other core idle)."""
    if len(images) < MIN_IMAGES:
        return FrameChoice({}, {"chosen": None, "reason": f"{len(images)} training images; the search needs more"})
    order, held = probe_draws(len(images), config.seed)[1:]
    fit = [images[i] for i in order[held : held + FIT_IMAGES]]
    short_side = float(np.median([min(image_size(image)) for image in images]))  # headers only
    turns = config.rotations == "auto"  # chosen after the frame, at it; candidates are judged without them
    detectors = {}
    for name in CANDIDATES:
        candidate = replace(config, **frame_settings(name, config), frame_search=False, global_view="off",
                            rotations="off" if turns else config.rotations)
        candidate.check()
        detectors[name] = detector = PatchCore(candidate, backbone)
        backbone = detector.require_backbone()
        detector.learn_aspect(images)  # the frame the final model will have
    embedded: dict[tuple[int, int], FrameEmbedding] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="defectscope-probe") as pool:
        making = pool.submit(make_probe, images, config.seed, KINDS)  # the frame is judged on surface defects
        for name, detector in detectors.items():
            if _frame_key(name) not in embedded:
                embedded[_frame_key(name)] = FrameEmbedding.of_fit(detector, fit, config.global_view)
        probe = making.result()
    evidence = {}
    for name, detector in detectors.items():
        start, frame = time.perf_counter(), embedded[_frame_key(name)]
        fit_features, probed = frame.at(detector.config.patch_stride, probe)
        detector.fit_features(fit_features)
        scores = detector.score_features(probed)[0].float().numpy()
        evidence[name] = {**separation(scores[:held], scores[held:]), "input_pixels": math.prod(detector.preprocess.input_shape),
                          "enlarges": CANDIDATES[name]["image_size"] > short_side,
                          "seconds": time.perf_counter() - start + frame.take_seconds()}
        progress(1)
    chosen, *tied = near_best(evidence, len(probe.defective))
    frame, settings = embedded[_frame_key(chosen)], frame_settings(chosen, config)
    fit_features, probed = frame.at(settings["patch_stride"], probe)
    sizes, fit_frame = frame.sizes, frame.embedder.preprocess
    found = {"chosen": chosen, "rule": RULE, "fit_images": len(fit), "held_out_images": held,
             "synthetic_images": len(probe.defective), "candidates": evidence, "within_noise": tied}
    if turns:
        found["rotations"], *turned = choose_turns(replace(config, **settings), backbone, detector.aspect, fit, probed,
                                                   held, evidence[chosen])  # every candidate learned the same aspect
        settings["rotations"] = found["rotations"]["chosen"]
        if settings["rotations"] == "on":
            fit_features, sizes, fit_frame = turned
        progress(1)
    fitted = Embedded(torch.from_numpy(order[held : held + FIT_IMAGES]), fit_features, sizes)
    return FrameChoice(settings, found, probe, probed[held:], frame.embedder.preprocess, fitted,
                       (fit_frame, settings["patch_stride"]))


def choose_turns(config: PatchCoreConfig, backbone: Backbone, aspect: float, fit: Sequence[Any],
                 probed: PatchFeatures, held: int, without: dict[str, float]
                 ) -> tuple[dict[str, Any], PatchFeatures, torch.Tensor, Preprocess]:
    """`rotations` at the chosen frame (`config`, with the training images' `aspect`): the frame's memory fitted again
    on the same images with their turns, scoring the same probe (`probed`: its `held` good images, then its synthetic
    defects); `without` is the frame's evidence. On by TURNS_RULE. Returns the evidence, and the fit images' features
    with their turns and their sizes, in the frame they were embedded in (the fit learns them so when the turns are on)."""
    start = time.perf_counter()
    detector = PatchCore(replace(config, frame_search=False, global_view="off", rotations="on"), backbone)
    detector.aspect = aspect
    features, sizes = detector.learning_features(fit, None)
    turned_features = features[:]  # `fit_features` lets its own view of the turned patches go
    detector.fit_features(features)
    scores = detector.score_features(probed)[0].float().numpy()
    recall, turned, count = without["recall_at_1pct"], separation(scores[:held], scores[held:])["recall_at_1pct"], len(scores) - held
    return ({"chosen": "on" if turns_pay(recall, turned, count) else "off", "rule": TURNS_RULE,
             "recall_at_1pct_without": recall, "recall_at_1pct_with": turned, "standard_error": noise(recall, count),
             "seconds": time.perf_counter() - start}, turned_features, sizes, detector.preprocess)


def turns_pay(without: float, turned: float, count: int) -> bool:
    """TURNS_RULE: the recall with the turns beats the recall without them by more than two standard errors."""
    return turned - without > 2 * noise(without, count)


def _frame_key(name: str) -> tuple[int, int]:
    return CANDIDATES[name]["image_size"], CANDIDATES[name]["crop"]


@dataclass
class FrameEmbedding:
    """One resize and crop's embeddings at the finest patch grid among its candidates: the fit images first (and the
    seconds they took, for the first candidate at the frame), the probe's images (good, then defective) when a
    candidate first asks."""

    finest: int
    embedder: PatchCore
    fit: PatchFeatures
    sizes: torch.Tensor  # the fit images' original sizes
    seconds: float
    probed: PatchFeatures | None = None

    @classmethod
    def of_fit(cls, detector: PatchCore, fit: Sequence[Any], global_view: str) -> FrameEmbedding:
        """The fit images embedded at `detector`'s resize and crop, with region descriptors when the final model's
        `global_view` may use them (its choice is judged on the probe's images embedded alike)."""
        start = time.perf_counter()
        frame = detector.config.image_size, detector.config.crop
        finest = min(CANDIDATES[name]["patch_stride"] for name in CANDIDATES if _frame_key(name) == frame)
        embedder = PatchCore(replace(detector.config, patch_stride=finest, global_view=global_view), detector.require_backbone())
        embedder.aspect = detector.aspect
        return cls(finest, embedder, *embedder.learning_features(fit, None), time.perf_counter() - start)

    def at(self, patch_stride: int, probe: Probe) -> tuple[PatchFeatures, PatchFeatures]:
        """(the fit images, the probe's images) at `patch_stride`: the finest grid averaged; new views each time, as
        `fit_features` lets go of its features' turned patches."""
        if self.probed is None:
            self.probed = PatchFeatures.cat([self.embedder._features(probe.good, None)[0],
                                             self.embedder._features(probe.defective, None)[0]])
        window = patch_stride // self.finest
        return self.fit.coarsened(window)[:], self.probed.coarsened(window)[:]

    def take_seconds(self) -> float:
        """The fit images' embedding seconds, for the first candidate that asks (then 0)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds
