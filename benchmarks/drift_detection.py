"""Drift checks: speed, and how often each check alarms on planted drift vs a same-distribution sample.

Reference: 1,500 TREC questions (MiniLM tokenizer; real MiniLM embeddings unless --tiny).
Windows of 300 requests per seed: held-out TREC ("same"), only HUM/LOC questions ("label_mix"),
the longest 30% of held-out questions ("longer"), SMS messages ("domain").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/drift_detection.py [--seeds 5] [--out benchmarks/results/drift_detection.json]
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
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

from adapters.data.builtins import BUILTIN_DATASETS  # noqa: E402
from adapters.monitoring.drift import DriftThresholds, mmd_permutation_test  # noqa: E402
from adapters.monitoring.monitor import build_report  # noqa: E402
from adapters.monitoring.reference import build_reference, embedder  # noqa: E402
from adapters.monitoring.traffic_log import TrafficLogger  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--window", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/drift_detection.json")
    args = parser.parse_args()

    # Speed of the embedding test alone, at the documented size.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 384)), rng.normal(size=(200, 384))
    t0 = time.perf_counter()
    mmd_permutation_test(x, y, permutations=500, seed=0)
    mmd_seconds = time.perf_counter() - t0

    embed = embedder("minilm-l6")
    trec = BUILTIN_DATASETS["trec"].load()
    first = {}
    for t, l in zip(trec["text"], trec["label"]):
        first.setdefault(t, l)
    texts, labels = list(first), list(first.values())
    order = np.random.default_rng(0).permutation(len(texts))
    ref_idx, hold = order[:1500], order[1500:]
    t0 = time.perf_counter()
    ref = build_reference(
        [texts[i] for i in ref_idx],
        [labels[i] for i in ref_idx],
        tokenizer=embed.tokenizer,
        predictions=[labels[i] for i in ref_idx],
        confidences=rng.beta(5, 1, 1500),
        embed_fn=embed,
    )
    reference_seconds = time.perf_counter() - t0
    sms = BUILTIN_DATASETS["sms-spam"].load()["text"]
    lengths = np.array([len(texts[i]) for i in hold])
    long_idx = hold[lengths > np.quantile(lengths, 0.7)]
    hum_loc = [i for i in hold if labels[i] in ("HUM", "LOC")]

    n = args.window
    logger = TrafficLogger("/dev/null", tokenizer=embed.tokenizer, vocabulary=ref.vocabulary)
    alarms: dict[str, dict[str, int]] = {}
    report_seconds = []
    for seed in range(args.seeds):
        r = np.random.default_rng(1000 + seed)

        def pick(pool):
            idx = r.choice(pool, n, replace=False)
            return [texts[i] for i in idx], [labels[i] for i in idx], r.beta(5, 1, n)

        windows = {
            "same": pick(hold),
            "label_mix": pick(hum_loc),
            "longer": pick(long_idx),
            "domain": (
                [sms[i] for i in r.choice(len(sms), n, replace=False)],
                r.choice(["ENTY", "HUM", "DESC"], n).tolist(),
                r.beta(2, 2, n),
            ),
        }
        for name, (ws, ls, cs) in windows.items():
            records = [
                logger.reduce({"adapter": "a", "text": t, "label": l, "confidence": float(c)})
                for t, l, c in zip(ws, ls, cs)
            ]
            emb = embed(ws[:200])
            for rec, e in zip(records, emb):
                rec["embedding"] = e.tolist()
            t0 = time.perf_counter()
            report = build_report(records, ref, DriftThresholds(seed=seed))
            report_seconds.append(time.perf_counter() - t0)
            row = alarms.setdefault(name, {})
            for c in report.checks:
                row[c.name] = row.get(c.name, 0) + (c.status == "alarm")
            row["any"] = row.get("any", 0) + (report.status == "alarm")
    logger.close()

    result = {
        "command": "python benchmarks/drift_detection.py " + " ".join(sys.argv[1:]),
        "seeds": args.seeds,
        "window": n,
        "alarm_rate": {s: {k: v / args.seeds for k, v in row.items()} for s, row in alarms.items()},
        "mmd_200x384_500_permutations_seconds": round(mmd_seconds, 3),
        "build_report_seconds_median": round(float(np.median(report_seconds)), 3),
        "build_reference_1500_texts_seconds": round(reference_seconds, 2),
        "embedding_model": "minilm-l6",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
