"""The versioned adapter store: versions, tags, integrity, crash safety, concurrency, hostile names, gc.

Loading and the base check: test_loading.py; export and import: test_archive.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.errors import StoreError
from adapters.store.loading import load_adapter
from adapters.store.manifest import MANIFEST, read_manifest, write_manifest
from adapters.store.refs import parse_ref
from adapters.store.store import AdapterStore

REPO = Path(__file__).resolve().parents[2]


def _subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------- versions and tags
def test_versions_are_numbered_and_never_reused(store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    refs = [store.publish(make_adapter_folder(), "clf") for _ in range(3)]
    assert [r.version for r in refs] == [1, 2, 3]
    assert store.versions("clf") == [1, 2, 3]
    for r in refs:
        assert read_manifest(r.path)["version"] == r.version
    assert store.tags("clf") == {"latest": 3}
    assert store.locate("clf").version == 3

    store.rm("clf@3", force=True)
    assert store.tags("clf") == {"latest": 2}  # latest falls back to the newest remaining version
    assert store.publish(make_adapter_folder(), "clf").version == 4  # 3 stays retired
    with pytest.raises(StoreError, match="no version 3; versions: 1, 2, 4"):
        store.locate("clf@3")


def test_publishing_the_same_run_again_returns_its_version_and_completes_its_tags(
    store_root, make_adapter_folder, monkeypatch
):
    import adapters.store.store as store_module

    store = AdapterStore(store_root)
    src = make_adapter_folder()
    first = store.publish(src, "clf", run_id="run-a")
    assert read_manifest(first.path)["run_id"] == "run-a"
    assert store.publish(src, "clf", run_id="run-a") == first  # a resumed run publishing again
    assert store.publish(src, "clf").version == 2  # without a run id, every publish is a new version
    real_place = store_module._place_version

    def killed_after_rename(staged, final):
        real_place(staged, final)
        raise KeyboardInterrupt  # the version is in place, its tags and last_version not yet written

    monkeypatch.setattr(store_module, "_place_version", killed_after_rename)
    with pytest.raises(KeyboardInterrupt):
        store.publish(make_adapter_folder(), "clf", run_id="run-b")
    monkeypatch.undo()
    assert store.tags("clf") == {"latest": 2}
    assert store.publish(src, "clf", run_id="run-b").version == 3  # its content is not even copied again
    assert store.tags("clf") == {"latest": 3} and store.versions("clf") == [1, 2, 3]
    store.publish(make_adapter_folder(), "clf")
    assert store.publish(src, "clf", run_id="run-a").version == 1
    assert store.tags("clf") == {"latest": 4}, "a newer version keeps the tags it took"


def test_versions_are_immutable(store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    src = make_adapter_folder()
    ref = store.publish(src, "clf")
    before = read_manifest(ref.path)
    store.publish(src, "clf")
    assert read_manifest(ref.path) == before
    assert store.verify("clf@1") == {"clf@1": []}


def test_tags_move_promote_and_roll_back(store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    for _ in range(3):
        store.publish(make_adapter_folder(), "clf")
    store.tag("clf@1", "prod")
    assert store.locate("clf@prod").version == 1
    store.promote("clf@2", "prod")
    assert store.locate("clf@prod").version == 2
    store.promote("clf@latest", "prod")
    assert store.tags("clf") == {"latest": 3, "prod": 3}
    assert store.rollback("clf", "prod").version == 2
    assert store.rollback("clf", "prod").version == 1
    with pytest.raises(StoreError, match="no earlier version"):
        store.rollback("clf", "prod")

    with pytest.raises(StoreError, match=r"clf@1 is tagged prod"):
        store.rm("clf@1")
    assert store.versions("clf") == [1, 2, 3]
    store.untag("clf", "prod")
    store.rm("clf@1")
    assert store.versions("clf") == [2, 3]
    with pytest.raises(StoreError, match="needs a version"):
        store.rm("clf")
    with pytest.raises(StoreError, match="no tag 'staging'; tags: latest"):
        store.locate("clf@staging")
    with pytest.raises(StoreError, match="cannot be a number"):
        store.tag("clf@2", "7")


def test_publish_with_custom_tags_and_parent(store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    first = store.publish(make_adapter_folder(), "clf")
    second = store.publish(make_adapter_folder(), "clf", tags=("latest", "candidate"), parent=first)
    assert store.tags("clf") == {"latest": 2, "candidate": 2}
    assert read_manifest(second.path)["parent"] == "clf@1"
    assert store.publish(make_adapter_folder(), "clf", tags=()).version == 3
    assert store.locate("clf").version == 2  # untagged publish leaves latest alone


def test_diff_reports_config_data_and_metric_changes(store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(metrics={"accuracy": 0.5}, training={"train": {"lr": 1e-4}}), "clf")
    store.publish(
        make_adapter_folder(metrics={"accuracy": 0.75}, training={"train": {"lr": 3e-4}}, data={"source": "trec"}),
        "clf",
    )
    changes = store.diff("clf@1", "clf@2")
    assert changes["metrics"] == {"accuracy": [0.5, 0.75]}
    assert changes["training"] == {"train.lr": [1e-4, 3e-4]}
    assert changes["data"] == {"source": [None, "trec"]}
    assert "method" not in changes


# ---------------------------------------------------------------- integrity
def test_corrupted_file_is_reported_by_verify_and_refused_by_load(store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    ref = store.publish(make_adapter_folder(), "clf")
    assert store.verify() == {"clf@1": []}
    weights = ref.path / "adapter_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o444  # published files are read-only
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    problems = store.verify("clf@1")["clf@1"]
    assert len(problems) == 1 and problems[0].startswith("adapter_model.safetensors: checksum mismatch")
    with pytest.raises(StoreError, match="clf@1 failed verification.*adapter_model.safetensors: checksum mismatch"):
        store.resolve("clf")
    with pytest.raises(StoreError, match="failed verification"):
        load_adapter(object(), "clf@1", store=store)  # refused before touching the model
    assert store.resolve("clf", verify=False)[0] == ref.path


def test_publish_refuses_pickles_links_and_unverified_sources(tmp_path, store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    src = make_adapter_folder()
    (src / "adapter_model.bin").write_bytes(b"pickle")
    refused = (
        r"adapter_model.bin: \.bin files are refused \(a loader may unpickle them, which runs code\); only safetensors"
    )
    with pytest.raises(StoreError, match=refused):
        store.publish(src, "clf")
    (src / "adapter_model.bin").unlink()
    (src / "extra.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(StoreError, match="extra.json is a link"):
        store.publish(src, "clf")
    (src / "extra.json").unlink()
    (src / "adapter_model.safetensors").write_bytes(b"changed after the manifest")
    with pytest.raises(StoreError, match="does not match its manifest.*adapter_model.safetensors"):
        store.publish(src, "clf")
    (src / MANIFEST).unlink()
    with pytest.raises(StoreError, match="no manifest.json"):
        store.publish(src, "clf")
    assert store.list() == []
    assert list(store_root.iterdir()) == []  # failed publishes of a new name leave nothing, not even its folder


# ---------------------------------------------------------------- names
HOSTILE = ["../x", "a/b", "/abs", "", "x" * 200, ".hidden", "a..b", "a\\b", "x@1", "nul\x00", "~root", " space"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused(name, store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    with pytest.raises(StoreError, match="invalid"):
        store.publish(make_adapter_folder(), name)
    with pytest.raises(StoreError, match="invalid"):
        store.tag("ok@1", name)
    if "@" not in name:  # "x@1" is a fine reference, only a bad name
        with pytest.raises(StoreError, match="invalid"):
            store.locate(name)
        with pytest.raises(StoreError, match="invalid"):
            parse_ref(f"{name}@1")
    assert list(store_root.iterdir()) == []
    assert not (store_root.parent / "x").exists()


def test_references_with_traversal_never_leave_the_root(store_root, make_adapter_folder, tmp_path):
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(), "ok")
    for ref in ("ok@../../etc", "ok@/abs", "ok@", "ok@@1", "..@1"):
        with pytest.raises(StoreError, match="invalid"):
            store.locate(ref)
    outside = tmp_path / "outside"
    outside.mkdir()
    (store_root / "planted").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="link out of the store root"):
        store.locate("planted")
    with pytest.raises(StoreError, match="link out of the store root"):
        store.publish(make_adapter_folder(), "planted")
    assert list(outside.iterdir()) == []
    assert "planted" not in store.names()


# ---------------------------------------------------------------- crash safety and concurrency
KILLABLE_PUBLISH = """
import sys, time
from pathlib import Path
import adapters.store.store as store

