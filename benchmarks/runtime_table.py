"""Which runtimes load each method's artifacts with adapterkit's outputs: the tables in docs/runtimes.md.

Per method (the default): for every registered method and task it supports, a tiny adapter is trained for
a few steps on TREC (a 2-layer Llama with SmolLM2's tokenizer for causal-lm, 128 wide so that vLLM's CPU
attention takes its head size; a 2-layer BERT with MiniLM's tokenizer, mean-pooled, for classification:
the architectures of the built-ins, at a size that trains in seconds), then ``adapterkit parity`` runs
against each runtime: ``peft`` (the adapter folder, as its model card says), ``transformers`` (a merged
export), ``vllm`` (vLLM's CPU build serving the adapter as a LoRA) and ``gguf`` (llama.cpp's converters).
A cell is "yes" when every golden row is within 1e-4 (log-probabilities of a causal LM, class
probabilities) with equal answers, else the reason it is not (the refusal's message, or FAIL).

    .venv/bin/python benchmarks/runtime_table.py [--methods lora ia3] [--runtimes peft transformers vllm gguf]

A trained adapter (``--adapter REF --store DIR``, e.g. the quickstart's): each runtime on the adapter
itself and on a merged export of it (vLLM serves the export as its model; GGUF converts it), on the
adapter's own held-out data (the first ``--limit`` rows of its run's test split):

    .venv/bin/python benchmarks/runtime_table.py --adapter trec-smollm2@1 --store /tmp/store --label quickstart

Results merge into benchmarks/results/runtime_table.json (a run of some runtimes or methods keeps the
others' cells, and each runtime's command); the Markdown tables are rewritten from all of it into
runtime_table.md and between the markers of docs/runtimes.md.
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
from adapters.serving.gguf import export_gguf  # noqa: E402
from adapters.serving.merge import merge_and_export  # noqa: E402
from adapters.serving.parity import run_parity  # noqa: E402
from adapters.store.store import AdapterStore  # noqa: E402
from adapters.training.loop import train  # noqa: E402
from tests.conftest import _save_tiny_llama  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_table"
DOC = Path(__file__).resolve().parents[1] / "docs" / "runtimes.md"
START, END = "<!-- runtime-table:start -->", "<!-- runtime-table:end -->"
TRAINED_START, TRAINED_END = "<!-- trained-table:start -->", "<!-- trained-table:end -->"
TEXTS = [
    "Who wrote Hamlet?",
    "Where is the Eiffel Tower?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
]
TASK_LABEL = {"causal-lm": "causal LM", "sequence-classification": "classifier"}


def tiny_bases(root: Path) -> dict[str, Path]:
    """The tiny Llama and BERT (random weights, the built-ins' real tokenizers), by task."""
    # 128 wide, 4 heads: head size 32, the smallest vLLM's CPU attention takes.
    llama = _save_tiny_llama(root / "tiny-llama", Path(resolve_model("smollm2-135m-instruct")), width=128)
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


def cell(
    adapter: Path | str,
    runtime: str,
    store: Path,
    method: str,
    texts: list[str] | None = TEXTS,
    artifact: Path | None = None,
    limit: int = 8,
) -> dict:
    """One parity run: {"ok", "max_diff", "effect", "rows", "note", "seconds"}. texts None: the adapter's own
    test split (`limit` rows); artifact: the folder the runtime loads (parity's default when None)."""
    t0 = time.perf_counter()
    try:
        report = run_parity(
            str(adapter), runtime, store=store, texts=texts, artifact=str(artifact) if artifact else None, limit=limit
        )
        note = "" if report.passed else f"FAIL (max difference {report.max_diff:.1e})"
        if report.greedy_only:
            note = (note + " " if note else "") + "greedy tokens only"
        if report.effect is not None:  # how far the adapter moves the base: what the 1e-4 is measured against
            note = (note + ", " if note else "") + f"adapter effect {report.effect:.0e}"
        rows = len(report.rows)
        out = {"ok": report.passed, "max_diff": report.max_diff, "effect": report.effect, "rows": rows, "note": note}
    except AdapterkitError as err:  # the refusal, short: without the folder, the method's name and the advice
        note = str(err).splitlines()[0].replace(f"{adapter} ", "").split(";")[0][:200]
        out = {"ok": False, "max_diff": None, "note": note.removeprefix(f"method {method!r} ")}
    return {**out, "seconds": round(time.perf_counter() - t0, 1)}


def _text(entry: dict | None) -> str:
    """A cell's text: "yes (note)" or "no: reason"."""
    if entry is None:
        return ""
    if entry["ok"]:
        return "yes" + (f" ({entry['note']})" if entry["note"] else "")
    return f"no: {entry['note']}"


def markdown(results: dict) -> str:
    """The per-method table: one row per method, a column per (runtime, task) that has any result. A column
    whose every cell is the same refusal becomes one line under the table."""
    columns = [
        (rt, task)
        for rt in RUNTIMES
        for task in TASK_LABEL
        if any(rt in by_task.get(task, {}) for by_task in results["methods"].values())
    ]
    footnotes, kept = [], []
    for rt, task in columns:
        cells = {_text(by_task[task].get(rt)) for by_task in results["methods"].values() if task in by_task}
        if len(cells) == 1 and next(iter(cells)).startswith("no: "):
            footnotes.append(f"- {rt} ({TASK_LABEL[task]}): every method {next(iter(cells))}")
        else:
            kept.append((rt, task))
    head = "| method | " + " | ".join(f"{rt} ({TASK_LABEL[task]})" for rt, task in kept) + " |"
    lines = [head, "| --- |" + " --- |" * len(kept)]
    for method in sorted(results["methods"]):
        by_task = results["methods"][method]
        cells = ["n/a" if task not in by_task else _text(by_task[task].get(rt)) for rt, task in kept]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + footnotes if footnotes else [])) + "\n"


