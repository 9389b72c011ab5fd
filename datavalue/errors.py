"""One exception tree for the whole package.

Every class also inherits the builtin a caller would naturally catch (``ValueError``,
``FileExistsError``, ...), so ``except ValueError`` keeps working. Messages say what was
expected, what came, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "DataValueError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "StoreMismatchError",
    "StoreCorruptError",
    "StoreReadOnlyError",
    "StoreLockedError",
    "RecorderError",
    "RecorderStateError",
    "CaptureError",
    "UnsupportedModelError",
    "NonFiniteError",
    "EmbeddingError",
    "CurvatureUnavailableError",
    "ModelMismatchError",
    "QueryError",
]


class DataValueError(Exception):
    """Base class of every error raised on purpose by datavalue."""


class StoreError(DataValueError):
    """Something is wrong with a run store on disk."""


class StoreExistsError(StoreError, FileExistsError):
    """The target path already holds data and neither ``resume`` nor ``overwrite`` was given."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No run store (or no array of that name) at the given path."""


class StoreMismatchError(StoreError, ValueError):
    """A store was written with a configuration that differs from the one now in use."""


class StoreCorruptError(StoreError, OSError):
    """A chunk failed its checksum or the store's metadata is unreadable."""


class StoreReadOnlyError(StoreError, PermissionError):
    """A write was attempted through a read-only view."""


class StoreLockedError(StoreError, RuntimeError):
    """Another writer (a live process, or one on another host) holds the run's ``writer.lock``."""


class RecorderError(DataValueError, ValueError):
    """Bad input given to the recorder (ids, lr, options)."""


class RecorderStateError(DataValueError, RuntimeError):
    """The recorder was used out of order (nested steps, no backward, after close)."""


class CaptureError(DataValueError, RuntimeError):
    """Per-sample gradients could not be captured for a module."""


class UnsupportedModelError(DataValueError, TypeError):
    """The model cannot be recorded (e.g. no trainable parameters)."""


class NonFiniteError(DataValueError, FloatingPointError):
    """NaN or Inf met in gradients, curvature or embeddings."""


class EmbeddingError(DataValueError, RuntimeError):
    """The embedding build failed or was asked for something inconsistent."""


class CurvatureUnavailableError(EmbeddingError, ValueError):
    """The run lacks what the requested curvature needs (e.g. ``fisher`` without pseudo-gradients)."""


class ModelMismatchError(DataValueError, ValueError):
    """The model given to a query does not match the recorded run's fingerprint."""


class QueryError(DataValueError, ValueError):
    """Bad arguments to an attribution query."""
