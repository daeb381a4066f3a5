"""Training-time reference statistics that traffic is later compared with (drift monitoring).

At the end of training, ``build_reference`` summarises the training texts and the model's
held-out predictions: label distribution, confidence and length histograms, the token
vocabulary seen in training (with the OOV rate a fresh sample of the same data shows), and
mean-pooled base-model embeddings of up to ~200 training texts. ``Reference.save(folder)``
writes the arrays to ``reference.safetensors`` next to the manifest and returns the small
JSON part that goes into ``manifest["reference"]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from transformers import AutoModel, AutoTokenizer

from adapters.config import ModelConfig, load_config
from adapters.constants import MANIFEST
from adapters.data.loading import label_words, prepare_splits
from adapters.distributed import no_zero3_init
from adapters.errors import ConfigError
from adapters.evaluation.evaluator import first_line_answer
from adapters.modeling.backbone import load_tokenizer
from adapters.modeling.builtins import resolve_model
from adapters.modeling.generation import SamplingParams
from adapters.monitoring.traffic_log import token_counts
from adapters.paths import atomic_path
from adapters.serving.engine import ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.store.manifest import read_manifest, write_manifest

REFERENCE_FORMAT = "adapterkit.reference/1"
REFERENCE_FILE = "reference.safetensors"
LENGTH_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_ANSWER_LABELS = 50  # a causal LM whose training answers take at most this many values is watched like a classifier
MAX_SAMPLE = 2000  # raw lengths / confidences kept for two-sample tests and plots


@dataclass
class Reference:
    """JSON statistics plus the arrays stored next to them (see the module docstring).

    stats: what goes into ``manifest["reference"]`` (format, length / label / confidence
    distributions, vocabulary summary, embedding description).
    """

    stats: dict[str, Any]
    embeddings: np.ndarray | None = None  # (n, d) float32
    vocab_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted
    vocab_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # tokens per text (sample)
    confidences: np.ndarray | None = None  # held-out prediction confidences (sample)

    @property
    def vocabulary(self) -> frozenset[int]:
        """The token ids seen in training."""
        return frozenset(int(i) for i in self.vocab_ids)

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays as written to reference.safetensors (contiguous int64 / float32)."""
        out = {
            "vocab_ids": np.ascontiguousarray(self.vocab_ids, dtype=np.int64),
            "vocab_counts": np.ascontiguousarray(self.vocab_counts, dtype=np.int64),
            "lengths": np.ascontiguousarray(self.lengths, dtype=np.int64),
        }
        if self.embeddings is not None:
            out["embeddings"] = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        if self.confidences is not None:
            out["confidences"] = np.ascontiguousarray(self.confidences, dtype=np.float32)
        return out

    def save(self, folder: str | os.PathLike) -> dict[str, Any]:
        """Write ``reference.safetensors`` into `folder` atomically; return manifest["reference"]
        (the stats plus the file's name and sha256)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = safetensors.numpy.save(self.tensors(), metadata={"format": REFERENCE_FORMAT})
        with atomic_path(folder / REFERENCE_FILE) as tmp:
            tmp.write_bytes(data)
        stats = dict(self.stats)
        stats["file"] = REFERENCE_FILE
        stats["sha256"] = hashlib.sha256(data).hexdigest()
        return stats

    @classmethod
    def load(cls, folder: str | os.PathLike, stats: dict[str, Any] | None = None) -> Reference:
        """Read the reference of an adapter folder (stats from its manifest unless given).

        Raises ConfigError when the folder has no manifest or no reference, the format is
        unknown, or the file is missing or does not match its recorded sha256.
        """
        folder = Path(folder)
        if stats is None:
            manifest_path = folder / MANIFEST
            if not manifest_path.is_file():
                raise ConfigError(f"{folder} has no {MANIFEST}; pass the folder of a trained adapter")
            stats = json.loads(manifest_path.read_text()).get("reference")
            if not stats:
                raise ConfigError(
                    f"adapter {folder} has no drift reference (manifest key 'reference'); "
                    "it was trained before references were recorded - retrain it or build one with "
                    "adapters.monitoring.reference.build_reference"
                )
        if stats.get("format") != REFERENCE_FORMAT:
            raise ConfigError(
                f"reference format {stats.get('format')!r} is not supported; expected {REFERENCE_FORMAT!r}"
            )
        path = folder / stats.get("file", REFERENCE_FILE)
        if not path.is_file():
            raise ConfigError(f"reference file {path} is missing")
        data = path.read_bytes()
        if stats.get("sha256") and hashlib.sha256(data).hexdigest() != stats["sha256"]:
            raise ConfigError(f"reference file {path} does not match the sha256 in the manifest (corrupt or replaced)")
        arrays = safetensors.numpy.load(data)
        return cls(
            stats=stats,
            embeddings=arrays.get("embeddings"),
            vocab_ids=arrays["vocab_ids"],
            vocab_counts=arrays["vocab_counts"],
            lengths=arrays["lengths"],
            confidences=arrays.get("confidences"),
        )


def quantile_edges(
    values: np.ndarray, quantiles: Sequence[float] = LENGTH_QUANTILES, integer: bool = False
) -> list[float]:
    """Interior bin edges at the reference's quantiles (duplicates from ties removed).

    Bin i holds edges[i-1] < x <= edges[i]; see ``bin_counts``. integer=True keeps edges on
    observed values (token counts), so every bin is a whole range of lengths.
    """
    if len(values) == 0:
        return []
    method = "nearest" if integer else "linear"
    return [float(x) for x in np.unique(np.quantile(np.asarray(values, dtype=np.float64), quantiles, method=method))]


def bin_counts(values, edges: Sequence[float]) -> list[int]:
    """Counts of `values` in the len(edges)+1 bins (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype(int).tolist()


def _sample(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return values if len(values) <= n else values[np.sort(rng.choice(len(values), n, replace=False))]


def build_reference(
    texts: Sequence[str],
    labels: Sequence | None = None,
    *,
    tokenizer,
    predictions: Sequence | None = None,
    confidences: Sequence[float] | None = None,
    embed_fn: Callable[[list[str]], Any] | None = None,
    label_names: Sequence[str] | None = None,
    max_embed: int = 200,
    oov_holdout: float = 0.2,
    seed: int = 0,
    embed_model: str | None = None,
) -> Reference:
    """Summarise training data (and held-out predictions) for later drift checks.

    Args:
        texts: the training inputs (duplicates are counted once).
        labels: their gold labels (label distribution; fallback for predictions).
        tokenizer: the base model's tokenizer (token lengths, vocabulary, unknown tokens).
        predictions: labels the trained model predicted on held-out data: traffic logs
            predicted labels, so these are the fair reference for label drift.
        confidences: the model's confidence in [0, 1] for each prediction (confidence histogram).
        embed_fn: texts -> (n, d) array of mean-pooled base-model embeddings (``embedder``).
        label_names: the class list (index = class id) so labels given as ids read as names.
        max_embed: how many training texts to embed.
        oov_holdout: fraction of texts held out to estimate the OOV rate of same-distribution data.
        seed: seed of the held-out split and of the samples kept.
        embed_model: what embed_fn runs (recorded so the monitor embeds traffic the same way).

    Returns:
        the ``Reference``: JSON stats (length and confidence bins at the reference's deciles,
        label counts, vocabulary summary) plus samples of at most ``MAX_SAMPLE`` lengths /
        confidences and up to `max_embed` embeddings.

    Raises:
        ConfigError: no tokenizer, no texts, a string instead of a list, predictions and
            confidences of different lengths, non-finite confidences, or an embed_fn whose
            output is not (n, d).
    """
    texts = _checked_texts(texts, tokenizer, predictions, confidences)
    rng = np.random.default_rng(seed)
    ids_per_text = [token_counts(tokenizer, t) for t in texts]
    lengths = np.array([len(ids) for ids in ids_per_text], dtype=np.int64)
    chars = np.array([len(t) for t in texts], dtype=np.int64)
    vocab_ids, vocab_counts, vocabulary = _vocabulary_stats(ids_per_text, tokenizer, rng, oov_holdout)
    stats: dict[str, Any] = {
        "format": REFERENCE_FORMAT,
        "num_texts": len(texts),
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
            "vocab_size": int(len(tokenizer)) if hasattr(tokenizer, "__len__") else None,
            "unk_token_id": getattr(tokenizer, "unk_token_id", None),
        },
        "length": {
            "unit": "tokens (no special tokens)",
            "edges": quantile_edges(lengths, integer=True),
            "quantiles": {
                f"p{int(q * 100):02d}": float(np.quantile(lengths, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)
            },
            "mean": float(lengths.mean()),
            "chars_mean": float(chars.mean()),
        },
        "vocabulary": vocabulary,
    }
    stats["length"]["counts"] = bin_counts(lengths, stats["length"]["edges"])
    stats.update(_label_stats(labels, predictions, label_names))

    conf_sample = None
    if confidences is not None:
        stats["confidence"], conf_sample = _confidence_stats(confidences, rng)
    embeddings = None
    if embed_fn is not None and max_embed > 0:
        embeddings = _embed_sample(texts, embed_fn, max_embed, rng)
        stats["embedding"] = {
            "count": int(embeddings.shape[0]),
            "dim": int(embeddings.shape[1]),
            "pooling": "mean of the base model's last hidden states",
            "model": embed_model,
        }
    return Reference(
        stats=stats,
        embeddings=embeddings,
        vocab_ids=vocab_ids,
        vocab_counts=vocab_counts,
        lengths=_sample(lengths, MAX_SAMPLE, rng),
        confidences=conf_sample,
    )


def _checked_texts(texts, tokenizer, predictions, confidences) -> list[str]:
    """The distinct texts in order, after checking build_reference's arguments (ConfigError says what is wrong)."""
    if tokenizer is None:
        raise ConfigError("build_reference needs the base model's tokenizer (tokenizer=...)")
    if isinstance(texts, str):
        raise ConfigError("build_reference: texts must be a list of strings, not one string")
    texts = list(dict.fromkeys(str(t) for t in texts))  # dedupe, keep order
    if not texts:
        raise ConfigError("build_reference: no texts given")
    if predictions is not None and confidences is not None and len(predictions) != len(confidences):
        raise ConfigError(
            f"build_reference: {len(predictions)} predictions but {len(confidences)} confidences; "
            "give one per prediction"
        )
    return texts


def _vocabulary_stats(
    ids_per_text: list[list[int]], tokenizer, rng: np.random.Generator, oov_holdout: float
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(sorted token ids, their counts, stats["vocabulary"]) of the tokenized training texts."""
    counter: Counter[int] = Counter()
    for ids in ids_per_text:
        counter.update(ids)
    vocab_ids = np.array(sorted(counter), dtype=np.int64)
    vocab_counts = np.array([counter[i] for i in vocab_ids], dtype=np.int64)
    total_tokens = int(vocab_counts.sum())
    unk_id = getattr(tokenizer, "unk_token_id", None)

    # Same-distribution OOV rate: vocabulary of one part of the data, measured on the rest.
    # (Slightly above what new traffic shows against the full vocabulary: a safe baseline.)
    n_texts = len(ids_per_text)
    order = rng.permutation(n_texts)
    n_hold = max(1, int(round(n_texts * oov_holdout))) if n_texts > 1 else 0
    hold, fit = order[:n_hold], order[n_hold:]
    fit_vocab = {i for j in fit for i in ids_per_text[j]}
    hold_tokens = sum(len(ids_per_text[j]) for j in hold)
    hold_oov = sum(1 for j in hold for i in ids_per_text[j] if i not in fit_vocab)
    stats = {
        "size": int(len(vocab_ids)),
        "total_tokens": total_tokens,
        "baseline_oov_rate": float(hold_oov / hold_tokens if hold_tokens else 0.0),
        "unk_rate": float(counter.get(unk_id, 0) / total_tokens) if unk_id is not None and total_tokens else 0.0,
        "top": [[int(i), int(c)] for i, c in counter.most_common(20)],
    }
    return vocab_ids, vocab_counts, stats


def _label_stats(labels, predictions, label_names) -> dict[str, Any]:
    """stats["labels"] (predicted labels if given, else gold ones) and stats["label_names"], where known."""

    def named(values):
        out = []
        for v in values:
            if label_names is not None and isinstance(v, (int, np.integer)) and 0 <= int(v) < len(label_names):
                out.append(str(label_names[int(v)]))
            else:
                out.append(str(v))
        return out

    stats: dict[str, Any] = {}
    label_source, label_values = None, None
    if predictions is not None:
        label_source, label_values = "predictions", named(predictions)
    elif labels is not None:
        label_source, label_values = "labels", named(labels)
    if label_values is not None:
        stats["labels"] = {"source": label_source, "counts": dict(sorted(Counter(label_values).items()))}
        if label_source == "predictions" and labels is not None:
            stats["labels"]["train_counts"] = dict(sorted(Counter(named(labels)).items()))
    if label_names is not None:
        stats["label_names"] = [str(n) for n in label_names]
    return stats


def _confidence_stats(confidences: Sequence[float], rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
    """(stats["confidence"]: decile bins, counts, mean; a float32 sample of at most MAX_SAMPLE values)."""
    conf_arr = np.asarray(confidences, dtype=np.float64)
    if conf_arr.size == 0 or not np.all(np.isfinite(conf_arr)):
        raise ConfigError("build_reference: confidences must be finite numbers")
    edges = quantile_edges(conf_arr)
    stats = {
        "edges": edges,
        "counts": bin_counts(conf_arr, edges),
        "mean": float(conf_arr.mean()),
        "num": int(conf_arr.size),
    }
    return stats, _sample(conf_arr, MAX_SAMPLE, rng).astype(np.float32)


def _embed_sample(
    texts: list[str], embed_fn: Callable[[list[str]], Any], max_embed: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, d) float32 embeddings of a random sample of n = min(max_embed, len(texts)) texts, in text order."""
    chosen = sorted(rng.choice(len(texts), min(max_embed, len(texts)), replace=False).tolist())
    embeddings = np.asarray(embed_fn([texts[i] for i in chosen]), dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(chosen):
        raise ConfigError(f"embed_fn must return an (n, d) array for n texts; got shape {embeddings.shape}")
    return embeddings


# ---------------------------------------------------------------- embeddings
def _base_module(model):
    """The transformer body whose last hidden states are pooled."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    if hasattr(model, "backbone"):  # adapters.modeling.backbone.MeanPoolingClassifier
        model = model.backbone
    base_prefix = getattr(model, "base_model_prefix", None)
    if base_prefix and hasattr(model, base_prefix) and getattr(model, base_prefix) is not model:
        return getattr(model, base_prefix)  # LlamaForCausalLM.model, BertForSequenceClassification.bert
    return model


def embed_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: int = 128) -> np.ndarray:
    """Mean-pooled last hidden states of the base model: an (n, hidden) float32 array.

    Accepts a plain ``AutoModel``, a task model (causal LM / classifier, whose body is used),
    a ``MeanPoolingClassifier`` or a ``PeftModel`` (its adapters are disabled, so the
    embedding is the base model's, comparable across adapter versions). Texts are truncated
    to `max_length` tokens; padding is masked out of the mean.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
    disable = model.disable_adapter() if is_peft else contextlib.nullcontext()
    body = _base_module(model)
    device = next(body.parameters()).device
    was_training = body.training
    accepted = _forward_args(body)
    body.eval()
    out = []
    try:
        with disable, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                if "token_type_ids" in batch and "token_type_ids" not in accepted:
                    del batch["token_type_ids"]  # decoders reject it
                states = body(**batch).last_hidden_state.float()  # (batch, seq, hidden)
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (batch, seq, 1)
                out.append(((states * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu().numpy())
    finally:
        body.train(was_training)
    if not out:
        hidden = int(getattr(body.config, "hidden_size", 0))
        return np.zeros((0, hidden), np.float32)
    return np.concatenate(out).astype(np.float32)


def _forward_args(module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def embedder(model_name_or_path: str, revision: str | None = None, batch_size: int = 32, max_length: int = 128):
    """Load the base model body (``AutoModel``, float32) once; return texts -> (n, hidden) embeddings.

    The returned function also carries ``model_path`` and ``tokenizer`` attributes.
    """
    path = resolve_model(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    with no_zero3_init():  # called by one rank only: a ZeRO-3 run must not shard this model
        model = AutoModel.from_pretrained(path, revision=revision, dtype=torch.float32)
    model.eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        return embed_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)

    embed.model_path = path  # type: ignore[attr-defined]
    embed.tokenizer = tokenizer  # type: ignore[attr-defined]
    return embed


# ---------------------------------------------------------------- from a training run
def predict_classifier(model, tokenizer, texts: Sequence[str], batch_size: int = 32, max_length: int = 128):
    """(class ids, softmax confidence of each prediction) of a sequence classifier: two lists of len(texts)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: list[int] = []
    confs: list[float] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                probs = model(**batch).logits.float().softmax(-1)  # (batch, num_labels)
                conf, pred = probs.max(-1)
                preds += pred.tolist()
                confs += conf.tolist()
    finally:
        model.train(was_training)
    return preds, confs


def _heldout_split(prepared):
    """The split whose predictions are the reference for predicted labels: test, else validation, else None."""
    for name in ("test", "validation"):
        if name in prepared.splits and len(prepared.splits[name]):
            return prepared.splits[name]
    return None


def _answer_labels(data, train_split) -> tuple[list[str], bool]:
    """A causal LM's training answers (label words applied), and whether they are few enough to be labels."""
    words = label_words(data)
    targets = [words.get(str(t), str(t)) for t in train_split[data.response_field or data.label_field]]
    return targets, len(set(targets)) <= MAX_ANSWER_LABELS  # free text has no label mix to watch


def build_training_reference(
    model,
    tokenizer,
    cfg,
    prepared,
    out_dir: str | os.PathLike,
    write: bool = True,
    max_heldout: int = 1000,
    max_embed: int = 200,
    generated: dict | None = None,
) -> dict[str, Any] | None:
    """The drift reference of a finished run, for ``manifest["reference"]``.

    Call it on EVERY process after training (held-out predictions run the model, which under
    ZeRO-3 is a collective) and before ``write_manifest`` (the manifest checksums the
    ``reference.safetensors`` this writes into out_dir). Only where ``write`` is true
    (the main process) are the base-model embeddings computed and the file written; the
    others return None.

    model: the trained model (a classifier's held-out predictions and confidences are the
    reference for the predicted labels the server will log); tokenizer: its tokenizer;
    cfg: the RunConfig; prepared: adapters.data.loading.PreparedData (raw text splits).
    generated: a causal LM's held-out answers and their confidences ({"predictions": [...],
    "confidences": [...]}, from the run's test evaluation); the answers count as labels only
    when the training answers come from a small set (classification-style fine-tuning).
    """
    data = cfg.data
    train_split = prepared.splits["train"]
    texts = [str(t) for t in train_split[data.text_field]]
    heldout = _heldout_split(prepared)
    predictions = confidences = None
    label_names = None
    if cfg.task == "sequence-classification":
        labels = [str(label) for label in train_split[data.label_field]]
        label_names = prepared.labels
        if heldout is not None:
            held_texts = [str(t) for t in heldout[data.text_field]][:max_heldout]
            ids, confidences = predict_classifier(
                model, tokenizer, held_texts, cfg.train.eval_batch_size, data.max_length
            )
            predictions = [prepared.labels[i] for i in ids]
    else:
        targets, answers_are_labels = _answer_labels(data, train_split)
        labels = targets if answers_are_labels else None
        generated = generated or {}
        scored = [
            (p, c)
            for p, c in zip(generated.get("predictions") or [], generated.get("confidences") or [])
            if c is not None
        ][:max_heldout]
        if scored:
            confidences = [c for _, c in scored]
            predictions = [p for p, _ in scored] if answers_are_labels else None
    if not write:
        return None
    embed_fn = None
    if max_embed > 0:
        embed_fn = embedder(
            cfg.model.name,
            revision=cfg.model.revision,
            batch_size=cfg.train.eval_batch_size,
            max_length=data.max_length,
        )
    ref = build_reference(
        texts,
        labels,
        tokenizer=tokenizer,
        predictions=predictions,
        confidences=confidences,
        embed_fn=embed_fn,
        label_names=label_names,
        max_embed=max_embed,
        seed=cfg.train.seed,
        embed_model=cfg.model.name,
    )
    return ref.save(out_dir)


def _engine_predictions(engine: InferenceEngine, folder: Path, cfg, held_texts: list[str]) -> tuple[list, list]:
    """(predicted labels or first-line answers, confidences) of the adapter in `folder` on held_texts,
    through the serving engine in batches of cfg.train.eval_batch_size."""
    step = cfg.train.eval_batch_size
    chunks = [held_texts[start : start + step] for start in range(0, len(held_texts), step)]
    if cfg.task == "sequence-classification":
        results = [
            r
            for chunk in chunks
            for r in engine.classify([ClassificationRequest(adapter=str(folder), text=t) for t in chunk])
        ]
        return [r.label for r in results], [r.confidence for r in results]
    params = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens)  # greedy, as the run's evaluation
    results = [
        r
        for chunk in chunks
        for r in engine.generate([GenerationRequest(adapter=str(folder), prompt=t, params=params) for t in chunk])
    ]
    scored = [(first_line_answer(r.text), r.confidence) for r in results if r.confidence is not None]
    return [a for a, _ in scored], [c for _, c in scored]


def attach_reference(adapter_dir: str | os.PathLike, max_heldout: int = 1000, max_embed: int = 200) -> dict[str, Any]:
    """Build and store the drift reference of an adapter folder that has none (trained before
    references were recorded, or outside ``train``): re-creates its data splits from
    ``manifest["training"]``, predicts the held-out split through the serving engine, writes
    ``reference.safetensors`` and rewrites the manifest (checksums included).

    Not for published store versions (they are immutable): attach, then publish.
    Returns manifest["reference"]; raises ConfigError when the manifest has no training config.
    """
    folder = Path(adapter_dir).resolve()
    manifest = read_manifest(folder)
    if not isinstance(manifest.get("training"), dict):
        raise ConfigError(f"{folder}: the manifest has no training config, so the training data cannot be found again")
    cfg = load_config(raw=manifest["training"])
    prepared = prepare_splits(cfg)
    data = cfg.data
    texts = [str(t) for t in prepared.splits["train"][data.text_field]]
    heldout = _heldout_split(prepared)
    if cfg.task == "sequence-classification":
        labels, answers_are_labels = [str(label) for label in prepared.splits["train"][data.label_field]], True
    else:
        targets, answers_are_labels = _answer_labels(data, prepared.splits["train"])
        labels = targets if answers_are_labels else None
    predictions = confidences = None
    if heldout is not None:
        engine = InferenceEngine(ModelConfig.model_validate(manifest["training"]["model"]), task=cfg.task, capacity=1)
        held_texts = [str(t) for t in heldout[data.text_field]][:max_heldout]
        predicted, scores = _engine_predictions(engine, folder, cfg, held_texts)
        if cfg.task == "sequence-classification" or scores:
            confidences = scores
            predictions = predicted if answers_are_labels else None
        tokenizer = engine.tokenizer
    else:
        tokenizer = load_tokenizer(cfg.model)
    embed_fn = None
    if max_embed > 0:
        embed_fn = embedder(cfg.model.name, revision=cfg.model.revision, max_length=data.max_length)
    ref = build_reference(
        texts,
        labels,
        tokenizer=tokenizer,
        predictions=predictions,
        confidences=confidences,
        embed_fn=embed_fn,
        label_names=prepared.labels,
        max_embed=max_embed,
        seed=cfg.train.seed,
        embed_model=cfg.model.name,
    )
    stats = ref.save(folder)
    write_manifest(folder, {**manifest, "reference": stats})
    return stats
