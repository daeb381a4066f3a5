"""Discriminative learning rates and weight decay: which parameter gets which LR and decay."""

from __future__ import annotations

import pytest
import torch

from adapters.config import TrainConfig
from adapters.training.param_groups import block_index, build_param_groups, describe_param_groups, param_role


def by_param(model, groups) -> dict[str, dict]:
    """parameter name -> the group (name, lr, weight_decay) that holds it."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, "a parameter is in two groups"
            out[names[id(p)]] = {"group": g["name"], "lr": g["lr"], "wd": g["weight_decay"]}
    return out


@pytest.fixture(scope="module")
def llama_cls(tiny_llama_dir):
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification.from_pretrained(str(tiny_llama_dir), num_labels=3)


@pytest.fixture(scope="module")
def bert_cls(tiny_bert_dir):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.12.self_attn.q_proj.weight", 12),
        ("bert.encoder.layer.3.output.dense.bias", 3),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", 0),
        ("base_model.model.backbone.encoder.layer.1.attention.self.query.weight", 1),
        ("transformer.h.5.attn.c_attn.weight", 5),
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
        ("score.weight", None),
        ("my_layers.3.weight", None),  # a segment must be exactly layers/layer/h/blocks
    ],
)
def test_block_index(name, expected):
    assert block_index(name, 30) == expected


def test_block_index_out_of_range_raises():
    with pytest.raises(ValueError, match="block 12"):
        block_index("model.layers.12.mlp.up_proj.weight", 2)


def test_llama_layer_decay_head_lr_and_weight_decay(llama_cls):
    cfg = TrainConfig(lr=1e-3, head_lr=1e-2, layer_decay=0.5, weight_decay=0.1)
    got = by_param(llama_cls, build_param_groups(llama_cls, cfg))
    assert set(got) == {n for n, p in llama_cls.named_parameters()}  # all trainable, each once
    assert got["score.weight"] == {"group": "head/decay", "lr": 1e-2, "wd": 0.1}
    assert got["model.layers.1.self_attn.q_proj.weight"] == {"group": "layer.1/decay", "lr": 1e-3, "wd": 0.1}
    assert got["model.layers.0.mlp.down_proj.weight"] == {"group": "layer.0/decay", "lr": 5e-4, "wd": 0.1}
    assert got["model.layers.0.input_layernorm.weight"] == {"group": "layer.0/no_decay", "lr": 5e-4, "wd": 0.0}
    assert got["model.embed_tokens.weight"] == {"group": "embeddings/decay", "lr": 2.5e-4, "wd": 0.1}
    assert got["model.norm.weight"] == {"group": "top/no_decay", "lr": 1e-3, "wd": 0.0}


def test_bert_biases_and_layernorms_get_no_decay(bert_cls):
    cfg = TrainConfig(lr=1e-3, layer_decay=0.8, weight_decay=0.01)
    groups = build_param_groups(bert_cls, cfg)
    got = by_param(bert_cls, groups)
    for name, where in got.items():
        no_decay = name.endswith("bias") or "LayerNorm" in name
        assert (where["wd"] == 0.0) == no_decay, name
        assert where["group"].endswith("/no_decay") == no_decay, name
    assert got["classifier.weight"]["lr"] == 1e-3  # head_lr defaults to lr
    assert got["bert.encoder.layer.0.attention.self.query.weight"]["lr"] == pytest.approx(1e-3 * 0.8)
    assert got["bert.embeddings.LayerNorm.weight"] == {
        "group": "embeddings/no_decay",
        "lr": pytest.approx(1e-3 * 0.64),
        "wd": 0.0,
    }
    assert got["bert.pooler.dense.weight"]["group"] == "top/decay"
    # Groups come bottom-up: embeddings first, head last; each name is unique.
    names = [g["name"] for g in groups]
    assert names[0].startswith("embeddings/") and names[-1].startswith("head/")
    assert len(set(names)) == len(names)
    rows = describe_param_groups(groups)
    assert sum(r["elements"] for r in rows) == sum(p.numel() for p in bert_cls.parameters())


def test_without_layer_decay_the_backbone_shares_one_lr(bert_cls):
    groups = build_param_groups(bert_cls, TrainConfig(lr=1e-3, head_lr=5e-3, weight_decay=0.01))
    assert {g["name"]: g["lr"] for g in groups} == {
        "backbone/decay": 1e-3,
        "backbone/no_decay": 1e-3,
        "head/decay": 5e-3,
        "head/no_decay": 5e-3,
    }


def test_frozen_params_are_left_out(bert_cls):
    for name, p in bert_cls.named_parameters():
        p.requires_grad = name.startswith("classifier") or ".layer.1." in name
    try:
        got = by_param(bert_cls, build_param_groups(bert_cls, TrainConfig(layer_decay=0.9)))
        assert got and all(n.startswith("classifier") or ".layer.1." in n for n in got)
    finally:
        for p in bert_cls.parameters():
            p.requires_grad = True


def test_peft_lora_groups(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    base = LlamaForSequenceClassification.from_pretrained(str(tiny_llama_dir), num_labels=3)
    model = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])
    )
    cfg = TrainConfig(lr=1e-3, head_lr=1e-2, layer_decay=0.5, weight_decay=0.1)
    got = by_param(model, build_param_groups(model, cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    head = "base_model.model.score.modules_to_save.default.weight"
    assert got[head] == {"group": "head/decay", "lr": 1e-2, "wd": 0.1}
    assert got["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]["lr"] == 1e-3
    assert got["base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"] == {
        "group": "layer.0/decay",
        "lr": 5e-4,
        "wd": 0.1,
    }
    # The frozen original of the head copy is not optimized at all.
    assert "base_model.model.score.original_module.weight" not in got


def test_peft_prompt_encoder_trains_at_base_lr(tiny_bert_dir):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    got = by_param(
        model, build_param_groups(model, TrainConfig(lr=3e-2, head_lr=1e-3, layer_decay=0.5, weight_decay=0.1))
    )
    assert got["prompt_encoder.default.embedding.weight"] == {"group": "prompt/decay", "lr": 3e-2, "wd": 0.1}
    assert got["base_model.classifier.modules_to_save.default.bias"] == {
        "group": "head/no_decay",
        "lr": 1e-3,
        "wd": 0.0,
    }


def test_mean_pooling_classifier_and_dora_magnitudes(tiny_bert_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from adapters.modeling.backbone import MeanPoolingClassifier

    model = MeanPoolingClassifier(AutoModel.from_pretrained(str(tiny_bert_dir)), {"a": 0, "b": 1}, {0: "a", 1: "b"})
    model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["query", "value"], use_dora=True, modules_to_save=["classifier"])
    )
    got = by_param(model, build_param_groups(model, TrainConfig(lr=1e-3, layer_decay=0.5, weight_decay=0.1)))
    magnitudes = [n for n in got if "lora_magnitude_vector" in n]
    assert magnitudes and all(got[n]["wd"] == 0.0 for n in magnitudes)  # 1-D: never decayed
    assert (
        param_role("base_model.model.backbone.encoder.layer.1.attention.self.query.lora_A.default.weight").label
        == "layer.1"
    )
    assert got["base_model.model.classifier.modules_to_save.default.weight"]["group"] == "head/decay"


def test_groups_drive_adamw(llama_cls):
    groups = build_param_groups(llama_cls, TrainConfig(lr=1e-3, layer_decay=0.5, weight_decay=0.1))
    opt = torch.optim.AdamW(groups)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in groups]
    assert all(g["lr"] > 0 for g in opt.param_groups)
