"""Run an experiment's attempts in turn; each writes result.json (+ model file or held-out predictions) in its folder.

An attempt whose result.json was produced from the same model, settings and data (its content) is
skipped unless `redo` is set; one whose settings or data changed is run again, and until then its
old result is left out of the table. An attempt another run of the experiment is running (an OS
lock per attempt) is left to it. How an attempt runs depends on its model's kind (`kinds.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from defectscope._version import __version__
from defectscope.classify.crossval import InputCache
from defectscope.data.layout import Dataset, load_dataset
from defectscope.data.summary import summarize
from defectscope.errors import DefectscopeError, InputError
from defectscope.experiments.config import Attempt, Experiment
from defectscope.experiments.kinds import AttemptRun, Say, attempt_config, attempt_kind
from defectscope.files import check_apart, claim_folder, exclusive, file_sha256, folder_kind, write_json

RESULT = "result.json"
EXPERIMENT = "experiment.json"
ATTEMPT_FOLDER = "experiment attempt"  # the kind an attempt's folder is marked as: only such a folder is replaced


def data_digest(dataset: Dataset) -> str:
    """sha256 of what an attempt reads of the dataset: every image and mask, by its path within the dataset and the
    sha256 of its content (an image added, removed or edited changes it; a copy of the dataset elsewhere does not)."""
    files = sorted({path for sample in dataset.samples for path in (sample.path, sample.mask) if path is not None})
    listing = [[os.path.relpath(path, dataset.root), file_sha256(Path(path))] for path in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def fingerprint(attempt: Attempt, data: str) -> str:
    """Hash of what determines an attempt's result: model, settings, the data's content (`data_digest`), library."""
    key = json.dumps({"model": attempt.model, "settings": attempt.settings, "data": data, "library": __version__},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _previous(folder: Path) -> dict | None:
    """The result of an earlier run of an attempt, if a readable one is there."""
    try:
        result = json.loads((folder / RESULT).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and "fingerprint" in result else None


def run_experiment(experiment: Experiment, data: Path, out: Path, *, redo: bool = False, only: list[str] | None = None,
                   say: Say = print, status: Say | None = None, force: bool = False) -> list[dict]:
    """Run (or skip) each attempt; returns every attempt's result, finished earlier or now.

    `say` gets lasting messages; `status` (default: `say`) gets per-epoch and per-fold progress.
    An attempt that fails leaves no result or model file behind.
    """
    status = status or say
    names = [a.name for a in experiment.attempts]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise DefectscopeError(f"no attempt named {', '.join(unknown)}; attempts: {', '.join(names)}")
    dataset = load_dataset(data)
    check_apart(out, data, "experiment output", "dataset")
    claim_folder(out, force, "experiment")
    digest = data_digest(dataset)
    stamps = {attempt.name: fingerprint(attempt, digest) for attempt in experiment.attempts}
    write_json(out / EXPERIMENT, {"name": experiment.name, "data": str(data), "metric": experiment.metric,
                                  "baseline": experiment.baseline, "attempts": names, "dataset": summarize(dataset),
                                  "fingerprints": stamps})  # the table counts only results of these (`load_results`)
    results, inputs = [], InputCache()
    for attempt in experiment.attempts:
        entered = False
        try:  # one run at a time runs an attempt: two runs into one folder (two terminals) would delete its files
            with exclusive(out / f".{attempt.name}.lock", "busy", create=True):
                entered = True
                result = _run_attempt(attempt, stamps[attempt.name], dataset, out, inputs, redo=redo, only=only,
                                      say=say, status=status)
        except InputError:
            if entered:
                raise
            say(f"{attempt.name}: another run of this experiment is running it now; left to that run")
            continue
        if result is not None:
            results.append(result)
    return results


def _run_attempt(attempt: Attempt, stamp: str, dataset: Dataset, out: Path, inputs: InputCache, *, redo: bool,
                 only: list[str] | None, say: Say, status: Say) -> dict | None:
    """Run one attempt (or skip it: finished earlier, or not among `only`); its result, or None when there is none
    for the table (not run, and none current)."""
    folder = out / attempt.name
    previous = _previous(folder)
    current = previous is not None and previous["fingerprint"] == stamp
    if only and attempt.name not in only or current and not redo:
        if current:
            say(f"{attempt.name}: finished earlier, skipped (--redo runs it again)")
            return previous
        if previous:
            say(f"{attempt.name}: its earlier result is from other settings or data; left out of the table (run "
                "it again)")
        return None
    if previous and not current:
        say(f"{attempt.name}: settings or data changed since the last run; running again")
    say(f"{attempt.name}: {attempt.model} {attempt.settings}")
    if folder.exists() or folder.is_symlink():  # a stale attempt's files must not mix with the new run
        if folder.is_symlink() or folder_kind(folder) != ATTEMPT_FOLDER:
            raise DefectscopeError(f"{folder} exists and is not an attempt folder written by defectscope; move it "
                                   "away or choose another --out")
        shutil.rmtree(folder)
    claim_folder(folder, what=ATTEMPT_FOLDER)
    run = AttemptRun(attempt.name, attempt.model, attempt_config(attempt.model, attempt.settings), dataset, folder,
                     lambda text, name=attempt.name: status(f"{name}: {text}"), inputs)
    try:
        result = attempt_kind(attempt.model).run(run)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    say(f"{attempt.name}: done in {result['fit_s']:.0f} s of training; " + ", ".join(
        f"{k} {v:.3f}" for k, v in result["summary"].items() if v is not None))
    result.update(attempt=attempt.name, model=attempt.model, settings=attempt.settings, description=attempt.description,
                  fingerprint=stamp, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  library_version=__version__)
    write_json(folder / RESULT, result)
    return result
