"""The package's architecture, checked: imports only flow downward between layers, and no god objects.

Layers, lowest first (a module may import its own layer and the ones below it, never one above):
core (errors, paths, constants, distributed, the package root) < methods < config < data < modeling
< evaluation < store < serving < monitoring < serving.http < training < benchmarking < cli.
Imports under ``if TYPE_CHECKING:`` are annotations only and exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adapters"

LAYERS = [
    ("adapters", "adapters.errors", "adapters.paths", "adapters.constants", "adapters.distributed"),
    ("adapters.methods",),
    ("adapters.config",),
    ("adapters.data",),
    ("adapters.modeling",),
    ("adapters.evaluation",),
    ("adapters.store",),
    ("adapters.serving",),
    ("adapters.monitoring",),
    ("adapters.serving.http",),
    ("adapters.training",),
    ("adapters.benchmarking",),
    ("adapters.cli",),
]
MAX_FUNCTION_LINES = 120
MAX_CLASS_LINES = 300


def layer_of(module: str) -> int:
    """The rank of the most specific layer prefix that owns `module` (e.g. serving.http over serving)."""
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            owns = module == prefix or (prefix != "adapters" and module.startswith(prefix + "."))
            if owns and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    return 0 if best is None else best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imported_modules(path: Path, here: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every `adapters.*` import in the file, outside TYPE_CHECKING blocks.

    `here` is the file's module name (default: from its place under adapters/).
    """
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    here = here or module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "adapters"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.split(".")[0] == "adapters":
                # `from adapters.x import y` may name a submodule y: judge the deeper name when it is one
                for alias in node.names:
                    sub = f"{name}.{alias.name}"
                    is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
                        PACKAGE.parent / sub.replace(".", "/") / "__init__.py"
                    ).is_file()
                    found.append((node.lineno, sub if is_module else name))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_layer_table_covers_every_subpackage():
    for init in PACKAGE.glob("*/__init__.py"):
        name = module_name(init)
        assert any(name in prefixes for prefixes in LAYERS), f"{name} has no layer in LAYERS"


def upward_imports(path: Path, here: str | None = None) -> list[str]:
    here = here or module_name(path)
    return [
        f"{here}:{line} imports {target} (layer {layer_of(target)} > {layer_of(here)})"
        for line, target in imported_modules(path, here)
        if layer_of(target) > layer_of(here)
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_flow_downward(path):
    upward = upward_imports(path)
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_layer_check_catches_upward_imports(tmp_path):
    """The check itself: lazy, relative and `from package import module` forms are all caught."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from adapters.errors import ConfigError\n"  # downward: fine
        "from . import fingerprint\n"  # same layer: fine
        "def f():\n"
        "    from adapters.training.loop import train\n"  # lazy and upward
        "    from ..serving import engine\n"  # relative and upward
        "    import adapters.cli.main\n"
    )
    found = upward_imports(probe, here="adapters.store.probe")
    assert [line.split(" imports ")[1].split(" ")[0] for line in found] == [
        "adapters.training.loop",
        "adapters.serving.engine",
        "adapters.cli.main",
    ]
    assert (
        layer_of("adapters.serving.http.app") > layer_of("adapters.monitoring.reference") > layer_of("adapters.serving")
    )


def oversized(paths) -> list[str]:
    """Functions over MAX_FUNCTION_LINES and classes over MAX_CLASS_LINES, as 'file:line kind name N lines'."""
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if lines > limit:
                    out.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} {lines} lines")
    return out


def test_no_god_functions_or_classes():
    assert not oversized(SOURCES), "over the size limits:\n" + "\n".join(oversized(SOURCES))


if __name__ == "__main__":  # `python tests/test_layers.py`: print the largest functions and classes
    sizes = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                sizes.append(
                    (node.end_lineno - node.lineno + 1, kind, f"{path.relative_to(PACKAGE.parent)}:{node.name}")
                )
    for kind, limit in (("function", MAX_FUNCTION_LINES), ("class", MAX_CLASS_LINES)):
        top = sorted((s for s in sizes if s[1] == kind), reverse=True)[:5]
        print(f"largest {kind}s (limit {limit}): " + ", ".join(f"{name} {n}" for n, _, name in top))
    print(f"over the limits: {len(oversized(SOURCES))}")
