"""A privacy-aware sample of serving traffic, for drift monitoring.

The server calls ``TrafficLogger.log(record)`` (its ``on_request`` hook) once per request.
A sampled request is reduced to what drift checks need: which adapter answered, when,
input length in characters and tokens, unknown / out-of-vocabulary token counts, the
predicted label, its confidence and the latency. Raw text (and token ids, which decode
back to text) is stored only with ``log_text=True``; otherwise a keyed hash of the text
stands in for it so duplicates can still be recognised.

Two backends: JSON lines (one file, append-only, easy to ship) and SQLite (indexed by
adapter and time, safe for several writer processes). ``read_window`` reads either.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from adapters.errors import ConfigError

RECORD_FORMAT = "adapterkit.traffic/1"
BACKENDS = ("jsonl", "sqlite")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")

# Keys a caller (the server's on_request hook) may use for each field, first match wins.
_TEXT_KEYS = ("text", "input", "inputs", "prompt")
_LABEL_KEYS = ("label", "predicted_label", "prediction")
_CONFIDENCE_KEYS = ("confidence", "score", "probability")


def token_counts(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens: the one way lengths are counted on both
    sides of a drift comparison (training reference and traffic)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_hash(text: str, key: bytes | None = None) -> str:
    """A 128-bit BLAKE2b digest of the text, keyed when `key` is given.

    Unkeyed, a short text can be recovered by hashing guesses; pass a secret key
    (``ADAPTERKIT_TRAFFIC_KEY``) where that matters.
    """
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16, key=key or b"").hexdigest()


def _first(record: Mapping[str, Any], keys: Iterable[str]):
    for key in keys:
        if record.get(key) is not None:
            return record[key]
    return None


def _as_label(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):  # e.g. {"label": "LOC", "score": 0.9}
        value = _first(value, _LABEL_KEYS)
    return None if value is None else str(value)


def _now() -> float:
    return time.time()


class TrafficLogger:
    """Append a sampled, reduced copy of each request to a JSONL file or an SQLite database.

    ``log`` is thread-safe and never raises on a malformed record field it can do without
    (a logging failure must not fail the request); it raises only for a closed logger.

    Args:
        path: the log file. Its parent folder is created.
        backend: "jsonl" or "sqlite"; default from the suffix (.db/.sqlite/.sqlite3 -> sqlite).
        sample_rate: fraction of requests kept, in [0, 1].
        log_text: also store the raw text and its token ids (off by default: privacy).
        seed: seed of the sampling decisions, for reproducible samples.
        tokenizer: the base model's tokenizer. With it, token statistics are counted from the
            text exactly as the training reference counts them (no special tokens); without
            it, counts given by the caller are stored as they come. Give it.
        vocabulary: token ids seen in training (``Reference.vocabulary``); with it each record
            gets ``oov_tokens`` at log time, so OOV drift works without storing text.
        embed_fn: texts -> (n, d) array; with it each kept record stores the input's embedding,
            so embedding drift works without storing text. Costs one forward pass per kept request.
        hash_key: secret key for the text hash (default: env ADAPTERKIT_TRAFFIC_KEY, else unkeyed).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        backend: Literal["jsonl", "sqlite"] | None = None,
        sample_rate: float = 1.0,
        log_text: bool = False,
        seed: int | None = 0,
        tokenizer=None,
        vocabulary: Iterable[int] | None = None,
        embed_fn: Callable[[list[str]], Any] | None = None,
        hash_key: bytes | str | None = None,
    ):
        self.path = Path(path)
        self.backend = backend or detect_backend(self.path)
        if self.backend not in BACKENDS:
            raise ConfigError(f"traffic log backend {self.backend!r} is unknown; valid choices: {', '.join(BACKENDS)}")
        if not isinstance(sample_rate, (int, float)) or not 0.0 <= float(sample_rate) <= 1.0:
            raise ConfigError(f"traffic log sample_rate must be a number in [0, 1], got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        self.log_text = bool(log_text)
        self.tokenizer = tokenizer
        self.vocabulary = frozenset(int(i) for i in vocabulary) if vocabulary is not None else None
        self.embed_fn = embed_fn
        key = hash_key if hash_key is not None else os.environ.get("ADAPTERKIT_TRAFFIC_KEY")
        self._hash_key = key.encode() if isinstance(key, str) else key
        if self._hash_key is not None and len(self._hash_key) > 64:
            raise ConfigError("traffic log hash_key must be at most 64 bytes (BLAKE2b key size)")
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._closed = False
        self.seen = 0  # requests offered
        self.kept = 0  # requests written
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.backend == "jsonl":
            # Line-buffered append: each record is one write(), whole lines even with several writers.
            self._fh = open(self.path, "a", encoding="utf-8", buffering=1)
            self._db = None
        else:
            self._fh = None
            self._db = _open_sqlite(self.path)

    # The server's hook: ServerSettings(on_request=logger, traffic_include_text=True) hands the
    # text to the logger in-process; what is stored is decided here (log_text).
    def __call__(self, record: Mapping[str, Any]) -> dict | None:
        return self.log(record)

    def log(self, record: Mapping[str, Any]) -> dict | None:
        """Sample, reduce and write one request. Returns the stored record, or None if not kept."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"traffic logger for {self.path} is closed")
            self.seen += 1
            if self.sample_rate < 1.0 and self._rng.random() >= self.sample_rate:
                return None
        reduced = self.reduce(record)  # tokenizing / embedding outside the lock
        line = json.dumps(reduced, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            if self._closed:
                raise RuntimeError(f"traffic logger for {self.path} is closed")
            if self._fh is not None:
                self._fh.write(line + "\n")
            else:
                self._db.execute(
                    "INSERT INTO traffic (timestamp, adapter, record) VALUES (?, ?, ?)",
                    (reduced["timestamp"], reduced.get("adapter"), line),
                )
                self._db.commit()
            self.kept += 1
        return reduced

    def reduce(self, record: Mapping[str, Any]) -> dict:
        """The stored form of a request (see the module docstring)."""
        text = _first(record, _TEXT_KEYS)
        if isinstance(text, (list, tuple)):  # a batch of one
            text = text[0] if len(text) == 1 else " ".join(map(str, text))
        text = None if text is None else str(text)
        ts = _parse_timestamp(record.get("timestamp")) if record.get("timestamp") is not None else _now()
        out: dict[str, Any] = {
            "format": RECORD_FORMAT,
            "timestamp": ts,
            "time": datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds"),
            "adapter": None if record.get("adapter") is None else str(record.get("adapter")),
        }
        for key in ("request_id", "endpoint", "base_model", "task"):
            if record.get(key) is not None:
                out[key] = str(record[key])
        if record.get("status") is not None:
            out["status"] = _int_or_none(record["status"])

        # Token statistics must be counted the way the training reference counted them (no
        # special tokens, no truncation): the logger's own tokenizer on the raw text wins over
        # ids or counts from the caller (a server counts [CLS]/[SEP] and truncates).
        ids = None
        if text is not None and self.tokenizer is not None:
            ids = token_counts(self.tokenizer, text)
        elif record.get("input_ids") is not None:
            ids = [int(i) for i in record["input_ids"]]
            if self.tokenizer is not None:
                special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
                ids = [i for i in ids if i not in special]
        out["input_chars"] = len(text) if text is not None else _int_or_none(record.get("input_chars"))
        logged_tokens = _first(record, ("input_tokens", "num_tokens"))
        out["input_tokens"] = len(ids) if ids is not None else _int_or_none(logged_tokens)
        if ids is not None and ids:
            out["unique_token_ratio"] = round(len(set(ids)) / len(ids), 4)
            out["max_token_id"] = max(ids)
        unk_id = getattr(self.tokenizer, "unk_token_id", None) if self.tokenizer is not None else None
        if ids is not None and unk_id is not None:
            out["unk_tokens"] = sum(1 for i in ids if i == unk_id)
        elif record.get("unk_tokens") is not None:
            out["unk_tokens"] = _int_or_none(record["unk_tokens"])
        if ids is not None and self.vocabulary is not None:
            out["oov_tokens"] = sum(1 for i in ids if i not in self.vocabulary)
        elif record.get("oov_tokens") is not None:
            out["oov_tokens"] = _int_or_none(record["oov_tokens"])

        label = _as_label(_first(record, _LABEL_KEYS))
        if label is not None:
            out["label"] = label
        confidence = _first(record, _CONFIDENCE_KEYS)
        if confidence is None and isinstance(_first(record, _LABEL_KEYS), Mapping):
            confidence = _first(_first(record, _LABEL_KEYS), _CONFIDENCE_KEYS)
        out["confidence"] = _float_or_none(confidence)
        latency = record.get("latency_ms")
        if latency is None and record.get("latency_s") is not None:
            latency = _float_or_none(record["latency_s"])
            latency = None if latency is None else latency * 1000.0
        out["latency_ms"] = _float_or_none(latency)

        if text is not None:
            out["text_hash"] = text_hash(text, self._hash_key)
        if self.log_text:
            if text is not None:
                out["text"] = text
            if ids is not None:
                out["token_ids"] = ids
        embedding = record.get("embedding")
        if embedding is None and self.embed_fn is not None and text is not None:
            embedding = self.embed_fn([text])[0]
        if embedding is not None:
            out["embedding"] = [round(float(x), 6) for x in embedding]
        return out

    def close(self) -> None:
        """Flush, fsync and close the log (idempotent); later ``log`` calls raise RuntimeError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._fh is not None:
                self._fh.flush()
                try:
                    os.fsync(self._fh.fileno())
                except OSError:  # not a regular file (a pipe, /dev/null): nothing to make durable
                    pass
                self._fh.close()
            if self._db is not None:
                self._db.close()

    def __enter__(self) -> TrafficLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _int_or_none(value) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value) -> float | None:
    try:
        out = None if value is None else float(value)
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def _open_sqlite(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")  # readers (the monitor) never block the server
    # No fsync per request: WAL stays consistent on a crash, at worst losing the last records.
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS traffic ("
        "id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp REAL NOT NULL, adapter TEXT, record TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS traffic_adapter_time ON traffic (adapter, timestamp)")
    db.execute("CREATE INDEX IF NOT EXISTS traffic_time ON traffic (timestamp)")
    db.commit()
    return db


def detect_backend(path: str | os.PathLike) -> str:
    """sqlite for an SQLite file or a .db/.sqlite/.sqlite3 name, jsonl otherwise."""
    path = Path(path)
    if path.is_file() and path.stat().st_size >= len(_SQLITE_MAGIC):
        with open(path, "rb") as fh:
            if fh.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC:
                return "sqlite"
        return "jsonl"
    return "sqlite" if path.suffix.lower() in _SQLITE_SUFFIXES else "jsonl"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _parse_timestamp(value, now: float | None = None) -> float:
    """Epoch seconds from a number, a datetime, an ISO-8601 string, or a duration ago ('24h', '7d')."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, str):
        text = value.strip()
        match = _DURATION.match(text)
        if match:
            return (now if now is not None else _now()) - float(match.group(1)) * _SECONDS[match.group(2)]
        try:
            return float(text)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"time {value!r} is not understood; use epoch seconds, ISO-8601 (2025-01-31T12:00:00Z) "
                "or a duration ago such as 30m, 24h, 7d"
            ) from None
        return _parse_timestamp(parsed)
    raise ConfigError(f"time {value!r} is not understood; use epoch seconds, ISO-8601 or a duration like 24h")


def adapter_matches(stored: str | None, wanted: str) -> bool:
    """'name' matches every version of name ('name', 'name@3'); 'name@3' matches only itself."""
    if stored is None:
        return False
    if stored == wanted:
        return True
    return "@" not in wanted and stored.split("@", 1)[0] == wanted


def read_window(
    path: str | os.PathLike,
    adapter: str | None = None,
    since=None,
    until=None,
    limit: int | None = None,
) -> list[dict]:
    """Records of a traffic log, oldest first: those of `adapter` (see adapter_matches) with
    since <= timestamp < until, the most recent `limit` of them when limit is given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"traffic log {path} does not exist")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    now = _now()
    lo = _parse_timestamp(since, now) if since is not None else -math.inf
    hi = _parse_timestamp(until, now) if until is not None else math.inf

    if detect_backend(path) == "sqlite":
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            where, args = ["1"], []
            if since is not None:
                where.append("timestamp >= ?")
                args.append(lo)
            if until is not None:
                where.append("timestamp < ?")
                args.append(hi)
            if adapter is not None:
                if "@" in adapter:
                    where.append("adapter = ?")
                    args.append(adapter)
                else:
                    where.append("(adapter = ? OR adapter LIKE ? ESCAPE '\\')")
                    args += [adapter, adapter.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "@%"]
            sql = f"SELECT record FROM traffic WHERE {' AND '.join(where)} ORDER BY timestamp DESC, id DESC"
            if limit is not None:
                sql += f" LIMIT {int(limit)}"
            rows = [json.loads(r[0]) for r in db.execute(sql, args)]
        finally:
            db.close()
        rows.reverse()
        return rows

    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # A writer killed mid-line leaves a torn last line; anything else is corruption.
            if lineno == len(lines):
                break
            raise ConfigError(f"traffic log {path}:{lineno} is not valid JSON") from None
        ts = rec.get("timestamp")
        if not isinstance(ts, (int, float)) or not lo <= ts < hi:
            continue
        if adapter is not None and not adapter_matches(rec.get("adapter"), adapter):
            continue
        rows.append(rec)
    rows.sort(key=lambda r: r["timestamp"])  # stable: equal times keep file order
    return rows[-limit:] if limit is not None else rows
