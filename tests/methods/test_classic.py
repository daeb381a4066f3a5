"""Classic strategies: head-only, partial, full. They train the backbone's own weights and save
only those (never a copy of the frozen base), and reload onto a fresh base to identical logits."""

from __future__ import annotations

import json

import pytest

from adapters.errors import BaseMismatchError, ConfigError
from adapters.methods import ModelInfo, get_method, method_of_folder
from tests.helpers.methods import (
    BACKBONES,
    folder_bytes,
    load_tiny,
    logits_of,
    make_batch,
    train_steps,
    trainable_count,
)


def _head(name):
    return lambda n: n.startswith(name + ".")


def _top_llama_block(prefix):
    return lambda n: n.startswith(f"{prefix}.layers.1.") or n == f"{prefix}.norm.weight"


# (method, options, backbone kind, which parameter names must be - exactly - the trained ones)
MATRIX = [
    ("head-only", {}, "bert-cls", _head("classifier")),
    ("head-only", {}, "llama-cls", _head("score")),
    ("partial", {"blocks": 1}, "llama-lm", _top_llama_block("model")),
    ("partial", {"blocks": 1}, "bert-cls", lambda n: n.startswith(("bert.encoder.layer.1.", "classifier."))),
    ("partial", {"blocks": 1}, "llama-cls", lambda n: _top_llama_block("model")(n) or n.startswith("score.")),
    ("full", {}, "llama-lm", lambda n: True),
    ("full", {}, "bert-cls", lambda n: True),
]


def base_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # each (tied) tensor once


def scramble_head(model) -> None:
    """A different random head on the fresh base, so only a saved head can reproduce the logits."""
    import torch

    from adapters.methods.targets import head_module_names

    gen = torch.Generator().manual_seed(99)
    for name in head_module_names(model):
        for p in getattr(model, name).parameters():
            p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("name,options,kind,expected_trained", MATRIX, ids=[f"{m[0]}-{m[2]}" for m in MATRIX])
