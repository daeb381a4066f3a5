"""Retraining after drift: next adapter version from the current one, promoted only if not worse.

``retrain(current_ref, labeled_file, out_dir)``:

1. resolves the current adapter in the store (e.g. ``clf@prod``) and its training config
   (``manifest["training"]``);
2. splits the labeled window (jsonl/csv/json/parquet with the parent's text and label
   columns) into training rows and a stratified holdout, optionally mixing in ``replay`` rows
   of the parent's own training split (keeps every class present, limits forgetting);
3. trains the next version with ``adapters.training.loop.train`` from the parent's config with
   ``init_from: <name>@<version>`` (so the manifest and the store record the parent) and
   publishes it to the same store;
4. evaluates parent and candidate on the same holdout through the serving engine (one base,
   both adapters, mixed batches): accuracy / macro-F1 for classifiers, exact match of
   greedy answers for causal LMs;
5. moves the ``prod`` tag to the candidate only if its metric >= parent's - margin.

It writes ``retrain_report.json`` / ``.md`` into out_dir. Exit codes of scripts/retrain.py:
0 promoted (or evaluated with promote=False and not worse), 1 kept the current version,
2 could not run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from datasets import Dataset

from adapters.config import DataConfig, ModelConfig, SplitConfig, apply_overrides, load_config
from adapters.data.loading import label_words as configured_label_words
from adapters.data.loading import load_rows, prepare_splits
from adapters.data.splits import column_values, split_dataset
from adapters.errors import ConfigError
from adapters.evaluation.metrics import classification_metrics, exact_match
from adapters.modeling.generation import SamplingParams
from adapters.paths import validate_name
from adapters.serving.engine import ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.store.manifest import write_json_atomic
from adapters.store.store import AdapterStore, is_path_ref
from adapters.training.loop import train

log = logging.getLogger(__name__)

REPORT_FORMAT = "adapterkit.retrain-report/1"
DEFAULT_METRIC = {"sequence-classification": "accuracy", "causal-lm": "exact_match"}


@dataclass
class RetrainResult:
    """One retraining: parent and candidate (``name@version``), their holdout metrics, the decision
    (`not_worse`: candidate metric >= current - margin; `promoted`: the tag moved) and row counts."""

    current: str  # name@version the candidate was trained from (and compared with)
    candidate: str  # name@version of the new adapter
    metric: str
    current_metrics: dict[str, float]
    candidate_metrics: dict[str, float]
    margin: float
    not_worse: bool
    promoted: bool
    tag: str
    reason: str
    num_train: int
    num_holdout: int
    num_replay: int
    run_dir: str
    out_dir: str
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def exit_code(self) -> int:
        """scripts/retrain.py's exit status: 0 not worse (promoted unless promote=False), 1 worse."""
        return 0 if self.not_worse else 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (format adapterkit.retrain-report/1)."""
        return {"format": REPORT_FORMAT, **asdict(self)}


# ---------------------------------------------------------------- data
def load_labeled(path: str | os.PathLike, text_field: str, label_field: str):
    """The labeled window as a datasets.Dataset with `text` and `label` columns (deduplicated).

    Raises ConfigError if the file is missing, lacks either column, or has no usable row.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labeled data file {path} does not exist")
    rows = load_rows(DataConfig(name=str(path), text_field=text_field, label_field=label_field))
    for what, column in (("text", text_field), ("label", label_field)):
        if column not in rows.column_names:
            raise ConfigError(
                f"labeled data {path}: no {what} column {column!r} (the parent adapter was trained with it); "
                f"columns: {', '.join(rows.column_names)}"
            )
    seen: set[str] = set()
    texts, labels = [], []
    for text, label in zip(column_values(rows, text_field), column_values(rows, label_field)):
        if text is None or not str(text).strip() or label is None:
            continue
        key = _key(str(text))
        if key in seen:
            continue
        seen.add(key)
        texts.append(str(text))
        labels.append(str(label))
    if not texts:
        raise ConfigError(f"labeled data {path} has no rows with both {text_field!r} and {label_field!r}")
    return Dataset.from_dict({"text": texts, "label": labels})


