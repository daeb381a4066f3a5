"""What the config and data runners share: read a kind's cases.yaml, build a case's config file, run
`scripts/train.py` (in process, or as a real subprocess) and check the convention of
tests/bad_inputs/README.md: exit status 2, one `error:` line matching the case's regex, no traceback,
nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def load_cases(kind_dir: Path) -> list[dict]:
    """The cases of one kind folder, in file order; each has an id, an about line and an expect."""
    cases = yaml.safe_load((kind_dir / "cases.yaml").read_text(encoding="utf-8"))
    ids = [case["id"] for case in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    for case in cases:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", case["id"]), case["id"]
        assert case.get("about") and case.get("expect"), case["id"]
    return cases


def fill(template: bytes, values: dict[str, str]) -> bytes:
    """`template` with each {name} replaced by values[name] (bytes in, bytes out: a case file may hold
    bytes that are not UTF-8)."""
    for name, value in values.items():
        template = template.replace(f"{{{name}}}".encode(), value.encode())
    return template


def snapshot(root: Path) -> set[str]:
    """Every path under root, relative (what a case must not add to)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@dataclass
class Outcome:
    """What one run of the train command gave: exit status and its stderr/stdout text."""

    status: int
    stdout: str
    stderr: str


def run_in_process(argv: list[str], capsys) -> Outcome:
    """adapters.cli.train.main(argv) in this process (the guarded entry point scripts/train.py calls)."""
    from adapters.cli.train import main

    capsys.readouterr()
    status = main(argv)
    out = capsys.readouterr()
    return Outcome(status, out.out, out.err)


def run_subprocess(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Outcome:
    """`python scripts/train.py argv` as a real process: the exit status a shell sees."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("ADAPTERKIT_DEBUG", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *argv],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def assert_refused(outcome: Outcome, expect: dict, case_id: str) -> str:
    """Exit status expect['exit'], exactly one `error: ...` line on stderr matching expect['message'],
    and no traceback anywhere. Returns the error line."""
    assert outcome.status == expect["exit"], (case_id, outcome.status, outcome.stderr[-2000:])
    both = outcome.stdout + outcome.stderr
    assert "Traceback" not in both, (case_id, both[-3000:])
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, (case_id, outcome.stderr[-2000:])
    assert re.search(expect["message"], errors[0]), (case_id, expect["message"], errors[0])
    return errors[0]