def test_trains_saves_only_changed_weights_and_reloads(
    name, options, kind, expected_trained, folders, tmp_path, record_property
):
    import torch
    from safetensors import safe_open

    task = BACKBONES[kind][0]
    method = get_method(name)
    assert method.mixable is False
    model, model_cfg = load_tiny(kind, folders)
    batch = make_batch(model, task)
    size_of_base = base_bytes(model)
    model = method.attach(model, method.parse_options(options), task)

    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == sorted(n for n, _ in model.named_parameters() if expected_trained(n))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    before, after = train_steps(model, batch, steps=10, lr=1e-2 if name == "head-only" else 1e-3)
    assert after < before, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), "a frozen weight moved"
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    expected = logits_of(model, batch)

    folder = tmp_path / "adapter"
    method.save(model, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        saved_keys = sorted(f.keys())
    assert saved_keys == trained == sorted(config["parameter_names"])
    assert config["adapterkit_method"] == name and config["options"] == method.parse_options(options).model_dump()
    assert config["base_model_name_or_path"] == model_cfg.name
    assert method_of_folder(folder).name == name
    saved = folder_bytes(folder)
    if name == "full":
        assert 0.95 * size_of_base < saved < 1.05 * size_of_base  # each tied tensor once, nothing else
    else:
        assert saved < 0.1 * size_of_base

    fresh, _ = load_tiny(kind, folders)
    scramble_head(fresh)
    reloaded = method.load(fresh, folder)
    assert torch.allclose(logits_of(reloaded, batch), expected, atol=1e-6)
    assert trainable_count(reloaded) == 0  # loaded for inference
    record_property("trainable_params", sum(start[n].numel() for n in start))
    record_property("saved_bytes", saved)
    print(
        f"{name} {kind}: {sum(t.numel() for t in start.values())} trainable params, "
        f"{saved} bytes saved (base {size_of_base})"
    )


def test_full_keeps_tied_embeddings_tied(folders, tmp_path):
    """SmolLM2-style tied lm_head: saved once (safetensors refuses shared tensors), still tied after reload."""
    import torch
    from safetensors import safe_open

    method = get_method("full")
    model = method.attach(load_tiny("llama-lm", folders)[0], method.parse_options({}), "causal-lm")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = make_batch(model, "causal-lm")
    train_steps(model, batch, steps=2, lr=1e-3)
    method.save(model, tmp_path / "full")
    with safe_open(str(tmp_path / "full" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    reloaded = method.load(load_tiny("llama-lm", folders)[0], tmp_path / "full")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_gathered_state_dict_is_saved_the_same(folders, tmp_path):
    """Under ZeRO-3 training passes the gathered state dict; the artifact must not change."""
    method = get_method("partial")
    model = method.attach(load_tiny("llama-lm", folders)[0], method.parse_options({"blocks": 1}), "causal-lm")
    method.save(model, tmp_path / "direct")
    method.save(model, tmp_path / "gathered", state_dict=model.state_dict())
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "direct" / f).read_bytes() == (tmp_path / "gathered" / f).read_bytes()
    assert not list((tmp_path / "direct").glob(".*.tmp"))  # atomic writes leave no temp files


def test_load_for_more_training_unfreezes_what_was_saved(folders, tmp_path):
    method = get_method("head-only")
    model = method.attach(load_tiny("bert-cls", folders)[0], method.parse_options({}), "sequence-classification")
    method.save(model, tmp_path / "head")
    again = method.load(load_tiny("bert-cls", folders)[0], tmp_path / "head", is_trainable=True)
    assert sorted(n for n, p in again.named_parameters() if p.requires_grad) == ["classifier.bias", "classifier.weight"]


def test_wrong_base_is_refused(folders, tmp_path):
    method = get_method("partial")
    model = method.attach(
        load_tiny("bert-cls", folders)[0], method.parse_options({"blocks": 1}), "sequence-classification"
    )
    method.save(model, tmp_path / "bert-partial")
    with pytest.raises(BaseMismatchError, match="does not fit this base model"):
        method.load(load_tiny("llama-cls", folders)[0], tmp_path / "bert-partial")
    with pytest.raises(ConfigError, match="saved by method 'partial', not 'full'"):
        get_method("full").load(load_tiny("bert-cls", folders)[0], tmp_path / "bert-partial")


def test_one_weights_changing_adapter_per_model(folders, tmp_path):
    method = get_method("head-only")
    model = method.attach(load_tiny("bert-cls", folders)[0], method.parse_options({}), "sequence-classification")
    method.save(model, tmp_path / "head")
    with pytest.raises(ConfigError, match="one model holds one such adapter"):
        method.load(model, tmp_path / "head", adapter_name="second")


def test_impossible_combinations_fail_at_config_validation():
    from adapters.config import load_config

    raw = {
        "task": "causal-lm",
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"name": "trec"},
        "method": "head-only",
    }
    with pytest.raises(
        ConfigError, match="method 'head-only' does not support task 'causal-lm'; it supports: sequence-classification"
    ):
        load_config(raw=raw)
    with pytest.raises(ConfigError, match="method.blocks.*8 is more than the model's 6 blocks"):
        get_method("partial").check_model(
            get_method("partial").parse_options({"blocks": 8}),
            ModelInfo("bert", True, 6, 384),
            "sequence-classification",
        )
    with pytest.raises(ConfigError, match="method.blocks"):
        get_method("partial").parse_options({"blocks": 0})
    with pytest.raises(ConfigError, match="unknown option 'method.blocks' for method 'full'"):
        get_method("full").parse_options({"blocks": 2})
    quantized = {
        **raw,
        "task": "sequence-classification",
        "method": "full",
        "model": {"name": "x", "quantization": {"bits": 4}},
    }
    with pytest.raises(ConfigError, match="model.quantization: method 'full'"):
        load_config(raw=quantized)


def test_partial_on_a_cls_pooled_bert_includes_the_pooler(tiny_bert_dir):
    """BERT's own classifier sits on the pooler: partial trains it with the top blocks, head-only does not."""
    from adapters.config import ModelConfig
    from adapters.modeling.backbone import load_backbone

    def trained(name, **options):
        model = load_backbone(
            ModelConfig(name=str(tiny_bert_dir), pooling="cls"), "sequence-classification", {"a": 0, "b": 1}
        )
        model = get_method(name).attach(model, get_method(name).parse_options(options), "sequence-classification")
        return sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad})

    assert trained("head-only") == ["classifier"]
    partial = trained("partial", blocks=1)
    assert "bert.pooler.dense" in partial and "classifier" in partial
    assert all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier")) for n in partial), partial
