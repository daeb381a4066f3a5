"""LoRA-family target groups on architectures without a per-architecture table (most GGUF backbones:
qwen3, phi3, gemma, gpt-neox...): every linear layer inside the numbered blocks, never the output head.

Checked against peft's own "all-linear" (every linear layer but the output head), which is the same
set on these models since all their other linear layers sit in the blocks.
"""

from __future__ import annotations

import re

import pytest
import torch

from adapters.methods import get_method
from adapters.methods.targets import ATTENTION_MODULES, TARGET_FALLBACK_NOTE, block_linear_modules


def _tiny(model_type: str, task: str = "causal-lm"):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    extra = {"num_key_value_heads": 2, "head_dim": 4} if model_type != "gpt_neox" else {}
    config = AutoConfig.for_model(model_type, vocab_size=64, **sizes, **extra, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return auto.from_config(config)


def _adapted(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("model_type", ["qwen3", "phi3", "gpt_neox"])
@pytest.mark.parametrize("group", ["attention", "mlp", "all"])
def test_groups_without_a_table_take_every_block_linear_layer_as_peft_all_linear_does(model_type, group):
    assert model_type not in ATTENTION_MODULES
    lora = get_method("lora")
    ours = _adapted(lora.attach(_tiny(model_type), lora.parse_options({"target_modules": group}), "causal-lm"))
    peft_all = _adapted(
        lora.attach(_tiny(model_type), lora.parse_options({"target_modules": "all-linear"}), "causal-lm")
    )
    assert ours == peft_all and ours
    head = _tiny(model_type).get_output_embeddings()
    assert head is not None and not any(name.endswith(("lm_head", "embed_out")) for name in ours)
    blocks = {re.search(r"\.(\d+)\.", name).group(1) for name in ours}
    assert blocks == {"0", "1"}


def test_fallback_keeps_layer_selection_and_leaves_class_heads_out():
    lora = get_method("lora")
    model = _tiny("qwen3", task="sequence-classification")
    names = block_linear_modules(model)
    assert names and "score" not in names and all("." in n for n in names)
    model = lora.attach(model, lora.parse_options({"top_layers": 1}), "sequence-classification")
    adapted = _adapted(model)
    assert adapted and {re.search(r"\.(\d+)\.", name).group(1) for name in adapted} == {"1"}
    assert not any(".score" in name for name in adapted)


def test_list_methods_says_what_the_fallback_is(capsys):
    from adapters.cli.train import main

    assert main(["--list-methods"]) == 0
    out = capsys.readouterr().out
    assert TARGET_FALLBACK_NOTE in out and "never the output head (lm_head)" in out


def test_a_linear_layer_outside_the_blocks_is_left_out_unlike_peft_all_linear():
    """E.g. a multimodal projector next to the decoder: not part of the blocks, so not a target group."""
    lora = get_method("lora")
    models = [_tiny("qwen3"), _tiny("qwen3")]
    for model in models:
        model.model.projector = torch.nn.Linear(16, 16)
    ours = _adapted(lora.attach(models[0], lora.parse_options({"target_modules": "all"}), "causal-lm"))
    peft_all = _adapted(lora.attach(models[1], lora.parse_options({"target_modules": "all-linear"}), "causal-lm"))
    assert not any(name.endswith("projector") for name in ours)
    assert {name for name in peft_all if name.endswith("projector")} and ours == {
        name for name in peft_all if not name.endswith("projector")
    }
