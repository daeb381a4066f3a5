"""Packing (train.packing): rows packed end to end train exactly as the same rows unpacked (summed loss and
gradients), no token sees another row, and the padding share is reported."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from adapters.config import load_config
from adapters.data.builtins import BUILTIN_DATASETS
from adapters.data.chat import fit_conversation
from adapters.data.loading import collator_for
from adapters.data.packing import pack_dataset, pack_lengths, packed_collator, padding_share
from adapters.errors import ConfigError
from adapters.modeling.losses import causal_lm_response_loss
from adapters.modeling.packed import check_packing_support

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_best_fit_decreasing_places_every_row_once_within_capacity():
    lengths = [7, 3, 9, 2, 5, 5, 1, 10, 4]
    bins = pack_lengths(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 46 tokens need at least 5 bins of 10, and best fit finds 5
    with pytest.raises(ValueError, match="does not fit"):
        pack_lengths([11], 10)


def test_padding_share_counts_padding_of_each_batch():
    assert padding_share([4, 2, 3, 3], [0, 1, 2, 3], 2) == pytest.approx(1 - 12 / 14)
    assert padding_share([], [], 2) == 0.0


def _rows(tokenizer, n: int = 6, max_length: int = 64):
    """Tokenized chatterbot conversations (real multi-turn rows) as a datasets.Dataset."""
    from datasets import Dataset

    conversations = [c for c in BUILTIN_DATASETS["chatterbot"].load()["messages"] if len(c) >= 4][:n]
    out = {"input_ids": [], "labels": []}
    for messages in conversations:
        fitted = fit_conversation(tokenizer, messages, 0, max_length, "left", False)
        out["input_ids"].append(fitted.input_ids)
        out["labels"].append(fitted.labels)
    return Dataset.from_dict(out)


def _lora_model(model_dir, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attn)
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )  # non-zero B: LoRA changes the outputs
    return model.train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = causal_lm_response_loss(model, batch, reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_summed_loss_and_gradients(tiny_llama_dir, attn):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    rows = _rows(tokenizer)
    model = _lora_model(tiny_llama_dir, attn)
    unpacked = collator_for("causal-lm", tokenizer)([rows[i] for i in range(len(rows))])
    packed_rows = pack_dataset(rows, 160)
    assert len(packed_rows) < len(rows) and sum(packed_rows["sequences"]) == len(rows)
    packed = packed_collator(tokenizer.pad_token_id)([packed_rows[i] for i in range(len(packed_rows))])
    assert (packed["attention_mask"] == 0).any(), "the batch should hold padding too"

    loss_u, grads_u = _loss_and_grads(model, unpacked)
    loss_p, grads_p = _loss_and_grads(model, packed)
    assert loss_p.item() == pytest.approx(loss_u.item(), abs=1e-5, rel=1e-6)
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_p[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_no_token_attends_to_another_packed_row(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), attn_implementation="sdpa").eval()
    a, b = [5, 6, 7, 8, 9], [20, 21, 22, 23]
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b])).logits[0]
        # use_cache=False as the packed loss passes it: with a cache transformers ignores the restarts.
        packed = model(input_ids=torch.tensor([a + b]), position_ids=positions, use_cache=False).logits[0, len(a) :]
        other = model(
            input_ids=torch.tensor([[40, 41, 42, 43, 44] + b]), position_ids=positions, use_cache=False
        ).logits[0, len(a) :]
        leaky = model(input_ids=torch.tensor([a + b]), position_ids=positions).logits[0, len(a) :]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other, packed, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(leaky, alone, atol=1e-3), "with a cache the rows see each other (why use_cache=False)"


class _LeakyModel(torch.nn.Module):
    """A causal LM that ignores position_ids restarts (as OPT's code does): each logit is the running sum."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, position_ids=None, logits_to_keep=None, use_cache=None):
        logits = (input_ids.float().cumsum(-1) * self.scale)[..., None].expand(-1, -1, 11)  # [batch, seq, 11]
        return SimpleNamespace(logits=logits[logits_to_keep] if logits_to_keep is not None else logits)


def test_packing_is_refused_where_it_cannot_hold(tiny_llama_dir, tiny_bert_dir):
    check_packing_support(_lora_model(tiny_llama_dir, "sdpa"))  # Llama keeps packed rows apart
    with pytest.raises(ConfigError, match="train.packing works with task causal-lm"):
        load_config(
            raw={
                "task": "sequence-classification",
                "model": {"name": str(tiny_bert_dir)},
                "data": {"name": "trec"},
                "train": {"packing": True},
            }
        )
    with pytest.raises(ConfigError, match="attend to each other"):
        check_packing_support(_LeakyModel())
    with pytest.raises(ConfigError, match="does not fit"):
        from datasets import Dataset

        pack_dataset(Dataset.from_dict({"input_ids": [[1] * 9], "labels": [[-100] * 9]}), 8)


def test_training_with_packing_reports_the_padding_share(tiny_llama_dir, tmp_path):
    from adapters.training.loop import train

    cfg = load_config(
        raw={
            "task": "causal-lm",
            "model": {"name": str(tiny_llama_dir)},
            "data": {
                "name": "chatterbot",
                "max_length": 96,
                "max_train_samples": 64,
                "max_eval_samples": 16,
                "max_test_samples": 16,
            },
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 4, "log_every": 1, "seed": 1, "packing": True},
            "eval": {"max_new_tokens": 2, "baseline": False},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    result = train(cfg)
    report = json.loads((result.run_dir / "data_report.json").read_text())["packing"]
    assert report["rows"] == 64 and report["packed_rows"] < 64
    assert 0 <= report["padding_share"] < report["padding_share_unpacked"]
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "packing" and e["packed_rows"] == report["packed_rows"] for e in events)
    assert sum(1 for e in events if "loss" in e) == 4
