"""Config validation: every mistake is a ConfigError naming the key and the valid choices."""

from __future__ import annotations

import os
import re
from pathlib import Path

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
        (
            {"model": {"name": "x", "quantization": {"bitz": 4}}},
            r"unknown config key 'model\.quantization\.bitz'; valid keys here: bits",
        ),
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
        load_config(
            raw=raw(task=task, method=name, model={"name": "smollm2-135m-instruct", "quantization": {"bits": 4}})
        )
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


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (
            ["train.early_stopping.metric=eval_acc"],
            r"train\.early_stopping\.metric: 'eval_acc' is not a validation metric of causal-lm; "
            r"valid: eval_loss, eval_perplexity, eval_exact_match$",
        ),
        (
            ["task=sequence-classification", "train.early_stopping.metric=eval_exact_match"],
            r"train\.early_stopping\.metric: 'eval_exact_match'.*valid: eval_loss, eval_accuracy, eval_f1_macro, "
            r"eval_f1_micro, eval_precision_macro, eval_recall_macro, eval_mcc$",
        ),
        (["train.lr=.nan"], r"config key 'train\.lr': Input should be a finite number \(got nan\)"),
        (["train.weight_decay=.inf"], r"config key 'train\.weight_decay': Input should be a finite number"),
        (["train.max_grad_norm=.inf"], r"config key 'train\.max_grad_norm': Input should be a finite number"),
        (["model.dropout=.nan"], r"config key 'model\.dropout': Input should be a finite number"),
        (["method.alpha=.inf"], r"method\.alpha \(lora\): Input should be a finite number"),
        (["train.seed=-1"], r"config key 'train\.seed': Input should be greater than or equal to 0"),
        (["train.seed=4294967296"], r"config key 'train\.seed': Input should be less than or equal to 4294967295"),
        (["data.truncation.prompt_side=middle"], r"config key 'data\.truncation\.prompt_side'.*'left' or 'right'"),
        (["data.truncation.long_response=skip"], r"config key 'data\.truncation\.long_response'.*'truncate' or 'drop'"),
    ],
)
def test_values_that_would_fail_later_are_refused_naming_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(raw=raw(), overrides=overrides)


def test_every_metric_a_task_validates_with_can_be_watched():
    from adapters.config import validation_metrics

    for metric in validation_metrics("causal-lm"):
        load_config(raw=raw(), overrides=[f"train.early_stopping.metric={metric}"])
    for metric in validation_metrics("sequence-classification"):
        load_config(raw=raw(task="sequence-classification"), overrides=[f"train.early_stopping.metric={metric}"])
    assert load_config(raw=raw(), overrides=["train.seed=4294967295"]).train.seed == 2**32 - 1
    truncation = load_config(raw=raw()).data.truncation
    assert (truncation.side("causal-lm"), truncation.side("sequence-classification")) == ("left", "right")


def test_train_script_refuses_a_misspelled_metric_with_exit_2_and_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "task: sequence-classification\nmodel: {name: x}\ndata: {name: trec}\n"
        "train: {early_stopping: {metric: eval_acc, mode: max}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", str(cfg)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: train.early_stopping.metric: 'eval_acc' is not a validation metric of sequence-classification; "
        "valid: eval_loss, eval_accuracy, eval_f1_macro, eval_f1_micro, eval_precision_macro, eval_recall_macro, "
        "eval_mcc"
    ]


# ---------------------------------------------------------------- YAML reading (issue 19)
def _count_values(value) -> int:
    """Nodes of a loaded YAML value, every alias expanded (what _expanded_size computes without expanding)."""
    if isinstance(value, dict):
        return 1 + sum(_count_values(k) + _count_values(v) for k, v in value.items())
    if isinstance(value, list):
        return 1 + sum(_count_values(v) for v in value)
    return 1


@pytest.mark.parametrize(
    "text",
    [
        "task: causal-lm\ntrain: {lr: 1.0e-3}\n",
        "base: &b {lr: 1.0e-3, batch_size: 8}\ntrain: *b\neval: [*b, *b, [*b]]\n",
        "a: &a [1, 2, 3]\nb: &b [*a, *a, *a]\nc: [*b, *b, {x: *a}]\n",
    ],
)
def test_parse_yaml_matches_pyyaml_and_counts_the_expansion(text):
    import yaml

    from adapters.config import MAX_YAML_NODES, _expanded_size, parse_yaml

    assert parse_yaml(text, "t.yaml") == yaml.safe_load(text)
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    assert _expanded_size(node, MAX_YAML_NODES) == _count_values(yaml.safe_load(text))


def test_billion_laughs_is_refused_in_milliseconds():
    import time

    from adapters.config import parse_yaml

    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"x\.yaml: the YAML expands to more than 100,000 values"):
        parse_yaml("\n".join(levels) + "\n", "x.yaml")
    assert time.perf_counter() - started < 1.0