def trained_markdown(results: dict) -> str:
    """The trained adapters' table: per adapter, a row per artifact (the adapter, its merged export) and a
    column per runtime, each cell with the largest difference over the golden rows."""
    lines = []
    for label, entry in sorted(results.get("trained", {}).items()):
        lines += [f"**{label}**: {entry['description']}", "", f"Made by `{entry['command']}`.", ""]
        lines += ["| artifact | " + " | ".join(RUNTIMES) + " |", "| --- |" + " --- |" * len(RUNTIMES)]
        for artifact, by_runtime in entry["artifacts"].items():
            cells = []
            for rt in RUNTIMES:
                got = by_runtime.get(rt)
                if got is None:
                    cells.append("n/a")
                elif got["ok"]:
                    cells.append(f"yes: {got['rows']}/{got['rows']} rows, max \\|Δlogp\\| {got['max_diff']:.1e}")
                else:
                    cells.append(_text(got))
            lines.append(f"| {artifact} | " + " | ".join(cells) + " |")
        effect = next((c["effect"] for c in entry["artifacts"]["adapter"].values() if c.get("effect")), None)
        if effect:
            lines += ["", f"The adapter moves the base's top-5 log-probabilities by up to {effect:.2f} on these rows."]
        lines.append("")
    return "\n".join(lines)


def run_methods(results: dict, names: list[str] | None, runtimes: list[str], root: Path) -> None:
    """The per-method cells: train each method's tiny adapter per task, run parity per runtime (in place)."""
    methods = [m for m in list_methods() if not names or m.name in names]
    bases, store = tiny_bases(root), root / "store"
    for method in methods:
        for task in sorted(method.tasks):
            entry = results["methods"].setdefault(method.name, {}).setdefault(task, {})
            try:
                adapter = train_tiny(bases[task], root / "runs" / f"{method.name}-{task}", task, method.name)
            except AdapterkitError as err:  # the method refuses this backbone: say so in every column
                for runtime in runtimes:
                    entry[runtime] = {"ok": False, "max_diff": None, "note": f"not trained: {err}"[:160]}
                continue
            for runtime in runtimes:
                entry[runtime] = cell(adapter, runtime, store, method.name)
                print(f"{method.name:14s} {task:24s} {runtime:12s} {entry[runtime]}", flush=True)


