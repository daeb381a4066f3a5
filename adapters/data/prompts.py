"""The prompt format a causal LM is trained with, and served with (adapters.modeling.generation).

A prompt is three runs of token ids: the markup before the input text (chat-template system and
user headers, the instruction), the input text itself, and the markup after it (end of the user
turn, the assistant header, or the plain format's "\\nAnswer:"). When a prompt must fit fewer
tokens, only the input text is cut, from ``PromptFormat.prompt_side``: the markup, and so the
assistant header the answer follows, is always kept. Training (adapters.data.loading) and serving
cut with the same function.

Kept apart from adapters.data.loading so that serving formats prompts without loading ``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from adapters.config import DataConfig

# Stands in for the input text when the chat template is rendered, to find where the text goes.
_SLOT = "\ue000"


@dataclass(frozen=True)
class PromptFormat:
    """How an input text becomes a prompt, and how long a prompt may get.

    system_prompt, instruction: as ``data.system_prompt`` / ``data.instruction``. max_length:
    ``data.max_length``, the tokens of prompt + response a training row holds (None: never cut).
    prompt_side: "left" cuts the input text's start (keeps its end, next to the answer), "right" its end.
    """

    system_prompt: str | None = None
    instruction: str | None = None
    max_length: int | None = None
    prompt_side: Literal["left", "right"] = "left"

    @classmethod
    def from_data_config(cls, data: DataConfig) -> PromptFormat:
        """The causal-lm prompt format of a run's ``data`` section."""
        return cls(data.system_prompt, data.instruction, data.max_length, data.truncation.side("causal-lm"))

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PromptFormat:
        """The format recorded in an adapter's manifest (``prompt``). Manifests written before
        truncation was recorded have no max_length: their prompts are never cut."""
        return cls(
            spec.get("system_prompt"),
            spec.get("instruction"),
            spec.get("max_length"),
            spec.get("prompt_side") or "left",
        )

    def spec(self) -> dict[str, Any]:
        """The manifest's ``prompt`` entries for this format (from_spec reads them back)."""
        return {
            "system_prompt": self.system_prompt,
            "instruction": self.instruction,
            "max_length": self.max_length,
            "prompt_side": self.prompt_side,
        }


def prompt_budget(max_length: int, max_new_tokens: int | None) -> int:
    """Prompt tokens allowed at inference for an adapter trained on rows of `max_length` tokens.

    Training fits prompt + response into max_length; inference leaves max_new_tokens for the answer
    the same way. A generation budget above half of max_length does not squeeze the prompt below
    half of it (the input would be lost); None: the whole max_length.
    """
    if max_new_tokens is None:
        return max_length
    return max(max_length - max_new_tokens, max_length // 2)


def prompt_parts(tokenizer, text: str, fmt) -> tuple[list[int], list[int], list[int]]:
    """(markup before, input text, markup after) token ids; their concatenation is exactly the
    uncut prompt (build_prompt_ids). `fmt` needs ``instruction`` and ``system_prompt``.

    The text's span is found in the rendered prompt; with a fast tokenizer the ids are the whole
    prompt's, split by their character offsets (a token straddling the text's edge counts as
    markup); a slow tokenizer tokenizes the three pieces on their own. Where no clean edge exists
    (a template that rewrites the text), the whole prompt counts as text.
    """
    rendered, add_special = _render(tokenizer, text, fmt)
    start = _text_start(tokenizer, text, fmt, rendered)
    if start is None:  # a template that rewrites the text: no clean edge, all of it is cuttable
        return [], _encode(tokenizer, rendered, add_special), []
    end = start + len(text)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(rendered, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
        if not inside:
            return ids, [], []
        first, last = inside[0], inside[-1] + 1
        return ids[:first], ids[first:last], ids[last:]
    ids = _encode(tokenizer, rendered, add_special)
    before, body, after = (
        tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in (rendered[:start], text, rendered[end:])
    )
    core = before + body + after
    for k in range(len(ids) - len(core) + 1):  # the special tokens the tokenizer adds go around the core
        if ids[k : k + len(core)] == core:
            return ids[:k] + before, body, after + ids[k + len(core) :]
    return [], ids, []  # the pieces tokenize differently from the whole: no clean edge


def build_prompt_ids(tokenizer, text: str, fmt, max_tokens: int | None = None) -> list[int]:
    """Token ids of the prompt a causal LM sees for input `text`: the chat template (system prompt,
    then the instruction and text as the user turn, then the generation prompt) when the tokenizer
    has one, else plain text ending in "\\nAnswer:". `fmt`: a PromptFormat or anything with
    ``instruction`` and ``system_prompt`` (a DataConfig); ``prompt_side`` (default "left") says
    which end of the text to cut when the prompt is longer than `max_tokens` (None: never cut).

    Returns at most max(max_tokens, the markup's length) ids: only the text is cut.
    """
    rendered, add_special = _render(tokenizer, text, fmt)
    ids = _encode(tokenizer, rendered, add_special)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    return cut_prompt(prompt_parts(tokenizer, text, fmt), max_tokens, getattr(fmt, "prompt_side", "left"))


def cut_prompt(parts: tuple[list[int], list[int], list[int]], max_tokens: int, side: str) -> list[int]:
    """(before, text, after) ids -> before + the text cut to fit max_tokens from `side` + after.
    The markup is never cut, so the result is longer than max_tokens when the markup is."""
    before, body, after = parts
    room = max(0, max_tokens - len(before) - len(after))
    if len(body) > room:
        body = body[len(body) - room :] if side == "left" else body[:room]
    return before + body + after


def response_suffix_ids(tokenizer) -> list[int]:
    """Tokens that end a response: the end-of-turn/EOS token, so generation knows when to stop."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _user_content(text: str, fmt) -> str:
    return f"{fmt.instruction}\n{text}" if fmt.instruction else text


def _render(tokenizer, text: str, fmt) -> tuple[str, bool]:
    """The prompt as text, and whether tokenizing it adds the tokenizer's special tokens (the chat
    template holds its own)."""
    content = _user_content(text, fmt)
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if fmt.system_prompt:
            messages.append({"role": "system", "content": fmt.system_prompt})
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    prefix = f"{fmt.system_prompt}\n" if fmt.system_prompt else ""
    return f"{prefix}{content}\nAnswer:", True


def _encode(tokenizer, rendered: str, add_special: bool) -> list[int]:
    # apply_chat_template(tokenize=True) is this call on its rendered text: the ids are the same.
    ids = tokenizer(rendered, add_special_tokens=add_special)["input_ids"]
    return list(ids)


def _text_start(tokenizer, text: str, fmt, rendered: str) -> int | None:
    """Where `text` starts in `rendered`: found by rendering a placeholder in its place, so that
    a system prompt or instruction containing the same words cannot be mistaken for it."""
    if _SLOT in text:
        return None
    slotted, _ = _render(tokenizer, _SLOT, fmt)
    start = slotted.find(_SLOT)
    if start < 0 or slotted[:start] + text + slotted[start + 1 :] != rendered:
        return None
    return start
