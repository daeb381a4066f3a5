"""LoHa: options reach peft, target groups as for LoRA, the Hadamard update trains."""

from __future__ import annotations

import pytest

from adapters.methods import get_method
from tests.helpers.methods import load_tiny, make_batch, train_steps


def test_options_shape_the_hadamard_factors(tiny_bert_dir, tiny_llama_dir):
    from peft.tuners.loha import LoHaLayer

    folders = {"tiny_llama_dir": tiny_llama_dir, "tiny_bert_dir": tiny_bert_dir}
    loha = get_method("loha")
    model, _ = load_tiny("bert-cls", folders)
    options = loha.parse_options({"r": 3, "alpha": 6, "target_modules": "mlp", "rank_dropout": 0.1})
    model = loha.attach(model, options, "sequence-classification")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoHaLayer)}
    assert all("attention" not in n for n in layers)  # "mlp" on BERT leaves the attention output alone
    assert len(layers) == 4  # intermediate.dense + output.dense in 2 blocks
    layer = next(iter(layers.values()))
    assert layer.hada_w1_a["default"].shape[1] == 3 and layer.scaling["default"] == pytest.approx(6 / 3)
    assert layer.rank_dropout["default"] == pytest.approx(0.1)
    before, after = train_steps(model, make_batch(model, "sequence-classification"), steps=5)
    assert after < before
