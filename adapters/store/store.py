"""The versioned adapter store: immutable numbered versions, movable tags, atomic publish.

Layout under the root (default ``$ADAPTERKIT_STORE`` or ``cache_dir()/store``)::

    <name>/<version>/      adapter_config.json, adapter_model.safetensors, manifest.json, ...
    <name>/tags.json       {"tags": {"latest": 3, "prod": 2}, "history": {"prod": [1]}, "last_version": 3}
    <name>/.lock           serialises version numbering and tag changes between processes
    <name>/.publish-*      a publish in progress (or the leftover of a killed one; `gc` removes it)

References (adapters.store.refs): ``name`` (its ``latest`` tag, else its newest version),
``name@3``, ``name@prod``, or a folder path (anything with a '/' or starting with '.' or '~').

Publishing copies into a staging folder inside the store, fsyncs every file, then takes the
name's lock, assigns the next version and renames the folder into place: a reader sees a
version completely or not at all, and a killed publisher leaves only a staging folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from adapters.constants import ADAPTER_CONFIG, MANIFEST
from adapters.errors import ConfigError, StoreError
from adapters.paths import cache_dir, fsync_dir, validate_name
from adapters.store import tags as tagfile
from adapters.store.archive import adapter_root, safe_extract, write_export
from adapters.store.listing import list_rows
from adapters.store.manifest import (
    DIGEST_KEY,
    MANIFEST_DIGEST,
    diff_manifests,
    digest_problems,
    file_checksums,
    has_manifest_digest,
    manifest_problems,
    read_manifest,
    write_json_atomic,
    write_manifest_digest,
)
from adapters.store.refs import (
    LATEST,
    AdapterRef,
    check_name,
    check_tag,
    is_path_ref,
    is_version,
    parse_ref,
    select_version,
)
from adapters.store.staging import discard, remove_leftovers, staging
from adapters.store.verified import prune_records, verify_folder_cached

log = logging.getLogger(__name__)

# Formats that unpickle (or may) when loaded: never stored, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
LOCK_TIMEOUT_S = 600
NO_DIGEST_NOTE = (
    f"no {MANIFEST_DIGEST}: published before adapterkit recorded manifest digests, "
    "so edits to its manifest.json cannot be detected (its files' checksums were checked)"
)


def check_publishable_files(folder: Path) -> None:
    """Refuse links, special files and pickle-based weights; require peft's config and safetensors.

    Raises StoreError saying which file breaks which rule.
    """
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
                    raise StoreError(f"{folder / rel} is a link; adapter folders hold plain files only")
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, rel + "/"))
                elif not entry.is_file(follow_symlinks=False):
                    raise StoreError(f"{folder / rel} is not a plain file; adapter folders hold plain files only")
                suffix = next((s for s in PICKLE_SUFFIXES if entry.name.lower().endswith(s)), None)
                if suffix:  # by suffix: the file need not be a pickle, but a loader could unpickle it
                    raise StoreError(
                        f"{folder / rel}: {suffix} files are refused (a loader may unpickle them, which runs code); "
                        "only safetensors weights and the adapter's config, tokenizer and text files are accepted "
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


def _copy_adapter(src: Path, staged: Path, listed: dict[str, str]) -> dict[str, str]:
    """Copy every file of src but its manifest into the empty folder staged, fsyncing files and folders.

    Returns the copy's {relative path: sha256 hex}. Raises StoreError when the copy is not
    publishable or differs from listed, the source manifest's checksums (when it lists any).
    """
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(src)
        (staged / rel_dir).mkdir(exist_ok=True)
        for fname in sorted(filenames):
            if rel_dir == Path(".") and fname in (MANIFEST, MANIFEST_DIGEST):
                continue  # the store writes both anew
            _copy_file(Path(dirpath) / fname, staged / rel_dir / fname)
        fsync_dir(staged / rel_dir)
    check_publishable_files(staged)  # what was copied, in case the source changed meanwhile
    sums = file_checksums(staged)
    if listed and listed != sums:
        changed = sorted(k for k in set(listed) | set(sums) if listed.get(k) != sums.get(k))
        raise StoreError(
            f"publish: {src} does not match its manifest ({', '.join(changed)}); "
            "the folder changed after write_manifest, or is corrupted"
        )
    return sums


def _place_version(staged: Path, final: Path) -> None:
    """The publish's commit point: one rename makes the whole version visible."""
    os.rename(staged, final)


