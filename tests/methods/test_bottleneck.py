"""Bottleneck adapters (Houlsby / Pfeiffer): a peft tuner of ours, trained, saved, reloaded, switched."""

from __future__ import annotations

import json

import pytest

from adapters.errors import ConfigError
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

# (method name, options, backbone kind): both variants, both tasks, BERT and Llama.
MATRIX = [
    ("bottleneck", {"variant": "houlsby"}, "llama-lm"),
    ("pfeiffer", {"non_linearity": "gelu"}, "llama-lm"),
    ("bottleneck", {"variant": "houlsby", "reduction_factor": 4}, "bert-cls"),
    ("bottleneck", {"variant": "pfeiffer", "non_linearity": "swish"}, "llama-cls"),
    ("houlsby", {"non_linearity": "tanh", "top_layers": 1}, "bert-cls"),
]


def base_bytes(model) -> int:
    """What a copy of the whole base would weigh (each tensor once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def scramble_head(model) -> None:
    """Give a fresh classifier a different random head, so only a saved head can reproduce the logits."""
    import torch

    from adapters.methods.targets import head_module_names

    gen = torch.Generator().manual_seed(99)
    for name in head_module_names(model):
        for p in getattr(model, name).parameters():
            p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("name,options,kind", MATRIX, ids=[f"{m[0]}-{m[2]}" for m in MATRIX])
def test_trains_saves_and_reloads_to_identical_logits(name, options, kind, folders, tmp_path, record_property):
    import torch

    task = BACKBONES[kind][0]
    method = get_method(name)
    opts = method.parse_options(options)
    base, _ = load_tiny(kind, folders)
    batch = make_batch(base, task)
    base_logits = logits_of(base, batch)
    base_size = base_bytes(base)
    model = method.attach(base, opts, task)
    # Near-identity init: the freshly adapted model computes exactly what the base did.
    assert torch.allclose(logits_of(model, batch), base_logits, atol=1e-6)
    trainable = trainable_count(model)
    assert 0 < trainable < 0.2 * sum(p.numel() for p in model.parameters())

    before, after = train_steps(model, batch, steps=10, lr=1e-2)
    assert after < before, (before, after)
    trained_logits = logits_of(model, batch)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)

    folder = tmp_path / "adapter"
    method.save(model, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["adapterkit_method"] == name
    assert cfg["variant"] == method.variant(opts)
    saved = folder_bytes(folder)
    assert saved < 0.1 * base_size
    assert method_of_folder(folder).name == name

    fresh, _ = load_tiny(kind, folders)
    scramble_head(fresh)
    reloaded = method.load(fresh, folder)
    assert torch.allclose(logits_of(reloaded, batch), trained_logits, atol=1e-6)
    record_property("trainable_params", trainable)
    record_property("saved_bytes", saved)
    print(f"{name} {kind}: {trainable} trainable params, {saved} bytes saved (base {base_size})")


def test_where_the_adapters_go(folders):
    from adapters.methods.tuners.bottleneck import BottleneckLayer

    def adapted(kind, name, **options):
        method = get_method(name)
        model = method.attach(load_tiny(kind, folders)[0], method.parse_options(options), BACKBONES[kind][0])
        return sorted(
            n.split("base_model.model.")[-1] for n, m in model.named_modules() if isinstance(m, BottleneckLayer)
        )

    assert adapted("llama-lm", "houlsby") == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    assert adapted("llama-lm", "pfeiffer") == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # BERT: the dense projections that feed BertSelfOutput / BertOutput's residual + LayerNorm.
    assert adapted("bert-cls", "bottleneck", variant="houlsby", layers=[1]) == [
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    assert adapted("bert-cls", "pfeiffer") == [
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]


def test_bottleneck_width_and_head_kept_trainable(folders):
    method = get_method("bottleneck")
    model = method.attach(
        load_tiny("bert-cls", folders)[0], method.parse_options({"reduction_factor": 8}), "sequence-classification"
    )
    down = next(m for n, m in model.named_modules() if n.endswith("layer.0.output.dense.bottleneck_down.default"))
    assert (down.in_features, down.out_features) == (32, 4)  # hidden 32 / 8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert not any("word_embeddings" in n or n.endswith("output.dense.base_layer.weight") for n in trainable)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("llama", {"num_key_value_heads": 2, "intermediate_size": 32}),
        ("mistral", {"num_key_value_heads": 2, "intermediate_size": 32}),
        ("qwen2", {"num_key_value_heads": 2, "intermediate_size": 32}),
        ("bert", {"intermediate_size": 32}),
        ("roberta", {"intermediate_size": 32}),
        ("xlm-roberta", {"intermediate_size": 32}),
        ("electra", {"intermediate_size": 32, "embedding_size": 16}),
        ("distilbert", {"dim": 16, "hidden_dim": 32, "n_layers": 2, "n_heads": 2}),
    ],
)
def test_every_supported_architecture_is_hooked(model_type, extra):
    """Each listed model type gets one adapter per block (pfeiffer) and two (houlsby), and starts as the base."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModel

    from adapters.methods.targets import BOTTLENECK_MODEL_TYPES
    from adapters.methods.tuners.bottleneck import BottleneckConfig, BottleneckLayer

    assert model_type in BOTTLENECK_MODEL_TYPES
    kwargs = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, **extra}
    if model_type == "distilbert":
        kwargs = {"vocab_size": 64, **extra}
    torch.manual_seed(0)
    x = torch.randint(3, 60, (1, 6))
    for variant, per_block in (("pfeiffer", 1), ("houlsby", 2)):
        base = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
        ref = base(input_ids=x).last_hidden_state
        model = get_peft_model(base, BottleneckConfig(variant=variant)).eval()
        hooked = [n for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]
        assert len(hooked) == 2 * per_block, hooked
        assert torch.allclose(model(input_ids=x).last_hidden_state, ref, atol=1e-6)


