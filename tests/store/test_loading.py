"""Loading stored adapters: a round trip through peft, the base-model check, folders without a manifest."""

from __future__ import annotations

import pytest

from adapters.errors import BaseMismatchError, StoreError
from adapters.store.loading import check_base, load_adapter
from adapters.store.manifest import MANIFEST, build_manifest, read_manifest, write_manifest
from adapters.store.store import AdapterStore


@pytest.fixture(scope="module")
def real_lora(tiny_llama_dir, tmp_path_factory):
    """A LoRA adapter on the tiny Llama with non-zero weights, its manifest, and its logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.store.fingerprint import fingerprint_model, fingerprint_tokenizer
    from adapters.store.manifest import base_model_entry

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); make it change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    folder = tmp_path_factory.mktemp("lora-src")
    model.save_pretrained(str(folder))
    manifest = build_manifest(
        task="causal-lm",
        method={"name": "lora", "options": {"r": 4, "alpha": 8}},
        base_model=base_model_entry("tiny-llama", tiny_llama_dir),
        metrics={"eval_loss": 1.25},
    )
    assert manifest["base_model"]["fingerprint"] == fingerprint_model(tiny_llama_dir)
    assert manifest["base_model"]["tokenizer_fingerprint"] == fingerprint_tokenizer(tiny_llama_dir)
    write_manifest(folder, manifest)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain)  # the comparison below means something
    return {"folder": folder, "ids": ids, "logits": adapted, "base_dir": tiny_llama_dir}


def _fresh_base(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_publish_list_load_round_trip(real_lora, store_root):
    import torch
    from peft import PeftModel

    store = AdapterStore(store_root)
    ref = store.publish(real_lora["folder"], "greeter")
    assert str(ref) == "greeter@1" and ref.path == store_root / "greeter" / "1"
    rows = store.list()
    assert [(r["name"], r["version"], r["tags"], r["method"], r["base"]) for r in rows] == [
        ("greeter", 1, ["latest"], "lora", "tiny-llama")
    ]
    assert rows[0]["metrics"] == {"eval_loss": 1.25}

    path, manifest = store.resolve("greeter")
    assert path == ref.path and manifest["name"] == "greeter" and manifest["version"] == 1
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    # Plain peft loads the stored folder as it is.
    with torch.no_grad():
        plain_peft = PeftModel.from_pretrained(_fresh_base(real_lora["base_dir"]), str(path)).eval()
        torch.testing.assert_close(plain_peft(input_ids=real_lora["ids"]).logits, real_lora["logits"])
        # load_adapter resolves, checks the base fingerprint of the model's folder, attaches.
        for reference in ("greeter", "greeter@1", "greeter@latest", str(path)):
            model = load_adapter(_fresh_base(real_lora["base_dir"]), reference, store=store).eval()
            torch.testing.assert_close(model(input_ids=real_lora["ids"]).logits, real_lora["logits"])


def test_wrong_base_is_refused_and_the_override_loads(real_lora, store_root, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    store = AdapterStore(store_root)
    store.publish(real_lora["folder"], "greeter")
    config = _fresh_base(real_lora["base_dir"]).config
    torch.manual_seed(123)
    other_dir = tmp_path / "other-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(other_dir))

    with pytest.raises(BaseMismatchError) as err:
        load_adapter(_fresh_base(other_dir), "greeter", store=store)
    message = str(err.value)
    manifest = read_manifest(store_root / "greeter" / "1")
    assert "tiny-llama" in message and manifest["base_model"]["fingerprint"] in message  # the trained-on base
    assert str(other_dir) in message  # the base it was about to be loaded on
    assert "allow_base_mismatch" in message

    model = load_adapter(_fresh_base(other_dir), "greeter", store=store, allow_base_mismatch=True)
    assert "default" in model.peft_config
    # An explicit fingerprint is checked the same way.
    with pytest.raises(BaseMismatchError):
        load_adapter(_fresh_base(real_lora["base_dir"]), "greeter", store=store, base_fingerprint="sha256:" + "f" * 64)


def test_check_base():
    manifest = {"name": "a", "version": 2, "base_model": {"name": "llama-x", "fingerprint": "sha256:aa"}}
    assert check_base(manifest, "sha256:aa") is True
    with pytest.raises(
        BaseMismatchError,
        match=r"a@2 was trained on base llama-x \(sha256:aa\) but is being loaded on bert-y \(sha256:bb\)",
    ):
        check_base(manifest, "sha256:bb", base_name="bert-y")
    assert check_base(manifest, "sha256:bb", allow_mismatch=True) is False
    with pytest.raises(BaseMismatchError, match="no fingerprint recorded"):
        check_base({"base_model": {"name": "x"}}, "sha256:aa")


def test_load_refuses_plain_folder_without_manifest_unless_overridden(store_root, make_adapter_folder):
    src = make_adapter_folder()
    (src / MANIFEST).unlink()
    store = AdapterStore(store_root)
    path, manifest = store.resolve(str(src))
    assert path == src and manifest is None
    with pytest.raises(StoreError, match="no manifest.json, so its base model cannot be checked"):
        load_adapter(object(), str(src), store=store)
