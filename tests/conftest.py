"""Shared fixtures: offline environment, tiny models built from a config, real-model folders."""

from __future__ import annotations

import os

# Offline before anything imports transformers/datasets: a hub look-up would retry for ~23 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF folder (converted once into the user cache)."""
    from adapters.modeling.builtins import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from adapters.modeling.builtins import resolve_model

    return Path(resolve_model("minilm-l6"))


def _save_tiny_llama(out: Path, tokenizer_dir: Path, width: int) -> Path:
    """A 2-layer Llama of the given width with a real tokenizer and chat template (random weights)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer, width-32 Llama with SmolLM2's real tokenizer and chat template (random weights)."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, width=32)


@pytest.fixture(scope="session")
def tiny_llama64_dir(tmp_path_factory, smollm2_dir) -> Path:
    """The tiny Llama, 64 wide: bitsandbytes' CPU 4-bit kernels pack blocks of 64 input features."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama64"), smollm2_dir, width=64)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer, width-32 BERT with MiniLM's real WordPiece tokenizer (random weights)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture()
def store_root(tmp_path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    return root


@pytest.fixture()
def make_adapter_folder(tmp_path):
    """Factory for small LoRA-shaped adapter folders (peft config + safetensors + manifest.json).

    No torch: for store/manifest tests that need valid folders, not a model. Each call makes a
    new folder with different weights; keyword arguments go to build_manifest.
    """
    import itertools
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from adapters.store.manifest import build_manifest, write_manifest

    counter = itertools.count()

    def make(base_fingerprint: str = "sha256:" + "0" * 64, **manifest_fields) -> Path:
        n = next(counter)
        folder = tmp_path / f"adapter-src-{n}"
        folder.mkdir()
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        rng = np.random.default_rng(n)
        weights = {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((2, 32)).astype(
                "float32"
            ),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((32, 2)).astype(
                "float32"
            ),
        }
        save_file(weights, str(folder / "adapter_model.safetensors"))
        fields = {
            "task": "causal-lm",
            "method": {"name": "lora", "options": {"r": 2}},
            "base_model": {"name": "tiny-base", "fingerprint": base_fingerprint},
            "metrics": {"accuracy": 0.5},
            "training": {"train": {"lr": 1e-4}},
            **manifest_fields,
        }
        write_manifest(folder, build_manifest(**fields))
        return folder

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests. On a shared 2-core machine, torch's 2 threads
    wait on each other whenever another process holds a core: a tiny-model step or request then
    takes many times longer than on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
