"""Serve many adapters from one loaded base: an LRU of resident adapters and mixed-adapter batches.

The base loads once. Adapters load by reference (a store reference ``name``, ``name@3``,
``name@prod``, or an adapter folder) under private peft adapter names (``a0``, ``a1``, ...),
up to ``capacity`` at a time; the least recently used one is deleted to make room.

A batch may mix rows of different adapters (and the bare base, ``"base"``). Rows whose
adapters' method is mixable (the LoRA family; the registry's ``mixable`` flag) share one
forward pass through peft's per-row ``adapter_names``; rows of other methods run in one
pass per adapter. Results come back in request order either way.

One lock guards the model: a load, an unload and a forward pass never overlap, so no request
sees a half-loaded adapter. Reading and verifying adapter files happens outside the lock.

The engine delegates to one collaborator per concern (none of them imports this module):
adapters.serving.resolver (references, checksums, base check), .slots (residency, LRU, pooled
slots) with .slot_buffers (flat weight buffers, file mapping), .peft_layers (the PeftModel and
its active adapter), .planner (rows into passes), .passes (classification and prompt-learning calls)
and .scheduler (continuous batching: ``start`` admits rows to running decode batches that
``scheduler.step()`` advances one token at a time; rows join and leave between steps).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.config import ModelConfig, QuantizationConfig
from adapters.constants import PEFT_BASE, TASKS
from adapters.errors import ConfigError
from adapters.methods.targets import head_module_names
from adapters.modeling.backbone import allow_cpu_4bit_packing, load_backbone, load_tokenizer
from adapters.modeling.decoding import decode_batch
from adapters.modeling.generation import DecodedRow, SamplingParams, TokenLogprobs, encode_prompt, eos_ids
from adapters.modeling.mean_pooling import MeanPoolingForSequenceClassification
from adapters.modeling.prefix_cache import PrefixCache
from adapters.paths import atomic_path
from adapters.serving.passes import classify_logits, generate_prompt_learning
from adapters.serving.peft_layers import PeftLayers
from adapters.serving.planner import plan_passes, prepare_pass, resolve_rows
from adapters.serving.resolver import BASE, AdapterResolver, ResolvedAdapter
from adapters.serving.scheduler import DecodeScheduler, LiveRow, prefix_owners
from adapters.serving.slots import EngineStats, ResidentAdapter, SlotPool

__all__ = [
    "BASE",
    "ClassificationRequest",
    "ClassificationResult",
    "EngineStats",
    "GenerationRequest",
    "GenerationResult",
    "InferenceEngine",
    "LiveRow",
    "ResidentAdapter",
    "ResolvedAdapter",
    "generation_result",
    "infer_records",
    "write_jsonl",
]

_DEFAULT_MAX_POSITIONS = 2048  # input limit of a model whose config does not give max_position_embeddings
# Prefix cache size: SmolLM2-135M's keys and values take 45 KiB per token in float32, so 256 MiB holds
# about 5,800 prompt tokens (a 1.7B Llama's, 384 KiB per token: about 680)
DEFAULT_PREFIX_CACHE_MIB = 256


# ------------------------------------------------------------------ requests and results
@dataclass
class GenerationRequest:
    """One row to generate for. Give ``prompt`` (text), ``messages`` (chat: [{"role", "content"}, ...]) or
    ``prompt_ids`` (token ids, used as given: no prompt format, no special tokens added)."""

    adapter: str = BASE
    prompt: str | None = None
    messages: list[dict] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    raw: bool = False  # True: do not apply the adapter's training prompt format to plain text
    prompt_ids: list[int] | None = None


@dataclass
class GenerationResult:
    """One generated row: the text, its token ids, why it ended (``"stop"`` or ``"length"``) and token counts."""

    adapter: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    confidence: float | None = None  # geometric mean probability of the emitted tokens
    prompt_ids: list[int] = field(default_factory=list)  # the prompt's token ids as the model saw them
    logprobs: TokenLogprobs | None = None  # of the emitted tokens, when params.logprobs asked
    prompt_logprobs: TokenLogprobs | None = None  # of the prompt tokens, when params.prompt_logprobs asked


@dataclass
class ClassificationRequest:
    """One text to classify with ``adapter`` (a classifier adapter: it carries its own head)."""

    adapter: str
    text: str


@dataclass
class ClassificationResult:
    """One classified row: the best label, its probability (``confidence``), every label's softmax
    probability, the raw logits [num_labels] and the number of input tokens (after truncation)."""

    adapter: str
    label: str
    label_id: int
    confidence: float
    probabilities: dict[str, float]
    logits: list[float]
    input_tokens: int


# ------------------------------------------------------------------ the engine
class InferenceEngine:
    """One base model, many adapters. Thread-safe.

    ``base``: a model name or folder, or a ModelConfig. ``task``: one of adapters.constants.TASKS.
    ``quantization``: 4 or 8 (bits), a QuantizationConfig or its dict. ``capacity``: most adapters
    resident at once. ``store``: an AdapterStore or its root (None: the default store).
    ``device``: None picks CUDA when available for an unquantized base. ``max_input_tokens``:
    prompt + new tokens limit (default: the model's max_position_embeddings).
    ``allow_base_mismatch``: serve adapters trained on another base. ``fast_mixed_lora``: batched
    matmuls for mixed LoRA batches (adapters.serving.mixed_lora) instead of peft's per-adapter loop.
    ``prefix_cache_mib``: memory for the keys and values of prompts already prefilled, reused by later prompts
    of the same adapter load that start the same way (adapters.modeling.prefix_cache; 0: off).
    Raises ConfigError for an unknown task, a capacity below 1 or a negative prefix cache size.
    """

    def __init__(
        self,
        base: str | ModelConfig,
        task: str = "causal-lm",
        quantization: QuantizationConfig | dict | int | None = None,
        capacity: int = 8,
        store: Any = None,
        dtype: str = "float32",
        pooling: str = "auto",
        device: str | None = None,
        max_input_tokens: int | None = None,
        allow_base_mismatch: bool = False,
        fast_mixed_lora: bool = True,
        prefix_cache_mib: float = DEFAULT_PREFIX_CACHE_MIB,
    ):
        if task not in TASKS:
            raise ConfigError(f"task {task!r} is not served; valid tasks: {', '.join(TASKS)}")
        if capacity < 1:
            raise ConfigError(f"capacity must be >= 1 (got {capacity})")
        if not prefix_cache_mib >= 0:
            raise ConfigError(f"prefix_cache_mib must be >= 0 (got {prefix_cache_mib})")
        if isinstance(quantization, int):
            quantization = QuantizationConfig(bits=quantization)
        elif isinstance(quantization, dict):
            quantization = QuantizationConfig(**quantization)
        if not isinstance(base, ModelConfig):
            base = ModelConfig(name=str(base), dtype=dtype, quantization=quantization, pooling=pooling)
        self.model_config = base
        self.base_name = self.model_config.name
        self.task = task
        self.stats = EngineStats()
        self._lock = threading.RLock()

        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(self.model_config)
        # A classifier's head is per adapter (peft modules_to_save); the base's own head is a placeholder.
        label2id = {"LABEL_0": 0, "LABEL_1": 1} if task == "sequence-classification" else None
        model = load_backbone(self.model_config, task, label2id)
        allow_cpu_4bit_packing(model, True)  # serving never trains: bitsandbytes' fast CPU kernel is fine
        if device is None:
            device = "cuda" if torch.cuda.is_available() and self.model_config.quantization is None else None
        if device is not None and self.model_config.quantization is None:
            model.to(device)
        self.device = next(model.parameters()).device
        model.eval()
        self.base_load_seconds = time.perf_counter() - t0
        self.loaded_at = time.time()  # epoch seconds: when the base was ready
        max_positions = getattr(model.config, "max_position_embeddings", _DEFAULT_MAX_POSITIONS)
        self.max_input_tokens = max_input_tokens or int(max_positions or _DEFAULT_MAX_POSITIONS)
        self._stop_ids = eos_ids(model, self.tokenizer) if task == "causal-lm" else set()
        self._resolver = AdapterResolver(
            store,
            task,
            self.base_name,
            head_module_names(model),
            allow_base_mismatch,
            mean_pooling=isinstance(model, MeanPoolingForSequenceClassification),
        )
        self._layers = PeftLayers(model, fast_mixed_lora)
        self._pool = SlotPool(self._layers, capacity, self.stats)
        self.prefix_cache = PrefixCache(int(prefix_cache_mib * 2**20))
        self._pool.on_evict = lambda entry: self.prefix_cache.drop(entry.owner)  # no later row can use them
        self.scheduler = DecodeScheduler(
            self._lock, self._pool, self._layers, self.tokenizer, self._stop_ids, self.device, self.prefix_cache
        )

    @property
    def capacity(self) -> int:
        """Most adapters resident (or pooled) at once; may be changed between batches."""
        return self._pool.capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        with self._lock:
            self._pool.capacity = value

    @property
    def store(self) -> Any:
        """The adapter store, its root, or None until store_of() opens the default one."""
        return self._resolver.store

    @property
    def allow_base_mismatch(self) -> bool:
        """Whether adapters trained on another base (or without a manifest) are served."""
        return self._resolver.allow_base_mismatch

    # ------------------------------------------------------------------ references
    def store_of(self):
        """The adapter store that resolves references (the default store unless one was given)."""
        return self._resolver.store_of()

    def key_of(self, ref: str) -> str:
        """The folder a reference points at now (cheap: no checksums). Tags may move between calls.

        Raises ConfigError for an empty reference or ``base``, StoreError for an unknown one.
        """
        return self._resolver.key_of(ref)

    def resolve(self, ref: str) -> ResolvedAdapter:
        """Resolve a reference, verify its files' checksums and its base model, read what serving needs.

        Raises ConfigError, StoreError or BaseMismatchError (a StoreError) naming the problem.
        """
        return self._resolver.resolve(ref)

    def base_fingerprint(self) -> str | None:
        """Fingerprint of the base model's files (None for a hub id that is not a local folder)."""
        return self._resolver.base_fingerprint()

    def adapter_of(self, ref: str) -> ResolvedAdapter:
        """What a reference points at: a resident adapter's entry without touching its files, else resolve()."""
        key = self._resolver.cached_key(ref)
        with self._lock:
            entry = self._pool.resident.get(key)
        return entry.adapter if entry is not None else self._resolver.resolve(ref)

    # ------------------------------------------------------------------ residency
    def load(self, ref: str) -> ResidentAdapter:
        """Make an adapter resident (a cache hit costs a dict look-up). Returns its resident entry.

        Raises what resolve() raises, and ConfigError for an adapter of another peft type than the resident ones.
        """
        adapter = self._resolver.resolve(ref)  # outside the lock: reading and hashing files
        with self._lock:
            return self._pool.ensure_resident(adapter, ref, pinned=set())

    def unload(self, ref: str) -> bool:
        """Delete an adapter from memory (its layers stay pooled until trim()); while rows of the running decode
        batch use it, when the last of them leaves. Returns False if it was not resident."""
        key = self._resolver.cached_key(ref)
        with self._lock:
            return self._pool.unload(key)

    def activate(self, ref: str) -> str:
        """Make ``ref`` the active adapter for single-adapter calls; ``base`` disables adapters.

        A resident adapter costs a dict look-up and one attribute per adapted layer; otherwise it
        is loaded first. Returns the peft adapter name.
        """
        if ref == BASE:
            with self._lock:
                self._layers.activate(None)
            return PEFT_BASE
        key = self._resolver.cached_key(ref)
        with self._lock:
            entry = self._pool.hit(key, ref)
            if entry is not None:
                self._layers.activate(entry.slot)
                return entry.slot
        adapter = self._resolver.resolve(ref)  # outside the lock: reading and hashing files
        with self._lock:
            entry = self._pool.ensure_resident(adapter, ref, pinned=set())
            self._layers.activate(entry.slot)
            return entry.slot

    def resident(self) -> list[dict]:
        """Resident adapters, least recently used first (``load_seconds``: wall time of the load)."""
        with self._lock:
            return [e.summary() for e in self._pool.resident.values()]

    def trim(self) -> int:
        """Free the memory of pooled (non-resident) slots. Returns how many were deleted."""
        with self._lock:
            return self._pool.trim()

    # ------------------------------------------------------------------ batches
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate for a batch of rows that may use different adapters. Results are in request order.

        Raises ConfigError on a non-causal-lm engine, when a prompt plus its max_new_tokens exceeds
        ``max_input_tokens``, for a prompt token id outside the vocabulary, for log-probabilities or
        max_new_tokens 0 on a prompt-learning adapter (peft's generate path), and what resolve() raises
        for a bad reference.
        """
        refs, adapters, prompts = self._encode(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        for _, rows in plan_passes(adapters, self.task, self.capacity):
            with self._lock:
                forward, names = prepare_pass(self._pool, self._layers, refs, adapters, rows)
                is_prompt_learning = any(adapters[i] is not None and adapters[i].is_prompt_learning for i in rows)
                try:
                    if is_prompt_learning:
                        decoded = [
                            generate_prompt_learning(
                                self._layers.peft,
                                self.tokenizer,
                                prompts[i],
                                requests[i].params,
                                self._stop_ids,
                                self.device,
                            )
                            for i in rows
                        ]
                    else:
                        decoded = decode_batch(
                            forward,
                            self.tokenizer,
                            [prompts[i] for i in rows],
                            [requests[i].params for i in rows],
                            self._stop_ids,
                            adapter_names=names,
                            device=self.device,
                            prefix_cache=self.prefix_cache,
                            owners=prefix_owners(self._pool, [adapters[i] for i in rows]),
                        )
                finally:
                    self._layers.mixed.clear()
            for i, d in zip(rows, decoded):
                results[i] = generation_result(refs[i], prompts[i], d)
        return results  # type: ignore[return-value]

    def _encode(self, requests: list[GenerationRequest]) -> tuple[list[str], list, list[list[int]]]:
        """Each request's reference, resolved adapter (None: the base) and checked prompt token ids."""
        if self.task != "causal-lm":
            raise ConfigError(f"generate needs a causal-lm engine; this engine serves {self.task!r}")
        refs = [r.adapter or BASE for r in requests]
        adapters = resolve_rows(refs, self.adapter_of)
        return refs, adapters, _encode_prompts(self.tokenizer, self.max_input_tokens, requests, adapters)

    def start(self, requests: list[GenerationRequest], mix: bool = True) -> list[LiveRow] | None:
        """Admit rows to the running decode batches (continuous batching, see adapters.serving.scheduler):
        ``scheduler.step()`` then decodes them a token at a time beside the rows already running, and
        ``generation_result`` turns a finished one into a GenerationResult equal to generate()'s.

        ``mix``: rows of different mixable adapters share a batch. Returns one LiveRow per request, or None
        when they do not fit now (their adapters and the running rows' are more than ``capacity``); nothing
        is admitted then. Raises what generate() raises for bad rows.
        """
        refs, adapters, prompts = self._encode(requests)
        if not self.scheduler.fits(adapters, self.capacity, mix):
            return None
        return self.scheduler.admit(refs, adapters, prompts, [r.params for r in requests], mix)

    def classify(self, requests: list[ClassificationRequest]) -> list[ClassificationResult]:
        """Classify a batch of texts; each row names its adapter (which carries its own head).

        Texts are truncated to the adapter's training max_length (and ``max_input_tokens``). Raises
        ConfigError on a non-classification engine or for a ``base`` row, and what resolve() raises.
        """
        if self.task != "sequence-classification":
            raise ConfigError(f"classify needs a sequence-classification engine; this engine serves {self.task!r}")
        refs = [r.adapter for r in requests]
        if any(ref == BASE or not ref for ref in refs):
            raise ConfigError("classification needs an adapter: the base model has no trained head")
        adapters = resolve_rows(refs, self.adapter_of)
        encoded = []
        for req, a in zip(requests, adapters):
            data = (a.manifest.get("training") or {}).get("data") or {}
            limit = min(int(data.get("max_length") or self.max_input_tokens), self.max_input_tokens)
            encoded.append(self.tokenizer(req.text, truncation=True, max_length=limit)["input_ids"])
        results: list[ClassificationResult | None] = [None] * len(requests)
        for _, rows in plan_passes(adapters, self.task, self.capacity):
            with self._lock, torch.inference_mode():
                forward, names = prepare_pass(self._pool, self._layers, refs, adapters, rows)
                try:
                    logits = classify_logits(forward, self.tokenizer, [encoded[i] for i in rows], names, self.device)
                finally:
                    self._layers.mixed.clear()
                labels_of = {i: self._pool.resident[adapters[i].key].adapter.labels() for i in rows}
            for i, row_logits in zip(rows, logits):  # row_logits: [num_labels]
                labels = labels_of[i]
                probs = torch.softmax(row_logits.float(), dim=-1)
                best = int(torch.argmax(probs))
                results[i] = ClassificationResult(
                    adapter=refs[i],
                    label=labels[best],
                    label_id=best,
                    confidence=float(probs[best]),
                    probabilities={labels[k]: float(probs[k]) for k in range(len(labels))},
                    logits=[float(v) for v in row_logits],
                    input_tokens=len(encoded[i]),
                )
        return results  # type: ignore[return-value]

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` under the base's tokenizer (special tokens included)."""
        return len(self.tokenizer(text)["input_ids"])


def _encode_prompts(
    tokenizer, max_input_tokens: int, requests: list[GenerationRequest], adapters: list[ResolvedAdapter | None]
) -> list[list[int]]:
    """The prompt token ids of each request (its adapter's prompt format applied unless raw), checked."""
    prompts: list[list[int]] = []
    for req, a in zip(requests, adapters):
        spec = None if (req.raw or a is None) else a.manifest.get("prompt")
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
            if not all(0 <= t < len(tokenizer) for t in ids):
                raise ConfigError(f"prompt token ids must be in [0, {len(tokenizer) - 1}]")
        else:
            ids = encode_prompt(tokenizer, req.prompt, req.messages, spec, req.params.max_new_tokens)
        p = req.params
        if (
            a is not None
            and a.is_prompt_learning
            and (p.logprobs is not None or p.prompt_logprobs is not None or p.max_new_tokens == 0)
        ):
            raise ConfigError("logprobs and max_new_tokens 0 are not available for prompt-learning adapters")
        if len(ids) + req.params.max_new_tokens > max_input_tokens:
            raise ConfigError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({req.params.max_new_tokens}) exceeds the "
                f"model's limit of {max_input_tokens} tokens"
            )
        prompts.append(ids)
    return prompts


def generation_result(ref: str, prompt_ids: list[int], decoded: DecodedRow) -> GenerationResult:
    """The GenerationResult of a row of ``ref`` with prompt ``prompt_ids`` that decoded to ``decoded``."""
    return GenerationResult(
        adapter=ref,
        text=decoded.text,
        token_ids=decoded.token_ids,
        finish_reason=decoded.finish_reason,
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(decoded.token_ids),
        confidence=decoded.confidence,
        prompt_ids=prompt_ids,
        logprobs=decoded.logprobs,
        prompt_logprobs=decoded.prompt_logprobs,
    )


# ------------------------------------------------------------------ records (scripts/infer.py)
_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


def infer_records(
    engine: InferenceEngine,
    records: list[dict],
    adapter: str = BASE,
    defaults: dict | None = None,
    batch_size: int = 16,
) -> list[dict]:
    """Run JSON records through the engine, ``batch_size`` rows per batch; returns one output per record.

    A record holds ``prompt`` (or ``text``) or ``messages``, and optionally its own ``adapter``
    and sampling keys (max_new_tokens, temperature, top_p, seed, stop). Other keys (an id...)
    are copied to the output. ``defaults``: sampling keys for records that do not set them.
    Raises ConfigError for a record that is not an object or has no input.
    """
    defaults = dict(defaults or {})
    outputs: list[dict] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for n, rec in enumerate(chunk, start):
            if not isinstance(rec, dict):
                raise ConfigError(f"input record {n}: expected a JSON object, got {type(rec).__name__}")
            if rec.get("prompt") is None and rec.get("text") is None and rec.get("messages") is None:
                raise ConfigError(f"input record {n}: give 'prompt' (or 'text') or 'messages'")
        if engine.task == "causal-lm":
            requests = [
                GenerationRequest(
                    adapter=rec.get("adapter") or adapter,
                    prompt=rec.get("prompt", rec.get("text")),
                    messages=rec.get("messages"),
                    params=SamplingParams(**{**defaults, **{k: rec[k] for k in _SAMPLING_KEYS if k in rec}}),
                    raw=bool(rec.get("raw", False)),
                )
                for rec in chunk
            ]
            for rec, res in zip(chunk, engine.generate(requests)):
                outputs.append(
                    {
                        **rec,
                        "adapter": res.adapter,
                        "output": res.text,
                        "finish_reason": res.finish_reason,
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": res.completion_tokens,
                    }
                )
        else:
            texts = [
                ClassificationRequest(adapter=rec.get("adapter") or adapter, text=rec.get("text", rec.get("prompt")))
                for rec in chunk
            ]
            for rec, res in zip(chunk, engine.classify(texts)):
                outputs.append(
                    {
                        **rec,
                        "adapter": res.adapter,
                        "label": res.label,
                        "confidence": res.confidence,
                        "probabilities": res.probabilities,
                    }
                )
    return outputs


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
