"""LoKr: options reach peft (rank, alpha, decomposition), the Kronecker update trains."""

from __future__ import annotations

import pytest

from adapters.methods import get_method
from tests.helpers.methods import load_tiny, make_batch, train_steps


@pytest.mark.parametrize("decompose_both", [False, True])
def test_options_shape_the_kronecker_factors(decompose_both, tiny_llama_dir, tiny_bert_dir):
    from peft.tuners.lokr import LoKrLayer

    folders = {"tiny_llama_dir": tiny_llama_dir, "tiny_bert_dir": tiny_bert_dir}
    lokr = get_method("lokr")
    model, _ = load_tiny("llama-lm", folders)
    options = lokr.parse_options({"r": 1, "alpha": 4, "target_modules": "attention", "decompose_both": decompose_both})
    model = lokr.attach(model, options, "causal-lm")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoKrLayer)}
    assert len(layers) == 8 and all("self_attn" in n for n in layers)
    layer = next(iter(layers.values()))
    # decompose_both splits the left factor into two rank-r matrices instead of one full matrix
    assert ("default" in layer.lokr_w1_a) == decompose_both
    assert ("default" in layer.lokr_w1) == (not decompose_both)
    assert layer.scaling["default"] == pytest.approx(4 / 1)
    before, after = train_steps(model, make_batch(model, "causal-lm"), steps=5)
    assert after < before
