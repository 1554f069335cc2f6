"""The frame search: its rule (the cheapest frame within the measurement's noise of the best, or the largest frame
within the budget among them), one embedding per resize and crop, and its probe handed to the global view's choice."""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from defectscope import load_dataset
from defectscope.data.frame import Preprocess
from defectscope.detectors.base import Detector, Embedded, create_detector
import defectscope.detectors.base as base
import defectscope.detectors.frame_search as frame_search
import defectscope.pipeline as pipeline
from defectscope.data.synthetic import make_demo_dataset
from defectscope.detectors.frame_search import CANDIDATES, choose_frame, frame_settings, near_best, patches_per_image, turns_pay
from defectscope.detectors.patchcore import PatchCore, PatchCoreConfig, PatchFeatures, patch_embedding
from defectscope.detectors.selection import MIN_IMAGES
from defectscope.errors import SettingsError
from defectscope.experiments.kinds import attempt_config
from defectscope.pipeline import fit_detector


def _evidence(recalls: dict[str, float], aspect: float = 1, short_side: int = 900) -> dict[str, dict[str, float]]:
    """Evidence as the search records it, for images `short_side` px across and `aspect` times as long as wide."""
    frames = {name: Preprocess(CANDIDATES[name]["image_size"], CANDIDATES[name]["crop"], aspect=aspect) for name in recalls}
    return {name: {"recall_at_1pct": recall, "mean_margin_sd": 5.0, "input_pixels": math.prod(frames[name].input_shape),
                   "enlarges": CANDIDATES[name]["image_size"] > short_side} for name, recall in recalls.items()}


def test_the_cheapest_frame_within_one_standard_error_wins_unless_a_larger_one_ties_within_the_images_and_budget() -> None:
    costs = sorted(CANDIDATES, key=patches_per_image)
    assert costs[0] == "352/320 s16" and costs[-1] == "352/320 s8"
    near = _evidence({"288/256 s8": 0.96, "352/320 s8": 0.97, "352/320 s16": 0.955, "416/384 s16": 0.90})
    # 0.955 and 0.96 are within one se (0.021) of 0.97, and no frame among them is larger than the cheapest's
    assert near_best(near, 64) == ["352/320 s16", "288/256 s8", "352/320 s8"]
    clear = _evidence({"288/256 s8": 0.80, "352/320 s8": 0.97, "352/320 s16": 0.70, "416/384 s16": 0.75})
    assert near_best(clear, 64) == ["352/320 s8"]  # only the costliest is near the best: no tie
    saturated = {"288/256 s8": 0.96, "352/320 s8": 127 / 128, "352/320 s16": 127 / 128, "416/384 s16": 1.0}
    # every candidate but 288/256 within one defect of the best: the largest frame, though costlier, wins the tie
    assert near_best(_evidence(saturated), 128) == ["416/384 s16", "352/320 s16", "352/320 s8"]
    assert near_best(_evidence(saturated, aspect=4 / 3), 128)[0] == "416/384 s16"  # a camera's 4:3 frame: 384 x 528
    # images 400 px across hold no detail a 416-px frame could add: the tie stays with the cheapest
    assert near_best(_evidence(saturated, short_side=400), 128) == ["352/320 s16", "416/384 s16", "352/320 s8"]
    # on a 2:1 product 416/384's input holds twice the budget: the tie stays with the cheapest
    assert near_best(_evidence(saturated, aspect=2), 128) == ["352/320 s16", "416/384 s16", "352/320 s8"]
    smaller = _evidence({"288/256 s8": 0.97, "352/320 s8": 0.70, "352/320 s16": 0.97, "416/384 s16": 0.70}, aspect=2)
    assert near_best(smaller, 64)[0] == "352/320 s16"  # a smaller frame within the budget is no reason to move
    equal = _evidence({"288/256 s8": 0.97, "352/320 s8": 0.97, "352/320 s16": 0.70, "416/384 s16": 0.70})
    assert near_best(equal, 64) == ["352/320 s8", "288/256 s8"]  # the larger frame, here the costlier grid


def test_every_candidate_keeps_the_same_memory_per_image() -> None:
    rows = {name: frame_settings(name, PatchCoreConfig())["coreset_ratio"] * patches_per_image(name)
            for name in CANDIDATES}
    assert max(rows.values()) - min(rows.values()) < 1e-6 and abs(rows["352/320 s16"] - 40) < 1e-6
    assert frame_settings("352/320 s8", PatchCoreConfig(coreset_ratio=0.2))["coreset_ratio"] == 0.05


