"""How long the data report takes on ~10k real texts, and whether its fast near-duplicate
search finds what a brute-force comparison of every pair finds.

    .venv/bin/python benchmarks/data_report_speed.py [--rows 10000] [--out benchmarks/results/data_report_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402

from adapters.config import SplitConfig  # noqa: E402
from adapters.data.builtins import BUILTIN_DATASETS  # noqa: E402
from adapters.data.report import TextSimilarity, build_data_report, normalize_text  # noqa: E402
from adapters.data.splits import split_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--out", default="benchmarks/results/data_report_speed.json")
    args = parser.parse_args()

    texts, labels, seen = [], [], set()
    for name in ("trec", "sms-spam", "sentiment"):
        ds = BUILTIN_DATASETS[name].load()
        for text, label in zip(ds["text"][:], ds["label"][:]):
            if normalize_text(text) not in seen:
                seen.add(normalize_text(text))
                texts.append(text)
                labels.append(f"{name}:{label}")
    order = np.random.default_rng(0).permutation(len(texts))[: args.rows]
    rows = Dataset.from_dict({"text": [texts[i] for i in order], "label": [labels[i] for i in order]})
    splits = split_dataset(rows, SplitConfig(kind="stratified", validation=0.1, test=0.1), "label", seed=0)
    small = {name: split.select(range(min(50, len(split)))) for name, split in splits.items()}
    build_data_report(type(splits)(small), "text", "label")  # warm up: sklearn/scipy imports are not report time

    start = time.perf_counter()
    report = build_data_report(splits, "text", "label", near_duplicate_threshold=args.threshold)
    seconds = time.perf_counter() - start

    # Brute force: the exact cosine of every held-out row against every training row.
    names = ["train", "validation", "test"]
    all_texts = [normalize_text(t) for n in names for t in splits[n]["text"][:]]
    offsets = np.cumsum([0] + [len(splits[n]) for n in names])
    sim = TextSimilarity(all_texts)
    start = time.perf_counter()
    brute = {}
    for a, b in (("train", "validation"), ("train", "test")):
        ia, ib = names.index(a), names.index(b)
        exact_train = set(all_texts[offsets[ia] : offsets[ia + 1]])
        q = [i for i in range(offsets[ib], offsets[ib + 1]) if all_texts[i] not in exact_train]
        dense = (sim.full[q] @ sim.full[offsets[ia] : offsets[ia + 1]].T).tocsr()
        brute[f"{a}/{b}"] = int((np.asarray(dense.max(axis=1).todense()).ravel() >= args.threshold - 1e-6).sum())
    brute_seconds = time.perf_counter() - start

    result = {
        "command": "python benchmarks/data_report_speed.py " + " ".join(sys.argv[1:]),
        "rows": len(rows),
        "split_sizes": report.sizes,
        "report_seconds": round(seconds, 3),
        "near_duplicates_found": {k: v["count"] for k, v in report.near_duplicates.items()},
        "near_duplicates_brute_force": brute,
        "brute_force_seconds_near_pairs_only": round(brute_seconds, 3),
        "threshold": args.threshold,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
