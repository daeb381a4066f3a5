"""Metrics agree with sklearn; confusion matrix files; generation metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from adapters.evaluation.metrics import (
    classification_metrics,
    confusion_matrix,
    exact_match,
    get_metric,
    per_class_report,
    perplexity_from_loss,
    save_confusion_matrix,
)

LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


@pytest.fixture(scope="module")
def random_preds():
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 6, 500)
    # 60% right, the rest random: imperfect and class-dependent.
    preds = np.where(rng.random(500) < 0.6, refs, rng.integers(0, 6, 500))
    return preds.tolist(), refs.tolist()


def test_classification_metrics_match_sklearn(random_preds):
    preds, refs = random_preds
    got = classification_metrics(preds, refs, LABELS)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(refs, preds))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(refs, preds, average="macro"))
    assert got["f1_micro"] == pytest.approx(skm.f1_score(refs, preds, average="micro"))
    assert got["precision_macro"] == pytest.approx(skm.precision_score(refs, preds, average="macro"))
    assert got["recall_macro"] == pytest.approx(skm.recall_score(refs, preds, average="macro"))
    assert got["mcc"] == pytest.approx(skm.matthews_corrcoef(refs, preds))
    assert 0.5 < got["accuracy"] < 0.8


def test_label_names_and_numpy_ids_give_the_same_scores(random_preds):
    preds, refs = random_preds
    by_name = classification_metrics([LABELS[p] for p in preds], [LABELS[r] for r in refs], LABELS)
    by_numpy = classification_metrics(np.array(preds), np.array(refs), LABELS)
    assert by_name == pytest.approx(classification_metrics(preds, refs, LABELS))
    assert by_numpy == pytest.approx(by_name)


def test_answers_outside_the_labels_count_as_errors():
    refs = ["LOC", "HUM", "NUM", "LOC"]
    preds = ["LOC", "maybe a person", "NUM", "LOC"]
    got = classification_metrics(preds, refs, LABELS)
    assert got["accuracy"] == 0.75
    report = per_class_report(preds, refs, LABELS)
    assert report["HUM"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["LOC"]["recall"] == 1.0 and report["unknown_predictions"] == 1


def test_per_class_report_matches_sklearn(random_preds):
    preds, refs = random_preds
    report = per_class_report(preds, refs, LABELS)
    expected = skm.classification_report(refs, preds, labels=list(range(6)), target_names=LABELS, output_dict=True)
    for label in LABELS:
        for key, sk_key in (
            ("precision", "precision"),
            ("recall", "recall"),
            ("f1", "f1-score"),
            ("support", "support"),
        ):
            assert report[label][key] == pytest.approx(expected[label][sk_key]), (label, key)


def test_references_must_be_labels():
    with pytest.raises(ValueError, match="not among the labels"):
        classification_metrics(["LOC"], ["PLANET"], LABELS)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        classification_metrics([0, 1], [0], LABELS)


def test_confusion_matrix_files(tmp_path, random_preds):
    preds, refs = random_preds
    preds = preds[:-1] + ["gibberish"]
    paths = save_confusion_matrix(preds, refs, LABELS, tmp_path / "run")
    data = json.loads(paths["json"].read_text())
    ids = [p if isinstance(p, int) else -1 for p in preds]
    expected = skm.confusion_matrix(refs, ids, labels=list(range(6)) + [-1])[:-1]
    assert data["matrix"] == expected.tolist()
    assert data["columns"] == LABELS + ["(other)"] and data["labels"] == LABELS
    assert sum(map(sum, data["matrix"])) == 500 == data["num_rows"]
    assert data["per_class"]["unknown_predictions"] == 1
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp files left


def test_confusion_matrix_without_unknowns_is_square():
    cm = confusion_matrix([0, 1, 1], [0, 1, 0], ["a", "b"])
    assert cm == {"labels": ["a", "b"], "columns": ["a", "b"], "matrix": [[1, 1], [0, 1]]}


@pytest.mark.parametrize(
    "pred, ref, hit",
    [
        ("Location.", "location", True),
        ("  LOCATION  ", "location", True),
        ("new   york!", "New York", True),
        ("location of", "location", False),
        ("", "location", False),
    ],
)
def test_exact_match_normalizes(pred, ref, hit):
    assert exact_match([pred], [ref]) == (1.0 if hit else 0.0)


def test_exact_match_fraction_and_perplexity():
    assert exact_match(["a", "b", "c", "d"], ["a", "b", "x", "y"]) == 0.5
    assert exact_match([], []) == 0.0
    assert perplexity_from_loss(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity_from_loss(0.0) == 1.0
    assert perplexity_from_loss(1e6) == float("inf")


def test_unknown_metric_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: accuracy, confusion_matrix, exact_match, f1"):
        get_metric("bleu")
