"""The versioned adapter store: immutable numbered versions, movable tags, atomic publish.

Layout under the root (default ``$ADAPTERKIT_STORE`` or ``cache_dir()/store``)::

    <name>/<version>/      adapter_config.json, adapter_model.safetensors, manifest.json, ...
    <name>/tags.json       {"tags": {"latest": 3, "prod": 2}, "history": {"prod": [1]}, "last_version": 3}
    <name>/.lock           serialises version numbering and tag changes between processes
    <name>/.publish-*      a publish in progress (or the leftover of a killed one; `gc` removes it)

References: ``name`` (its ``latest`` tag, else its newest version), ``name@3``, ``name@prod``, or
a folder path (anything with a '/' or starting with '.' or '~').

Publishing copies into a staging folder inside the store, fsyncs every file, then takes the
name's lock, assigns the next version and renames the folder into place: a reader sees a
version completely or not at all, and a killed publisher leaves only a staging folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tarfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from filelock import FileLock, Timeout

from adapters.errors import BaseMismatchError, ConfigError, StoreError
from adapters.store.fingerprint import fingerprint_model
from adapters.store.manifest import (
    MANIFEST,
    file_checksums,
    manifest_problems,
    read_manifest,
    safe_relative,
    write_json_atomic,
)
from adapters.paths import cache_dir, fsync_dir, validate_name
from adapters.store.verified import prune_records, verify_folder_cached
from adapters.constants import ADAPTER_CONFIG

log = logging.getLogger(__name__)

TAGS_FILE = "tags.json"
LATEST = "latest"
# Formats that unpickle (or may) when loaded: never stored, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
STAGING_PREFIXES = (".publish-", ".import-", ".trash-", ".export-")
LOCK_TIMEOUT_S = 600
_VERSION = re.compile(r"^[1-9][0-9]*$")


@dataclass(frozen=True)
class AdapterRef:
    """One stored version: ``str(ref)`` is the reference that finds it again (``name@version``)."""

    name: str
    version: int
    path: Path

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def is_path_ref(ref: str | os.PathLike) -> bool:
    """A reference is a folder path when it is a Path, holds a separator, or starts with '.' or '~'."""
    if isinstance(ref, os.PathLike):
        return True
    return "/" in ref or os.sep in ref or ref.startswith((".", "~"))


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name' -> (name, None); 'name@3' / 'name@prod' -> (name, '3' / 'prod'). Validates both parts."""
    if not isinstance(ref, str) or not ref:
        raise StoreError(f"invalid adapter reference {ref!r}: use name, name@<version>, name@<tag> or a folder path")
    name, sep, selector = ref.partition("@")
    _check_name(name, "adapter name")
    if sep:
        if not selector:
            raise StoreError(f"invalid adapter reference {ref!r}: nothing after '@' (use name@<version> or name@<tag>)")
        if not _VERSION.match(selector):
            _check_name(selector, "tag")
        return name, selector
    return name, None


def _check_name(name: Any, what: str) -> str:
    try:
        return validate_name(name, what)
    except ConfigError as err:
        raise StoreError(str(err)) from None


def _check_tag(tag: Any) -> str:
    _check_name(tag, "tag")
    if tag.isdigit():
        raise StoreError(f"invalid tag {tag!r}: a tag cannot be a number (name@{tag} means version {tag})")
    return tag


