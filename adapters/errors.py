"""Errors raised to users: each names what was wrong and what would be valid.

``user_message`` turns such an error, and the few library errors that only bad input causes (a YAML
syntax error, bytes that are not UTF-8, a data file the ``datasets`` library cannot parse, a pydantic
validation error, an OS error on a path the user named), into the one line the CLI prints.
"""

from __future__ import annotations


class AdapterkitError(Exception):
    """Base class for errors this toolkit raises on purpose."""


class ConfigError(AdapterkitError):
    """A config key, value or combination that cannot work. Raised before any model loads.

    Not a ValueError on purpose: pydantic would swallow it into a ValidationError.
    """


class StoreError(AdapterkitError):
    """The adapter store refused an operation (bad name, missing version, checksum mismatch...)."""


class BaseMismatchError(StoreError):
    """An adapter was asked to load on a base model other than the one it was trained on."""


def one_line(text: str, limit: int = 2000) -> str:
    """`text` with every run of whitespace (newlines included) turned into one space, cut to `limit` chars."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _classes(err: BaseException) -> set[str]:
    # Matched by "module.Name" so this core module never imports yaml, datasets or pydantic.
    return {f"{c.__module__}.{c.__name__}" for c in type(err).__mro__}


def yaml_problem(err: BaseException) -> str:
    """'<problem> (line L, column C)' of a yaml.MarkedYAMLError (1-based), else its text."""
    problem = getattr(err, "problem", None) or str(err)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    context = getattr(err, "context", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return one_line(f"{context + ': ' if context else ''}{problem}{where}")


def user_message(err: BaseException) -> str | None:
    """The one-line message for an error bad input causes, or None for one that is a bug.

    AdapterkitError: its own text. yaml.YAMLError, UnicodeDecodeError, datasets' DatasetGenerationError
    (its cause), pydantic's ValidationError (every problem, ``loc: msg``) and an OSError that names a
    file (``file: reason``) are described from their fields.
    """
    names = _classes(err)
    if isinstance(err, AdapterkitError):
        return one_line(str(err))
    if "yaml.error.YAMLError" in names:
        return f"not valid YAML: {yaml_problem(err)}"
    if isinstance(err, UnicodeDecodeError):
        bad = err.object[err.start : err.start + 1].hex() if err.object else "?"
        return f"not UTF-8 text: byte 0x{bad} at offset {err.start}"
    if "datasets.exceptions.DatasetGenerationError" in names:
        cause = err.__cause__ or err.__context__
        inner = user_message(cause) if cause is not None else None
        return f"a data file could not be read: {inner or one_line(str(cause or err))}"
    if "pydantic_core._pydantic_core.ValidationError" in names:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors()]  # type: ignore[attr-defined]
        return one_line("; ".join(problems))
    if isinstance(err, OSError) and err.filename is not None:
        return one_line(f"{err.filename}: {err.strerror or err}")
    return None
