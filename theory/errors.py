"""Errors with messages that name the problem (which input, which tensor, which file)."""

from __future__ import annotations


class ThreegateError(Exception):
    """Base class: every error the project raises on bad input derives from it."""


class InputError(ThreegateError, ValueError):
    """An input that no result can be evaluated on (wrong type, wrong rank, unsupported dtype)."""


class NonFiniteError(InputError):
    """NaN or Inf in an input."""


class ShapeMismatchError(InputError):
    """Two inputs that must have equal shapes (or names) do not."""


class ZeroGapError(InputError):
    """A spectral gap that is zero or negative where a positive one is needed."""


class CheckpointError(ThreegateError, OSError):
    """A checkpoint that is missing, truncated, pickle-based, or otherwise unreadable."""


class ConfigError(InputError):
    """A config file or sweep spec with a value of the wrong type, an unknown key or an unknown preset."""


class MissingExtraError(ThreegateError, ImportError):
    """An optional dependency a requested feature needs is not installed; the message names the extra to install."""
