"""The production loop on a tiny model: train v1 -> serve -> log -> detect drift -> retrain v2 -> compare -> promote.

v1 is a TREC question-type classifier trained on short questions where "who" questions (HUM)
are rare. Then traffic changes: long questions, mostly about people. The server logs it, the
monitor flags the drift (length) and exits non-zero, the logged window gets labels, retraining
from v1 produces v2, v2 beats v1 on the window's holdout and takes the prod tag, and the
server then answers prod requests with v2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOOP_TRAIN = {"lr": 5e-2, "batch_size": 16, "max_steps": 40, "log_every": 10, "seed": 3, "eval_batch_size": 32}


@pytest.fixture(scope="module")
def questions(tiny_bert_dir):
    """(short questions with few HUM, long questions mostly HUM), deduplicated TREC rows with gold labels."""
    from transformers import AutoTokenizer

    from adapters.data.builtins import BUILTIN_DATASETS

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    ds = BUILTIN_DATASETS["trec"].load()
    rows = dict(zip(ds["text"], ds["label"]))
    rng = np.random.default_rng(0)
    short, long_ = [], []
    for text, label in rows.items():
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n <= 10 and (label != "HUM" or rng.random() < 0.05):
            short.append((text, label))
        elif n >= 15:
            long_.append((text, label))
    hum = [r for r in long_ if r[1] == "HUM"]
    other = [r for r in long_ if r[1] != "HUM"]
    rng.shuffle(hum)
    rng.shuffle(other)
    drifted = hum[:255] + other[:45]  # 85% people
    rng.shuffle(drifted)
    return short, drifted


def _jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    return path


def test_train_serve_log_detect_retrain_compare_promote(tmp_path, tiny_bert_dir, questions):
    from fastapi.testclient import TestClient

    from adapters.config import load_config
    from adapters.monitoring.monitor import EXIT_DRIFT, monitor
    from adapters.monitoring.reference import attach_reference
    from adapters.monitoring.traffic_log import TrafficLogger, read_window
    from adapters.serving.engine import ClassificationRequest, InferenceEngine
    from adapters.serving.http.app import ServerSettings, create_app
    from adapters.store.store import AdapterStore
    from adapters.training.retrain import retrain

    short, drifted = questions
    store = AdapterStore(tmp_path / "store")

    # ---- train v1 on short questions, record its drift reference, publish, tag prod
    from adapters.training.loop import train

    cfg = load_config(
        raw={
            "task": "sequence-classification",
            "model": {"name": str(tiny_bert_dir)},
            "data": {
                "name": str(_jsonl(tmp_path / "v1.jsonl", short)),
                "max_length": 48,
                "max_train_samples": 400,
                "max_eval_samples": 64,
                "max_test_samples": 96,
            },
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": LOOP_TRAIN,
            "output": {"run_dir": str(tmp_path / "run-v1"), "name": "loop"},
        }
    )
    v1 = train(cfg)
    reference = attach_reference(v1.adapter_dir)
    assert reference["labels"]["source"] == "predictions" and reference["embedding"]["count"] == 200
    store.tag(str(store.publish(v1.adapter_dir, "loop")), "prod")

    # ---- serve prod with traffic logging; the traffic has drifted
    engine = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", capacity=3, store=store)
    log_path = tmp_path / "traffic.db"
    logger = TrafficLogger(log_path, tokenizer=engine.tokenizer, log_text=True)
    settings = ServerSettings(on_request=logger, traffic_include_text=True)
    with TestClient(create_app(engine, settings)) as client:
        for start in range(0, len(drifted), 20):
            batch = [t for t, _ in drifted[start : start + 20]]
            r = client.post("/v1/classify", json={"model": "loop@prod", "input": batch})
            assert r.status_code == 200, r.text
    logger.close()
    logged = read_window(log_path, adapter="loop")
    assert len(logged) == len(drifted) and all(r["status"] == 200 for r in logged)

    # ---- detect: the monitor alarms and exits non-zero (a scheduler would now retrain)
    report = monitor("loop@prod", log_path, tmp_path / "drift", store_root=store.root)
    assert report.exit_code == EXIT_DRIFT, [(c.name, c.status, c.detail) for c in report.checks]
    assert report.check("length_ks").status == "alarm" and report.check("length_psi").status == "alarm"
    assert (tmp_path / "drift" / "report.md").is_file() and (tmp_path / "drift" / "length.png").is_file()

    # ---- label the logged window (here: the gold labels of what was sent) and retrain from prod
    gold = dict(drifted)
    window = _jsonl(tmp_path / "labeled.jsonl", [(r["text"], gold[r["text"]]) for r in logged])
    result = retrain("loop@prod", window, tmp_path / "retrain", store_root=store.root, replay=100, seed=0)

    # ---- compare and promote
    assert (result.current, result.candidate) == ("loop@1", "loop@2")
    assert result.candidate_metrics["accuracy"] > result.current_metrics["accuracy"] + 0.2, result.reason
    assert result.promoted and store.tags("loop")["prod"] == 2
    assert json.loads((store.locate("loop@2").path / "manifest.json").read_text())["parent"] == "loop@1"

    # ---- the server now answers prod traffic with v2
    with TestClient(create_app(engine, ServerSettings())) as client:
        texts = [t for t, l in drifted if l == "HUM"][:20]
        answer = client.post("/v1/classify", json={"model": "loop@prod", "input": texts}).json()
        direct = engine.classify([ClassificationRequest("loop@2", t) for t in texts])
    assert [x["label"] for x in answer["results"]] == [d.label for d in direct]
