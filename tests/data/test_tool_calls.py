"""Tool calls in conversations: an assistant turn's tool call is trained, a tool's result is masked like a
user turn, token by token, with a template that renders tool calls and tools (Qwen2.5's Hermes form) and
with SmolLM2's, which renders neither (the calls then become text, said once in the log). ShareGPT's
function_call / observation turns train the same tokens as OpenAI's shape; malformed tool fields fail in
one line naming the row and the field."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from adapters.data import chat
from adapters.data.chat import fit_conversation, has_generation_markers, tool_support
from adapters.data.formats import normalize_rows, to_messages, to_tools
from adapters.errors import ConfigError
from tests.data.test_chat import MARKED_TEMPLATE

SYSTEM = "You answer briefly."
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        # OpenAI's shape: arguments as a JSON string.
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {**CALL, "arguments": json.dumps(CALL["arguments"])}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 degrees, light rain"},
    {"role": "assistant", "content": "It is 18 degrees with light rain."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]
# A ChatML template that renders tools and tool calls as Qwen2.5's does (Hermes form), written plainly.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{% endif %}{{ '<tools>' }}{% for t in tools %}{{ '\n' }}{{ t | tojson }}"
    "{% endfor %}{{ '\n</tools><|im_end|>\n' }}{% elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' and loop.first %}"
    "{% elif m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}{% if m['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + c['function']['name'] + '\", \"arguments\": ' }}"
    "{{ c['function']['arguments'] | tojson }}{{ '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m['content'] }}"
    "{{ '\n</tool_response><|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TOOL_RESULT = "18 degrees, light rain"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def tool_tokenizer(tokenizer):
    tooled = copy.deepcopy(tokenizer)
    tooled.chat_template = TOOL_TEMPLATE
    return tooled


@pytest.fixture(autouse=True)
def fresh_log_notes(monkeypatch):
    monkeypatch.setattr(chat, "_NOTED", set())  # "said once" is per process: each test starts unsaid


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """ids and labels from (text, trained) pieces, each tokenized on its own."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def assert_token_by_token(tokenizer, fitted, pieces) -> None:
    ids, labels = expected(tokenizer, pieces)
    assert fitted.input_ids == ids, tokenizer.decode(fitted.input_ids)
    for k, (got, want) in enumerate(zip(fitted.labels, labels)):
        assert got == want, f"token {k} {tokenizer.decode([ids[k]])!r}: label {got}, expected {want}"
    assert len(fitted.labels) == len(labels)
    trained = tokenizer.decode([t for t in fitted.labels if t != -100])
    assert CALL_TEXT in trained and TOOL_RESULT not in trained


