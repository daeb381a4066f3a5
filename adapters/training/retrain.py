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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from adapters.errors import ConfigError

log = logging.getLogger(__name__)

REPORT_FORMAT = "adapterkit.retrain-report/1"
DEFAULT_METRIC = {"sequence-classification": "accuracy", "causal-lm": "exact_match"}


@dataclass
class RetrainResult:
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
        return 0 if self.not_worse else 1

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, **asdict(self)}


# ---------------------------------------------------------------- data
def load_labeled(path: str | os.PathLike, text_field: str, label_field: str):
    """The labeled window as a datasets.Dataset with `text` and `label` columns (deduplicated)."""
    from adapters.config import DataConfig
    from adapters.data.loading import load_rows
    from adapters.data.splits import column_values

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
    from datasets import Dataset

    seen: set[str] = set()
    texts, labels = [], []
    for text, label in zip(column_values(rows, text_field), column_values(rows, label_field)):
        if text is None or not str(text).strip() or label is None:
            continue
        key = " ".join(str(text).lower().split())
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
        for t, l in zip(texts, labels):
            fh.write(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _replay_rows(parent_raw: dict, n: int, seed: int, exclude: set[str]) -> tuple[list[str], list[str]]:
    """n rows of the parent's own training split (the same split its training used)."""
    import random

    from adapters.config import load_config
    from adapters.data.loading import prepare_splits
    from adapters.data.splits import column_values

    parent_cfg = load_config(raw=copy.deepcopy(parent_raw))
    train = prepare_splits(parent_cfg).splits["train"]
    data = parent_cfg.data
    target = data.response_field or data.label_field
    texts = [str(t) for t in column_values(train, data.text_field)]
    labels = [str(l) for l in column_values(train, target)]
    pairs = [(t, l) for t, l in zip(texts, labels) if " ".join(t.lower().split()) not in exclude]
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:n]
    return [t for t, _ in pairs], [l for _, l in pairs]


