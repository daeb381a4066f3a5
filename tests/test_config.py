"""Config validation: every mistake is a ConfigError naming the key and the valid choices."""

from __future__ import annotations

import pytest

from adapters.config import load_config
from adapters.errors import ConfigError
from adapters.methods import base as methods_base
from adapters.methods import list_methods


def raw(**changes) -> dict:
    cfg = {
        "task": "causal-lm",
        "model": {"name": "smollm2-135m-instruct"},
        "data": {"name": "trec"},
        "method": "lora",
    }
    cfg.update(changes)
    return cfg


def test_a_valid_config_loads_with_method_shorthands():
    cfg = load_config(raw=raw(method={"name": "lora", "r": 4, "use_rslora": True}))
    options = cfg.method_options()
    assert (options.r, options.use_rslora) == (4, True)
    assert load_config(raw=raw(), overrides=["method.alpha=8", "train.lr=1e-3"]).method_options().alpha == 8


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"optimiser": "adamw"}, r"unknown config key 'optimiser'; valid keys here: task, model, data, method"),
        ({"train": {"lrr": 1e-3}}, r"unknown config key 'train\.lrr'; valid keys here: lr, head_lr"),
        ({"model": {"name": "x", "quantization": {"bitz": 4}}}, r"unknown config key 'model\.quantization\.bitz'; valid keys here: bits"),
    ],
)
def test_unknown_key_names_it_and_the_valid_keys(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(raw=raw(**changes))


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"train": {"lr": "fast"}}, r"config key 'train\.lr'.*got 'fast'"),
        ({"train": {"batch_size": 0}}, r"config key 'train\.batch_size'.*greater than or equal to 1"),
        ({"task": "translation"}, r"config key 'task'.*'causal-lm' or 'sequence-classification'"),
        ({"model": {"name": "x", "quantization": {"bits": 3}}}, r"config key 'model\.quantization\.bits'.*4 or 8"),
    ],
)
def test_wrong_type_or_value_names_the_key(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(raw=raw(**changes))


def test_unknown_method_lists_every_registered_method():
    with pytest.raises(ConfigError) as err:
        load_config(raw=raw(method="lorra"))
    message = str(err.value)
    assert "unknown method 'lorra'" in message
    for method in list_methods():
        assert method.name in message


def test_method_options_are_validated_per_method():
    with pytest.raises(ConfigError, match=r"unknown option 'method\.rank' for method 'lora'; valid options: r, alpha"):
        load_config(raw=raw(method={"name": "lora", "rank": 8}))
    with pytest.raises(ConfigError, match=r"method\.r \(lora\).*greater than or equal to 1"):
        load_config(raw=raw(method={"name": "lora", "r": 0}))
    with pytest.raises(ConfigError, match=r"method\.num_virtual_tokens \(prompt-tuning\)"):
        load_config(raw=raw(method={"name": "prompt-tuning", "num_virtual_tokens": "many"}))
    with pytest.raises(ConfigError, match=r"method\.encoder_reparameterization_type \(p-tuning\).*'MLP' or 'LSTM'"):
        load_config(raw=raw(method={"name": "p-tuning", "encoder_reparameterization_type": "GRU"}))


class _ClassifierOnly(methods_base.AdaptationMethod):
    name = "classifier-only-test"
    summary = "test double"
    tasks = frozenset({"sequence-classification"})


def test_method_task_mismatch_names_what_the_method_supports(monkeypatch):
    monkeypatch.setitem(methods_base._REGISTRY, _ClassifierOnly.name, _ClassifierOnly())
    with pytest.raises(
        ConfigError,
        match=r"method 'classifier-only-test' does not support task 'causal-lm'; it supports: sequence-classification",
    ):
        load_config(raw=raw(method="classifier-only-test"))
    load_config(raw=raw(task="sequence-classification", method="classifier-only-test"))


@pytest.mark.parametrize("name", [m.name for m in list_methods() if not m.supports_quantized])
def test_quantization_with_a_method_that_cannot_use_it(name):
    task = sorted(next(m for m in list_methods() if m.name == name).tasks)[0]
    with pytest.raises(ConfigError) as err:
        load_config(raw=raw(task=task, method=name, model={"name": "smollm2-135m-instruct", "quantization": {"bits": 4}}))
    message = str(err.value)
    assert f"model.quantization: method {name!r} does not support a quantized backbone" in message
    assert "lora" in message  # names the methods that do


def test_quantization_with_lora_is_qlora():
    cfg = load_config(raw=raw(model={"name": "smollm2-135m-instruct", "quantization": {"bits": 4}}))
    q = cfg.model.quantization
    assert (q.bits, q.quant_type, q.double_quant) == (4, "nf4", True)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"override 'train\.lr' must look like key\.path=value"):
        load_config(raw=raw(), overrides=["train.lr"])
