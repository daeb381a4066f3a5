"""Prompt tuning, prefix tuning, P-tuning: initialisation, options, and the combinations they refuse."""

from __future__ import annotations

import pytest
import torch

from adapters.errors import ConfigError
from adapters.methods import get_method
from adapters.methods.base import ModelInfo
from tests.helpers.methods import load_tiny, logits_of, make_batch, train_steps


@pytest.mark.parametrize("kind,task", [("llama-lm", "causal-lm"), ("bert-cls", "sequence-classification")])
def test_text_init_starts_from_the_text_token_embeddings(kind, task, folders, tmp_path):
    from transformers import AutoTokenizer

    method = get_method("prompt-tuning")
    model, model_cfg = load_tiny(kind, folders)
    text = "Classify the question"
    options = method.parse_options({"num_virtual_tokens": 7, "init": "text", "init_text": text})
    model = method.attach(model, options, task)
    ids = AutoTokenizer.from_pretrained(model_cfg.name)(text)["input_ids"]
    ids = (ids * 7)[:7]  # peft repeats / truncates the text to the number of virtual tokens
    expected = model.word_embeddings.weight[torch.tensor(ids)]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, expected)

    batch = make_batch(model, task)
    before, after = train_steps(model, batch, steps=5)
    assert after < before
    method.save(model, tmp_path / "adapter")
    fresh, _ = load_tiny(kind, folders)
    for trainable in (False, True):  # trainable reload must not need the tokenizer path recorded at training
        reloaded = method.load(
            fresh if not trainable else load_tiny(kind, folders)[0], tmp_path / "adapter", is_trainable=trainable
        )
        torch.testing.assert_close(logits_of(reloaded, batch), logits_of(model, batch), atol=1e-5, rtol=0)


def test_text_init_needs_text():
    with pytest.raises(ConfigError, match=r"method\.init_text \(prompt-tuning\).*needs init_text"):
        get_method("prompt-tuning").parse_options({"init": "text"})


@pytest.mark.parametrize(
    "name,options",
    [
        ("prefix-tuning", {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16}),
        ("p-tuning", {"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 16}),
    ],
)
def test_reparameterised_prompts_train_on_both_backbones(name, options, folders):
    method = get_method(name)
    for kind, task in (("llama-lm", "causal-lm"), ("bert-cls", "sequence-classification")):
        model, _ = load_tiny(kind, folders)
        model = method.attach(model, method.parse_options(options), task)
        encoder = model.prompt_encoder["default"]
        kinds = {type(m).__name__ for m in encoder.modules()}
        assert ("LSTM" in kinds) if name == "p-tuning" else ("Sequential" in kinds)
        before, after = train_steps(model, make_batch(model, task), steps=5)
        assert after < before, (name, kind)


def test_prefix_tuning_keeps_mean_pooling_of_the_sentence_encoder(folders):
    """The prefix reaches BERT's attention through the MeanPoolingClassifier (not around it)."""
    method = get_method("prefix-tuning")
    model, _ = load_tiny("bert-cls", folders)
    model = method.attach(model, method.parse_options({"num_virtual_tokens": 4}), "sequence-classification")
    batch = make_batch(model, "sequence-classification")
    plain = logits_of(model, batch)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.add_(1.0)
    assert logits_of(model, batch).shape == (4, 3)
    assert not torch.allclose(logits_of(model, batch), plain, atol=1e-4)  # the prefix changes the output


def test_refused_combinations_name_the_method_and_what_it_supports():
    llama = ModelInfo(model_type="llama", is_encoder=False, num_layers=2, hidden_size=32)
    bert = ModelInfo(model_type="bert", is_encoder=True, num_layers=2, hidden_size=32)
    distil = ModelInfo(model_type="distilbert", is_encoder=True, num_layers=2, hidden_size=32)
    quantized = ModelInfo(model_type="llama", is_encoder=False, num_layers=2, hidden_size=32, quantized=True)
    for name in ("prompt-tuning", "p-tuning"):
        method = get_method(name)
        with pytest.raises(
            ConfigError, match=rf"'{name}' cannot do sequence-classification on decoder.*supports: causal-lm"
        ):
            method.check_model(method.parse_options({}), llama, "sequence-classification")
        method.check_model(method.parse_options({}), bert, "sequence-classification")
        method.check_model(method.parse_options({}), llama, "causal-lm")
    prefix = get_method("prefix-tuning")
    prefix.check_model(prefix.parse_options({}), llama, "sequence-classification")  # input ids reach the head
    with pytest.raises(ConfigError, match=r"'prefix-tuning' cannot work on model type 'distilbert'.*supports"):
        prefix.check_model(prefix.parse_options({}), distil, "sequence-classification")
    for name in ("prompt-tuning", "prefix-tuning", "p-tuning"):
        with pytest.raises(ConfigError, match=rf"'{name}' is not supported on a quantized backbone"):
            get_method(name).check_model(get_method(name).parse_options({}), quantized, "causal-lm")


def test_distilbert_geometry_and_prefix_refusal_at_attach():
    """DistilBERT names its width 'dim': prompt/P-tuning still find it; prefix tuning is refused clearly."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=200, dim=32, hidden_dim=64, n_layers=2, n_heads=4, num_labels=3, max_position_embeddings=64
    )
    for name in ("prompt-tuning", "p-tuning"):
        method = get_method(name)
        model = method.attach(
            DistilBertForSequenceClassification(config),
            method.parse_options({"num_virtual_tokens": 4}),
            "sequence-classification",
        )
        ids = torch.randint(0, 200, (2, 6))
        assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 3)
    prefix = get_method("prefix-tuning")
    with pytest.raises(
        ConfigError, match=r"'prefix-tuning' cannot attach to DistilBertForSequenceClassification.*past_key_values"
    ):
        prefix.attach(DistilBertForSequenceClassification(config), prefix.parse_options({}), "sequence-classification")


@pytest.mark.parametrize(
    "name,options,resumable",
    [
        ("prompt-tuning", {}, True),
        ("prefix-tuning", {}, True),
        ("prefix-tuning", {"prefix_projection": True, "encoder_hidden_size": 8}, False),
        ("p-tuning", {"encoder_hidden_size": 8}, False),
    ],
)
def test_continue_training_from_a_saved_adapter(name, options, resumable, folders, tmp_path):
    """peft loads prompt learning for inference only; we resume where the file holds the trained tensor."""
    method = get_method(name)
    model, _ = load_tiny("bert-cls", folders)
    model = method.attach(model, method.parse_options({"num_virtual_tokens": 4, **options}), "sequence-classification")
    batch = make_batch(model, "sequence-classification")
    train_steps(model, batch, steps=3)
    method.save(model, tmp_path / "adapter")
    fresh, _ = load_tiny("bert-cls", folders)
    if not resumable:
        with pytest.raises(ConfigError, match=rf"cannot continue training a saved '{name}' adapter"):
            method.load(fresh, tmp_path / "adapter", is_trainable=True)
        return
    resumed = method.load(fresh, tmp_path / "adapter", is_trainable=True)
    torch.testing.assert_close(logits_of(resumed, batch), logits_of(model, batch), atol=1e-5, rtol=0)
    before, after = train_steps(resumed, batch, steps=3)
    assert after < before
