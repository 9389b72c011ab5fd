"""Columns of a query: which rows are selected, and how they are grouped.

A query selects the occurrence rows of a step window (rows are step-major, so a window is one
contiguous row range) and groups them:

========== ================================= =========================================
``by``     columns                           label of a column
========== ================================= =========================================
``None``   every occurrence in the window    global row index (``attr.occurrences``)
``sample`` samples seen in the window        sample id, sorted
``owner``  owners of those samples           owner (sorted when the owners sort)
``step``   steps of the window               step index
========== ================================= =========================================

:func:`parse_*` validate user input once; :class:`Grouping` is trusted afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from datavalue.errors import QueryError

BY = (None, "sample", "owner", "step")
UNOWNED = ("raise", "drop", "group")


@dataclasses.dataclass(frozen=True)
class Grouping:
    """Selected rows ``[start, stop)`` and, unless ``by`` is None, a group index per selected row.

    Attributes:
        by: ``None``, ``"sample"``, ``"owner"`` or ``"step"``.
        start, stop: the row range of the step window.
        groups: ``(stop - start,)`` int64 group of every row (``-1``: left out), or None for ``by=None``.
        labels: ``(n_columns,)`` label of every output column.
    """

    by: str | None
    start: int
    stop: int
    groups: np.ndarray | None
    labels: np.ndarray

    @property
    def n_columns(self) -> int:
        return int(self.labels.shape[0])


def parse_by(by: Any) -> str | None:
    if by in ("occurrence", "occurrences", "row"):
        return None
    if by not in BY:
        raise QueryError(f"by must be one of None/'occurrence', 'sample', 'owner' or 'step', got {by!r}.")
    return by


def parse_steps(steps: Any, n_steps: int) -> tuple[int, int]:
    """``(t0, t1)`` half-open step window; ``None`` ends are open; negative indices count from the end; an end
    past the run (beyond ``n_steps`` or ``-n_steps``) is refused, never clipped; an empty or reversed window
    (``t1 <= t0`` once resolved) is refused. ``datavalue.capture._replay._parse_steps`` applies the same rule."""
    if steps is None:
        return 0, n_steps
    if isinstance(steps, slice):
        if steps.step not in (None, 1):
            raise QueryError("a steps slice cannot have a stride; pass steps=(t0, t1).")
        steps = (steps.start, steps.stop)
    try:
        t0, t1 = steps
    except (TypeError, ValueError):
        raise QueryError(f"steps must be a pair (t0, t1) (half-open, like range), got {steps!r}.") from None
    for end in (t0, t1):
        if end is not None and (isinstance(end, (bool, np.bool_)) or not isinstance(end, (int, np.integer))):
            raise QueryError(f"steps must be a pair of int step indices (t0, t1) (None for an open end), got "
                             f"{steps!r} ({type(end).__name__} {end!r}); pass e.g. steps=(1, 3).")
    for end in (t0, t1):  # negative ends count from the end (like range); past either end is an error, not clipped
        if end is not None and not -n_steps <= end <= n_steps:
            raise QueryError(f"steps={steps!r} reaches past the run's steps 0..{n_steps - 1} (ends may lie in "
                             f"-{n_steps}..{n_steps}; negative ones count from the end); nothing is clipped.")
    t0, t1, _ = slice(t0, t1).indices(n_steps)
    if t1 <= t0:  # an empty window answers nothing: refused like a reversed one, never an (m, 0) matrix
        raise QueryError(f"steps={steps!r} is empty or reversed (steps {t0}..{t1 - 1}; half-open, like range); the "
                         f"run has steps 0..{n_steps - 1}: pass t0 < t1, e.g. steps=({t0}, {t0 + 1}).")
    return t0, t1


def _sorted_labels(values: list[Any]) -> list[Any]:
    uniq = list(dict.fromkeys(values))
    try:
        return sorted(uniq)
    except TypeError:  # owners of mixed types: keep first-appearance order
        return uniq


def parse_owners(owners: Any, sample_ids: np.ndarray, unowned: str) -> tuple[np.ndarray, np.ndarray]:
    """Owner of every unique sample id.

    Args:
        owners: a mapping ``sample_id -> owner`` (dict, pandas Series), a callable
            ``owner(sample_id)``, or a sequence aligned with ``sample_ids``. ``None`` means unowned.
        sample_ids: ``(n,)`` sorted unique sample ids of the run.
        unowned: ``"raise"``, ``"drop"`` (leave those samples out) or ``"group"`` (one owner ``None``).

    Returns:
        ``(labels, index)``: the owners (sorted when they sort) and ``(n,)`` int64 index of each
        sample's owner in ``labels`` (``-1`` when dropped).
    """
    if unowned not in UNOWNED:
        raise QueryError(f"unowned must be one of {UNOWNED}, got {unowned!r}.")
    if owners is None:
        raise QueryError("by='owner' needs owners=: a mapping sample_id -> owner, a callable, or an array aligned with "
                         "attr.labels(by='sample').")
    if hasattr(owners, "to_dict") and hasattr(owners, "index"):  # pandas Series indexed by sample id
        owners = owners.to_dict()
    if isinstance(owners, Mapping):
        vals = [owners.get(int(s)) for s in sample_ids]
    elif callable(owners):
        vals = [owners(int(s)) for s in sample_ids]
    else:
        arr = np.asarray(owners, dtype=object)
        if arr.ndim != 1 or arr.shape[0] != sample_ids.shape[0]:
            raise QueryError(
                f"owners given as a sequence must align with the run's {sample_ids.shape[0]} unique sample ids "
                f"(attr.labels(by='sample')), got shape {arr.shape}. Pass a dict sample_id -> owner instead."
            )
        vals = [v.item() if isinstance(v, np.generic) else v for v in arr]
    missing = [i for i, v in enumerate(vals) if v is None]
    if missing and unowned == "raise":
        ids = sample_ids[missing[:5]].tolist()
        raise QueryError(
            f"{len(missing)} sample(s) have no owner (e.g. ids {ids}). Give them one, or pass unowned='drop' to leave "
            "them out or unowned='group' to collect them under the owner None."
        )
    present = [v for v in vals if v is not None]
    labels = _sorted_labels(present)
    if missing and unowned == "group":
        labels = labels + [None]
    pos = {v: i for i, v in enumerate(labels)}
    index = np.array([pos[v] if (v is not None or unowned == "group") else -1 for v in vals], dtype=np.int64)
    out = np.empty(len(labels), dtype=object)
    out[:] = labels
    if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present) and not missing:
        out = out.astype(np.int64)
    elif present and all(isinstance(v, str) for v in present) and unowned != "group":
        out = out.astype(str)
    return out, index


def regroup(groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the groups that occur: ``(present (p,), new index per row with -1 kept)``."""
    valid = groups >= 0
    present = np.flatnonzero(np.bincount(groups[valid], minlength=n_groups))
    remap = np.full(n_groups, -1, dtype=np.int64)
    remap[present] = np.arange(present.size)
    out = np.where(valid, remap[np.where(valid, groups, 0)], -1)
    return present, out


