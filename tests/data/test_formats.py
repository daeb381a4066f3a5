"""Data formats: each is found from its columns (or data.format), normalized, and trains on a tiny model;
a file that matches none fails with one line naming its columns and the formats accepted. The rows are
real chatterbot-corpus conversations written out in each format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.config import load_config
from adapters.data.builtins import BUILTIN_DATASETS
from adapters.data.formats import detect_format, normalize_rows, preference_example
from adapters.data.loading import prepare_splits
from adapters.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def conversations() -> list[list[dict]]:
    """Distinct chatterbot conversations (real multi-turn chat), the longest first."""
    seen, out = set(), []
    for messages in BUILTIN_DATASETS["chatterbot"].load()["messages"]:
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            out.append(messages)
    return sorted(out, key=len, reverse=True)[:60]


def as_format(fmt: str, conversations: list[list[dict]]) -> list[dict]:
    """The conversations as rows of `fmt` (preference: the rejected reply is another conversation's)."""
    rows = []
    for k, messages in enumerate(conversations):
        first, reply = messages[0]["content"], messages[1]["content"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        other = conversations[(k + 7) % len(conversations)][1]["content"]
        rows.append(
            {
                "messages": {"messages": messages},
                "sharegpt": {
                    "conversations": [
                        {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in messages
                    ]
                },
                "alpaca": {"instruction": first, "input": "", "output": reply},
                "prompt-completion": {"prompt": first, "completion": reply},
                "prompt-completion-chat": {"prompt": messages[:last], "completion": [messages[last]]},
                "preference": {"prompt": first, "chosen": reply, "rejected": other},
                "preference-chat": {
                    "prompt": messages[:1],
                    "chosen": [messages[1]],
                    "rejected": [{"role": "assistant", "content": other}],
                },
                "text": {"text": first, "label": reply},
            }[fmt]
        )
    return rows


def write_rows(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_config(path, **data):
    return load_config(raw={"task": "causal-lm", "model": {"name": "unused"}, "data": {"name": str(path), **data}}).data


@pytest.mark.parametrize(
    "fmt, expected, conversational",
    [
        ("messages", "messages", True),
        ("sharegpt", "sharegpt", True),
        ("alpaca", "alpaca", False),
        ("prompt-completion", "prompt-completion", False),
        ("prompt-completion-chat", "prompt-completion", True),
        ("preference", "preference", False),
        ("preference-chat", "preference", True),
        ("text", "text", False),
    ],
)
def test_each_format_is_found_from_its_columns_and_normalized(tmp_path, conversations, fmt, expected, conversational):
    from datasets import Dataset

    rows = Dataset.from_list(as_format(fmt, conversations[:5]))
    data = data_config(write_rows(tmp_path, []))
    normalized = normalize_rows(rows, data, "causal-lm")
    assert (normalized.format, normalized.conversational) == (expected, conversational)
    out = normalized.rows
    assert {"text", "label"} <= set(out.column_names) and len(out) == 5
    if conversational:
        messages = out[0]["messages"]
        assert messages[-1]["role"] == "assistant" and out[0]["label"] == messages[-1]["content"]
        assert out[0]["text"].startswith(conversations[0][0]["content"])
    else:
        assert out[0]["text"] == conversations[0][0]["content"] and out[0]["label"] == conversations[0][1]["content"]
    if expected == "preference":
        assert {"prompt", "chosen", "rejected"} <= set(out.column_names)  # kept for the preference objectives


def test_configured_columns_and_format_win_over_detection(tmp_path, conversations):
    rows = as_format("prompt-completion", conversations[:3])
    data = data_config(write_rows(tmp_path, rows), text_field="prompt", response_field="completion")
    assert detect_format(["prompt", "completion"], data) == "text"  # named columns: today's format
    data = data_config(tmp_path / "x.jsonl", format="alpaca")
    with pytest.raises(ConfigError, match=r"data.format 'alpaca': .* has no column\(s\) instruction, output"):
        detect_format(["prompt", "completion"], data)


def test_a_file_matching_no_format_fails_with_one_clear_line(tmp_path):
    path = write_rows(tmp_path, [{"question": "What is AI?", "answer": "A field of science."}] * 4)
    cfg = load_config(raw={"task": "causal-lm", "model": {"name": "unused"}, "data": {"name": str(path)}})
    with pytest.raises(ConfigError) as err:
        prepare_splits(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "columns (question, answer) match no data format" in message
    for name in ("messages", "sharegpt", "alpaca", "prompt-completion", "preference", "text"):
        assert name in message
    with pytest.raises(ConfigError, match="data.format.*'messages'.*'sharegpt'"):
        load_config(raw={"task": "causal-lm", "model": {"name": "m"}, "data": {"name": "x", "format": "chatml"}})


def test_malformed_rows_name_the_row_and_what_is_wrong(tmp_path):
    from datasets import Dataset

    data = data_config(write_rows(tmp_path, []))
    bad_role = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}])
    with pytest.raises(ConfigError, match=r"row 1: messages\[1\] has role 'bot'; accepted: system, user"):
        normalize_rows(bad_role, data, "causal-lm")
    turns = [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]
    bad_speaker = Dataset.from_list([{"conversations": turns}])
    with pytest.raises(ConfigError, match=r"row 1: conversations\[1\] is from 'robot'; accepted: human"):
        normalize_rows(bad_speaker, data, "causal-lm")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat = Dataset.from_list([{"messages": messages}])
    with pytest.raises(ConfigError, match="needs task causal-lm"):
        normalize_rows(chat, data, "sequence-classification")


def test_conversations_without_an_assistant_turn_are_left_out(tmp_path):
    from datasets import Dataset

    rows = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"},
                ]
            },
            {"messages": [{"role": "user", "content": "anyone?"}]},
        ]
    )
    data = data_config(write_rows(tmp_path, []), system_prompt="Be kind.")
    out = normalize_rows(rows, data, "causal-lm").rows
    assert len(out) == 1
    assert [m["role"] for m in out[0]["messages"]] == ["system", "user", "assistant"]  # trailing user turn dropped