def test_a_coarser_patch_grid_is_the_finer_one_averaged() -> None:
    generator = torch.Generator().manual_seed(0)
    maps = {8: torch.randn(2, 5, 11, 9, generator=generator), 16: torch.randn(2, 7, 6, 5, generator=generator)}
    regions = torch.zeros(2, 1, 1)
    fine = PatchFeatures(patch_embedding(maps, 3, 8, 8), regions)
    for stride in (16, 32):
        torch.testing.assert_close(fine.coarsened(stride // 8).patches, patch_embedding(maps, 3, 8, stride))
    assert fine.coarsened(1) is fine


def test_the_global_view_is_judged_on_the_frame_searchs_probe_as_on_its_own(demo_root: Path) -> None:
    dataset = load_dataset(demo_root)
    dataset.samples = dataset.train[:MIN_IMAGES + 2]  # the fewest images a probe is made of: a quick search
    searched, report = fit_detector(dataset, "patchcore", {"rotations": "off"}, None, False)  # turns: no global view
    chosen = searched.train_summary["frame_choice"]["chosen"]
    searching = sum(candidate["seconds"] for candidate in searched.train_summary["frame_choice"]["candidates"].values())
    assert report.seconds > searching  # the fit's time, as `fit` prints it, includes the search
    alone = create_detector("patchcore", **CANDIDATES[chosen], coreset_ratio=searched.config.coreset_ratio)
    alone.backbone = searched.backbone
    embedded = []
    original = alone._features
    alone._features = lambda images, progress, *how: embedded.append(len(images)) or original(images, progress, *how)
    alone.fit([sample.path for sample in dataset.train])
    with_search, on_its_own = searched.train_summary["global_view_choice"], alone.train_summary["global_view_choice"]
    assert with_search["chosen"] == on_its_own["chosen"]
    for view, evidence in on_its_own["evidence"].items():
        assert with_search["evidence"][view] == pytest.approx(evidence, abs=1e-6)
    assert with_search["synthetic_images"] in embedded  # fitting alone embeds the synthetic defects; the search had them


def test_a_typed_config_searches_the_frame_unless_it_was_given_one(demo_root: Path) -> None:
    """A checked config (an experiment attempt's) reaches the fit as it is: the frame is searched unless the config
    was given a frame field, as with `fit` (attempts used to pin every field they left at its default)."""
    dataset = load_dataset(demo_root)
    dataset.samples = dataset.train[:MIN_IMAGES + 2]  # the fewest images a probe is made of: a quick search
    searched = fit_detector(dataset, "patchcore", attempt_config("patchcore", {"global_view": "off"}))[0]
    assert searched.train_summary["frame_choice"]["chosen"] in CANDIDATES
    pinned = fit_detector(dataset, "patchcore", attempt_config("patchcore", {"image_size": 128, "crop": None}))[0]
    assert pinned.train_summary["frame_choice"] == {"chosen": None, "reason": "pinned by the settings"}
    assert (pinned.config.image_size, pinned.config.crop) == (128, None)


def test_each_candidate_is_fitted_on_64_images_none_of_them_held_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's fit set covers a moving part's poses (64 images where there are enough), apart from the probe's."""
    images = [sample.path for sample in load_dataset(make_demo_dataset(tmp_path / "part", size=64, train=96)).train]
    fitted: list[set] = []
    embed = frame_search.FrameEmbedding.of_fit
    monkeypatch.setattr(frame_search, "CANDIDATES", {"352/320 s16": CANDIDATES["352/320 s16"]})  # one is enough here
    monkeypatch.setattr(frame_search.FrameEmbedding, "of_fit", lambda detector, fit, view: fitted.append(set(fit))
                        or embed(detector, fit, view))
    choice = choose_frame(images, PatchCoreConfig())
    held = {images[i] for i in choice.probe.order[: len(choice.probe.good)]}
    assert choice.evidence["fit_images"] == 64 and choice.evidence["held_out_images"] == len(held) == 16
    assert fitted and all(len(fit) == 64 and not fit & held for fit in fitted)


def test_the_probe_is_made_while_the_fit_images_are_embedded_and_each_frames_seconds_count_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe (decoding the held-out images, pasting the defects: one core's work) is made in a second thread
    while the fit images are embedded; the same choice and probe as one after the other; a frame's embedding seconds
    go to the first candidate at it."""
    images = [sample.path for sample in load_dataset(make_demo_dataset(tmp_path / "part", size=64, train=40)).train]
    two = {name: CANDIDATES[name] for name in ("352/320 s8", "352/320 s16")}  # one resize and crop: one embedding
    monkeypatch.setattr(frame_search, "CANDIDATES", two)
    config = PatchCoreConfig(global_view="off", rotations="off")
    alone = choose_frame(images, config)
    together = threading.Barrier(2, timeout=10)  # the probe and the first embedding wait for each other
    make_probe, learning_features, waited = frame_search.make_probe, PatchCore.learning_features, []

    def first_waits(self: PatchCore, *args: object) -> tuple:
        if not waited:  # the fit images' first embedding
            waited.append(together.wait())
        return learning_features(self, *args)

    monkeypatch.setattr(frame_search, "make_probe", lambda *args: (together.wait(), make_probe(*args))[1])
    monkeypatch.setattr(PatchCore, "learning_features", first_waits)
    choice = choose_frame(images, config)
    assert choice.evidence["chosen"] == alone.evidence["chosen"]
    assert [choice.evidence["candidates"][name]["recall_at_1pct"] for name in two] == [
        alone.evidence["candidates"][name]["recall_at_1pct"] for name in two]
    torch.testing.assert_close(choice.defective.patches, alone.defective.patches, rtol=0, atol=0)
    seconds = [choice.evidence["candidates"][name]["seconds"] for name in two]
    assert seconds[0] > seconds[1]  # the second candidate only averages the first's patch grid


@pytest.mark.parametrize("rotations", ["auto", "on"])
def test_the_fit_takes_the_searchs_fit_images_as_embedded_and_learns_the_same_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotations: str) -> None:
    """The frame search's fit images, embedded in the chosen frame (with their turns when the model learns them), are
    not embedded again by the fit; the model is the same as when the fit embeds every image itself."""
    dataset = load_dataset(make_demo_dataset(tmp_path / "part", size=64, train=30))
    monkeypatch.setattr(frame_search, "CANDIDATES", {name: CANDIDATES[name] for name in ("352/320 s8", "352/320 s16")})
    settings = {"rotations": rotations, "place_view": "off"}
    embedded: list[int] = []
    features = Detector._features

    def counted(self: Detector, images: list, progress: object, embed: object = None, known: object = None) -> tuple:
        if len(images) == len(dataset.train):  # the fit's training images (not the search's, nor its probe's)
            embedded.append(len(images) - (0 if known is None else len(known.positions)))
        return features(self, images, progress, embed, known)

    monkeypatch.setattr(Detector, "_features", counted)
    released: list[str] = []  # the heap's free pages go back after the search, and after the fit's embedding
    monkeypatch.setattr(pipeline, "release_free_heap", lambda: released.append("search"))
    monkeypatch.setattr(base, "release_free_heap", lambda: released.append("embedding"))
    reused = fit_detector(dataset, "patchcore", attempt_config("patchcore", settings))[0]
    fit_images = reused.train_summary["frame_choice"]["fit_images"]
    assert embedded == [len(dataset.train) - fit_images] and fit_images == len(dataset.train) - len(dataset.train) // 3
    assert released == ["search", "embedding"]
    monkeypatch.setattr(PatchCore, "use_embedded", lambda self, *args: None)
    embedded.clear()
    alone = fit_detector(dataset, "patchcore", attempt_config("patchcore", settings))[0]
    assert embedded == [len(dataset.train)] and alone.config == reused.config
    for name, tensor in alone.tensors().items():
        torch.testing.assert_close(reused.tensors()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(reused.calibration_scores, alone.calibration_scores, rtol=0, atol=0)


def test_with_the_turns_pinned_on_every_candidate_learns_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two candidates share one embedding; the first one's fit lets go of its view of the turned patches, not the
    shared embedding's, so the second learns the turns too."""
    images = [sample.path for sample in load_dataset(make_demo_dataset(tmp_path / "part", size=64, train=30)).train]
    monkeypatch.setattr(frame_search, "CANDIDATES", {name: CANDIDATES[name] for name in ("352/320 s8", "352/320 s16")})
    turns, fit_features = [], PatchCore.fit_features
    monkeypatch.setattr(PatchCore, "fit_features", lambda self, features: turns.append(features.turns) or fit_features(self, features))
    choice = choose_frame(images, PatchCoreConfig(rotations="on", global_view="off"))
    assert turns == [3, 3] and choice.fit.features.turns == 3


def test_features_embedded_otherwise_than_the_model_learns_are_embedded_again(tmp_path: Path) -> None:
    """The search's features are used only in the model's own frame and patch grid, with region descriptors and
    turned patches exactly when it learns them."""
    images = [sample.path for sample in load_dataset(make_demo_dataset(tmp_path / "part", size=64, train=12)).train]
    config = PatchCoreConfig(image_size=64, crop=None, patch_stride=8, global_view="off", rotations="off")
    detector = PatchCore(config)
    detector.learn_aspect(images)
    features, sizes = detector.learning_features(images[:4], None)
    known = Embedded(torch.arange(4), features, sizes)
    for frame, stride, rotations, reused in [(detector.preprocess, 8, "off", True), (detector.preprocess, 16, "off", False),
                                             (Preprocess(80, None), 8, "off", False), (detector.preprocess, 8, "on", False)]:
        learner = PatchCore(replace(config, rotations=rotations))
        learner.learn_aspect(images)
        learner.use_embedded(known, frame, stride)
        counted = []
        learner._features = lambda images, progress, embed=None, known=None: counted.append(known) or (features, sizes)
        learner.learning_features(images, None)
        assert (counted[0] is not None) == reused and learner.embedded is None


def test_the_turns_are_learned_only_when_they_catch_more_than_two_standard_errors_more() -> None:
    # threaded-parts' probe at its frame: 119 of 128 synthetic defects without the turns, 127 with them
    assert turns_pay(119 / 128, 127 / 128, 128)
    # fine-defects': 126 against 127, one defect; rotated-parts' round parts: no change; fewer caught with them
    assert not turns_pay(126 / 128, 127 / 128, 128) and not turns_pay(0.977, 0.977, 128) and not turns_pay(0.9, 0.8, 128)
    assert turns_pay(0.5, 0.7, 64) and not turns_pay(0.5, 0.6, 64)  # two standard errors of 0.5 on 64: 0.125


def test_rotations_auto_on_off_and_the_booleans_of_yaml_and_older_model_files() -> None:
    assert PatchCoreConfig().rotations == "auto"
    assert PatchCoreConfig.from_dict({"rotations": True}).rotations == "on"
    assert PatchCoreConfig.from_dict({"rotations": False}).rotations == "off"
    read = PatchCoreConfig.from_dict({"global_view": True, "place_view": False})  # YAML's `on` and `off`
    assert (read.global_view, read.place_view) == ("on", "off")
    assert create_detector("patchcore", rotations="on").learns_turns and not create_detector("patchcore").learns_turns
    with pytest.raises(SettingsError, match="rotations"):
        PatchCoreConfig.from_dict({"rotations": "sometimes"})


def test_turns_the_probe_chooses_are_what_the_model_learns(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The turns' choice, whichever way the probe goes, is the fitted model's config: on, it learns each image's
    turns and no global view; off, neither turns nor a forced global view."""
    dataset = load_dataset(demo_root)
    dataset.samples = dataset.train[:MIN_IMAGES + 2]  # the fewest images a probe is made of: a quick search
    monkeypatch.setattr(frame_search, "CANDIDATES", {"352/320 s16": CANDIDATES["352/320 s16"]})  # one frame is enough here
    probes = []  # the search's probe goes to the model only when it judges its global view (its images are large)
    monkeypatch.setattr(PatchCore, "use_probe", lambda self, *searched: probes.append(self.config.rotations))
    for pays, chosen in ((True, "on"), (False, "off")):
        monkeypatch.setattr(frame_search, "turns_pay", lambda without, turned, count, pays=pays: pays)
        detector = fit_detector(dataset, "patchcore", {})[0]
        turns = detector.train_summary["frame_choice"]["rotations"]
        assert turns["chosen"] == detector.config.rotations == chosen
        assert 0 <= turns["recall_at_1pct_with"] <= 1 and turns["standard_error"] > 0
        assert detector.train_summary["fit"]["turns"] == (3 if pays else 0)
        if pays:
            assert detector.config.global_view == "off"  # a part at any turn has no layout of regions
    assert probes == ["off"]
    pinned = fit_detector(dataset, "patchcore", {"rotations": "on"})[0]  # the user's "on" is not judged
    assert "rotations" not in pinned.train_summary["frame_choice"] and pinned.config.rotations == "on"
