"""The bad-input corpus as a whole: every kind has its cases, ids are unique, and it holds at least 100."""

from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent
KINDS = ("configs", "data", "store", "archives", "http")


def cases(kind: str) -> list[dict]:
    return yaml.safe_load((HERE / kind / "cases.yaml").read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_has_cases_with_unique_ids_and_an_expectation(kind):
    found = cases(kind)
    ids = [case["id"] for case in found]
    assert len(found) >= 20 and len(ids) == len(set(ids))
    assert all(case.get("expect") for case in found)


def test_the_corpus_holds_at_least_100_cases():
    assert sum(len(cases(kind)) for kind in KINDS) >= 100
