"""The drift check: parts that score higher than the training goods alarm, chance and defects do not, and the CLI and
the service read one model version's verdicts from the audit trail."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from defectscope.artifacts import load_model
from defectscope.calibration import Calibration
from defectscope.files import file_sha256
from defectscope.clock import now
from defectscope.line.audit import AuditLog, Verdict
from defectscope.line.drift import ALARM_P, MIN_PASSED, score_drift
from defectscope.thresholds import calibrate

RNG = np.random.default_rng(7)
GOODS = RNG.gamma(6.0, 1.0, 210)  # skewed, as cross-fitted good scores are: the mean is not the median
REFERENCE = calibrate(GOODS, "false_alarm_rate", 0.01)


def _new_goods(count: int, shift_sd: float = 0.0, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).gamma(6.0, 1.0, count) + shift_sd * REFERENCE.good_std


def test_the_calibration_keeps_the_good_scores_median() -> None:
    assert REFERENCE.good_median == pytest.approx(float(np.median(GOODS)))
    assert REFERENCE.good_median < REFERENCE.good_mean  # why the check needs it: a skewed score's mean is not its middle
    old = {k: v for k, v in REFERENCE.to_dict().items() if k != "good_median"}
    assert Calibration.from_dict(old).good_median is None  # a file from before the check still loads


def test_parts_scoring_higher_than_the_training_goods_alarm() -> None:
    found = score_drift(REFERENCE, _new_goods(200, 0.5))
    assert found.drifted and found.p_value < ALARM_P and found.shift_sd > 0.3
    assert found.message.startswith("drift:") and "stated false-alarm rate no longer holds" in found.message


def test_goods_like_the_training_goods_do_not_alarm_beyond_the_stated_level() -> None:
    alarms = [score_drift(REFERENCE, _new_goods(300, seed=seed)).drifted for seed in range(300)]
    assert sum(alarms) <= 3  # about 0.1% of checks by the level; one of these 300 (all against one reference)
    assert not score_drift(REFERENCE, _new_goods(300)).drifted


def test_defects_among_the_parts_and_lower_scores_do_not_alarm() -> None:
    with_defects = np.concatenate([_new_goods(270), np.full(30, REFERENCE.threshold * 3)])  # 10% defective parts
    found = score_drift(REFERENCE, with_defects)
    assert not found.drifted and found.parts == 300 and found.passed < 275  # the defects failed: not in the check
    lower = score_drift(REFERENCE, _new_goods(300, -0.5))
    assert not lower.drifted and lower.shift_sd < 0 and "safe side" in lower.message


def test_too_few_parts_unjudged_images_and_old_files_get_no_verdict_on_drift() -> None:
    few = score_drift(REFERENCE, [*_new_goods(MIN_PASSED - 1, 2.0), None, float("nan")])
    assert not few.drifted and few.parts == MIN_PASSED - 1 and "needs 20" in few.message
    old = score_drift(replace(REFERENCE, good_median=None), _new_goods(300, 2.0))
    assert not old.drifted and "defectscope calibrate" in old.message
    assert "no threshold yet" in score_drift(None, _new_goods(300, 2.0)).message


def _audit(database: Path, sha256: str, scores: np.ndarray, threshold: float) -> None:
    log = AuditLog(database)
    log.record([Verdict(now(), "part", sha256[:12], sha256, threshold, 0.01, "f" * 64, f"{i}.png", 8, 8, "upload",
                        float(s), float(s) / threshold, "defective" if s >= threshold else "good", 0, "operator")
                for i, s in enumerate(scores)])
    log.close()


def _scores_like(calibration: Calibration, count: int, shift_sd: float) -> np.ndarray:
    """Scores around a model's good median, spread by its good scores' sd, shifted by `shift_sd` of it."""
    spread = np.random.default_rng(3).normal(0, 0.5, count)
    return calibration.good_median + (spread + shift_sd) * calibration.good_std


def test_the_drift_command_reads_this_model_files_verdicts_and_exits_1_on_drift(served_folder: Path,
                                                                                 tmp_path: Path, cli) -> None:
    model = served_folder / "part.dsmodel"
    calibration, sha = load_model(model).calibration, file_sha256(model)
    database = tmp_path / "audit.sqlite"
    _audit(database, "0" * 64, _scores_like(calibration, 100, 3.0), calibration.threshold)  # another version's
    quiet = cli("audit", "drift", database, model)
    assert quiet.code == 0 and "needs 20" in quiet.out  # none of them are this file's
    _audit(database, sha, _scores_like(calibration, 100, 0.0), calibration.threshold)
    same = cli("audit", "drift", database, model)
    assert same.code == 0 and same.out.startswith("no drift:")
    _audit(database, sha, _scores_like(calibration, 100, 1.0), calibration.threshold)
    assert cli("audit", "drift", database, model, "--last", 100).code == 1  # the newest 100: risen
    risen = cli("audit", "drift", database, model, "--last", 100, "--json")
    assert risen.code == 1 and json.loads(risen.out)["drifted"] is True and json.loads(risen.out)["parts"] == 100
    assert cli("audit", "drift", database, model, "--last", 200).code == 0  # half as before: unproven against 40 goods
    for bad in (("audit", "drift", tmp_path / "none.sqlite", model), ("audit", "drift", database, model, "--last", 0),
                ("audit", "drift", database, model, "--last", 10**20)):  # beyond SQLite's integers: was a traceback
        result = cli(*bad)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1


def test_the_service_checks_the_served_version_from_its_audit_trail(served_folder: Path, tmp_path: Path) -> None:
    from defectscope.service.app import create_app
    from defectscope.service.config import ServiceConfig
    from defectscope.service.models import load_served

    settings = ServiceConfig.from_dict({})
    served = load_served([served_folder], settings)
    model = served["part"]
    _audit(tmp_path / "audit.sqlite", model.sha256, _scores_like(model.detector.calibration, 100, 1.0),
           model.detector.calibration.threshold)
    with TestClient(create_app(served, settings, audit=AuditLog(tmp_path / "audit.sqlite"))) as client:
        found = client.get("/v1/models/part/drift").json()
        assert found["drifted"] and found["parts"] == 100 and found["message"].startswith("drift:")
        assert 'defectscope_drift{model="part"} 1.0' in client.get("/metrics").text  # for a plant's alerting
        assert client.get("/v1/models/part/drift", params={"last": 0}).status_code == 422
        assert client.get("/v1/models/other/drift").status_code == 404
    with TestClient(create_app(load_served([served_folder], settings), settings, audit=None)) as client:
        assert client.get("/v1/models/part/drift").status_code == 404  # no audit trail: nothing to read
        assert "defectscope_drift{" not in client.get("/metrics").text


def test_calibrate_gives_a_model_file_from_before_the_check_its_median(served_folder: Path, tmp_path: Path, cli) -> None:
    from defectscope.artifacts import set_threshold
    from defectscope.model_header import model_info

    model = served_folder / "part.dsmodel"
    old = set_threshold(model, replace(load_model(model).calibration, good_median=None), tmp_path / "old.dsmodel")
    assert model_info(old)["calibration"]["good_median"] is None
    database = tmp_path / "audit.sqlite"
    _audit(database, file_sha256(old), _scores_like(load_model(model).calibration, 100, 3.0), 1e9)
    assert "defectscope calibrate" in cli("audit", "drift", database, old).out  # no reference: says how to get one
    assert cli("calibrate", old, "-o", tmp_path / "new.dsmodel", "--false-alarm-rate", 0.01).code == 0
    assert model_info(tmp_path / "new.dsmodel")["calibration"]["good_median"] == load_model(model).calibration.good_median
