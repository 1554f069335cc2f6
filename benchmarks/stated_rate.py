"""How true the stated false-alarm rate is: good scores drawn from known distributions, the 1% threshold set by
`calibrate` from n of them, and the rate at that threshold read from the distribution itself.

    python benchmarks/stated_rate.py --out benchmarks/results

From 99 scores up the 1% threshold is an order statistic; below, the largest score, stated at its rate 1/(n+1). Each
row: the stated rate (mean over the draws), the mean and the 90th percentile of the true rate at the threshold, the
share of draws whose true rate lies in the stated 95% interval, and the time `calibrate` takes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import stats

from defectscope.calibration import stated_rank
from defectscope.thresholds import calibrate

from isolated import markdown_table, write_results  # noqa: E402  (benchmarks/isolated.py, beside this script)

DISTRIBUTIONS = {  # good scores of different tails: light, skewed, heavy, bounded
    "normal": stats.norm(20.0, 2.0),
    "gamma(4)": stats.gamma(4.0, scale=1.0),
    "lognormal(0.25)": stats.lognorm(0.25, scale=20.0),
    "student t(5)": stats.t(5, loc=20.0, scale=2.0),
    "beta(2, 2)": stats.beta(2.0, 2.0, loc=15.0, scale=10.0),
}
COLUMNS = (("distribution", "good scores", "{}"), ("count", "n", "{}"), ("how", "threshold from", "{}"),
           ("stated", "stated rate, mean", "{:.2%}"), ("mean_rate", "true rate, mean", "{:.2%}"),
           ("p90_rate", "true rate, 90th percentile", "{:.2%}"),
           ("coverage", "true rate in the stated 95% interval", "{:.0%}"), ("ms", "calibrate ms", "{:.0f}"))


def measure(name: str, count: int, draws: int, rate: float) -> dict:
    """The true false-alarm rate of `draws` thresholds, each calibrated on `count` scores of one distribution."""
    distribution, rng = DISTRIBUTIONS[name], np.random.default_rng(count)
    true, stated, covered, seconds = [], [], 0, 0.0
    for _ in range(draws):
        scores = distribution.rvs(count, random_state=rng)
        start = time.perf_counter()
        calibration = calibrate(scores, "false_alarm_rate", rate)
        seconds += time.perf_counter() - start
        true.append(float(distribution.sf(calibration.threshold)))
        stated.append(calibration.false_alarm_rate)
        low, high = calibration.false_alarm_interval
        covered += low <= true[-1] <= high
    how = "the largest score" if stated_rank(count, rate) > count else "an order statistic"
    return {"distribution": name, "count": count, "how": how,
            "stated": float(np.mean(stated)), "mean_rate": float(np.mean(true)), "p90_rate": float(np.quantile(true, 0.9)),
            "coverage": covered / draws,
            "ms": seconds / draws * 1000, "draws": draws, "rate": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", nargs="+", type=int, default=[30, 60, 98, 200])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = [measure(name, count, args.draws, 0.01) for name in DISTRIBUTIONS for count in args.counts]
    note = f"\nStated rate 1%, {args.draws} draws a row.\n"
    write_results(args.out, "stated-rate", rows, markdown_table(rows, COLUMNS) + note)


if __name__ == "__main__":
    main()
