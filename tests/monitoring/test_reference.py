"""Training-time reference statistics: contents, safetensors round trip, base-model embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import adapters.monitoring.reference as reference
from adapters.config import load_config
from adapters.data.loading import prepare_splits
from adapters.errors import ConfigError
from adapters.modeling.backbone import load_backbone, load_tokenizer
from adapters.monitoring.reference import (
    REFERENCE_FILE,
    Reference,
    build_reference,
    build_training_reference,
    embed_texts,
    embedder,
)

TEXTS = [
    "What is the capital of France ?",
    "Who wrote Hamlet ?",
    "How many feet are in a mile ?",
    "Where is the Grand Canyon ?",
    "What does NASA stand for ?",
    "Who invented the telephone ?",
    "When did World War II end ?",
    "What is the boiling point of water ?",
]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABELS = ["LOC", "HUM", "NUM", "LOC", "ABBR", "HUM", "NUM", "NUM"]


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(str(tiny_bert_dir))


def test_build_reference_statistics(bert_tokenizer):
    ref = build_reference(
        TEXTS + TEXTS[:2],  # duplicates count once
        LABELS,
        tokenizer=bert_tokenizer,
        predictions=[0, 1, 2, 0, 3, 1, 2, 2],
        confidences=np.linspace(0.5, 0.95, 8),
        label_names=["LOC", "HUM", "NUM", "ABBR"],
    )
    s = ref.stats
    assert s["num_texts"] == len(TEXTS)
    assert s["labels"] == {
        "source": "predictions",
        "counts": {"ABBR": 1, "HUM": 2, "LOC": 2, "NUM": 3},  # ids read as names
        "train_counts": {"ABBR": 1, "HUM": 2, "LOC": 2, "NUM": 3},
    }
    lengths = [len(bert_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert sorted(ref.lengths.tolist()) == sorted(lengths)
    assert sum(s["length"]["counts"]) == len(TEXTS) and len(s["length"]["counts"]) == len(s["length"]["edges"]) + 1
    assert s["length"]["mean"] == pytest.approx(np.mean(lengths))
    every_id = {i for t in TEXTS for i in bert_tokenizer(t, add_special_tokens=False)["input_ids"]}
    assert ref.vocabulary == every_id
    assert ref.vocab_counts.sum() == sum(lengths) == s["vocabulary"]["total_tokens"]
    assert 0.0 < s["vocabulary"]["baseline_oov_rate"] < 1.0  # held-out questions use new words
    assert sum(s["confidence"]["counts"]) == 8 and s["confidence"]["mean"] == pytest.approx(0.725)
    assert "embedding" not in s and ref.embeddings is None
    json.dumps(s)  # the manifest part is plain JSON


def test_gold_labels_are_the_fallback_distribution(bert_tokenizer):
    ref = build_reference(TEXTS, LABELS, tokenizer=bert_tokenizer)
    assert ref.stats["labels"]["source"] == "labels"
    assert ref.stats["labels"]["counts"]["NUM"] == 3
    assert "confidence" not in ref.stats


def test_save_load_round_trip_and_integrity(tmp_path, bert_tokenizer):
    fake_embed = lambda texts: np.arange(len(texts) * 4, dtype=np.float32).reshape(len(texts), 4)  # noqa: E731
    ref = build_reference(
        TEXTS,
        LABELS,
        tokenizer=bert_tokenizer,
        confidences=np.full(8, 0.9),
        predictions=LABELS,
        embed_fn=fake_embed,
        max_embed=5,
    )
    stats = ref.save(tmp_path)
    assert stats["file"] == REFERENCE_FILE and len(stats["sha256"]) == 64
    assert stats["embedding"]["count"] == 5 and stats["embedding"]["dim"] == 4
    assert not list(tmp_path.glob(".reference-*"))  # no temp file left behind
    (tmp_path / "manifest.json").write_text(json.dumps({"reference": stats}))
    loaded = Reference.load(tmp_path)
    assert loaded.vocabulary == ref.vocabulary
    np.testing.assert_array_equal(loaded.embeddings, ref.embeddings)
    np.testing.assert_array_equal(loaded.lengths, ref.lengths)
    np.testing.assert_allclose(loaded.confidences, ref.confidences)

    data = bytearray((tmp_path / REFERENCE_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / REFERENCE_FILE).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match the sha256"):
        Reference.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ConfigError, match="no drift reference"):
        Reference.load(tmp_path)
    with pytest.raises(ConfigError, match="format"):
        Reference.load(tmp_path, {"format": "other/9"})


def test_bad_input(bert_tokenizer):
    with pytest.raises(ConfigError, match="tokenizer"):
        build_reference(TEXTS, LABELS, tokenizer=None)
    with pytest.raises(ConfigError, match="no texts"):
        build_reference([], tokenizer=bert_tokenizer)
    with pytest.raises(ConfigError, match="3 predictions but 2 confidences"):
        build_reference(TEXTS, tokenizer=bert_tokenizer, predictions=["a", "b", "c"], confidences=[0.1, 0.2])
    with pytest.raises(ConfigError, match=r"\(n, d\)"):
        build_reference(TEXTS, tokenizer=bert_tokenizer, embed_fn=lambda t: np.zeros(len(t)))


@pytest.mark.parametrize("which", ["tiny_bert_dir", "tiny_llama_dir"])
def test_embed_texts_mean_pools_and_ignores_padding(request, which):
    folder = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    texts = ["short one", "a much longer question about the capital city of a large country ?"]
    batched = embed_texts(model, tok, texts, batch_size=2)
    alone = np.concatenate([embed_texts(model, tok, [t]) for t in texts])
    assert batched.shape == (2, model.config.hidden_size) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # padding does not leak into the mean
    ids = tok(texts[0], return_tensors="pt")
    with torch.no_grad():
        manual = model(**ids).last_hidden_state.mean(1).numpy()
    np.testing.assert_allclose(batched[0], manual[0], atol=1e-5)


def test_embed_texts_uses_the_base_model_under_task_heads_and_adapters(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    base = embed_texts(AutoModel.from_pretrained(str(tiny_llama_dir)), tok, TEXTS[:3])
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    np.testing.assert_allclose(embed_texts(lm, tok, TEXTS[:3]), base, atol=1e-5)
    peft_model = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        adapted = peft_model.get_base_model().model(**tok(TEXTS[:1], return_tensors="pt")).last_hidden_state.mean(1)
    assert not np.allclose(adapted.numpy()[0], base[0], atol=1e-4)  # the adapter does change states...
    peft_model.train()
    np.testing.assert_allclose(embed_texts(peft_model, tok, TEXTS[:3]), base, atol=1e-5)  # ...but not the embedding
    assert peft_model.get_base_model().model.training  # train mode restored after embedding
    with torch.no_grad():  # and the adapter is active again
        again = peft_model.get_base_model().model(**tok(TEXTS[:1], return_tensors="pt")).last_hidden_state.mean(1)
    np.testing.assert_allclose(again.numpy(), adapted.numpy(), atol=1e-5)


def test_embedder_loads_the_base_once(tiny_bert_dir):
    embed = embedder(str(tiny_bert_dir))
    out = embed(TEXTS[:4])
    assert out.shape == (4, 32)
    assert embed(TEXTS[:0]).shape == (0, 32)


@pytest.mark.real_model
def test_minilm_embeddings_put_same_domain_texts_closer(minilm_dir):
    embed = embedder(str(minilm_dir))
    e = embed(["Who wrote Hamlet ?", "Who wrote Macbeth ?", "Free entry in 2 a wkly comp to win FA Cup final tkts"])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert e.shape == (3, 384)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_build_training_reference_from_a_run(tmp_path, task, tiny_bert_dir, tiny_llama_dir, monkeypatch):
    """What the training loop calls after training: held-out predictions (classifiers) or label
    words (causal LMs), written next to the manifest, loadable by the monitor."""
    model_dir = tiny_bert_dir if task == "sequence-classification" else tiny_llama_dir
    cfg = load_config(
        raw={
            "task": task,
            "model": {"name": str(model_dir)},
            "data": {
                "name": "trec",
                "max_length": 32,
                "max_train_samples": 60,
                "max_eval_samples": 8,
                "max_test_samples": 24,
            },
            "train": {"eval_batch_size": 16, "seed": 5},
        }
    )
    prepared = prepare_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    model = load_backbone(cfg.model, task, prepared.label2id)
    assert build_training_reference(model, tokenizer, cfg, prepared, tmp_path / "other", write=False) is None
    assert not (tmp_path / "other").exists()  # non-main processes write nothing
    stats = build_training_reference(model, tokenizer, cfg, prepared, tmp_path, max_embed=16)
    ref = Reference.load(tmp_path, stats)
    assert stats["num_texts"] == 60 and stats["embedding"]["count"] == 16 and ref.embeddings.shape[0] == 16
    if task == "sequence-classification":
        assert stats["labels"]["source"] == "predictions"
        assert sum(stats["labels"]["counts"].values()) == 24 == stats["confidence"]["num"]  # the test split
        assert set(stats["labels"]["counts"]) <= set(prepared.labels)
        assert all(0.0 < c <= 1.0 for c in ref.confidences)
    else:
        assert stats["labels"]["source"] == "labels" and "confidence" not in stats
        label_words = {"abbreviation", "description", "entity", "human", "location", "number"}
        assert set(stats["labels"]["counts"]) <= label_words
        # with the run's test answers: they are the label mix the server will log, with their confidences

        generated = {
            "predictions": ["location", "number", "nonsense", "location"],
            "confidences": [0.9, 0.5, None, 0.2],
        }
        stats = build_training_reference(
            model, tokenizer, cfg, prepared, tmp_path / "gen", max_embed=0, generated=generated
        )
        assert stats["labels"]["source"] == "predictions" and stats["labels"]["counts"] == {"location": 2, "number": 1}
        assert stats["confidence"]["num"] == 3
        monkeypatch.setattr(reference, "MAX_ANSWER_LABELS", 3)  # free-text answers: no label mix, confidences still
        stats = build_training_reference(
            model, tokenizer, cfg, prepared, tmp_path / "free", max_embed=0, generated=generated
        )
        assert "labels" not in stats and stats["confidence"]["num"] == 3
