"""Exact replay (``datavalue.replay_influence``) and its results, read like a query's.

:func:`replay_influence` runs the replay engine of ``datavalue.capture`` (torch, imported on call)
and writes ``replay/<name>/scores`` ``(R, m)`` into the run: the exact first-order influence of
every occurrence (rows in the run's step-major order, restricted to the replay's step window) on
each of the ``m`` test points, with attributes naming the query, the run's manifest digest and step
count, and the replay's checks. :class:`ReplayResult` aggregates them ``by="sample" | "owner" |
"step"``, ranks them (:class:`TopK`) and writes Parquet with the same groupings, tables and files as
:class:`datavalue.Attributor`.

Example:
    >>> from datavalue.query import ReplayResult, replays
    >>> replays("runs/x.zarr")                                 # doctest: +SKIP
    ['default']
    >>> res = ReplayResult.open("runs/x.zarr")                  # doctest: +SKIP
    >>> res.top_k(5, by="sample").to_frame()                    # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datavalue.errors import QueryError, StoreExistsError, StoreMismatchError
from datavalue.query._groups import Grouping, grouping
from datavalue.query._results import TopK, occurrence_details, score_frame, write_parquet
from datavalue.query._stream import dense_top_k
from datavalue.store import Run, create_array, lock_run, manifest_digest, open_run

__all__ = ["REPLAY", "ReplayResult", "replay_influence", "replays"]

#: Group of a run holding the replays (``replay/<name>/scores``).
REPLAY = "replay"


def replays(run: Any) -> list[str]:
    """Names of the replays stored in a run (a path or an open ``Run``)."""
    run = run if isinstance(run, Run) else open_run(run)
    return [n for n in run.subgroups(REPLAY) if run.has_array(f"{REPLAY}/{n}/scores")]


class ReplayResult:
    """Exact replay scores ``(m, R)`` of the occurrences of a step window, with the queries' groupings.

    Attributes:
        run: the run.
        attrs: the replay's provenance (``description``, ``manifest_digest``, ``n_steps``, ``steps``,
            ``rows``, ``test_losses``, ``checks``: each checkpoint's replay deviation, ...).
        name: where it is stored (``replay/<name>``), or ``None`` if it was not written.
    """

    def __init__(self, run: Run | str | os.PathLike[str], scores: np.ndarray, attrs: dict[str, Any],
                 *, name: str | None = None) -> None:
        self.run = run if isinstance(run, Run) else open_run(run)
        self._scores = np.asarray(scores, dtype=np.float64)
        self.attrs = dict(attrs)
        self.name = name
        self.t0, self.t1 = (int(x) for x in self.attrs["steps"])
        self.r0, self.r1 = (int(x) for x in self.attrs["rows"])
        if self._scores.ndim != 2 or self._scores.shape[1] != self.r1 - self.r0:
            raise QueryError(f"replay scores have shape {self._scores.shape}; the window holds {self.r1 - self.r0} rows.")

    @classmethod
    def open(cls, run: Run | str | os.PathLike[str], name: str = "default") -> ReplayResult:
        """Read a stored replay; checks that the run is still the one it was computed on.

        Raises:
            StoreNotFoundError: no replay of that name (the message lists the stored ones).
            StoreMismatchError: the run's manifest or length changed since the replay.
        """
        from datavalue.errors import StoreNotFoundError

        run = run if isinstance(run, Run) else open_run(run)
        key = f"{REPLAY}/{name}/scores"
        if not run.has_array(key):
            raise StoreNotFoundError(f"{run.path} has no replay {name!r} (stored: {replays(run)}); compute it with "
                                     "datavalue.replay_influence(run, model, batches, query, loss_fn=...).")
        arr = run.array(key)
        foreign = run.foreign_derived(key, fix=(
            f"Recompute it: datavalue.replay_influence({str(run.path)!r}, model, batches, query, loss_fn=..., "
            f"name={name!r}, overwrite=True)."))
        if foreign is not None:
            raise StoreMismatchError(foreign)
        attrs = dict(arr.attrs)
        if attrs.get("manifest_digest") != manifest_digest(run.manifest) or int(attrs.get("n_steps", -1)) != run.n_steps:
            raise StoreMismatchError(
                f"{run.path}: replay {name!r} was computed on {attrs.get('n_steps')} steps of a run with manifest digest "
                f"{str(attrs.get('manifest_digest'))[:12]}; the run now has {run.n_steps} steps and digest "
                f"{manifest_digest(run.manifest)[:12]}. Recompute it (overwrite=True).")
        run.require_chunks(key, int(arr.shape[0]))
        return cls(run, np.asarray(arr[...]).T, attrs, name=name)

    def __repr__(self) -> str:
        return (f"ReplayResult({str(self.run.path)!r}, name={self.name!r}, steps={self.t0}..{self.t1}, "
                f"occurrences={self.n_rows}, test_points={self.n_test})")

    @property
    def n_rows(self) -> int:
        return self.r1 - self.r0

    @property
    def n_test(self) -> int:
        return int(self._scores.shape[0])

    @property
    def test_losses(self) -> np.ndarray:
        """``(m,)`` the query's losses at the final weights."""
        return np.asarray(self.attrs.get("test_losses", []), dtype=np.float64)

    @property
    def occurrences(self) -> pd.DataFrame:
        """The window's rows: ``step, epoch, sample_id, weight, lr, grad_scale``, indexed by global row."""
        return self._details(np.arange(self.r0, self.r1))

    def _details(self, rows: np.ndarray) -> pd.DataFrame:
        return occurrence_details(self.run, rows)

    def _grouping(self, by: Any, owners: Any, unowned: str) -> Grouping:
        g = grouping(self.run, by, owners, unowned, self.t0, self.t1)
        if (g.start, g.stop) != (self.r0, self.r1):
            raise QueryError(f"replay rows {self.r0}..{self.r1} do not match the run's steps {self.t0}..{self.t1}.")
        return g

    def labels(self, by: str | None = None, *, owners: Any = None, unowned: str = "raise") -> np.ndarray:
        """Labels of the columns of :meth:`scores` (as :meth:`datavalue.Attributor.labels`)."""
        return self._grouping(by, owners, unowned).labels

    def scores(self, *, by: str | None = None, owners: Any = None, unowned: str = "raise") -> np.ndarray:
        """``(m, n_columns)`` float64: per occurrence (``by=None``), or summed per sample, owner or step
        (the first-order influence of removing all of them). Positive = helpful."""
        g = self._grouping(by, owners, unowned)
        if g.by is None:
            return self._scores.copy()
        out = np.zeros((self.n_test, g.n_columns))
        keep = g.groups >= 0
        np.add.at(out.T, g.groups[keep], self._scores.T[keep])
        return out

    def top_k(self, k: int = 10, *, by: str | None = None, owners: Any = None, unowned: str = "raise") -> TopK:
        """The ``k`` most helpful and most harmful columns per test point (:class:`TopK`)."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise QueryError(f"k must be a positive int, got {k!r}.")
        g = self._grouping(by, owners, unowned)
        if g.n_columns == 0:
            raise QueryError("the selection has no columns (every sample dropped).")
        hv, hi, lv, li = dense_top_k(self.scores(by=by, owners=owners, unowned=unowned), int(k))
        details = None
        if g.by is None:
            details = self._details(np.unique(np.concatenate([g.labels[hi].ravel(), g.labels[li].ravel()])))
        return TopK(g.by, g.labels[hi], hv, g.labels[li], lv, details)

    def frame(self, *, by: str | None = None, owners: Any = None, unowned: str = "raise") -> pd.DataFrame:
        """Scores as a wide table (one row per column label, ``test_<i>`` columns), as ``Attributor.frame``."""
        g = self._grouping(by, owners, unowned)
        details = self._details(g.labels) if g.by is None else None
        if g.by == "step":
            details = pd.DataFrame({"epoch": self.run.epoch[g.labels], "lr": self.run.lr[g.labels]})
        return score_frame(self.scores(by=by, owners=owners, unowned=unowned), g.labels, g.by, details)

    def save_parquet(self, path: str | os.PathLike[str], *, by: str | None = None, owners: Any = None,
                     unowned: str = "raise", top_k: int | None = None, overwrite: bool = False) -> Path:
        """Write :meth:`frame` (or, with ``top_k``, :meth:`top_k`'s table) to Parquet; refuses to overwrite by default."""
        if top_k is not None:
            return self.top_k(top_k, by=by, owners=owners, unowned=unowned).to_parquet(path, overwrite=overwrite)
        return write_parquet(self.frame(by=by, owners=owners, unowned=unowned), path, overwrite=overwrite)


def replay_influence(
    run: Any,
    model: Any,
    batches: Any,
    query: Callable[[Any], Any],
    *,
    loss_fn: Callable[[Any, Any], Any],
    name: str = "default",
    description: str | None = None,
    steps: tuple[int, int] | None = None,
    dots: str = "reverse",
    clipping: str = "norm",
    collate: Callable[[list[Any]], Any] | None = None,
    tolerance: float | None = None,
    write: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> Any:
    """Exact first-order influence of every recorded occurrence on a query, by replaying the run.

    Args:
        run: a run recorded with ``Recorder(..., optimizer=opt, checkpoint_every=N)`` (path or ``Run``).
        model: the architecture (its weights are never changed: every step's are substituted
            functionally from the checkpoints).
        batches: ``batches(ids) -> batch`` rebuilding a step's batch from its sample ids (in that
            order), or a dataset indexable by sample id (its items are collated with ``collate``,
            default ``torch.utils.data.default_collate``).
        query: ``query(model) -> (m,)`` per-test-point losses at the final weights (``m`` small:
            each test point costs one double backward and one JVP per step).
        loss_fn: ``loss_fn(model, batch) -> (b,)`` the per-example losses whose weighted sum with
            the run's weights (``run.weight``: ``1/b`` for a mean, 1 for a sum, ``tokens(z) /
            tokens(B)`` for ``token_mean``) is the loss that was stepped on.
        name: the results go to ``replay/<name>/`` in the run.
        description: stored with the results (what the query is).
        steps: ``(t0, t1)`` only the occurrences of these steps (the adjoint is still carried
            from the end); default all. Half-open like ``range``; negative ends count from the end;
            an end past the run or an empty window is refused (as ``Attributor.scores(steps=...)``).
        dots: how the per-example dot products are taken without per-sample gradients:
            ``"reverse"`` (default; per-example multipliers differentiated in the double backward,
            no extra pass) or ``"jvp"`` (a forward-mode JVP of the loss vector per query and step;
            about twice the time on a tiny GPT-2). Both give the same numbers.
        clipping: ``"norm"`` (clip_grad_norm_: the coefficient's derivative is kept) or
            ``"constant"`` (the recorded coefficient is a fixed factor).
        tolerance: accepted deviation of a forward replay from the next checkpoint, relative to
            the interval's movement (default 1e-8 for float64 weights, 1e-3 for float32).
        write: store the results in the run (``overwrite`` to replace a replay of the same name).

    Returns:
        :class:`ReplayResult`: ``scores(by=None | "sample" | "owner" | "step")``
        ``(m, columns)``, ``top_k``, ``frame``, ``save_parquet``; ``S[i, r] ~= loss_i(without
        occurrence r) - loss_i(with it)``, positive = helpful.

    Raises:
        datavalue.capture.ReplayError: no final checkpoint, an unsupported optimizer, bad arguments.
        datavalue.capture.ReplayMismatchError: a forward replay does not reproduce the next checkpoint.

    Example:
        >>> import datavalue                                                             # doctest: +SKIP
        >>> res = datavalue.replay_influence("run.zarr", model, lambda ids: (X[ids], Y[ids]),
        ...     lambda m: F.cross_entropy(m(x_test), y_test, reduction="none"),
        ...     loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))  # doctest: +SKIP
        >>> res.top_k(k=5, by="sample").to_frame()                                      # doctest: +SKIP
    """
    from datavalue.capture import replay_scores

    run = run if isinstance(run, Run) else open_run(run)
    if write:  # refuse before the work, not after it
        _check_name(name)
        if run.has_array(f"{REPLAY}/{name}/scores") and not overwrite:
            raise StoreExistsError(f"{run.path} already holds replay {name!r}; pass overwrite=True or another name=.")
    out = replay_scores(run, model, batches, query, loss_fn=loss_fn, steps=steps, dots=dots, clipping=clipping,
                        collate=collate, tolerance=tolerance, progress=progress)
    attrs = {"description": description or getattr(query, "__name__", "query"), "n_steps": int(run.n_steps),
             "manifest_digest": _digest(run), "steps": list(out["steps"]), "rows": list(out["rows"]),
             "test_losses": out["test_losses"].tolist(), "checks": {str(k): v for k, v in out["checks"].items()},
             "dots": dots, "clipping": clipping, "tolerance": out["tolerance"], "optimizer": out["optimizer"],
             "seconds": out["seconds"], "sign": "loss(without) - loss(with); positive = helpful"}
    if write:
        _write(run.path, name, out["scores"], attrs, overwrite)
    return ReplayResult(run, out["scores"].T, attrs, name=name if write else None)


def _digest(run: Run) -> str:
    return manifest_digest(run.manifest)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise QueryError(f"name must be a plain name (no '/'), got {name!r}.")


def _write(path: Any, name: str, scores: np.ndarray, attrs: dict[str, Any], overwrite: bool) -> None:
    rows = max(1, scores.shape[0])
    with lock_run(path, "replay_influence"):  # one writer per run (datavalue.store.lock_run)
        arr = create_array(path, f"{REPLAY}/{name}/scores", shape=scores.shape, dtype="float64",
                           chunks=(min(rows, 1 << 16), max(1, scores.shape[1])), attrs=attrs, overwrite=overwrite)
        arr[...] = scores