def test_a_template_that_renders_tools_trains_the_call_and_masks_the_result(tool_tokenizer, caplog):
    assert tool_support(tool_tokenizer) == chat.ToolSupport(calls=True, tools=True)
    messages = to_messages(CONVERSATION, "row 0: messages")
    with caplog.at_level(logging.WARNING, logger="adapters.data.chat"):
        fitted = fit_conversation(tool_tokenizer, messages, 0, 1024, "left", False, to_tools(TOOLS, "row 0: tools"))
    assert not caplog.records, "nothing to say: the template renders tool calls and tools itself"
    # The template got the calls (arguments as a dict) and the tools: its own tokenization of the row.
    as_dicts = copy.deepcopy(CONVERSATION)
    as_dicts[2]["tool_calls"][0]["function"]["arguments"] = CALL["arguments"]
    as_dicts[2]["content"] = ""
    own = tool_tokenizer.apply_chat_template(as_dicts, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    assert fitted.input_ids == list(own)
    schema = json.dumps(TOOLS[0], ensure_ascii=False)
    assert_token_by_token(
        tool_tokenizer,
        fitted,
        [
            (f"<|im_start|>system\n{SYSTEM}\n\n<tools>\n{schema}\n</tools><|im_end|>\n", False),
            ("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            (CALL_TEXT + "<|im_end|>", True),
            ("\n", False),
            (f"<|im_start|>user\n<tool_response>\n{TOOL_RESULT}\n</tool_response><|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("It is 18 degrees with light rain.<|im_end|>", True),
            ("\n", False),
        ],
    )


def test_a_template_without_tool_support_gets_them_as_text_said_once(tokenizer, caplog):
    assert not has_generation_markers(tokenizer)
    assert tool_support(tokenizer) == chat.ToolSupport(calls=False, tools=False), "SmolLM2's template renders neither"
    messages, tools = to_messages(CONVERSATION, "row 0: messages"), to_tools(TOOLS, "row 0: tools")
    with caplog.at_level(logging.WARNING, logger="adapters.data.chat"):
        fitted = fit_conversation(tokenizer, messages, 0, 1024, "left", False, tools)
        fit_conversation(tokenizer, messages, 0, 1024, "left", False, tools)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said  # once for the calls, once for the tools list, not once per conversation
    assert "does not render tool calls" in said[0] and "docs/data.md#tool-calls" in said[0]
    assert "does not render a tools list" in said[1]
    block = chat.TOOLS_PREAMBLE + json.dumps(TOOLS[0], ensure_ascii=False) + chat.TOOLS_INSTRUCTIONS
    assert_token_by_token(
        tokenizer,
        fitted,
        [
            (f"<|im_start|>system\n{SYSTEM}\n\n{block}<|im_end|>\n", False),
            ("<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            (CALL_TEXT + "<|im_end|>", True),
            ("\n", False),
            (f"<|im_start|>tool\n{TOOL_RESULT}<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("It is 18 degrees with light rain.<|im_end|>", True),
            ("\n", False),
        ],
    )
    # Without a system message the tools get one of their own, context only.
    no_system = fit_conversation(tokenizer, messages[1:], 0, 1024, "left", False, tools)
    assert tokenizer.decode(no_system.input_ids).startswith("<|im_start|>system\n# Tools")
    assert tokenizer.decode([t for t in no_system.labels if t != -100]) == tokenizer.decode(
        [t for t in fitted.labels if t != -100]
    )


def test_generation_markers_give_the_same_masks_as_turn_by_turn(tokenizer):
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = MARKED_TEMPLATE
    messages, tools = to_messages(CONVERSATION, "row 0: messages"), to_tools(TOOLS, "row 0: tools")
    by_markers = fit_conversation(marked, messages, 0, 1024, "left", False, tools)
    by_turns = fit_conversation(tokenizer, messages, 0, 1024, "left", False, tools)
    assert (by_markers.input_ids, by_markers.labels) == (by_turns.input_ids, by_turns.labels)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load_rows(path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def data_config(tmp_path):
    from adapters.config import load_config

    raw = {
        "task": "causal-lm",
        "model": {"name": "unused"},
        "data": {"name": str(tmp_path / "x.jsonl"), "max_length": 512},
    }
    return load_config(raw=raw).data


def sharegpt_row() -> dict:
    """CONVERSATION as LLaMA-Factory writes it: function_call and observation turns, tools as a JSON string."""
    return {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": CONVERSATION[1]["content"]},
            {"from": "function_call", "value": json.dumps(CALL)},
            {"from": "observation", "value": TOOL_RESULT},
            {"from": "gpt", "value": CONVERSATION[4]["content"]},
        ],
        "tools": json.dumps(TOOLS),
    }


@pytest.mark.parametrize("which", ["tool_tokenizer", "tokenizer"])
def test_files_in_openai_and_sharegpt_shape_train_the_same_tokens(tmp_path, request, which):
    tok = request.getfixturevalue(which)
    data = data_config(tmp_path)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    other_args = copy.deepcopy(CONVERSATION)  # arguments as a dict with other keys: nothing null may creep in
    other_args[2]["tool_calls"][0]["function"] = {"name": "get_time", "arguments": {"zone": "CET"}}
    openai_rows = [
        {"messages": CONVERSATION, "tools": TOOLS},
        {"messages": plain, "tools": []},
        {"messages": other_args, "tools": TOOLS},
    ]
    normalized = normalize_rows(load_rows(write_jsonl(tmp_path / "a.jsonl", openai_rows)), data, "causal-lm")
    row = normalized.rows[0]
    assert CALL_TEXT in row["text"] and row["label"] == CONVERSATION[4]["content"]
    assert row["messages"][2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(normalized.rows[2]["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"zone": "CET"}
    assert normalized.rows[1]["tools"] == "" and normalized.rows[1]["messages"][1]["tool_calls"] is None
    sharegpt = normalize_rows(load_rows(write_jsonl(tmp_path / "s.jsonl", [sharegpt_row()])), data, "causal-lm")
    encode = chat.chat_encoder(tok, data)
    a = encode(normalized.rows[:1])
    b = encode(sharegpt.rows[:1])
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    trained = tok.decode([t for t in a["labels"][0] if t != -100])
    assert CALL_TEXT in trained and TOOL_RESULT not in trained
    assert TOOL_RESULT in tok.decode(a["input_ids"][0])


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def bad_call(**function) -> dict:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{}", **function}}
    return {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]}


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": {"name": "f"}}]},
            r"row 2 \(line 2\): messages\[1\]\.tool_calls must be a list of \{type: function, .*\}, got dict",
        ),
        (
            bad_call(arguments='{city: "Paris"}'),
            r"row 2 \(line 2\): messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON",
        ),
        (
            bad_call(arguments="[1, 2]"),
            r"row 2 \(line 2\): messages\[1\]\.tool_calls\[0\]\.function\.arguments must be a JSON object, got list",
        ),
        (
            bad_call(name=""),
            r"row 2 \(line 2\): messages\[1\]\.tool_calls\[0\]\.function\.name must be the function's name",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi", "tool_calls": [{"name": "f"}]}, GOOD["messages"][1]]},
            r"row 2 \(line 2\): messages\[0\]\.tool_calls: only assistant messages make tool calls, not user",
        ),
        ({**GOOD, "tools": "[{name: f}]"}, r"row 2 \(line 2\): tools is not valid JSON"),
        (
            {**GOOD, "tools": '[{"description": "no name"}]'},
            r"row 2 \(line 2\): tools\[0\] must be a function schema with a name",
        ),
    ],
)
def test_a_malformed_tool_field_names_the_row_and_the_field(tmp_path, row, message):
    rows = load_rows(write_jsonl(tmp_path / "x.jsonl", [{**GOOD, "tools": ""}, {"tools": "", **row}]))
    with pytest.raises(ConfigError, match=message) as err:
        normalize_rows(rows, data_config(tmp_path), "causal-lm")
    assert "\n" not in str(err.value)


def test_a_malformed_sharegpt_function_call_names_the_row_and_the_turn(tmp_path):
    row = sharegpt_row()
    row["conversations"][2]["value"] = "get_weather(Paris)"
    rows = load_rows(write_jsonl(tmp_path / "x.jsonl", [row]))
    with pytest.raises(
        ConfigError, match=r"row 1 \(line 1\): conversations\[2\]\.value \(a function_call\) is not valid JSON"
    ):
        normalize_rows(rows, data_config(tmp_path), "causal-lm")


def test_tool_call_conversations_train_packed_on_a_tiny_model(tiny_llama_dir, tmp_path):
    from adapters.config import load_config
    from adapters.training.loop import train

    rows = []
    for k, city in enumerate(["Paris", "Oslo", "Lima", "Cairo", "Quito", "Seoul", "Perth", "Accra"] * 3):
        conversation = copy.deepcopy(CONVERSATION)
        conversation[1]["content"] = f"What is the weather in {city}? ({k})"
        conversation[2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": city})
        conversation[3]["content"] = f"{10 + k} degrees"
        conversation[4]["content"] = f"It is {10 + k} degrees in {city}."
        rows.append({"messages": conversation, "tools": TOOLS})
    cfg = load_config(
        raw={
            "task": "causal-lm",
            "model": {"name": str(tiny_llama_dir)},
            "data": {
                "name": str(write_jsonl(tmp_path / "tools.jsonl", rows)),
                "max_length": 640,  # two conversations of ~280 tokens (the tools block in the system message) per row
                "split": {"kind": "random", "validation": 0.2, "test": 0.2},
            },
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"lr": 2e-2, "batch_size": 2, "max_steps": 4, "log_every": 1, "seed": 1, "packing": True},
            "eval": {"max_new_tokens": 2, "baseline": False},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    result = train(cfg)
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    packing = next(r for r in logged if r.get("event") == "packing")
    assert packing["packed_rows"] < packing["rows"], packing


def test_row_errors_count_from_1_and_name_the_jsonl_line(tmp_path):
    """Rows count from 1, as adapters.data.loading counts them; the line differs when blank lines
    (which the JSON reader skips) come before the row."""
    path = tmp_path / "x.jsonl"
    bad = bad_call(arguments="[1, 2]")
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    rows = load_rows(path)
    assert len(rows) == 3
    with pytest.raises(ConfigError, match=r"x\.jsonl: row 3 \(line 4\): messages\[1\]\.tool_calls\[0\]") as err:
        normalize_rows(rows, data_config(tmp_path), "causal-lm")
    assert "\n" not in str(err.value)


def test_a_row_whose_last_assistant_turn_is_empty_is_left_out_and_counted(tmp_path, caplog):
    """`"content": null` without tool calls has nothing to train: left out and counted, like a row
    without an assistant turn (adapters.data.formats); a turn with a tool call alone is kept."""
    empty = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}
    blank = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}
    call_only = bad_call(arguments='{"city": "Paris"}')
    rows = load_rows(write_jsonl(tmp_path / "x.jsonl", [GOOD, empty, call_only, blank]))
    with caplog.at_level(logging.WARNING, logger="adapters.data.formats"):
        out = normalize_rows(rows, data_config(tmp_path), "causal-lm").rows
    assert len(out) == 2
    assert out[1]["messages"][-1]["tool_calls"][0]["function"]["name"] == "get_weather"
    said = [r.getMessage() for r in caplog.records]
    assert any("2 of 4 messages row(s) have no assistant turn to train (or an empty one)" in s for s in said), said


def test_the_fallback_note_names_the_model_as_written_not_its_cache_folder(tokenizer, caplog):
    tok = copy.deepcopy(tokenizer)
    assert "/" in tok.name_or_path  # the resolved folder
    chat.name_model(tok, "smollm2-135m-instruct")
    messages = to_messages(CONVERSATION, "row 1: messages")
    with caplog.at_level(logging.WARNING, logger="adapters.data.chat"):
        fit_conversation(tok, messages, 0, 1024, "left", False, None)
    said = [r.getMessage() for r in caplog.records]
    assert said and said[0].startswith("data: the chat template of smollm2-135m-instruct does not render"), said
    assert tok.name_or_path not in said[0]
