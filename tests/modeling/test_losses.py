"""The response-only loss on left-padded batches equals the plain per-row loss without padding."""

from __future__ import annotations

import torch


def test_left_padded_response_loss_matches_unpadded_rows(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.data.loading import collator_for
    from adapters.modeling.losses import causal_lm_response_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    rows = []
    for prompt_len, answer_len in [(9, 2), (4, 3), (12, 1)]:
        ids = torch.randint(5, 500, (prompt_len + answer_len,)).tolist()
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt_len + ids[prompt_len:]}
        )
    batch = collator_for("causal-lm", tok)(rows)
    assert (batch["attention_mask"][:, -1] == 1).all(), "causal-lm batches must be left-padded"
    with torch.no_grad():
        loss_sum, _ = causal_lm_response_loss(model, batch, reduction="sum")
        expected = 0.0
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(r["labels"][1:])
            expected += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
    assert abs(loss_sum.item() - expected) < 1e-3 * max(1.0, expected)


def test_response_loss_is_exact_on_right_padded_batches_too(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from adapters.modeling.losses import causal_lm_response_loss

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.padding_side = "right"
    rows = []
    for prompt_len, answer_len in [(9, 2), (4, 3), (12, 1)]:
        ids = torch.randint(5, 500, (prompt_len + answer_len,)).tolist()
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt_len + ids[prompt_len:]}
        )
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")(rows)
    with torch.no_grad():
        loss_sum, _ = causal_lm_response_loss(model, batch, reduction="sum")
        expected = sum(
            torch.nn.functional.cross_entropy(
                model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1],
                torch.tensor(r["labels"][1:]),
                ignore_index=-100,
                reduction="sum",
            ).item()
            for r in rows
        )
    assert abs(loss_sum.item() - expected) < 1e-3 * max(1.0, expected)