def test_config_file_bytes_and_size_are_checked(tmp_path):
    from adapters.config import MAX_CONFIG_BYTES

    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"task: causal-lm\ndata: {name: caf\xe9}\n")
    with pytest.raises(ConfigError, match=r"latin\.yaml: not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_config(latin)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\ntask: causal-lm\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: larger than 1,048,576 bytes"):
        load_config(big)
    with pytest.raises(ConfigError, match=r"is a folder; valid: a YAML file"):
        load_config(tmp_path)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would wait for a writer
    for special in (fifo, Path("/dev/zero")):  # exists, but is no plain file: not "not found"
        with pytest.raises(ConfigError, match=r"not a plain file; valid: a YAML file"):
            load_config(special)
    dup = tmp_path / "dup.yaml"
    dup.write_text("task: causal-lm\ntask: sequence-classification\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: key 'task' appears twice in one mapping \(lines 1 and 2\)"):
        load_config(dup)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["method.r=100000000"], r"method\.r \(lora\): 100000000 is too large; valid: 1\.\.4096"),
        (["output.name=../../evil"], r"invalid output\.name '\.\./\.\./evil'"),
        (['output.name="evil\\n"'], r"output\.name 'evil\\n': control characters"),
        (["train.lr=[1,"], r"--set train\.lr: not valid YAML: .*\(line 1, column 4\)"),
        (["data.split.validation=0.5", "data.split.test=0.5"], r"data\.split: validation 0\.5 \+ test 0\.5"),
        (["train.epochs=1e7"], r"config key 'train\.epochs': Input should be less than or equal to 1000000"),
        (["train..lr=1"], r"empty key"),
    ],
)
def test_sizes_names_and_overrides_checked_before_a_model_loads(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(raw=raw(), overrides=overrides)


def test_largest_allowed_values_still_validate():
    from adapters.config import METHOD_OPTION_LIMITS

    cfg = load_config(raw=raw(), overrides=[f"method.r={METHOD_OPTION_LIMITS['r']}", "output.name=team.adapter-2"])
    assert cfg.method_options().r == 4096 and cfg.output.name == "team.adapter-2"


def test_the_resume_trust_flag_is_never_recorded():
    from adapters.config import dump_config

    cfg = load_config(raw=raw(), overrides=["train.resume_trust_pickle=true"])
    assert cfg.train.resume_trust_pickle is True
    assert "resume_trust_pickle" not in dump_config(cfg)["train"]
    assert dump_config(cfg) == dump_config(load_config(raw=raw()))


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=true", "train.batch_size"),
        ("train.lr=true", "train.lr"),
        ("train.max_steps=false", "train.max_steps"),  # int | None
        ("model.dropout=true", "model.dropout"),  # float | None
        ("train.early_stopping.patience=true", "train.early_stopping.patience"),
        ("data.max_length=true", "data.max_length"),
    ],
)
def test_a_boolean_is_not_a_number(override, key):
    """YAML's true/false are bools, which pydantic's lax mode reads as 1/0 for a number field."""
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': must be a number, not a boolean") as err:
        load_config(raw=raw(), overrides=[override])
    assert "\n" not in str(err.value)


def test_numbers_and_boolean_fields_still_validate():
    cfg = load_config(raw=raw(), overrides=["train.lr=1", "train.batch_size=4", "train.packing=true", "data.strict=no"])
    assert cfg.train.lr == 1.0 and cfg.train.batch_size == 4 and cfg.train.packing is True and cfg.data.strict is False


def test_check_refuses_the_local_model_names_the_run_refuses(tmp_path, monkeypatch):
    """config validation and resolve_model (what the run loads) apply one rule to model.name."""
    from adapters.modeling.builtins import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hi")
    refused = {
        str(tmp_path / "nonexistent-folder"): r"model\.name: folder .*nonexistent-folder does not exist",
        "./nonexistent": r"model\.name: folder \./nonexistent does not exist",
        "~/surely-not-here-adapterkit": r"model\.name: folder ~/surely-not-here-adapterkit does not exist",
        str(tmp_path / "empty"): r"model\.name: folder .*empty has no config\.json and no \.gguf file",
        "empty": r"model\.name: folder empty has no config\.json and no \.gguf file",  # relative, existing
        str(tmp_path / "notes.txt"): r"model\.name: .*notes\.txt is a file; valid: a model folder",
    }
    for name, pattern in refused.items():
        with pytest.raises(ConfigError, match=pattern) as check:
            load_config(raw=raw(model={"name": name}))
        with pytest.raises(ConfigError) as run:
            resolve_model(name)
        assert str(check.value) == str(run.value)
    assert load_config(raw=raw(model={"name": str(tmp_path / "hf")})).model.name == str(tmp_path / "hf")
    assert resolve_model(str(tmp_path / "hf")) == str(tmp_path / "hf")
    # hub ids are not local paths: validation passes (the hub is asked when the model loads)
    for hub_id in ("org/model", "HuggingFaceTB/SmolLM2-135M", "gpt2"):
        assert load_config(raw=raw(model={"name": hub_id})).model.name == hub_id


def test_a_boolean_is_not_a_number_in_method_options_either():
    with pytest.raises(ConfigError, match=r"method\.r \(lora\): must be a number, not a boolean \(got True\)"):
        load_config(raw=raw(), overrides=["method.r=true"]).method_options()
