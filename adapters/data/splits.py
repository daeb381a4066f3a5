"""Carving train / validation / test out of one data set, and k-fold cross-validation.

Kinds (``data.split.kind``): ``random``; ``stratified`` by the label (keeps class
proportions; falls back to random with a warning when a class is too rare to stratify);
``group`` (no value of ``group_column`` lands in two splits, e.g. one customer's messages
stay together); ``time`` (sorted by ``time_column``: train on the oldest rows, validate
on the next ones, test on the newest; no training row is later than any held-out row);
``predefined`` (a ``split`` column already says train / validation / test).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from adapters.config import SplitConfig
from adapters.errors import ConfigError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
PREDEFINED_COLUMN = "split"
# Spellings of the held-out split names that data sets in the wild use.
_PREDEFINED_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


def column_values(ds: Dataset, column: str) -> list:
    """A column as a Python list. `ds[column]` is a lazy Column in datasets >= 4 whose
    row-by-row iteration is ~10x slower than slicing it whole."""
    return list(ds[column][:]) if len(ds) else []


def _require_column(ds: Dataset, column: str | None, field: str, kind: str) -> str:
    if not column:
        raise ConfigError(
            f"{field} is required when data.split.kind is {kind!r}; available columns: {', '.join(ds.column_names)}"
        )
    if column not in ds.column_names:
        raise ConfigError(
            f"{field}: column {column!r} (needed by data.split.kind={kind!r}) is not in the data; "
            f"available columns: {', '.join(ds.column_names)}"
        )
    return column


def _sizes(n: int, validation: float, test: float) -> tuple[int, int]:
    """Rows for validation and test: at least one each when asked for and the data allows it."""
    n_test = int(round(n * test)) if test > 0 else 0
    n_val = int(round(n * validation))
    if test > 0 and n >= 3:
        n_test = max(n_test, 1)
    if n >= 2:
        n_val = max(n_val, 1)
    if n_val + n_test >= n:
        raise ConfigError(
            f"data.split: validation={validation} and test={test} leave no training rows out of {n}; "
            "lower the fractions or add data"
        )
    return n_val, n_test


def _assemble(ds: Dataset, train: Sequence[int], val: Sequence[int], test: Sequence[int]) -> DatasetDict:
    return DatasetDict(
        train=ds.select(list(train)),
        validation=ds.select(list(val)),
        test=ds.select(list(test)),
    )


def _random(n: int, n_val: int, n_test: int, seed: int):
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def _stratified(labels: list, n_val: int, n_test: int, seed: int):
    """scikit-learn's stratified train_test_split, twice: test off the whole, then validation off the rest."""
    idx = np.arange(len(labels))
    y = np.array([str(v) for v in labels])
    if n_test:
        rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    else:
        rest, test = idx, idx[:0]
    train, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=seed)
    return train, val, test


def _group(groups: list, n: int, n_val: int, n_test: int, seed: int):
    """Whole groups go to test, then validation, until each reaches its share of rows."""
    keys = [repr(g) for g in groups]  # repr: None, ints and strings are all hashable keys
    by_group: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_group.setdefault(key, []).append(i)
    names = sorted(by_group)
    if len(names) < (3 if n_test else 2):
        raise ConfigError(
            f"data.split.group_column: only {len(names)} distinct group(s); a group split needs at least "
            f"{3 if n_test else 2} (one per split)"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    train, val, test = [], [], []
    for pos in order:
        rows = by_group[names[pos]]
        if n_test and len(test) < n_test:
            test += rows
        elif len(val) < n_val:
            val += rows
        else:
            train += rows
    if not train:  # a few huge groups swallowed everything
        raise ConfigError(
            "data.split: the group split left no training rows (a few groups hold most rows); "
            "lower data.split.validation/test or use a column with more groups"
        )
    return sorted(train), sorted(val), sorted(test)


def _time_keys(values: list, column: str) -> np.ndarray:
    """Comparable sort keys for timestamps given as numbers, datetimes or date strings."""
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=float)
    try:
        stamps = pd.to_datetime(pd.Series(values), utc=True, format="mixed")
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"data.split.time_column: column {column!r} holds values that are not timestamps ({err})"
        ) from None
    if stamps.isna().any():
        bad = int(stamps.isna().sum())
        raise ConfigError(f"data.split.time_column: {bad} row(s) of column {column!r} have no timestamp")
    return stamps.astype("int64").to_numpy()


