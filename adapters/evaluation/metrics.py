"""Metrics: classification scores from scikit-learn, the confusion matrix as JSON and PNG, exact
match of generated answers, perplexity.

Classification: accuracy, F1 macro/micro, precision/recall macro, Matthews correlation (MCC); a
per-class report; the confusion matrix saved as JSON and PNG. Generation: exact match (normalized),
perplexity. ``METRICS`` maps each metric's name to the function that computes it.

Predictions and references may be class ids or label names; a prediction outside the label
set (a causal LM answering "maybe") becomes id -1, which only ever counts as an error.
"""

from __future__ import annotations

import json
import math
import numbers
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn import metrics as skm

from adapters.paths import atomic_path

OTHER = "(other)"  # confusion-matrix column for predictions outside the label set
_TRAILING = string.punctuation + " \t\n"


# ---------------------------------------------------------------- the metric table
def _averaged(score: Callable[..., Any]) -> Callable[..., float | list[float]]:
    """A scikit-learn precision/recall/F1 score as (predictions, references, labels, average) -> score.

    Ids outside ``labels`` (e.g. -1) only count as errors; a class never predicted scores 0, silently.
    average None gives one score per label, in ``labels`` order.
    """

    def compute(
        predictions: Sequence[int],
        references: Sequence[int],
        labels: Sequence[int] | None = None,
        average: str | None = "macro",
    ) -> float | list[float]:
        value = score(references, predictions, labels=labels, average=average, zero_division=0.0)
        return value.tolist() if average is None else float(value)

    return compute


def _accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    return float(skm.accuracy_score(references, predictions))


def _matthews_correlation(predictions: Sequence[int], references: Sequence[int]) -> float:
    return float(skm.matthews_corrcoef(references, predictions))


def _confusion_matrix(
    predictions: Sequence[int], references: Sequence[int], labels: Sequence[int] | None = None
) -> list[list[int]]:
    return skm.confusion_matrix(references, predictions, labels=labels).tolist()


def normalize_answer(text: str) -> str:
    """strip, lowercase, whitespace collapsed, trailing punctuation dropped (as exact_match compares)."""
    return " ".join(str(text).strip().lower().split()).rstrip(_TRAILING).strip()


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction in [0, 1] of generated answers equal to the reference after normalize_answer; 0.0 when empty.

    Raises ValueError when preds and refs differ in length.
    """
    preds, refs = [str(p) for p in preds], [str(r) for r in refs]
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)) / len(refs)


# name -> f(predictions, references, **options); class ids for the classification metrics.
METRICS: dict[str, Callable[..., Any]] = {
    "accuracy": _accuracy,
    "f1": _averaged(skm.f1_score),
    "precision": _averaged(skm.precision_score),
    "recall": _averaged(skm.recall_score),
    "matthews_correlation": _matthews_correlation,
    "confusion_matrix": _confusion_matrix,
    "exact_match": exact_match,
}


def get_metric(name: str) -> Callable[..., Any]:
    """The function METRICS holds under name; ValueError naming the available ones if there is none."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(sorted(METRICS))}")
    return METRICS[name]


# ---------------------------------------------------------------- classification
def _to_ids(values: Sequence[Any], labels: Sequence[str]) -> list[int]:
    index = {str(label): i for i, label in enumerate(labels)}
    ids = []
    for v in values:
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):  # a class id (numpy ints too)
            i = int(v)
            ids.append(i if 0 <= i < len(labels) else -1)
        else:
            ids.append(index.get(str(v), -1))
    return ids


def _prepare(preds, refs, labels):
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        raise ValueError("no predictions to score")
    if labels is None:
        labels = sorted({str(v) for v in refs} | {str(v) for v in preds})
    labels = [str(label) for label in labels]
    pred_ids, ref_ids = _to_ids(preds, labels), _to_ids(refs, labels)
    if -1 in ref_ids:
        unknown = sorted({str(r) for r, i in zip(refs, ref_ids) if i == -1})[:5]
        raise ValueError(f"references {unknown} are not among the labels {labels}")
    return pred_ids, ref_ids, labels