def test_side_by_side_adapters_switch_and_disable(folders, tmp_path):
    import torch

    task = "causal-lm"
    method = get_method("bottleneck")
    adapter_folders, expected = {}, {}
    # Names must not be substrings of peft's parameter prefix "bottleneck_" (peft warns about "b").
    for name, variant, seed in (("trec", "houlsby", 1), ("spam", "pfeiffer", 2)):
        base = load_tiny("llama-lm", folders)[0]
        batch = make_batch(base, task)
        torch.manual_seed(seed)
        model = method.attach(base, method.parse_options({"variant": variant, "init": "random"}), task)
        train_steps(model, batch, steps=4, lr=1e-2)
        expected[name] = logits_of(model, batch)
        adapter_folders[name] = tmp_path / name
        method.save(model, adapter_folders[name])

    base = load_tiny("llama-lm", folders)[0]
    base_logits = logits_of(base, batch)
    model = method.load(base, adapter_folders["trec"], adapter_name="trec")
    model = method.load(model, adapter_folders["spam"], adapter_name="spam")
    assert set(model.peft_config) == {"trec", "spam"}

    model.set_adapter("trec")
    out_a = logits_of(model, batch)
    model.set_adapter("spam")
    out_b = logits_of(model, batch)
    assert torch.allclose(out_a, expected["trec"], atol=1e-6)
    assert torch.allclose(out_b, expected["spam"], atol=1e-6)
    assert (out_a - out_b).abs().max() > 1e-2
    assert (out_a - base_logits).abs().max() > 1e-2
    with model.disable_adapter():
        assert torch.allclose(logits_of(model, batch), base_logits, atol=1e-6)
    assert torch.allclose(logits_of(model, batch), out_b, atol=1e-6)  # re-enabled afterwards