def check_publishable_files(folder: Path) -> None:
    """Refuse links, special files and pickle-based weights; require peft's config and safetensors."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise StoreError(f"{folder}: {ADAPTER_CONFIG} is missing; not an adapter folder")
    has_safetensors = False
    pending = [(os.fspath(folder), "")]
    while pending:  # scandir: this runs on every first load of an adapter
        where, prefix = pending.pop()
        with os.scandir(where) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_symlink():
                    raise StoreError(f"{folder}: {rel} is a link; adapter folders hold plain files only")
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, rel + "/"))
                elif not entry.is_file(follow_symlinks=False):
                    raise StoreError(f"{folder}: {rel} is not a plain file")
                if entry.name.lower().endswith(PICKLE_SUFFIXES):
                    raise StoreError(
                        f"{folder}: {rel} is a pickle-based file; only safetensors weights are accepted "
                        "(save with safe_serialization=True)"
                    )
                has_safetensors |= entry.name.endswith(".safetensors")
    if not has_safetensors:
        raise StoreError(f"{folder}: no .safetensors weights; only safetensors adapters are accepted")


def _copy_file(src: Path, dst: Path) -> None:
    """Copy one file, fsync it and make it read-only (published versions are never edited in place)."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, 0o444)


def _place_version(staged: Path, final: Path) -> None:
    """The publish's commit point: one rename makes the whole version visible."""
    os.rename(staged, final)


