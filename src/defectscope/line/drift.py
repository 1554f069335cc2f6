"""Whether the parts a model judges still look like the good images it was calibrated on: the drift check.

A model states its false-alarm rate for parts like its training goods. When the line's good parts change
(material, light, camera, fixture), they score higher and that rate no longer holds. The check reads the
recent scores of one model version from the audit trail and asks of the parts it passed (those below
the threshold: the good ones as the line judged them, truncated as the calibration's are): do more of
them score above the training goods' median than chance allows? A sign test, with the reference
median's own noise (it comes from `good_count` images) counted. Only a rise alarms: cross-fitted
training scores run a little high, so parts scoring lower is expected and keeps the stated rate on the
safe side. No SciPy: the runtime's callers use it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from defectscope.calibration import Calibration
from defectscope.errors import InputError
from defectscope.line.audit import AuditLog, require_database

MIN_PASSED = 20  # passed parts the check needs before it speaks (fewer: its normal approximation is poor)
ALARM_P = 0.001  # one-sided level: a line checked every hour should not be alarmed by chance
MIN_SHIFT_SD = 0.2  # a smaller rise of the median moves a 1% false-alarm rate little (the calibration bias aimed for)
DEFAULT_PARTS = 500  # recent verdicts read by default
MAX_PARTS = 100_000  # recent verdicts read at most
CHECK_EVERY = 50  # images a hot folder judges between two checks


@dataclass(frozen=True)
class Drift:
    """What the check found: counts, the shift, its p-value, whether it alarms, and one line saying so."""

    parts: int  # recent scored parts read
    passed: int  # of them below the threshold
    share_above: float | None  # passed parts above the training goods' median
    expected_share: float  # ... without drift
    shift_sd: float | None  # passed parts' median less the training goods' median, in the goods' standard deviations
    p_value: float | None  # one-sided: the chance of so many above the median without drift
    drifted: bool
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def score_drift(calibration: Calibration | None, scores: Sequence[float]) -> Drift:
    """The drift check on one model version's recent scores (non-finite ones, images not judged, are left out)."""
    values = np.asarray([s for s in scores if s is not None], dtype=np.float64)
    values = values[np.isfinite(values)]
    if calibration is None or calibration.good_median is None:
        reason = ("the model has no threshold yet" if calibration is None else "its calibration holds no median of "
                  "good scores (cut before the check existed, or not from good images); a model file from good images "
                  "gets one with `defectscope calibrate`")
        return Drift(len(values), 0, None, 0.5, None, None, False, f"drift not judged: {reason}")
    rate = min(max(calibration.false_alarm_rate or 0.0, 0.0), 0.49)
    expected = (0.5 - rate) / (1 - rate)  # a good part below the threshold lies above the median this often
    passed = values[values < calibration.threshold]
    if len(passed) < MIN_PASSED:
        return Drift(len(values), len(passed), None, expected, None, None, False,
                     f"drift not judged yet: {len(passed)} passed part(s) among the last {len(values)} scored by this "
                     f"version; the check needs {MIN_PASSED}")
    share = float((passed > calibration.good_median).mean())
    shift = float((np.median(passed) - calibration.good_median) / max(calibration.good_std, 1e-12))
    noise = math.sqrt(expected * (1 - expected) * (1 / len(passed) + 1 / max(calibration.good_count, 1)))
    p_value = 0.5 * math.erfc((share - expected) / noise / math.sqrt(2))
    drifted = p_value < ALARM_P and shift >= MIN_SHIFT_SD
    seen = (f"of the last {len(values)} parts, {share:.0%} of the {len(passed)} passed score above the training goods' "
            f"median ({expected:.0%} without drift; median {shift:+.2f} sd, p = {p_value:.2g})")
    if drifted:
        text = (f"drift: {seen}: these parts score higher than the good images the model was calibrated on, so its "
                "stated false-alarm rate no longer holds for them; teach it today's good parts (`defectscope update`) "
                "or fit it again")
    elif shift < 0:
        text = f"no drift: {seen}; parts scoring lower than the training goods keep the stated rate on the safe side"
    else:
        text = f"no drift: {seen}"
    return Drift(len(values), len(passed), share, expected, shift, p_value, drifted, text)


def recent_drift(audit: AuditLog, sha256: str, calibration: Calibration | None, last: int = DEFAULT_PARTS) -> Drift:
    """The drift check on the last `last` verdicts the model file with this sha256 wrote to `audit` (so another
    version's never mix in): what the hot folder, the service and its metrics ask."""
    return score_drift(calibration, audit.recent_scores(sha256, last))


def audited_drift(database: Path, model: Path, last: int = DEFAULT_PARTS) -> Drift:
    """The drift check of a model file (or deployment file) on its last `last` verdicts in an audit database; the
    file's sha256 picks its own verdicts, so another version's scores never mix in. Reads headers only (no PyTorch)."""
    from defectscope.files import file_sha256
    from defectscope.runtime import checked_manifest, is_deployment

    if not 1 <= last <= MAX_PARTS:
        raise InputError(f"--last must be from 1 to {MAX_PARTS:,}, got {last}")
    require_database(database)
    manifest = checked_manifest(model)
    stored = (manifest["model"] if is_deployment(model) else manifest).get("calibration")
    calibration = Calibration.from_dict(stored) if stored is not None else None
    log = AuditLog(database, read_only=True)
    try:
        return recent_drift(log, file_sha256(model), calibration, last)
    finally:
        log.close()
