"""The bad-data corpus (data/cases.yaml): every case ends a real `scripts/train.py` run (not --check: data
is read only by a run) with exit status 2 and one `error:` line naming the file, and the line or row
where one is to blame, without a traceback and before the run folder exists; the good file still
trains after them all."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.bad_inputs.cli_cases import assert_refused, fill, load_cases, run_in_process, run_subprocess, snapshot

KIND = Path(__file__).parent / "data"
CASES = load_cases(KIND)


def build_folder(tmp_path: Path) -> str:
    """A folder named rows.csv (git cannot commit an empty folder)."""
    folder = tmp_path / "rows.csv"
    folder.mkdir()
    return str(folder)


BUILDERS = {"folder": build_folder}


def _data_name(case: dict, tmp_path: Path) -> str:
    if "file" in case:
        target = tmp_path / case["file"]
        shutil.copyfile(KIND / case["file"], target)
        return str(target)
    if "build" in case:
        return BUILDERS[case["build"]](tmp_path)
    return fill(case["data"].encode(), {"tmp": str(tmp_path)}).decode()


def _config(tmp_path: Path, model_dir: Path, data: str) -> Path:
    values = {"model": str(model_dir), "data": data, "run_dir": str(tmp_path / "run"), "store": str(tmp_path / "store")}
    path = tmp_path / "config.yaml"
    path.write_bytes(fill((KIND / "good.yaml").read_bytes(), values))
    return path


def test_the_corpus_covers_the_issue():
    ids = {case["id"] for case in CASES}
    assert {"empty-csv", "non-utf8-csv", "broken-line-jsonl", "missing-label-column", "object-text"} <= ids
    assert {"empty-after-filtering", "folder-instead-of-file", "missing-file"} <= ids


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_data_is_refused_before_the_run_folder_exists(case, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERKIT_DEBUG", raising=False)
    config = _config(tmp_path, tiny_llama_dir, _data_name(case, tmp_path))
    argv = ["--config", str(config)]
    for item in case.get("set", []):
        argv += ["--set", item]
    before = snapshot(tmp_path)

    line = assert_refused(run_in_process(argv, capsys), case["expect"], case["id"])
    assert len(line) < 1000, line
    assert not (tmp_path / "run").exists(), f"{case['id']} left a run folder"
    assert snapshot(tmp_path) == before, f"{case['id']} wrote {snapshot(tmp_path) - before}"
    if case.get("subprocess"):
        assert_refused(run_subprocess(argv, cwd=tmp_path), case["expect"], case["id"])
        assert snapshot(tmp_path) == before


def test_the_good_file_trains_after_the_corpus(tiny_llama_dir, tmp_path, monkeypatch, capsys, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "good.csv"
    shutil.copyfile(KIND / "good.csv", data)
    outcome = run_in_process(["--config", str(_config(tmp_path, tiny_llama_dir, str(data)))], capsys)
    assert outcome.status == 0, outcome.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "run_info.json").is_file()
