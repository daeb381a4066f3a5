#!/usr/bin/env python
"""Preference and RL objectives on real data: SmolLM2-135M-Instruct + LoRA on TREC, on the CPU.

    python benchmarks/preference.py [--part dpo|grpo|both] [--sft-steps 60] [--dpo-steps 40] [--grpo-steps 40]

dpo: SFT on the constructed TREC preference pairs (``trec-preference``: prompt = the question, chosen =
its type word, rejected = another type word), published to a scratch store; then DPO continuing from
that adapter (init_from). Held-out preference accuracy (log p(chosen) > log p(rejected), test split)
of the base, of SFT alone and of SFT + DPO, all on the same test pairs.

grpo: GRPO from the base on TREC with the exact-match reward (the answer's first line equals the type
word); held-out exact match of the base (adapter disabled) and of the GRPO adapter.

Writes benchmarks/results/preference.json and .md (numbers, seconds, the command, the machine).
The pairs are constructed from TREC's labels, not human judgements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
SYSTEM = (
    "Classify the question type. Answer with one word: abbreviation, description, entity, human, location or number."
)


def base_config(run_dir: Path, **train) -> dict:
    """SmolLM2 + LoRA (r 16, all projections of the top 10 blocks) on TREC, as configs/quickstart.yaml."""
    return {
        "task": "causal-lm",
        "model": {"name": "smollm2-135m-instruct", "dtype": "float32"},
        "data": {
            "name": "trec-preference",
            "system_prompt": SYSTEM,
            "max_length": 64,
            "max_train_samples": 2000,
            "max_eval_samples": 50,
            "max_test_samples": 200,
            "split": {"kind": "stratified", "validation": 0.1, "test": 0.2},
        },
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all", "top_layers": 10},
        "train": {
            "lr": 1e-3,
            "batch_size": 16,
            "scheduler": "cosine",
            "warmup_ratio": 0.05,
            "log_every": 10,
            "eval_batch_size": 64,
            "seed": 42,
            **train,
        },
        "eval": {"max_new_tokens": 3, "baseline": False},  # DPO: the base's preference accuracy is scored below
        "output": {"run_dir": str(run_dir), "name": run_dir.name},
    }


def test_preference_accuracy(cfg, adapters: dict[str, Path | None]) -> dict[str, dict]:
    """Preference metrics on the test pairs of `cfg` (a preference objective's split) of the base (None)
    and of each adapter folder, by name; each with the number of pairs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.data.loading import prepare_splits, tokenize_splits
    from adapters.evaluation.preference import evaluate_preference
    from adapters.modeling.backbone import load_tokenizer
    from adapters.modeling.builtins import resolve_model

    tokenizer = load_tokenizer(cfg.model)
    test = tokenize_splits(prepare_splits(cfg), cfg, tokenizer)["test"]
    out = {}
    for name, folder in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.name))
        if folder is not None:
            model = PeftModel.from_pretrained(model, str(folder))
        metrics = evaluate_preference(model, test, tokenizer, SimpleNamespace(device="cpu"), 64)
        out[name] = {**metrics, "pairs": len(test)}
    return out


def run_dpo(work: Path, sft_steps: int, dpo_steps: int, beta: float) -> dict:
    from adapters.config import load_config
    from adapters.training.loop import train

    store = work / "store"
    started = time.perf_counter()
    sft_raw = base_config(work / "trec-sft", max_steps=sft_steps)
    sft_raw["output"].update(publish=True, store=str(store))
    sft = train(load_config(raw=sft_raw))
    sft_seconds = time.perf_counter() - started
    dpo_raw = base_config(
        work / "trec-dpo", max_steps=dpo_steps, objective="dpo", batch_size=8, lr=5e-4, preference={"beta": beta}
    )
    dpo_raw["init_from"] = f"{sft_raw['output']['name']}@1"
    dpo_raw["output"]["store"] = str(store)
    dpo_cfg = load_config(raw=dpo_raw)
    started = time.perf_counter()
    dpo = train(dpo_cfg)
    dpo_seconds = time.perf_counter() - started
    pref = test_preference_accuracy(dpo_cfg, {"base": None, "sft": sft.adapter_dir, "dpo": dpo.adapter_dir})
    base = {
        "test_preference_accuracy": pref["base"]["preference_accuracy"],
        "test_logp_margin": pref["base"]["logp_margin"],
    }
    out = {"test_pairs": pref["base"]["pairs"], "base": base}
    for name, result, seconds in (("sft", sft, sft_seconds), ("dpo_after_sft", dpo, dpo_seconds)):
        key = "sft" if name == "sft" else "dpo"
        out[name] = {
            "steps": result.steps,
            "seconds": round(seconds, 1),
            "test_exact_match": result.metrics["adapted"]["exact_match"],
            "test_preference_accuracy": pref[key]["preference_accuracy"],
            "test_logp_margin": pref[key]["logp_margin"],
        }
    out["dpo_after_sft"]["beta"] = beta
    return out