@pytest.mark.parametrize("kind", ["llama-lm", "bert-cls"])
def test_mixed_batch_gives_each_row_its_own_adapter_and_head(kind, folders, tmp_path):
    """mixable=True: adapter_names per row reproduces each adapter's (and each saved head's) own output."""
    import torch

    task = BACKBONES[kind][0]
    method = get_method("bottleneck")
    assert method.mixable
    for name, seed in (("trec", 1), ("spam", 2)):
        base = load_tiny(kind, folders)[0]  # seeds torch itself: seed after it
        torch.manual_seed(seed)
        model = method.attach(base, method.parse_options({"init": "random"}), task)
        with torch.no_grad():  # a distinct adapter and head without training
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        method.save(model, tmp_path / name)
    model = method.load(load_tiny(kind, folders)[0], tmp_path / "trec", adapter_name="trec")
    model = method.load(model, tmp_path / "spam", adapter_name="spam")
    batch = make_batch(model, task)
    single = {}
    for name in ("trec", "spam"):
        model.set_adapter(name)
        single[name] = logits_of(model, batch)
    with model.disable_adapter():
        single["__base__"] = logits_of(model, batch)
    rows = ["spam", "__base__", "trec", "spam"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=rows).logits
    want = torch.stack([single[name][i] for i, name in enumerate(rows)])
    assert torch.allclose(mixed, want, atol=1e-5)
    assert not torch.allclose(single["trec"], single["spam"], atol=1e-3)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(**inputs, adapter_names=["trec", "nope", "trec", "trec"])


def test_trains_on_a_4bit_base(tmp_path):
    """The adapter reads only the wrapped layer's output, so a bitsandbytes 4-bit base works (QLoRA-style)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters.config import ModelConfig, QuantizationConfig
    from adapters.modeling.backbone import load_backbone

    method = get_method("bottleneck")
    assert method.supports_quantized
    torch.manual_seed(0)  # width 64: bitsandbytes' CPU 4-bit kernels reject the width-32 tiny model
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "base"))
    model_cfg = ModelConfig(name=str(tmp_path / "base"), quantization=QuantizationConfig(bits=4))
    model = method.attach(load_backbone(model_cfg, "causal-lm"), method.parse_options({}), "causal-lm")
    assert type(model.base_model.model.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    batch = make_batch(model, "causal-lm")
    before, after = train_steps(model, batch, steps=6, lr=1e-2)
    assert after < before
    expected = logits_of(model, batch)
    method.save(model, tmp_path / "q")
    reloaded = method.load(load_backbone(model_cfg, "causal-lm"), tmp_path / "q")
    assert torch.allclose(logits_of(reloaded, batch), expected, atol=1e-6)


def test_plain_peft_loads_the_folder(folders, tiny_llama_dir, tmp_path):
    """With adapters.methods.tuners.bottleneck imported, peft's own API loads, switches and deletes our adapters."""
    import torch
    from peft import PeftModel, PeftType
    from transformers import AutoModelForCausalLM

    import adapters.methods.tuners.bottleneck  # noqa: F401

    task = "causal-lm"
    method = get_method("pfeiffer")
    base = load_tiny("llama-lm", folders)[0]
    batch = make_batch(base, task)
    torch.manual_seed(5)
    model = method.attach(base, method.parse_options({"init": "random"}), task)
    expected = logits_of(model, batch)
    method.save(model, tmp_path / "p")

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(tmp_path / "p")
    )
    assert peft_model.peft_config["default"].peft_type is PeftType.BOTTLENECK
    assert PeftType("BOTTLENECK") in list(PeftType)
    assert torch.allclose(logits_of(peft_model, batch), expected, atol=1e-6)
    peft_model.load_adapter(str(tmp_path / "p"), adapter_name="copy")
    peft_model.delete_adapter("default")
    peft_model.set_adapter("copy")
    assert torch.allclose(logits_of(peft_model, batch), expected, atol=1e-6)
    with pytest.raises(TypeError, match="cannot be merged"):
        peft_model.merge_and_unload()
    with peft_model.disable_adapter():
        bare = logits_of(peft_model, batch)
    unloaded = peft_model.unload()  # removes the adapters, keeps the base
    assert type(unloaded).__name__ == "LlamaForCausalLM"
    assert torch.allclose(logits_of(unloaded, batch), bare, atol=1e-6)


