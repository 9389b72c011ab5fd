"""One exception tree for cooperative games and royalties.

Every class derives from :class:`ShapleyError` (itself a :class:`datavalue.errors.DataValueError`,
the root of the package-wide tree) *and* from the builtin a caller would naturally catch (``ValueError``, ``FileNotFoundError``, ``FileExistsError``, ``OSError``, ``KeyError``), so both
``except ShapleyError`` and ``except ValueError`` work. Messages follow the pattern
"what was expected / what we got / how to fix it".

To extend: subclass the closest class here, never raise a bare builtin from library code.
"""

from __future__ import annotations

from datavalue.errors import DataValueError

__all__ = [
    "CacheMismatchError",
    "InvalidGameError",
    "InvalidPoolError",
    "InvalidValuesError",
    "LedgerError",
    "LedgerNotFoundError",
    "NoPositiveContributionError",
    "OutputExistsError",
    "OutputPathError",
    "PolicyError",
    "ReplayMismatchError",
    "ShapleyError",
    "TooManyPlayersError",
    "UnknownOwnerError",
    "UtilityError",
]


class ShapleyError(DataValueError):
    """Root of every error raised by :mod:`datavalue.shapley`."""


class InvalidGameError(ShapleyError, ValueError):
    """A game is ill-specified: bad player count, coalition, partition or estimator setting."""


class TooManyPlayersError(InvalidGameError):
    """Exact enumeration was asked for more players than it can afford."""


class InvalidValuesError(ShapleyError, ValueError):
    """Values (contributions, utilities, shares) are not finite or have the wrong shape."""


class UtilityError(ShapleyError, ValueError):
    """The user's utility function returned something that is not a finite float."""


class CacheMismatchError(ShapleyError, ValueError):
    """An on-disk utility cache cannot be used: written for a different game (players or
    fingerprint), not a utility cache at all, or held open by another writer (``<cache>.lock``)."""


class InvalidPoolError(ShapleyError, ValueError):
    """A royalty pool is negative, not finite, a float, or finer than the currency quantum."""


class PolicyError(ShapleyError, ValueError):
    """An unknown royalty policy, or an attempt to overwrite a registered one."""


class NoPositiveContributionError(ShapleyError, ValueError):
    """A strict policy was asked to split a pool where no owner contributed positively."""


class LedgerError(ShapleyError, ValueError):
    """A ledger file is corrupt, tampered with, or used inconsistently."""


class ReplayMismatchError(LedgerError):
    """Replaying a ledger row from its stored utilities does not reproduce the stored split."""


class LedgerNotFoundError(ShapleyError, FileNotFoundError):
    """A ledger (or registry) file that should exist does not."""


class OutputExistsError(ShapleyError, FileExistsError):
    """A report or registry file already exists and ``overwrite`` was not set."""


class OutputPathError(ShapleyError, OSError):
    """A report or registry path that cannot be written: it lies inside a datavalue run, under a
    regular file, or the OS refused the write (the message gives its reason). An ``OSError``, as
    the raw error such a write raised before."""


class UnknownOwnerError(ShapleyError, KeyError):
    """An owner or work id is not in the owner registry."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""
