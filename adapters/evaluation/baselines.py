"""Baselines an adapted model is judged against, shared by a training run (adapters.training.baselines)
and the compare suite (adapters.benchmarking): the TF-IDF + logistic-regression classifier, and the
negative-transfer rule.

Negative transfer (Rosenstein et al. 2005; Wang et al. 2019, "Characterizing and Avoiding Negative
Transfer"): starting from the pretrained model does worse than not using it. A model built on the
pretrained backbone shows it when its headline test metric is below a reference that never saw the
pretrained weights: the same architecture trained from scratch ("scratch"), or a classic model on
the same rows ("classic").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from adapters.evaluation.metrics import classification_metrics

#: Baselines that never saw the pretrained weights: scoring below one of them is negative transfer.
REFERENCE_BASELINES = ("scratch", "classic")
#: How reports name them.
REFERENCE_NAMES = {"scratch": "from scratch", "classic": "TF-IDF + logreg"}


def negative_transfer(value: float | None, references: dict[str, float | None]) -> list[str]:
    """The reference baselines (REFERENCE_BASELINES) whose metric `value` falls strictly below.

    value: the headline metric (higher is better) of a model built on the pretrained backbone;
    references: {baseline name: its metric}; other names and missing values are ignored.
    Returns the names, in the order given; empty when `value` is None.
    """
    if value is None:
        return []
    return [name for name, ref in references.items() if name in REFERENCE_BASELINES and ref is not None and value < ref]


@dataclass
class ClassicResult:
    """A fitted TF-IDF + logistic-regression baseline: test metrics, its parameter count, fit seconds."""

    metrics: dict[str, float]
    params: int
    fit_seconds: float


def tfidf_logistic_regression(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    test_texts: Sequence[str],
    test_labels: Sequence[str],
    labels: Sequence[str],
    seed: int,
    ngram_max: int = 2,
    max_features: int | None = 50_000,
    C: float = 10.0,
) -> ClassicResult:
    """TF-IDF word n-grams (1..ngram_max, sublinear tf, at most max_features) + logistic regression
    (scikit-learn, inverse regularisation C, `seed` for its solver), fitted on the training rows and
    scored on the test rows with classification_metrics over `labels` (the class names in id order).

    Raises ValueError (scikit-learn's) for fewer than two training classes or no test rows.
    """
    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, ngram_max), max_features=max_features, sublinear_tf=True)
    features = vectorizer.fit_transform([str(t) for t in train_texts])
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit(features, [str(label) for label in train_labels])
    fit_seconds = time.perf_counter() - started
    preds = clf.predict(vectorizer.transform([str(t) for t in test_texts]))
    metrics = classification_metrics([str(p) for p in preds], [str(r) for r in test_labels], list(labels))
    return ClassicResult(metrics, int(clf.coef_.size + clf.intercept_.size), fit_seconds)
