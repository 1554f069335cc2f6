"""Classification metrics computed from held-out predictions: overall, per class, per fold."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from defectscope.data.summary import imbalance_line


def _summary(true: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray, classes: int) -> dict:
    recall = precision_recall_fscore_support(true, predicted, labels=list(range(classes)), zero_division=0)[1]
    defective = true > 0
    return {
        "accuracy": float((true == predicted).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(true, predicted)),
        "macro_f1": float(f1_score(true, predicted, labels=list(range(classes)), average="macro", zero_division=0)),
        "image_auroc": float(roc_auc_score(defective, 1 - probabilities[:, 0])) if 0 < defective.sum() < len(true) else None,
        "head_recall": float(recall[0]),
        "tail_recall": float(recall[1:].mean()),
    }


def classification_metrics(records: list[dict], classes: list[str]) -> dict:
    """Overall and per-class metrics, the confusion matrix, and each metric's mean and spread over folds.

    image AUROC ranks images by 1 - P(good); head recall is the recall of `good`, tail recall the
    mean recall of the defect classes.
    """
    true = np.array([r["true"] for r in records])
    predicted = np.array([r["predicted"] for r in records])
    probabilities = np.array([r["probabilities"] for r in records])
    folds = np.array([r["fold"] for r in records])
    k = len(classes)
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=list(range(k)), zero_division=0)
    per_fold = [_summary(true[folds == f], predicted[folds == f], probabilities[folds == f], k) for f in np.unique(folds)]
    spread = {}
    for key in per_fold[0]:
        values = [m[key] for m in per_fold if m[key] is not None]
        if values:
            spread[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return {
        **_summary(true, predicted, probabilities, k),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(classes)},
        "confusion": confusion_matrix(true, predicted, labels=list(range(k))).tolist(),
        "folds": spread,
    }


def classification_markdown(title: str, metrics: dict, classes: list[str], dataset: dict) -> str:
    """Per-class table, confusion matrix and fold spread, under the dataset's imbalance figures."""
    folds = metrics["folds"]
    lines = [f"# {title}", "", imbalance_line(dataset), "",
             "| metric | pooled | fold mean ± std |", "|---|---|---|"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "image_auroc", "head_recall", "tail_recall"):
        value, spread = metrics.get(key), folds.get(key)
        pooled = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| {key} | {pooled} | {spread['mean']:.3f} ± {spread['std']:.3f} |" if spread else f"| {key} | {pooled} | n/a |")
    lines += ["", "| class | precision | recall | F1 | images |", "|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
              "| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(classes, metrics["confusion"])]
    return "\n".join(lines) + "\n"