OwnersArg = Mapping[Any, Any] | Callable[[int], Any] | np.ndarray | list[Any] | None


def grouping(run: Any, by: Any, owners: Any, unowned: str, t0: int, t1: int,
             samples: tuple[np.ndarray, np.ndarray] | None = None) -> Grouping:
    """How the rows of steps ``t0 .. t1 - 1`` of ``run`` fold into columns for ``by`` (``None``,
    ``"sample"``, ``"owner"``, ``"step"``). ``samples``: ``np.unique(run.sample_id,
    return_inverse=True)`` when the caller keeps it (computed here otherwise)."""
    by = parse_by(by)
    r0, r1 = int(run.step_ptr[t0]), int(run.step_ptr[t1])
    if by is None:
        return Grouping(None, r0, r1, None, np.arange(r0, r1))
    if by == "step":
        return Grouping("step", r0, r1, run.row_step[r0:r1] - t0, np.arange(t0, t1))
    uniq, inv = samples if samples is not None else np.unique(run.sample_id, return_inverse=True)
    if by == "sample":
        present, groups = regroup(inv[r0:r1], uniq.size)
        return Grouping("sample", r0, r1, groups, uniq[present])
    labels, owner_of = parse_owners(owners, uniq, unowned)
    present, groups = regroup(owner_of[inv[r0:r1]], labels.size)
    return Grouping("owner", r0, r1, groups, labels[present])
