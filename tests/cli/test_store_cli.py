"""The store CLI (adapters/cli/store.py, scripts/store.py): every subcommand, text and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.cli.store import main
from adapters.store.store import AdapterStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cli(store_root, capsys):
    """Run the CLI on the test store: returns (exit status, stdout, stderr)."""

    def run(*args: str):
        status = main(["--store", str(store_root), *args])
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


@pytest.fixture()
def two_versions(store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(metrics={"accuracy": 0.5}, training={"train": {"lr": 1e-4}}), "clf")
    store.publish(make_adapter_folder(metrics={"accuracy": 0.75}, training={"train": {"lr": 3e-4}}), "clf")
    return store


def test_publish_list_show(cli, make_adapter_folder):
    status, out, _ = cli("publish", str(make_adapter_folder()), "clf")
    assert status == 0 and out.strip().startswith("published clf@1")
    status, out, _ = cli("list")
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "VERSION", "TAGS", "CREATED", "TASK", "METHOD", "BASE", "METRICS"]
    assert row.split()[:3] == ["clf", "1", "latest"] and "accuracy=0.5" in row and "tiny-base" in row
    status, out, _ = cli("list", "--json")
    assert json.loads(out)[0]["version"] == 1
    status, out, _ = cli("show", "clf")
    assert status == 0 and "clf@1" in out and "method:      lora" in out and "tags:        latest" in out
    status, out, _ = cli("--json", "show", "clf@latest")
    assert json.loads(out)["manifest"]["version"] == 1


def test_diff(cli, two_versions):
    status, out, _ = cli("diff", "clf@1", "clf@2")
    assert status == 0
    assert "metrics:" in out and "  accuracy: 0.5 -> 0.75" in out
    assert "  train.lr: 0.0001 -> 0.0003" in out
    status, out, _ = cli("diff", "clf@1", "clf@2", "--json")
    assert json.loads(out)["changes"]["metrics"] == {"accuracy": [0.5, 0.75]}


def test_tag_promote_rollback_rm(cli, two_versions):
    assert cli("promote", "clf@1")[0] == 0
    assert cli("promote", "clf@2")[0] == 0
    assert two_versions.tags("clf") == {"latest": 2, "prod": 2}
    status, out, _ = cli("rollback", "clf")
    assert status == 0 and "rolled back to version 1" in out
    assert cli("tag", "clf@2", "candidate")[0] == 0
    status, _, err = cli("rm", "clf@2")
    assert status == 2 and "error: clf@2 is tagged candidate, latest" in err
    assert cli("untag", "clf", "candidate")[0] == 0
    status, out, _ = cli("rm", "clf@2", "--force")
    assert status == 0 and "removed clf@2" in out
    assert two_versions.versions("clf") == [1]
    assert two_versions.tags("clf") == {"latest": 1, "prod": 1}


def test_verify_exit_status(cli, two_versions, store_root):
    status, out, _ = cli("verify")
    assert status == 0 and "2 ok, 0 failed" in out
    (store_root / "clf" / "2" / "adapter_config.json").chmod(0o644)
    (store_root / "clf" / "2" / "adapter_config.json").write_text("{}")
    status, out, _ = cli("verify")
    assert status == 1 and "FAILED  clf@2" in out and "adapter_config.json: checksum mismatch" in out
    status, out, _ = cli("verify", "clf@1", "--json")
    assert status == 0 and json.loads(out) == {"clf@1": []}


def test_export_import_gc(cli, two_versions, tmp_path):
    archive = tmp_path / "clf.tar.gz"
    status, out, _ = cli("export", "clf@2", str(archive))
    assert status == 0 and archive.is_file()
    other = tmp_path / "other"
    assert main(["--store", str(other), "import", str(archive), "--name", "moved", "--tag", "prod"]) == 0
    assert AdapterStore(other).tags("moved") == {"prod": 1}
    stale = two_versions.root / "clf" / ".publish-stale"
    stale.mkdir()
    status, out, _ = cli("gc", "--dry-run")
    assert status == 0 and "would remove clf/.publish-stale" in out and stale.exists()
    status, out, _ = cli("gc", "--keep", "1")
    assert status == 0 and "removed clf/.publish-stale" in out and "removed clf/1" in out
    assert two_versions.versions("clf") == [2]


def test_errors_are_one_line_with_status_2(cli):
    status, out, err = cli("show", "nope")
    assert status == 2 and out == ""
    assert err.startswith("error: no adapter named 'nope'") and len(err.strip().splitlines()) == 1
    status, out, _ = cli("--json", "tag", "x@1", "../evil")
    assert status == 2 and "invalid tag '../evil'" in json.loads(out)["error"]
    with pytest.raises(SystemExit):
        cli("frobnicate")


def test_script_wrapper_uses_the_environment_store(tmp_path, make_adapter_folder):
    store_dir = tmp_path / "env-store"
    AdapterStore(store_dir).publish(make_adapter_folder(), "viaenv")
    env = {**os.environ, "ADAPTERKIT_STORE": str(store_dir)}
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "store.py"), "list", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [(r["name"], r["version"]) for r in json.loads(done.stdout)] == [("viaenv", 1)]


def test_list_reports_damage_after_the_good_rows_and_verify_notes_old_versions(cli, two_versions, store_root):
    import json as jsonlib

    from adapters.store.manifest import DIGEST_KEY, MANIFEST, MANIFEST_DIGEST

    (store_root / "clf" / "2" / MANIFEST).chmod(0o644)
    (store_root / "clf" / "2" / MANIFEST).write_text("{")
    status, out, _ = cli("list")
    lines = out.strip().splitlines()
    assert status == 0 and lines[1].split()[:3] == ["clf", "1", "-"] and len(lines) == 3
    assert lines[2].startswith("damaged  clf@2: ") and "clf/2/manifest.json: unreadable manifest" in lines[2]
    status, out, _ = cli("--json", "list")
    assert [("error" in r) for r in jsonlib.loads(out)] == [False, True]

    old = store_root / "clf" / "1"  # as published before manifest digests existed
    manifest = jsonlib.loads((old / MANIFEST).read_text())
    del manifest[DIGEST_KEY]
    (old / MANIFEST).chmod(0o644)
    (old / MANIFEST).write_text(jsonlib.dumps(manifest))
    (old / MANIFEST_DIGEST).unlink()
    status, out, _ = cli("verify", "clf@1")
    assert status == 0 and out.startswith("ok      clf@1  (no manifest.json.sha256: published before")


def test_show_and_list_mark_a_manifest_edited_after_publish(cli, two_versions, store_root):
    """verify catches the edit by the manifest's digest; show and list must not display its fields as valid."""
    path = store_root / "clf" / "2" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"]["accuracy"] = 0.99
    os.chmod(path, 0o644)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    assert cli("verify")[0] == 1
    status, out, _ = cli("show", "clf@2")
    assert status == 0 and out.splitlines()[1].startswith("  DAMAGED:     manifest.json: digest mismatch"), out
    status, out, _ = cli("--json", "show", "clf@2")
    assert status == 0 and "digest mismatch" in json.loads(out)["damaged"][0]
    status, out, _ = cli("--json", "show", "clf@1")
    assert json.loads(out)["damaged"] == []
    status, out, _ = cli("list")
    assert status == 0 and "0.99" not in out.split("\ndamaged")[0], out
    assert "accuracy=0.5" in out and any(
        line.startswith("damaged  clf@2: ") and "digest mismatch" in line for line in out.splitlines()
    ), out


