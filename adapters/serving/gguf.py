"""GGUF (llama.cpp's format): export an adapter with llama.cpp's own converters, and its logprobs for parity checks.

The converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` and the ``gguf-py`` they were written
against) come from llama-cpp-python's source distribution on PyPI, unpacked under ``.cache/`` by
``make runtimes`` (or ``$ADAPTERKIT_LLAMA_CPP``); they are not vendored into this repository.

What an export holds (``adapterkit_gguf.json`` lists it):

* a LoRA that llama.cpp's adapter format expresses: ``base.gguf`` (the base model, in its stored dtype)
  and ``adapter.gguf`` (the LoRA in float32), used as ``llama-cli -m base.gguf --lora adapter.gguf``;
* any other mergeable adapter (IA3, LoHa, LoKr, a DoRA or rsLoRA, one trained on a 4-bit base):
  ``model.gguf``, the merged model (adapters.serving.merge, then convert_hf_to_gguf.py);
* a merged export folder (``adapterkit export --to merged``): ``model.gguf``.

Parity (``gguf_logprobs``) reads the files back without llama.cpp: transformers loads the base GGUF
(dequantizing, undoing the converter's q/k row permutation), and a LoRA GGUF is applied the way
llama.cpp applies it, ``W += (alpha / r) * B @ A`` on each tensor in GGUF layout, with the delta mapped
to transformers' layout by the same tensor processor that maps the base weights. So a converter that
names, orders, permutes or scales a tensor wrongly shows up as a logprob difference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

from adapters.constants import ADAPTER_CONFIG
from adapters.errors import ConfigError
from adapters.modeling.builtins import resolve_model
from adapters.serving.merge import EXPORT_INFO, merge_and_export
from adapters.store.fingerprint import fingerprint_model
from adapters.store.loading import check_base
from adapters.store.store import AdapterStore, check_publishable_files

log = logging.getLogger(__name__)

GGUF_INFO = "adapterkit_gguf.json"
BASE_GGUF = "base.gguf"
ADAPTER_GGUF = "adapter.gguf"
MODEL_GGUF = "model.gguf"
_REPO = Path(__file__).resolve().parents[2]


def converters_dir() -> Path:
    """The folder holding llama.cpp's convert_*.py: ``$ADAPTERKIT_LLAMA_CPP``, else the newest
    ``.cache/llama.cpp-<version>`` of this checkout. Raises ConfigError saying how to get it."""
    configured = os.environ.get("ADAPTERKIT_LLAMA_CPP")
    found = [Path(configured)] if configured else sorted(_REPO.glob(".cache/llama.cpp-*/"), key=os.path.getmtime)
    if found and (found[-1] / "convert_lora_to_gguf.py").is_file():
        return found[-1]
    raise ConfigError(
        "llama.cpp's GGUF converters are not unpacked: run `make runtimes` in the adapterkit checkout (it takes "
        "them from llama-cpp-python's source distribution on PyPI), or set ADAPTERKIT_LLAMA_CPP to a llama.cpp "
        "checkout"
    )


def run_converter(script: str, *args: str | os.PathLike) -> None:
    """Run one of llama.cpp's converters with this Python (it needs torch, transformers, sentencepiece).

    Raises ConfigError with the end of its output when it fails.
    """
    argv = [sys.executable, str(converters_dir() / script), *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"{script} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def stored_outtype(folder: str | os.PathLike) -> str:
    """The converter's --outtype that keeps a model folder's weights exactly: "bf16" / "f16" when its
    safetensors matrices are stored so, else "f32" (the converter's "auto" would round float32 to f16)."""
    dtypes = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as fh:  # the safetensors header: an 8-byte little-endian length, then JSON
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        dtypes.update(v["dtype"] for k, v in header.items() if k != "__metadata__" and len(v["shape"]) >= 2)
    return {frozenset({"BF16"}): "bf16", frozenset({"F16"}): "f16"}.get(frozenset(dtypes), "f32")


def lora_gguf_problems(adapter_config: dict, manifest: dict) -> list[str]:
    """Why llama.cpp's LoRA GGUF cannot carry this adapter exactly ([] when it can).

    convert_lora_to_gguf.py writes A, B and one ``lora_alpha``; llama.cpp scales every tensor by alpha / r.
    """
    problems = []
    if adapter_config.get("peft_type") != "LORA":
        problems.append(f"it is a {adapter_config.get('peft_type')} adapter, not a LoRA")
    for key, why in (
        ("use_dora", "DoRA's magnitude vector"),
        ("use_rslora", "rsLoRA's alpha / sqrt(r) scale"),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "fully trained modules"),
        ("lora_bias", "LoRA biases"),
    ):
        if adapter_config.get(key):
            problems.append(f"{why} ({key})")
    if adapter_config.get("bias", "none") != "none":
        problems.append(f"trained biases (bias={adapter_config['bias']!r})")
    if ((manifest.get("training") or {}).get("model") or {}).get("quantization"):
        problems.append("it was trained on a quantized base (merging dequantizes it first)")
    return problems


