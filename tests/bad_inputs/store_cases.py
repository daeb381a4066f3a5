"""What the store and archive runners share: a small store to damage, its byte-exact snapshot, the store
CLI run in process or as a real process, and the checks that the store still works after a case."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from adapters.store.store import AdapterStore
from tests.bad_inputs.cli_cases import REPO, Outcome


def build_store(root: Path, make_adapter_folder) -> AdapterStore:
    """A store holding good@1, good@2 (latest) and bad@1 (prod), bad@2 (latest): cases damage `bad`
    (or the root) and every case checks that `good` still lists, resolves, verifies and publishes."""
    store = AdapterStore(root)
    store.publish(make_adapter_folder(metrics={"accuracy": 0.5}), "good")
    store.publish(make_adapter_folder(metrics={"accuracy": 0.75}), "good")
    store.publish(make_adapter_folder(), "bad", tags=("latest", "prod"))
    store.publish(make_adapter_folder(), "bad")
    return store


def copy_store(template: Path, dest: Path) -> AdapterStore:
    """A copy of a built store (links and read-only modes kept): one store built per module, one copy per case."""
    shutil.copytree(template, dest, symlinks=True)
    return AdapterStore(dest)


def snapshot(root: Path) -> dict[str, tuple]:
    """{relative path: (kind, mode, sha256 of the bytes or the link target)} of everything under root, so a
    case can prove that it left the store byte-identical."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(root))] = ("file", stat.S_IMODE(st.st_mode), digest)
            else:
                out[str(path.relative_to(root))] = ("dir" if stat.S_ISDIR(st.st_mode) else "other",)
    return out


def run_store_cli(argv: list[str], capsys) -> Outcome:
    """adapters.cli.store.main(argv) in this process, as `adapterkit store` runs it."""
    from adapters.cli.main import main

    capsys.readouterr()
    status = main(["store", *argv])
    out = capsys.readouterr()
    return Outcome(status, out.out, out.err)


def run_store_subprocess(argv: list[str], cwd: Path) -> Outcome:
    """`adapterkit store argv` (python -m adapters.cli.main store) as a real process: the exit status and
    output a shell sees."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ADAPTERKIT_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "adapters.cli.main", "store", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def assert_still_works(store: AdapterStore, capsys, make_adapter_folder, damaged: str | None = None) -> None:
    """After a case: `store list` exits 0, lists good@1 and good@2 (and, when damaged is a regex, reports a
    damaged entry matching it); good resolves with its checksums verified; and a new publish of good works."""
    outcome = run_store_cli(["--store", str(store.root), "list"], capsys)
    assert outcome.status == 0 and "Traceback" not in outcome.stdout + outcome.stderr, outcome
    rows = [line.split()[:3] for line in outcome.stdout.splitlines() if line.startswith("good ")]
    assert rows[:2] == [["good", "1", "-"], ["good", "2", "latest"]], outcome.stdout
    if damaged is not None:
        damage = [line for line in outcome.stdout.splitlines() if line.startswith("damaged ")]
        assert any(re.search(damaged, line) for line in damage), (damaged, outcome.stdout)
    folder, manifest = store.resolve("good", verify=True)
    assert manifest["version"] == 2 and folder == store.root / "good" / "2"
    assert store.verify("good@1") == {"good@1": []}
    assert store.publish(make_adapter_folder(), "good").version == 3
