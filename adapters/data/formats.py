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

Tool calls (OpenAI's shape): an assistant message's ``tool_calls`` ([{type: function, function: {name,
arguments}}], arguments a JSON object or a string holding one), a tool message's ``tool_call_id`` and
``name``, and a row's ``tools`` (function schemas: a list, or a JSON string of one) are kept. ShareGPT's
``function_call`` turns (a JSON {name, arguments}, or a list of them) become assistant tool calls and its
``observation`` turns tool messages, as LLaMA-Factory reads them. When a data set holds any, every
normalized message carries the keys ``tool_calls`` (arguments as JSON strings), ``tool_call_id`` and
``name`` (None when absent) and every row a ``tools`` JSON string ("" when none): Arrow needs one schema
for a column, and a schema built from differently shaped arguments would fill absent keys with null.
For the same reason null values inside arguments and schemas are dropped. adapters.data.chat turns them
back into what a chat template takes.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
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
    "function_call": "assistant",  # LLaMA-Factory: the assistant's tool call, a JSON {name, arguments}
    "observation": "tool",  # LLaMA-Factory: the tool's result
}
MESSAGES, CONTEXT_TURNS, TOOLS = "messages", "context_turns", "tools"
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")  # message keys kept for tool use
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
    turn to train or whose last one is empty (no text, no tool call; logged). A built-in that declares
    its own split (chatterbot: by opening line) gets it unless data.split is set.

    Raises ConfigError for no matching format (see detect_format), a format other than ``text``
    under sequence-classification, a malformed row (its number from 1, its line in a JSON-lines file,
    what is wrong), data.instruction on conversations, or normalized columns that would overwrite each other.
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
    tooled = conversational and _has_tool_use(rows, fmt)
    own = {MESSAGES, CONTEXT_TURNS, *read, *([TOOLS] if tooled else [])}
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
            try:
                converted = convert(row, index + 1, conversational, data)
                if tooled:  # one schema for every row (see the module doc)
                    converted[MESSAGES] = [{**m, **{k: m.get(k) for k in TOOL_KEYS}} for m in converted[MESSAGES]]
                    converted[TOOLS] = to_tools(row.get(TOOLS), f"row {index + 1}: tools")
            except ConfigError as err:
                raise ConfigError(_locate(str(err), index, data.name)) from None
            for key, value in converted.items():
                out.setdefault(key, []).append(value)
        return out

    # Preference columns stay as they are (the objectives read them); other formats' columns are replaced.
    drop = [] if fmt == "preference" else [c for c in read if c != MESSAGES]
    if tooled and TOOLS in rows.column_names:
        drop.append(TOOLS)
    out = rows.map(normalize, batched=True, with_indices=True, remove_columns=drop, desc=f"reading {fmt} rows")
    if conversational:
        kept = out.filter(lambda r: r[_KEEP]).remove_columns(_KEEP)
        if len(kept) < len(out):
            log.warning(
                "data: %d of %d %s row(s) have no assistant turn to train (or an empty one) and were left out",
                len(out) - len(kept),
                len(out),
                fmt,
            )
        out = kept
    return NormalizedRows(out, fmt, conversational, data)


def _locate(message: str, index: int, source: str) -> str:
    """`message` ("row <index + 1>: ...", rows counted from 1 as adapters.data.loading counts them)
    naming the data set, and for a JSON-lines file the line that holds the row."""
    label = f"row {index + 1}"
    line = _jsonl_line(source, index) if Path(source).suffix.lower() == ".jsonl" else None
    if line is not None and message.startswith(label):
        message = f"{label} (line {line}){message[len(label) :]}"
    return f"data.name: {source}: {message}"


def _jsonl_line(source: str, index: int) -> int | None:
    """The line number (from 1) of row `index` (from 0) of a JSON-lines file: its index-th non-blank
    line (the reader skips blank ones); None when the file cannot be read."""
    try:
        with open(Path(source).expanduser(), "rb") as fh:
            nonblank = (number for number, line in enumerate(fh, 1) if line.strip())
            return next(itertools.islice(nonblank, index, None), None)
    except OSError:
        return None


def _read_columns(fmt: str) -> tuple[str, ...]:
    return {
        "messages": ("messages",),
        "sharegpt": ("conversations",),
        "alpaca": ("instruction", "input", "output"),
        "prompt-completion": ("prompt", "completion"),
        "preference": PREFERENCE_COLUMNS,
    }[fmt]


def _has_tool_use(rows, fmt: str) -> bool:
    """Whether conversational `rows` of `fmt` hold any tool use: a ``tools`` column, a message with
    tool_calls or tool_call_id or a named tool message, a ShareGPT function_call or observation turn."""
    if TOOLS in rows.column_names:
        return True
    if fmt == "sharegpt":
        return any(
            isinstance(turn, dict) and str(turn.get("from", "")).strip().lower() in ("function_call", "observation")
            for turns in rows["conversations"]
            for turn in turns or []
        )
    return any(
        isinstance(m, dict)
        and (m.get("tool_calls") or m.get("tool_call_id") is not None or (m.get("role") == "tool" and m.get("name")))
        for column in _read_columns(fmt)
        if column in rows.column_names
        for value in rows[column]
        if isinstance(value, list)
        for m in value
    )


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
        data.text_field: "\n".join(message_text(m) for m in messages),
        target_column(data): message_text(messages[last]) if last >= 0 else "",
        # An empty last assistant turn (no text, no tool call) has nothing to learn: left out like a missing one.
        _KEEP: last >= context_turns and bool(message_text(messages[last]).strip()),
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
        if speaker == "function_call":
            calls = _json_value(turn.get("value"), f"{where}[{j}].value (a function_call)")
            calls = to_tool_calls([calls] if isinstance(calls, dict) else calls, f"{where}[{j}].value")
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
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


