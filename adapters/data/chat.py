"""Multi-turn chat rows -> token ids whose loss covers every assistant turn and nothing else.

A conversation is rendered with the model's chat template and the character span of each assistant
turn's generated text is found in the rendering, one of two ways:

- the template marks it with ``{% generation %}`` ... ``{% endgeneration %}``: transformers'
  renderer reports those spans (what ``return_assistant_tokens_mask`` uses);
- it does not (SmolLM2's template, most templates): turn by turn. For assistant turn i, the rendering
  of messages[:i] with the generation prompt (up to the assistant header) and that of messages[:i+1]
  must both be prefixes of the whole conversation's rendering; the text between them is the turn.
  A template that renders earlier turns differently once later ones follow fails this with a clear
  error instead of training on misplaced masks.

The rendering is tokenized piece by piece, cut at those spans' edges, so no token straddles an edge.
Assistant tokens are labels up to and including the last end-of-sequence token of the turn (the
newline a template puts after it is markup); system, user and tool turns, headers, and assistant
turns of a prompt (``context_turns``) are -100.

Over-long conversations (``data.max_length``) follow the truncation policy of single-turn rows
(adapters.data.prompts): the oldest exchanges (a user turn and all that follows it until the next
one) are dropped first, system messages and the last exchange always kept; if the last exchange
alone is too long, the last user turn's text is cut from ``data.truncation.prompt_side`` and a
response longer than the room left is cut at its end or its row dropped (``long_response``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers.utils.chat_template_utils import render_jinja_template

from adapters.config import DataConfig
from adapters.errors import ConfigError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class RenderedChat:
    """A conversation rendered by the chat template: its text and, for each assistant turn, the
    (start, end) character span of its generated text with the turn's message index."""

    text: str
    spans: list[tuple[int, int, int]]


@dataclass
class EncodedChat:
    """Token ids of a conversation, labels (-100 off the trained assistant turns), and the token ranges
    the truncation policy works on: `cut`, the last user turn's text (may be empty), and `response`,
    the last trained assistant turn's labelled tokens; `prompt_end` is where that turn's text starts
    (the tokens before it are the prompt a generation continues)."""

    input_ids: list[int]
    labels: list[int]
    cut: tuple[int, int]
    response: tuple[int, int]
    prompt_end: int


@dataclass
class FittedChat:
    """A conversation fitted to data.max_length: ids, labels, the generation prompt's ids, and what the
    policy removed: `input_truncated` (older exchanges dropped or the last user text cut),
    `response_truncated` (the last response cut at its end)."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    input_truncated: bool
    response_truncated: bool


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant text with {% generation %}."""
    return bool(GENERATION_TAG.search(chat_template(tokenizer)))


