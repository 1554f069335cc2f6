"""Decision thresholds: from good images only (a stated false-alarm rate, percentile, mean + k*std), or from labels.

Good-only thresholds come from cross-fitted scores: every training image scored by a model that
never saw it, so the scores look like those of new good parts. The false-alarm-rate threshold is
the conformal quantile of those n scores: the k-th smallest with k = ceil((n + 1)(1 - rate)). For
exchangeable scores a new good part then scores at or above it with probability (n + 1 - k) / (n + 1)
<= rate, and that probability, over calibration sets, follows Beta(n + 1 - k, k): its quantiles are
the stated interval. A rate below 1 / (n + 1) is out of reach of n scores: the largest stands, with its own rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import ModuleType

import numpy as np

from defectscope.calibration import Calibration, stated_rank
from defectscope.errors import DefectscopeError

GOOD_ONLY_METHODS = ("false_alarm_rate", "sigma", "percentile")
DEFAULT_FALSE_ALARM_RATE = 0.01
MIN_CALIBRATION_IMAGES = 20  # fewer good calibration scores leave the threshold to chance
INTERVAL = 0.95
RATE_CHECK_P = 0.01  # one check per evaluation: good test images like the training goods fail it once in a hundred


def _stats() -> ModuleType:
    """scipy.stats, imported when a threshold is computed: it takes 0.7 s, and a model loaded to predict needs none."""
    from scipy import stats

    return stats


def no_spread(scores: np.ndarray) -> bool:
    """Whether scores are (almost) all the same: no rate can be read from where a threshold falls among them."""
    return float(np.ptp(scores)) <= 1e-6 * max(float(np.abs(scores).max()), 1e-12)


def few_images_warning(count: int, std: float, flat: bool = False) -> str | None:
    """A warning when a threshold rests on too few good calibration scores (or on no spread at all)."""
    if flat:
        return (f"the {count} good calibration scores are (almost) all the same ({'zero' if std <= 0 else 'near-zero'} "
                "spread): the threshold sits just above them and the stated false-alarm rate cannot be checked "
                "against them; calibrate with varied good images (or labelled ones)")
    if count >= MIN_CALIBRATION_IMAGES and std > 0:
        return None
    spread = " with zero spread" if std <= 0 else ""
    return (f"the threshold rests on {count} good calibration score(s){spread}; at least {MIN_CALIBRATION_IMAGES} are "
            "needed for a stable one: add good training images, or set the threshold with labelled images")


def clopper_pearson(hits: int, n: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson) INTERVAL of a proportion hits / n: it always holds the observed share."""
    tail = (1 - INTERVAL) / 2
    low = float(_stats().beta.ppf(tail, hits, n - hits + 1)) if hits > 0 else 0.0
    high = float(_stats().beta.ppf(1 - tail, hits + 1, n - hits)) if hits < n else 1.0
    return low, high


def beta_interval(a: float, b: float) -> tuple[float, float]:
    """The central INTERVAL of Beta(a, b)."""
    tail = (1 - INTERVAL) / 2
    return float(_stats().beta.ppf(tail, a, b)), float(_stats().beta.ppf(1 - tail, a, b))


def exceedance(scores: np.ndarray, threshold: float) -> tuple[float, tuple[float, float]]:
    """Share of new good parts expected at or above a threshold that did not come from these scores (Jeffreys)."""
    hits = int((scores >= threshold).sum())
    n = len(scores)
    return (hits + 0.5) / (n + 1), beta_interval(hits + 0.5, n - hits + 0.5)


def _above_all(scores: np.ndarray) -> float:
    """Just above scores that are (almost) all the same value; at least 1e-6 above, so that scores all 0 (images all
    alike) get a threshold a score can be divided by (not the smallest float, which made every normalized score
    infinite)."""
    top = float(scores.max())
    return float(np.nextafter(top + max(1e-6 * abs(top), 1e-6), np.inf))


def false_alarm_cut(scores: np.ndarray, rate: float) -> float:
    """The threshold `calibrate` sets for a stated false-alarm rate, without the interval of its rate: for choices
    judged at a rate, many times per fit."""
    scores = np.asarray(scores, dtype=np.float64)
    if no_spread(scores):
        return _above_all(scores)
    return float(np.sort(scores)[min(stated_rank(len(scores), rate), len(scores)) - 1])


