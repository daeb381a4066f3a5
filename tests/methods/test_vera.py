"""VeRA: layers of different shapes share one projection pair; the projection is seeded and saved."""

from __future__ import annotations

from safetensors.torch import load_file

from adapters.methods import get_method
from tests.helpers.methods import load_tiny, logits_of, make_batch, train_steps


def test_default_targets_mix_layer_shapes_on_llama(folders):
    """Llama's q (32->32), k/v (32->16, grouped-query) and MLP (32->64, 64->32) layers all get VeRA."""
    from peft.tuners.vera import VeraLayer

    vera = get_method("vera")
    model, _ = load_tiny("llama-lm", folders)
    model = vera.attach(model, vera.parse_options({"r": 16}), "causal-lm")
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, VeraLayer)}
    assert len(shapes) >= 3
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}  # only the scaling vectors train
    before, after = train_steps(model, make_batch(model, "causal-lm"), steps=5)
    assert after < before


def test_projection_is_seeded_and_saved(folders, tmp_path):
    vera = get_method("vera")
    saved = {}
    for name, key in (("a", 0), ("b", 0), ("c", 1)):
        model, _ = load_tiny("bert-cls", folders)
        model = vera.attach(model, vera.parse_options({"r": 8, "projection_prng_key": key}), "sequence-classification")
        vera.save(model, tmp_path / name)
        saved[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    proj = [k for k in saved["a"] if "vera_A" in k]
    assert proj, "save_projection=True must write the shared projection"
    assert all((saved["a"][k] == saved["b"][k]).all() for k in proj)
    assert any(not (saved["a"][k] == saved["c"][k]).all() for k in proj)


def test_without_saved_projection_reload_regenerates_it(folders, tmp_path):
    vera = get_method("vera")
    model, _ = load_tiny("bert-cls", folders)
    model = vera.attach(model, vera.parse_options({"r": 8, "save_projection": False}), "sequence-classification")
    batch = make_batch(model, "sequence-classification")
    train_steps(model, batch, steps=3)
    vera.save(model, tmp_path / "adapter")
    assert not [k for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")) if "vera_A" in k]
    fresh, _ = load_tiny("bert-cls", folders)
    reloaded = vera.load(fresh, tmp_path / "adapter")
    assert (logits_of(reloaded, batch) - logits_of(model, batch)).abs().max() < 1e-5


def test_mlp_group_on_bert_leaves_the_attention_output_alone(folders):
    from peft.tuners.vera import VeraLayer

    vera = get_method("vera")
    model, _ = load_tiny("bert-cls", folders)
    model = vera.attach(model, vera.parse_options({"r": 8, "target_modules": "mlp"}), "sequence-classification")
    names = [n for n, m in model.named_modules() if isinstance(m, VeraLayer)]
    assert len(names) == 4 and not [n for n in names if "attention" in n]
