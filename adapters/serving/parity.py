"""Train-to-serve parity: the same golden prompts through adapterkit's engine and through another runtime.

The golden set is the adapter's own held-out data: the test split of its training run, rebuilt from
the run config its manifest records (adapters.data.loading.prepare_splits), or texts given. For a
causal LM each prompt (in the adapter's training format) is compared at its first generated
position (the top-k token log-probabilities) and by its greedy tokens; for a classifier, by every
class probability. A row passes when no log-probability (causal LM) or probability (classifier)
differs by more than ``tol`` and the greedy tokens (or predicted labels) are equal. Log-probabilities,
not probabilities, for a causal LM: over a large vocabulary the top-k probabilities may all be small,
and a probability tolerance would then pass any adapter.

Runtimes: ``peft`` loads the adapter folder as its model card says (adapters.modeling.portable:
AutoPeftModel*, or transformers with trust_remote_code for a mean-pooling classifier);
``transformers`` loads a merged export (made on the fly unless one is given) with AutoModelFor*;
``vllm`` (a LoRA adapter folder on its base, or a merged export as the model) and ``gguf`` are answered
by ``adapters.serving.vllm_runtime.vllm_logprobs(base folder, adapter folder or None, prompt token ids,
top_k)`` and ``adapters.serving.gguf.gguf_logprobs(model or base GGUF, LoRA GGUF or None, prompt token
ids, top_k)`` (after ``export_gguf``), each giving one {token id: logprob} per prompt: those are compared
on the top-k and the top token (they give no greedy continuation).
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.config import RunConfig
from adapters.constants import ADAPTER_CONFIG, RUNTIMES
from adapters.data.loading import prepare_splits
from adapters.errors import AdapterkitError, ConfigError
from adapters.modeling.builtins import resolve_model
from adapters.modeling.generation import SamplingParams, encode_prompt
from adapters.modeling.portable import Loading, loading_of
from adapters.serving.engine import ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.serving.merge import merge_and_export
from adapters.serving.resolver import trained_model_config
from adapters.serving.standalone import StandaloneEngine, needs_own_model
from adapters.store.store import AdapterStore

# runtime -> (module, function) of the runtimes answered outside this module
EXTERNAL_RUNTIMES = {
    "vllm": ("adapters.serving.vllm_runtime", "vllm_logprobs"),
    "gguf": ("adapters.serving.gguf", "gguf_logprobs"),
}


@dataclass
class ParityRow:
    """One golden prompt: both runtimes' answers (greedy text or label), the largest probability
    difference and whether the greedy tokens / labels agree."""

    text: str
    engine: str
    runtime: str
    max_diff: float
    same_answer: bool
    passed: bool


@dataclass
class ParityReport:
    """All rows of one parity run; ``passed`` when every row passed."""

    ref: str
    runtime: str
    task: str
    tol: float
    rows: list[ParityRow] = field(default_factory=list)
    greedy_only: bool = False  # no probabilities to compare (adapterkit's prompt-learning generation)
    effect: float | None = None  # adapter_effect: how far the adapter moves the base (causal LM)

    @property
    def passed(self) -> bool:
        """Every row passed (and there was at least one)."""
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def max_diff(self) -> float:
        """The largest difference over all rows."""
        return max((r.max_diff for r in self.rows), default=0.0)

    def table(self) -> str:
        """The rows as a fixed-width text table, with a verdict line."""
        unit = "|dlogp|" if self.task == "causal-lm" else "|dp|"
        lines = [f"{'#':>3}  {'input':32}  {'adapterkit':20}  {self.runtime:20}  {'max' + unit:>12}  ok"]
        for i, r in enumerate(self.rows):
            lines.append(
                f"{i:>3}  {_cut(r.text, 32):32}  {_cut(r.engine, 20):20}  {_cut(r.runtime, 20):20}  "
                f"{r.max_diff:12.2e}  {'yes' if r.passed else 'NO'}"
            )
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(
            f"{verdict}: {sum(r.passed for r in self.rows)}/{len(self.rows)} rows within {self.tol:g} "
            f"(max {unit} {self.max_diff:.2e}) and with equal answers"
            + (" (greedy tokens only: adapterkit gives no logprobs for prompt learning)" if self.greedy_only else "")
        )
        if self.effect is not None:
            lines.append(f"adapter effect: it moves the base's top-k log-probabilities by up to {self.effect:.2e}")
        return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "~"


# ------------------------------------------------------------------ the golden set
def golden_texts(manifest: dict, limit: int = 8) -> list[str]:
    """The first `limit` input texts of the adapter's held-out test split (validation when the run had
    no test split), rebuilt from the run config in its manifest. Raises ConfigError when the manifest
    records no run config or its data cannot be loaded."""
    raw = manifest.get("training")
    try:
        cfg = RunConfig.model_validate(raw)
    except Exception as err:  # noqa: BLE001 - pydantic's error: the manifest holds no (current) run config
        raise ConfigError(
            "the adapter's manifest records no run config to rebuild its test split from "
            f"({type(err).__name__}); give the golden texts instead (--prompts FILE)"
        ) from None
    splits = prepare_splits(cfg).splits
    split = splits["test"] if "test" in splits and len(splits["test"]) else splits["validation"]
    return [str(t) for t in split[cfg.data.text_field][:limit]]


# ------------------------------------------------------------------ adapterkit's answers
def engine_for(ref: str, manifest: dict, base: str | None = None, store: Any = None) -> InferenceEngine:
    """adapterkit's engine for the artifact `ref`, on its base as trained (pooling, dtype, quantization from
    the manifest); a StandaloneEngine for a full/partial/head-only artifact."""
    base = base or (manifest.get("base_model") or {}).get("path") or (manifest.get("base_model") or {}).get("name")
    if not base:
        raise ConfigError(f"{ref!r} records no base model: pass base")
    task = manifest.get("task") or "causal-lm"
    if needs_own_model(ref, store):
        return StandaloneEngine(base, ref, task=task, capacity=1, store=store)
    return InferenceEngine(trained_model_config(base, manifest), task=task, capacity=1, store=store)


def engine_answers(
    engine: InferenceEngine, ref: str, texts: list[str], top_k: int = 5, max_new_tokens: int = 8
) -> list[dict]:
    """The engine's answer per text. causal-lm: {"prompt_ids", "top_logprobs": {id: logprob} of the first
    generated position ({} for a prompt-learning adapter), "tokens": greedy ids}; classification:
    {"probabilities": {label: p}, "label"}."""
    if engine.task == "sequence-classification":
        results = engine.classify([ClassificationRequest(ref, t) for t in texts])
        return [{"probabilities": r.probabilities, "label": r.label} for r in results]
    # Prompt-learning adapters generate through peft's generate, which the engine gives no logprobs for.
    greedy_only = engine.adapter_of(ref).is_prompt_learning
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, logprobs=None if greedy_only else top_k)
    results = engine.generate([GenerationRequest(adapter=ref, prompt=t, params=params) for t in texts])
    answers = []
    for r in results:
        top = r.logprobs.top[0] if r.logprobs and r.logprobs.top else []
        answers.append({"prompt_ids": r.prompt_ids, "top_logprobs": dict(top), "tokens": list(r.token_ids)})
    return answers


# ------------------------------------------------------------------ the plain runtimes
def load_plain(folder: Path, loading: Loading | None = None):
    """(model, tokenizer) loaded from `folder` the way its model card says, without adapterkit's loaders
    (only the import of an own peft tuner), in float32 as adapterkit serves. ConfigError for a folder
    no plain runtime loads (full/partial/head-only weights)."""
    # The plain runtimes are what is being checked: imported here, when a parity run needs them.
    import peft
    import transformers

    loading = loading or loading_of(folder)
    if loading.kind == "adapterkit":
        raise ConfigError(
            f"{folder} holds {loading.method} weights, which no plain runtime loads; "
            "compare a merged export (--runtime transformers)"
        )
    for module in loading.imports:
        importlib.import_module(module)
    auto_class = getattr(peft if loading.kind == "peft" else transformers, loading.auto_class)
    try:
        model = auto_class.from_pretrained(str(folder), dtype=torch.float32, **loading.kwargs).eval()
    except Exception as err:  # noqa: BLE001 - the runtime's own failure is the finding
        raise ConfigError(f"{loading.auto_class} cannot load {folder}: {type(err).__name__}: {err}") from err
    return model, transformers.AutoTokenizer.from_pretrained(str(folder))


@torch.inference_mode()
def plain_answers(
    model, tokenizer, texts: list[str], task: str, manifest: dict, top_k: int = 5, max_new_tokens: int = 8
) -> list[dict]:
    """The plain runtime's answer per text, in engine_answers' shape. Inputs are built with the folder's own
    tokenizer: a causal LM's prompts in the adapter's training format, a classifier's texts cut at its
    training max_length."""
    if task == "sequence-classification":
        limit = ((manifest.get("training") or {}).get("data") or {}).get("max_length") or 512
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        answers = []
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt")
            probs = torch.softmax(model(**enc).logits[0].float(), dim=-1)
            answers.append(
                {
                    "probabilities": {id2label[i]: float(p) for i, p in enumerate(probs)},
                    "label": id2label[int(torch.argmax(probs))],
                }
            )
        return answers
    stops = _stop_ids(model, tokenizer)
    answers = []
    for text in texts:
        ids = encode_prompt(tokenizer, text, None, manifest.get("prompt") or None, max_new_tokens)
        t = torch.tensor([ids])
        logprobs = torch.log_softmax(model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, -1].float(), -1)
        values, indices = torch.topk(logprobs, top_k)
        out = model.generate(
            input_ids=t,
            attention_mask=torch.ones_like(t),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        tokens = [int(x) for x in out[0, len(ids) :]]
        cut = next((i for i, x in enumerate(tokens) if x in stops), len(tokens))
        answers.append(
            {"prompt_ids": ids, "top_logprobs": dict(zip(indices.tolist(), values.tolist())), "tokens": tokens[:cut]}
        )
    return answers


def _stop_ids(model, tokenizer) -> set[int]:
    """The ids generation stops at: the generation config's eos_token_id(s) and the tokenizer's."""
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids.update([value] if isinstance(value, int) else list(value or []))
    return ids


# ------------------------------------------------------------------ comparing
def compare(
    ref: str, runtime: str, task: str, texts: list[str], ours: list[dict], theirs: list[dict], tol: float, decode=None
) -> ParityReport:
    """Row by row: the largest difference (causal-lm: of log-probabilities, over both sides' top-k at the
    first generated position, a token in one side's top-k only counting as differing from the other side's
    k-th at least; classifier: of class probabilities) and whether greedy tokens / labels agree.
    decode: token ids -> text."""
    report = ParityReport(ref, runtime, task, tol)
    for text, a, b in zip(texts, ours, theirs):
        if task == "sequence-classification":
            labels = set(a["probabilities"]) | set(b["probabilities"])
            diff = max(abs(a["probabilities"].get(k, 0.0) - b["probabilities"].get(k, 0.0)) for k in labels)
            same = a["label"] == b["label"]
            shown = (
                f"{a['label']} {a['probabilities'][a['label']]:.4f}",
                f"{b['label']} {b['probabilities'].get(b['label'], 0.0):.4f}",
            )
        else:
            # adapterkit gives no logprobs for a prompt-learning adapter: its greedy tokens are compared only
            diff = _top_k_diff(a["top_logprobs"], b["top_logprobs"]) if a["top_logprobs"] else 0.0
            report.greedy_only |= not a["top_logprobs"]
            same_prompt = "prompt_ids" not in b or list(a["prompt_ids"]) == list(b["prompt_ids"])  # tokenizers agree
            # Runtimes that give no greedy tokens (vLLM, GGUF parity) are compared on their top token.
            same = same_prompt and (_tokens(a) == _tokens(b) if "tokens" in b else _top1(a) == _top1(b))
            shown = tuple(repr(decode(_tokens(x))) if decode else str(_tokens(x)) for x in (a, b))
        report.rows.append(ParityRow(text, shown[0], shown[1], diff, same, same and diff <= tol))
    return report


def _top1(answer: dict) -> int | None:
    """The most likely token at the first generated position."""
    top = answer["top_logprobs"]
    return int(max(top, key=top.get)) if top else None


def _tokens(answer: dict) -> list[int]:
    """The greedy tokens, or just the top token for a runtime that gives none."""
    return list(answer["tokens"]) if "tokens" in answer else [t for t in [_top1(answer)] if t is not None]


def _top_k_diff(a: dict, b: dict) -> float:
    """Largest |logp_a - logp_b| over the tokens of both top-k dicts ({token id: logprob})."""
    if not a or not b:
        return math.inf
    pa = {int(k): float(v) for k, v in a.items()}
    pb = {int(k): float(v) for k, v in b.items()}
    floor_a, floor_b = min(pa.values()), min(pb.values())
    diffs = []
    for token in set(pa) | set(pb):
        if token in pa and token in pb:
            diffs.append(abs(pa[token] - pb[token]))
        elif token in pa:  # below b's k-th probability
            diffs.append(max(0.0, pa[token] - floor_b))
        else:
            diffs.append(max(0.0, pb[token] - floor_a))
    return max(diffs)


# ------------------------------------------------------------------ one parity run
def run_parity(
    ref: str,
    runtime: str,
    base: str | None = None,
    store: Any = None,
    artifact: str | None = None,
    texts: list[str] | None = None,
    limit: int = 8,
    tol: float = 1e-4,
    top_k: int = 5,
    max_new_tokens: int = 8,
) -> ParityReport:
    """Compare adapterkit's engine with `runtime` (one of RUNTIMES) on the golden set of adapter `ref`.

    artifact: the folder the runtime loads (an ``adapterkit export`` output); default: the adapter's own
    folder (peft), a merged export written to a temporary folder (transformers), or the adapter folder
    handed to the vLLM/GGUF runtime. texts: the golden texts (default: the run's test split, `limit` rows).
    Raises ConfigError for an unknown runtime, one that is not installed here, or an artifact it cannot
    load, and what resolving or loading the adapter raises.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    store = store if isinstance(store, AdapterStore) else AdapterStore(store)
    folder, manifest = store.resolve(ref, verify=True)
    manifest = manifest or {}
    if runtime in EXTERNAL_RUNTIMES and (manifest.get("task") or "causal-lm") != "causal-lm":
        raise ConfigError(f"runtime {runtime!r} runs causal LMs only; {ref!r} is a {manifest['task']} adapter")
    texts = list(texts) if texts is not None else golden_texts(manifest, limit)
    engine = engine_for(ref, manifest, base, store)
    ours = engine_answers(engine, ref, texts, top_k, max_new_tokens)
    effect = adapter_effect(engine, ours, top_k)
    base_name, tokenizer, task = engine.base_name, engine.tokenizer, engine.task
    del engine  # one model in memory at a time
    with tempfile.TemporaryDirectory(prefix="adapterkit-parity-") as tmp:
        if runtime in EXTERNAL_RUNTIMES:
            theirs = _external(
                runtime,
                str(ref),
                Path(folder),
                artifact,
                base_name,
                store,
                [a["prompt_ids"] for a in ours],
                top_k,
                Path(tmp),
            )
        else:
            where = Path(artifact) if artifact else Path(folder)
            if runtime == "transformers" and not artifact:
                where = Path(tmp) / "merged"
                merge_and_export(base_name, ref, where, store=store)
            model, plain_tokenizer = load_plain(where)
            theirs = plain_answers(model, plain_tokenizer, texts, task, manifest, top_k, max_new_tokens)
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if task == "causal-lm" else None
    report = compare(str(ref), runtime, task, texts, ours, theirs, tol, decode)
    report.effect = effect
    return report


def adapter_effect(engine: InferenceEngine, ours: list[dict], top_k: int = 5) -> float | None:
    """Causal LM: the largest difference the adapter makes to the bare base's top-k log-probabilities at the
    first generated position of the same prompt ids (engine_answers' ``ours``). A parity within tol says little about an
    adapter whose effect is below tol. None where it is not measured: a classifier (the base has no head),
    a standalone model, a prompt-learning adapter (no logprobs)."""
    if engine.task != "causal-lm" or isinstance(engine, StandaloneEngine) or not all(a["top_logprobs"] for a in ours):
        return None
    params = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=top_k)
    bare = engine.generate([GenerationRequest(prompt_ids=list(a["prompt_ids"]), params=params) for a in ours])
    return max(_top_k_diff(a["top_logprobs"], dict(r.logprobs.top[0])) for a, r in zip(ours, bare))