def classification_metrics(preds: Sequence, refs: Sequence, labels: Sequence[str] | None = None) -> dict[str, float]:
    """accuracy, f1_macro, f1_micro, precision_macro, recall_macro, mcc (averages over `labels`).

    preds, refs: [rows] class ids or label names; labels: the class names in id order (default:
    every value seen, sorted). Raises ValueError for unequal lengths, no rows, or a reference
    outside labels.
    """
    pred_ids, ref_ids, labels = _prepare(preds, refs, labels)
    ids = list(range(len(labels)))
    return {
        "accuracy": METRICS["accuracy"](pred_ids, ref_ids),
        "f1_macro": METRICS["f1"](pred_ids, ref_ids, labels=ids, average="macro"),
        "f1_micro": METRICS["f1"](pred_ids, ref_ids, labels=ids, average="micro"),
        "precision_macro": METRICS["precision"](pred_ids, ref_ids, labels=ids, average="macro"),
        "recall_macro": METRICS["recall"](pred_ids, ref_ids, labels=ids, average="macro"),
        "mcc": METRICS["matthews_correlation"](pred_ids, ref_ids),
    }


def per_class_report(preds: Sequence, refs: Sequence, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """{label: {precision, recall, f1, support}} plus "unknown_predictions" (answers outside the labels).

    Arguments and errors as classification_metrics; support is the label's count among refs.
    """
    pred_ids, ref_ids, labels = _prepare(preds, refs, labels)
    args = {"labels": list(range(len(labels))), "average": None}
    precision = METRICS["precision"](pred_ids, ref_ids, **args)
    recall = METRICS["recall"](pred_ids, ref_ids, **args)
    f1 = METRICS["f1"](pred_ids, ref_ids, **args)
    report: dict[str, Any] = {
        label: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": ref_ids.count(i)}
        for i, label in enumerate(labels)
    }
    report["unknown_predictions"] = pred_ids.count(-1)
    return report


def confusion_matrix(preds: Sequence, refs: Sequence, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """{"labels", "columns", "matrix"}: matrix[i][j] = rows of true labels[i] predicted as columns[j];
    an extra "(other)" column appears when some predictions are outside the labels.

    Arguments and errors as classification_metrics.
    """
    pred_ids, ref_ids, labels = _prepare(preds, refs, labels)
    ids = list(range(len(labels)))
    other = -1 in pred_ids
    matrix = METRICS["confusion_matrix"](pred_ids, ref_ids, labels=ids + ([-1] if other else []))
    if other:
        matrix = matrix[:-1]  # the (other) row: no reference is ever outside the labels
    return {"labels": labels, "columns": labels + ([OTHER] if other else []), "matrix": matrix}


def save_confusion_matrix(
    preds: Sequence, refs: Sequence, labels: Sequence[str] | None, out_dir: str | Path
) -> dict[str, Path]:
    """Write confusion_matrix.json (matrix + per-class report) and confusion_matrix.png to out_dir.

    Returns {"json": path, "png": path}; each file is written atomically. Errors as classification_metrics.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cm = confusion_matrix(preds, refs, labels)
    payload = {**cm, "per_class": per_class_report(preds, refs, cm["labels"]), "num_rows": len(list(refs))}
    json_path, png_path = out_dir / "confusion_matrix.json", out_dir / "confusion_matrix.png"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    figure = _plot_confusion_matrix(cm)
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return {"json": json_path, "png": png_path}


def _plot_confusion_matrix(cm: dict[str, Any]) -> Figure:
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    matrix = np.asarray(cm["matrix"], dtype=float)  # [true labels, predicted columns]
    rows, cols = cm["labels"], cm["columns"]
    size = max(4.0, 0.45 * len(cols) + 2.5)
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # Colour by row share, so rare classes are as readable as frequent ones.
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(cols) <= 20:
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(
                    j,
                    i,
                    f"{int(matrix[i, j])}",
                    ha="center",
                    va="center",
                    color="white" if shares[i, j] > 0.5 else "black",
                    fontsize=8,
                )
    ax.set_title(f"confusion matrix ({int(matrix.sum())} rows)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- generation
def perplexity_from_loss(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf instead of an OverflowError for diverged runs, nan for no loss."""
    if mean_loss is None or (isinstance(mean_loss, float) and math.isnan(mean_loss)):
        return float("nan")
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return float("inf")
