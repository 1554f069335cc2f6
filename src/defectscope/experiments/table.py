"""The comparison table of an experiment's attempts, computed from their result.json files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from defectscope.data.summary import imbalance_line
from defectscope.errors import DefectscopeError
from defectscope.experiments.runner import EXPERIMENT, RESULT
from defectscope.files import write_json, write_text

HYPER = (("epochs", "epochs"), ("lr", "lr"), ("optimizer", "optimizer"), ("batch_size", "batch"))
METRIC_COLUMNS = (
    ("train_loss", "train loss"), ("test_loss", "test loss"), ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."), ("macro_f1", "macro F1"), ("tail_recall", "tail recall"),
    ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"),
    ("box_ap", "box AP"), ("box_ap50", "box AP50"), ("mask_ap", "mask AP"), ("mask_ap50", "mask AP50"),
)
LOSSES = ("train_loss", "test_loss")  # top-level in a result; blank (not n/a) for models without a training loop


def changes(result: dict, baseline: dict) -> dict:
    """Settings that differ from the baseline attempt (the model and its own settings if the model differs)."""
    if result["model"] != baseline["model"]:
        own = {k: v for k, v in result["settings"].items() if baseline["settings"].get(k) != v}
        return {"model": result["model"], **own}
    base, own = baseline["config"], result["config"]
    return {k: own[k] for k in own if base.get(k) != own[k]}


def _text(changed: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "(baseline)"


def _number(value: float | None, spread: dict | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} ± {spread['std']:.3f}" if spread else f"{value:.3f}"


def load_results(folder: Path) -> tuple[dict, list[dict]]:
    """The experiment record and the finished attempts' results, in config order: only those made from the settings
    and data of the last run (its recorded fingerprints); the record's "stale" names the others."""
    meta_path = folder / EXPERIMENT
    if not meta_path.is_file():
        raise DefectscopeError(f"{folder} is not an experiment folder (no {EXPERIMENT}); run 'defectscope experiment run' first")
    try:
        meta = json.loads(meta_path.read_text())
        results = [json.loads((folder / name / RESULT).read_text()) for name in meta["attempts"] if (folder / name / RESULT).is_file()]
        expected = meta.get("fingerprints")  # absent from older records: every result counts
        current = [r for r in results if expected is None or r.get("fingerprint") == expected.get(r["attempt"])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DefectscopeError(f"{folder} holds a damaged experiment record ({exc}); run the experiment again") from exc
    meta["stale"] = [r["attempt"] for r in results if r not in current]
    results = current
    if not results:
        raise DefectscopeError(f"{folder} has no finished attempts yet" + (
            f" for its current settings and data ({', '.join(meta['stale'])}: from others; run them again)"
            if meta["stale"] else ""))
    return meta, results


def build_table(meta: dict, results: list[dict], metric: str | None = None) -> dict:
    """Rows (one per attempt), column names, and the best attempt by the metric with its changes."""
    metric = metric or meta["metric"]
    by_name = {r["attempt"]: r for r in results}
    baseline = by_name.get(meta["baseline"], results[0])
    present = [(key, label) for key, label in METRIC_COLUMNS
               if any(r.get(key) is not None or r["summary"].get(key) is not None for r in results)]
    columns = ["attempt", "model", "changes vs baseline", *[label for _, label in HYPER], *[label for _, label in present], "fit s", "ms/img"]
    rows = []
    for r in results:
        config, trained = r["config"], "epochs" in r["config"]
        cells = [r["attempt"], r["model"], _text(changes(r, baseline) if r is not baseline else {})]
        cells += [str(config.get(key, "")) if trained or key == "batch_size" else "" for key, _ in HYPER]
        spread = r.get("spread", {})
        for key, _ in present:
            value = r.get(key) if key in LOSSES else r["summary"].get(key)
            cells.append("" if value is None and key in LOSSES else _number(value, spread.get(key)))
        cells += [f"{r['fit_s']:.1f}", f"{r['infer_ms']:.1f}"]
        rows.append(cells)
    ranked = [r for r in results if r["summary"].get(metric) is not None]
    best = max(ranked, key=lambda r: r["summary"][metric]) if ranked else None
    verdict = (f"Best by {metric}: {best['attempt']} ({best['summary'][metric]:.3f}); "
               f"changes from baseline {baseline['attempt']}: {_text(changes(best, baseline)) if best is not baseline else 'none (it is the baseline)'}"
               if best else f"no attempt reports {metric}")
    if meta.get("stale"):
        verdict += f". Left out, made from other settings or data: {', '.join(meta['stale'])} (run them again)"
    return {"columns": columns, "rows": rows, "best": best and best["attempt"], "metric": metric, "verdict": verdict,
            "dataset": meta.get("dataset"), "experiment": meta["name"]}


def markdown(table: dict) -> str:
    lines = [f"# {table['experiment']}", "", imbalance_line(table["dataset"]), "",
             "| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    return "\n".join([*lines, "", table["verdict"], ""])


def csv_text(table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(table["columns"])
    writer.writerows(table["rows"])
    return buffer.getvalue()


def write_table(folder: Path, metric: str | None = None) -> tuple[dict, list[Path]]:
    """Build the table from the folder's results and write table.md / table.csv / table.json there."""
    table = build_table(*load_results(folder), metric)
    paths = [folder / "table.md", folder / "table.csv", folder / "table.json"]
    write_text(paths[0], markdown(table))
    write_text(paths[1], csv_text(table))
    write_json(paths[2], table)
    return table, paths
