#!/usr/bin/env python
"""Preference and RL objectives on real data: SmolLM2-135M-Instruct + LoRA on TREC, on the CPU.

    python benchmarks/preference.py [--part dpo|grpo|both] [--sft-steps 60] [--dpo-steps 40] [--grpo-steps 12]

dpo: SFT on the constructed TREC preference pairs (``trec-preference``: prompt = the question, chosen =
its type word, rejected = another type word), published to a scratch store; then DPO continuing from
that adapter (init_from). Held-out preference accuracy (log p(chosen) > log p(rejected), test split)
of the base, of SFT alone and of SFT + DPO, all on the same test pairs.

grpo: GRPO from the base on TREC with the exact-match reward (the answer's first line equals the type
word) and a format reward (the answer starts with a type word), each question in an instruction that
lists the type words in an order of its own; training stops after --grpo-seconds (default 540, so the
run with its evaluation fits in about 10 minutes on an idle 2-core machine). Held-out exact match of the
base (adapter disabled) and of the GRPO adapter, on the same prompts and test questions (the built-in
``trec`` split).

Writes benchmarks/results/preference.json and .md (numbers, seconds, the command, the machine).
The pairs are constructed from TREC's labels, not human judgements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
SYSTEM = (
    "Classify the question type. Answer with one word: abbreviation, description, entity, human, location or number."
)
# GRPO learns only from groups whose rewards differ. Under SYSTEM the base never answers with a bare type word
# (0 of 360 samples of 40 training questions, greedy and at temperatures 0.7 and 1), so GRPO puts the question in
# the user turn after an instruction listing the type words, which makes the base answer with a type word now and
# then, and adds a format reward (the first line is a type word) to exact match: the usual format + correctness
# recipe for a base model that does not follow the answer format yet. With the list in one fixed order the base's
# type words are nearly all the first one listed (next-token mass on the six words 0.044, 0.041 of it on
# "Ab(breviation)", 60 training questions), and GRPO collapsed onto it (test exact match 0.005 after 40 steps):
# so each question gets its own order of the list (seeded by the question), and a positional guess is right
# only by chance.
TYPE_WORDS = ("abbreviation", "description", "entity", "human", "location", "number")
# the answer starts with a type word: 10% of the base's samples, so most groups of 8 differ in it at first
TYPE_WORD = r"(?i)^\W*(" + "|".join(TYPE_WORDS) + r")\b"


def instruction(question: str) -> str:
    """The GRPO prompt's user turn for `question`: the instruction with the type words in an order
    seeded by the question (crc32), then the question."""
    words = list(TYPE_WORDS)
    random.Random(zlib.crc32(question.encode())).shuffle(words)
    return (
        "What type of answer does this question ask for? Reply with exactly one word from: "
        f"{', '.join(words)}.\nQuestion:\n{question}"
    )


def trec_with_instructions(cfg, path: Path) -> dict[str, int]:
    """Write the train / validation / test rows of the built-in ``trec`` split of `cfg` (same seed and
    caps, so the same held-out questions) to `path` (jsonl) with each question inside its own
    instruction, a ``split`` column for data.split.kind "predefined", and the label as its type word.
    Returns the rows per split."""
    from adapters.data.builtins import TREC_WORDS
    from adapters.data.loading import prepare_splits

    splits = prepare_splits(cfg).splits
    with path.open("w") as f:
        for name, rows in splits.items():
            for row in rows:
                label = TREC_WORDS[row["label"]]
                f.write(json.dumps({"text": instruction(row["text"]), "label": label, "split": name}) + "\n")
    return {name: len(rows) for name, rows in splits.items()}


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


def run_grpo(work: Path, args) -> dict:
    """GRPO from the base on TREC (prompts of `instruction`), stopped after args.grpo_seconds of training;
    exact match on the held-out test questions of the adapter and of the base (adapter disabled)."""
    from adapters.config import load_config
    from adapters.training.loop import train

    rewards = [{"name": "exact_match"}, {"name": "regex", "pattern": TYPE_WORD, "weight": args.format_weight}]
    grpo = {
        "num_generations": args.generations,
        "max_new_tokens": 3,  # "Abbreviation" is 3 tokens; exact match reads the first line of 3 tokens too
        "temperature": args.temperature,
        "beta": args.grpo_beta,
        "scale_rewards": args.scale_rewards,
        "rewards": rewards,
    }
    raw = base_config(
        work / "trec-grpo",
        max_steps=args.grpo_steps,
        max_seconds=args.grpo_seconds,
        objective="grpo",
        batch_size=args.prompts,
        lr=args.grpo_lr,
        grpo=grpo,
    )
    # the instruction and SmolLM2's default system message take ~70 tokens
    raw["data"].update(name="trec", system_prompt=None, max_length=128, max_test_samples=args.test_samples)
    data_file = work / "trec-instructions.jsonl"
    rows = trec_with_instructions(load_config(raw=raw), data_file)
    raw["data"].update(name=str(data_file), split={"kind": "predefined"})
    test_labels = [r["label"] for r in map(json.loads, data_file.read_text().splitlines()) if r["split"] == "test"]
    majority = max(test_labels.count(w) for w in TYPE_WORDS) / len(test_labels)  # always the commonest type word
    raw["eval"]["baseline"] = True  # exact match of the base, adapter disabled, on the same prompts
    started = time.perf_counter()
    result = train(load_config(raw=raw))
    seconds = time.perf_counter() - started
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in events if r.get("event") == "objective"]
    training_seconds = logged[-1]["time"] - events[0]["time"]  # from the optimizer's set-up to the last step
    tenth = max(1, len(logged) // 10)

    def share(key: str, part: list) -> float:
        return sum(r[key] for r in part) / len(part)

    return {
        "steps": result.steps,
        "seconds": round(seconds, 1),
        "max_training_seconds": args.grpo_seconds,
        "training_seconds": round(training_seconds, 1),
        "steps_per_second": round(result.steps / training_seconds, 4),
        "prompts_per_step": args.prompts,
        "num_generations": args.generations,
        "temperature": args.temperature,
        "lr": args.grpo_lr,
        "beta": args.grpo_beta,
        "scale_rewards": args.scale_rewards,
        "rewards": rewards,
        "instruction": instruction("<question>"),
        "rows": rows,
        "test_exact_match_base": result.metrics["base"]["exact_match"],
        "test_exact_match_grpo": result.metrics["adapted"]["exact_match"],
        "test_exact_match_majority_word": majority,
        "train_exact_match_first_tenth": share("reward_exact_match", logged[:tenth]),
        "train_exact_match_last_tenth": share("reward_exact_match", logged[-tenth:]),
        "train_type_word_first_tenth": share("reward_regex", logged[:tenth]),
        "train_type_word_last_tenth": share("reward_regex", logged[-tenth:]),
        "test_examples": result.metrics["adapted"]["examples"],
    }


def _provenance(part: dict) -> str:
    machine = part["machine"]
    return (
        f"Command: `{part['command']}` ({part['date']}); {machine['platform']}, {machine['cpus']} CPUs"
        + (f", {machine['torch_threads']} torch thread(s)" if machine.get("torch_threads") else "")
        + f", load average {machine['loadavg_before'][0]:.1f} before and {machine['loadavg_after'][0]:.1f} after "
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
            "## GRPO from the base: exact-match and type-word rewards (TREC, held-out test)",
            "",
            f"{g['prompts_per_step']} prompts per step, {g['num_generations']} samples each at temperature "
            f"{g['temperature']}, LR {g['lr']}, KL weight {g['beta']}, scale_rewards {g['scale_rewards']}; rewards: "
            f"exact match (weight 1) and a type word first (weight {g['rewards'][1]['weight']}, a "
            f"regular expression); training stops after {g['max_training_seconds']:.0f} s: here {g['steps']} steps "
            f"in {g['training_seconds']:.0f} s ({g['steps_per_second']:.3f} steps/s). The prompt lists the "
            "type words in an order of its own per question (this order is the one of the text <question>):",
            "",
            "    " + g["instruction"].replace("\n", "\n    "),
            "",
            f"| model | steps | seconds (data, training, evaluation) | test exact match ({g['rows']['test']} questions) "
            "| training samples right (first / last tenth of steps) "
            "| training samples answering a type word (first / last tenth) |",
            "|---|---|---|---|---|---|",
            f"| base | - | - | {g['test_exact_match_base']:.3f} | - | - |",
            f"| GRPO | {g['steps']} | {g['seconds']} | {g['test_exact_match_grpo']:.3f} | "
            f"{g['train_exact_match_first_tenth']:.3f} / {g['train_exact_match_last_tenth']:.3f} | "
            f"{g['train_type_word_first_tenth']:.3f} / {g['train_type_word_last_tenth']:.3f} |",
            f"| always the commonest test type word (reference) | - | - | {g['test_exact_match_majority_word']:.3f} "
            "| - | - |",
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
    parser.add_argument("--grpo-steps", type=int, default=40, help="the LR schedule's length")
    parser.add_argument("--grpo-seconds", type=float, default=540, help="stop GRPO after this much training")
    parser.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="GRPO samples per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--grpo-lr", type=float, default=1e-3)
    parser.add_argument("--grpo-beta", type=float, default=0.0, help="KL weight to the base")
    parser.add_argument("--scale-rewards", choices=["group", "none"], default="none")
    parser.add_argument("--format-weight", type=float, default=0.2, help="weight of the type-word reward")
    parser.add_argument("--test-samples", type=int, default=200, help="held-out TREC questions scored")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/preference")
    args = parser.parse_args()
    if args.threads:
        import torch

        # on a machine loaded by others, 1 thread per process steps ~3x faster than 2 (threads wait for each other)
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="preference-bench-"))
    result: dict = {"note": "constructed from TREC labels (rejected = another type word), not human judgements"}
    parts = {
        "dpo": lambda: run_dpo(work, args.sft_steps, args.dpo_steps, args.beta),
        "grpo": lambda: run_grpo(work, args),
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
                    "torch_threads": args.threads,
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
