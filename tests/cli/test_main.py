"""`adapterkit <command>`: the console command dispatches to each command's `main` (run as a subprocess)."""

from __future__ import annotations

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