def adapter_base(manifest: dict, base: str | None = None) -> Path:
    """The local folder of an adapter's base: ``base`` if given, else the manifest's recorded path when it
    exists here, else its name (a built-in). Checks the folder's fingerprint against the manifest
    (BaseMismatchError). Raises ConfigError when there is no local folder."""
    recorded = manifest.get("base_model") or {}
    if base is None:
        path = recorded.get("path")
        base = path if path and Path(path).is_dir() else recorded.get("name")
    if not base:
        raise ConfigError("the adapter's manifest names no base model: pass base=<model folder or built-in name>")
    folder = Path(resolve_model(str(base)))
    if not folder.is_dir():
        raise ConfigError(f"base model {base!r} is not a local folder; GGUF conversion needs its files")
    check_base(manifest, fingerprint_model(folder), base_name=str(base))
    return folder


def export_gguf(
    ref_or_folder: str | os.PathLike, out_dir: str | os.PathLike, *, store: Any = None, base: str | None = None
) -> Path:
    """Write the GGUF files of an adapter (store reference or folder) or of a merged export folder to out_dir.

    See the module docstring for what is written. base: the adapter's base (default: its manifest's).
    Returns out_dir; adapterkit_gguf.json there says what was written ("kind", "files"). Raises ConfigError
    (out_dir exists, not a causal LM, not mergeable, converter failed), StoreError (unknown reference,
    failed checksums) and BaseMismatchError (base is another model).
    """
    out = Path(out_dir).expanduser()
    if out.exists():
        raise ConfigError(f"GGUF export folder {out} already exists; choose a new folder")
    source = Path(ref_or_folder).expanduser()
    merged = source.is_dir() and (source / "config.json").is_file() and not (source / ADAPTER_CONFIG).is_file()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.gguf-"))
    try:
        if merged:
            info = _convert_merged(source, staged)
        else:
            info = _convert_adapter(ref_or_folder, staged, store, base)
        info = {"format": "adapterkit.gguf/1", **info}
        (staged / GGUF_INFO).write_text(json.dumps(info, indent=2))
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


def _convert_merged(folder: Path, staged: Path) -> dict:
    """A merged export folder -> model.gguf (refusing a classifier: GGUF runtimes run causal LMs)."""
    info_path = folder / EXPORT_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("task", "causal-lm") != "causal-lm":
        raise ConfigError(f"{folder} is a {info['task']} export; GGUF runtimes run causal LMs only")
    run_converter(
        "convert_hf_to_gguf.py", "--outtype", stored_outtype(folder), "--outfile", staged / MODEL_GGUF, folder
    )
    return {"kind": "merged", "source": str(folder), "files": {"model": MODEL_GGUF}, "prompt": info.get("prompt")}


