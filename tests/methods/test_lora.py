"""LoRA options on both tiny backbones, DoRA/rsLoRA, and QLoRA (LoRA on a 4-bit NF4 base, on CPU)."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from adapters.config import ModelConfig
from adapters.errors import ConfigError
from adapters.methods import get_method
from adapters.modeling.backbone import load_backbone
from tests.helpers.methods import BACKBONES, load_tiny, logits_of, make_batch, train_steps


def lora_modules(model) -> set[str]:
    """Module names (relative to the backbone's layers) that carry a LoRA update, e.g. '1.self_attn.q_proj'."""
    from peft.tuners.lora import LoraLayer

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            names.add(re.sub(r"^.*\.layers?\.", "", name))
    return names


LLAMA_ATTN = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
LLAMA_MLP = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
BERT_ATTN = {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
BERT_MLP = {"intermediate.dense", "output.dense"}

TARGETS = [
    ("llama-lm", "attention", LLAMA_ATTN),
    ("llama-lm", "mlp", LLAMA_MLP),
    ("llama-lm", "all", LLAMA_ATTN | LLAMA_MLP),
    ("llama-lm", "all-linear", LLAMA_ATTN | LLAMA_MLP),  # peft leaves the LM head out
    ("llama-lm", ["v_proj", "down_proj"], {"self_attn.v_proj", "mlp.down_proj"}),
    ("bert-cls", "attention", BERT_ATTN),
    ("bert-cls", "mlp", BERT_MLP),  # not attention.output.dense, which "output.dense" also matches
    ("bert-cls", "all", BERT_ATTN | BERT_MLP),
    ("bert-cls", "all-linear", BERT_ATTN | BERT_MLP),  # the classifier head is trained whole, not LoRA'd
    ("bert-cls", ["value"], {"attention.self.value"}),
]


@pytest.mark.parametrize("kind,targets,expected", TARGETS, ids=[f"{k}-{t}" for k, t, _ in TARGETS])
def test_target_modules_pick_the_named_group(kind, targets, expected, folders):
    lora = get_method("lora")
    model, _ = load_tiny(kind, folders)
    model = lora.attach(model, lora.parse_options({"target_modules": targets}), BACKBONES[kind][0])
    got = lora_modules(model)
    assert {name.split(".", 1)[1] for name in got} == expected
    assert {name.split(".", 1)[0] for name in got} == {"0", "1"}  # both blocks


@pytest.mark.parametrize("kind", ["llama-lm", "bert-cls"])
@pytest.mark.parametrize("options,layers", [({"top_layers": 1}, {"1"}), ({"layers": [0]}, {"0"})])
def test_layer_selection_limits_lora_to_those_blocks(kind, options, layers, folders):
    lora = get_method("lora")
    model, _ = load_tiny(kind, folders)
    model = lora.attach(model, lora.parse_options(options), BACKBONES[kind][0])
    got = lora_modules(model)
    assert got and {name.split(".", 1)[0] for name in got} == layers
    before, after = train_steps(model, make_batch(model, BACKBONES[kind][0]), steps=3)
    assert after < before


@pytest.mark.parametrize("kind", ["llama-lm", "bert-cls"])
def test_dora_and_rslora(kind, folders):
    task = BACKBONES[kind][0]
    lora = get_method("lora")
    model, _ = load_tiny(kind, folders)
    model = lora.attach(model, lora.parse_options({"r": 4, "alpha": 8, "use_rslora": True}), task)
    from peft.tuners.lora import LoraLayer

    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r), not alpha / r

    for method_name, options in (("lora", {"use_dora": True}), ("dora", {})):
        method = get_method(method_name)
        model, _ = load_tiny(kind, folders)
        model = method.attach(model, method.parse_options(options), task)
        magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
        assert magnitudes, f"{method_name} {options}: no trainable DoRA magnitude vectors"
        before, after = train_steps(model, make_batch(model, task), steps=3)
        assert after < before


# ---------------------------------------------------------------- QLoRA
def test_qlora_trains_on_a_4bit_nf4_double_quant_base_and_reloads(tiny_llama64_dir, tmp_path):
    import bitsandbytes as bnb

    cfg = ModelConfig(name=str(tiny_llama64_dir), quantization={"bits": 4})
    assert cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant
    base = load_backbone(cfg, "causal-lm")
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quant

    lora = get_method("lora")
    assert lora.supports_quantized
    model = lora.attach(base, lora.parse_options({}), "causal-lm")
    batch = make_batch(model, "causal-lm")
    before, after = train_steps(model, batch, steps=5)
    assert after < before - 1e-3
    expected = logits_of(model, batch)
    lora.save(model, tmp_path / "qlora")
    reloaded = lora.load(load_backbone(cfg, "causal-lm"), tmp_path / "qlora")
    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)


def test_qlora_gradients_are_the_same_after_an_evaluation_pass(tiny_llama64_dir):
    # bitsandbytes repacks 4-bit CPU weights on a no-grad eval forward into a layout without a
    # backward; training after an evaluation then loses the gradient through the frozen layers.
    def lora_grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        lora = get_method("lora")
        model = lora.attach(
            load_backbone(ModelConfig(name=str(tiny_llama64_dir), quantization={"bits": 4}), "causal-lm"),
            lora.parse_options({}),
            "causal-lm",
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        batch = make_batch(model, "causal-lm")
        if evaluate_first:
            logits_of(model, batch)  # eval mode, no grad: what the trainer's evaluation does
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, after_eval = lora_grads(False), lora_grads(True)
    assert plain.keys() == after_eval.keys() and plain
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], msg=name)


def test_quantization_without_importable_bitsandbytes_is_a_config_error(tiny_llama64_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ConfigError, match=r"model\.quantization needs bitsandbytes.*drop model\.quantization"):
        load_backbone(ModelConfig(name=str(tiny_llama64_dir), quantization={"bits": 4}), "causal-lm")


@pytest.mark.parametrize("bits,kernel", [(4, "quantize_4bit"), (8, "int8_vectorwise_quant")])
def test_bitsandbytes_without_a_backend_for_this_device_is_a_config_error(bits, kernel, tiny_llama64_dir, monkeypatch):
    import bitsandbytes.functional

    def no_backend(*args, **kwargs):
        raise RuntimeError("no kernel registered for this device")

    monkeypatch.setattr(bitsandbytes.functional, kernel, no_backend)
    with pytest.raises(ConfigError, match=rf"bitsandbytes .* cannot run {bits}-bit on cpu.*no kernel registered"):
        load_backbone(ModelConfig(name=str(tiny_llama64_dir), quantization={"bits": bits}), "causal-lm")