mode, root, src, marker = sys.argv[1:5]
real_copy = store._copy_file

def copy_then_stall(a, b):  # dies between two files of the copy
    real_copy(a, b)
    Path(marker).write_text("copying")
    time.sleep(600)

def stall_before_rename(a, b):  # dies holding the name's lock, version folder staged with its manifest
    Path(marker).write_text("locked")
    time.sleep(600)

if mode == "copy":
    store._copy_file = copy_then_stall
else:
    store._place_version = stall_before_rename
store.AdapterStore(root).publish(src, "big")
"""


def _big_adapter(make_adapter_folder):
    """An adapter folder with several MB in extra safetensors shards, so a copy has many steps."""
    import numpy as np
    from safetensors.numpy import save_file

    src = make_adapter_folder()
    for i in range(4):
        save_file({"w": np.full((512, 512), i, dtype="float32")}, str(src / f"shard-{i}.safetensors"))
    write_manifest(src, read_manifest(src))
    return src


@pytest.mark.parametrize("mode", ["copy", "rename"])
def test_kill_9_during_publish_leaves_the_store_consistent(mode, store_root, make_adapter_folder, tmp_path):
    store = AdapterStore(store_root)
    src = _big_adapter(make_adapter_folder)
    store.publish(src, "big")
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_PUBLISH, mode, str(store_root), str(src), str(marker)], env=_subprocess_env()
    )
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, "publisher exited before reaching the kill point"
            assert time.time() < deadline, "publisher never reached the kill point"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    leftovers = [p.name for p in store_root.iterdir() if p.name.startswith(".publish-") and p.is_dir()]
    assert len(leftovers) == 1  # the killed publish's staging folder, invisible to readers
    assert store.versions("big") == [1]
    assert store.tags("big") == {"latest": 1}
    assert store.verify() == {"big@1": []}
    assert store.resolve("big")[1]["version"] == 1

    # The lock died with the process: the next publish neither waits nor reuses anything.
    start = time.time()
    assert store.publish(src, "big").version == 2
    assert time.time() - start < 10
    removed = store.gc()
    assert removed == [leftovers[0]]
    assert [p.name for p in store_root.iterdir() if p.name.startswith(".publish-")] == []
    assert store.verify() == {"big@1": [], "big@2": []}


CONCURRENT_PUBLISH = """
import sys, time
from pathlib import Path
import adapters.store.store as store

