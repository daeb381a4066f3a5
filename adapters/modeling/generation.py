"""Batched text generation with per-row settings, and the prompt formats adapters were trained with.

One decoding loop serves a whole batch whose rows may use different adapters (peft's
``adapter_names``), different sampling settings, budgets and stop strings. Rows are
left-padded with position ids that skip the padding, so a row decodes to the same tokens in
a batch as alone. Finished rows leave the batch (and the KV cache) at once.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch

from adapters.errors import ConfigError

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class SamplingParams:
    """How one row is decoded. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past EOS (benchmarks: every row generates max_new_tokens)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]


@dataclass
class DecodedRow:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    # Geometric mean of the model's probability for each emitted token (temperature 1, before
    # sampling filters); None when nothing was emitted. What drift monitoring tracks for LLMs.
    confidence: float | None = None


def mean_token_confidence(logprob_sum: float, count: int) -> float | None:
    return math.exp(logprob_sum / count) if count else None


# ------------------------------------------------------------------ prompt formats
def format_prompt(tokenizer, text: str | None = None, messages: list[dict] | None = None, prompt_spec: dict | None = None) -> str:
    """The text the model sees (``encode_prompt`` gives its token ids).

    - ``messages`` (chat): rendered with the tokenizer's chat template; an adapter's
      system prompt is added when the conversation has none.
    - plain ``text`` for an adapter with a recorded prompt format (manifest ``prompt``, written
      by training): formatted exactly as training formatted its inputs (``adapters.data.loading``).
    - plain ``text`` otherwise (the base, or ``raw``): used as is.
    """
    if messages is not None:
        return _apply_chat_template(tokenizer, _with_system(messages, prompt_spec))
    if text is None:
        raise ConfigError("give a prompt (text) or messages")
    if prompt_spec is None:
        return text
    return tokenizer.decode(encode_prompt(tokenizer, text, None, prompt_spec))


def encode_prompt(tokenizer, text: str | None = None, messages: list[dict] | None = None, prompt_spec: dict | None = None) -> list[int]:
    """Token ids of the prompt (see ``format_prompt``)."""
    if messages is not None:
        # A rendered chat template holds its special tokens: add none (as apply_chat_template does).
        return tokenizer(format_prompt(tokenizer, None, messages, prompt_spec), add_special_tokens=False)["input_ids"]
    if text is None:
        raise ConfigError("give a prompt (text) or messages")
    if prompt_spec is None:
        return tokenizer(text)["input_ids"]
    from adapters.data.loading import build_prompt_ids

    fmt = SimpleNamespace(instruction=prompt_spec.get("instruction"), system_prompt=prompt_spec.get("system_prompt"))
    return list(build_prompt_ids(tokenizer, text, fmt))


def _with_system(messages: list[dict], prompt_spec: dict | None) -> list[dict]:
    if not messages:
        raise ConfigError("messages: give at least one message")
    msgs = [dict(m) for m in messages]
    system_prompt = (prompt_spec or {}).get("system_prompt")
    if system_prompt and msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _apply_chat_template(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("messages need a chat template, and this base model's tokenizer has none; send a plain prompt")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"messages[{i}] must have 'role' and 'content'")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------ decoding
def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _pick_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def decode_batch(
    forward: Callable[..., Any],
    tokenizer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    stop_token_ids: set[int],
    adapter_names: list[str] | None = None,
    device: torch.device | str = "cpu",
) -> list[DecodedRow]:
    """Decode every row of a left-padded batch with a KV cache.

    ``forward(**kwargs)`` is the (peft) model call; ``adapter_names`` (one per row) is passed
    to it when given, so one forward pass can serve rows of different adapters.
    """
    n = len(prompts)
    if n == 0:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_token_ids), 0)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError("empty prompt: nothing to continue from")
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = []
    for p in params:
        if p.temperature == 0:
            generators.append(None)
        else:
            g = torch.Generator(device="cpu")
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,))))
            generators.append(g)

    outputs: list[list[int]] = [[] for _ in range(n)]
    logprob_sums = [0.0] * n
    results: list[DecodedRow | None] = [None] * n
    live = list(range(n))  # original row index of each row still in the batch
    names = list(adapter_names) if adapter_names is not None else None
    extra = {"adapter_names": names} if names is not None else {}
    out = forward(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **extra)
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    next_pos = positions[:, -1:] + 1

    while True:
        next_tokens = []
        still = []
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for b, row in enumerate(live):
            p = params[row]
            token = _pick_next(logits[b], p, generators[row])
            finish = None
            if token in stop_token_ids and not p.ignore_eos:
                finish = FINISH_STOP
            else:
                outputs[row].append(token)
                logprob_sums[row] += float(logprobs[b, token])
                if p.stop:
                    text = tokenizer.decode(outputs[row], skip_special_tokens=True)
                    cut = min((text.find(s) for s in p.stop if s in text), default=-1)
                    if cut >= 0:
                        confidence = mean_token_confidence(logprob_sums[row], len(outputs[row]))
                        results[row] = DecodedRow(outputs[row], text[:cut], FINISH_STOP, confidence)
                        continue
                if len(outputs[row]) >= p.max_new_tokens:
                    finish = FINISH_LENGTH
            if finish is not None:
                text = tokenizer.decode(outputs[row], skip_special_tokens=True)
                results[row] = DecodedRow(outputs[row], text, finish, mean_token_confidence(logprob_sums[row], len(outputs[row])))
                continue
            still.append(b)
            next_tokens.append(token)
        if not still:
            break
        if len(still) < len(live):  # drop finished rows from the batch and the cache
            keep = torch.tensor(still, dtype=torch.long, device=mask.device)
            cache.batch_select_indices(keep)
            mask = mask[keep]
            next_pos = next_pos[keep]
            live = [live[b] for b in still]
            if names is not None:
                names = [names[b] for b in still]
                extra = {"adapter_names": names}
        step_ids = torch.tensor(next_tokens, dtype=torch.long, device=mask.device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = forward(
            input_ids=step_ids, attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return [r for r in results]  # type: ignore[misc]
