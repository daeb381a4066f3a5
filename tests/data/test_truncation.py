"""The truncation policy: over-long causal-lm rows keep the prompt's markup (the assistant header) and the
full response and lose the input text's start; the data report counts cut and dropped rows; serving
builds the same prompt ids as training for the same row."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from adapters.config import load_config
from adapters.data.loading import prepare_splits, tokenize_splits
from adapters.data.prompts import PromptFormat, build_prompt_ids, prompt_parts
from adapters.errors import ConfigError
from adapters.modeling.backbone import load_tokenizer
from adapters.modeling.generation import SamplingParams, encode_prompt
from adapters.serving.engine import GenerationRequest, _encode_prompts

SYSTEM, INSTRUCTION = "Answer with one color.", "Classify:"
LONG = "Please read this carefully. " * 12  # ~60 tokens: every long row overflows max_length 64


def rows(n: int = 40, long_every: int = 2, long_response_every: int = 0) -> list[dict]:
    """Distinct questions, every `long_every`-th one long; every `long_response_every`-th response long."""
    out = []
    for i in range(n):
        text = f"{LONG if i % long_every == 0 else ''}What color is thing number {i}?"
        response = "green" if i % 2 else "blue"
        if long_response_every and i % long_response_every == 0:
            response = " ".join(["green"] * 80)
        out.append({"text": text, "label": response})
    return out


def config(tmp_path: Path, model_dir: Path, data_rows: list[dict], **truncation):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data_rows))
    return load_config(
        raw={
            "task": "causal-lm",
            "model": {"name": str(model_dir)},
            "data": {
                "name": str(path),
                "max_length": 64,
                "system_prompt": SYSTEM,
                "instruction": INSTRUCTION,
                "split": {"kind": "random", "validation": 0.2, "test": 0.2},
                "truncation": truncation,
            },
            "eval": {"max_new_tokens": 4},
        }
    )


def tokenized(cfg):
    prepared = prepare_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    return prepared, tokenizer, tokenize_splits(prepared, cfg, tokenizer)


def answer_ids(tokenizer, target: str) -> list[int]:
    return tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_long_prompts_keep_the_assistant_header_and_the_full_response(smollm2_dir, tmp_path, caplog):
    cfg = config(tmp_path, smollm2_dir, rows())
    with caplog.at_level(logging.WARNING):
        prepared, tok, splits = tokenized(cfg)
    fmt = PromptFormat.from_data_config(cfg.data)
    cut = 0
    for raw_row, row in zip(prepared.splits["train"], splits["train"]):  # no row dropped: same order
        text = raw_row["text"]
        prompt_len = sum(1 for label in row["labels"] if label == -100)
        prompt, response = row["input_ids"][:prompt_len], row["input_ids"][prompt_len:]
        before, body, after = prompt_parts(tok, text, fmt)
        assert len(row["input_ids"]) <= cfg.data.max_length
        assert response == answer_ids(tok, raw_row["label"]), "the response is kept whole, EOS included"
        assert prompt[: len(before)] == before and prompt[len(prompt) - len(after) :] == after
        assert tok.decode(after).endswith("<|im_start|>assistant\n"), "the assistant header is kept"
        kept = prompt[len(before) : len(prompt) - len(after)]
        assert kept == body[len(body) - len(kept) :], "the text loses its start, keeps its end (prompt_side left)"
        cut += len(kept) < len(body)
        if len(kept) < len(body):
            assert tok.decode(kept).endswith(f"What color is thing number {text.split()[-1]}")
    counts = prepared.report.truncation
    assert counts["train"]["input_truncated"] == cut > 0
    n_long = sum(1 for split in prepared.splits.values() for t in split["text"] if t.startswith(LONG))
    assert sum(c["input_truncated"] for c in counts.values()) == n_long
    assert all(c["dropped"] == 0 and c["response_truncated"] == 0 for c in counts.values())
    warning = [r.getMessage() for r in caplog.records if "data.max_length=64" in r.getMessage()]
    assert len(warning) == 1 and "cut from the left" in warning[0]
    report = prepared.report.to_dict()
    assert report["truncation"]["train"]["rows"] == len(prepared.splits["train"])
    assert warning[0].removeprefix("data: ") in report["warnings"]
    assert "## Truncation (data.max_length=64)" in prepared.report.to_markdown()


def test_serving_builds_the_prompt_training_built_for_the_same_row(smollm2_dir, tmp_path):
    cfg = config(tmp_path, smollm2_dir, rows())
    prepared, tok, splits = tokenized(cfg)
    spec = PromptFormat.from_data_config(cfg.data).spec()  # what the manifest's "prompt" records
    for raw_row, row in zip(prepared.splits["test"], splits["test"]):
        prompt_len = sum(1 for label in row["labels"] if label == -100)
        answer = answer_ids(tok, raw_row["label"])
        # serving with the answer's length as its generation budget: training's prompt part exactly
        assert encode_prompt(tok, raw_row["text"], None, spec, len(answer)) == row["input_ids"][:prompt_len]
        # generation eval feeds what serving builds with eval.max_new_tokens
        assert encode_prompt(tok, raw_row["text"], None, spec, cfg.eval.max_new_tokens) == row["prompt_ids"]
        params = SamplingParams(max_new_tokens=len(answer))
        request = GenerationRequest(adapter="a", prompt=raw_row["text"], params=params)
        adapter = SimpleNamespace(manifest={"prompt": spec}, is_prompt_learning=False)
        assert _encode_prompts(tok, 4096, [request], [adapter]) == [row["input_ids"][:prompt_len]]
    assert any(
        len(p) < len(build_prompt_ids(tok, t, PromptFormat(SYSTEM, INSTRUCTION)))
        for p, t in zip(splits["test"]["prompt_ids"], prepared.splits["test"]["text"])
    ), "no test prompt was cut"
    # a manifest from before truncation was recorded: prompts are never cut
    old = {"system_prompt": SYSTEM, "instruction": INSTRUCTION}
    uncut = build_prompt_ids(tok, LONG * 3, PromptFormat(SYSTEM, INSTRUCTION))
    assert encode_prompt(tok, LONG * 3, None, old, 4) == uncut


def test_right_side_keeps_the_start_of_the_text(smollm2_dir, tmp_path):
    cfg = config(tmp_path, smollm2_dir, rows(), prompt_side="right")
    prepared, tok, splits = tokenized(cfg)
    fmt = PromptFormat.from_data_config(cfg.data)
    long_rows = [(r, t) for r, t in zip(splits["train"], prepared.splits["train"]["text"]) if t.startswith(LONG)]
    row, text = long_rows[0]
    before, body, after = prompt_parts(tok, text, fmt)
    prompt = row["input_ids"][: sum(1 for label in row["labels"] if label == -100)]
    kept = prompt[len(before) : len(prompt) - len(after)]
    assert 0 < len(kept) < len(body) and kept == body[: len(kept)]
    assert prompt[len(prompt) - len(after) :] == after


def test_long_responses_are_cut_at_their_end_or_dropped_and_counted(smollm2_dir, tmp_path):
    data = rows(long_response_every=5)
    (tmp_path / "cut").mkdir()
    cfg = config(tmp_path / "cut", smollm2_dir, data)
    prepared, tok, splits = tokenized(cfg)
    long_targets = [t for t in prepared.splits["train"]["label"] if len(t) > 100]
    assert prepared.report.truncation["train"]["response_truncated"] == len(long_targets) > 0
    for row in splits["train"]:
        assert len(row["input_ids"]) <= cfg.data.max_length
        if row["target"] in long_targets:
            response = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
            full = answer_ids(tok, row["target"])
            assert response == full[: len(response)] and len(response) < len(full), "cut at its end"
            assert tok.decode(row["input_ids"]).count("<|im_start|>assistant\n") == 1

    (tmp_path / "drop").mkdir()
    cfg = config(tmp_path / "drop", smollm2_dir, data, long_response="drop")
    prepared, tok, splits = tokenized(cfg)
    for name, counts in prepared.report.truncation.items():
        n_long = sum(1 for t in prepared.splits[name]["label"] if len(t) > 100)
        assert counts["dropped"] == n_long and counts["response_truncated"] == 0
        assert len(splits[name]) == len(prepared.splits[name]) - n_long
    assert sum(c["dropped"] for c in prepared.report.truncation.values()) == 8

    (tmp_path / "all").mkdir()
    cfg = config(tmp_path / "all", smollm2_dir, rows(long_response_every=1), long_response="drop")
    with pytest.raises(ConfigError, match=r"long_response.*'drop' left the train split empty.*data\.max_length=64"):
        tokenized(cfg)


def test_a_prompt_format_longer_than_max_length_is_refused(smollm2_dir, tmp_path):
    cfg = config(tmp_path, smollm2_dir, rows())
    cfg.data.system_prompt = "Be careful. " * 30
    with pytest.raises(ConfigError, match=r"data\.max_length=64 leaves no room for a response.*takes \d+ tokens"):
        tokenized(cfg)


def test_plain_and_slow_tokenizers_cut_inside_the_text_only(minilm_dir):
    from transformers import AutoTokenizer

    fmt = PromptFormat(system_prompt="Be brief.", instruction="Classify:", prompt_side="left")
    text = "alpha beta gamma delta " * 10 + "omega"
    fast = AutoTokenizer.from_pretrained(str(minilm_dir))

    class Slow:
        """The same vocabulary without character offsets (transformers 5 ships no slow BERT tokenizer)."""

        is_fast, chat_template = False, None
        decode = staticmethod(fast.decode)

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": fast(text, add_special_tokens=add_special_tokens)["input_ids"]}

    for tok in (fast, Slow()):
        assert not getattr(tok, "chat_template", None)
        before, body, after = prompt_parts(tok, text, fmt)
        full = build_prompt_ids(tok, text, fmt)
        assert before + body + after == full
        assert tok.decode(before).startswith("[CLS] be brief. classify") and tok.decode(after) == "answer : [SEP]"
        cut = build_prompt_ids(tok, text, fmt, max_tokens=20)
        assert len(cut) == 20 and cut[: len(before)] == before and cut[-len(after) :] == after
        assert tok.decode(cut[len(before) : -len(after)]).endswith("omega")


def test_classification_counts_cut_inputs_and_keeps_their_start(minilm_dir, tmp_path):
    path = tmp_path / "rows.jsonl"
    data = [{"text": f"{LONG if i % 3 == 0 else ''}item {i}", "label": "a" if i % 2 else "b"} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    cfg = load_config(
        raw={
            "task": "sequence-classification",
            "model": {"name": str(minilm_dir)},
            "data": {"name": str(path), "max_length": 16},
        }
    )
    prepared, tok, splits = tokenized(cfg)
    counts = prepared.report.truncation
    assert sum(c["input_truncated"] for c in counts.values()) == 10
    long_row = next(r for r, t in zip(splits["train"], prepared.splits["train"]["text"]) if t.startswith(LONG))
    assert len(long_row["input_ids"]) == 16 and tok.decode(long_row["input_ids"]).startswith("[CLS] please read")
