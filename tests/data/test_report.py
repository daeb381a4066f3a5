"""The data report: planted exact and near duplicates, label problems, bad inputs; dedupe; strict mode.
On real data: the built-in TREC file's releases overlap, and the report finds it."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from datasets import Dataset, DatasetDict

from adapters.data.report import (
    TextSimilarity,
    build_data_report,
    dedupe_across_splits,
    enforce,
    label_shift,
    near_duplicate_matches,
    normalize_text,
)
from adapters.errors import ConfigError

TRAIN = [
    ("What is the capital of France ?", "LOC"),
    ("Who wrote the novel Moby Dick ?", "HUM"),
    ("How many legs does a spider have ?", "NUM"),
    ("What does NASA stand for ?", "ABBR"),
    ("Why is the sky blue during the day ?", "DESC"),
    ("What is the tallest mountain in Africa ?", "LOC"),
    ("Who painted the ceiling of the Sistine Chapel ?", "HUM"),
    ("How far is the Moon from the Earth ?", "NUM"),
    ("What kind of animal is a Komodo dragon ?", "ENTY"),
    ("When did the Berlin Wall fall ?", "NUM"),
]
VALIDATION = [
    ("what is the capital   of FRANCE ?", "LOC"),  # exact after normalization
    ("Who wrote the novel Moby-Dick?", "HUM"),  # near: punctuation
    ("Who painted the ceiling of the Sistine Chapel in Rome ?", "HUM"),  # near: two words more
    ("What is the capital of Spain ?", "LOC"),  # same template, different question: not a duplicate
    ("Who invented the telephone ?", "HUM"),
    ("What color is a giraffe's tongue ?", "ENTY"),
]
TEST = [
    ("What does NASA stand for ?", "ABBR"),  # exact
    ("Name a famous Norwegian composer .", "HUM"),
    ("Where is the Taj Mahal ?", "LOC"),
    ("What is the boiling point of water in Kelvin ?", "NUM"),
    ("   ", "NUM"),  # empty
    ("Which gas do plants absorb ?", "PLANT"),  # unseen label
]


def make_splits(train=TRAIN, validation=VALIDATION, test=TEST) -> DatasetDict:
    def ds(rows):
        return Dataset.from_dict({"text": [t for t, _ in rows], "label": [label for _, label in rows]})

    return DatasetDict(train=ds(train), validation=ds(validation), test=ds(test))


def test_planted_exact_and_near_duplicates_are_found():
    report = build_data_report(make_splits(), "text", "label")
    assert report.exact_duplicates["train/validation"]["count"] == 1
    assert report.exact_duplicates["train/validation"]["examples"] == ["what is the capital   of FRANCE ?"]
    assert report.exact_duplicates["train/test"]["count"] == 1
    near = report.near_duplicates["train/validation"]
    assert near["count"] == 2
    assert {e["text"] for e in near["examples"]} == {
        "Who wrote the novel Moby-Dick?",
        "Who painted the ceiling of the Sistine Chapel in Rome ?",
    }
    assert {e["match"] for e in near["examples"]} == {
        "Who wrote the novel Moby Dick ?",
        "Who painted the ceiling of the Sistine Chapel ?",
    }
    assert all(0.9 <= e["similarity"] <= 1.0 for e in near["examples"])
    assert report.near_duplicates["train/test"]["count"] == 0
    assert report.has_leakage
    problems = report.problems()
    assert any(
        "1 validation row(s) have an exact duplicate in train and 2 more a near duplicate" in p for p in problems
    )


def test_same_template_different_question_is_not_a_near_duplicate():
    matches = near_duplicate_matches(["what is the capital of spain ?"], ["what is the capital of france ?"], 0.9)
    assert matches == []
    # ...but it is similar: a threshold low enough flags it, proving the search looks at it.
    assert (
        len(near_duplicate_matches(["what is the capital of spain ?"], ["what is the capital of france ?"], 0.5)) == 1
    )


def test_two_stage_search_agrees_with_brute_force():
    import numpy as np

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    corpus = [" ".join(rng.choice(words, 8)) for _ in range(400)]
    corpus += ["@user @user @user :)"] * 60  # boilerplate: no rare n-grams at all
    queries = [c.replace("w1", "w2", 1) + " x" for c in corpus[:40]] + [
        " ".join(rng.choice(words, 8)) for _ in range(39)
    ]
    queries += ["rt @user @user @user @user thanks"]
    sim = TextSimilarity(corpus + queries)
    q, c = list(range(460, 540)), list(range(460))
    assert np.diff(sim.rare[c].indptr)[-1] < sim.MIN_RARE_NGRAMS
    fast = {i: round(s, 4) for i, j, s in sim.best_matches(q, c, 0.7)}
    dense = (sim.full[q] @ sim.full[c].T).toarray()
    brute = {i: round(float(dense[i].max()), 4) for i in range(80) if dense[i].max() >= 0.7 - 1e-6}
    assert fast == brute and len(brute) >= 30
    assert 79 in brute  # found only by comparing the boilerplate rows exactly


def test_label_distribution_shift_and_unseen_labels():
    report = build_data_report(make_splits(), "text", "label")
    assert report.label_distribution["train"] == {"ABBR": 1, "DESC": 1, "ENTY": 1, "HUM": 2, "LOC": 2, "NUM": 3}
    assert report.unseen_labels == {"validation": [], "test": ["PLANT"]}
    assert any("PLANT" in p for p in report.problems())
    shift = report.label_shift["train->test"]
    assert shift["tvd"] == pytest.approx(
        label_shift(report.label_distribution["train"], report.label_distribution["test"])["tvd"]
    )
    assert label_shift({"a": 50, "b": 50}, {"a": 50, "b": 50}) == {"tvd": 0.0, "psi": 0.0}
    skewed = label_shift({"a": 90, "b": 10}, {"a": 10, "b": 90})
    assert skewed["tvd"] == pytest.approx(0.8) and skewed["psi"] > 1.0


def test_label_shift_warning():
    train = [(f"question number {i}", "a" if i % 2 else "b") for i in range(40)]
    val = [(f"another thing {i}", "a") for i in range(10)]
    report = build_data_report(make_splits(train, val, []), "text", "label")
    assert any("label shift train->validation" in w for w in report.warnings)
    assert report.sizes["test"] == 0 and "train->test" not in report.label_shift


def test_empty_and_overlong_inputs(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    report = build_data_report(make_splits(), "text", "label", tokenizer=tok, max_length=12)
    assert report.empty_inputs == {"train": 0, "validation": 0, "test": 1}
    expected = sum(len(ids) > 12 for ids in tok([t for t, _ in TRAIN])["input_ids"])
    assert 0 < expected < len(TRAIN)
    assert report.overlong_inputs["train"]["count"] == expected
    assert any("longer than data.max_length=12" in w for w in report.warnings)


def test_free_text_targets_are_not_checked_as_labels():
    rows = [(f"q{i}", f"a long free text answer number {i}") for i in range(20)]
    report = build_data_report(make_splits(rows[:14], rows[14:17], rows[17:]), "text", "label")
    assert report.unseen_labels == {} and report.label_distribution == {}
    forced = build_data_report(make_splits(rows[:14], rows[14:17], rows[17:]), "text", "label", categorical=True)
    assert len(forced.unseen_labels["validation"]) == 3


def test_enforce_strict_raises_and_lenient_logs(caplog):
    report = build_data_report(make_splits(), "text", "label")
    with pytest.raises(ConfigError) as err:
        enforce(report, strict=True)
    assert "data.strict" in str(err.value) and "leakage" in str(err.value) and "PLANT" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="adapters.data.report"):
        problems = enforce(report, strict=False)
    assert len(problems) == 3 and "leakage" in caplog.text and "empty input" in caplog.text


def test_clean_splits_pass_strict():
    clean = make_splits(TRAIN, [VALIDATION[3], VALIDATION[4]], [TEST[2], TEST[3]])
    report = build_data_report(clean, "text", "label")
    assert not report.has_leakage and report.problems() == []
    assert enforce(report, strict=True) == []


def test_dedupe_removes_exact_and_optionally_near_duplicates():
    splits = make_splits()
    exact_only = dedupe_across_splits(splits, "text")
    assert len(exact_only["validation"]) == len(VALIDATION) - 1
    assert len(exact_only["test"]) == len(TEST) - 1
    assert exact_only["train"]["text"] == splits["train"]["text"]
    both = dedupe_across_splits(splits, "text", near_duplicates=True)
    assert len(both["validation"]) == len(VALIDATION) - 3
    report = build_data_report(both, "text", "label")
    assert not report.has_leakage
    assert "What is the capital of Spain ?" in both["validation"]["text"]


def test_dedupe_also_separates_test_from_validation():
    splits = make_splits(validation=VALIDATION + [("Where is the Taj Mahal ?", "LOC")])
    out = dedupe_across_splits(splits, "text")
    assert "Where is the Taj Mahal ?" not in out["test"]["text"]
    assert "Where is the Taj Mahal ?" in out["validation"]["text"]


def test_report_serializes():
    report = build_data_report(make_splits(), "text", "label")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["has_leakage"] is True and data["exact_duplicates"]["train/test"]["count"] == 1
    md = report.to_markdown()
    assert "| train/validation | 1 | 2 |" in md and "## Problems" in md and "PLANT" in md


def test_missing_text_column_is_named():
    with pytest.raises(ConfigError, match="data.text_field 'question'.*columns: text, label"):
        build_data_report(make_splits(), "question", "label")


# ---------------------------------------------------------------- real data
@pytest.mark.real_model
def test_trec_file_releases_overlap_and_the_report_finds_it():
    """question_labels.txt = UIUC train_1000 + train_2000 + train_3000 + train_4000 + train_5500,
    each release a prefix of the next: the 'splits' are copies of one another."""
    from adapters.data.builtins import BUILTIN_DATASETS

    rows = BUILTIN_DATASETS["trec"].load()
    assert len(rows) == 15452
    releases = Counter(rows["original_split"][:])
    assert releases == {
        "train_1000": 1000,
        "train_2000": 2000,
        "train_3000": 3000,
        "train_4000": 4000,
        "train_5500": 5452,
    }
    assert len(set(rows["text"][:])) == 5381
    release_column = rows["original_split"][:]
    by_release = {name: rows.select([i for i, r in enumerate(release_column) if r == name]) for name in releases}
    assert by_release["train_5500"]["text"][:1000] == by_release["train_1000"]["text"][:]  # a prefix

    # Train on the largest release, validate on a smaller one: every validation row leaks.
    splits = DatasetDict(
        train=by_release["train_5500"], validation=by_release["train_1000"], test=by_release["train_2000"]
    )
    report = build_data_report(splits, "text", "label")
    assert report.exact_duplicates["train/validation"]["count"] == 1000
    assert report.exact_duplicates["train/test"]["count"] == 2000
    # train_5500 repeats some questions itself (72 after lowercasing).
    assert (
        report.duplicates_within["train"]
        == 5452 - len({normalize_text(t) for t in by_release["train_5500"]["text"][:]})
        > 0
    )
    with pytest.raises(ConfigError, match="leakage: 1000 validation"):
        enforce(report, strict=True)

    # A naive random split of the raw file leaks most held-out rows; dedupe removes all exact ones.
    from adapters.config import SplitConfig
    from adapters.data.splits import split_dataset

    naive = split_dataset(rows, SplitConfig(kind="random", validation=0.1, test=0.1), "label", seed=0)
    leaked = build_data_report(naive, "text", "label").exact_duplicates["train/validation"]["count"]
    assert leaked > 0.8 * len(naive["validation"])
    clean = build_data_report(dedupe_across_splits(naive, "text"), "text", "label")
    assert clean.exact_duplicates["train/validation"]["count"] == 0
    assert clean.exact_duplicates["train/test"]["count"] == 0
