"""Artifacts load outside adapterkit with adapterkit's outputs, and bad ones are refused.

Freshly trained tiny adapters (tiny Llama / tiny BERT with real tokenizers, TREC): a LoRA causal LM,
a LoRA classifier that mean-pools, a bottleneck adapter and a full fine-tune. The plain runtime each
artifact's model card names loads it, and ``adapterkit parity`` finds its outputs equal to the
engine's (probabilities within 1e-4, greedy tokens equal); merged exports likewise under plain
transformers. Adapters whose tensors do not land on the base are refused everywhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.config import ModelConfig, load_config
from adapters.errors import BaseMismatchError, ConfigError
from adapters.methods import get_method
from adapters.modeling import mean_pooling
from adapters.modeling.backbone import load_backbone, load_tokenizer
from adapters.modeling.portable import MODELING_FILE, loading_of, write_portable_files
from adapters.serving.engine import ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.serving.export import export_peft
from adapters.serving.merge import merge_and_export
from adapters.serving.parity import run_parity
from adapters.serving.standalone import StandaloneEngine
from adapters.store.manifest import read_manifest, write_manifest
from tests.helpers.serving import make_adapter

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["Who wrote Hamlet?", "Where is the Eiffel Tower?", "How many legs does a spider have?"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_tiny(base_dir: Path, run_dir: Path, task: str, method: dict, pooling: str = "auto") -> Path:
    """A few real training steps on TREC; returns the adapter folder training wrote."""
    from adapters.training.loop import train

    raw = {
        "task": task,
        "model": {"name": str(base_dir), "pooling": pooling},
        "data": {
            "name": "trec",
            "max_length": 48,
            "max_train_samples": 64,
            "max_eval_samples": 16,
            "max_test_samples": 16,
        },
        "method": method,
        "train": {"lr": 2e-2, "batch_size": 8, "max_steps": 4, "log_every": 2, "seed": 1, "eval_batch_size": 16},
        "eval": {"max_new_tokens": 3, "baseline": False},
        "output": {"run_dir": str(run_dir), "name": run_dir.name},
    }
    return train(load_config(raw=raw)).adapter_dir


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifact-store")


@pytest.fixture(scope="module")
def lm_lora(tiny_llama_dir, tmp_path_factory) -> Path:
    return train_tiny(
        tiny_llama_dir,
        tmp_path_factory.mktemp("runs") / "lm-lora",
        "causal-lm",
        {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    )


@pytest.fixture(scope="module")
def cls_lora(tiny_bert_dir, tmp_path_factory) -> Path:
    return train_tiny(
        tiny_bert_dir,
        tmp_path_factory.mktemp("runs") / "cls-lora",
        "sequence-classification",
        {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        pooling="mean",
    )


@pytest.fixture(scope="module")
def lm_bottleneck(tiny_llama_dir, tmp_path_factory) -> Path:
    return train_tiny(
        tiny_llama_dir,
        tmp_path_factory.mktemp("runs") / "lm-bottleneck",
        "causal-lm",
        {"name": "bottleneck", "reduction_factor": 8},
    )


@pytest.fixture(scope="module")
def cls_full(tiny_bert_dir, tmp_path_factory) -> Path:
    return train_tiny(
        tiny_bert_dir,
        tmp_path_factory.mktemp("runs") / "cls-full",
        "sequence-classification",
        {"name": "full"},
        pooling="mean",
    )


def assert_parity(report, rows: int = 8) -> None:
    assert len(report.rows) == rows and report.passed, report.table()
    assert report.max_diff <= 1e-4


def tensor_keys(folder: Path) -> list[str]:
    return sorted(load_file(str(folder / "adapter_model.safetensors")))


# ------------------------------------------------------------------ what loads each artifact
def test_lora_causal_lm_loads_in_plain_peft_and_merged_in_transformers(lm_lora, tiny_llama_dir, store):
    config = json.loads((lm_lora / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_dir.resolve())
    assert (lm_lora / "tokenizer.json").is_file() and (lm_lora / "chat_template.jinja").is_file()
    assert "AutoPeftModelForCausalLM.from_pretrained" in (lm_lora / "README.md").read_text()
    assert loading_of(lm_lora).auto_class == "AutoPeftModelForCausalLM"
    report = run_parity(str(lm_lora), "peft", store=store)
    assert_parity(report)
    assert report.effect > 1e-2  # the adapter moves the base far more than the tolerance: not a vacuous pass
    assert_parity(run_parity(str(lm_lora), "transformers", store=store))  # merged, AutoModelForCausalLM


def test_mean_pooling_classifier_loads_with_its_remote_code_class(cls_lora, tiny_bert_dir, store, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    config = json.loads((cls_lora / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert_dir.resolve())
    keys = tensor_keys(cls_lora)
    assert keys and all(k.startswith(("base_model.model.bert.", "base_model.model.classifier.")) for k in keys), keys
    folder_config = json.loads((cls_lora / "config.json").read_text())
    auto = folder_config["auto_map"]["AutoModelForSequenceClassification"]
    assert auto == "modeling_adapterkit.MeanPoolingForSequenceClassification"
    assert (cls_lora / MODELING_FILE).read_text() == Path(mean_pooling.__file__).read_text()
    assert_parity(run_parity(str(cls_lora), "peft", store=store))

    # plain transformers + peft (the remote-code class) and pipeline, as the model card says
    labels = read_manifest(cls_lora)["labels"]
    engine = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", pooling="mean", store=store)
    served = engine.classify([ClassificationRequest(str(cls_lora), t) for t in TEXTS])
    model = AutoModelForSequenceClassification.from_pretrained(str(cls_lora), trust_remote_code=True).eval()
    assert list(model.config.id2label.values()) == labels
    enc = load_tokenizer(ModelConfig(name=str(tiny_bert_dir)))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits, -1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
        without_lora = torch.softmax(model(**enc).logits, -1)
    assert (probs - without_lora).abs().max() > 1e-3  # the LoRA tensors matter: their parity is not vacuous
    classify = pipeline("text-classification", model=str(cls_lora), trust_remote_code=True, top_k=None)
    for text, ours in zip(TEXTS, served):
        theirs = {row["label"]: row["score"] for row in classify([text])[0]}
        assert max(abs(theirs[k] - p) for k, p in ours.probabilities.items()) < 1e-4

    # merged: one folder, plain transformers + pipeline give the same answers
    merged = tmp_path / "merged"
    assert merge_and_export(str(tiny_bert_dir), str(cls_lora), merged, store=store)["check"]["passed"]
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["MeanPoolingForSequenceClassification"]
    assert not (merged / "classifier.safetensors").exists()
    classify = pipeline("text-classification", model=str(merged), trust_remote_code=True, top_k=None)
    for text, ours in zip(TEXTS, served):
        theirs = {row["label"]: row["score"] for row in classify([text])[0]}
        assert max(abs(theirs[k] - p) for k, p in ours.probabilities.items()) < 1e-4
    assert_parity(run_parity(str(cls_lora), "transformers", store=store, artifact=str(merged)))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_standard_head_classifier_loads_in_plain_peft_with_its_labels(
    kind, tiny_bert_dir, tiny_llama_dir, store, tmp_path
):
    base = tiny_bert_dir if kind == "bert" else tiny_llama_dir  # BERT's CLS head, Llama's last-token head
    labels = ["neg", "neu", "pos"]
    adapter = make_adapter(base, tmp_path / "cls", task="sequence-classification", labels=labels, seed=5)
    model_cfg = ModelConfig(name=str(base))
    model = get_method("lora").load(
        load_backbone(model_cfg, "sequence-classification", {"neg": 0, "neu": 1, "pos": 2}), adapter
    )
    write_portable_files(adapter, model, load_tokenizer(model_cfg))  # what training's finalize writes
    write_manifest(adapter, read_manifest(adapter))
    loading = loading_of(adapter)
    assert loading.auto_class == "AutoPeftModelForSequenceClassification" and not (adapter / "config.json").exists()
    assert loading.kwargs["id2label"] == {0: "neg", 1: "neu", 2: "pos"}
    assert "id2label={0: 'neg', 1: 'neu', 2: 'pos'}" in (adapter / "README.md").read_text()
    assert_parity(run_parity(str(adapter), "peft", store=store, texts=TEXTS), rows=len(TEXTS))
    assert_parity(run_parity(str(adapter), "transformers", store=store, texts=TEXTS), rows=len(TEXTS))


def test_bottleneck_adapter_loads_in_a_fresh_process_and_in_plain_peft(lm_bottleneck, tiny_llama_dir, store, tmp_path):
    assert "import adapters.methods.tuners.bottleneck" in (lm_bottleneck / "README.md").read_text()
    # a fresh process serving it: the engine registers the BOTTLENECK peft type itself
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "infer.py"),
            "--base",
            str(tiny_llama_dir),
            "--adapter",
            str(lm_bottleneck),
            "--prompt",
            "Who wrote Hamlet?",
            "--max-new-tokens",
            "3",
            "--store",
            str(store),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert_parity(run_parity(str(lm_bottleneck), "peft", store=store))
    with pytest.raises(ConfigError, match="cannot be merged.*non-linear"):
        merge_and_export(str(tiny_llama_dir), str(lm_bottleneck), tmp_path / "merged", store=store)


def test_full_fine_tune_is_a_standalone_model_for_infer_export_and_server(
    cls_full, tiny_bert_dir, store, tmp_path, capsys
):
    from fastapi.testclient import TestClient

    from adapters.cli.infer import main as infer
    from adapters.serving.http.app import create_app
    from adapters.serving.http.settings import ServerSettings

    assert loading_of(cls_full).kind == "adapterkit"
    assert "export REF --to merged" in (cls_full / "README.md").read_text()
    argv = [
        "--task",
        "sequence-classification",
        "--base",
        str(tiny_bert_dir),
        "--adapter",
        str(cls_full),
        "--prompt",
        TEXTS[0],
        "--store",
        str(store),
    ]
    assert infer(argv) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    engine = StandaloneEngine(str(tiny_bert_dir), str(cls_full), task="sequence-classification", store=store)
    served = engine.classify([ClassificationRequest(str(cls_full), t) for t in TEXTS])
    assert answer["label"] == served[0].label
    assert answer["probabilities"] == pytest.approx(served[0].probabilities, abs=1e-6)
    with pytest.raises(ConfigError, match="serves .* only"):
        engine.generate([GenerationRequest(adapter="base", prompt="x")])
    with pytest.raises(ConfigError, match="takes no other adapters"):
        engine.load(str(tmp_path))

    # the server, dedicated to it
    settings = ServerSettings(allow_path_refs=True, batch_window_ms=2)
    with TestClient(create_app(engine, settings)) as client:
        r = client.post("/v1/classify", json={"model": str(cls_full), "input": TEXTS})
        assert r.status_code == 200, r.text
        assert [x["label"] for x in r.json()["results"]] == [s.label for s in served]
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert listed == [str(cls_full)]  # not base, not the store's other adapters: it refuses them

    # export --to merged: plain transformers loads it with the same answers; --to peft is refused
    assert_parity(run_parity(str(cls_full), "transformers", store=store, texts=TEXTS), rows=len(TEXTS))
    with pytest.raises(ConfigError, match="not a peft adapter.*--to merged"):
        export_peft(str(cls_full), tmp_path / "peft", store=store)


# ------------------------------------------------------------------ refusals
def renamed_copy(adapter: Path, out: Path) -> Path:
    """The adapter with its tensors renamed (so they match no module) and its checksums fixed."""
    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file(
        {k.replace(".self_attn.", ".attention_renamed."): v for k, v in tensors.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    write_manifest(out, read_manifest(out))
    return out


def test_an_adapter_whose_tensors_do_not_land_is_refused_everywhere(lm_lora, tiny_llama_dir, store, tmp_path, capsys):
    from adapters.cli.infer import main as infer
    from adapters.cli.parity import main as parity

    bad = renamed_copy(lm_lora, tmp_path / "renamed")
    engine = InferenceEngine(str(tiny_llama_dir), store=store)
    with pytest.raises(BaseMismatchError, match=r"match no module of the base model.*attention_renamed"):
        engine.generate([GenerationRequest(adapter=str(bad), prompt="Who wrote Hamlet?")])
    # the failed load left nothing behind: the good adapter still serves, and as a fresh engine would
    good = engine.generate([GenerationRequest(adapter=str(lm_lora), prompt="Who wrote Hamlet?")])[0]
    fresh = InferenceEngine(str(tiny_llama_dir), store=store)
    again = fresh.generate([GenerationRequest(adapter=str(lm_lora), prompt="Who wrote Hamlet?")])[0]
    assert good.token_ids == again.token_ids

    assert infer(["--base", str(tiny_llama_dir), "--adapter", str(bad), "--prompt", "hi", "--store", str(store)]) == 2
    assert "attention_renamed" in capsys.readouterr().err
    with pytest.raises(BaseMismatchError, match="attention_renamed"):
        merge_and_export(str(tiny_llama_dir), str(bad), tmp_path / "merged", store=store)
    with pytest.raises(BaseMismatchError, match="attention_renamed"):
        export_peft(str(bad), tmp_path / "peft", store=store)
    assert parity([str(bad), "--runtime", "peft", "--store", str(store), "--prompts", str(prompts_file(tmp_path))]) == 2
    assert "attention_renamed" in capsys.readouterr().err


def test_a_wrong_architecture_adapter_is_refused_clearly(tiny_llama_dir, tiny_bert_dir, cls_lora, store, tmp_path):
    llama_cls = make_adapter(tiny_llama_dir, tmp_path / "llama-cls", task="sequence-classification", labels=["a", "b"])
    engine = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", store=store)
    with pytest.raises(BaseMismatchError, match="trained on base"):
        engine.classify([ClassificationRequest(str(llama_cls), "hi")])
    lenient = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", store=store, allow_base_mismatch=True)
    with pytest.raises(BaseMismatchError, match=r"does not fit this base model \(BertForSequenceClassification"):
        lenient.classify([ClassificationRequest(str(llama_cls), "hi")])
    # a mean-pooling adapter on a base that pools otherwise would load and answer wrongly: refused
    with pytest.raises(ConfigError, match="trained with mean pooling.*pooling='mean'"):
        engine.classify([ClassificationRequest(str(cls_lora), "hi")])


def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def test_parity_exits_zero_on_a_good_adapter_and_non_zero_on_a_tampered_one(
    cls_lora, lm_lora, tiny_bert_dir, store, tmp_path, capsys, monkeypatch
):
    from adapters.cli.parity import main as parity
    from adapters.serving import parity as parity_module

    common = ["--store", str(store), "--prompts", str(prompts_file(tmp_path))]
    assert parity([str(cls_lora), "--runtime", "peft", *common]) == 0
    assert "PASS: 3/3 rows" in capsys.readouterr().out

    merged = tmp_path / "merged"
    merge_and_export(str(tiny_bert_dir), str(cls_lora), merged, store=store)
    weights = load_file(str(merged / "model.safetensors"))
    weights["classifier.weight"] = weights["classifier.weight"] * 1.5  # a runtime that computes something else
    save_file(weights, str(merged / "model.safetensors"), metadata={"format": "pt"})
    assert parity([str(cls_lora), "--runtime", "transformers", "--artifact", str(merged), *common]) == 1
    assert "FAIL" in capsys.readouterr().out

    tampered = tmp_path / "tampered"
    shutil.copytree(cls_lora, tampered)
    weights = load_file(str(tampered / "adapter_model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(tampered / "adapter_model.safetensors"))
    assert parity([str(tampered), "--runtime", "peft", *common]) == 2  # its checksums no longer match
    assert "failed verification" in capsys.readouterr().err

    monkeypatch.setitem(parity_module.EXTERNAL_RUNTIMES, "vllm", ("adapters.serving.no_such_runtime", "vllm_logprobs"))
    assert parity([str(cls_lora), "--runtime", "vllm", *common]) == 2
    assert "runs causal LMs only" in capsys.readouterr().err
    assert parity([str(lm_lora), "--runtime", "vllm", *common]) == 2
    assert "runtime 'vllm' is not available here" in capsys.readouterr().err


def test_peft_export_and_old_backbone_named_adapters(cls_lora, tiny_bert_dir, store, tmp_path):
    # an adapter saved before the encoder kept transformers' name: `backbone.` keys, no base path
    old = tmp_path / "old"
    shutil.copytree(cls_lora, old)
    for extra in ("config.json", MODELING_FILE):
        (old / extra).unlink()
    tensors = load_file(str(old / "adapter_model.safetensors"))
    save_file(
        {k.replace("base_model.model.bert.", "base_model.model.backbone."): v for k, v in tensors.items()},
        str(old / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    write_manifest(old, read_manifest(old))

    engine = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", pooling="mean", store=store)
    new, legacy = engine.classify(
        [ClassificationRequest(str(cls_lora), TEXTS[0]), ClassificationRequest(str(old), TEXTS[0])]
    )
    assert legacy.probabilities == pytest.approx(new.probabilities, abs=1e-6)  # adapterkit still loads it

    out = tmp_path / "exported"
    report = export_peft(str(old), out, store=store)
    assert report["loading"] == "AutoModelForSequenceClassification"
    assert all(k.startswith(("base_model.model.bert.", "base_model.model.classifier.")) for k in tensor_keys(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert_dir.resolve())
    assert (out / "tokenizer.json").is_file() and (out / MODELING_FILE).is_file()
    assert_parity(run_parity(str(out), "peft", store=store, texts=TEXTS), rows=len(TEXTS))
    with pytest.raises(ConfigError, match="already exists"):
        export_peft(str(old), out, store=store)


def test_vllm_export_takes_lora_causal_lms_only(lm_lora, lm_bottleneck, store, tmp_path):
    out = export_peft(str(lm_lora), tmp_path / "vllm", store=store, for_vllm=True)
    assert out["format"] == "vllm" and (tmp_path / "vllm" / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="vLLM serves LoRA adapters only"):
        export_peft(str(lm_bottleneck), tmp_path / "vllm2", store=store, for_vllm=True)


def test_merged_exports_of_old_side_file_classifiers_still_load(tiny_bert_dir, tmp_path):
    from adapters.serving.merge import load_exported

    torch.manual_seed(0)
    from transformers import AutoModel

    from adapters.modeling.backbone import MeanPoolingClassifier

    model = MeanPoolingClassifier(
        AutoModel.from_pretrained(str(tiny_bert_dir), add_pooling_layer=False), {"a": 0, "b": 1}, {0: "a", 1: "b"}
    ).eval()
    old = tmp_path / "old-export"
    model.backbone.save_pretrained(str(old))
    head = {k: v.contiguous() for k, v in model.classifier.state_dict().items()}
    save_file(head, str(old / "classifier.safetensors"))
    (old / "adapterkit_classifier.json").write_text(json.dumps({"pooling": "mean", "id2label": {0: "a", 1: "b"}}))
    ids = torch.tensor([[101, 2040, 2626, 102]])
    with torch.no_grad():
        torch.testing.assert_close(
            load_exported(old, task="sequence-classification")(input_ids=ids).logits, model(input_ids=ids).logits
        )


def test_export_and_parity_are_adapterkit_commands(capsys):
    from adapters.cli.main import COMMANDS, main

    assert {"export", "parity"} <= set(COMMANDS)
    for command in ("export", "parity"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--to {peft,merged,gguf,vllm}" in out and "--runtime {peft,transformers,vllm,gguf}" in out
