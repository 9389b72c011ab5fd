"""The values a run's readers scale and score with, checked as the recorder checks them on write.

The recorder refuses a negative or non-finite learning rate, a negative or non-finite row weight
and (unless ``on_nonfinite='skip'``, which stores zeros and flags the row) a non-finite gradient.
A run read back may still hold them: written before the chunk digests (``datavalue.store._digest``),
by another writer, or edited through zarr. Builds and the ``tracin`` / ``grad_dot`` queries apply
the same rules when they read, naming the step and row, so a value the recorder refuses is never
built on or scored. (A finite lr, however large, passes: ``rec.step(lr=1e30)`` is accepted too; a
score it makes overflow is refused by :func:`refuse_nonfinite_scores`.)

Cost: the per-step and per-row arrays are read once per run (they are cached); gradient rows are
judged by the scores computed from them (``(rows, m)``, one sum per chunk), not re-read.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from datavalue.errors import NonFiniteError

_FIX = ("The run was edited, or written by another tool: restore it from a whole copy of its directory, or "
        "re-record it.")


def _step_of(step_ptr: np.ndarray, row: int) -> int:
    return int(np.searchsorted(step_ptr, row, side="right")) - 1


def check_step_values(run: Any, *, error: type[Exception], rows: bool = True) -> None:
    """Raise ``error`` naming the first step whose ``lr`` or ``grad_scale`` is negative or not
    finite, or (``rows``) the first row whose weight is negative or not finite.

    ``run``: an open :class:`~datavalue.store.Run` (its committed ``lr``, ``grad_scale``, ``weight``).
    """
    for name, what in (("lr", "learning rate"), ("grad_scale", "gradient scale (clipping coefficient)")):
        v = np.asarray(getattr(run, name), dtype=np.float64)
        bad = np.flatnonzero(~(np.isfinite(v) & (v >= 0)))
        if bad.size:
            t = int(bad[0])
            raise error(
                f"{run.path}: step {t} has {what} {float(v[t])!r} ({bad.size} step(s) like it); a step's {name} must be finite "
                f"and non-negative, as the recorder requires, so nothing was built or scored from it. {_FIX}"
            )
    if not rows:
        return
    w = np.asarray(run.weight, dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0)))
    if bad.size:
        r = int(bad[0])
        raise error(
            f"{run.path}: step {_step_of(run.step_ptr, r)}, row {r} has weight {float(w[r])!r} ({bad.size} row(s) like it); "
            f"row weights must be finite and non-negative, as the recorder requires, so nothing was built or scored "
            f"from them. {_FIX}"
        )


class RowCheck(NamedTuple):
    """What :func:`refuse_nonfinite_scores` needs to name a row: the run, the array, its step pointers."""

    path: str
    array: str
    step_ptr: np.ndarray


def refuse_nonfinite_scores(check: RowCheck, rows: np.ndarray, scores: np.ndarray, start: int) -> None:
    """Raise :class:`~datavalue.errors.NonFiniteError` when a score of ``scores`` ``(n, m)``, computed
    from ``rows`` ``(n, k)`` (rows ``start .. start + n`` of ``check.array``), is not finite: a
    non-finite stored row, or a finite one whose scale made its score overflow. The test vectors are
    checked finite before (so a non-finite score comes from the row)."""
    if np.isfinite(np.sum(scores)) or np.isfinite(scores).all():  # one reduction; entrywise only on overflow
        return
    i = int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])
    r, t = start + i, _step_of(check.step_ptr, start + i)
    if not np.isfinite(rows[i]).all():
        raise NonFiniteError(
            f"{check.path}: step {t}, row {r}: non-finite values in {check.array} (the recorder stores a non-finite "
            f"gradient only as a flagged row of zeros, with on_nonfinite='skip'), so nothing was scored. {_FIX}"
        )
    raise NonFiniteError(
        f"{check.path}: step {t}, row {r}: its score overflowed (the row is finite; its learning rate, gradient scale "
        f"or weight is too large to score in {scores.dtype}), so nothing was scored. Check the run's lr of step {t}."
    )
