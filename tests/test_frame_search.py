"""The frame search's rule: a costlier frame must beat the cheapest by more than the measurement's noise."""

from __future__ import annotations

from defectscope.detectors.frame_search import CANDIDATES, _cheapest_near_best, frame_settings, patches_per_image


def _evidence(recalls: dict[str, float]) -> dict[str, dict[str, float]]:
    return {name: {"recall_at_1pct": recall, "mean_margin_sd": 5.0} for name, recall in recalls.items()}


def test_the_cheapest_frame_within_one_standard_error_wins() -> None:
    costs = sorted(CANDIDATES, key=patches_per_image)
    assert costs[0] == "352/320 s16" and costs[-1] == "352/320 s8"
    near = _evidence({"288/256 s8": 0.96, "352/320 s8": 0.97, "352/320 s16": 0.955, "416/384 s16": 0.90})
    assert _cheapest_near_best(near, 64) == "352/320 s16"  # 0.955 is within one se (0.021) of 0.97
    clear = _evidence({"288/256 s8": 0.80, "352/320 s8": 0.97, "352/320 s16": 0.70, "416/384 s16": 0.75})
    assert _cheapest_near_best(clear, 64) == "352/320 s8"  # only the costliest is near the best


def test_every_candidate_keeps_the_same_memory_per_image() -> None:
    rows = {name: frame_settings(name, {})["coreset_ratio"] * patches_per_image(name) for name in CANDIDATES}
    assert max(rows.values()) - min(rows.values()) < 1e-6 and abs(rows["352/320 s16"] - 40) < 1e-6
    assert frame_settings("352/320 s8", {"coreset_ratio": 0.2})["coreset_ratio"] == 0.05