def test_unsupported_architecture_and_bad_options_fail_at_validation():
    method = get_method("bottleneck")
    opts = method.parse_options({})
    with pytest.raises(ConfigError, match="gpt2.*supported model types: .*bert.*llama"):
        method.check_model(opts, ModelInfo("gpt2", False, 12, 768), "causal-lm")
    with pytest.raises(ConfigError, match=r"method.layers.*\[5\].*0\.\.1"):
        method.check_model(method.parse_options({"layers": [0, 5]}), ModelInfo("llama", False, 2, 32), "causal-lm")
    with pytest.raises(ConfigError, match="method.variant.*'houlsby' or 'pfeiffer'"):
        method.parse_options({"variant": "parallel"})
    with pytest.raises(ConfigError, match="method.non_linearity"):
        method.parse_options({"non_linearity": "softmax"})
    with pytest.raises(ConfigError, match="method.top_layers.*either layers or top_layers"):
        method.parse_options({"layers": [0], "top_layers": 1})
    with pytest.raises(ConfigError, match="residual=false with init=near-identity"):
        method.parse_options({"residual": False})
    with pytest.raises(ConfigError, match="unknown option 'method.variant' for method 'pfeiffer'"):
        get_method("pfeiffer").parse_options({"variant": "houlsby"})
    method.check_model(opts, ModelInfo("bert", True, 6, 384), "sequence-classification")  # supported: no error


@pytest.mark.real_model
def test_minilm_trec_classifier_trains_and_reloads(minilm_dir, tmp_path, record_property):
    """The real MiniLM as a mean-pooled TREC classifier with bottleneck adapters: loss falls, reload is exact."""
    import time

    import torch
    from transformers import AutoTokenizer

    from adapters.config import ModelConfig
    from adapters.data.builtins import BUILTIN_DATASETS
    from adapters.modeling.backbone import load_backbone

    rows = BUILTIN_DATASETS["trec"].load().shuffle(seed=0).select(range(256))
    labels = sorted(set(rows["label"]))
    label2id = {label: i for i, label in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    batches = []
    for i in range(0, len(rows), 16):
        enc = tok(rows["text"][i : i + 16], padding=True, truncation=True, max_length=24, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor([label2id[label] for label in rows["label"][i : i + 16]])})

    method = get_method("bottleneck")
    opts = method.parse_options({"variant": "houlsby", "reduction_factor": 16})
    method.check_model(opts, ModelInfo("bert", True, 6, 384), "sequence-classification")
    torch.manual_seed(0)
    model = method.attach(
        load_backbone(ModelConfig(name=str(minilm_dir)), "sequence-classification", label2id),
        opts,
        "sequence-classification",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for batch in batches:  # one pass over 256 rows: 16 steps
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    train_seconds = time.perf_counter() - t0
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)

    model.eval()
    held_out = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model(**held_out).logits
    folder = tmp_path / "minilm-bottleneck"
    method.save(model, folder)
    fresh = load_backbone(ModelConfig(name=str(minilm_dir)), "sequence-classification", label2id)
    reloaded = method.load(fresh, folder).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**held_out).logits, expected, atol=1e-6)
    trainable = sum(p.numel() for p in params)
    saved = (folder / "adapter_model.safetensors").stat().st_size
    record_property("trainable_params", trainable)
    record_property("saved_bytes", saved)
    print(
        f"MiniLM bottleneck: loss {first:.3f} -> {last:.3f} in {train_seconds:.1f} s, "
        f"{trainable} trainable params, {saved} bytes"
    )
