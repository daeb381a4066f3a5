"""Which runtimes load each method's artifacts with adapterkit's outputs: the table in docs/runtimes.md.

For every registered method and task it supports, a tiny adapter is trained for a few steps on TREC
(a 2-layer Llama with SmolLM2's tokenizer for causal-lm; a 2-layer BERT with MiniLM's tokenizer,
mean-pooled, for classification: the architectures of the built-ins, at a size that trains in
seconds), then ``adapterkit parity`` runs against each runtime: ``peft`` (the adapter folder, as
its model card says) and ``transformers`` (a merged export). A cell is "yes" when every golden row
is within 1e-4 (log-probabilities of a causal LM, class probabilities) with equal answers, else the
reason it is not (the refusal's message, or FAIL).

    .venv/bin/python benchmarks/runtime_table.py [--methods lora ia3] [--runtimes peft transformers]

Results merge into benchmarks/results/runtime_table.json (so runtimes run elsewhere, e.g. vLLM and
GGUF, add their columns); the Markdown table is rewritten from all of it into runtime_table.md
and between the markers of docs/runtimes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel  # noqa: E402

from adapters.config import load_config  # noqa: E402
from adapters.constants import RUNTIMES  # noqa: E402
from adapters.errors import AdapterkitError  # noqa: E402
from adapters.methods import list_methods  # noqa: E402
from adapters.modeling.builtins import resolve_model  # noqa: E402
from adapters.serving.parity import run_parity  # noqa: E402
from adapters.training.loop import train  # noqa: E402
from tests.conftest import _save_tiny_llama  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_table"
DOC = Path(__file__).resolve().parents[1] / "docs" / "runtimes.md"
START, END = "<!-- runtime-table:start -->", "<!-- runtime-table:end -->"
TEXTS = [
    "Who wrote Hamlet?",
    "Where is the Eiffel Tower?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
]
TASK_LABEL = {"causal-lm": "causal LM", "sequence-classification": "classifier"}


def tiny_bases(root: Path) -> dict[str, Path]:
    """The tiny Llama and BERT (random weights, the built-ins' real tokenizers), by task."""
    llama = _save_tiny_llama(root / "tiny-llama", Path(resolve_model("smollm2-135m-instruct")), width=32)
    bert = root / "tiny-bert"
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    ).save_pretrained(str(bert))
    tok.save_pretrained(str(bert))
    return {"causal-lm": llama, "sequence-classification": bert}


def train_tiny(base: Path, run_dir: Path, task: str, method: str) -> Path:
    """Four steps of `method` (default options) on TREC; returns the adapter folder."""
    raw = {
        "task": task,
        "model": {"name": str(base), "pooling": "mean" if task == "sequence-classification" else "auto"},
        "data": {
            "name": "trec",
            "max_length": 48,
            "max_train_samples": 64,
            "max_eval_samples": 16,
            "max_test_samples": 16,
        },
        "method": {"name": method},
        "train": {"lr": 5e-3, "batch_size": 8, "max_steps": 4, "log_every": 2, "seed": 1, "eval_batch_size": 16},
        "eval": {"max_new_tokens": 3, "baseline": False},
        "output": {"run_dir": str(run_dir), "name": run_dir.name},
    }
    return train(load_config(raw=raw)).adapter_dir


def cell(adapter: Path, runtime: str, store: Path, method: str) -> dict:
    """One parity run: {"ok", "max_diff", "note", "seconds"}."""
    t0 = time.perf_counter()
    try:
        report = run_parity(str(adapter), runtime, store=store, texts=TEXTS)
        note = "" if report.passed else f"FAIL (max difference {report.max_diff:.1e})"
        if report.greedy_only:
            note = (note + " " if note else "") + "greedy tokens only"
        if report.effect is not None:  # how far the adapter moves the base: what the 1e-4 is measured against
            note = (note + ", " if note else "") + f"adapter effect {report.effect:.0e}"
        out = {"ok": report.passed, "max_diff": report.max_diff, "effect": report.effect, "note": note}
    except AdapterkitError as err:  # the refusal, short: without the folder, the method's name and the advice
        note = str(err).splitlines()[0].replace(f"{adapter} ", "").split(";")[0]
        out = {"ok": False, "max_diff": None, "note": note.removeprefix(f"method {method!r} ")}
    return {**out, "seconds": round(time.perf_counter() - t0, 1)}


def markdown(results: dict) -> str:
    """The table: one row per method, a column per (runtime, task) that has any result."""
    columns = [
        (rt, task)
        for rt in RUNTIMES
        for task in TASK_LABEL
        if any(rt in by_task.get(task, {}) for by_task in results["methods"].values())
    ]
    head = "| method | " + " | ".join(f"{rt} ({TASK_LABEL[task]})" for rt, task in columns) + " |"
    lines = [head, "| --- |" + " --- |" * len(columns)]
    for method in sorted(results["methods"]):
        by_task = results["methods"][method]
        cells = []
        for rt, task in columns:
            entry = by_task.get(task, {}).get(rt)
            if task not in by_task:
                cells.append("n/a")
            elif entry is None:
                cells.append("")
            else:
                cells.append(
                    ("yes" + (f" ({entry['note']})" if entry["note"] else ""))
                    if entry["ok"]
                    else f"no: {entry['note']}"
                )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", help="method names (default: every registered method)")
    p.add_argument("--runtimes", nargs="*", default=["peft", "transformers"], choices=RUNTIMES)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = json.loads(RESULTS.with_suffix(".json").read_text()) if RESULTS.with_suffix(".json").is_file() else {}
    results.setdefault("methods", {})
    methods = [m for m in list_methods() if not args.methods or m.name in args.methods]
    with tempfile.TemporaryDirectory(prefix="runtime-table-") as tmp:
        root = Path(tmp)
        bases, store = tiny_bases(root), root / "store"
        for method in methods:
            for task in sorted(method.tasks):
                entry = results["methods"].setdefault(method.name, {}).setdefault(task, {})
                try:
                    adapter = train_tiny(bases[task], root / "runs" / f"{method.name}-{task}", task, method.name)
                except AdapterkitError as err:  # the method refuses this backbone: say so in every column
                    for runtime in args.runtimes:
                        entry[runtime] = {"ok": False, "max_diff": None, "note": f"not trained: {err}"[:160]}
                    continue
                for runtime in args.runtimes:
                    entry[runtime] = cell(adapter, runtime, store, method.name)
                    print(f"{method.name:14s} {task:24s} {runtime:12s} {entry[runtime]}", flush=True)
    results["command"] = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    results["made_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
    RESULTS.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    RESULTS.with_suffix(".md").write_text(f"<!-- made by: {results['command']} -->\n{table}")
    if DOC.is_file() and START in DOC.read_text():
        text = DOC.read_text()
        DOC.write_text(text[: text.index(START) + len(START)] + "\n" + table + text[text.index(END) :])
    return 0


if __name__ == "__main__":
    sys.exit(main())
