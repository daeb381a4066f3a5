"""Command line for the adapter store: list, show, diff, publish, tag, untag, promote, rollback, rm, verify,
export, import, gc.

Human-readable output by default, JSON with --json. Exit status: 0 ok, 1 when verify finds
problems, 2 when the store refuses the command (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from adapters.cli.main import guarded
from adapters.errors import AdapterkitError
from adapters.store.store import AdapterStore


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every store subcommand; --store and --json go before or after the subcommand."""
    # Shared options are accepted before or after the subcommand; SUPPRESS keeps a subcommand's
    # unset copy from overwriting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="store root (default: $ADAPTERKIT_STORE or <cache>/store)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")

    parser = argparse.ArgumentParser(
        prog="adapterkit store",
        parents=[common],
        description="Manage the versioned adapter store. References: name, name@3, name@prod, or a folder path.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = add("list", "list stored versions (all names, or one)")
    p.add_argument("name", nargs="?")
    p = add("show", "show one version's manifest")
    p.add_argument("ref")
    p = add("diff", "config, data and metric differences between two versions")
    p.add_argument("ref_a")
    p.add_argument("ref_b")
    p = add("publish", "publish an adapter folder (with manifest.json) as the name's next version")
    p.add_argument("folder")
    p.add_argument("name")
    p.add_argument("--tag", action="append", dest="tags", metavar="TAG", help="tag(s) to set (default: latest)")
    p.add_argument("--parent", help="reference of the adapter this one continued from")
    p = add("tag", "point a tag at a version (moves it if it exists)")
    p.add_argument("ref")
    p.add_argument("tag")
    p = add("untag", "remove a tag")
    p.add_argument("name")
    p.add_argument("tag")
    p = add("promote", "move a release tag (default prod) to a version")
    p.add_argument("ref")
    p.add_argument("tag", nargs="?", default="prod")
    p = add("rollback", "move a tag (default prod) back to its previous version")
    p.add_argument("name")
    p.add_argument("tag", nargs="?", default="prod")
    p = add("rm", "remove a version (refused while a tag points at it, unless --force)")
    p.add_argument("ref")
    p.add_argument("--force", action="store_true", help="remove even if tagged (drops those tags)")
    p = add("verify", "check every file's checksum (all versions, or the ones given)")
    p.add_argument("refs", nargs="*")
    p = add("export", "write a version to a new folder, or to a gzipped tar if DEST ends in .tar.gz or .tgz")
    p.add_argument("ref")
    p.add_argument("dest")
    p = add("import", "publish an exported folder or archive")
    p.add_argument("src")
    p.add_argument("--name", help="store it under this name (default: the name in its manifest)")
    p.add_argument("--tag", action="append", dest="tags", metavar="TAG", help="tag(s) to set (default: latest)")
    p = add("gc", "remove leftovers of interrupted publishes; with --keep N, untagged versions beyond the N newest")
    p.add_argument("--keep", type=int, metavar="N")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    return parser


@guarded
def main(argv: list[str] | None = None) -> int:
    """Run one store command (argv: the arguments, default sys.argv[1:]); prints its result, returns the exit status.

    0 ok, 1 when verify finds problems, 2 when the store refuses (AdapterkitError, or an OSError on a
    path: its one-line message is printed, as {"error": ...} with --json). argparse exits with 2 on
    unknown arguments. `list` exits 0 and reports damaged names and versions after the others.
    """
    args = build_parser().parse_args(argv)
    as_json = getattr(args, "json", False)
    try:
        store = AdapterStore(getattr(args, "store", None))
        result, text, status = COMMANDS[args.command](store, args)
    except (AdapterkitError, OSError) as err:  # OSError: the store root or a path given cannot be used
        message = f"{err.filename or 'store'}: {err.strerror or err}" if isinstance(err, OSError) else str(err)
        err = " ".join(message.splitlines())  # one line, whatever a message quotes
        if as_json:
            print(json.dumps({"error": str(err)}))
        else:
            print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str) if as_json else text)
    return status


# ---------------------------------------------------------------- commands: (store, args) -> (json, text, status)
def _list(store: AdapterStore, args) -> tuple[Any, str, int]:
    rows = store.list(args.name)
    table = [["NAME", "VERSION", "TAGS", "CREATED", "TASK", "METHOD", "BASE", "METRICS"]]
    damaged = [r for r in rows if "error" in r]
    for r in rows:
        if "error" in r:
            continue
        table.append(
            [
                r["name"],
                str(r["version"]),
                ",".join(r["tags"]) or "-",
                r["created_at"] or "-",
                r["task"] or "-",
                r["method"] or "-",
                r["base"] or "-",
                _metrics_line(r["metrics"]) or "-",
            ]
        )
    text = _table(table) if len(table) > 1 else f"(no adapters in {store.root})"
    for r in damaged:  # listed after the good rows: damage in one place never hides the rest
        name = r["name"] if r["name"].isprintable() else repr(r["name"])  # a newline would break the line
        where = f"{name}@{r['version']}" if r["version"] is not None else name
        text += f"\ndamaged  {where}: {r['error']}"
    return rows, text, 0