def run_grpo(work: Path, steps: int, generations: int) -> dict:
    from adapters.config import load_config
    from adapters.training.loop import train

    raw = base_config(
        work / "trec-grpo",
        max_steps=steps,
        objective="grpo",
        batch_size=8,
        lr=1e-3,
        grpo={
            "num_generations": generations,
            "max_new_tokens": 4,
            "temperature": 1.0,
            "rewards": [{"name": "exact_match"}],
        },
    )
    raw["data"]["name"] = "trec"
    raw["eval"]["baseline"] = True  # exact match of the base, adapter disabled
    started = time.perf_counter()
    result = train(load_config(raw=raw))
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if r.get("event") == "objective"]
    tenth = max(1, len(rewards) // 10)
    return {
        "steps": result.steps,
        "seconds": round(seconds, 1),
        "num_generations": generations,
        "test_exact_match_base": result.metrics["base"]["exact_match"],
        "test_exact_match_grpo": result.metrics["adapted"]["exact_match"],
        "train_reward_first_tenth": sum(rewards[:tenth]) / tenth,
        "train_reward_last_tenth": sum(rewards[-tenth:]) / tenth,
        "test_examples": result.metrics["adapted"]["examples"],
    }


def _provenance(part: dict) -> str:
    machine = part["machine"]
    return (
        f"Command: `{part['command']}` ({part['date']}); {machine['platform']}, {machine['cpus']} CPUs, "
        f"load average {machine['loadavg_before'][0]:.1f} before and {machine['loadavg_after'][0]:.1f} after "
        "(a shared machine: seconds include waiting for the cores)."
    )


def markdown(result: dict) -> str:
    lines = [
        "# Preference and RL objectives: SmolLM2-135M-Instruct + LoRA on TREC (CPU)",
        "",
        f"The preference pairs are {result['note']}.",
        "",
    ]
    if "dpo" in result:
        d = result["dpo"]
        lines += [
            "## DPO after SFT (constructed TREC preference pairs, held-out test pairs)",
            "",
            "| model | steps | seconds | preference accuracy | mean log-prob margin (nats) | exact match |",
            "|---|---|---|---|---|---|",
            f"| base | - | - | {d['base']['test_preference_accuracy']:.3f} | {d['base']['test_logp_margin']:.2f} | - |",
            f"| SFT | {d['sft']['steps']} | {d['sft']['seconds']} | {d['sft']['test_preference_accuracy']:.3f} | "
            f"{d['sft']['test_logp_margin']:.2f} | {d['sft']['test_exact_match']:.3f} |",
            f"| SFT + DPO | +{d['dpo_after_sft']['steps']} | {d['dpo_after_sft']['seconds']} | "
            f"{d['dpo_after_sft']['test_preference_accuracy']:.3f} | "
            f"{d['dpo_after_sft']['test_logp_margin']:.2f} | "
            f"{d['dpo_after_sft']['test_exact_match']:.3f} |",
            "",
            _provenance(d),
            "",
        ]
    if "grpo" in result:
        g = result["grpo"]
        lines += [
            "## GRPO from the base, exact-match reward (TREC, held-out test)",
            "",
            "| model | steps | seconds | exact match | mean training reward (first / last tenth of steps) |",
            "|---|---|---|---|---|",
            f"| base | - | - | {g['test_exact_match_base']:.3f} | - |",
            f"| GRPO | {g['steps']} | {g['seconds']} | {g['test_exact_match_grpo']:.3f} | "
            f"{g['train_reward_first_tenth']:.3f} / {g['train_reward_last_tenth']:.3f} |",
            "",
            _provenance(g),
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["dpo", "grpo", "both"], default="both")
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--dpo-steps", type=int, default=40)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--grpo-steps", type=int, default=40)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/preference")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="preference-bench-"))
    result: dict = {
        "note": "preference pairs constructed from TREC labels (rejected = another type word), not human judgements"
    }
    parts = {
        "dpo": lambda: run_dpo(work, args.sft_steps, args.dpo_steps, args.beta),
        "grpo": lambda: run_grpo(work, args.grpo_steps, args.generations),
    }
    for name, run in parts.items():
        if args.part in (name, "both"):
            load_before = os.getloadavg()
            result[name] = {
                **run(),
                "command": "python " + " ".join(["benchmarks/preference.py", *sys.argv[1:]]),
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(),
                },
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    merged = {**previous, **result}  # one part at a time keeps the other part's numbers
    out.with_suffix(".json").write_text(json.dumps(merged, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(merged))
    print(markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