def _time(keys: np.ndarray, n_val: int, n_test: int):
    """Oldest rows train, newest test. Rows sharing a timestamp never straddle a boundary:
    they go to the later split, so every training row is strictly older than every held-out row."""
    order = np.argsort(keys, kind="stable")
    n = len(order)
    sorted_keys = keys[order]

    def back_off(cut: int) -> int:
        while 0 < cut < n and sorted_keys[cut - 1] == sorted_keys[cut]:
            cut -= 1
        return cut

    test_start = back_off(n - n_test) if n_test else n
    val_start = back_off(test_start - n_val)
    if val_start == 0:
        raise ConfigError(
            "data.split: the time split left no training rows (too many rows share the oldest timestamps)"
        )
    return order[:val_start], order[val_start:test_start], order[test_start:]


def _predefined(ds: Dataset) -> tuple[list[int], list[int], list[int]]:
    _require_column(ds, PREDEFINED_COLUMN, "data.split.kind", "predefined")
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    unknown = set()
    for i, value in enumerate(column_values(ds, PREDEFINED_COLUMN)):
        name = _PREDEFINED_ALIASES.get(str(value).strip().lower())
        if name is None:
            unknown.add(value)
        else:
            parts[name].append(i)
    if unknown:
        raise ConfigError(
            f"data.split.kind='predefined': column {PREDEFINED_COLUMN!r} has values {sorted(map(str, unknown))}; "
            f"valid values: {', '.join(sorted(_PREDEFINED_ALIASES))}"
        )
    if not parts["train"] or not parts["validation"]:
        raise ConfigError(
            f"data.split.kind='predefined': column {PREDEFINED_COLUMN!r} needs both train and validation rows "
            f"(got {len(parts['train'])} train, {len(parts['validation'])} validation)"
        )
    return parts["train"], parts["validation"], parts["test"]


def _can_stratify(labels: list, n_val: int, n_test: int) -> str | None:
    """Why stratification is impossible here, or None when it works."""
    values, counts = np.unique(np.array([str(v) for v in labels]), return_counts=True)
    rare = [str(v) for v, c in zip(values, counts) if c < 2]
    if rare:
        return f"{len(rare)} class(es) have fewer than 2 rows ({', '.join(rare[:5])}{'...' if len(rare) > 5 else ''})"
    for what, size in (("validation", n_val), ("test", n_test)):
        if size and size < len(values):
            return f"the {what} split ({size} rows) is smaller than the number of classes ({len(values)})"
    return None


