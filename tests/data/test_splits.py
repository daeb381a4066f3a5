"""Split kinds: random, stratified, group, time, predefined; k-fold and its aggregation."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset

from adapters.config import SplitConfig
from adapters.data.splits import aggregate_folds, format_folds, kfold_splits, split_dataset
from adapters.errors import ConfigError


def make_ds(n: int = 200, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    # Imbalanced labels: 70% a, 20% b, 10% c.
    labels = rng.choice(["a", "b", "c"], size=n, p=[0.7, 0.2, 0.1]).tolist()
    return Dataset.from_dict(
        {
            "text": [f"row {i}" for i in range(n)],
            "label": labels,
            "customer": [f"cust{i % 23}" for i in range(n)],
            # Timestamps shuffled relative to row order, with ties (2 rows per day).
            "day": rng.permutation([i // 2 for i in range(n)]).tolist(),
        }
    )


def texts(split) -> set[str]:
    return set(split["text"])


def test_random_split_sizes_partition_and_seed():
    ds = make_ds()
    out = split_dataset(ds, SplitConfig(kind="random", validation=0.1, test=0.2), "label", seed=1)
    assert [len(out[s]) for s in ("train", "validation", "test")] == [140, 20, 40]
    assert texts(out["train"]) | texts(out["validation"]) | texts(out["test"]) == texts(ds)
    assert not texts(out["train"]) & texts(out["validation"])
    again = split_dataset(ds, SplitConfig(kind="random", validation=0.1, test=0.2), "label", seed=1)
    other = split_dataset(ds, SplitConfig(kind="random", validation=0.1, test=0.2), "label", seed=2)
    assert again["validation"]["text"] == out["validation"]["text"]
    assert other["validation"]["text"] != out["validation"]["text"]


def test_no_test_split_gives_empty_test():
    out = split_dataset(make_ds(), SplitConfig(kind="random", validation=0.25, test=0.0), "label", seed=0)
    assert len(out["test"]) == 0 and len(out["validation"]) == 50 and len(out["train"]) == 150
    assert out["test"].column_names == out["train"].column_names


def test_stratified_keeps_class_proportions():
    ds = make_ds(1000)
    out = split_dataset(ds, SplitConfig(kind="stratified", validation=0.1, test=0.2), "label", seed=3)
    full = Counter(ds["label"])
    for name in ("train", "validation", "test"):
        part = Counter(out[name]["label"])
        for label, count in full.items():
            expected = count / len(ds)
            assert abs(part[label] / len(out[name]) - expected) < 0.011, (name, label)


def test_stratified_falls_back_to_random_with_a_warning(caplog):
    ds = Dataset.from_dict({"text": [str(i) for i in range(50)], "label": ["a"] * 49 + ["lonely"]})
    with caplog.at_level(logging.WARNING, logger="adapters.data.splits"):
        out = split_dataset(ds, SplitConfig(kind="stratified", validation=0.2, test=0.2), "label", seed=0)
    assert "fewer than 2 rows" in caplog.text and "random" in caplog.text
    assert sum(len(out[s]) for s in ("train", "validation", "test")) == 50


def test_group_split_never_shares_a_group():
    ds = make_ds(500)
    out = split_dataset(
        ds, SplitConfig(kind="group", group_column="customer", validation=0.15, test=0.2), "label", seed=0
    )
    groups = {name: set(out[name]["customer"]) for name in ("train", "validation", "test")}
    assert not groups["train"] & groups["validation"]
    assert not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    assert sum(len(out[s]) for s in groups) == 500
    assert all(len(out[s]) > 0 for s in groups)


def test_time_split_never_puts_a_future_row_in_training():
    ds = make_ds(301)
    out = split_dataset(ds, SplitConfig(kind="time", time_column="day", validation=0.1, test=0.2), "label", seed=0)
    train, val, test = (out[s]["day"] for s in ("train", "validation", "test"))
    assert max(train) < min(val) and max(val) < min(test)  # strictly: tied days never straddle
    assert len(train) + len(val) + len(test) == 301
    assert abs(len(test) - 60) <= 1 and abs(len(val) - 30) <= 2


def test_time_split_parses_date_strings():
    days = ["2024-03-01", "2023-12-31T23:00:00", "2024-01-15", "2024-02-01 08:00", "2024-01-01"] * 4
    ds = Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": ["x"] * 20, "when": days})
    out = split_dataset(ds, SplitConfig(kind="time", time_column="when", validation=0.2, test=0.2), "label", seed=0)
    assert set(out["test"]["when"]) == {"2024-03-01"}
    assert set(out["validation"]["when"]) == {"2024-02-01 08:00"}
    assert "2024-03-01" not in out["train"]["when"]


def test_time_split_rejects_non_timestamps():
    ds = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0] * 4, "when": ["soon", "later", "x", "y"]})
    with pytest.raises(ConfigError, match="time_column"):
        split_dataset(ds, SplitConfig(kind="time", time_column="when", validation=0.25, test=0.25), "label", seed=0)


def test_predefined_split_uses_the_split_column():
    ds = Dataset.from_dict(
        {
            "text": list("abcdefg"),
            "label": [0] * 7,
            "split": ["train", "train", "dev", "test", "train", "validation", "TEST"],
        }
    )
    out = split_dataset(ds, SplitConfig(kind="predefined"), "label", seed=0)
    assert out["train"]["text"] == ["a", "b", "e"]
    assert out["validation"]["text"] == ["c", "f"]
    assert out["test"]["text"] == ["d", "g"]
    assert "split" not in out["train"].column_names


def test_predefined_rejects_unknown_split_values():
    ds = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1], "split": ["train", "holdout"]})
    with pytest.raises(ConfigError, match="holdout.*valid values"):
        split_dataset(ds, SplitConfig(kind="predefined"), "label", seed=0)


@pytest.mark.parametrize(
    "cfg, label_field, needle",
    [
        (SplitConfig(kind="group", group_column="user"), "label", "data.split.group_column"),
        (SplitConfig(kind="group"), "label", "data.split.group_column is required"),
        (SplitConfig(kind="time", time_column="created"), "label", "data.split.time_column"),
        (SplitConfig(kind="stratified"), "category", "data.label_field"),
        (SplitConfig(kind="predefined"), "label", "'split'"),
    ],
)
def test_missing_columns_name_the_field_and_list_columns(cfg, label_field, needle):
    with pytest.raises(ConfigError) as err:
        split_dataset(make_ds(20), cfg, label_field, seed=0)
    assert needle in str(err.value)
    assert "available columns: text, label, customer" in str(err.value)


def test_fractions_that_leave_no_training_data_are_refused():
    with pytest.raises(ConfigError, match="no training rows"):
        split_dataset(make_ds(3), SplitConfig(kind="random", validation=0.5, test=0.4), "label", seed=0)


def test_kfold_is_stratified_and_covers_every_row_once():
    ds = make_ds(300)
    folds = kfold_splits(ds, 5, "label", seed=0)
    assert len(folds) == 5
    seen = Counter()
    full = Counter(ds["label"])
    for train, val in folds:
        assert not texts(train) & texts(val)
        assert len(train) + len(val) == 300
        seen.update(val["text"])
        for label, count in full.items():
            assert abs(Counter(val["label"])[label] - count / 5) <= 1
    assert set(seen) == texts(ds) and set(seen.values()) == {1}


def test_kfold_validates_k():
    with pytest.raises(ConfigError, match="folds"):
        kfold_splits(make_ds(10), 1, "label", seed=0)
    with pytest.raises(ConfigError, match="folds"):
        kfold_splits(make_ds(3), 5, "label", seed=0)


def test_aggregate_folds_mean_and_std():
    folds = [
        {"accuracy": 0.8, "f1_macro": 0.5, "run_dir": "/x", "epoch": 2},
        {"accuracy": 0.9, "f1_macro": 0.7, "run_dir": "/y", "epoch": 3},
        {"accuracy": 0.7, "f1_macro": 0.6, "run_dir": "/z"},
    ]
    agg = aggregate_folds(folds)
    assert set(agg) == {"accuracy", "f1_macro"}  # strings and partial metrics are skipped
    assert agg["accuracy"]["mean"] == pytest.approx(0.8)
    assert agg["accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert agg["f1_macro"]["values"] == [0.5, 0.7, 0.6]
    assert "accuracy: 0.8000 ± 0.1000 (3 folds)" in format_folds(agg)
    assert aggregate_folds([{"loss": 1.5}])["loss"] == {"mean": 1.5, "std": 0.0, "values": [1.5]}
