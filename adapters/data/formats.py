"""Data formats: which kind of rows a data set holds, found from its columns or set with ``data.format``,
and their normalization into the two shapes training knows.

Formats (the names ``data.format`` takes):

- ``messages``: OpenAI-style chat, a column ``messages`` of [{role, content}] with roles system, user,
  assistant, tool;
- ``sharegpt``: a column ``conversations`` of [{from, value}] with from human, gpt, system, tool;
- ``alpaca``: columns ``instruction``, ``output`` and optionally ``input`` (Taori et al. 2023);
- ``prompt-completion``: columns ``prompt`` and ``completion``, plain strings or lists of messages;
- ``preference``: columns ``chosen`` and ``rejected`` (and ``prompt``), plain strings or lists of
  messages; without ``prompt``, the messages chosen and rejected share are the prompt (TRL's
  "implicit prompt");
- ``text``: today's single-turn rows, ``data.text_field`` and ``data.response_field`` /
  ``data.label_field``.

``auto`` (the default) takes ``text`` when the config names its columns (text_field, label_field or
response_field), else the first format whose columns the data has, in the order above, else ``text``
when its columns are there. The names and column conventions follow TRL's dataset formats.

Normalized rows always hold the config's text column (the prompt, or for a conversation all of its
turns: what dedupe, splits and the data report compare) and target column (the response, or the
conversation's last assistant turn). Single-turn formats stop there and train like ``text`` rows.
Conversational ones also hold ``messages`` ([{role, content}]) and ``context_turns`` (how many leading
messages are context only: a prompt-completion or preference prompt); their assistant turns are
trained (adapters.data.chat). Preference rows keep their ``prompt``, ``chosen`` and ``rejected`` columns
as they are, for the preference objectives (``preference_example`` reads them as messages).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from adapters.config import DataConfig, SplitConfig
from adapters.data.builtins import BUILTIN_DATASETS
from adapters.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}
MESSAGES, CONTEXT_TURNS = "messages", "context_turns"
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
# (format, the columns that identify it) in detection order: the most specific first.
_SIGNATURES = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("preference", ("chosen", "rejected")),
    ("alpaca", ("instruction", "output")),
    ("prompt-completion", ("prompt", "completion")),
)
_ACCEPTED = (
    "messages (messages: [{role, content}]), sharegpt (conversations: [{from, value}]), "
    "alpaca (instruction, input, output), prompt-completion (prompt, completion), "
    "preference (prompt, chosen, rejected), text (data.text_field + data.response_field or data.label_field)"
)
_KEEP = "__adapterkit_keep"  # per-row flag while normalizing: the conversation has an assistant turn to train


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair as messages: the prompt (system/user/... turns), and the chosen and the
    rejected continuation (assistant turns, possibly with tool turns in between)."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]


def target_column(data: DataConfig) -> str:
    """The column that holds a row's response (causal-lm) or label: response_field, else label_field."""
    return data.response_field or data.label_field


def detect_format(columns: list[str], data: DataConfig) -> str:
    """The format of a data set with `columns` under `data` (data.format unless "auto"; see the module doc).

    Raises ConfigError naming the columns found and the formats accepted when none matches, or the
    columns a configured format misses.
    """
    present = set(columns)
    if data.format != "auto":
        needed = _required_columns(data.format, data)
        missing = [c for c in needed if c not in present]
        if missing:
            raise ConfigError(
                f"data.format {data.format!r}: {data.name} has no column(s) {', '.join(missing)}; "
                f"columns found: {', '.join(columns)}"
            )
        return data.format
    if {"text_field", "label_field", "response_field"} & data.model_fields_set:
        return "text"
    for name, needed in _SIGNATURES:
        if present.issuperset(needed):
            return name
    if present.issuperset(_required_columns("text", data)):
        return "text"
    raise ConfigError(
        f"data.name {data.name}: its columns ({', '.join(columns)}) match no data format; "
        f"formats accepted: {_ACCEPTED}; or set data.format and the column names"
    )


def _required_columns(fmt: str, data: DataConfig) -> tuple[str, ...]:
    if fmt == "text":
        return (data.text_field, target_column(data))
    if fmt == "preference":
        return ("chosen", "rejected")
    return dict(_SIGNATURES)[fmt]


@dataclass
class NormalizedRows:
    """What normalize_rows made of a data set: the rows, their format, whether they are conversations,
    and the data section in effect (a built-in's own split when the config sets none)."""

    rows: Any  # datasets.Dataset
    format: str
    conversational: bool
    data: DataConfig