def false_alarm_threshold(scores: np.ndarray, rate: float) -> tuple[float, float, tuple[float, float], str | None]:
    """(threshold, expected false-alarm rate, its interval, a warning or None) for a stated rate. A rate below 1/(n+1)
    cannot be stated from n scores without a model of their tail, whose small-sample fits understate the rate: the
    threshold is then the largest score, with the rate it truly has (`benchmarks/stated_rate.py`)."""
    n, wanted = len(scores), stated_rank(len(scores), rate)
    rank = min(wanted, n)
    warning = None if wanted <= n else (
        f"a false-alarm rate of {rate:g} needs at least {math.ceil(1 / rate - 1 - 1e-9)} good calibration scores; with "
        f"{n} the threshold is the largest of them, and its rate is 1/{n + 1} ({1 / (n + 1):.2%}): add good images")
    return false_alarm_cut(scores, rate), (n + 1 - rank) / (n + 1), beta_interval(n + 1 - rank, rank), warning


def finite_scores(scores: np.ndarray, what: str) -> np.ndarray:
    """Scores as float64, refused when any is NaN or infinite: no threshold may rest on (or become) a non-number,
    which every comparison would read as "good"."""
    values = np.asarray(scores, dtype=np.float64)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise DefectscopeError(f"{bad} of the {values.size} {what} scores are not finite numbers (NaN or infinity): "
                               "no threshold is set on them; check the images and the model")
    return values


def calibrate(good_scores: np.ndarray, method: str = "false_alarm_rate", param: float = DEFAULT_FALSE_ALARM_RATE) -> Calibration:
    """Threshold from unseen good scores: a stated false-alarm rate, the param-th percentile, or mean + param*std."""
    scores = finite_scores(good_scores, "good calibration")
    if scores.size == 0:
        raise DefectscopeError("no good calibration scores to set a threshold on")
    warning = None
    flat = no_spread(scores)
    if method == "false_alarm_rate":
        if not 0 < param < 1:
            raise DefectscopeError(f"false-alarm rate must be in (0, 1), got {param}")
        if flat:  # every quantile is that one value: stand just above it
            threshold = _above_all(scores)
            rate, interval = exceedance(scores, threshold)
        else:
            threshold, rate, interval, warning = false_alarm_threshold(scores, param)
    elif method in ("sigma", "percentile"):
        if method == "sigma":
            threshold = scores.mean() + param * scores.std()
        else:
            if not 0 < param <= 100:
                raise DefectscopeError(f"percentile must be in (0, 100], got {param}")
            threshold = np.percentile(scores, param)
        rate, interval = exceedance(scores, threshold)
    else:
        raise DefectscopeError(f"threshold method from good images must be one of {', '.join(GOOD_ONLY_METHODS)}, got '{method}'")
    std = float(scores.std())
    warnings = [w for w in (few_images_warning(int(scores.size), std, flat), warning) if w]
    return Calibration(float(threshold), method, float(param), float(scores.mean()), std, int(scores.size),
                       "; ".join(warnings) or None, float(rate), tuple(interval), good_median=float(np.median(scores)))


def with_map_level(calibration: Calibration, map_scores: np.ndarray | None) -> Calibration:
    """`calibration` with its map's region level (`Calibration.map_threshold`) set by the same method and parameter on
    the cross-fitted good scores of the view the map shows, when the threshold came from good scores and the map has
    scores of its own; otherwise as it is (a level chosen with labels has no rate to restate)."""
    if map_scores is None or calibration.method not in GOOD_ONLY_METHODS:
        return calibration
    return replace(calibration, map_threshold=calibrate(map_scores, calibration.method, calibration.param).threshold)


def f1_calibration(labels: np.ndarray, scores: np.ndarray, previous: Calibration | None, margin: float = 0.0
                   ) -> Calibration:
    """The F1-optimal threshold on labelled scores, keeping the good-image statistics of the previous calibration."""
    from defectscope.metrics import f1_max  # scikit-learn: only when labels set the threshold

    scores = finite_scores(scores, "labelled")
    f1, threshold = f1_max(labels, scores)
    return labelled_calibration(scores[np.asarray(labels) == 0], scores[np.asarray(labels) == 1],
                                threshold, "f1", f1, previous, margin)


def recall_threshold(defective_scores: np.ndarray, target: float) -> float:
    """The highest threshold that still calls at least `target` of these defective scores defective."""
    if not 0 < target <= 1:
        raise DefectscopeError(f"target recall must be in (0, 1], got {target}")
    ordered = np.sort(finite_scores(defective_scores, "defective"))
    if not len(ordered):
        raise DefectscopeError("a target recall needs defective images")
    return float(ordered[len(ordered) - math.ceil(target * len(ordered))])


