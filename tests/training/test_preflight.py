"""Checks before any weights load: a rank larger than the layers it adapts, a batch larger than the data."""

from __future__ import annotations

import pytest

from adapters.config import load_config
from adapters.errors import ConfigError
from adapters.methods import get_method
from adapters.training.preflight import adapted_layer_dims, check_batch_fits, check_rank_fits


def cfg_for(model_dir, run_dir=None, method=None, **train):
    return load_config(
        raw={
            "task": "causal-lm",
            "model": {"name": str(model_dir)},
            "data": {
                "name": "trec",
                "max_length": 48,
                "max_train_samples": 40,
                "max_eval_samples": 8,
                "max_test_samples": 8,
            },
            "method": method or {"name": "lora", "r": 4},
            "train": {"max_steps": 2, **train},
            "output": {"run_dir": str(run_dir) if run_dir else None},
        }
    )


@pytest.mark.parametrize(
    "method,limit,layer",
    [
        ({"name": "lora", "r": 17}, 16, "k_proj"),  # k/v project 32 -> 2 kv heads x 8 = 16
        ({"name": "dora", "r": 17, "target_modules": "attention"}, 16, "k_proj"),
        ({"name": "loha", "r": 33, "target_modules": "mlp"}, 32, "proj"),  # mlp: 32 <-> 64
        ({"name": "lokr", "r": 33, "target_modules": ["q_proj"]}, 32, "q_proj"),
    ],
)
def test_a_rank_larger_than_an_adapted_layer_is_refused(tiny_llama_dir, method, limit, layer):
    cfg = cfg_for(tiny_llama_dir, method=method)
    impl = get_method(cfg.method.name)
    pattern = rf"method\.r \({impl.name}\): \d+ is larger than .*{layer}.*method\.r <= {limit}$"
    with pytest.raises(ConfigError, match=pattern):
        check_rank_fits(cfg, impl, cfg.method_options())


def test_ranks_that_fit_pass_and_the_targets_are_peft_s(tiny_llama_dir):
    cfg = cfg_for(tiny_llama_dir, method={"name": "lora", "r": 16, "target_modules": "attention"})
    lora = get_method("lora")
    check_rank_fits(cfg, lora, cfg.method_options())
    dims = adapted_layer_dims(cfg, lora, cfg.method_options())
    assert sorted(dims) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert dims["model.layers.0.self_attn.k_proj"] == (16, 32)
    mlp = cfg_for(tiny_llama_dir, method={"name": "lora", "r": 32, "target_modules": "mlp", "top_layers": 1})
    assert sorted(adapted_layer_dims(mlp, lora, mlp.method_options())) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    everything = cfg_for(tiny_llama_dir, method={"name": "lora", "r": 8, "target_modules": "all-linear"})
    assert len(adapted_layer_dims(everything, lora, everything.method_options())) == 14  # 7 per block, no lm_head
    check_rank_fits(mlp, lora, mlp.method_options())
    vera = cfg_for(tiny_llama_dir, method={"name": "vera"})  # r=256 on a 32-wide model: VeRA's r may exceed a layer
    check_rank_fits(vera, get_method("vera"), vera.method_options())
    ia3 = cfg_for(tiny_llama_dir, method={"name": "ia3"})
    check_rank_fits(ia3, get_method("ia3"), ia3.method_options())  # no rank: nothing to check


def test_bert_mlp_group_leaves_the_attention_output_out(tiny_bert_dir):
    cfg = load_config(
        raw={
            "task": "sequence-classification",
            "model": {"name": str(tiny_bert_dir)},
            "data": {"name": "trec"},
            "method": {"name": "lora", "r": 32, "target_modules": "mlp"},
        }
    )
    dims = adapted_layer_dims(cfg, get_method("lora"), cfg.method_options())
    mlp = ("intermediate.dense", "output.dense")
    assert sorted(dims) == sorted(f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in mlp)
    check_rank_fits(cfg, get_method("lora"), cfg.method_options())


def test_a_global_batch_larger_than_the_training_rows_is_refused():
    cfg = load_config(
        raw={
            "task": "causal-lm",
            "model": {"name": "x"},
            "data": {"name": "trec"},
            "train": {"batch_size": 8, "grad_accum": 2},
        }
    )
    check_batch_fits(cfg, 16, 1)
    with pytest.raises(
        ConfigError,
        match=r"train\.batch_size: 8 x train\.grad_accum 2 x 2 process\(es\) = 32 "
        r"rows per optimizer step, but the training split has 20 rows; "
        r"use train\.batch_size <= 5",
    ):
        check_batch_fits(cfg, 20, 2)


def test_train_refuses_both_before_any_weights_load(tiny_llama_dir, tmp_path, monkeypatch):
    from adapters.training import setup
    from adapters.training.loop import train

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(setup, "load_backbone", no_weights)
    with pytest.raises(ConfigError, match=r"method\.r \(lora\): 64 is larger"):
        train(cfg_for(tiny_llama_dir, tmp_path / "rank", method={"name": "lora", "r": 64}))
    assert not (tmp_path / "rank").exists(), "refused before the run folder was made"
    with pytest.raises(ConfigError, match=r"train\.batch_size: 64 x .* but the training split has 40 rows"):
        train(cfg_for(tiny_llama_dir, tmp_path / "batch", batch_size=64))