def chat_template(tokenizer) -> str:
    """The tokenizer's (default) chat template. Raises ConfigError when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "conversational data (data.format messages, sharegpt, or lists of messages) needs a tokenizer with "
            f"a chat template; {getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none"
        )
    return tokenizer.get_chat_template()


def render_conversation(tokenizer, messages: list[dict[str, str]]) -> RenderedChat:
    """The conversation rendered with the tokenizer's chat template and the span of every assistant
    turn's generated text (see the module doc for the two ways they are found).

    messages: [{"role", "content"}]. Raises ConfigError when the template fails on the conversation,
    marks fewer or more spans than there are assistant turns, or breaks the prefix property.
    """
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if has_generation_markers(tokenizer):
        rendered, indices = render_jinja_template(
            conversations=[messages],
            chat_template=chat_template(tokenizer),
            return_assistant_tokens_mask=True,
            **tokenizer.special_tokens_map,
        )
        spans = indices[0]
        if len(spans) != len(assistant):
            raise ConfigError(
                f"the chat template marks {len(spans)} {{% generation %}} span(s) in a conversation with "
                f"{len(assistant)} assistant turn(s); the assistant-only loss needs one per assistant turn"
            )
        return RenderedChat(rendered[0], [(a, b, i) for (a, b), i in zip(spans, assistant)])
    text = _render(tokenizer, messages, False)
    spans = []
    for i in assistant:
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ConfigError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', 'the model')} renders turn {i} "
                "differently once later turns follow (or its generation prompt does not start the assistant "
                "turn), so assistant turns cannot be found turn by turn; use a template with "
                "{% generation %} markers"
            )
        spans.append((len(before), len(upto), i))
    return RenderedChat(text, spans)


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises whatever the template author chose (TemplateError, ...)
        roles = "/".join(m["role"] for m in messages)
        raise ConfigError(f"the chat template failed on a conversation ({roles}): {type(err).__name__}: {err}") from err


def encode_conversation(tokenizer, messages: list[dict[str, str]], trained: list[bool]) -> EncodedChat:
    """Token ids and labels of one conversation (see the module doc); trained[i] says whether message i,
    if an assistant turn, carries loss. Raises ConfigError as render_conversation, and when no
    assistant turn is trained."""
    rendered = render_conversation(tokenizer, messages)
    spans = [(a, b, i) for a, b, i in rendered.spans if trained[i]]
    if not spans:
        raise ConfigError("a conversation has no assistant turn to train")
    final_start, final_end, final = spans[-1]
    cut = _last_user_text(rendered, messages, final, final_start)
    edges = sorted({0, len(rendered.text), *cut, *(e for a, b, _ in spans for e in (a, b))})
    labelled = {(a, b) for a, b, _ in spans}
    ids, labels, starts = [], [], {}
    eos = tokenizer.eos_token_id
    for a, b in zip(edges, edges[1:]):
        starts[a] = len(ids)
        piece = tokenizer(rendered.text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        if (a, b) in labelled:
            # Up to the turn's end-of-sequence token: what follows it (a newline) is template markup.
            end = max((k for k, t in enumerate(piece) if t == eos), default=len(piece) - 1) + 1
            labels += piece[:end] + [-100] * (len(piece) - end)
        else:
            labels += [-100] * len(piece)
    starts[len(rendered.text)] = len(ids)
    response_end = max((k + 1 for k, t in enumerate(labels) if t != -100), default=starts[final_start])
    return EncodedChat(
        ids, labels, (starts[cut[0]], starts[cut[1]]), (starts[final_start], response_end), starts[final_start]
    )


def _last_user_text(rendered: RenderedChat, messages: list[dict[str, str]], final: int, final_start: int):
    """(start, end) characters of the last user turn's text before message `final`, found between the
    assistant turns around it; (final_start, final_start) when there is none."""
    user = next((i for i in range(final - 1, -1, -1) if messages[i]["role"] == "user"), None)
    if user is None or not messages[user]["content"]:
        return final_start, final_start
    floor = max((b for a, b, i in rendered.spans if i < user), default=0)
    ceiling = min(a for a, b, i in rendered.spans if i > user)  # message `final` is one of them
    at = rendered.text.rfind(messages[user]["content"], floor, ceiling)
    if at < 0:  # a template that rewrites the text: nothing to cut
        return final_start, final_start
    return at, at + len(messages[user]["content"])


def fit_conversation(
    tokenizer, messages: list[dict[str, str]], context_turns: int, max_length: int, side: str, drop_long: bool
) -> FittedChat | None:
    """One conversation as training ids within `max_length` tokens (the policy in the module doc).

    messages: [{"role", "content"}]; the assistant turns from index `context_turns` on are trained.
    side: "left" keeps the end of a cut user text, "right" its start. drop_long: a response longer than
    the room left drops the row (returns None) instead of being cut.
    Raises ConfigError when the markup of the last exchange alone fills max_length, or as
    encode_conversation.
    """
    trained = [m["role"] == "assistant" and i >= context_turns for i, m in enumerate(messages)]
    encoded = encode_conversation(tokenizer, messages, trained)
    dropped = False
    if len(encoded.input_ids) > max_length:
        encoded, dropped = _drop_oldest_exchanges(tokenizer, messages, trained, max_length, encoded)
    ids, labels = encoded.input_ids, encoded.labels
    if len(ids) <= max_length:
        return FittedChat(ids, labels, ids[: encoded.prompt_end], dropped, False)
    (c0, c1), (r0, r1) = encoded.cut, encoded.response
    room = max_length - (len(ids) - (c1 - c0) - (r1 - r0))  # for the user text and the response
    if room < 1:
        raise ConfigError(
            f"data.max_length={max_length} leaves no room for a response: the chat markup of a conversation's "
            f"last exchange (system messages, headers) alone takes {max_length - room} tokens; raise data.max_length"
        )
    if r1 - r0 > room and drop_long:
        return None
    keep_response = min(r1 - r0, room)
    keep_text = min(c1 - c0, room - keep_response)
    text = slice(c1 - keep_text, c1) if side == "left" else slice(c0, c0 + keep_text)

    def fit(seq: list[int]) -> list[int]:
        return seq[:c0] + seq[text] + seq[c1 : r0 + keep_response] + seq[r1:]

    prompt_end = encoded.prompt_end - (c1 - c0 - keep_text)
    ids = fit(ids)
    return FittedChat(ids, fit(labels), ids[:prompt_end], dropped or keep_text < c1 - c0, keep_response < r1 - r0)


def _drop_oldest_exchanges(
    tokenizer, messages, trained, max_length: int, whole: EncodedChat
) -> tuple[EncodedChat, bool]:
    """The encoding with the fewest oldest exchanges dropped that fits max_length (binary search: fewer
    turns never render longer), or the last exchange alone when none fits; and whether any was dropped.
    whole: the encoding of all of `messages` (returned when there is a single exchange)."""
    system = 0
    while system < len(messages) and messages[system]["role"] == "system":
        system += 1
    final = max(i for i, t in enumerate(trained) if t)
    last_user = max((i for i in range(system, final) if messages[i]["role"] == "user"), default=system)
    starts = [system] + [i for i in range(system + 1, last_user + 1) if messages[i]["role"] == "user"]
    if len(starts) == 1:
        return whole, False

    def encode_from(k: int) -> EncodedChat:
        keep = list(range(system)) + list(range(starts[k], len(messages)))
        return encode_conversation(tokenizer, [messages[i] for i in keep], [trained[i] for i in keep])

    lo, hi, best = 1, len(starts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        encoded = encode_from(mid)
        if len(encoded.input_ids) <= max_length:
            best, hi = encoded, mid - 1
        else:
            lo = mid + 1
    return best if best is not None else encode_from(len(starts) - 1), True


def chat_encoder(tokenizer, data: DataConfig):
    """batch of normalized conversation rows (``messages``, ``context_turns``, the target column) ->
    the columns the causal-lm encoder makes: input_ids, attention_mask, labels, length, prompt_ids
    (the conversation up to the last trained assistant turn's text: what generation eval continues),
    target (that turn's text), input_truncated, response_truncated. Rows dropped under
    long_response "drop" are left out. Raises ConfigError as fit_conversation and chat_template."""
    chat_template(tokenizer)
    side = data.truncation.side("causal-lm")
    drop = data.truncation.long_response == "drop"
    target = data.response_field or data.label_field

    def encode(batch):
        out = {
            key: []
            for key in (
                "input_ids",
                "attention_mask",
                "labels",
                "length",
                "prompt_ids",
                "target",
                "input_truncated",
                "response_truncated",
            )
        }
        for messages, context, answer in zip(batch["messages"], batch["context_turns"], batch[target]):
            fitted = fit_conversation(tokenizer, messages, context, data.max_length, side, drop)
            if fitted is None:
                continue
            out["input_ids"].append(fitted.input_ids)
            out["attention_mask"].append([1] * len(fitted.input_ids))
            out["labels"].append(fitted.labels)
            out["length"].append(len(fitted.input_ids))
            out["prompt_ids"].append(fitted.prompt_ids)
            out["target"].append(answer)
            out["input_truncated"].append(fitted.input_truncated)
            out["response_truncated"].append(fitted.response_truncated)
        return out

    return encode
