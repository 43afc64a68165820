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


class ComplexInputError(InputError):
    """A complex array or tensor where a real one is needed (it is refused, never cast to its real part)."""


class NotOrthonormalError(InputError):
    """A basis whose columns were required to be orthonormal and are not."""


class DecompositionError(InputError):
    """A matrix decomposition (SVD, eigensolver, ARPACK) failed on an input; the message names the input."""


class ToleranceError(ThreegateError, ValueError):
    """A programming error: a check was built with a tolerance that is not a finite number >= 0."""


class CheckpointError(ThreegateError, OSError):
    """A checkpoint that is missing, truncated, pickle-based, or otherwise unreadable."""


class ConfigError(InputError):
    """A config file or sweep spec with a value of the wrong type, an unknown key or an unknown preset."""


class MissingExtraError(ThreegateError, ImportError):
    """An optional dependency a requested feature needs is not installed; the message names the extra to install."""