@contextmanager
def _editing_tags(name_dir: Path) -> Iterator[dict]:
    """The name's tags state, under the name's lock, written back when the block ends without an error."""
    try:
        with FileLock(str(name_dir / ".lock"), timeout=LOCK_TIMEOUT_S):
            state = tagfile.read_state(name_dir)
            yield state
            tagfile.write_state(name_dir, state)
    except Timeout as err:
        raise StoreError(f"timed out after {LOCK_TIMEOUT_S} s waiting for the lock {name_dir / '.lock'}") from err


def _version_of_run(name_dir: Path, versions: list[int], run_id: str) -> int | None:
    """The newest of a name's `versions` that training run `run_id` published, or None."""
    for version in reversed(versions):
        try:
            if read_manifest(name_dir / str(version)).get("run_id") == run_id:
                return version
        except StoreError:  # an unreadable manifest is not this run's
            continue
    return None


def _complete_tags(state: dict, tags: Iterable[str], version: int) -> None:
    """Set the tags a publish of `version` should have set, where they are missing or point at an older
    version (a newer version keeps a tag it took since), and count `version` as assigned."""
    state["last_version"] = max(int(state["last_version"] or 0), version)
    for tag in tags:
        current = state["tags"].get(tag)
        if current is None or current < version:
            tagfile.move_tag(state, tag, version)


def _verify_version(located: AdapterRef, recheck: bool = False) -> list[str]:
    """verify_folder_cached's problems, plus a manifest naming another name@version than its folder."""
    # recheck: an explicit verify hashes every file; a load may skip versions verified before.
    problems = verify_folder_cached(located.path, recheck=recheck)
    try:
        manifest = read_manifest(located.path)
    except StoreError:
        return problems
    if manifest.get("name") != located.name or manifest.get("version") != located.version:
        problems.append(f"manifest says {manifest.get('name')}@{manifest.get('version')} but the folder is {located}")
    return problems


def _import_folder(store: AdapterStore, folder: Path, name: str | None, tags: list[str], src: Path) -> AdapterRef:
    """Publish an exported (or extracted) adapter folder after checking its manifest's digest."""
    manifest = read_manifest(folder)
    problems = digest_problems(folder, manifest)  # an exported version carries its digest: check it
    if problems:
        raise StoreError(f"import: {src}: {'; '.join(problems)}; refusing it")
    if name is None:
        name = manifest.get("name")
        if not name:
            raise StoreError(f"import: {src}: its manifest names no adapter; give one (--name)")
        try:
            check_name(name, "adapter name")
        except StoreError as err:
            raise StoreError(f"import: {src}: its manifest's name is not usable ({err}); give one (--name)") from None
    return store.publish(folder, name, tags=tags, parent=manifest.get("parent"))


def _as_import_message(text: str) -> str:
    """A publish refusal reworded for the command the user ran: import."""
    if text.startswith("publish: "):
        return "import: " + text[len("publish: ") :]
    return text if text.startswith("import: ") else f"import: {text}"


def user_path(text: str | os.PathLike, what: str) -> Path:
    """Path(text) with a leading ~ or ~user expanded; StoreError (naming what the path is for) when it cannot be."""
    try:
        return Path(text).expanduser()
    except RuntimeError as err:  # ~user of an unknown user, or no home directory
        raise StoreError(f"{what} {os.fspath(text)!r}: cannot expand '~' ({err})") from None


def _stored_versions(name_dir: Path) -> list[int]:
    """The version folders of a name's folder, ascending (entries that are not plain folders are not versions)."""
    try:
        entries = list(name_dir.iterdir())
    except OSError as err:
        raise StoreError(f"{name_dir}: cannot list the name's folder ({err.strerror or err})") from None
    return sorted(int(p.name) for p in entries if is_version(p.name) and p.is_dir() and not p.is_symlink())