def test_preference_example_reads_plain_conversational_and_implicit_prompt_rows():
    plain = preference_example({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    assert plain.prompt == [{"role": "user", "content": "2+2?"}]
    assert plain.chosen == [{"role": "assistant", "content": "4"}] and plain.rejected[0]["content"] == "5"
    user = {"role": "user", "content": "2+2?"}
    implicit = preference_example(
        {
            "chosen": [user, {"role": "assistant", "content": "4"}],
            "rejected": [user, {"role": "assistant", "content": "5"}],
        }
    )
    assert implicit.prompt == [user] and implicit.chosen[0]["content"] == "4" and implicit.rejected[0]["content"] == "5"
    with pytest.raises(ConfigError, match="chosen holds no assistant turn"):
        preference_example({"prompt": "q", "chosen": [user], "rejected": "a"})


def test_chatterbot_splits_by_opening_line_without_leakage():
    cfg = load_config(raw={"task": "causal-lm", "model": {"name": "unused"}, "data": {"name": "chatterbot"}})
    prepared = prepare_splits(cfg)
    splits = prepared.splits
    assert sum(len(s) for s in splits.values()) < 2026  # exact repeats dropped
    openings = {name: set(split["opening"]) for name, split in splits.items()}
    assert not openings["train"] & openings["validation"] and not openings["train"] & openings["test"]
    assert not openings["validation"] & openings["test"]
    assert prepared.report.exact_duplicates["train/test"]["count"] == 0


@pytest.mark.parametrize(
    "fmt",
    [
        "messages",
        "sharegpt",
        "alpaca",
        "prompt-completion",
        "prompt-completion-chat",
        "preference",
        "preference-chat",
        "text",
    ],
)
def test_each_format_trains_on_a_tiny_model(tiny_llama_dir, tmp_path, conversations, fmt):
    from adapters.training.loop import train

    path = write_rows(tmp_path, as_format(fmt, conversations[:40]))
    cfg = load_config(
        raw={
            "task": "causal-lm",
            "model": {"name": str(tiny_llama_dir)},
            "data": {"name": str(path), "max_length": 64, "split": {"kind": "random", "validation": 0.2, "test": 0.2}},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"lr": 2e-2, "batch_size": 8, "max_steps": 4, "log_every": 1, "seed": 1},
            "eval": {"max_new_tokens": 2, "baseline": False},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    result = train(cfg)
    losses = [
        json.loads(line)["loss"]
        for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert result.metrics["adapted"]["loss"] > 0
