"""Traffic logging: privacy by default, sampling, thread safety, both backends, windows."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from transformers import AutoTokenizer

from adapters.errors import ConfigError
from adapters.monitoring.traffic_log import TrafficLogger, adapter_matches, detect_backend, read_window, text_hash


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(str(minilm_dir))


def _request(i: int = 0, adapter: str = "clf@1", text: str | None = None, **extra) -> dict:
    rec = {
        "adapter": adapter,
        "text": text if text is not None else f"where is the city number {i} located",
        "label": "LOC",
        "confidence": 0.9,
        "latency_ms": 12.5,
    }
    rec.update(extra)
    return rec


def test_private_by_default_keeps_statistics_not_text(tmp_path, tokenizer):
    path = tmp_path / "traffic.jsonl"
    with TrafficLogger(path, tokenizer=tokenizer) as logger:
        stored = logger.log(_request(text="Where is the Eiffel tower ☃?"))
    line = path.read_text().strip()
    assert "Eiffel" not in line and "eiffel" not in line  # neither raw text nor decodable ids
    rec = json.loads(line)
    assert rec == stored
    assert "text" not in rec and "token_ids" not in rec
    ids = tokenizer("Where is the Eiffel tower ☃?", add_special_tokens=False)["input_ids"]
    assert rec["input_chars"] == len("Where is the Eiffel tower ☃?")
    assert rec["input_tokens"] == len(ids)
    assert rec["unk_tokens"] == 1  # the snowman is not in MiniLM's WordPiece vocabulary
    assert rec["text_hash"] == text_hash("Where is the Eiffel tower ☃?")
    assert rec["adapter"] == "clf@1" and rec["label"] == "LOC"
    assert rec["confidence"] == pytest.approx(0.9) and rec["latency_ms"] == pytest.approx(12.5)
    assert rec["time"].endswith("+00:00")


def test_log_text_stores_text_and_ids_and_vocabulary_gives_oov(tmp_path, tokenizer):
    ids = tokenizer("where is paris", add_special_tokens=False)["input_ids"]
    vocab = set(ids[:-1])  # the last word was never seen in training
    with TrafficLogger(tmp_path / "t.jsonl", log_text=True, tokenizer=tokenizer, vocabulary=vocab) as logger:
        rec = logger.log(_request(text="where is paris"))
    assert rec["text"] == "where is paris"
    assert rec["token_ids"] == ids
    assert rec["oov_tokens"] == 1


def test_counts_given_by_the_server_are_used_without_a_tokenizer(tmp_path):
    with TrafficLogger(tmp_path / "t.jsonl") as logger:
        rec = logger.log(
            {
                "adapter": "a@2",
                "inputs": ["hi there"],
                "prediction": {"label": "ham", "score": 0.7},
                "num_tokens": 3,
                "latency_s": 0.02,
            }
        )
    assert rec["input_tokens"] == 3 and rec["input_chars"] == len("hi there")
    assert rec["label"] == "ham" and rec["confidence"] == pytest.approx(0.7)
    assert rec["latency_ms"] == pytest.approx(20.0)


def test_keyed_hash_differs_and_dedupes(tmp_path):
    with TrafficLogger(tmp_path / "a.jsonl", hash_key="secret") as keyed, TrafficLogger(tmp_path / "b.jsonl") as plain:
        a1, a2 = keyed.log(_request(text="same")), keyed.log(_request(text="same"))
        b = plain.log(_request(text="same"))
    assert a1["text_hash"] == a2["text_hash"] != b["text_hash"]


def test_sampling_rate_and_seed(tmp_path):
    def kept(seed, rate, path):
        with TrafficLogger(path, sample_rate=rate, seed=seed) as logger:
            return [i for i in range(2000) if logger.log(_request(i)) is not None]

    first = kept(1, 0.25, tmp_path / "1.jsonl")
    assert first == kept(1, 0.25, tmp_path / "2.jsonl")  # reproducible
    assert first != kept(2, 0.25, tmp_path / "3.jsonl")
    assert 400 < len(first) < 600  # 500 expected, sd ~19
    assert len(read_window(tmp_path / "1.jsonl")) == len(first)
    assert kept(1, 0.0, tmp_path / "4.jsonl") == []


@pytest.mark.parametrize("name", ["traffic.jsonl", "traffic.db"])
def test_thread_safe_writes(tmp_path, name):
    path = tmp_path / name
    logger = TrafficLogger(path)
    assert logger.backend == ("sqlite" if name.endswith(".db") else "jsonl")

    def work(t):
        for i in range(150):
            logger.log(_request(i, adapter=f"clf@{t % 2 + 1}", request_id=f"{t}-{i}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    logger.close()
    rows = read_window(path)
    assert len(rows) == 900 == logger.kept
    assert len({r["request_id"] for r in rows}) == 900  # no torn or interleaved records
    assert [r["timestamp"] for r in rows] == sorted(r["timestamp"] for r in rows)
    assert len(read_window(path, adapter="clf@1")) == 450
    assert len(read_window(path, adapter="clf")) == 900


@pytest.mark.parametrize("name", ["t.jsonl", "t.sqlite"])
def test_window_filters(tmp_path, name):
    path = tmp_path / name
    now = time.time()
    with TrafficLogger(path) as logger:
        for i in range(10):
            logger.log(_request(i, adapter="clf@1", timestamp=now - 3600 * (10 - i)))  # 10h ago .. 1h ago
        logger.log(_request(99, adapter="clf_x@1", timestamp=now - 60))  # another name sharing a prefix
        logger.log(_request(98, adapter="other", timestamp=now - 30))
    assert len(read_window(path)) == 12
    assert len(read_window(path, adapter="clf")) == 10
    assert len(read_window(path, adapter="clf_x")) == 1
    recent = read_window(path, adapter="clf", since="3h")  # relative durations
    assert len(recent) == 2
    assert len(read_window(path, adapter="clf", since=now - 5.5 * 3600, until=now - 2.5 * 3600)) == 3
    last = read_window(path, adapter="clf", limit=4)
    assert [r["timestamp"] for r in last] == sorted(r["timestamp"] for r in last)
    assert last[-1]["timestamp"] == pytest.approx(now - 3600)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 1.5 * 3600))
    assert len(read_window(path, adapter="clf", since=iso)) == 1
    assert detect_backend(path) == ("sqlite" if name.endswith("sqlite") else "jsonl")


def test_sqlite_file_is_detected_by_content(tmp_path):
    path = tmp_path / "traffic.log"
    with TrafficLogger(path, backend="sqlite") as logger:
        logger.log(_request())
    assert detect_backend(path) == "sqlite"
    assert len(read_window(path)) == 1
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM traffic").fetchone()[0] == 1


def test_torn_last_line_is_ignored_but_corruption_is_not(tmp_path):
    path = tmp_path / "t.jsonl"
    with TrafficLogger(path) as logger:
        logger.log(_request(1))
        logger.log(_request(2))
    good = path.read_text()
    path.write_text(good + '{"timestamp": 1, "adap')  # a writer killed mid-line
    assert len(read_window(path)) == 2
    path.write_text('{"broken\n' + good)
    with pytest.raises(ConfigError, match=r"t\.jsonl:1 is not valid JSON"):
        read_window(path)


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="backend 'csv'.*jsonl, sqlite"):
        TrafficLogger(tmp_path / "t", backend="csv")
    with pytest.raises(ConfigError, match="sample_rate"):
        TrafficLogger(tmp_path / "t", sample_rate=1.5)
    with pytest.raises(ConfigError, match="does not exist"):
        read_window(tmp_path / "missing.jsonl")
    (tmp_path / "t.jsonl").write_text("")
    with pytest.raises(ConfigError, match="duration"):
        read_window(tmp_path / "t.jsonl", since="yesterday")
    with pytest.raises(ConfigError, match="limit"):
        read_window(tmp_path / "t.jsonl", limit=0)
    logger = TrafficLogger(tmp_path / "c.jsonl")
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(_request())


def test_adapter_matching():
    assert adapter_matches("clf@3", "clf") and adapter_matches("clf", "clf")
    assert adapter_matches("clf@3", "clf@3") and not adapter_matches("clf@2", "clf@3")
    assert not adapter_matches("clf2@1", "clf") and not adapter_matches(None, "clf")


def test_server_shaped_record_is_counted_like_the_reference(tmp_path, tokenizer):
    """The server's hook passes ids with [CLS]/[SEP] and counts them; the logger recounts from text."""
    text = "Who wrote Hamlet ?"
    server_ids = tokenizer(text)["input_ids"]
    row = {
        "request_id": "cls-1",
        "endpoint": "classify",
        "adapter": "clf@prod",
        "status": 200,
        "latency_s": 0.01,
        "input_chars": len(text),
        "input_tokens": len(server_ids),
        "label": "HUM",
        "confidence": 0.8,
        "text": text,
        "input_ids": server_ids,
    }
    with TrafficLogger(tmp_path / "t.jsonl", tokenizer=tokenizer) as logger:
        rec = logger.log(row)
        no_text = logger.log({k: v for k, v in row.items() if k != "text"})
    plain = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert rec["input_tokens"] == plain == len(server_ids) - 2
    assert no_text["input_tokens"] == plain  # special ids stripped when only ids are given
    assert rec["status"] == 200 and rec["endpoint"] == "classify" and "text" not in rec