def labelled_calibration(good_scores: np.ndarray, defective_scores: np.ndarray, threshold: float, method: str,
                         param: float, previous: Calibration | None, margin: float = 0.0) -> Calibration:
    """A threshold chosen with labelled images, with the observed false-alarm rate and recall it gives and their
    exact 95% intervals - wide when few images were labelled, and they say so - and the labelled scores nearest it.
    `margin` (0 to 1) moves it that share of the way down from the weakest defective score it catches towards the
    strongest good score below it: room for parts a little weaker than the labelled ones, no new false alarm."""
    good, bad = finite_scores(good_scores, "good"), finite_scores(defective_scores, "defective")
    if len(good) == 0 or len(bad) == 0:
        raise DefectscopeError("choosing a threshold with labels needs good and defective images")
    if not 0 <= margin < 1:
        raise DefectscopeError(f"margin must be in [0, 1), got {margin}")
    below, caught_scores = good[good < threshold], bad[bad >= threshold]
    gap = (float(below.max()), float(caught_scores.min())) if len(below) and len(caught_scores) else None
    if gap is not None and margin:
        threshold = gap[1] - margin * (gap[1] - gap[0])
    false_alarms, caught = int((good >= threshold).sum()), int((bad >= threshold).sum())
    warnings = []
    if min(len(good), len(bad)) < MIN_CALIBRATION_IMAGES:
        warnings.append(f"chosen on {len(good)} good and {len(bad)} defective image(s): the intervals show how "
                        f"uncertain the rates are; label at least {MIN_CALIBRATION_IMAGES} of each to narrow them")
    ranked = (np.searchsorted(np.sort(good), bad, "left") + np.searchsorted(np.sort(good), bad, "right")).sum() / 2
    if ranked < len(good) * len(bad) / 2:  # the chance a defective image outscores a good one is below a coin's
        warnings.append(f"the labelled defective images score below the good ones more often than not (image AUROC "
                        f"{ranked / (len(good) * len(bad)):.2f}): are the labels swapped, or is the model of another "
                        "product?")
    warning = "; ".join(warnings) or None
    return Calibration(
        float(threshold), method, float(param),
        previous.good_mean if previous else float(good.mean()), previous.good_std if previous else float(good.std()),
        previous.good_count if previous else len(good), warning,
        false_alarms / len(good), clopper_pearson(false_alarms, len(good)),
        caught / len(bad), clopper_pearson(caught, len(bad)), gap,
        good_median=previous.good_median if previous else float(np.median(good)),
    )


@dataclass(frozen=True)
class RateCheck:
    """Whether a threshold set from good images keeps its stated false-alarm rate on held-out good images: the false
    alarms among them, the chance of that many or more for parts like the training goods, and the calibration bias
    (the training goods' mean less theirs, in their standard deviations; negative: they score higher)."""

    images: int
    flagged: int
    stated_rate: float
    p_value: float
    bias_sd: float | None
    bias_se: float | None
    holds: bool
    message: str


def check_stated_rate(calibration: Calibration | None, good_scores: np.ndarray) -> RateCheck | None:
    """The check of a good-only threshold on held-out good scores; None when there is none to check (no good image, or
    a threshold chosen with labels, whose rate was read on labelled images). For exchangeable scores the false alarms
    among m new parts follow a beta-binomial law: the threshold's own rate is Beta(a, b) (`false_alarm_threshold`),
    and given it they are binomial, so a small calibration set's luck is counted, not only the test set's."""
    scores = np.asarray(good_scores, np.float64)
    if (calibration is None or calibration.method not in GOOD_ONLY_METHODS or calibration.false_alarm_rate is None
            or not len(scores)):
        return None
    rate, total = calibration.false_alarm_rate, calibration.good_count + 1
    flagged = int((scores >= calibration.threshold).sum())
    p_value = float(_stats().betabinom.sf(flagged - 1, len(scores), rate * total, (1 - rate) * total))
    spread = float(scores.std())
    bias = se = None
    if len(scores) > 1 and spread > 0:
        bias = (calibration.good_mean - float(scores.mean())) / spread
        se = math.sqrt(1 / len(scores) + (calibration.good_std / spread) ** 2 / calibration.good_count)
    seen = f"{flagged} of the {len(scores)} good test images are flagged"
    chance = f"p = {p_value:.2g}" if p_value >= 1e-12 else "p < 1e-12"
    if p_value < RATE_CHECK_P:
        text = (f"{seen}, more than the stated {rate:.1%} allows ({chance} for parts like the training goods): "
                "these good parts do not score like the images the threshold was set on (another product, or the "
                "material, light or camera changed since fitting), so the stated rate does not hold for them; fit or "
                "teach the model on such parts")
    else:
        text = f"{seen}, as the stated {rate:.1%} allows ({chance})"
    if bias is not None:
        how = "like" if abs(bias) <= 2 * se else "higher than" if bias < 0 else "lower than"
        text += f"; calibration bias {bias:+.2f} sd (± {se:.2f}): the good test images score {how} the cross-fitted training goods"
    return RateCheck(len(scores), flagged, rate, p_value, bias, se, p_value >= RATE_CHECK_P, text)