def _commit_version(name_dir: Path, staged: Path, manifest: dict, tags: list[str], extra: dict) -> int:
    """Under the name's lock: number the staged copy, write its manifest (manifest: the source's, with the
    copy's checksums) and digest, rename it into place and move the tags. extra: keys to add to the
    manifest (parent, run_id). Returns the new version, or the one an earlier publish of the same
    run_id made (then nothing is placed)."""
    with _editing_tags(name_dir) as state:
        if extra.get("run_id") is not None:  # a concurrent publish of the same run may have won the race
            done = _version_of_run(name_dir, _stored_versions(name_dir), extra["run_id"])
            if done is not None:
                _complete_tags(state, tags, done)
                return done
        version = max([int(state["last_version"] or 0), *_stored_versions(name_dir)]) + 1
        final = {**manifest, "name": name_dir.name, "version": version, **extra}
        final[DIGEST_KEY] = MANIFEST_DIGEST
        write_json_atomic(staged / MANIFEST, final, mode=0o444)
        write_manifest_digest(staged)
        fsync_dir(staged)
        _place_version(staged, name_dir / str(version))
        fsync_dir(name_dir)
        state["last_version"] = version
        for tag in tags:
            tagfile.move_tag(state, tag, version)
    return version


class AdapterStore:
    """A store of versioned adapters in the folder root (default ``$ADAPTERKIT_STORE`` or ``cache_dir()/store``).

    Every method raises StoreError when the store refuses (unknown name, version or tag, invalid
    reference, failed verification, lock not obtained within LOCK_TIMEOUT_S seconds).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        if root is None:
            root = os.environ.get("ADAPTERKIT_STORE") or (cache_dir() / "store")
        path = user_path(root, "store root")
        if path.exists() and not path.is_dir():
            raise StoreError(f"store root {path} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
        self.root = path.resolve()

    def __repr__(self) -> str:
        return f"AdapterStore({str(self.root)!r})"

    # ------------------------------------------------------------ paths and state
    def _name_dir(self, name: str, create: bool = False) -> Path:
        check_name(name, "adapter name")
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

    def names(self) -> list[str]:
        """The adapter names in the store, sorted."""
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
        """The stored versions of a name, ascending."""
        return _stored_versions(self._name_dir(name))

    def tags(self, name: str) -> dict[str, int]:
        """{tag: version} of a name."""
        return dict(tagfile.read_state(self._name_dir(name))["tags"])

    # ------------------------------------------------------------ publish
    def publish(
        self,
        src_folder: str | os.PathLike,
        name: str,
        tags: Iterable[str] = (LATEST,),
        parent: str | AdapterRef | None = None,
        run_id: str | None = None,
    ) -> AdapterRef:
        """Copy an adapter folder (with its manifest.json) into the store as the name's next version.

        tags: set on the new version (moved if they pointed elsewhere); parent: the reference of the
        adapter this one continued from, recorded in its manifest. run_id: the publishing training
        run's id, recorded in the manifest; publishing the same run_id again returns the version it
        made (and completes its tags, should that publish have been killed before setting them)
        instead of adding one. Returns the version's ref. Raises StoreError for an invalid manifest,
        unpublishable files (check_publishable_files) or files that differ from the manifest's checksums.
        """
        name = check_name(name, "adapter name")
        tags = [check_tag(t) for t in (tags or ())]
        src = Path(src_folder)
        if not src.is_dir():
            raise StoreError(f"publish: {src} is not a folder")
        manifest = read_manifest(src)
        problems = manifest_problems(manifest, require_files=False)
        if problems:
            raise StoreError(f"publish: {src / MANIFEST} is invalid: {'; '.join(problems)}")
        check_publishable_files(src)
        name_dir = self._name_dir(name, create=False) if (self.root / name).exists() else None
        if run_id is not None and name_dir is not None:
            with _editing_tags(name_dir) as state:
                done = _version_of_run(name_dir, self.versions(name), run_id)
                if done is not None:
                    _complete_tags(state, tags, done)
                    return AdapterRef(name, done, name_dir / str(done))
        elif name_dir is not None:
            tagfile.read_state(name_dir)  # a damaged tags file refuses the publish before anything is copied
        extra = {"parent": str(parent)} if parent is not None else {}
        extra.update({"run_id": run_id} if run_id is not None else {})
        # Staged in the root, not the name's folder: a refused publish of a new name leaves no trace.
        with staging(self.root, ".publish-") as staged:
            copied = {**manifest, "files": _copy_adapter(src, staged, manifest.get("files") or {})}
            name_dir = self._name_dir(name, create=True)
            version = _commit_version(name_dir, staged, copied, tags, extra)
        log.info("published %s@%d to %s", name, version, self.root)
        return AdapterRef(name, version, name_dir / str(version))

    # ------------------------------------------------------------ resolving and loading
    def locate(self, ref: str) -> AdapterRef:
        """The stored version a name / name@version / name@tag reference points at."""
        name, selector = parse_ref(ref)
        name_dir = self._name_dir(name)
        # name@3 needs no tags: a damaged tags file leaves the name's versions reachable by number.
        tags = {} if selector is not None and is_version(selector) else tagfile.read_state(name_dir)["tags"]
        version = select_version(name, selector, self.versions(name), tags, self.root)
        return AdapterRef(name, version, name_dir / str(version))

    def resolve(self, ref: str | os.PathLike, verify: bool = True) -> tuple[Path, dict | None]:
        """(folder, manifest) of a reference. With verify, refuses a folder whose files fail their checksums.

        A plain folder without manifest.json (a bare peft folder) resolves with manifest None.
        """
        if is_path_ref(ref):
            folder = user_path(ref, "adapter folder")
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
            problems = _verify_version(located) if verify else []
        if problems:
            raise StoreError(f"adapter {where} failed verification, refusing to load it: {'; '.join(problems)}")
        return folder, manifest

    def verify(self, ref: str | None = None, notes: dict[str, str] | None = None) -> dict[str, list[str]]:
        """{reference: problems} for one reference or (ref None) every stored version; every file is hashed.

        notes: if given, receives {reference: note} for versions that pass but could not be fully
        checked (published before manifest digests existed).
        """
        if ref is not None:
            if is_path_ref(ref):
                return {str(ref): verify_folder_cached(Path(ref), recheck=True)}
            found = [self.locate(ref)]
        else:
            found = [AdapterRef(n, v, self.root / n / str(v)) for n in self.names() for v in self.versions(n)]
        report = {str(located): _verify_version(located, recheck=True) for located in found}
        for located in found:
            if notes is not None and not has_manifest_digest(located.path):
                notes[str(located)] = NO_DIGEST_NOTE
        return report

    # ------------------------------------------------------------ listing
    def list(self, name: str | None = None) -> list[dict]:
        """One row per stored version: name, version, tags, created_at, task, method, base, metrics.

        Damage never fails the listing: a version whose manifest cannot be read, a name whose tags
        file is damaged and a store entry that is no adapter folder each get a row with an "error" key.
        """
        if name is not None:
            self._name_dir(name)
        return list_rows(self.root, [name] if name else None)

    def show(self, ref: str) -> dict:
        """Everything about one reference: {"ref", "path", "tags", "manifest", "damaged"} (manifest None for a bare
        folder; damaged: the manifest digest's problems, empty when it matches)."""
        folder, manifest = self.resolve(ref, verify=False)
        out = {"ref": str(ref), "path": str(folder), "tags": [], "manifest": manifest}
        # The manifest's digest is one small file to hash: an edited manifest is never shown as valid.
        out["damaged"] = digest_problems(folder, manifest) if manifest is not None else []
        if not is_path_ref(ref):
            located = self.locate(ref)
            out["ref"] = str(located)
            try:
                out["tags"] = tagfile.tags_on(self.tags(located.name), located.version)
            except StoreError as err:  # name@3 stays showable when the name's tags file is damaged
                out["tags_error"] = str(err)
        return out

    def diff(self, ref_a: str, ref_b: str) -> dict:
        """What differs between two versions: {section: {dotted key: [a's value, b's value]}} (diff_manifests)."""
        _, a = self.resolve(ref_a, verify=False)
        _, b = self.resolve(ref_b, verify=False)
        return diff_manifests(a or {}, b or {})

    # ------------------------------------------------------------ tags
    def tag(self, ref: str, tag: str) -> AdapterRef:
        """Point tag at the version ref resolves to (moving it if it pointed elsewhere); returns that version."""
        tag = check_tag(tag)
        located = self.locate(ref)
        name_dir = self._name_dir(located.name)
        with _editing_tags(name_dir) as state:
            if located.version not in self.versions(located.name):
                raise StoreError(f"{located} was removed meanwhile")
            tagfile.move_tag(state, tag, located.version)
        return located

    promote = tag  # `promote model@4 prod` reads better in a release process; same operation

    def untag(self, name: str, tag: str) -> None:
        """Remove a tag and its history from a name."""
        tag = check_tag(tag)
        name_dir = self._name_dir(name)
        with _editing_tags(name_dir) as state:
            tagfile.remove_tag(state, name, tag)

    def rollback(self, name: str, tag: str = "prod") -> AdapterRef:
        """Move tag back to the version it pointed at before its last move; returns that version."""
        tag = check_tag(tag)
        name_dir = self._name_dir(name)
        with _editing_tags(name_dir) as state:
            version = tagfile.roll_back(state, name, tag, self.versions(name))
        return AdapterRef(name, version, name_dir / str(version))

    # ------------------------------------------------------------ removal
    def rm(self, ref: str, force: bool = False) -> AdapterRef:
        """Remove one version (name@version or name@tag); returns it.

        A version a tag points at is kept (StoreError) unless force, which drops those tags.
        """
        name, selector = parse_ref(ref)
        if selector is None:
            raise StoreError(f"rm needs a version: {name}@<version> or {name}@<tag>")
        located = self.locate(ref)
        name_dir = self._name_dir(name)
        with _editing_tags(name_dir) as state:
            pointing = tagfile.tags_on(state["tags"], located.version)
            if pointing and not force:
                raise StoreError(
                    f"{located} is tagged {', '.join(pointing)}; "
                    "move or remove the tag(s) first, or force the removal (--force)"
                )
            discard(located.path)
            tagfile.forget_version(state, located.version, self.versions(name))
        return located

    # ------------------------------------------------------------ export / import
    def export(self, ref: str, dest: str | os.PathLike) -> Path:
        """Write a verified version to dest: a folder, or an archive if dest ends in .tar.gz / .tgz.

        Returns dest. Raises StoreError when dest exists, or ref has no manifest or fails verification.
        """
        folder, manifest = self.resolve(ref, verify=True)
        if manifest is None:
            raise StoreError(f"export: {ref} has no manifest.json; only adapterkit adapters can be exported")
        label = f"{manifest.get('name') or folder.name}-{manifest.get('version') or 'folder'}"
        return write_export(folder, user_path(dest, "export destination"), label)

    def import_(self, src: str | os.PathLike, name: str | None = None, tags: Iterable[str] = (LATEST,)) -> AdapterRef:
        """Publish an exported folder or archive; name defaults to the one in its manifest.

        Returns the new version's ref. Raises StoreError for a missing source, an unsafe or
        malformed archive (archive.safe_extract), a manifest edited since export (its digest), or
        anything publish refuses; messages name files inside an archive as <archive>/<member>.
        """
        src = user_path(src, "import source")
        name = check_name(name, "adapter name") if name is not None else None
        tags = [check_tag(t) for t in tags]  # before extracting anything
        if src.is_dir():
            try:
                return _import_folder(self, src, name, tags, src)
            except StoreError as err:
                raise StoreError(_as_import_message(str(err))) from None
        if not src.is_file():
            raise StoreError(f"import: {src} does not exist")
        with staging(self.root, ".import-") as staged:
            try:
                safe_extract(src, staged)
                return _import_folder(self, adapter_root(staged, src), name, tags, src)
            except StoreError as err:  # the staging folder means nothing to the user: name the archive's member
                text = str(err).replace(f"{staged}{os.sep}", f"{src}: ").replace(str(staged), str(src))
                raise StoreError(_as_import_message(text)) from None

    # ------------------------------------------------------------ garbage collection
    def gc(self, keep: int | None = None, dry_run: bool = False) -> list[str]:
        """Remove leftovers of killed publishes/imports/removals, and with keep=N every untagged
        version older than each name's N newest. Returns what was (or, with dry_run, would be)
        removed, as paths relative to the root. Raises StoreError for a negative keep."""
        if keep is not None and keep < 0:
            raise StoreError(f"gc: keep must be >= 0, got {keep}")
        # Every name's tags first: a damaged tags file refuses gc --keep before anything is removed.
        tagged = {name: set(self.tags(name).values()) for name in self.names()} if keep is not None else {}
        removed = remove_leftovers(self.root, [self.root] + [self.root / n for n in self.names()], dry_run)
        if keep is not None:
            for name in tagged:
                for version in self.versions(name)[::-1][keep:]:
                    if version in tagged[name]:
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
