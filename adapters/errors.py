"""Errors raised to users: each names what was wrong and what would be valid."""


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
