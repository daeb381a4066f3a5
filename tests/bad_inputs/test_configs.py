"""The bad-config corpus (configs/cases.yaml): every case ends `scripts/train.py` with exit status 2 and
one `error:` line naming the key or file, without a traceback, before anything is written; `--check`
refuses it too unless the case says only the model or the store can tell; the good config still
validates after each case and still trains after them all."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.bad_inputs.cli_cases import (
    assert_refused,
    fill,
    load_cases,
    run_in_process,
    run_subprocess,
    snapshot,
)

KIND = Path(__file__).parent / "configs"
CASES = load_cases(KIND)
# A case's whole in-process refusal (both --check and the run) must take less than this: the
# billion-laughs document used to run for minutes.
FAST_S = 20.0


def _values(tmp_path: Path, model_dir: Path) -> dict[str, str]:
    return {
        "model": str(model_dir),
        "run_dir": str(tmp_path / "run"),
        "store": str(tmp_path / "store"),
        "tmp": str(tmp_path),
    }


def _config_file(case: dict, tmp_path: Path, values: dict[str, str]) -> Path:
    """The case's config file, written into tmp_path with its placeholders filled."""
    if "file" in case:
        source = (KIND / case["file"]).read_bytes()
        name = case["file"]
    elif "yaml" in case:
        source, name = case["yaml"].encode(), "case.yaml"
    else:
        source, name = (KIND / "good.yaml").read_bytes(), "good.yaml"
    path = tmp_path / name
    path.write_bytes(fill(source, values))
    return path


def _argv(case: dict, config: Path, values: dict[str, str]) -> list[str]:
    args = [fill(a.encode(), values).decode() for a in case.get("args", [])]
    argv = [] if "--config" in args else ["--config", str(config)]
    for item in case.get("set", []):
        argv += ["--set", fill(item.encode(), values).decode()]
    return argv + args


def test_the_corpus_is_large_enough_and_covers_the_issue():
    ids = {case["id"] for case in CASES}
    assert len(CASES) >= 45
    assert {"yaml-unclosed-list", "non-utf8-byte", "set-unparseable-value", "billion-laughs"} <= ids
    assert {"epochs-inf", "seed-negative", "rank-huge", "lr-inf", "output-name-traversal"} <= ids


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_config_is_refused_with_one_line(case, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default run folder (runs/...) would appear here
    monkeypatch.delenv("ADAPTERKIT_DEBUG", raising=False)
    for key, value in case.get("env", {}).items():
        monkeypatch.setenv(key, value)
    values = _values(tmp_path, tiny_llama_dir)
    config = _config_file(case, tmp_path, values)
    argv = _argv(case, config, values)
    before = snapshot(tmp_path)

    started = time.perf_counter()
    if case.get("check", True):
        assert_refused(run_in_process([*argv, "--check"], capsys), case["expect"], case["id"])
    line = assert_refused(run_in_process(argv, capsys), case["expect"], case["id"])
    assert time.perf_counter() - started < FAST_S, case["id"]
    assert len(line) < 1000, line
    assert snapshot(tmp_path) == before, f"{case['id']} wrote {snapshot(tmp_path) - before}"

    # The good config still validates in the same process.
    for key in case.get("env", {}):
        monkeypatch.delenv(key)
    good = tmp_path / "good-after.yaml"
    good.write_bytes(fill((KIND / "good.yaml").read_bytes(), values))
    ok = run_in_process(["--config", str(good), "--check"], capsys)
    assert ok.status == 0 and "config OK" in ok.stdout, ok.stderr

    if case.get("subprocess"):
        good.unlink()
        outcome = run_subprocess(argv, cwd=tmp_path, env=case.get("env"))
        assert_refused(outcome, case["expect"], case["id"])
        assert snapshot(tmp_path) == before


def test_the_good_config_trains_after_the_corpus(tiny_llama_dir, tmp_path, monkeypatch, capsys, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    values = _values(tmp_path, tiny_llama_dir)
    good = tmp_path / "good.yaml"
    good.write_bytes(fill((KIND / "good.yaml").read_bytes(), values))
    outcome = run_in_process(["--config", str(good)], capsys)
    assert outcome.status == 0, outcome.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