def normalize_rows(rows, data: DataConfig, task: str) -> NormalizedRows:
    """The rows of a data set in the shape training knows (see the module doc).

    rows: a datasets.Dataset as loaded. ``text`` rows come back untouched; other formats get the
    columns the module doc lists (columns a format reads are replaced, others kept). Conversations
    gain a first system message from data.system_prompt when they have none; turns after the last
    assistant turn are dropped (nothing follows them to learn), and so are rows without an assistant
    turn to train (logged). A built-in that declares its own split (chatterbot: by opening line)
    gets it unless data.split is set.

    Raises ConfigError for no matching format (see detect_format), a format other than ``text``
    under sequence-classification, a malformed row (its index, what is wrong), data.instruction on
    conversations, or normalized columns that would overwrite each other.
    """
    builtin = BUILTIN_DATASETS.get(data.name)
    if builtin is not None and builtin.split is not None and "split" not in data.model_fields_set:
        data = data.model_copy(update={"split": SplitConfig(**builtin.split)})
        log.info("data: %s is split by %s (its default; set data.split to change it)", data.name, builtin.split)
    fmt = detect_format(rows.column_names, data)
    if fmt == "text":
        return NormalizedRows(rows, fmt, False, data)
    if task != "causal-lm":
        raise ConfigError(f"data.format {fmt!r} holds chat or instruction data: it needs task causal-lm, not {task}")
    conversational = _is_conversational(rows, fmt)
    if fmt == "preference" and not conversational and "prompt" not in rows.column_names:
        raise ConfigError("plain-text preference rows need a 'prompt' column (only lists of messages can share one)")
    if conversational and data.instruction:
        raise ConfigError(
            "data.instruction applies to single-turn rows; for conversations put it in data.system_prompt "
            "or in the data's system messages"
        )
    text, target = data.text_field, target_column(data)
    read = [c for c in _read_columns(fmt) if c in rows.column_names]
    own = {MESSAGES, CONTEXT_TURNS, *read}
    if text == target or {text, target} & own:
        raise ConfigError(
            f"data.text_field {text!r} and the target column {target!r} must differ from each other and from "
            f"the columns format {fmt!r} reads or writes ({', '.join(sorted(own))})"
        )
    convert = _CONVERTERS[fmt]

    def normalize(batch, indices):
        out: dict[str, list] = {}
        for k, index in enumerate(indices):
            row = {column: values[k] for column, values in batch.items()}
            for key, value in convert(row, index, conversational, data).items():
                out.setdefault(key, []).append(value)
        return out

    # Preference columns stay as they are (the objectives read them); other formats' columns are replaced.
    drop = [] if fmt == "preference" else [c for c in read if c != MESSAGES]
    out = rows.map(normalize, batched=True, with_indices=True, remove_columns=drop, desc=f"reading {fmt} rows")
    if conversational:
        kept = out.filter(lambda r: r[_KEEP]).remove_columns(_KEEP)
        if len(kept) < len(out):
            log.warning(
                "data: %d of %d %s row(s) have no assistant turn to train and were left out",
                len(out) - len(kept),
                len(out),
                fmt,
            )
        out = kept
    return NormalizedRows(out, fmt, conversational, data)


def _read_columns(fmt: str) -> tuple[str, ...]:
    return {
        "messages": ("messages",),
        "sharegpt": ("conversations",),
        "alpaca": ("instruction", "input", "output"),
        "prompt-completion": ("prompt", "completion"),
        "preference": PREFERENCE_COLUMNS,
    }[fmt]


def _is_conversational(rows, fmt: str) -> bool:
    """Whether `rows` of `fmt` hold lists of messages (rather than plain strings): always for messages
    and sharegpt, never for alpaca; from the first row for prompt-completion and preference."""
    if fmt in ("messages", "sharegpt"):
        return True
    if fmt == "alpaca" or not len(rows):
        return False
    probe = "completion" if fmt == "prompt-completion" else "chosen"
    return isinstance(rows[0][probe], list)


# ---------------------------------------------------------------- converters: raw row -> normalized columns
def _conversation(messages: list[dict], context_turns: int, data: DataConfig) -> dict[str, Any]:
    """The normalized columns of one conversation (see normalize_rows)."""
    if data.system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": data.system_prompt}] + messages
        context_turns += 1
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    messages = messages[: last + 1]
    return {
        MESSAGES: messages,
        CONTEXT_TURNS: context_turns,
        data.text_field: "\n".join(m["content"] for m in messages),
        target_column(data): messages[last]["content"] if last >= 0 else "",
        _KEEP: last >= context_turns,
    }


