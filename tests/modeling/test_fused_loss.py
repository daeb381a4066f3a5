"""The target-only, fused and chunked response loss (adapters.modeling.losses) gives the loss and the LoRA
gradients of the plain computation: transformers' own loss over full logits, accumulated or packed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapters.modeling import losses


def _lora_model(model_dir, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so that every LoRA weight gets a gradient
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()  # no dropout: the two computations see the same function


def _rows(seed: int, shapes=((9, 2), (4, 3), (12, 1), (6, 4))) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_len, answer_len in shapes:
        ids = torch.randint(5, 500, (prompt_len + answer_len,), generator=g).tolist()
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt_len + ids[prompt_len:]}
        )
    return rows


def _right_padded(rows: list[dict], pad: int = 0) -> dict:
    longest = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.tensor([r[key] + [fill] * (longest - len(r[key])) for r in rows])
    return out


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return grads


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_rows", [1, 3, 1 << 20])
def test_fused_linear_cross_entropy_matches_full_logits(monkeypatch, chunk_rows):
    monkeypatch.setattr(losses, "_chunk_rows", lambda vocab: chunk_rows)
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    expected = torch.autograd.grad(plain * 0.3, (hidden, weight, bias))
    fused = losses.fused_linear_cross_entropy(hidden, weight, targets, bias)
    got = torch.autograd.grad(fused * 0.3, (hidden, weight, bias))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            losses.fused_linear_cross_entropy(hidden, weight, targets, bias), plain, rtol=1e-5, atol=1e-5
        )


def test_response_loss_and_lora_grads_match_transformers_loss(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(losses, "_chunk_rows", lambda vocab: 2)  # several chunks even for a few targets
    model = _lora_model(tiny_llama_dir)
    assert losses._fusable_head(model) is not None, "the tiny Llama should take the fused path"
    batch = _right_padded(_rows(0))
    reference = model(**batch).loss  # transformers: full logits, shifted labels, mean over targets
    reference.backward()
    expected = _lora_grads(model)
    loss, _ = losses.causal_lm_response_loss(model, batch, reduction="mean")
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    _assert_same(_lora_grads(model), expected)
    # The unfused target-only path gives the same too.
    monkeypatch.setattr(losses, "_fusable_head", lambda model: None)
    plain, out = losses.causal_lm_response_loss(model, batch, reduction="mean")
    plain.backward()
    assert out.logits.shape[0] == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(plain, reference, rtol=1e-5, atol=1e-6)
    _assert_same(_lora_grads(model), expected)


def test_accumulated_micro_batches_match_the_whole_batch(tiny_llama_dir):
    from transformers import AutoTokenizer

    from adapters.data.loading import collator_for

    model = _lora_model(tiny_llama_dir)
    collate = collator_for("causal-lm", AutoTokenizer.from_pretrained(str(tiny_llama_dir)))  # left padding on CPU
    rows = _rows(1)
    reference = model(**_right_padded(rows)).loss
    reference.backward()
    expected = _lora_grads(model)
    micro = [collate(rows[:1]), collate(rows[1:])]
    count = sum(losses.response_target_count(model, b["labels"]) for b in micro)
    total = 0.0
    for b in micro:
        part = losses.causal_lm_response_loss(model, b, reduction="sum")[0] / count
        part.backward()
        total += part.item()
    assert abs(total - reference.item()) < 1e-5
    _assert_same(_lora_grads(model), expected)


def test_packed_rows_match_each_sequence_alone(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir)
    rows = _rows(2)
    reference = sum(
        model(**{k: torch.tensor([r[k]]) for k in ("input_ids", "labels")}).loss
        * sum(x != -100 for x in r["labels"][1:])
        for r in rows
    )
    reference.backward()
    expected = _lora_grads(model)
    packed = {
        "input_ids": torch.tensor([sum((r["input_ids"] for r in rows), [])]),
        "labels": torch.tensor([sum(([-100] + r["labels"][1:] for r in rows), [])]),  # no target across a border
        "position_ids": torch.tensor([sum((list(range(len(r["input_ids"]))) for r in rows), [])]),
    }
    loss, _ = losses.causal_lm_response_loss(model, packed, reduction="sum")
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    _assert_same(_lora_grads(model), expected)
