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

Tool use (adapters.data.formats keeps it): an assistant turn's tool calls are part of its generated text,
so they are trained; tool results are tool turns, masked like user turns. Conversations go to the template
as transformers takes them: ``tool_calls`` as [{type: function, function: {name, arguments}}] with
arguments a dict (transformers' convention; TRL's and Axolotl's too) and the row's function schemas as
``apply_chat_template(tools=...)``. A template that does not render them (SmolLM2's, probed once per
template as TRL's ``supports_tool_calling`` does) would drop them without a word; they are then written
as text instead, said once in the log: each call as ``<tool_call>\n{"name", "arguments"}\n</tool_call>``
after the turn's content (the Hermes form, as Qwen2.5's template renders it), and the schemas in a
``<tools>`` block at the end of the system message (a system message is added when there is none).

Over-long conversations (``data.max_length``) follow the truncation policy of single-turn rows
(adapters.data.prompts): the oldest exchanges (a user turn and all that follows it until the next
one) are dropped first, system messages and the last exchange always kept; if the last exchange
alone is too long, the last user turn's text is cut from ``data.truncation.prompt_side`` and a
response longer than the room left is cut at its end or its row dropped (``long_response``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from adapters.config import DataConfig
from adapters.data.formats import TOOLS, message_text
from adapters.errors import ConfigError

log = logging.getLogger(__name__)

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Probe values for tool_support: strings no template writes by itself.
_PROBE_FUNCTION, _PROBE_KEY, _PROBE_VALUE, _PROBE_TOOL = "fn_a8f3e2b1", "key_b9d4f5c2", "val_d6e7a9f3", "tool_c4f9a8e2"
_TOOL_SUPPORT: dict[str, ToolSupport] = {}  # chat template -> what it renders
_NOTED: set[tuple[str, str]] = set()  # (chat template, what) already said in the log
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions. Their signatures, within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nReturn each call as a JSON object with the function's name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


@dataclass(frozen=True)
class ToolSupport:
    """What a chat template renders: an assistant message's tool_calls (`calls`), the tools list (`tools`)."""

    calls: bool
    tools: bool


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


def chat_template(tokenizer, tools: list[dict] | None = None) -> str:
    """The tokenizer's chat template (its "tool_use" one when it has several and `tools` are given).
    Raises ConfigError when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "conversational data (data.format messages, sharegpt, or lists of messages) needs a tokenizer with "
            f"a chat template; {model_label(tokenizer)} has none"
        )
    return tokenizer.get_chat_template(None, tools)


def tool_support(tokenizer) -> ToolSupport:
    """Whether the tokenizer's chat template renders tool calls and a tools list, found by rendering a
    probe call (name, argument key and value) and a probe schema and looking for them in the text, as
    TRL's ``supports_tool_calling`` does; a template that fails on them renders neither. Cached per template."""
    template = chat_template(tokenizer)
    if template not in _TOOL_SUPPORT:
        call = {"type": "function", "function": {"name": _PROBE_FUNCTION, "arguments": {_PROBE_KEY: _PROBE_VALUE}}}
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
        schema = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe", "parameters": {}}}
        with_call = _probe(tokenizer, messages, None)
        with_tools = _probe(tokenizer, messages[:1], [schema])
        _TOOL_SUPPORT[template] = ToolSupport(
            calls=all(s in with_call for s in (_PROBE_FUNCTION, _PROBE_KEY, _PROBE_VALUE)),
            tools=_PROBE_TOOL in with_tools,
        )
    return _TOOL_SUPPORT[template]


def _probe(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception:  # jinja raises whatever the template author chose: it renders none of it
        return ""


def template_conversation(
    tokenizer, messages: list[dict[str, Any]], tools: str | list[dict] | None = None, context_turns: int = 0
) -> tuple[list[dict[str, Any]], list[dict] | None, int]:
    """A conversation as the chat template takes it (see the module doc): (messages, the tools to pass
    to the template or None, context_turns, one more when a system message was added for the tools).

    messages: normalized by adapters.data.formats (tool_calls' arguments JSON strings or dicts; tool
    keys may be None). tools: function schemas, as a list or formats' JSON string ("" for none).
    A template that does not render tool calls or tools gets them as text (logged once per template).
    """
    schemas = json.loads(tools) if isinstance(tools, str) and tools else (tools or None)
    has_calls = any(m.get("tool_calls") for m in messages)
    support = tool_support(tokenizer) if has_calls or schemas else ToolSupport(True, True)
    out = []
    for m in messages:
        message = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls") and support.calls:
            message["tool_calls"] = [_template_call(c) for c in m["tool_calls"]]
        elif m.get("tool_calls"):
            message["content"] = message_text(m)
        message.update({k: m[k] for k in ("tool_call_id", "name") if m.get(k) is not None})
        out.append(message)
    if has_calls and not support.calls:
        _note_once(tokenizer, "tool calls", "trains each as <tool_call>\\n{name, arguments}\\n</tool_call> text")
    if schemas and not support.tools:
        _note_once(tokenizer, "a tools list", "puts the function schemas in a <tools> block of the system message")
        block = TOOLS_PREAMBLE + "\n".join(json.dumps(t, ensure_ascii=False) for t in schemas) + TOOLS_INSTRUCTIONS
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
            context_turns += 1
        schemas = None
    return out, schemas, context_turns


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call["function"]["arguments"]
    out = {"type": "function", "function": {"name": call["function"]["name"], "arguments": arguments}}
    if isinstance(arguments, str):
        out["function"]["arguments"] = json.loads(arguments) if arguments.strip() else {}
    if call.get("id"):
        out["id"] = call["id"]
    return out


def name_model(tokenizer, name: str) -> None:
    """Record on `tokenizer` the model's name as the user wrote it (``model.name``: a built-in, a
    GGUF path, ...), which the messages here use instead of its resolved (cache) folder."""
    tokenizer.adapterkit_model_name = name


def model_label(tokenizer) -> str:
    """The model's name for messages: what name_model recorded, else the tokenizer's own path."""
    return getattr(tokenizer, "adapterkit_model_name", None) or getattr(tokenizer, "name_or_path", None) or "the model"


def _note_once(tokenizer, what: str, instead: str) -> None:
    template = chat_template(tokenizer)
    if (template, what) not in _NOTED:
        _NOTED.add((template, what))
        log.warning(
            "data: the chat template of %s does not render %s; adapterkit %s (docs/data.md#tool-calls)",
            model_label(tokenizer),
            what,
            instead,
        )


def render_conversation(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> RenderedChat:
    """The conversation rendered with the tokenizer's chat template and the span of every assistant
    turn's generated text (see the module doc for the two ways they are found).

    messages: [{"role", "content", ...}] as the template takes them (template_conversation), with the
    function schemas `tools`. Raises ConfigError when the template fails on the conversation,
    marks fewer or more spans than there are assistant turns, or breaks the prefix property.
    """
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if has_generation_markers(tokenizer):
        rendered, indices = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=chat_template(tokenizer, tools),
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
    text = _render(tokenizer, messages, False, tools)
    spans = []
    for i in assistant:
        before = _render(tokenizer, messages[:i], True, tools)
        upto = _render(tokenizer, messages[: i + 1], False, tools)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ConfigError(
                f"the chat template of {model_label(tokenizer)} renders turn {i} "
                "differently once later turns follow (or its generation prompt does not start the assistant "
                "turn), so assistant turns cannot be found turn by turn; use a template with "
                "{% generation %} markers"
            )
        spans.append((len(before), len(upto), i))
    return RenderedChat(text, spans)


def _render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool, tools=None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja raises whatever the template author chose (TemplateError, ...)
        roles = "/".join(m["role"] for m in messages)
        raise ConfigError(f"the chat template failed on a conversation ({roles}): {type(err).__name__}: {err}") from err


def encode_conversation(
    tokenizer, messages: list[dict[str, Any]], trained: list[bool], tools: list[dict] | None = None
) -> EncodedChat:
    """Token ids and labels of one conversation (see the module doc); trained[i] says whether message i,
    if an assistant turn, carries loss; messages and tools as render_conversation takes them. Raises
    ConfigError as render_conversation, and when no assistant turn is trained."""
    rendered = render_conversation(tokenizer, messages, tools)
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
    tokenizer,
    messages: list[dict[str, Any]],
    context_turns: int,
    max_length: int,
    side: str,
    drop_long: bool,
    tools: str | list[dict] | None = None,
) -> FittedChat | None:
    """One conversation as training ids within `max_length` tokens (the policy in the module doc).

    messages: [{"role", "content"}] plus tool fields (adapters.data.formats), with the function schemas
    `tools` (a list or formats' JSON string); the assistant turns from index `context_turns` on are trained.
    side: "left" keeps the end of a cut user text, "right" its start. drop_long: a response longer than
    the room left drops the row (returns None) instead of being cut.
    Raises ConfigError when the markup of the last exchange alone fills max_length, or as
    encode_conversation.
    """
    messages, tools, context_turns = template_conversation(tokenizer, messages, tools, context_turns)
    trained = [m["role"] == "assistant" and i >= context_turns for i, m in enumerate(messages)]
    encoded = encode_conversation(tokenizer, messages, trained, tools)
    dropped = False
    if len(encoded.input_ids) > max_length:
        encoded, dropped = _drop_oldest_exchanges(tokenizer, messages, trained, max_length, encoded, tools)
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
    tokenizer, messages, trained, max_length: int, whole: EncodedChat, tools: list[dict] | None
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
        return encode_conversation(tokenizer, [messages[i] for i in keep], [trained[i] for i in keep], tools)

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
    """batch of normalized conversation rows (``messages``, ``context_turns``, the target column, and
    ``tools`` when the data holds tool use) ->
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
        tools = batch[TOOLS] if TOOLS in batch else [None] * len(batch["messages"])
        for messages, context, answer, schemas in zip(batch["messages"], batch["context_turns"], batch[target], tools):
            fitted = fit_conversation(tokenizer, messages, context, data.max_length, side, drop, schemas)
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
