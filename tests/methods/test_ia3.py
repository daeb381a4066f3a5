"""IA3: per-architecture default targets, feed-forward subsets, and what it refuses."""

from __future__ import annotations

import re

import pytest

from adapters.errors import ConfigError
from adapters.methods import get_method
from adapters.methods.base import ModelInfo
from tests.helpers.methods import BACKBONES, load_tiny, make_batch, train_steps


def ia3_layers(model) -> dict[str, bool]:
    """Suffix of every IA3-wrapped module -> whether it is treated as feed-forward."""
    from peft.tuners.ia3 import IA3Layer

    return {
        re.sub(r"^.*\.layers?\.\d+\.", "", name): module.is_feedforward
        for name, module in model.named_modules()
        if isinstance(module, IA3Layer)
    }


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("llama-lm", {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}),
        (
            "bert-cls",
            {
                "attention.self.key": False,
                "attention.self.value": False,
                "attention.output.dense": True,
                "output.dense": True,
            },
        ),
    ],
)
def test_default_targets_per_architecture(kind, expected, folders):
    ia3 = get_method("ia3")
    model, _ = load_tiny(kind, folders)
    model = ia3.attach(model, ia3.parse_options({}), BACKBONES[kind][0])
    assert ia3_layers(model) == expected
    before, after = train_steps(model, make_batch(model, BACKBONES[kind][0]), steps=5)
    assert after < before


def test_explicit_targets_keep_only_their_feedforward_modules(folders):
    ia3 = get_method("ia3")
    model, _ = load_tiny("llama-lm", folders)
    model = ia3.attach(model, ia3.parse_options({"target_modules": ["v_proj", "up_proj"]}), "causal-lm")
    # down_proj (the default feed-forward module) is not targeted, so nothing is feed-forward
    assert ia3_layers(model) == {"self_attn.v_proj": False, "mlp.up_proj": False}

    model, _ = load_tiny("llama-lm", folders)
    options = ia3.parse_options({"target_modules": ["v_proj", "up_proj"], "feedforward_modules": ["up_proj"]})
    model = ia3.attach(model, options, "causal-lm")
    assert ia3_layers(model) == {"self_attn.v_proj": False, "mlp.up_proj": True}


def test_check_model_refusals():
    ia3 = get_method("ia3")
    unknown = ModelInfo(model_type="mamba", is_encoder=False, num_layers=2, hidden_size=32)
    with pytest.raises(ConfigError, match=r"'ia3' has no default target modules for model type 'mamba'.*llama"):
        ia3.check_model(ia3.parse_options({}), unknown, "causal-lm")
    ia3.check_model(ia3.parse_options({"target_modules": ["in_proj"]}), unknown, "causal-lm")  # explicit: fine

    llama = ModelInfo(model_type="llama", is_encoder=False, num_layers=2, hidden_size=32)
    bad = ia3.parse_options({"target_modules": ["v_proj"], "feedforward_modules": ["down_proj"]})
    with pytest.raises(ConfigError, match=r"feedforward_modules.*\['down_proj'\] are not in method\.target_modules"):
        ia3.check_model(bad, llama, "causal-lm")
    with pytest.raises(
        ConfigError, match=r"unknown option 'method\.rank'.*valid options: target_modules, feedforward_modules"
    ):
        ia3.parse_options({"rank": 4})


@pytest.mark.parametrize("bits", [4, 8])
def test_ia3_trains_on_a_quantized_base_and_reloads(bits, tiny_llama64_dir, tmp_path):
    import bitsandbytes as bnb
    import torch
    from peft.tuners.ia3 import IA3Layer

    from adapters.config import ModelConfig
    from adapters.modeling.backbone import load_backbone
    from tests.helpers.methods import logits_of

    cfg = ModelConfig(name=str(tiny_llama64_dir), quantization={"bits": bits})
    ia3 = get_method("ia3")
    assert ia3.supports_quantized
    model = ia3.attach(load_backbone(cfg, "causal-lm"), ia3.parse_options({}), "causal-lm")
    wrapped = [m for m in model.modules() if isinstance(m, IA3Layer)]
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    assert wrapped and all(isinstance(m.get_base_layer(), quantized) for m in wrapped)
    batch = make_batch(model, "causal-lm")
    before, after = train_steps(model, batch, steps=8, lr=5e-2)
    assert after < before - 1e-3
    expected = logits_of(model, batch)
    ia3.save(model, tmp_path / "ia3")
    reloaded = ia3.load(load_backbone(cfg, "causal-lm"), tmp_path / "ia3")
    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)