root, src, go = sys.argv[1:4]
while not Path(go).exists():
    time.sleep(0.005)
print(store.AdapterStore(root).publish(src, "shared").version)
"""


def test_concurrent_publishers_get_distinct_versions(store_root, make_adapter_folder, tmp_path):
    srcs = [make_adapter_folder() for _ in range(4)]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_PUBLISH, str(store_root), str(src), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            env=_subprocess_env(),
        )
        for src in srcs
    ]
    time.sleep(0.5)  # let them all reach the starting line
    go.touch()
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    versions = sorted(int(o.strip()) for o in outputs)
    assert versions == [1, 2, 3, 4]
    store = AdapterStore(store_root)
    assert store.versions("shared") == [1, 2, 3, 4]
    assert all(not problems for problems in store.verify().values())
    # Each version holds the weights of exactly one of the sources.
    stored = {(store_root / "shared" / str(v) / "adapter_model.safetensors").read_bytes() for v in versions}
    assert stored == {(s / "adapter_model.safetensors").read_bytes() for s in srcs}
    assert store.tags("shared")["latest"] in versions


# ---------------------------------------------------------------- gc
def test_gc_spares_live_publishes_and_applies_a_keep_policy(store_root, make_adapter_folder):
    from filelock import FileLock

    store = AdapterStore(store_root)
    for _ in range(4):
        store.publish(make_adapter_folder(), "clf")
    store.tag("clf@1", "prod")
    dead = store_root / "clf" / ".publish-dead"
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"half")
    live = store_root / "clf" / ".publish-live"
    with FileLock(str(live) + ".lock"):
        live.mkdir()
        assert store.gc(dry_run=True) == ["clf/.publish-dead"]
        assert dead.exists()
        assert store.gc(keep=2) == ["clf/.publish-dead", "clf/2"]
        assert live.exists()  # its publisher still holds the lock
    assert store.versions("clf") == [1, 3, 4]  # 1 is tagged prod, 3 and 4 are the two newest
    assert store.gc() == ["clf/.publish-live"]  # its publisher is gone now


# ---------------------------------------------------------------- damage: validated documents, manifest digests
def test_the_manifest_digest_is_sha256sum_compatible_and_catches_an_edit(store_root, make_adapter_folder):
    """The digest beside a published manifest is what coreutils' sha256sum writes (checked by it, as a peer);
    an edit of the base fingerprint is caught by verify and load; the files' own checksums could not catch it."""
    import json
    import shutil

    from adapters.store.manifest import DIGEST_KEY, MANIFEST_DIGEST, verify_folder

    store = AdapterStore(store_root)
    ref = store.publish(make_adapter_folder(), "clf")
    assert read_manifest(ref.path)[DIGEST_KEY] == MANIFEST_DIGEST
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "-c", MANIFEST_DIGEST], cwd=ref.path, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip() == f"{MANIFEST}: OK", done
    manifest_path = ref.path / MANIFEST
    edited = json.loads(manifest_path.read_text())
    edited["base_model"]["fingerprint"] = "sha256:" + "1" * 64
    os.chmod(manifest_path, 0o644)
    manifest_path.write_text(json.dumps(edited, indent=2))
    problems = verify_folder(ref.path)  # every other file still matches the checksums the manifest lists
    assert len(problems) == 1 and "manifest.json: digest mismatch" in problems[0], problems
    assert store.verify("clf@1")["clf@1"] == problems
    with pytest.raises(StoreError, match="failed verification.*manifest.json: digest mismatch"):
        load_adapter(object(), "clf@1", store=store)