def _show(store, args):
    info = store.show(args.ref)
    m = info["manifest"] or {}
    base = m.get("base_model") or {}
    data = m.get("data") or {}
    method = m.get("method") or {}
    lines = [
        f"{info['ref']}  ({info['path']})",
        f"  tags:        {', '.join(info['tags']) or '-'}",
        f"  created:     {m.get('created_at')}",
        f"  task:        {m.get('task')}",
        f"  method:      {method.get('name')} {json.dumps(method.get('options') or {}, sort_keys=True)}",
        f"  base:        {base.get('name')} revision={base.get('revision')} {base.get('fingerprint')}",
        f"  tokenizer:   {base.get('tokenizer_fingerprint')}",
        f"  data:        {data.get('source')} {data.get('fingerprint')} "
        f"(train {data.get('num_train')}, validation {data.get('num_validation')}, test {data.get('num_test')})",
        f"  labels:      {m.get('labels')}",
        f"  metrics:     {_metrics_line(m.get('metrics') or {}) or '-'}",
        f"  parent:      {m.get('parent') or '-'}",
        f"  code:        {m.get('code_revision') or '-'}",
        f"  versions:    {', '.join(f'{k} {v}' for k, v in (m.get('versions') or {}).items() if v)}",
        f"  files:       {len(m.get('files') or {})} ({', '.join(sorted(m.get('files') or {}))})",
    ]
    if info.get("damaged"):  # right under the header: the fields below come from an edited manifest
        lines.insert(1, f"  DAMAGED:     {'; '.join(info['damaged'])}; the fields below cannot be trusted")
    if info["manifest"] is None:
        lines = [f"{info['path']}: a plain adapter folder without manifest.json"]
    return info, "\n".join(lines), 0


def _diff(store, args):
    changes = store.diff(args.ref_a, args.ref_b)
    lines = [f"--- {args.ref_a}", f"+++ {args.ref_b}"]
    for section, keys in changes.items():
        lines.append(f"{section}:")
        lines += [f"  {key}: {_short(a)} -> {_short(b)}" for key, (a, b) in keys.items()]
    if not changes:
        lines.append("(no differences in method, base, training, data, prompt or metrics)")
    return {"a": args.ref_a, "b": args.ref_b, "changes": changes}, "\n".join(lines), 0


def _publish(store, args):
    ref = store.publish(args.folder, args.name, tags=args.tags or ("latest",), parent=args.parent)
    return {"ref": str(ref), "path": str(ref.path)}, f"published {ref} ({ref.path})", 0


def _tag(store, args):
    ref = store.tag(args.ref, args.tag)
    return {"ref": str(ref), "tag": args.tag}, f"{ref.name}@{args.tag} -> version {ref.version}", 0


def _promote(store, args):
    ref = store.promote(args.ref, args.tag)
    return {"ref": str(ref), "tag": args.tag}, f"promoted {ref} to {args.tag}", 0


def _untag(store, args):
    store.untag(args.name, args.tag)
    return {"name": args.name, "untagged": args.tag}, f"removed tag {args.name}@{args.tag}", 0


def _rollback(store, args):
    ref = store.rollback(args.name, args.tag)
    return {"ref": str(ref), "tag": args.tag}, f"{ref.name}@{args.tag} rolled back to version {ref.version}", 0


def _rm(store, args):
    ref = store.rm(args.ref, force=args.force)
    return {"removed": str(ref)}, f"removed {ref}", 0


def _verify(store, args):
    report, notes = {}, {}
    for ref in args.refs or [None]:
        report.update(store.verify(ref, notes=notes))
    lines = []
    for ref, problems in report.items():
        note = f"  ({notes[ref]})" if ref in notes else ""
        lines.append(f"ok      {ref}{note}" if not problems else f"FAILED  {ref}")
        lines += [f"          {p}" for p in problems]
    bad = sum(1 for p in report.values() if p)
    lines.append(f"{len(report) - bad} ok, {bad} failed")
    return report, "\n".join(lines), 1 if bad else 0


def _export(store, args):
    dest = store.export(args.ref, args.dest)
    return {"ref": args.ref, "exported_to": str(dest)}, f"exported {args.ref} to {dest}", 0


def _import(store, args):
    ref = store.import_(args.src, name=args.name, tags=args.tags or ("latest",))
    return {"ref": str(ref), "path": str(ref.path)}, f"imported {args.src} as {ref}", 0


def _gc(store, args):
    removed = store.gc(keep=args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    text = "\n".join(f"{verb} {r}" for r in removed) or "nothing to remove"
    return {"removed": removed, "dry_run": args.dry_run}, text, 0


COMMANDS = {
    "list": _list,
    "show": _show,
    "diff": _diff,
    "publish": _publish,
    "tag": _tag,
    "untag": _untag,
    "promote": _promote,
    "rollback": _rollback,
    "rm": _rm,
    "verify": _verify,
    "export": _export,
    "import": _import,
    "gc": _gc,
}


# ---------------------------------------------------------------- formatting
def _metrics_line(metrics: dict) -> str:
    parts = []
    for k, v in sorted(metrics.items()):
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str, bool)) or v is None:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