def split_dataset(ds: Dataset, split_cfg: SplitConfig, label_field: str | None, seed: int) -> DatasetDict:
    """Split `ds` into a DatasetDict with train, validation and test (test empty when split_cfg.test == 0).

    The kinds are described in the module docstring. Raises ConfigError for a missing column, fractions
    that leave no training rows, or a group/time split that cannot keep its promise.
    """
    kind = split_cfg.kind
    if kind == "predefined":
        train, val, test = _predefined(ds)
        out = _assemble(ds, train, val, test).remove_columns(PREDEFINED_COLUMN)
        _log_sizes(kind, out)
        return out

    n = len(ds)
    n_val, n_test = _sizes(n, split_cfg.validation, split_cfg.test)
    if kind == "random":
        train, val, test = _random(n, n_val, n_test, seed)
    elif kind == "stratified":
        column = _require_column(ds, label_field, "data.label_field", kind)
        labels = column_values(ds, column)
        reason = _can_stratify(labels, n_val, n_test)
        if reason is None:
            train, val, test = _stratified(labels, n_val, n_test, seed)
        else:
            log.warning("stratified split impossible: %s; falling back to a random split", reason)
            train, val, test = _random(n, n_val, n_test, seed)
    elif kind == "group":
        column = _require_column(ds, split_cfg.group_column, "data.split.group_column", kind)
        train, val, test = _group(column_values(ds, column), n, n_val, n_test, seed)
    elif kind == "time":
        column = _require_column(ds, split_cfg.time_column, "data.split.time_column", kind)
        train, val, test = _time(_time_keys(column_values(ds, column), column), n_val, n_test)
    else:  # pragma: no cover - SplitConfig validates the kind
        raise ConfigError(f"data.split.kind: unknown {kind!r}; valid: random, stratified, group, time, predefined")
    out = _assemble(ds, train, val, test)
    _log_sizes(kind, out)
    return out


def _log_sizes(kind: str, splits: DatasetDict) -> None:
    log.info("%s split: %s", kind, ", ".join(f"{name}={len(splits[name])}" for name in SPLIT_NAMES))


# ---------------------------------------------------------------- cross-validation
def kfold_splits(ds: Dataset, k: int, label_field: str | None, seed: int) -> list[tuple[Dataset, Dataset]]:
    """k (train, validation) pairs; every row is validated exactly once. Stratified by label
    when every class has at least k rows, plain shuffled k-fold otherwise (with a warning).
    Raises ConfigError for k < 2 or k above the number of rows."""
    if not isinstance(k, int) or k < 2:
        raise ConfigError(f"data.split.folds must be an integer >= 2 (got {k!r})")
    if k > len(ds):
        raise ConfigError(f"data.split.folds={k} is more than the {len(ds)} rows available")
    idx = np.arange(len(ds))
    splitter: Any = KFold(n_splits=k, shuffle=True, random_state=seed)
    y = None
    if label_field is not None:
        _require_column(ds, label_field, "data.label_field", "stratified k-fold")
        y = np.array([str(v) for v in column_values(ds, label_field)])
        _, counts = np.unique(y, return_counts=True)
        if counts.min() >= k:
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        else:
            log.warning(
                "stratified %d-fold impossible: a class has only %d row(s); using plain k-fold", k, counts.min()
            )
    return [(ds.select(tr.tolist()), ds.select(va.tolist())) for tr, va in splitter.split(idx, y)]


def aggregate_folds(fold_metrics: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{metric: {mean, std, values}} over folds, for every numeric metric that all folds report.

    std is the sample standard deviation (ddof=1): the folds are a sample of possible splits.
    """
    if not fold_metrics:
        raise ValueError("aggregate_folds needs the metrics of at least one fold")

    def numeric(v: Any) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    common = [
        key
        for key, v in fold_metrics[0].items()
        if numeric(v) and all(key in m and numeric(m[key]) for m in fold_metrics)
    ]
    dropped = {key for m in fold_metrics for key in m} - set(common)
    if dropped:
        log.debug("aggregate_folds: skipping non-numeric or partial metrics %s", sorted(dropped))
    out: dict[str, dict[str, Any]] = {}
    for key in common:
        values = [float(m[key]) for m in fold_metrics]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        mean = float(np.mean(values))
        out[key] = {"mean": mean, "std": std if math.isfinite(std) else float("nan"), "values": values}
    return out


def format_folds(aggregate: dict[str, dict[str, Any]]) -> str:
    """One line per metric: `accuracy: 0.8123 ± 0.0150 (5 folds)`."""
    return "\n".join(
        f"{key}: {v['mean']:.4f} ± {v['std']:.4f} ({len(v['values'])} folds)" for key, v in aggregate.items()
    )