def test_versions_published_before_digests_still_load_and_verify_with_a_note(store_root, make_adapter_folder):
    """A version as published before manifest digests: no digest file and no digest key."""
    import json

    from adapters.store.manifest import DIGEST_KEY, MANIFEST_DIGEST
    from adapters.store.store import NO_DIGEST_NOTE

    store = AdapterStore(store_root)
    ref = store.publish(make_adapter_folder(), "old")
    manifest = read_manifest(ref.path)
    del manifest[DIGEST_KEY]
    os.chmod(ref.path / MANIFEST, 0o644)
    (ref.path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (ref.path / MANIFEST_DIGEST).unlink()
    notes = {}
    assert store.verify(notes=notes) == {"old@1": []}
    assert notes == {"old@1": NO_DIGEST_NOTE} and "published before" in NO_DIGEST_NOTE
    assert store.resolve("old@1", verify=True)[1]["version"] == 1
    assert store.export("old@1", store_root.parent / "old-export").is_dir()
    assert store.import_(store_root.parent / "old-export", name="renewed").version == 1
    assert (store.root / "renewed" / "1" / MANIFEST_DIGEST).is_file()  # re-published: covered from now on
    assert store.verify("renewed@1", notes=notes) == {"renewed@1": []} and "renewed@1" not in notes


def test_a_damaged_tags_file_hides_nothing_else(store_root, make_adapter_folder):
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(), "good")
    store.publish(make_adapter_folder(), "bad", tags=("latest", "prod"))
    (store_root / "bad" / "tags.json").write_text('{"tags": null}')
    rows = store.list()
    assert [(r["name"], r["version"], "error" in r) for r in rows] == [
        ("bad", None, True),
        ("bad", 1, False),
        ("good", 1, False),
    ]
    assert "bad/tags.json: damaged tags file: 'tags' must be an object" in rows[0]["error"]
    assert store.locate("bad@1").version == 1  # by number, the name's versions stay reachable
    assert store.show("bad@1")["tags_error"] == rows[0]["error"]
    for refused in (lambda: store.locate("bad"), lambda: store.publish(make_adapter_folder(), "bad")):
        with pytest.raises(StoreError, match="bad/tags.json: damaged tags file"):
            refused()
    assert store.versions("bad") == [1]
    assert store.publish(make_adapter_folder(), "good").version == 2
    assert store.verify() == {"bad@1": [], "good@1": [], "good@2": []}


@pytest.mark.parametrize("text", ["evil\n", "3\n", "a" * 129, "gооd", "..", "a/b", ""])
def test_names_tags_and_versions_are_matched_in_full(text, store_root, make_adapter_folder):
    from adapters.store.refs import check_tag, is_version

    store = AdapterStore(store_root)
    assert not is_version(text)
    with pytest.raises(StoreError, match=r"invalid (adapter name|tag) .*ASCII letters"):
        store.publish(make_adapter_folder(), text)
    with pytest.raises(StoreError, match="invalid tag"):
        check_tag(text)
    assert list(store_root.iterdir()) == []
