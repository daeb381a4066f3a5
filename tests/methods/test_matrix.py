"""Every registered method x every task it supports x a tiny backbone: attach, train, save, reload.

Methods come from the registry, so a newly registered method joins the matrix automatically.
A combination that check_model rejects must be rejected with a message naming the method;
every accepted one must train (loss falls, every trainable tensor moves), save only what it
trained, and reload onto a fresh base - directly and through method_of_folder - to identical logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from adapters.constants import ADAPTER_CONFIG
from adapters.errors import ConfigError
from adapters.methods import list_methods, method_of_folder
from adapters.methods.peft_base import PeftMethod
from adapters.modeling.backbone import model_info
from tests.helpers.methods import BACKBONES, backbones_for, folder_bytes, load_tiny, logits_of, make_batch, train_steps

CASES = [
    pytest.param(method.name, kind, id=f"{method.name}-{kind}")
    for method in list_methods()
    for task in sorted(method.tasks)
    for kind in backbones_for(task)
]


def _method(name):
    return next(m for m in list_methods() if m.name == name)


@pytest.mark.parametrize("method_name,kind", CASES)
def test_method_trains_saves_and_reloads(method_name, kind, folders, tmp_path, record_property):
    method = _method(method_name)
    task = BACKBONES[kind][0]
    options = method.parse_options({})
    model, model_cfg = load_tiny(kind, folders)
    total_params = sum(p.numel() for p in model.parameters())

    try:
        method.check_model(options, model_info(model_cfg), task)
    except ConfigError as err:
        # A refused combination must say which method and what it does support, and really be refused early.
        assert method.name in str(err) and "support" in str(err), str(err)
        return

    model = method.attach(model, options, task)
    batch = make_batch(model, task)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before, after = train_steps(model, batch, steps=10, lr=1e-2)
    assert after < before - 1e-4, f"{method.name} on {kind}: loss did not fall ({before:.4f} -> {after:.4f})"
    unmoved = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), trainable[n])]
    assert not unmoved, f"{method.name} on {kind}: trainable tensors never updated (not connected?): {unmoved[:5]}"

    expected = logits_of(model, batch)
    folder = tmp_path / "adapter"
    method.save(model, folder)
    assert (folder / ADAPTER_CONFIG).is_file()
    saved = folder_bytes(folder)
    n_trainable = sum(t.numel() for t in trainable.values())
    record_property("trainable_params", n_trainable)
    record_property("saved_bytes", saved)
    if n_trainable < total_params:
        # Only what training changed is saved, never a copy of the frozen base.
        base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        assert saved < base_bytes / 2, f"{method.name}: {saved} bytes saved for {n_trainable} trainable params"

    fresh, _ = load_tiny(kind, folders)
    reloaded = method.load(fresh, folder)
    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)

    found = method_of_folder(folder)
    assert found.name == method.name
    fresh, _ = load_tiny(kind, folders)
    torch.testing.assert_close(logits_of(found.load(fresh, folder), batch), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the mixable flag tells the truth
def _perturbed_adapter(method, kind, folders, folder, seed):
    """Attach with defaults, move every trainable tensor randomly, save: a distinct adapter without training."""
    task = BACKBONES[kind][0]
    model, _ = load_tiny(kind, folders)
    model = method.attach(model, method.parse_options({}), task)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    method.save(model, folder)


MIX_CASES = [
    pytest.param(m.name, id=m.name)
    for m in list_methods()
    if m.mixable or isinstance(m, PeftMethod)  # the negative check needs peft's adapter_names argument
]


@pytest.mark.parametrize("method_name", MIX_CASES)
def test_mixable_flag_matches_per_row_adapter_mixing(method_name, folders, tmp_path):
    method = _method(method_name)
    kind = "llama-lm" if "causal-lm" in method.tasks else "bert-cls"
    task = BACKBONES[kind][0]
    for name, seed in (("a", 1), ("b", 2)):
        _perturbed_adapter(method, kind, folders, tmp_path / name, seed)
    base, _ = load_tiny(kind, folders)
    model = method.load(base, tmp_path / "a", adapter_name="a")
    model = method.load(model, tmp_path / "b", adapter_name="b")
    batch = make_batch(model, task)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    per_adapter = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        per_adapter[name] = logits_of(model, batch)
    assert not torch.allclose(per_adapter["a"], per_adapter["b"], atol=1e-4)
    rows = ["a", "b", "a", "b"]
    model.eval()
    with torch.no_grad():
        try:
            mixed = model(**inputs, adapter_names=rows).logits.float()
        except (TypeError, ValueError):
            mixed = None  # refused outright: not mixable
    want = torch.stack([per_adapter[name][i] for i, name in enumerate(rows)])
    mixes = mixed is not None and torch.allclose(mixed, want, atol=1e-5)
    assert mixes == method.mixable, (
        f"{method.name}.mixable={method.mixable}, but per-row adapter_names "
        f"{'works' if mixes else 'does not give each row its own adapter'}"
    )


def test_saved_config_names_the_peft_type(folders, tmp_path):
    """Plain peft must be able to read every peft-backed folder: adapter_config.json carries peft_type."""
    for method in list_methods():
        if not isinstance(method, PeftMethod) or "causal-lm" not in method.tasks:
            continue
        model, _ = load_tiny("llama-lm", folders)
        model = method.attach(model, method.parse_options({}), "causal-lm")
        method.save(model, tmp_path / method.name)
        config = json.loads((tmp_path / method.name / ADAPTER_CONFIG).read_text())
        assert config["peft_type"], method.name