def _from_messages(row: dict, index: int, conversational: bool, data: DataConfig) -> dict[str, Any]:
    return _conversation(to_messages(row["messages"], f"row {index}: messages"), 0, data)


def _from_sharegpt(row: dict, index: int, conversational: bool, data: DataConfig) -> dict[str, Any]:
    turns = row["conversations"]
    where = f"row {index}: conversations"
    if not isinstance(turns, list):
        raise ConfigError(f"{where} must be a list of {{from, value}}, got {type(turns).__name__}")
    messages = []
    for j, turn in enumerate(turns):
        speaker = str((turn or {}).get("from", "")).strip().lower()
        if speaker not in SHAREGPT_ROLES:
            raise ConfigError(f"{where}[{j}] is from {speaker!r}; accepted: {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _content(turn.get("value"), f"{where}[{j}]")})
    return _conversation(messages, 0, data)


def _from_alpaca(row: dict, index: int, conversational: bool, data: DataConfig) -> dict[str, Any]:
    instruction = _content(row["instruction"], f"row {index}: instruction")
    extra = _content(row.get("input"), f"row {index}: input")
    return {
        data.text_field: f"{instruction}\n\n{extra}" if extra else instruction,
        target_column(data): _content(row["output"], f"row {index}: output"),
    }


def _from_prompt_completion(row: dict, index: int, conversational: bool, data: DataConfig) -> dict[str, Any]:
    if not conversational:
        return {
            data.text_field: _content(row["prompt"], f"row {index}: prompt"),
            target_column(data): _content(row["completion"], f"row {index}: completion"),
        }
    prompt = to_messages(row["prompt"], f"row {index}: prompt")
    completion = to_messages(row["completion"], f"row {index}: completion")
    return _conversation(prompt + completion, len(prompt), data)


def _from_preference(row: dict, index: int, conversational: bool, data: DataConfig) -> dict[str, Any]:
    pair = preference_example(row, f"row {index}")
    if conversational:
        return _conversation(pair.prompt + pair.chosen, len(pair.prompt), data)
    return {
        data.text_field: pair.prompt[-1]["content"] if pair.prompt else "",
        target_column(data): pair.chosen[-1]["content"],
    }


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt-completion": _from_prompt_completion,
    "preference": _from_preference,
}


# ---------------------------------------------------------------- messages
def preference_example(row: dict, where: str = "row") -> PreferenceExample:
    """A preference row (``chosen``, ``rejected`` and optionally ``prompt``; plain strings or lists of
    messages, raw or normalized by normalize_rows) as a PreferenceExample.

    Plain strings become [{"role": "user", ...}] and [{"role": "assistant", ...}]. Without a prompt,
    the leading messages chosen and rejected share are the prompt. Raises ConfigError when a
    continuation is empty, holds no assistant turn, or a value is neither a string nor messages.
    """
    chosen = _continuation(row.get("chosen"), f"{where}: chosen")
    rejected = _continuation(row.get("rejected"), f"{where}: rejected")
    raw_prompt = row.get("prompt")
    if raw_prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif isinstance(raw_prompt, str):
        prompt = [{"role": "user", "content": raw_prompt}]
    else:
        prompt = to_messages(raw_prompt, f"{where}: prompt")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: {name} holds no assistant turn after the prompt")
    return PreferenceExample(prompt, chosen, rejected)


def _continuation(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = to_messages(value, where)
    if not messages:
        raise ConfigError(f"{where} is empty")
    return messages


def to_messages(value: Any, where: str) -> list[dict[str, str]]:
    """[{"role", "content"}] from a list of OpenAI-style messages; other keys (name, tool_calls, ...) are
    not kept. Content may be a string, None (empty) or a list of {"type": "text", "text"} parts.

    Raises ConfigError naming `where` and the message for a value that is not a list of messages,
    a role outside ROLES, or content of another kind.
    """
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise ConfigError(f"{where}[{j}] must be a {{role, content}} mapping, got {type(message).__name__}")
        role = str(message.get("role", "")).strip().lower()
        if role not in ROLES:
            raise ConfigError(f"{where}[{j}] has role {message.get('role')!r}; accepted: {', '.join(ROLES)}")
        messages.append({"role": role, "content": _content(message.get("content"), f"{where}[{j}]")})
    return messages


def _content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise ConfigError(f"{where}: content must be text, got {type(value).__name__}")
