"""Held-out generation: the answers and confidences a run records match what the server computes."""

from __future__ import annotations

import pytest
import torch

from adapters.config import ModelConfig
from adapters.evaluation.evaluator import first_line_answer, generate_scored_answers
from adapters.modeling.backbone import load_backbone, load_tokenizer
from adapters.modeling.decoding import decode_batch
from adapters.modeling.generation import SamplingParams, eos_ids


def test_scored_answers_equal_the_servers_decoding(tiny_llama_dir, one_torch_thread):
    cfg = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_backbone(cfg, "causal-lm").eval()
    prompts = [
        tokenizer(t)["input_ids"]
        for t in ("Where is the Eiffel tower?", "How many legs", "Who wrote Hamlet, and when was it first staged?")
    ]
    answers, confidences = generate_scored_answers(model, tokenizer, prompts, "cpu", batch_size=2, max_new_tokens=5)
    for ids, answer, confidence in zip(prompts, answers, confidences):
        with torch.no_grad():
            served = decode_batch(
                model, tokenizer, [ids], [SamplingParams(max_new_tokens=5)], eos_ids(model, tokenizer)
            )[0]
        assert answer == first_line_answer(served.text)
        assert confidence == pytest.approx(served.confidence, rel=1e-4)
        assert 0.0 < confidence <= 1.0
