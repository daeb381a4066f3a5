"""Retraining from a stored adapter: next version with parent recorded, holdout comparison, promotion rule."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from adapters.errors import ConfigError, StoreError

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY_TRAIN = {"lr": 5e-3, "batch_size": 16, "max_steps": 8, "log_every": 4, "seed": 1, "eval_batch_size": 32}


@pytest.fixture(scope="module")
def store_with_v1(tmp_path_factory, tiny_bert_dir, one_torch_thread):
    """A store holding trec-clf@1 (tiny BERT + LoRA on TREC), tagged prod."""
    from adapters.config import load_config
    from adapters.store.store import AdapterStore
    from adapters.training.loop import train

    root = tmp_path_factory.mktemp("retrain")
    raw = {
        "task": "sequence-classification",
        "model": {"name": str(tiny_bert_dir)},
        "data": {
            "name": "trec",
            "max_length": 48,
            "max_train_samples": 200,
            "max_eval_samples": 32,
            "max_test_samples": 32,
        },
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": TINY_TRAIN,
        "output": {"run_dir": str(root / "run-v1"), "name": "trec-clf", "publish": True, "store": str(root / "store")},
    }
    result = train(load_config(raw=raw))
    store = AdapterStore(root / "store")
    store.tag(result.adapter_ref, "prod")
    return store


def _window(path: Path, labels_wanted=None, n=240) -> Path:
    """A labeled window: the last TREC rows (not among the first rows v1 trained on), optionally one class mix."""
    from adapters.data.builtins import BUILTIN_DATASETS

    ds = BUILTIN_DATASETS["trec"].load()
    rows = [
        (t, l) for t, l in zip(ds["text"][-1500:], ds["label"][-1500:]) if labels_wanted is None or l in labels_wanted
    ]
    with open(path, "w") as fh:
        for t, l in rows[:n]:
            fh.write(json.dumps({"text": t, "label": l}) + "\n")
    return path


def test_retrain_continues_from_prod_records_parent_and_promotes(tmp_path, store_with_v1):
    from adapters.training.retrain import retrain

    store = store_with_v1
    window = _window(tmp_path / "window.jsonl", {"HUM", "LOC", "NUM"})  # drifted: three classes only
    result = retrain(
        "trec-clf@prod",
        window,
        tmp_path / "out",
        store_root=store.root,
        replay=60,
        margin=1.0,
        overrides=["train.max_steps=6"],
    )
    assert result.current == "trec-clf@1" and result.candidate == "trec-clf@2"
    manifest = json.loads((store.locate("trec-clf@2").path / "manifest.json").read_text())
    assert manifest["parent"] == "trec-clf@1"
    assert manifest["training"]["init_from"] == "trec-clf@1"
    assert manifest["training"]["train"]["max_steps"] == 6  # the override reached the config
    assert manifest["labels"] == json.loads((store.locate("trec-clf@1").path / "manifest.json").read_text())["labels"]

    train_rows = [json.loads(l) for l in (tmp_path / "out" / "data" / "train.jsonl").read_text().splitlines()]
    held_rows = [json.loads(l) for l in (tmp_path / "out" / "data" / "holdout.jsonl").read_text().splitlines()]
    assert not {r["text"] for r in train_rows} & {r["text"] for r in held_rows}  # no leak into the comparison
    assert {r["label"] for r in held_rows} == {"HUM", "LOC", "NUM"}  # stratified: every window class held out
    window_texts = {" ".join(json.loads(l)["text"].lower().split()) for l in window.read_text().splitlines()}
    assert result.num_holdout == len(held_rows) == round(0.2 * len(window_texts)) and result.num_replay == 60
    assert result.num_train == len(train_rows) == len(window_texts) - len(held_rows) + 60

    for m in (result.current_metrics, result.candidate_metrics):
        assert 0.0 <= m["accuracy"] <= 1.0 and "f1_macro" in m
    assert result.not_worse and result.promoted  # margin 1.0: any candidate is "not worse"
    assert store.tags("trec-clf")["prod"] == 2
    report = json.loads((tmp_path / "out" / "retrain_report.json").read_text())
    assert report["candidate"] == "trec-clf@2" and report["promoted"] is True
    assert "accuracy (decides)" in (tmp_path / "out" / "retrain_report.md").read_text()
    store.tag("trec-clf@1", "prod")  # leave the module's store as found


def test_script_keeps_prod_when_the_candidate_is_worse(tmp_path, store_with_v1, monkeypatch, capsys):
    import adapters.training.retrain as retrain_mod

    def rigged(engine, refs, texts, labels, task, *args, **kwargs):
        current, candidate = refs
        return {current: {"accuracy": 0.80, "f1_macro": 0.7}, candidate: {"accuracy": 0.78, "f1_macro": 0.75}}

    monkeypatch.setattr(retrain_mod, "evaluate_on_holdout", rigged)
    spec = importlib.util.spec_from_file_location("retrain_script", ROOT / "scripts" / "retrain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    store = store_with_v1
    before = store.tags("trec-clf")["prod"]
    window = _window(tmp_path / "w.jsonl", n=120)
    args = [
        "--adapter",
        "trec-clf@prod",
        "--data",
        str(window),
        "--out",
        str(tmp_path / "o"),
        "--store",
        str(store.root),
        "--margin",
        "0.01",
        "--set",
        "train.max_steps=2",
        "--replay",
        "30",
    ]
    assert script.main(args) == 1
    out = capsys.readouterr().out
    assert "kept trec-clf@1 as trec-clf@prod: candidate is worse: accuracy 0.7800" in out
    assert store.tags("trec-clf")["prod"] == before  # the tag did not move
    new_version = max(store.versions("trec-clf"))
    assert (
        json.loads((store.locate(f"trec-clf@{new_version}").path / "manifest.json").read_text())["parent"]
        == "trec-clf@1"
    )


def test_bad_requests_fail_before_training(tmp_path, store_with_v1):
    from adapters.training.retrain import retrain

    store = store_with_v1
    full = _window(tmp_path / "full.jsonl", n=120)
    with pytest.raises(ConfigError, match="store reference"):
        retrain(str(store.locate("trec-clf@1").path), full, tmp_path / "o", store_root=store.root)
    with pytest.raises(StoreError, match="no tag 'staging'"):
        retrain("trec-clf@staging", full, tmp_path / "o", store_root=store.root)
    with pytest.raises(ConfigError, match="does not exist"):
        retrain("trec-clf@prod", tmp_path / "missing.jsonl", tmp_path / "o", store_root=store.root)
    with pytest.raises(ConfigError, match="holdout must be a fraction"):
        retrain("trec-clf@prod", full, tmp_path / "o", store_root=store.root, holdout=1.5)
    narrow = _window(tmp_path / "narrow.jsonl", {"HUM", "LOC"}, n=80)
    with pytest.raises(ConfigError, match=r"lack classes of the parent trec-clf@\d+: ABBR, DESC, ENTY, NUM.*replay=N"):
        retrain("trec-clf@prod", narrow, tmp_path / "o", store_root=store.root)
    alien = tmp_path / "alien.jsonl"
    alien.write_text("".join(json.dumps({"text": f"win a prize {i}", "label": "spam"}) + "\n" for i in range(20)))
    with pytest.raises(ConfigError, match="classes the parent .* was not trained on: spam"):
        retrain("trec-clf@prod", alien, tmp_path / "o", store_root=store.root)
    wrong_cols = tmp_path / "cols.jsonl"
    wrong_cols.write_text(json.dumps({"message": "hi", "label": "HUM"}) + "\n")
    with pytest.raises(ConfigError, match="no text column 'text'"):
        retrain("trec-clf@prod", wrong_cols, tmp_path / "o", store_root=store.root)


def test_evaluate_on_holdout_scores_each_adapter_on_the_same_rows():
    from types import SimpleNamespace

    from adapters.training.retrain import evaluate_on_holdout

    class Engine:  # answers "HUM" for v1 and the gold label for v2
        def __init__(self):
            self.batches = []

        def classify(self, requests):
            self.batches.append(len(requests))
            return [SimpleNamespace(label="HUM" if r.adapter == "a@1" else r.text.split(":")[0]) for r in requests]

        def generate(self, requests):
            return [SimpleNamespace(text=" Location." if r.adapter == "g@2" else "human") for r in requests]

    texts = [f"{l}:q{i}" for i, l in enumerate(["HUM", "LOC", "LOC", "NUM", "HUM"])]
    labels = [t.split(":")[0] for t in texts]
    engine = Engine()
    scores = evaluate_on_holdout(engine, ["a@1", "a@2"], texts, labels, "sequence-classification", batch_size=2)
    assert scores["a@1"]["accuracy"] == pytest.approx(0.4) and scores["a@2"]["accuracy"] == 1.0
    assert engine.batches == [2, 2, 1, 2, 2, 1]
    gen = evaluate_on_holdout(engine, ["g@1", "g@2"], texts[1:3], ["LOC", "LOC"], "causal-lm", {"LOC": "location"})
    assert gen == {"g@1": {"exact_match": 0.0}, "g@2": {"exact_match": 1.0}}  # label words, normalized answers