def _write_jsonl(path: Path, texts: Iterable[str], labels: Iterable[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for text, label in zip(texts, labels):
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _replay_rows(parent_raw: dict, n: int, seed: int, exclude: set[str]) -> tuple[list[str], list[str]]:
    """n rows of the parent's own training split (the same split its training used), shuffled
    with `seed`, none whose text key is in `exclude`."""
    parent_cfg = load_config(raw=copy.deepcopy(parent_raw))
    train_split = prepare_splits(parent_cfg).splits["train"]
    data = parent_cfg.data
    target = data.response_field or data.label_field
    texts = [str(t) for t in column_values(train_split, data.text_field)]
    labels = [str(label) for label in column_values(train_split, target)]
    pairs = [(text, label) for text, label in zip(texts, labels) if _key(text) not in exclude]
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:n]
    return [text for text, _ in pairs], [label for _, label in pairs]


# ---------------------------------------------------------------- evaluation
def evaluate_on_holdout(
    engine,
    refs: list[str],
    texts: list[str],
    labels: list[str],
    task: str,
    label_words: dict[str, str] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """{ref: metrics} of each adapter on the same rows, through the serving engine.

    Classifiers: accuracy / macro-F1 of the predicted labels. Causal LMs: exact match of greedy
    answers (at most max_new_tokens) against each label's target words (label_words).
    """
    out: dict[str, dict[str, float]] = {}
    for ref in refs:
        preds: list[str] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            if task == "sequence-classification":
                preds += [r.label for r in engine.classify([ClassificationRequest(adapter=ref, text=t) for t in chunk])]
            else:
                params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
                requests = [GenerationRequest(adapter=ref, prompt=t, params=params) for t in chunk]
                preds += [r.text for r in engine.generate(requests)]
        if task == "sequence-classification":
            out[ref] = classification_metrics(preds, labels, sorted(set(labels) | set(preds)))
        else:
            words = label_words or {}
            out[ref] = {"exact_match": exact_match(preds, [words.get(label, label) for label in labels])}
    return out


# ---------------------------------------------------------------- the loop step
def retrain(
    current_ref: str,
    labeled: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    store_root: str | os.PathLike | None = None,
    holdout: float = 0.2,
    holdout_file: str | os.PathLike | None = None,
    metric: str | None = None,
    margin: float = 0.0,
    promote: bool = True,
    tag: str = "prod",
    replay: int = 0,
    overrides: Iterable[str] = (),
    seed: int = 0,
    command: list[str] | None = None,
) -> RetrainResult:
    """Train the next version of `current_ref` on a labeled window; promote it if not worse.

    labeled / holdout_file: jsonl/csv/json/parquet with the parent's text and label columns.
    holdout: fraction of `labeled` held out (stratified) for the comparison, unless holdout_file.
    metric: the deciding metric (default accuracy for classifiers, exact_match for causal LMs).
    margin: how much worse (in metric units) the candidate may be and still be promoted
    (0.0: at least as good; 0.01: one point of accuracy of slack).
    replay: rows of the parent's own training split mixed into the training rows.
    overrides: ``key.path=value`` changes to the parent's training config (e.g. train.epochs=2).
    Writes retrain_report.json/.md into out_dir. Raises ConfigError (or StoreError) for a
    request that cannot run, before any training.
    """
    _check_request(current_ref, holdout, margin, tag)
    store = AdapterStore(store_root)
    located = store.locate(current_ref)
    _, manifest = store.resolve(str(located))
    parent = str(located)
    parent_raw = manifest.get("training")
    if not isinstance(parent_raw, dict):
        raise ConfigError(f"{parent}: its manifest has no training config ('training'), so it cannot be retrained from")
    task = manifest.get("task") or parent_raw.get("task")
    metric = metric or DEFAULT_METRIC[task]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rows = _window_rows(parent_raw, labeled, holdout_file, holdout, replay, seed)
    if task == "sequence-classification":
        _check_classes(parent, list(manifest.get("labels") or []), rows.train_labels, rows.held_labels)
    if len(rows.held_texts) < 2:
        raise ConfigError(f"holdout has {len(rows.held_texts)} rows; give more labeled rows or a holdout_file")
    train_path = _write_jsonl(out / "data" / "train.jsonl", rows.train_texts, rows.train_labels)
    _write_jsonl(out / "data" / "holdout.jsonl", rows.held_texts, rows.held_labels)

    words = (manifest.get("prompt") or {}).get("label_names")
    if task == "causal-lm" and not words:
        words = configured_label_words(DataConfig.model_validate(parent_raw.get("data") or {})) or None
    raw = _candidate_config(parent_raw, task, words, train_path, parent, located.name, store, out)
    cfg = load_config(raw=apply_overrides(raw, list(overrides)))

    # ---- train the candidate (the hook: adapters.training.loop.train(cfg) -> TrainResult)
    result = train(cfg, command=command)
    candidate = result.adapter_ref
    if not candidate:
        raise ConfigError("training finished but published nothing (output.publish was overridden to false?)")

    # ---- compare on the holdout, through the serving engine
    engine = InferenceEngine(ModelConfig.model_validate(parent_raw["model"]), task=task, store=store, capacity=2)
    metrics = evaluate_on_holdout(
        engine,
        [parent, candidate],
        rows.held_texts,
        rows.held_labels,
        task,
        words or {},
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.train.eval_batch_size,
    )
    current_m, cand_m = metrics[parent], metrics[candidate]
    if metric not in cand_m:
        raise ConfigError(f"metric {metric!r} is not computed for {task}; choose from: {', '.join(cand_m)}")
    not_worse = cand_m[metric] >= current_m[metric] - margin
    reason = (
        f"{metric} {cand_m[metric]:.4f} (candidate {candidate}) vs {current_m[metric]:.4f} (current {parent}) "
        f"on {len(rows.held_texts)} holdout rows, margin {margin}"
    )
    promoted = not_worse and promote
    if promoted:
        store.tag(candidate, tag)
    reason = _decision(reason, not_worse, promote, parent, f"{located.name}@{tag}")
    log.info(reason)

    res = RetrainResult(
        current=parent,
        candidate=candidate,
        metric=metric,
        current_metrics=current_m,
        candidate_metrics=cand_m,
        margin=margin,
        not_worse=not_worse,
        promoted=promoted,
        tag=tag,
        reason=reason,
        num_train=len(rows.train_texts),
        num_holdout=len(rows.held_texts),
        num_replay=rows.num_replay,
        run_dir=str(result.run_dir),
        out_dir=str(out),
    )
    write_retrain_report(res, out)
    return res


def _check_request(current_ref: str, holdout: float, margin: float, tag: str) -> None:
    """Refuse a retraining request that cannot run, before anything is read or trained."""
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if margin < 0:
        raise ConfigError(f"margin must be >= 0 (how much worse the candidate may be), got {margin!r}")
    validate_name(tag, "tag")
    if is_path_ref(current_ref):
        raise ConfigError(
            f"current adapter {current_ref!r} is a folder; retraining needs a store reference (name@prod, name@3) "
            "so that the new version is published next to it and the tag can move"
        )


def _decision(reason: str, not_worse: bool, promote: bool, parent: str, tagged: str) -> str:
    """The one-line verdict: promoted, not worse but not promoted, or kept the parent."""
    if not_worse and promote:
        return f"promoted to {tagged}: " + reason
    if not_worse:
        return "not worse, not promoted (promote=False): " + reason
    return f"kept {parent} as {tagged}: candidate is worse: " + reason


@dataclass
class WindowRows:
    """The labeled window split for retraining: training rows (window rows not in the holdout,
    then replayed parent rows) and holdout rows, as parallel text/label lists."""

    train_texts: list[str]
    train_labels: list[str]
    held_texts: list[str]
    held_labels: list[str]
    num_replay: int


def _key(text: str) -> str:
    """Case- and whitespace-insensitive text key: the same question twice is one row."""
    return " ".join(text.lower().split())


def _window_rows(
    parent_raw: dict,
    labeled: str | os.PathLike,
    holdout_file: str | os.PathLike | None,
    holdout: float,
    replay: int,
    seed: int,
) -> WindowRows:
    """Labeled window -> training rows + holdout (+ `replay` rows of the parent's training split)."""
    data_raw = parent_raw.get("data") or {}
    text_field = data_raw.get("text_field", "text")
    label_field = data_raw.get("response_field") or data_raw.get("label_field", "label")
    window = load_labeled(labeled, text_field, label_field)
    if holdout_file is not None:
        train_rows, held = window, load_labeled(holdout_file, text_field, label_field)
    else:
        parts = split_dataset(window, SplitConfig(kind="stratified", validation=holdout, test=0.0), "label", seed)
        train_rows, held = parts["train"], parts["validation"]
    held_keys = {_key(t) for t in column_values(held, "text")}
    kept = [
        (text, label)
        for text, label in zip(column_values(train_rows, "text"), column_values(train_rows, "label"))
        if _key(text) not in held_keys
    ]
    train_texts, train_labels = [text for text, _ in kept], [label for _, label in kept]
    replay_texts, replay_labels = ([], [])
    if replay > 0:
        replay_texts, replay_labels = _replay_rows(parent_raw, replay, seed, held_keys | {_key(t) for t in train_texts})
    return WindowRows(
        train_texts + replay_texts,
        train_labels + replay_labels,
        [str(t) for t in column_values(held, "text")],
        [str(label) for label in column_values(held, "label")],
        len(replay_texts),
    )


def _check_classes(parent: str, parent_labels: list[str], train_labels: list[str], held_labels: list[str]) -> None:
    """A classifier continues with the parent's head: the rows must have exactly its classes."""
    unknown = sorted(set(train_labels) - set(parent_labels))
    if unknown:
        raise ConfigError(
            f"labeled data has classes the parent {parent} was not trained on: {', '.join(unknown[:10])}; "
            f"its classes: {', '.join(parent_labels)}. A new class needs a new head: train a new adapter instead"
        )
    missing = sorted(set(parent_labels) - set(train_labels))
    if missing:
        # The loop builds the head from the training labels; a missing class would change its shape.
        raise ConfigError(
            f"the training rows lack classes of the parent {parent}: {', '.join(missing)}; continuing from it "
            "needs every class - add labeled rows of them, or mix in the parent's training rows with replay=N"
        )
    held_unknown = sorted(set(held_labels) - set(parent_labels))
    if held_unknown:
        raise ConfigError(f"holdout has classes the adapters cannot predict: {', '.join(held_unknown[:10])}")


def _candidate_config(
    parent_raw: dict,
    task: str,
    words: dict | None,
    train_path: Path,
    parent: str,
    name: str,
    store: AdapterStore,
    out: Path,
) -> dict:
    """The parent's raw training config, on the new rows, continuing from the parent and publishing to its store."""
    raw = copy.deepcopy(parent_raw)
    data_raw = parent_raw.get("data") or {}
    split = dict(data_raw.get("split") or {})
    raw["data"] = {
        **data_raw,
        "name": str(train_path),
        "text_field": "text",
        "label_field": "label",
        "response_field": None,
        "label_names": words if task == "causal-lm" else data_raw.get("label_names"),
        "max_train_samples": None,
        "max_eval_samples": None,
        "max_test_samples": None,
        # Our holdout is the test set; the loop only needs a validation split.
        "split": {
            "kind": "stratified" if task == "sequence-classification" else "random",
            "validation": split.get("validation", 0.1),
            "test": 0.0,
        },
    }
    raw["init_from"] = parent
    raw["output"] = {
        **(raw.get("output") or {}),
        "name": name,
        "publish": True,
        "store": str(store.root),
        "run_dir": str(out / "run"),
    }
    raw["eval"] = {**(raw.get("eval") or {}), "baseline": False}
    return raw


def write_retrain_report(result: RetrainResult, out_dir: Path) -> None:
    """retrain_report.json (RetrainResult.to_dict) and retrain_report.md (the metric table), each written atomically."""
    write_json_atomic(out_dir / "retrain_report.json", result.to_dict())
    keys = sorted(set(result.current_metrics) | set(result.candidate_metrics))
    lines = [
        f"# Retrain report: {result.current} -> {result.candidate}",
        "",
        f"**{'PROMOTED' if result.promoted else 'NOT PROMOTED'}** - {result.reason}",
        "",
        f"- Training rows: {result.num_train} (of which replayed from the parent's data: {result.num_replay})",
        f"- Holdout rows: {result.num_holdout}",
        f"- Run folder: {result.run_dir}",
        "",
        f"| metric | current {result.current} | candidate {result.candidate} |",
        "|---|---|---|",
    ]
    for k in keys:
        a, b = result.current_metrics.get(k), result.candidate_metrics.get(k)
        if a is not None and b is not None:
            lines.append(f"| {k}{' (decides)' if k == result.metric else ''} | {a:.4f} | {b:.4f} |")
        else:
            lines.append(f"| {k} | {a} | {b} |")
    text = "\n".join(lines) + "\n"
    tmp = out_dir / ".retrain_report.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out_dir / "retrain_report.md")