def test_a_bare_name_follows_its_latest_tag_even_when_it_dangles(cli, two_versions, store_root):
    (store_root / "clf" / "tags.json").write_text(
        '{"tags": {"latest": 99, "prod": 99}, "history": {}, "last_version": 3}'
    )
    at_latest = cli("show", "clf@latest")
    bare = cli("show", "clf")
    assert at_latest[0] == bare[0] == 2 and at_latest[2] == bare[2], (at_latest, bare)
    assert "tag clf@latest points at version 99, which was removed; versions: 1, 2" in bare[2]
    status, out, _ = cli("list")
    damaged = [line for line in out.splitlines() if line.startswith("damaged")]
    assert status == 0 and len(damaged) == 2 and all("points at version 99" in line for line in damaged), out
    (store_root / "clf" / "tags.json").unlink()  # no latest tag at all: the newest version, by design
    assert cli("--json", "show", "clf")[1] == cli("--json", "show", "clf@2")[1]


def test_rollback_of_an_unknown_tag_names_the_tags(cli, two_versions):
    two_versions.promote("clf@1", "prod")
    status, _, err = cli("rollback", "clf", "nosuchtag")
    assert status == 2 and err.strip() == "error: adapter 'clf' has no tag 'nosuchtag'; tags: latest, prod"
    status, _, err = cli("rollback", "clf", "prod")  # a tag that exists but never moved keeps its message
    assert status == 2 and "clf@prod has no earlier version to roll back to" in err