class AdapterStore:
    def __init__(self, root: str | os.PathLike | None = None):
        if root is None:
            root = os.environ.get("ADAPTERKIT_STORE") or (cache_dir() / "store")
        path = Path(root).expanduser()
        if path.exists() and not path.is_dir():
            raise StoreError(f"store root {path} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
        self.root = path.resolve()

    def __repr__(self) -> str:
        return f"AdapterStore({str(self.root)!r})"

    # ------------------------------------------------------------ paths and state
    def _name_dir(self, name: str, create: bool = False) -> Path:
        _check_name(name, "adapter name")
        path = self.root / name
        if path.is_symlink() or (path.exists() and path.resolve().parent != self.root):
            raise StoreError(f"store entry {name!r} is a link out of the store root {self.root}; refusing it")
        if create:
            path.mkdir(exist_ok=True)
        elif not path.is_dir():
            known = self.names()
            raise StoreError(
                f"no adapter named {name!r} in {self.root}; known names: {', '.join(known) if known else '(none)'}"
            )
        return path

    def _lock(self, name_dir: Path) -> FileLock:
        return FileLock(str(name_dir / ".lock"), timeout=LOCK_TIMEOUT_S)

    @contextmanager
    def _locked(self, name_dir: Path) -> Iterator[None]:
        try:
            with self._lock(name_dir):
                yield
        except Timeout as err:
            raise StoreError(f"timed out after {LOCK_TIMEOUT_S} s waiting for the lock {name_dir / '.lock'}") from err

    def names(self) -> list[str]:
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.is_symlink() and not p.name.startswith("."):
                try:
                    validate_name(p.name)
                except ConfigError:
                    continue
                out.append(p.name)
        return out

    def versions(self, name: str) -> list[int]:
        name_dir = self._name_dir(name)
        return sorted(
            int(p.name) for p in name_dir.iterdir() if _VERSION.match(p.name) and p.is_dir() and not p.is_symlink()
        )

    def _state(self, name_dir: Path) -> dict:
        path = name_dir / TAGS_FILE
        state = {"tags": {}, "history": {}, "last_version": 0}
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise StoreError(f"{path}: unreadable ({err})") from err
            state.update({k: loaded[k] for k in state if k in loaded})
        return state

    def tags(self, name: str) -> dict[str, int]:
        """{tag: version} of a name."""
        return dict(self._state(self._name_dir(name))["tags"])

    # ------------------------------------------------------------ publish
    @contextmanager
    def _staging(self, parent: Path, prefix: str) -> Iterator[Path]:
        """A fresh folder under parent, guarded by a lock that `gc` tests to tell live from dead.

        The lock is taken before the folder exists, so gc never sees an unlocked live folder.
        """
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        guard = FileLock(str(path) + ".lock")
        guard.acquire()
        try:
            path.mkdir()
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            guard.release()
            Path(str(path) + ".lock").unlink(missing_ok=True)

    def publish(
        self,
        src_folder: str | os.PathLike,
        name: str,
        tags: Iterable[str] = (LATEST,),
        parent: str | AdapterRef | None = None,
    ) -> AdapterRef:
        """Copy an adapter folder (with its manifest.json) into the store as the name's next version."""
        name = _check_name(name, "adapter name")
        tags = [_check_tag(t) for t in tags]
        src = Path(src_folder)
        if not src.is_dir():
            raise StoreError(f"publish: {src} is not a folder")
        manifest = read_manifest(src)
        problems = manifest_problems(manifest, require_files=False)
        if problems:
            raise StoreError(f"publish: {src / MANIFEST} is invalid: {'; '.join(problems)}")
        check_publishable_files(src)
        name_dir = self._name_dir(name, create=True)

        with self._staging(name_dir, ".publish-") as staged:
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                rel_dir = Path(dirpath).relative_to(src)
                (staged / rel_dir).mkdir(exist_ok=True)
                for fname in sorted(filenames):
                    if rel_dir == Path(".") and fname == MANIFEST:
                        continue
                    _copy_file(Path(dirpath) / fname, staged / rel_dir / fname)
                fsync_dir(staged / rel_dir)
            check_publishable_files(staged)  # what was copied, in case the source changed meanwhile
            sums = file_checksums(staged)
            listed = manifest.get("files") or {}
            if listed and listed != sums:
                changed = sorted(k for k in set(listed) | set(sums) if listed.get(k) != sums.get(k))
                raise StoreError(
                    f"publish: {src} does not match its manifest ({', '.join(changed)}); "
                    "the folder changed after write_manifest, or is corrupted"
                )
            with self._locked(name_dir):
                state = self._state(name_dir)
                version = max([int(state["last_version"] or 0), *self.versions(name)]) + 1
                final = {**manifest, "name": name, "version": version, "files": sums}
                if parent is not None:
                    final["parent"] = str(parent)
                write_json_atomic(staged / MANIFEST, final, mode=0o444)
                fsync_dir(staged)
                _place_version(staged, name_dir / str(version))
                fsync_dir(name_dir)
                state["last_version"] = version
                for tag in tags:
                    _move_tag(state, tag, version)
                write_json_atomic(name_dir / TAGS_FILE, state)
        log.info("published %s@%d to %s", name, version, self.root)
        return AdapterRef(name, version, name_dir / str(version))

    # ------------------------------------------------------------ resolving and loading
    def locate(self, ref: str) -> AdapterRef:
        """The stored version a name / name@version / name@tag reference points at."""
        name, selector = parse_ref(ref)
        name_dir = self._name_dir(name)
        versions = self.versions(name)
        tags = self._state(name_dir)["tags"]
        if selector is None:
            if LATEST in tags and tags[LATEST] in versions:
                version = tags[LATEST]
            elif versions:
                version = versions[-1]
            else:
                raise StoreError(f"adapter {name!r} has no versions in {self.root}")
        elif _VERSION.match(selector):
            version = int(selector)
            if version not in versions:
                raise StoreError(
                    f"adapter {name!r} has no version {version}; versions: {', '.join(map(str, versions)) or '(none)'}"
                )
        else:
            if selector not in tags:
                raise StoreError(f"adapter {name!r} has no tag {selector!r}; tags: {', '.join(sorted(tags)) or '(none)'}")
            version = tags[selector]
            if version not in versions:
                raise StoreError(f"tag {name}@{selector} points at version {version}, which was removed")
        return AdapterRef(name, version, name_dir / str(version))

    def resolve(self, ref: str | os.PathLike, verify: bool = True) -> tuple[Path, dict | None]:
        """(folder, manifest) of a reference. With verify, refuses a folder whose files fail their checksums.

        A plain folder without manifest.json (a bare peft folder) resolves with manifest None.
        """
        if is_path_ref(ref):
            folder = Path(ref).expanduser()
            if not folder.is_dir():
                raise StoreError(f"adapter folder {str(folder)!r} does not exist")
            if not (folder / MANIFEST).is_file():
                return folder, None
            manifest = read_manifest(folder)
            problems = verify_folder_cached(folder) if verify else []
            where = str(folder)
        else:
            located = self.locate(str(ref))
            folder, where = located.path, str(located)
            manifest = read_manifest(folder)
            problems = self._verify_version(located) if verify else []
        if problems:
            raise StoreError(f"adapter {where} failed verification, refusing to load it: {'; '.join(problems)}")
        return folder, manifest

    def verify(self, ref: str | None = None) -> dict[str, list[str]]:
        """{reference: problems} for one reference or (ref None) every stored version."""
        if ref is not None:
            if is_path_ref(ref):
                return {str(ref): verify_folder_cached(Path(ref), recheck=True)}
            located = self.locate(ref)
            return {str(located): self._verify_version(located, recheck=True)}
        report = {}
        for name in self.names():
            for version in self.versions(name):
                located = AdapterRef(name, version, self.root / name / str(version))
                report[str(located)] = self._verify_version(located, recheck=True)
        return report

    def _verify_version(self, located: AdapterRef, recheck: bool = False) -> list[str]:
        # recheck: an explicit verify hashes every file; a load may skip versions verified before.
        problems = verify_folder_cached(located.path, recheck=recheck)
        try:
            manifest = read_manifest(located.path)
        except StoreError:
            return problems
        if manifest.get("name") != located.name or manifest.get("version") != located.version:
            problems.append(
                f"manifest says {manifest.get('name')}@{manifest.get('version')} but the folder is {located}"
            )
        return problems

    # ------------------------------------------------------------ listing
    def list(self, name: str | None = None) -> list[dict]:
        """One row per stored version: name, version, tags, created_at, task, method, base, metrics."""
        rows = []
        for n in [name] if name else self.names():
            tags = self.tags(n)
            for version in self.versions(n):
                try:
                    manifest = read_manifest(self.root / n / str(version))
                except StoreError as err:
                    manifest = {"error": str(err)}
                rows.append(
                    {
                        "name": n,
                        "version": version,
                        "tags": sorted(t for t, v in tags.items() if v == version),
                        "created_at": manifest.get("created_at"),
                        "task": manifest.get("task"),
                        "method": (manifest.get("method") or {}).get("name"),
                        "base": (manifest.get("base_model") or {}).get("name"),
                        "metrics": manifest.get("metrics") or {},
                        **({"error": manifest["error"]} if "error" in manifest else {}),
                    }
                )
        return rows

    def show(self, ref: str) -> dict:
        """Everything about one reference: where it is, its tags and its whole manifest."""
        folder, manifest = self.resolve(ref, verify=False)
        out = {"ref": str(ref), "path": str(folder), "tags": [], "manifest": manifest}
        if not is_path_ref(ref):
            located = self.locate(ref)
            out["ref"] = str(located)
            out["tags"] = sorted(t for t, v in self.tags(located.name).items() if v == located.version)
        return out

    def diff(self, ref_a: str, ref_b: str) -> dict:
        """What differs between two versions: method, base, training config, data, prompt and metrics."""
        _, a = self.resolve(ref_a, verify=False)
        _, b = self.resolve(ref_b, verify=False)
        return diff_manifests(a or {}, b or {})

    # ------------------------------------------------------------ tags
    def tag(self, ref: str, tag: str) -> AdapterRef:
        """Point tag at the version ref resolves to (moving it if it pointed elsewhere)."""
        tag = _check_tag(tag)
        located = self.locate(ref)
        name_dir = self._name_dir(located.name)
        with self._locked(name_dir):
            if located.version not in self.versions(located.name):
                raise StoreError(f"{located} was removed meanwhile")
            state = self._state(name_dir)
            _move_tag(state, tag, located.version)
            write_json_atomic(name_dir / TAGS_FILE, state)
        return located

    promote = tag  # `promote model@4 prod` reads better in a release process; same operation

    def untag(self, name: str, tag: str) -> None:
        tag = _check_tag(tag)
        name_dir = self._name_dir(name)
        with self._locked(name_dir):
            state = self._state(name_dir)
            if tag not in state["tags"]:
                raise StoreError(f"adapter {name!r} has no tag {tag!r}; tags: {', '.join(sorted(state['tags'])) or '(none)'}")
            del state["tags"][tag]
            state["history"].pop(tag, None)
            write_json_atomic(name_dir / TAGS_FILE, state)

    def rollback(self, name: str, tag: str = "prod") -> AdapterRef:
        """Move tag back to the version it pointed at before its last move."""
        tag = _check_tag(tag)
        name_dir = self._name_dir(name)
        with self._locked(name_dir):
            state = self._state(name_dir)
            versions = self.versions(name)
            history = [v for v in state["history"].get(tag, []) if v in versions]
            if not history:
                raise StoreError(f"{name}@{tag} has no earlier version to roll back to")
            version = history.pop()
            state["tags"][tag] = version
            state["history"][tag] = history
            write_json_atomic(name_dir / TAGS_FILE, state)
        return AdapterRef(name, version, name_dir / str(version))

    # ------------------------------------------------------------ removal
    def rm(self, ref: str, force: bool = False) -> AdapterRef:
        """Remove one version. A version a tag points at is kept unless force (which drops those tags)."""
        name, selector = parse_ref(ref)
        if selector is None:
            raise StoreError(f"rm needs a version: {name}@<version> or {name}@<tag>")
        located = self.locate(ref)
        name_dir = self._name_dir(name)
        with self._locked(name_dir):
            state = self._state(name_dir)
            pointing = sorted(t for t, v in state["tags"].items() if v == located.version)
            if pointing and not force:
                raise StoreError(
                    f"{located} is tagged {', '.join(pointing)}; move or remove the tag(s) first, or force the removal (--force)"
                )
            self._remove_version(name_dir, located.version)
            remaining = self.versions(name)
            for t in pointing:
                del state["tags"][t]
            if LATEST in pointing and remaining:
                state["tags"][LATEST] = remaining[-1]
            state["history"] = {t: [v for v in h if v != located.version] for t, h in state["history"].items()}
            write_json_atomic(name_dir / TAGS_FILE, state)
        return located

    def _remove_version(self, name_dir: Path, version: int) -> None:
        # Rename first: the version disappears atomically; a crash mid-delete leaves a .trash- folder for gc.
        trash = name_dir / f".trash-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(name_dir / str(version), trash)
        fsync_dir(name_dir)
        shutil.rmtree(trash)

    # ------------------------------------------------------------ export / import
    def export(self, ref: str, dest: str | os.PathLike) -> Path:
        """Write a verified version to dest: a folder, or an archive if dest ends in .tar.gz / .tgz."""
        folder, manifest = self.resolve(ref, verify=True)
        if manifest is None:
            raise StoreError(f"export: {ref} has no manifest.json; only adapterkit adapters can be exported")
        dest = Path(dest).expanduser()
        if dest.exists():
            raise StoreError(f"export: {dest} already exists; choose a new path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        label = f"{manifest.get('name') or folder.name}-{manifest.get('version') or 'folder'}"
        tmp = dest.parent / f".export-{uuid.uuid4().hex[:12]}"
        try:
            if dest.name.endswith((".tar.gz", ".tgz")):
                with tarfile.open(tmp, "w:gz") as tar:
                    for path in sorted(folder.rglob("*")):
                        if path.is_file():
                            tar.add(path, arcname=f"{label}/{path.relative_to(folder).as_posix()}", recursive=False)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            else:
                shutil.copytree(folder, tmp)
            os.rename(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
        return dest

    def import_(self, src: str | os.PathLike, name: str | None = None, tags: Iterable[str] = (LATEST,)) -> AdapterRef:
        """Publish an exported folder or archive; name defaults to the one in its manifest."""
        src = Path(src).expanduser()
        if src.is_dir():
            return self._import_folder(src, name, tags)
        if not src.is_file():
            raise StoreError(f"import: {src} does not exist")
        with self._staging(self.root, ".import-") as staged:
            safe_extract(src, staged)
            return self._import_folder(_adapter_root(staged, src), name, tags)

    def _import_folder(self, folder: Path, name: str | None, tags: Iterable[str]) -> AdapterRef:
        manifest = read_manifest(folder)
        name = name or manifest.get("name")
        if not name:
            raise StoreError(f"import: {folder} has no name in its manifest; give one")
        return self.publish(folder, name, tags=tags, parent=manifest.get("parent"))

    # ------------------------------------------------------------ garbage collection
    def gc(self, keep: int | None = None, dry_run: bool = False) -> list[str]:
        """Remove leftovers of killed publishes/imports/removals, and with keep=N every untagged
        version older than each name's N newest. Returns what was (or would be) removed."""
        if keep is not None and keep < 0:
            raise StoreError(f"gc: keep must be >= 0, got {keep}")
        removed = []
        places = [self.root] + [self.root / n for n in self.names()]
        for place in places:
            for path in sorted(place.iterdir()):
                if not path.name.startswith(STAGING_PREFIXES):
                    continue
                if path.name.endswith(".lock"):  # a guard whose folder is gone (killed before mkdir)
                    owner = path.with_name(path.name[: -len(".lock")])
                    if path.exists() and not owner.exists() and self._reclaim(owner, dry_run):
                        removed.append(str(path.relative_to(self.root)))
                elif self._reclaim(path, dry_run):
                    removed.append(str(path.relative_to(self.root)))
        if keep is not None:
            for name in self.names():
                tagged = set(self.tags(name).values())
                for version in self.versions(name)[::-1][keep:]:
                    if version in tagged:
                        continue
                    if not dry_run:
                        try:
                            self.rm(f"{name}@{version}")
                        except StoreError as err:  # tagged or removed meanwhile by another process
                            log.info("gc kept %s@%d: %s", name, version, err)
                            continue
                    removed.append(f"{name}/{version}")
        if not dry_run:
            prune_records()  # machine-wide verification records of removed or changed folders
        return removed

    def _reclaim(self, path: Path, dry_run: bool) -> bool:
        """Remove a staging leftover unless a live process still holds its lock."""
        guard = FileLock(str(path) + ".lock", timeout=0)
        try:
            guard.acquire()
        except Timeout:
            return False  # a publish in progress
        try:
            if dry_run:
                return True
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        finally:
            guard.release()
            if not path.exists():
                Path(str(path) + ".lock").unlink(missing_ok=True)
        return True


def _move_tag(state: dict, tag: str, version: int) -> None:
    previous = state["tags"].get(tag)
    if previous is not None and previous != version:
        state["history"].setdefault(tag, []).append(previous)
    state["tags"][tag] = version


# ---------------------------------------------------------------- archives
def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing absolute paths, '..', links and special files."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise StoreError(f"import: {archive} is not a readable tar archive ({err})") from err
    with tar:
        members = tar.getmembers()
        for m in members:
            if m.name.startswith("/") or not safe_relative(m.name.rstrip("/")):
                raise StoreError(f"import: {archive} holds an unsafe path {m.name!r} (absolute or with '..'); refusing it")
            if not (m.isfile() or m.isdir()):
                raise StoreError(f"import: {archive} holds {m.name!r}, a link or special file; refusing it")
        dest_resolved = dest.resolve()
        for m in members:
            target = (dest / m.name).resolve()
            if dest_resolved not in target.parents and target != dest_resolved:
                raise StoreError(f"import: {m.name!r} would land outside the extraction folder; refusing it")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fin = tar.extractfile(m)
            with fin, open(target, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)


def _adapter_root(extracted: Path, archive: Path) -> Path:
    if (extracted / MANIFEST).is_file():
        return extracted
    candidates = [p for p in extracted.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    if len(candidates) != 1:
        raise StoreError(f"import: {archive} must hold one adapter folder with a {MANIFEST}; found {len(candidates)}")
    return candidates[0]


# ---------------------------------------------------------------- comparing
DIFF_SECTIONS = ("task", "method", "base_model", "labels", "prompt", "training", "data", "metrics", "parent", "versions")


def diff_manifests(a: dict, b: dict) -> dict[str, dict[str, list]]:
    """{section: {dotted key: [value in a, value in b]}} for every leaf that differs."""
    out = {}
    for section in DIFF_SECTIONS:
        fa, fb = _flatten(a.get(section)), _flatten(b.get(section))
        changes = {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
        if changes:
            out[section] = changes
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix or "(value)": value}


# ---------------------------------------------------------------- the base check and loading
def check_base(manifest: dict, base_fingerprint: str | None, allow_mismatch: bool = False, base_name: str | None = None) -> bool:
    """True when the adapter's recorded base fingerprint is base_fingerprint.

    Otherwise raise BaseMismatchError naming both bases, or with allow_mismatch log a warning
    and return False.
    """
    recorded = manifest.get("base_model") or {}
    expected = recorded.get("fingerprint")
    if expected and expected == base_fingerprint:
        return True
    adapter = f"{manifest.get('name') or 'adapter'}@{manifest.get('version')}" if manifest.get("version") else (manifest.get("name") or "the adapter")
    trained_on = f"{recorded.get('name') or recorded.get('path') or 'an unnamed base'} ({expected or 'no fingerprint recorded'})"
    loading_on = f"{base_name or 'a base model'} ({base_fingerprint or 'fingerprint unknown'})"
    message = f"{adapter} was trained on base {trained_on} but is being loaded on {loading_on}"
    if allow_mismatch:
        log.warning("%s; loading anyway because the base check was overridden", message)
        return False
    raise BaseMismatchError(message + "; load it on its own base, or override with allow_base_mismatch=True")


def model_base_fingerprint(model: Any) -> tuple[str | None, str | None]:
    """(fingerprint, folder) of the local folder a loaded model came from; (None, name) if not local."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    where = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if where and Path(where).exists():
        return fingerprint_model(where), str(where)
    return None, where


def load_adapter(
    model: Any,
    ref: str | os.PathLike,
    store: AdapterStore | None = None,
    base_fingerprint: str | None = None,
    allow_base_mismatch: bool = False,
    adapter_name: str = "default",
    is_trainable: bool = False,
):
    """Resolve ref, verify its checksums and its base, and attach it to model. Returns the model
    (a PeftModel for peft methods).

    base_fingerprint defaults to the fingerprint of the folder the model was loaded from
    (``model.config.name_or_path``); pass it when the model was built another way.
    """
    from adapters.methods import method_of_folder

    store = store or AdapterStore()
    folder, manifest = store.resolve(ref, verify=True)
    check_publishable_files(folder)  # plain folders too: no pickles, safetensors present
    base_name = None
    if base_fingerprint is None:
        base_fingerprint, base_name = model_base_fingerprint(model)
    if manifest is None:
        if not allow_base_mismatch:
            raise StoreError(
                f"{folder} has no manifest.json, so its base model cannot be checked; publish it with a "
                "manifest, or pass allow_base_mismatch=True to load it unchecked"
            )
        log.warning("loading %s without a manifest: base model and checksums unchecked", folder)
    else:
        if base_fingerprint is None and not allow_base_mismatch:
            raise StoreError(
                f"cannot fingerprint the model's base ({base_name!r} is not a local folder); pass "
                "base_fingerprint=fingerprint_model(<base folder>) or allow_base_mismatch=True"
            )
        check_base(manifest, base_fingerprint, allow_mismatch=allow_base_mismatch, base_name=base_name)
    return method_of_folder(folder).load(model, folder, adapter_name=adapter_name, is_trainable=is_trainable)
