"""Gradual unfreezing: head first, then blocks from the top, embeddings last; unfrozen params learn."""

from __future__ import annotations

import pytest
import torch

from adapters.config import TrainConfig
from adapters.training.schedules import build_scheduler
from adapters.training.unfreezing import GradualUnfreezer, freeze_all_but, transformer_blocks


@pytest.fixture()
def bert_cls(tiny_bert_dir):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3)


def batch(vocab: int = 1000):
    torch.manual_seed(1)
    return {
        "input_ids": torch.randint(5, vocab, (4, 12)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 1]),
    }


def test_transformer_blocks_llama_bert_wrapper_and_peft(tiny_llama_dir, tiny_bert_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, LlamaForCausalLM

    from adapters.modeling.backbone import MeanPoolingClassifier

    llama = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir))
    blocks = transformer_blocks(llama)
    assert [i for i, _ in blocks] == [0, 1] and blocks[1][1] is llama.model.layers[1]

    wrapped = MeanPoolingClassifier(AutoModel.from_pretrained(str(tiny_bert_dir)), {"a": 0, "b": 1}, {0: "a", 1: "b"})
    assert transformer_blocks(wrapped)[0][1] is wrapped.backbone.encoder.layer[0]

    peft_llama = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert transformer_blocks(peft_llama)[1][1] is llama.model.layers[1]


def test_freeze_all_but(bert_cls):
    count = freeze_all_but(bert_cls, lambda n: n.startswith("classifier"))
    assert count == sum(p.numel() for p in bert_cls.classifier.parameters())
    assert {n for n, p in bert_cls.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


def test_order_is_head_then_top_block_down_then_embeddings(bert_cls):
    unfreezer = GradualUnfreezer(bert_cls, every=1, base_lr=1e-3)
    assert unfreezer.order() == ["head", "layer.1", "layer.0", "embeddings"]
    assert "bert.pooler.dense.weight" in unfreezer.param_names("layer.1")  # above the blocks: opens with the top one
    assert all(".layer.0." in n for n in unfreezer.param_names("layer.0"))
    assert {n for n, p in bert_cls.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


def test_each_epoch_opens_the_next_block_at_its_own_lr(bert_cls):
    unfreezer = GradualUnfreezer(
        bert_cls, every=1, unit="epoch", base_lr=1e-3, decay=0.5, head_lr=1e-2, weight_decay=0.1
    )
    opt = torch.optim.AdamW(unfreezer.initial_param_groups())
    assert [g["name"] for g in opt.param_groups] == ["head/decay", "head/no_decay"]
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[1]["weight_decay"] == 0.0

    assert unfreezer.step(0, opt) == []
    assert unfreezer.step(1, opt) == ["layer.1"]
    assert unfreezer.step(1, opt) == []  # idempotent
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["layer.1/decay"]["lr"] == 1e-3 and groups["layer.1/decay"]["weight_decay"] == 0.1
    assert groups["layer.1/no_decay"]["weight_decay"] == 0.0
    assert unfreezer.step(2, opt) == ["layer.0"]
    assert {g["name"]: g["lr"] for g in opt.param_groups}["layer.0/decay"] == 5e-4
    assert unfreezer.step(3, opt) == ["embeddings"]
    assert {g["name"]: g["lr"] for g in opt.param_groups}["embeddings/decay"] == 2.5e-4
    assert unfreezer.done and unfreezer.step(9, opt) == []
    assert all(p.requires_grad for p in bert_cls.parameters())


def test_step_unit_opens_several_stages_when_positions_jump(bert_cls):
    unfreezer = GradualUnfreezer(bert_cls, every=10, unit="step", base_lr=1e-3)
    opt = torch.optim.AdamW(unfreezer.initial_param_groups())
    assert unfreezer.step(9, opt) == []
    assert unfreezer.step(25, opt) == ["layer.1", "layer.0"]


def test_newly_unfrozen_params_get_gradients_and_move(bert_cls):
    unfreezer = GradualUnfreezer(bert_cls, every=1, base_lr=1e-2)
    opt = torch.optim.AdamW(unfreezer.initial_param_groups())
    top = bert_cls.bert.encoder.layer[1].attention.self.query.weight
    low = bert_cls.bert.encoder.layer[0].attention.self.query.weight

    def train_step():
        opt.zero_grad(set_to_none=True)
        bert_cls(**batch()).loss.backward()
        opt.step()

    before_top, before_low = top.detach().clone(), low.detach().clone()
    train_step()
    assert top.grad is None and torch.equal(top, before_top)  # frozen while head-only

    unfreezer.step(1, opt)
    train_step()
    assert top.grad is not None and top.grad.abs().sum() > 0
    assert not torch.equal(top, before_top)
    assert low.grad is None and torch.equal(low, before_low)  # still frozen below

    unfreezer.step(2, opt)
    train_step()
    assert low.grad is not None and not torch.equal(low, before_low)


def test_unfrozen_groups_follow_the_running_schedule(bert_cls):
    cfg = TrainConfig(lr=1e-3, scheduler="linear", warmup_steps=0)
    unfreezer = GradualUnfreezer.from_train_config(bert_cls, cfg, every=5, unit="step")
    opt = torch.optim.AdamW(unfreezer.initial_param_groups())
    sched = build_scheduler(opt, cfg, num_training_steps=10)
    for step in range(10):
        unfreezer.step(step, opt, sched)
        opt.step()
        sched.step()
        if step == 5:
            assert {g["name"]: g["lr"] for g in opt.param_groups}["layer.1/decay"] == pytest.approx(1e-3 * 0.4)
    assert all(g["lr"] == pytest.approx(0.0) for g in opt.param_groups)  # every group decayed to the end


def test_peft_lora_unfreezes_only_the_adapter_weights(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    base = LlamaForSequenceClassification.from_pretrained(str(tiny_llama_dir), num_labels=3)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj", "v_proj"]))
    unfreezer = GradualUnfreezer(model, every=1, base_lr=1e-3)
    assert unfreezer.order() == ["head", "layer.1", "layer.0"]  # no trainable embeddings: no stage
    assert all("lora_" in n for n in unfreezer.param_names("layer.1"))
    opt = torch.optim.AdamW(unfreezer.initial_param_groups())
    unfreezer.step(5, opt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert len(trainable) == 8 + 1  # 2 layers x 2 targets x (A, B) + the score copy


def test_bad_arguments():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="every"):
        GradualUnfreezer(model, every=0, base_lr=1e-3)
    with pytest.raises(ValueError, match="unit"):
        GradualUnfreezer(model, every=1, unit="batch", base_lr=1e-3)
    with pytest.raises(ValueError, match="base_lr"):
        GradualUnfreezer(model, every=1)