def _external(
    runtime: str,
    ref: str,
    folder: Path,
    artifact: str | None,
    base: str,
    store: AdapterStore,
    prompts: list[list[int]],
    top_k: int,
    workdir: Path,
) -> list[dict]:
    """The vLLM/GGUF runtime's top-k at each prompt's first generated position (adapters.serving.vllm_runtime /
    .gguf): vLLM serves the adapter folder (or ``artifact``) as a LoRA on the base, or a merged export given as
    ``artifact`` as the model itself; the GGUF runtime reads an export (``artifact``, else one written to
    ``workdir`` now). ConfigError when the runtime is not available here or fails."""
    module_name, function = EXTERNAL_RUNTIMES[runtime]
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, function)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"runtime {runtime!r} is not available here ({module_name}.{function}: {err})") from None
    try:
        if runtime == "vllm":
            served = Path(artifact or folder)
            if (served / "config.json").is_file() and not (served / ADAPTER_CONFIG).is_file():
                tops = fn(served, None, prompts, top_k)  # a merged export: vLLM serves it as the model itself
            else:
                tops = fn(resolve_model(base), served, prompts, top_k)
        else:
            out = Path(artifact) if artifact else module.export_gguf(ref, workdir / "gguf", store=store, base=base)
            files = json.loads((Path(out) / module.GGUF_INFO).read_text())["files"]
            lora = Path(out) / files["adapter"] if "adapter" in files else None
            tops = fn(Path(out) / files.get("model", files.get("base")), lora, prompts, top_k)
    except AdapterkitError:
        raise
    except Exception as err:  # noqa: BLE001 - the runtime's own failure, reported as such
        raise ConfigError(f"runtime {runtime!r} failed: {type(err).__name__}: {err}") from err
    return [{"top_logprobs": top} for top in tops]


def report_json(report: ParityReport) -> str:
    """The report as JSON (rows, passed, max_diff), e.g. for benchmarks/runtime_table.py."""
    return json.dumps(
        {
            "ref": report.ref,
            "runtime": report.runtime,
            "task": report.task,
            "tol": report.tol,
            "passed": report.passed,
            "max_diff": report.max_diff,
            "greedy_only": report.greedy_only,
            "effect": report.effect,
            "rows": [r.__dict__ for r in report.rows],
        },
        indent=2,
        default=str,
    )
