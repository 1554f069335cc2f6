"""How the line's drift check (`line.drift`) behaves: how often it alarms on good parts like the training goods and
how often it catches a rise, on scores drawn from known distributions; then, on real and generated categories, what
it says of each default model's good test images, read as a line would see them.

    python benchmarks/drift.py --root ../shared/datasets --categories mvtec_ad/bottle mvtec_3d_ad_rgb/tire \
        mvtec_loco/juice_bottle --generate rotated-parts fine-defects logical-parts --out benchmarks/results

Simulated rows: the reference is `calibrate` on n good scores; each draw's parts are new good scores, raised by the
shift (in the goods' standard deviation), judged by the check. Category rows: the default PatchCore (its frame search
and views) fitted on the training goods; the check on the good test images, and on the whole test set in file order.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from scipy import stats

from defectscope import load_dataset
from defectscope.line.drift import score_drift
from defectscope.pipeline import evaluate_model, fit_detector
from defectscope.thresholds import calibrate

from generated import CATEGORIES, write_generated  # noqa: E402  (benchmarks/generated.py)
from isolated import frame_label, markdown_table, write_results  # noqa: E402  (benchmarks/isolated.py)

DISTRIBUTIONS = {"normal": stats.norm(20.0, 2.0), "gamma(4)": stats.gamma(4.0), "lognormal(0.25)": stats.lognorm(0.25, scale=20.0),
                 "student t(5)": stats.t(5, loc=20.0, scale=2.0)}
SIMULATED = (
    ("distribution", "good scores", "{}"), ("reference", "reference goods", "{}"), ("parts", "parts checked", "{}"),
    ("shift", "shift (sd)", "{:+.1f}"), ("alarms", "alarms", "{:.1%}"),
)
REAL = (
    ("category", "category", "{}"), ("frame", "frame", "{}"), ("bias", "calibration bias (sd)", "{:+.2f}"),
    ("good_parts", "good test images", "{}"), ("good_share", "above the median", "{:.0%}"),
    ("good_shift", "median shift (sd)", "{:+.2f}"), ("good_p", "p", "{:.2g}"), ("good_alarm", "alarm", "{}"),
    ("all_parts", "whole test set: passed / parts", "{}"), ("all_share", "above the median", "{:.0%}"),
    ("all_p", "p", "{:.2g}"), ("all_alarm", "alarm", "{}"),
)


def simulated(draws: int) -> list[dict]:
    """The check's alarm rate on drawn scores, without drift and with rises of 0.2 and 0.5 sd."""
    rng, rows = np.random.default_rng(0), []
    for name, law in DISTRIBUTIONS.items():
        for reference in (40, 210, 500):
            for parts in (100, 500):
                for shift in (0.0, 0.2, 0.5):
                    alarms = 0
                    for _ in range(draws):
                        calibration = calibrate(law.rvs(reference, random_state=rng), "false_alarm_rate", 0.01)
                        scores = law.rvs(parts, random_state=rng) + shift * law.std()
                        alarms += score_drift(calibration, scores).drifted
                    rows.append({"distribution": name, "reference": reference, "parts": parts, "shift": shift,
                                 "alarms": alarms / draws})
    return rows


def measured(folder: Path) -> dict:
    """The default model on one category; the check on its good test images and on its whole test set."""
    dataset = load_dataset(folder)
    detector, _ = fit_detector(dataset, "patchcore", {})
    evaluation = evaluate_model(detector, dataset)[0]
    records = evaluation.records
    scores, labels = np.array([r["score"] for r in records]), np.array([r["label"] for r in records])
    good, everything = score_drift(detector.calibration, scores[labels == 0]), score_drift(detector.calibration, scores)
    return {"category": folder.name, "frame": frame_label(detector.config),
            "bias": evaluation.metrics["at_model_threshold"]["stated_rate_check"]["bias_sd"],
            "good_parts": good.parts, "good_share": good.share_above, "good_shift": good.shift_sd,
            "good_p": good.p_value, "good_alarm": "yes" if good.drifted else "no",
            "all_parts": f"{everything.passed} / {everything.parts}", "all_share": everything.share_above,
            "all_p": everything.p_value, "all_alarm": "yes" if everything.drifted else "no"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--categories", nargs="*", default=[])
    parser.add_argument("--generate", nargs="*", default=[], choices=CATEGORIES)
    parser.add_argument("--draws", type=int, default=1000, help="draws per simulated row")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    simulated_rows = simulated(args.draws)
    print(markdown_table(simulated_rows, SIMULATED), flush=True)
    scratch = tempfile.TemporaryDirectory()
    folders = [args.root / c for c in args.categories] + [write_generated(n, Path(scratch.name)) for n in args.generate]
    real_rows = []
    for folder in folders:
        real_rows.append(measured(folder))
        print(markdown_table(real_rows[-1:], REAL).splitlines()[-1], flush=True)
    write_results(args.out, "drift", simulated_rows + real_rows,
                  markdown_table(simulated_rows, SIMULATED) + "\n" + markdown_table(real_rows, REAL))


if __name__ == "__main__":
    main()
