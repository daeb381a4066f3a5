"""`adapterkit <command>`: the console command dispatches to each command's `main` (run as a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.cli.main import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def adapterkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adapters.cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_help_lists_every_command():
    done = adapterkit("--help")
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert f"\n  {name} " in done.stdout


def test_methods_lists_registered_methods():
    done = adapterkit("methods")
    assert done.returncode == 0, done.stderr
    names = {line.split()[0] for line in done.stdout.splitlines() if line and not line[0].isspace()}
    assert {"lora", "dora", "bottleneck"} <= names
    assert "tasks: causal-lm, sequence-classification" in done.stdout


def test_builtins_lists_models_and_datasets():
    done = adapterkit("builtins")
    assert done.returncode == 0, done.stderr
    assert "models:" in done.stdout and "datasets:" in done.stdout
    assert "smollm2-135m-instruct" in done.stdout and "minilm-l6" in done.stdout


@pytest.mark.parametrize("argv", [["store", "--help"], ["store", "list", "--help"]])
def test_store_help_comes_from_the_store_command(argv):
    done = adapterkit(*argv)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "--store" in done.stdout


def test_unknown_command_exits_2():
    done = adapterkit("nonsense")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


# ---------------------------------------------------------------- the one error path (issue 19)
def _raising(err: BaseException):
    from adapters.cli.main import guarded

    @guarded
    def main(argv=None) -> int:
        raise err

    return main


def _caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:  # the real library error, raised by the library
        return err
    raise AssertionError("expected an error")


def _library_errors(tmp_path: Path) -> list[tuple[BaseException, str]]:
    import yaml
    from datasets import load_dataset
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int

    csv = tmp_path / "latin.csv"
    csv.write_bytes(b"text,label\ncaf\xe9,a\n")
    return [
        (_caught(lambda: yaml.safe_load("task: [causal-lm")), r"^error: not valid YAML: .*\(line \d+, column \d+\)$"),
        (_caught(lambda: b"caf\xe9".decode("utf-8")), r"^error: not UTF-8 text: byte 0xe9 at offset 3$"),
        (
            _caught(lambda: load_dataset("csv", data_files=str(csv), split="train")),
            r"^error: a data file could not be read: not UTF-8 text: byte 0xe9",
        ),
        (_caught(lambda: Point.model_validate({"x": "seven"})), r"^error: x: Input should be a valid integer"),
        (_caught(lambda: open(tmp_path / "nope.txt")), r"^error: .*nope\.txt: No such file or directory$"),
    ]


def test_bad_input_errors_become_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import re

    from adapters.errors import ConfigError

    monkeypatch.delenv("ADAPTERKIT_DEBUG", raising=False)
    cases = [(ConfigError("train.lr: first line\n  second line"), r"^error: train\.lr: first line second line$")]
    cases += _library_errors(tmp_path)
    capsys.readouterr()  # what the libraries printed while failing
    for err, pattern in cases:
        assert _raising(err)([]) == 2, err
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and re.search(pattern, lines[0]), (type(err).__name__, lines)


def test_an_unexpected_error_is_one_line_pointing_at_its_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("ADAPTERKIT_DEBUG", raising=False)
    assert _raising(TypeError("unsupported operand"))([]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected TypeError: unsupported operand (a bug;")
    log = Path(lines[0].split("its traceback is in ")[1].rstrip(")"))
    assert log.parent == tmp_path / "logs"
    assert "Traceback (most recent call last)" in log.read_text() and "raise err" in log.read_text()


def test_adapterkit_debug_shows_the_traceback(capsys, monkeypatch):
    from adapters.errors import ConfigError

    monkeypatch.setenv("ADAPTERKIT_DEBUG", "1")
    assert _raising(ConfigError("data.name: no such file"))([]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == "error: data.name: no such file"


def test_every_command_main_is_guarded():
    import importlib

    for command, (module, _) in COMMANDS.items():
        main = importlib.import_module(module).main
        assert getattr(main, "__wrapped__", None) is not None, f"{command}: main is not wrapped by guarded"


def test_the_console_command_exits_2_with_one_line_for_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [causal-lm\n")
    done = adapterkit("train", "--config", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert done.stderr.splitlines() == [
        f"error: {bad}: not valid YAML: while parsing a flow sequence: expected ',' or ']', but got '<stream end>' "
        "(line 2, column 1)"
    ]


def test_a_closed_stdout_ends_quietly_with_141(tmp_path):
    """`adapterkit ... | head -1`: the reader goes away mid-output; the command stops without an
    error line or a debug log, with 128 + SIGPIPE like a shell tool (the Python docs' recipe)."""
    code = (
        "import sys\n"
        "from adapters.cli.main import guarded\n"
        "def main(argv=None):\n"
        "    for i in range(200000):\n"
        "        print(f'line {i} ' + 'x' * 40)\n"
        "    return 0\n"
        "main.__module__ = 'adapters.cli.lines'\n"
        "sys.exit(guarded(main)())\n"
    )
    script = tmp_path / "lines.py"
    script.write_text(code)
    out = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" "{script}" | head -1; echo "status=${{PIPESTATUS[0]}}"'],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "ADAPTERKIT_CACHE": str(tmp_path / "cache")},
    )
    assert out.stdout.splitlines() == ["line 0 " + "x" * 40, "status=141"], out.stdout + out.stderr
    assert out.stderr == "", out.stderr
    assert not (tmp_path / "cache" / "logs").exists()  # not reported as a bug


def test_a_broken_pipe_in_process_is_not_a_bug(capsys):
    from adapters.cli.main import EXIT_BROKEN_PIPE

    assert _raising(BrokenPipeError(32, "Broken pipe"))([]) == EXIT_BROKEN_PIPE == 141
    assert capsys.readouterr().err == ""