# ---------------------------------------------------------------- evaluation
def evaluate_on_holdout(
    engine, refs: list[str], texts: list[str], labels: list[str], task: str, label_words: dict[str, str] | None = None,
    max_new_tokens: int = 8, batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """{ref: metrics} of each adapter on the same rows, through the serving engine."""
    from adapters.serving.engine import ClassificationRequest, GenerationRequest
    from adapters.modeling.generation import SamplingParams
    from adapters.evaluation.metrics import classification_metrics, exact_match

    out: dict[str, dict[str, float]] = {}
    for ref in refs:
        preds: list[str] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            if task == "sequence-classification":
                preds += [r.label for r in engine.classify([ClassificationRequest(adapter=ref, text=t) for t in chunk])]
            else:
                params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
                preds += [r.text for r in engine.generate([GenerationRequest(adapter=ref, prompt=t, params=params) for t in chunk])]
        if task == "sequence-classification":
            out[ref] = classification_metrics(preds, labels, sorted(set(labels) | set(preds)))
        else:
            words = label_words or {}
            out[ref] = {"exact_match": exact_match(preds, [words.get(l, l) for l in labels])}
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

    margin: how much worse (in metric units) the candidate may be and still be promoted
    (0.0: at least as good; 0.01: one point of accuracy of slack).
    overrides: ``key.path=value`` changes to the parent's training config (e.g. train.epochs=2).
    """
    from datasets import Dataset

    from adapters.config import SplitConfig, apply_overrides, load_config
    from adapters.paths import validate_name
    from adapters.data.splits import column_values, split_dataset
    from adapters.store.store import AdapterStore, is_path_ref

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
    store = AdapterStore(store_root)
    located = store.locate(current_ref)
    parent_dir, manifest = store.resolve(str(located))
    parent = str(located)
    parent_raw = manifest.get("training")
    if not isinstance(parent_raw, dict):
        raise ConfigError(f"{parent}: its manifest has no training config ('training'), so it cannot be retrained from")
    task = manifest.get("task") or parent_raw.get("task")
    metric = metric or DEFAULT_METRIC[task]
    data_raw = parent_raw.get("data") or {}
    text_field = data_raw.get("text_field", "text")
    label_field = data_raw.get("response_field") or data_raw.get("label_field", "label")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- data: labeled window -> train + holdout (+ replay of the parent's training rows)
    window = load_labeled(labeled, text_field, label_field)
    if holdout_file is not None:
        train_rows, held = window, load_labeled(holdout_file, text_field, label_field)
    else:
        parts = split_dataset(window, SplitConfig(kind="stratified", validation=holdout, test=0.0), "label", seed)
        train_rows, held = parts["train"], parts["validation"]
    held_keys = {" ".join(t.lower().split()) for t in column_values(held, "text")}
    train_texts = [t for t in column_values(train_rows, "text") if " ".join(t.lower().split()) not in held_keys]
    train_labels = [l for t, l in zip(column_values(train_rows, "text"), column_values(train_rows, "label")) if " ".join(t.lower().split()) not in held_keys]
    replay_texts, replay_labels = _replay_rows(parent_raw, replay, seed, held_keys | {" ".join(t.lower().split()) for t in train_texts}) if replay > 0 else ([], [])
    train_texts += replay_texts
    train_labels += replay_labels
    held_texts, held_labels = [str(t) for t in column_values(held, "text")], [str(l) for l in column_values(held, "label")]

    if task == "sequence-classification":
        parent_labels = list(manifest.get("labels") or [])
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
    if len(held_texts) < 2:
        raise ConfigError(f"holdout has {len(held_texts)} rows; give more labeled rows or a holdout_file")

    data_dir = out / "data"
    train_path = _write_jsonl(data_dir / "train.jsonl", train_texts, train_labels)
    _write_jsonl(data_dir / "holdout.jsonl", held_texts, held_labels)

    # ---- config: the parent's, on the new rows, continuing from the parent
    raw = copy.deepcopy(parent_raw)
    words = (manifest.get("prompt") or {}).get("label_names")
    if task == "causal-lm" and not words:
        from adapters.config import DataConfig
        from adapters.data.loading import label_words as parent_words

        words = parent_words(DataConfig.model_validate(data_raw)) or None
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
        "split": {"kind": "stratified" if task == "sequence-classification" else "random",
                  "validation": split.get("validation", 0.1), "test": 0.0},
    }
    raw["init_from"] = parent
    raw["output"] = {
        **(raw.get("output") or {}),
        "name": located.name,
        "publish": True,
        "store": str(store.root),
        "run_dir": str(out / "run"),
    }
    raw["eval"] = {**(raw.get("eval") or {}), "baseline": False}
    cfg = load_config(raw=apply_overrides(raw, list(overrides)))

    # ---- train the candidate (the hook: adapters.training.loop.train(cfg) -> TrainResult)
    from adapters.training.loop import train

    result = train(cfg, command=command)
    candidate = result.adapter_ref
    if not candidate:
        raise ConfigError("training finished but published nothing (output.publish was overridden to false?)")

    # ---- compare on the holdout, through the serving engine
    from adapters.config import ModelConfig
    from adapters.serving.engine import InferenceEngine

    engine = InferenceEngine(ModelConfig.model_validate(parent_raw["model"]), task=task, store=store, capacity=2)
    metrics = evaluate_on_holdout(
        engine, [parent, candidate], held_texts, held_labels, task, words or {}, max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.train.eval_batch_size,
    )
    current_m, cand_m = metrics[parent], metrics[candidate]
    if metric not in cand_m:
        raise ConfigError(f"metric {metric!r} is not computed for {task}; choose from: {', '.join(cand_m)}")
    not_worse = cand_m[metric] >= current_m[metric] - margin
    reason = (
        f"{metric} {cand_m[metric]:.4f} (candidate {candidate}) vs {current_m[metric]:.4f} (current {parent}) "
        f"on {len(held_texts)} holdout rows, margin {margin}"
    )
    promoted = False
    if not_worse and promote:
        store.tag(candidate, tag)
        promoted = True
        reason = f"promoted to {located.name}@{tag}: " + reason
    elif not_worse:
        reason = "not worse, not promoted (promote=False): " + reason
    else:
        reason = f"kept {parent} as {located.name}@{tag}: candidate is worse: " + reason
    log.info(reason)

    res = RetrainResult(
        current=parent, candidate=candidate, metric=metric, current_metrics=current_m, candidate_metrics=cand_m,
        margin=margin, not_worse=not_worse, promoted=promoted, tag=tag, reason=reason,
        num_train=len(train_texts), num_holdout=len(held_texts), num_replay=len(replay_texts),
        run_dir=str(result.run_dir), out_dir=str(out),
    )
    write_retrain_report(res, out)
    return res


def write_retrain_report(result: RetrainResult, out_dir: Path) -> None:
    from adapters.store.manifest import write_json_atomic

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
        lines.append(f"| {k}{' (decides)' if k == result.metric else ''} | {a:.4f} | {b:.4f} |" if a is not None and b is not None else f"| {k} | {a} | {b} |")
    text = "\n".join(lines) + "\n"
    tmp = out_dir / ".retrain_report.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out_dir / "retrain_report.md")