def run_trained(ref: str, store_root: str, runtimes: list[str], limit: int, root: Path) -> dict:
    """The trained adapter's cells: {"adapter": {runtime: cell}, "merged export": {runtime: cell}}. The
    merged export (and its GGUF) is made once here; peft loads only the adapter, transformers only the export."""
    store = AdapterStore(store_root)
    _, manifest = store.resolve(ref, verify=True)
    method = ((manifest or {}).get("method") or {}).get("name", "")
    base = (manifest.get("base_model") or {}).get("path") or (manifest.get("base_model") or {}).get("name")
    merged = root / "merged"
    merge_and_export(base, ref, merged, store=store)
    out: dict[str, dict] = {"adapter": {}, "merged export": {}}
    for runtime in runtimes:
        if runtime != "transformers":
            out["adapter"][runtime] = cell(ref, runtime, store.root, method, texts=None, limit=limit)
            print(f"adapter        {runtime:12s} {out['adapter'][runtime]}", flush=True)
        if runtime == "peft":
            continue
        artifact = merged
        if runtime == "gguf":
            try:
                artifact = export_gguf(merged, root / "merged-gguf")
            except AdapterkitError as err:
                out["merged export"][runtime] = {"ok": False, "max_diff": None, "note": str(err)[:200]}
                continue
        got = cell(ref, runtime, store.root, method, texts=None, artifact=artifact, limit=limit)
        out["merged export"][runtime] = got
        print(f"merged export  {runtime:12s} {got}", flush=True)
    return out


def merge(into: dict, fresh: dict) -> dict:
    """`fresh` cells over `into` (both runtime_table.json's shape): per method and task the runtimes run, per
    trained adapter the artifacts' runtimes, per runtime its command. Returns `into`, changed."""
    for method, by_task in fresh.get("methods", {}).items():
        for task, cells in by_task.items():
            into.setdefault("methods", {}).setdefault(method, {}).setdefault(task, {}).update(cells)
    for label, entry in fresh.get("trained", {}).items():
        old = into.setdefault("trained", {}).setdefault(label, {"artifacts": {}})
        for artifact, cells in entry["artifacts"].items():
            old["artifacts"].setdefault(artifact, {}).update(cells)
        old.update({k: v for k, v in entry.items() if k != "artifacts"})
    into.setdefault("commands", {}).update(fresh.get("commands", {}))
    into.pop("command", None)  # one command per runtime now (results["commands"])
    return into


def save(fresh: dict) -> dict:
    """Merge `fresh` into runtime_table.json as it is now on disk (another run may have written it since this
    one started), write it atomically, and rewrite runtime_table.md and the tables in docs/runtimes.md."""
    path = RESULTS.with_suffix(".json")
    results = merge(json.loads(path.read_text()) if path.is_file() else {"methods": {}}, fresh)
    results["made_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
    made_by = sorted({results.get("commands", {}).get(rt, "") for rt in RUNTIMES} - {""})
    table, trained = markdown(results), trained_markdown(results)
    header = "".join(f"<!-- made by: {c} -->\n" for c in made_by)
    outputs = {
        path: json.dumps(results, indent=2) + "\n",
        RESULTS.with_suffix(".md"): f"{header}{table}\n## Trained adapters\n\n{trained}",
    }
    if DOC.is_file():
        text = DOC.read_text()
        for start, end, body in ((START, END, table), (TRAINED_START, TRAINED_END, trained)):
            if start in text and end in text:
                text = text[: text.index(start) + len(start)] + "\n" + body + text[text.index(end) :]
        outputs[DOC] = text
    for target, body in outputs.items():
        staged = target.with_name(f".{target.name}.tmp")
        staged.write_text(body)
        os.replace(staged, target)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", help="method names (default: every registered method)")
    p.add_argument("--runtimes", nargs="*", default=["peft", "transformers"], choices=RUNTIMES)
    p.add_argument("--adapter", help="a trained adapter's store reference: its own table instead of the methods'")
    p.add_argument("--store", help="the store holding --adapter")
    p.add_argument("--label", help="the trained adapter's name in the table (default: --adapter)")
    p.add_argument("--description", default="", help="what the trained adapter is, for the table")
    p.add_argument("--limit", type=int, default=8, help="golden rows of --adapter's test split")
    p.add_argument("--merge", metavar="FILE", help="only merge a runtime_table.json written elsewhere, and render")
    args = p.parse_args(argv)
    if args.adapter and not args.store:
        p.error("--adapter needs --store")
    if args.merge:
        save(json.loads(Path(args.merge).read_text()))
        return 0
    torch.set_num_threads(1)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    fresh: dict = {"methods": {}}
    with tempfile.TemporaryDirectory(prefix="runtime-table-") as tmp:
        if args.adapter:
            artifacts = run_trained(args.adapter, args.store, args.runtimes, args.limit, Path(tmp))
            entry = {"artifacts": artifacts, "ref": args.adapter, "command": command}
            fresh["trained"] = {args.label or args.adapter: {**entry, "description": args.description}}
        else:
            run_methods(fresh, args.methods, args.runtimes, Path(tmp))
            fresh["commands"] = {runtime: command for runtime in args.runtimes}
    save(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