def to_messages(value: Any, where: str) -> list[dict[str, Any]]:
    """[{"role", "content"}] from a list of OpenAI-style messages, plus an assistant message's
    "tool_calls" (as to_tool_calls makes them) and a tool message's "tool_call_id" and "name" when
    present; other keys are not kept. Content may be a string, None (empty) or a list of
    {"type": "text", "text"} parts.

    Raises ConfigError naming `where` and the message for a value that is not a list of messages,
    a role outside ROLES, content of another kind, or malformed tool fields (to_tool_calls).
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
        out = {"role": role, "content": _content(message.get("content"), f"{where}[{j}]")}
        calls = message.get("tool_calls")
        if calls:
            if role != "assistant":
                raise ConfigError(f"{where}[{j}].tool_calls: only assistant messages make tool calls, not {role}")
            out["tool_calls"] = to_tool_calls(calls, f"{where}[{j}].tool_calls")
        for key in ("tool_call_id", "name") if role == "tool" else ():
            if message.get(key) is not None:
                if not isinstance(message[key], str):
                    raise ConfigError(f"{where}[{j}].{key} must be a string, got {type(message[key]).__name__}")
                out[key] = message[key]
        messages.append(out)
    return messages


def to_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls in one shape: [{"id", "type": "function", "function": {"name", "arguments"}}], id a
    string or None and arguments a JSON string of an object (see the module doc for why a string).

    value: OpenAI's [{id?, type: function, function: {name, arguments}}] or flat [{name, arguments}]
    (TRL's and LLaMA-Factory's); arguments a dict, a JSON string of one, or absent (no arguments);
    null values in them are dropped. Raises ConfigError naming `where` and the field for another shape.
    """
    shape = "a list of {type: function, function: {name, arguments}}"
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be {shape}, got {type(value).__name__}")
    calls = []
    for k, call in enumerate(value):
        here = f"{where}[{k}]"
        if not isinstance(call, dict):
            raise ConfigError(
                f"{here} must be {{type: function, function: {{name, arguments}}}}, got {type(call).__name__}"
            )
        if call.get("type", "function") != "function":
            raise ConfigError(f"{here}.type is {call['type']!r}; accepted: function")
        function = call
        if "function" in call:
            function, here = call["function"], f"{here}.function"
            if not isinstance(function, dict):
                raise ConfigError(f"{here} must be {{name, arguments}}, got {type(function).__name__}")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{here}.name must be the function's name (a non-empty string), got {name!r}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            arguments = _json_value(arguments, f"{here}.arguments") if arguments.strip() else {}
        if not isinstance(arguments, dict | None):
            raise ConfigError(f"{here}.arguments must be a JSON object, got {type(arguments).__name__}")
        call_id = call.get("id")
        calls.append(
            {
                "id": None if call_id is None else str(call_id),
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(_drop_nulls(arguments or {}), ensure_ascii=False)},
            }
        )
    return calls


def to_tools(value: Any, where: str) -> str:
    """A row's tool schemas as a JSON string of [{"type": "function", "function": {"name", ...}}] ("" for
    none). value: a list of such schemas or of bare function schemas ({name, description, parameters}),
    or a JSON string of one; null values are dropped. Raises ConfigError naming `where` for another shape."""
    if isinstance(value, str):
        value = _json_value(value, where) if value.strip() else None
    if not value:
        return ""
    if not isinstance(value, list):
        raise ConfigError(
            f"{where} must be a list of function schemas {{name, description, parameters}}, got {type(value).__name__}"
        )
    tools = []
    for k, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ConfigError(f"{where}[{k}] must be a function schema with a name ({{name, description, parameters}})")
        tools.append({"type": "function", "function": _drop_nulls(function)})
    return json.dumps(tools, ensure_ascii=False)


def tool_call_text(calls: list[dict[str, Any]]) -> str:
    """Tool calls (to_tool_calls' shape) as text, one per call: <tool_call>\n{"name", "arguments"}\n</tool_call>
    (the Hermes form that Qwen2.5's template renders and vLLM's `hermes` tool parser reads)."""
    return "\n".join(
        "<tool_call>\n"
        + json.dumps(
            {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}, ensure_ascii=False
        )
        + "\n</tool_call>"
        for c in calls
    )


def message_text(message: dict[str, Any]) -> str:
    """A message's text: its content, then its tool calls (tool_call_text) on the next line."""
    parts = [message["content"]] if message["content"] else []
    if message.get("tool_calls"):
        parts.append(tool_call_text(message["tool_calls"]))
    return "\n".join(parts)


def _json_value(text: Any, where: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where} is not valid JSON ({err.msg} at character {err.pos})") from None


def _drop_nulls(value: Any) -> Any:
    """`value` without null-valued keys in its mappings, at any depth (see the module doc)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise ConfigError(f"{where}: content must be text, got {type(value).__name__}")
