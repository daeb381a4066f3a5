"""Multi-turn chat rows: the loss covers every assistant turn and nothing else, with SmolLM2's real chat
template (no {% generation %} markers: rendered turn by turn) and with a marked one; over-long
conversations lose their oldest exchanges first; the data report counts what was cut."""

from __future__ import annotations

import copy

import pytest

from adapters.config import load_config
from adapters.data.chat import fit_conversation, has_generation_markers, render_conversation
from adapters.data.loading import prepare_splits, tokenize_splits
from adapters.errors import ConfigError

SYSTEM = "You answer in one short sentence."
THREE_TURNS = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is AI?"},
    {"role": "assistant", "content": "The science of making machines that think."},
    {"role": "user", "content": "Are you sentient?"},
    {"role": "assistant", "content": "Sort of."},
    {"role": "user", "content": "What language are you written in?"},
    {"role": "tool", "content": "lookup: python"},
    {"role": "assistant", "content": "Python."},
]
# SmolLM2's template with the assistant's text (and its end token) marked for generation.
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def expected_chatml(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """ids and labels built by hand from ChatML pieces: assistant text + <|im_end|> labelled, all else -100."""
    ids, labels = [], []

    def add(text: str, train: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if train else [-100] * len(piece))

    for m in messages:
        if m["role"] == "assistant":
            add("<|im_start|>assistant\n", False)
            add(m["content"] + "<|im_end|>", True)
            add("\n", False)
        else:
            add(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False)
    return ids, labels


def test_three_turn_conversation_trains_every_assistant_turn_and_nothing_else(tokenizer):
    assert not has_generation_markers(tokenizer), "SmolLM2's template has no generation markers"
    fitted = fit_conversation(tokenizer, THREE_TURNS, 0, 512, "left", False)
    whole = tokenizer.apply_chat_template(THREE_TURNS, tokenize=True, return_dict=True)["input_ids"]
    assert fitted.input_ids == list(whole), "the ids are the template's own tokenization"
    ids, labels = expected_chatml(tokenizer, THREE_TURNS)
    assert fitted.input_ids == ids
    for k, (got, want) in enumerate(zip(fitted.labels, labels)):
        assert got == want, f"token {k} {tokenizer.decode([ids[k]])!r}: label {got}, expected {want}"
    assert len(fitted.labels) == len(labels)
    runs, run = [], []
    for token, label in zip(fitted.input_ids, fitted.labels):
        if label != -100:
            run.append(token)
        elif run:
            runs, run = runs + [tokenizer.decode(run)], []
    assert runs == [m["content"] + "<|im_end|>" for m in THREE_TURNS if m["role"] == "assistant"]
    # The generation prompt is the conversation up to the last assistant header.
    assert tokenizer.decode(fitted.prompt_ids).endswith("lookup: python<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_with_generation_markers_gives_the_same_masks(tokenizer):
    marked = copy.deepcopy(tokenizer)
    marked.chat_template = MARKED_TEMPLATE
    assert has_generation_markers(marked)
    by_markers = fit_conversation(marked, THREE_TURNS, 0, 512, "left", False)
    by_turns = fit_conversation(tokenizer, THREE_TURNS, 0, 512, "left", False)
    assert by_markers.input_ids == by_turns.input_ids
    assert by_markers.labels == by_turns.labels
    assert by_markers.prompt_ids == by_turns.prompt_ids


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    rewriting = copy.deepcopy(tokenizer)
    # Like templates that strip reasoning from earlier answers: a turn renders differently once others follow.
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n(earlier)<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ConfigError, match=r"renders turn 2 differently.*\{% generation %\} markers"):
        render_conversation(rewriting, THREE_TURNS)


def test_assistant_turns_of_a_prompt_are_context_only(tokenizer):
    # A conversational prompt/completion row: the prompt's assistant turn is an example, not a target.
    fitted = fit_conversation(tokenizer, THREE_TURNS, context_turns=5, max_length=512, side="left", drop_long=False)
    trained = tokenizer.decode([t for t in fitted.labels if t != -100])
    assert trained == "Python.<|im_end|>"


def test_a_long_conversation_loses_its_oldest_exchanges_first(tokenizer):
    whole = fit_conversation(tokenizer, THREE_TURNS, 0, 512, "left", False)
    last_two = fit_conversation(tokenizer, [THREE_TURNS[0]] + THREE_TURNS[3:], 0, 512, "left", False)
    fitted = fit_conversation(tokenizer, THREE_TURNS, 0, len(last_two.input_ids), "left", False)
    assert len(fitted.input_ids) < len(whole.input_ids)
    assert fitted.input_ids == last_two.input_ids and fitted.labels == last_two.labels
    assert fitted.input_truncated and not fitted.response_truncated
    text = tokenizer.decode(fitted.input_ids)
    assert SYSTEM in text and "What is AI?" not in text and text.rstrip().endswith("Python.<|im_end|>")


def test_when_the_last_exchange_alone_is_too_long_its_user_text_is_cut(tokenizer):
    long_question = "Please consider every detail of this question. " * 8 + "Which language?"
    messages = [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Python."}]
    full = fit_conversation(tokenizer, messages, 0, 512, "left", False)
    fitted = fit_conversation(tokenizer, messages, 0, len(full.input_ids) - 20, "left", False)
    assert len(fitted.input_ids) == len(full.input_ids) - 20 and fitted.input_truncated
    text = tokenizer.decode(fitted.input_ids)
    assert "Which language?" in text and "<|im_start|>assistant\nPython.<|im_end|>" in text  # the end is kept
    assert tokenizer.decode([t for t in fitted.labels if t != -100]) == "Python.<|im_end|>"
    long_answer = [messages[0], {"role": "assistant", "content": "Python " * 200}]
    assert fit_conversation(tokenizer, long_answer, 0, 64, "left", drop_long=True) is None
    cut = fit_conversation(tokenizer, long_answer, 0, 64, "left", drop_long=False)
    assert len(cut.input_ids) <= 64 and cut.response_truncated
    with pytest.raises(ConfigError, match="leaves no room for a response"):
        fit_conversation(tokenizer, long_answer, 0, 8, "left", False)


def test_a_tokenizer_without_chat_template_is_a_clear_error(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        fit_conversation(plain, THREE_TURNS, 0, 512, "left", False)


def test_chatterbot_rows_tokenize_and_the_report_counts_truncation(tiny_llama_dir, tokenizer):
    cfg = load_config(
        raw={
            "task": "causal-lm",
            "model": {"name": str(tiny_llama_dir)},
            "data": {"name": "chatterbot", "max_length": 48},
        }
    )
    prepared = prepare_splits(cfg)
    assert prepared.conversational and prepared.format == "messages"
    tokenized = tokenize_splits(prepared, cfg, tokenizer)
    counts = prepared.report.truncation
    assert sum(c["input_truncated"] for c in counts.values()) > 0
    assert all(c["rows"] == len(prepared.splits[name]) for name, c in counts.items())
    row = tokenized["train"][0]
    assert len(row["input_ids"]) <= 48 and row["labels"][0] == -100
    assert any(label != -100 for label in row["labels"])