def _convert_adapter(ref: str | os.PathLike, staged: Path, store: Any, base: str | None) -> dict:
    """An adapter -> base.gguf + adapter.gguf when llama.cpp's LoRA format holds it, else a merged model.gguf."""
    store = store if isinstance(store, AdapterStore) else AdapterStore(store)
    folder, manifest = store.resolve(ref, verify=True)
    check_publishable_files(folder)
    if manifest is None:
        raise ConfigError(f"{folder} has no manifest.json: its base model cannot be checked")
    if manifest.get("task", "causal-lm") != "causal-lm":
        raise ConfigError(f"{ref} is a {manifest['task']} adapter; GGUF runtimes run causal LMs only")
    base_folder = adapter_base(manifest, base)
    adapter_config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    problems = lora_gguf_problems(adapter_config, manifest)
    info = {
        "source": str(ref),
        "adapter": f"{manifest.get('name')}@{manifest.get('version')}",
        "base": str(base_folder),
        "prompt": manifest.get("prompt"),
    }
    if not problems:
        # The base as stored (bf16 stays bf16: lossless); the LoRA in float32, as trained.
        outtype = stored_outtype(base_folder)
        run_converter("convert_hf_to_gguf.py", "--outtype", outtype, "--outfile", staged / BASE_GGUF, base_folder)
        run_converter(
            "convert_lora_to_gguf.py",
            "--base",
            base_folder,
            "--outtype",
            "f32",
            "--outfile",
            staged / ADAPTER_GGUF,
            folder,
        )
        return {"kind": "lora", "files": {"base": BASE_GGUF, "adapter": ADAPTER_GGUF}, **info}
    log.info("%s: exporting the merged model, since llama.cpp's LoRA format cannot hold %s", ref, "; ".join(problems))
    with tempfile.TemporaryDirectory(dir=staged.parent, prefix=".merged-") as tmp:
        merged = Path(tmp) / "merged"
        merge_and_export(str(base_folder), str(ref), merged, store=store)
        run_converter(
            "convert_hf_to_gguf.py", "--outtype", stored_outtype(merged), "--outfile", staged / MODEL_GGUF, merged
        )
    return {"kind": "merged", "files": {"model": MODEL_GGUF}, "merged_because": problems, **info}


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def apply_gguf_lora(model: torch.nn.Module, lora_path: str | os.PathLike, arch: str) -> int:
    """Add a LoRA GGUF's update to a transformers model loaded from its base GGUF, as llama.cpp applies it.

    For each tensor X with ``X.lora_a`` (r, in) and ``X.lora_b`` (out, r): ``W_X += (alpha / r) * B @ A``
    (llama.cpp's scale; scale 1 when alpha is 0), the (out, in) delta mapped to transformers' name and
    layout by transformers' GGUF tensor processor for ``arch`` (e.g. Llama's q/k row un-permutation).
    Returns the number of tensors updated. Raises ConfigError for a file that is not a LoRA adapter of
    ``arch``, a tensor without its pair, or one that matches no weight of the model.
    """
    reader = gguf.GGUFReader(str(lora_path))
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise ConfigError(f"{lora_path} is not a LoRA adapter GGUF (general.type / adapter.type)")
    if _field(reader, "general.architecture") != arch:
        raise ConfigError(f"{lora_path} is a LoRA for {_field(reader, 'general.architecture')!r}, the base is {arch!r}")
    alpha = float(_field(reader, "adapter.lora.alpha", 0.0))
    tensors = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    targets = {name.rsplit(".", 1)[0] for name in tensors}
    unpaired = sorted(t for t in targets if f"{t}.lora_a" not in tensors or f"{t}.lora_b" not in tensors)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    unmatched = sorted(t for t in targets if t not in names)
    if unpaired or unmatched:
        raise ConfigError(
            f"{lora_path}: tensors without a lora_a/lora_b pair {unpaired[:5]}, "
            f"or matching no weight of the base {unmatched[:5]}"
        )
    with torch.no_grad():
        for target in sorted(targets):
            lora_a = tensors[f"{target}.lora_a"].astype(np.float32)  # (r, in)
            lora_b = tensors[f"{target}.lora_b"].astype(np.float32)  # (out, r)
            scale = alpha / lora_a.shape[0] if alpha else 1.0
            delta = processor.process(scale * (lora_b @ lora_a), target).weights  # (out, in), transformers' layout
            weight = model.get_parameter(names[target])
            if tuple(delta.shape) != tuple(weight.shape):
                raise ConfigError(
                    f"{lora_path}: {target} gives a {delta.shape} update for a {tuple(weight.shape)} weight"
                )
            weight += torch.from_numpy(np.ascontiguousarray(delta)).to(weight.dtype)
    return len(targets)


def load_gguf_model(gguf_base: str | os.PathLike, gguf_lora: str | os.PathLike | None = None) -> torch.nn.Module:
    """The float32 transformers model of a model GGUF (a base, or a merged model.gguf), with a LoRA GGUF
    applied (apply_gguf_lora) when given. ~45 s for SmolLM2-135M on 2 cores, mostly transformers
    dequantizing the GGUF."""
    path = Path(gguf_base)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if gguf_lora is not None:
        apply_gguf_lora(model, gguf_lora, _field(gguf.GGUFReader(str(path)), "general.architecture"))
    return model.eval()


def gguf_logprobs(
    gguf_base: str | os.PathLike,
    gguf_lora: str | os.PathLike | None,
    prompts_token_ids: Sequence[Sequence[int]],
    top_k: int,
) -> list[dict[int, float]]:
    """Top-k next-token logprobs at the first generated position of a GGUF model (plus a LoRA GGUF), one
    {token id: logprob} per prompt (adapters.serving.parity's GGUF runtime).

    gguf_base: a model GGUF (export_gguf's base.gguf or model.gguf); gguf_lora: its adapter.gguf, or None.
    Each prompt (token ids) runs alone: no padding. Raises ConfigError as apply_gguf_lora.
    """
    model = load_gguf_model(gguf_base, gguf_lora)
    out = []
    with torch.no_grad():
        for ids in prompts_token_ids:
            logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0, -1]  # (vocab,)
            values, indices = logits.float().log_softmax(-1).topk(top_k)
            out.append(dict(zip(indices.tolist(), values.tolist())))
    return out
