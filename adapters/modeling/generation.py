"""What a generated row is: its settings (SamplingParams), its result (DecodedRow, TokenLogprobs), the
prompt formats adapters were trained with, and the tokens that end it. adapters.modeling.decoding decodes.

Log-probabilities (``SamplingParams.logprobs`` / ``prompt_logprobs``) are the model's: log-softmax of
the logits at temperature 1 over the whole vocabulary, whatever the row's sampling settings, so they
equal a teacher-forced forward pass over prompt + output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adapters.data.prompts import PromptFormat, build_prompt_ids, prompt_budget
from adapters.errors import ConfigError

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
GREEDY_BELOW = 1e-5  # a temperature below this decodes greedily: dividing logits by it overflows float32
SEED_RANGE = (-(2**63), 2**64 - 1)  # torch.Generator.manual_seed's; a negative seed is taken mod 2**64


@dataclass
class SamplingParams:
    """How one row is decoded. temperature 0 means greedy, and so does any temperature below GREEDY_BELOW (it
    is set to 0); top_p < 1 is nucleus sampling (Holtzman et al. 2020). max_new_tokens 0 emits nothing (with
    prompt_logprobs: the prompt is only scored). ``logprobs`` k: record each emitted token's log-probability
    and the k most likely tokens at its position (decode_batch's TokenLogprobs); ``prompt_logprobs`` k: the
    same for each prompt token after the first.

    Raises ConfigError for max_new_tokens < 0, a negative temperature, top_p outside (0, 1], a seed outside
    SEED_RANGE, or a negative logprobs / prompt_logprobs.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past EOS (benchmarks: every row generates max_new_tokens)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (got {self.temperature})")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (got {self.seed})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (got {self.top_p})")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]


@dataclass
class TokenLogprobs:
    """Log-probabilities of a sequence's tokens: log-softmax of the logits at temperature 1 over the whole
    vocabulary. ``logprobs[i]`` is that of ``token_ids[i]`` given the tokens before it (None for a prompt's
    first token, which has nothing before it); ``top[i]``: the k most likely tokens at that position as
    (token id, log-probability), best first (None where ``logprobs[i]`` is None)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)

    def add(self, token: int, row_logprobs: torch.Tensor, k: int) -> float:
        """Append ``token`` scored by row_logprobs [vocab] with its top ``k``; returns its log-probability."""
        self.token_ids.append(token)
        self.logprobs.append(float(row_logprobs[token]))
        self.top.append(_top_k(row_logprobs.unsqueeze(0), k)[0])
        return self.logprobs[-1]


def _top_k(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """logprobs [positions, vocab] -> the k best (token id, log-probability) per position, best first."""
    if k == 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)  # [positions, k] each
    # torch.topk orders ties arbitrarily; list them lowest id first, so a greedy row's token (torch.argmax takes
    # the first maximum) comes first among equals, as clients expect of top_logprobs
    return [
        sorted(zip(row_ids, row_values), key=lambda pair: (-pair[1], pair[0]))
        for row_ids, row_values in zip(ids.tolist(), values.tolist())
    ]


def score_prompt(logits: torch.Tensor, prompt: list[int], k: int) -> TokenLogprobs:
    """TokenLogprobs of ``prompt`` from the logits [len(prompt), vocab] of a forward pass over it (position j
    predicts token j + 1), each with its top ``k``; the first token's entries are None."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [len(prompt) - 1, vocab]
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, targets).squeeze(1).tolist()
    return TokenLogprobs(list(prompt), [None, *chosen], [None, *_top_k(logprobs, k)])


@dataclass
class DecodedRow:
    """One decoded row: the emitted token ids (stop token excluded), their text and why decoding stopped,
    with the log-probabilities its SamplingParams asked for (else None)."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    # Geometric mean of the model's probability for each emitted token (temperature 1, before
    # sampling filters); None when nothing was emitted. What drift monitoring tracks for LLMs.
    confidence: float | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None


def mean_token_confidence(logprob_sum: float, count: int) -> float | None:
    """exp(mean log-probability) over `count` tokens, a probability in (0, 1]; None for no tokens."""
    return math.exp(logprob_sum / count) if count else None


# ------------------------------------------------------------------ prompt formats
def format_prompt(
    tokenizer, text: str | None = None, messages: list[dict] | None = None, prompt_spec: dict | None = None
) -> str:
    """The text the model sees (``encode_prompt`` gives its token ids).

    - ``messages`` (chat): rendered with the tokenizer's chat template; an adapter's
      system prompt is added when the conversation has none.
    - plain ``text`` for an adapter with a recorded prompt format (manifest ``prompt``, written
      by training): formatted exactly as training formatted its inputs (``adapters.data.prompts``).
    - plain ``text`` otherwise (the base, or ``raw``): used as is.

    Raises ConfigError without text or messages, for malformed messages, or for messages on a
    tokenizer without a chat template.
    """
    if messages is not None:
        return _apply_chat_template(tokenizer, _with_system(messages, prompt_spec))
    if text is None:
        raise ConfigError("give a prompt (text) or messages")
    if prompt_spec is None:
        return text
    return tokenizer.decode(encode_prompt(tokenizer, text, None, prompt_spec))


def encode_prompt(
    tokenizer,
    text: str | None = None,
    messages: list[dict] | None = None,
    prompt_spec: dict | None = None,
    max_new_tokens: int | None = None,
) -> list[int]:
    """Token ids of the prompt (see ``format_prompt``).

    Plain text in an adapter's format is cut as training cut its prompts (``adapters.data.prompts``):
    when the manifest records the training max_length, the input text loses the end training's
    prompt_side says until the prompt fits ``prompt_budget(max_length, max_new_tokens)`` tokens;
    the format's markup, the assistant header included, is never cut. Chat messages are never cut.
    """
    if messages is not None:
        # A rendered chat template holds its special tokens: add none (as apply_chat_template does).
        return tokenizer(format_prompt(tokenizer, None, messages, prompt_spec), add_special_tokens=False)["input_ids"]
    if text is None:
        raise ConfigError("give a prompt (text) or messages")
    if prompt_spec is None:
        return tokenizer(text)["input_ids"]
    fmt = PromptFormat.from_spec(prompt_spec)
    budget = prompt_budget(fmt.max_length, max_new_tokens) if fmt.max_length else None
    return build_prompt_ids(tokenizer, text, fmt, budget)


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
        raise ConfigError(
            "messages need a chat template, and this base model's tokenizer has none; send a plain prompt"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"messages[{i}] must have 'role' and 'content'")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------ end of sequence
def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end generation: the generation config's eos_token_id(s) and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
