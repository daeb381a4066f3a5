"""Token log-probabilities (adapters.modeling.generation.TokenLogprobs): the top alternatives' order."""

from __future__ import annotations

import torch

from adapters.modeling.generation import TokenLogprobs


def test_tied_alternatives_list_the_greedy_token_first():
    logits = torch.full((49152,), -5.0)  # SmolLM2's vocabulary: torch.topk lists ties high id first here
    logits[[7, 49149, 12]] = torch.tensor([2.0, 3.0, 3.0])  # 12 and 49149 tie for the best; 7 is third
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = int(torch.argmax(logits))
    record = TokenLogprobs()
    record.add(greedy, logprobs, 3)
    assert greedy == 12 and [token for token, _ in record.top[0]] == [12, 49149, 7]
    assert record.logprobs == [record.top[0][0][1]]
