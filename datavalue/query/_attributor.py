"""The query facade: which recorded training occurrences made the model do this?

``Attributor(run, model)`` pairs a recorded run (and its built embeddings) with the model at the
weights to explain. A query is a per-example loss ``loss_fn(model) -> (m,)``; its test gradients
``q`` ``(m, k)`` are taken with the run's own capture hooks and projection (the model's fingerprint
is checked against the run's), and the scores are

    S = q @ E.T        (m, R):  S[i, r] ~= loss_i(without occurrence r) - loss_i(with it)

positive = the occurrence helped test point ``i``. ``E`` is read from the run in row chunks through
dask and never held in memory whole; aggregated queries (``by="sample"``, ``"owner"``, ``"step"``)
and top-k never form ``S`` either. See ``docs/queries.md``.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import torch
from torch import nn

from datavalue._memory import check_memory, parse_max_memory
from datavalue.capture import engine_for_run, per_sample_gradients, unwrap_model, weights_mismatch
from datavalue.errors import NonFiniteError, QueryError
from datavalue.query import _identity, _stream
from datavalue.query._groups import Grouping, grouping, parse_by, parse_steps
from datavalue.query._lossfn import query_gradients
from datavalue.query._results import (
    TopK,
    dataset_values,
    describe,
    occurrence_details,
    score_frame,
    write_parquet,
)
from datavalue.query._source import Source, resolve_source
from datavalue.store import (
    RowCheck,
    Run,
    check_step_values,
    check_workers_see_run,
    fast_rows,
    open_run,
    stale_final_pass,
)

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module], torch.Tensor]
#: Default size of one streamed chunk of embeddings (rounded to whole storage chunks).
CHUNK_BYTES = 16 << 20
REDUCE = (None, "mean", "sum")


class Attributor:
    """Attribution queries against a recorded run, streamed out of core.

    Args:
        path: the run (``*.zarr``) recorded by :class:`datavalue.Recorder`.
        model: the model at the weights to explain (usually the final weights), same architecture
            as recorded; its fingerprint is checked here. May be None if every query passes test
            gradients ``(m, k)`` instead of a loss function.
        curvature: which embedding build to use; None picks ``"hessian"`` if built, else ``"fisher"``,
            else ``"empirical_fisher"``, else the only one present.
        embeddings: ``"grads"`` to score with the raw recorded gradients, or the name of an array
            inside the run (e.g. ``"embeddings/fisher/at/100/values"`` from ``embeddings_at``).
        kind: ``"dvemb"`` (built embeddings, default), ``"grad_dot"`` (raw gradients),
            ``"tracin"`` (``lr[t] * grad_scale[t] * weight * grads``; with param groups of different
            lr each column is weighted by its group's lr, see ``_column_scale``) or ``"influence"``
            (the final model's influence function from the run's final-weights pass:
            :class:`datavalue.capture.FinalPass` then :func:`datavalue.embeddings.build_influence`;
            its columns are the pass's examples, each once, and ``curvature=`` picks the build).
        client: a ``dask.distributed.Client`` or a local scheduler name (``"threads"``,
            ``"synchronous"``); None uses dask's threaded scheduler.
        chunk_rows: embedding rows per streamed chunk; default about 16 MiB, whole storage chunks.
            Peak memory is a few chunks (per worker thread) plus the output.
        progress: show progress bars.
        max_memory: bytes (or ``"8 GiB"``) a query may hold at once: its result (``(m, R)`` scores
            of every occurrence, ``(m, groups)`` sums), the streamed chunks of every worker thread
            and the test gradients. A query whose estimate exceeds it (default: the available
            memory; ``DATAVALUE_MEMORY_CHECK=0`` skips that) is refused before it reads the run.

    Example:
        >>> attr = Attributor("runs/x.zarr", model)                                  # doctest: +SKIP
        >>> S = attr.scores(lambda m: F.cross_entropy(m(x), y, reduction="none"))     # doctest: +SKIP
        >>> S.shape == (len(x), len(attr.occurrences))                               # doctest: +SKIP
        True
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        *,
        curvature: str | None = None,
        embeddings: str | None = None,
        kind: str | None = None,
        client: Any = None,
        chunk_rows: int | None = None,
        progress: bool = True,
        max_memory: int | str | None = None,
    ) -> None:
        wrapped, model = model, _parse_model(model)  # DDP / DataParallel / torch.compile: the module inside
        self.max_memory = parse_max_memory(max_memory, QueryError)
        self.run: Run = open_run(path)
        if model is not wrapped and model is not None:  # unless the run recorded the wrapper's prefixed names
            model = unwrap_model(wrapped, recorded=(self.run.manifest.get("model_fingerprint") or {}).get("params"))
        self._training_run = self.run  # replays (replay/<name>) live in the training run
        if kind == "influence":  # the final model's influence: the columns are the final pass's examples
            self.run = _final_pass(self.run)  # same fingerprint and capture plan as the run (FinalPass checked)
        elif self.run.is_final_pass:
            raise QueryError(_final_pass_as_trajectory(self.run, kind))
        self.path = self.run.path
        self.model = model
        self._engine = engine_for_run(model, self.run.manifest) if model is not None else None
        self.source: Source = resolve_source(self.run, curvature=curvature, embeddings=embeddings, kind=kind)
        if self.n_rows == 0:
            raise QueryError(f"{self.path} has no committed occurrences to attribute to.")
        if model is not None and self.kind in ("dvemb", "influence"):  # defined at the run's (final) weights
            steps = self._training_run.n_steps if self.kind == "influence" else self.n_steps
            off = weights_mismatch(model, self._training_run, steps)
            if off is not None:
                logger.warning("%s", off)
        self.client = client
        # the tasks read the run by its absolute path (Run.path); every worker must see this very run there
        check_workers_see_run(client, self.run.path, self.run.run_id, "Attributor(client=)'s scoring tasks")
        self.chunk_rows = _parse_chunk_rows(chunk_rows, self.source.array)
        # streamed queries read the chunk files directly when the layout is the run's plain one
        self._rows = fast_rows(self.source.array, required_rows=self.n_rows)  # a chunk deleted since: an error, not zeros
        # the run and build the scores come from: labels and lazy reads refuse another one at the path (P7-02)
        self._stamp = self._read_stamp()
        # the recorded values tracin / grad_dot score with, checked as the recorder checks them (P5-04)
        if self.kind == "tracin":
            check_step_values(self.run, error=QueryError)
        self._row_check = RowCheck(str(self.path), "grads", self.run.step_ptr) if self.kind in ("tracin", "grad_dot") else None
        self.progress = bool(progress)

    def __repr__(self) -> str:
        return (f"Attributor({str(self.path)!r}, kind={self.kind!r}, curvature={self.curvature!r}, "
                f"steps={self.n_steps}, occurrences={self.n_rows}, k={self.run.proj_dim})")

    # ------------------------------------------------------------------ what the columns are
    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def curvature(self) -> str | None:
        return self.source.curvature

    @property
    def n_steps(self) -> int:
        """Steps covered by the embeddings (the run's, or a checkpoint's)."""
        return self.source.n_steps

    @property
    def n_rows(self) -> int:
        """Occurrences covered: the columns of ``scores(..., by=None)``."""
        return int(self.run.step_ptr[self.n_steps])

    @functools.cached_property
    def occurrences(self) -> pd.DataFrame:
        """``(R,)`` table aligned with the columns of ``scores(..., by=None)``.

        Columns ``step, epoch, sample_id, weight, lr, grad_scale``; the index is the row. Refused once
        the run at the path is another run (P7-02), as :meth:`labels`.
        """
        self._require_same_run("occurrences")
        return self._details(np.arange(self.n_rows))

    def _details(self, rows: np.ndarray) -> pd.DataFrame:
        return occurrence_details(self.run, rows)

    @functools.cached_property
    def _samples(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique sample ids of the covered rows (sorted) and the inverse index of every row."""
        uniq, inv = np.unique(self.run.sample_id[: self.n_rows], return_inverse=True)
        return uniq, inv.astype(np.int64)

    def _grouping(self, by: Any, owners: Any, unowned: str, steps: Any) -> Grouping:
        t0, t1 = parse_steps(steps, self.n_steps)
        return grouping(self.run, by, owners, unowned, t0, t1, self._samples if parse_by(by) in ("sample", "owner") else None)

    def labels(self, by: str | None = None, *, owners: Any = None, unowned: str = "raise", steps: Any = None) -> np.ndarray:
        """Labels of the columns that :meth:`scores` returns for the same ``by/owners/unowned/steps``.

        ``by=None``: global row indices (index into :attr:`occurrences`); ``"sample"``: sample ids
        (sorted); ``"owner"``: owners; ``"step"``: step indices.
        """
        self._require_same_run("labels")
        return self._grouping(by, owners, unowned, steps).labels

    # ------------------------------------------------------------------ test gradients
    def test_gradients(self, loss_fn: LossFn) -> np.ndarray:
        """``(m, k)`` projected gradients of ``loss_fn(model)`` (``(m,)`` per-example losses) in the run's layout."""
        if self._engine is None:
            raise QueryError("this Attributor has no model; pass Attributor(path, model) to query with a loss function, "
                             "or pass test gradients (m, k) directly.")
        try:
            return query_gradients(self.model, loss_fn, lambda checked: per_sample_gradients(
                self.model, checked, self.run, engine=self._engine))  # QueryErrors stating what a loss_fn must be
        except RuntimeError as exc:
            if "dtype" not in str(exc) and "scalar type" not in str(exc).lower():
                raise
            dtypes = sorted({str(p.dtype).replace("torch.", "") for p in self.model.parameters()})
            raise QueryError(
                f"loss_fn failed on the model, whose parameters are {'/'.join(dtypes)} (the run was recorded in "
                f"{self.run.manifest.get('capture_dtype', 'float32')}): {exc}. Cast the test inputs to the model's "
                "dtype inside loss_fn (e.g. m(x.to(next(m.parameters()).dtype))), or query with the model as it was "
                "recorded (model.float())."
            ) from exc

    def _query(self, query: LossFn | np.ndarray | torch.Tensor) -> np.ndarray:
        if callable(query) and not isinstance(query, (np.ndarray, torch.Tensor)):
            q = self.test_gradients(query)
        else:
            try:
                q = query.detach().cpu().numpy() if torch.is_tensor(query) else np.asarray(query)
            except (TypeError, ValueError) as exc:  # a (x, y) batch, ragged lists: not a query
                raise QueryError(
                    f"a query is a loss function model -> (m,) losses or test gradients of shape (m, {self.run.proj_dim}); "
                    f"got a {type(query).__name__} that is neither ({exc}). For a batch (x, y), pass "
                    "lambda m: loss(m(x), y, reduction='none')."
                ) from None
            if q.ndim == 1:
                q = q[None, :]
            if q.ndim != 2 or q.shape[1] != self.run.proj_dim or not np.issubdtype(q.dtype, np.floating):
                raise QueryError(
                    f"a query is a loss function model -> (m,) losses or test gradients of shape (m, {self.run.proj_dim}); "
                    f"got {describe(q)} of dtype {q.dtype}."
                )
        if q.shape[0] == 0:
            given = ("loss_fn returned an empty tensor" if callable(query) and not isinstance(query, (np.ndarray, torch.Tensor))
                     else f"the test gradients given have shape {tuple(q.shape)}")
            raise QueryError(f"the query has no test points ({given}). Pass at least one test point.")
        if not np.isfinite(q).all():
            bad = np.flatnonzero(~np.isfinite(q).all(1))[:5].tolist()
            raise NonFiniteError(f"test gradients of test points {bad} contain NaN/Inf; check those losses.")
        dt = _stream.compute_dtype(self._rows.dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # scored in dt: a float64 value past its range is inf there
            fits = np.isfinite(np.asarray(self._weighted(q), dtype=dt)).all(1)
        if not fits.all():  # P9-04: was scored as inf and NaN, silently
            bad = np.flatnonzero(~fits)[:5].tolist()
            big = float(np.abs(q[bad[0]]).max())
            raise NonFiniteError(
                f"test gradients of test points {bad} are finite but too large for {dt} (largest entry {big:.3g}; "
                f"{dt} holds up to {float(np.finfo(dt).max):.3g}), the dtype the run's {self._rows.dtype} rows are "
                "scored in: their scores would be inf or NaN. Check those losses (a loss scaled by a huge factor?), "
                "or scale the test gradients down and the scores back up.")
        return q

    def _check_memory(self, m: int, g: Grouping, result: str | None, top: int = 0) -> None:
        """Refuse a query whose peak (its result, the streamed chunks, the test gradients) cannot fit.

        ``result``: ``"occurrences"`` (an ``(m, rows)`` score matrix), ``"groups"`` (``(m, groups)``
        float64 sums, accumulated then densified) or None (the ``top`` best and worst of occurrences:
        small partials per chunk).
        """
        k, rows = int(self.run.proj_dim), g.stop - g.start
        chunk = min(self.chunk_rows, max(rows, 1))
        n_chunks = -(-max(rows, 1) // chunk)
        item = np.result_type(self.source.array.dtype, np.float32).itemsize  # rows as read and scored
        # chunks being read (one per thread, two windows) and the per-chunk results of two windows in flight
        reads = min(2 * _stream.n_threads(self.client), n_chunks) * chunk * k * item
        # what each chunk's task returns: its top and bottom (at most the chunk's rows), its groups' sums, or its scores
        partial = {None: 4 * 16 * m * min(top, chunk), "groups": m * 8 * min(chunk, g.n_columns)}.get(result, chunk * m * 8)
        window = _stream._window(self.client, partial)
        parts = {"test gradients": m * k * 8, "streamed chunks": reads + min(2 * window, n_chunks) * partial}
        if result == "occurrences":
            parts[f"the ({m}, {rows}) score matrix"] = m * rows * item
        elif result == "groups":
            parts[f"the ({m}, {g.n_columns}) sums by {g.by}"] = 2 * m * g.n_columns * 8
        if top:  # top_k() was refused: not "use top_k()"; nor lazy=, which it has not
            fixes = "query fewer test points per call, a step window (steps=), a smaller k, or a smaller chunk_rows="
        else:
            fixes = ("query fewer test points per call, a step window (steps=), aggregates (by='sample', 'owner', 'step') "
                     "or top_k() instead of every occurrence's score, lazy=True (a dask array), or a smaller chunk_rows=")
        check_memory(sum(parts.values()), what="this query", parts=parts, error=QueryError, max_memory=self.max_memory,
                     fixes=fixes)

    # ------------------------------------------------------------------ lazy pieces
    def _read_stamp(self) -> _identity.RunStamp:
        return _identity.read_stamp(self.source.array.store, str(self.path), self.source.array_name)

    def _require_same_run(self, what: str) -> None:
        """Refuse when the run at the path is no longer the one this Attributor opened (P7-02)."""
        _identity.refuse_changed(self._stamp, self._read_stamp(), self.n_rows, what, source="this Attributor opened",
                                 labels=False)

    def _embeddings(self, start: int, stop: int) -> da.Array:
        """Rows ``start:stop`` as a dask array whose chunk reads check the run's identity and every chunk's
        presence and checksum, as eager queries do (P7-05: a deleted chunk read as zeros)."""
        rows = _identity.CheckedRows(self._rows, self.source.array.store, self._stamp, self.n_rows)
        return da.from_array(rows, chunks=(self.chunk_rows, rows.shape[1]), asarray=False, fancy=False, lock=False,
                             name=f"datavalue-rows-{uuid.uuid4().hex}", meta=np.empty((0, 0), rows.dtype))[start:stop]

    def _row_scale(self, start: int, stop: int) -> np.ndarray | None:
        if self.kind != "tracin":
            return None
        run, steps = self.run, self.run.row_step[start:stop]
        scale = run.lr[steps] * run.grad_scale[steps] * run.weight[start:stop]
        return -scale if self._ascent else scale

    @functools.cached_property
    def _ascent(self) -> bool:
        """Whether the run stepped with ``maximize=True`` (gradient ascent: a step moved the weights along
        ``+lr g``, so TracIn's "loss lowered by the step" takes the other sign); refused when the param
        groups disagree."""
        opt = self.run.optimizer or {}
        flags = {bool(g.get("maximize", False)) for g in opt.get("groups") or []} or {bool(opt.get("maximize", False))}
        if len(flags) > 1:
            raise QueryError(
                f"{self.path}: some param groups of the recorded optimizer stepped with maximize=True (gradient ascent) "
                "and some without; kind='tracin' takes one sign per run. Use datavalue.replay_influence, which models "
                "each group's."
            )
        return flags.pop()

    @functools.cached_property
    def _column_scale(self) -> np.ndarray | None:
        """TracIn with param groups: ``(k,)`` each column's lr relative to group 0's, or ``None``.

        TracIn weighs a step's gradient by its lr; with groups of different lrs that is a per-column
        weight ``lr_g(t) / lr_0(t)`` on top of the row scale ``lr_0(t) c w``, folded into the query's
        columns. Exact while every group's lr keeps a fixed ratio to group 0's (one scheduler for all
        groups, the usual case); otherwise refused rather than mis-weighted.
        """
        run = self.run
        hp = run.param_groups if self.kind == "tracin" and run.has_param_groups else None
        if hp is None:
            return None
        T = self.n_steps
        lr = hp["lr"][:T]
        if lr.shape[1] <= 1 or np.all(lr == lr[:, :1]):
            return None
        entry = run.column_groups or {}
        runs = entry.get("column_groups")
        live = lr[:, 0] != 0
        ratio = lr[live].max(axis=0) / lr[live, 0].max() if live.any() else np.ones(lr.shape[1])
        if not runs or not np.allclose(lr, lr[:, :1] * ratio[None, :], rtol=1e-9, atol=0.0):
            raise QueryError(
                f"{run.path}: the param groups' learning rates do not keep fixed ratios to group 0's over the run "
                f"(or the manifest lacks projection['param_groups']), so TracIn's per-step lr weighting differs per "
                "column and step. Query the data value embeddings instead (build_embeddings uses every group's lr per "
                "step), or score the groups' columns separately."
            )
        scale = np.ones(int(run.proj_dim))
        blocks = {b["name"]: b for b in run.blocks}
        for a, b, grp in runs:
            scale[int(a) : int(b)] = ratio[int(grp)] if grp >= 0 else 0.0  # -2: parameters no group updates
        for name, groups in (entry.get("mixed_blocks") or {}).items():
            vals = {float(ratio[g]) for g in groups if g >= 0}
            if len(vals) > 1:
                raise QueryError(f"{run.path}: projected block {name!r} mixes param groups {groups} of different lr; "
                                 "TracIn cannot weight its columns. Re-record with proj_dim=None.")
            scale[int(blocks[name]["start"]) : int(blocks[name]["stop"])] = vals.pop() if vals else 0.0
        return scale

    def _weighted(self, q: np.ndarray) -> np.ndarray:
        scale = self._column_scale
        return q if scale is None else q * scale[None, :]

    def _lazy_scores(self, q: np.ndarray, g: Grouping) -> da.Array:
        """``(rows, m)`` lazy scores over the checked chunk reads of :meth:`_embeddings` (``lazy=True`` results)."""
        return _stream.score_rows(self._weighted(q), self._embeddings(g.start, g.stop), self._row_scale(g.start, g.stop),
                                  check=self._row_check, start=g.start)

    def _chunks(self, q: np.ndarray, g: Grouping) -> _stream.ChunkTasks:
        """Independent per-chunk score tasks over the selected rows (eager, streamed queries)."""
        q = self._weighted(q)
        return _stream.ChunkTasks(self._rows, q, g.start, g.stop, chunk_rows=self.chunk_rows,
                                  row_scale=self._row_scale(g.start, g.stop), client=self.client, check=self._row_check)

    # ------------------------------------------------------------------ queries
    def scores(
        self,
        query: LossFn | np.ndarray,
        *,
        by: str | None = None,
        owners: Any = None,
        unowned: str = "raise",
        steps: Any = None,
        lazy: bool = False,
    ) -> np.ndarray | da.Array:
        """Influence of training occurrences (or samples, owners, steps) on every test point.

        ``S[i, j] ~= loss_i(without j) - loss_i(with j)``: positive = ``j`` helped test point ``i``.

        Args:
            query: ``loss_fn(model) -> (m,)`` per-example losses (``reduction="none"``), or test
                gradients ``(m, k)`` already in the run's layout.
            by: ``None`` (one column per occurrence), ``"sample"`` (summed over each sample's
                occurrences: the estimate for removing the sample from every epoch), ``"owner"``
                (summed over an owner's samples), ``"step"`` (summed over each step's batch).
            owners: for ``by="owner"``: a mapping ``sample_id -> owner``, a callable, or an array
                aligned with ``labels(by="sample")``.
            unowned: samples without owner: ``"raise"``, ``"drop"``, or ``"group"`` (owner ``None``).
            steps: ``(t0, t1)`` half-open step window; only occurrences of those steps count.
            lazy: return a dask array instead of computing.

        Returns:
            ``(m, n_columns)``: float32 for occurrences (float64 embeddings stay float64), float64
            for aggregates. Column labels: :meth:`labels` with the same arguments.
        """
        if not isinstance(lazy, (bool, np.bool_)):  # lazy="no" is truthy: a dask array the caller did not ask for
            raise QueryError(f"lazy must be True or False, got {lazy!r} ({type(lazy).__name__}).")
        q = self._query(query)
        g = self._grouping(by, owners, unowned, steps)
        self._require_same_run("scores")
        if lazy:
            rows = self._lazy_scores(q, g)
            if g.by is None:
                return rows.T
            out = _stream.grouped_sums(rows, g.groups, g.n_columns)
            return da.from_delayed(out, shape=(q.shape[0], g.n_columns), dtype=np.float64)
        self._check_memory(q.shape[0], g, "occurrences" if g.by is None else "groups")
        if g.by is None:
            out = _stream.stream_blocks(self._chunks(q, g), client=self.client, progress=self.progress, desc="scores")
        else:
            out = self._grouped(q, g, f"scores by {g.by}")
        return self._remember(out, g)

    # what scores() returned (weakly held): frame()/save_parquet()/to_dataset() refuse them under another by=
    _ISSUED_MAX = 16

    def _remember(self, out: Any, g: Grouping) -> Any:
        _identity.remember(out, self._stamp, self.n_rows)
        issued = [e for e in getattr(self, "_issued", []) if e[0]() is not None][-(self._ISSUED_MAX - 1):]
        try:
            issued.append((weakref.ref(out), g.by, g.start, g.stop, g.n_columns))
        except TypeError:  # not weak-referenceable: nothing to remember
            pass
        self._issued = issued
        return out

    def _provenance(self, scores: np.ndarray) -> list[tuple[str | None, int, int, int]]:
        """``(by, start, stop, n_columns)`` of each :meth:`scores` result that ``scores`` is: the same
        object or a view of it (e.g. some of its test points), else equal values (empty when it is
        none of them)."""
        same, equal = [], []
        for ref, *key in reversed(getattr(self, "_issued", [])):
            got = ref()
            if got is None or np.ndim(got) != 2 or np.shape(got)[1] != scores.shape[1]:
                continue
            if got is scores or np.may_share_memory(got, scores):  # the result or some of its test points
                same.append(tuple(key))
            elif np.shape(got) == scores.shape and np.array_equal(got, scores, equal_nan=True):
                equal.append(tuple(key))
        return same or equal  # type: ignore[return-value]

    def _grouped(self, q: np.ndarray, g: Grouping, desc: str) -> np.ndarray:
        """``(m, n_groups)`` float64 sums of the scores by group, streamed."""
        if g.n_columns == 0 or g.stop == g.start:
            return np.zeros((q.shape[0], g.n_columns))
        groups = g.groups
        chunks = self._chunks(q, g).with_reduce(_stream.segment_chunk, lambda a, b: (groups[a:b],))
        # the result is dense (m, n_groups) anyway: accumulate into it from the start (no sparse merges)
        acc = (None, np.zeros((q.shape[0], g.n_columns)))
        part = _stream.stream_reduce(chunks, _stream.combine_segments, client=self.client, progress=self.progress,
                                     desc=desc, partial_bytes=self.chunk_rows * q.shape[0] * 8, n_groups=g.n_columns,
                                     init=acc)
        return _stream.densify(part, g.n_columns)

    def top_k(
        self,
        query: LossFn | np.ndarray,
        k: int = 10,
        *,
        by: str | None = None,
        owners: Any = None,
        unowned: str = "raise",
        steps: Any = None,
    ) -> TopK:
        """The ``k`` most helpful and ``k`` most harmful columns per test point, streamed.

        For occurrences (``by=None``) every chunk keeps only its own top and bottom ``k`` per test
        point; for aggregates the sums are streamed first (``(m, n_groups)`` in memory), then ranked.
        Arguments as in :meth:`scores`. Returns :class:`TopK` (``.to_frame()``, ``.to_parquet()``).
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise QueryError(f"k must be a positive int, got {k!r}.")
        q = self._query(query)
        g = self._grouping(by, owners, unowned, steps)
        if g.n_columns == 0:
            raise QueryError("the selection has no columns (empty step window or every sample dropped).")
        self._require_same_run("top_k")
        k = min(int(k), g.n_columns)  # k above the columns: all of them, ranked (P7-04: before the estimate)
        self._check_memory(q.shape[0], g, None if g.by is None else "groups", top=k)
        if g.by is None:
            chunks = self._chunks(q, g).with_reduce(_stream.topk_chunk, lambda a, b: (a, int(k)))
            part = _stream.stream_reduce(chunks, _stream.combine_top_k, client=self.client, progress=self.progress,
                                         desc="top-k", partial_bytes=4 * 16 * q.shape[0] * int(k), k=int(k))
            hv, hi, lv, li = _stream.finalize_top_k(part, int(k))
        else:
            hv, hi, lv, li = _stream.dense_top_k(self._grouped(q, g, f"top-k by {g.by}"), int(k))
        details = None
        if g.by is None:
            details = self._details(np.unique(np.concatenate([g.labels[hi].ravel(), g.labels[li].ravel()])))
        return TopK(g.by, g.labels[hi], hv, g.labels[li], lv, details)

    def stage_influence(
        self,
        query: LossFn | np.ndarray,
        *,
        normalize_by_lr: bool = True,
        steps: Any = None,
        lazy: bool = False,
    ) -> np.ndarray | da.Array:
        """``(m, T)`` influence of each step's batch: the sum over the step's occurrences.

        With ``normalize_by_lr`` it is divided by ``lr[t]`` (NaN where ``lr[t] == 0``), the
        per-batch influence of the paper's phase analysis (warm-up / basin / late ascent). Without
        it, the row sums equal the sums of ``scores(query)`` over the same window. Column labels:
        ``labels(by="step", steps=steps)``.
        """
        S = self.scores(query, by="step", steps=steps, lazy=lazy)
        if not normalize_by_lr:
            return S
        t0, t1 = parse_steps(steps, self.n_steps)
        lr = self.run.lr[t0:t1]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(lr != 0, 1.0 / np.where(lr != 0, lr, 1.0), np.nan)
        return S * inv[None, :]

    def replay(self, name: str = "default") -> Any:
        """The exact scores of a stored :func:`datavalue.replay_influence` of this run (``replay/<name>``),
        as a :class:`datavalue.query.ReplayResult`: the same ``scores(by=...)``, ``labels``, ``top_k``,
        ``frame`` and ``save_parquet`` as this Attributor, for the replay's test points. Refused when
        the run changed since the replay (``StoreMismatchError``)."""
        from datavalue.query._replay import ReplayResult

        return ReplayResult.open(self._training_run, name)

    # ------------------------------------------------------------------ tables and datasets
    def frame(self, scores: np.ndarray, *, by: str | None = None, owners: Any = None, unowned: str = "raise",
              steps: Any = None) -> pd.DataFrame:
        """Scores as a wide table: one row per column label, one ``test_<i>`` column per test point.

        Pass the same ``by/owners/unowned/steps`` that produced ``scores``. For occurrences the
        rows carry ``row, step, epoch, sample_id, weight, lr, grad_scale``.
        """
        g = self._grouping(by, owners, unowned, steps)
        scores = self._check_columns(scores, g, "frame / save_parquet")
        details = self._details(g.labels) if g.by is None else None
        if g.by == "step":
            details = pd.DataFrame({"epoch": self.run.epoch[g.labels], "lr": self.run.lr[g.labels]})
        return score_frame(scores, g.labels, g.by, details)

    def save_parquet(self, scores: np.ndarray | TopK, path: str | os.PathLike[str], *, by: str | None = None,
                     owners: Any = None, unowned: str = "raise", steps: Any = None, overwrite: bool = False) -> Path:
        """Write scores (see :meth:`frame`) or a :class:`TopK` result to Parquet; refuses to overwrite by default."""
        if isinstance(scores, TopK):
            return scores.to_parquet(path, overwrite=overwrite)
        return write_parquet(self.frame(scores, by=by, owners=owners, unowned=unowned, steps=steps), path,
                             overwrite=overwrite)

    def to_dataset(
        self,
        scores: np.ndarray | LossFn,
        dataset: Any,
        *,
        id_column: str = "id",
        prefix: str = "influence",
        reduce: str | None = None,
        by: str | None = "sample",
        steps: Any = None,
        fill_value: float = float("nan"),
    ) -> Any:
        """Add score columns to a ``datasets.Dataset``, matched on the sample id in ``id_column``.

        Args:
            scores: ``scores(..., by="sample")`` (or ``by=None`` occurrence scores with ``by=None``
                here: they are summed per sample), or a loss function to compute them.
            dataset: a ``datasets.Dataset`` whose ``id_column`` holds the run's sample ids.
            prefix: column names ``<prefix>_<i>`` per test point, or ``<prefix>`` with ``reduce``.
            reduce: ``"mean"`` or ``"sum"`` over test points: one column instead of ``m``.
            fill_value: for examples the run never trained on (default NaN).

        Returns:
            A new dataset with the columns added.
        """
        if reduce not in REDUCE:
            raise QueryError(f"reduce must be one of {REDUCE}, got {reduce!r}.")
        if callable(scores) and not isinstance(scores, np.ndarray):
            scores, by = self.scores(scores, by="sample", steps=steps), "sample"
        by = parse_by(by)
        if by not in (None, "sample"):
            raise QueryError(f"to_dataset matches rows by sample id; pass scores by='sample' (or by=None), not {by!r}.")
        g = self._grouping(by, None, "raise", steps)
        scores = self._check_columns(scores, g, "to_dataset")
        if by is None:  # occurrences -> samples
            gs = self._grouping("sample", None, "raise", steps)
            summed = np.zeros((scores.shape[0], gs.n_columns))
            np.add.at(summed.T, gs.groups, np.asarray(scores, np.float64).T)
            scores, g = summed, gs
        if id_column not in dataset.column_names:
            raise QueryError(f"the dataset has no column {id_column!r} (columns: {dataset.column_names}); pass id_column=.")
        ids = np.asarray(dataset[id_column])
        if not np.issubdtype(ids.dtype, np.integer):
            raise QueryError(f"dataset column {id_column!r} must hold integer sample ids, got dtype {ids.dtype}.")
        values = dataset_values(scores, g.labels, ids.astype(np.int64), fill_value)
        if reduce is None:
            cols = {f"{prefix}_{i}": values[:, i] for i in range(values.shape[1])}
        else:
            with np.errstate(all="ignore"):
                cols = {prefix: values.mean(1) if reduce == "mean" else values.sum(1)}
        clash = sorted(set(cols) & set(dataset.column_names))
        if clash:
            raise QueryError(f"the dataset already has columns {clash[:5]}; choose another prefix= or remove them.")
        for name, col in cols.items():
            dataset = dataset.add_column(name, col.tolist())
        return dataset

    def _check_provenance(self, scores: np.ndarray, g: Grouping) -> None:
        _check_provenance_of(self, scores, g)

    def _check_columns(self, scores: Any, g: Grouping, what: str) -> np.ndarray:
        now = self._read_stamp()  # the run at the path now: this Attributor's, and the scores' (P7-02)
        _identity.refuse_changed(self._stamp, now, self.n_rows, what)
        if not isinstance(scores, da.Array):  # a lazy array checks at compute
            for then, rows in _identity.stamps_of(scores, str(self.path)):
                _identity.refuse_changed(then, now, rows, what)
        scores = np.asarray(scores)
        if scores.ndim == 1:
            scores = scores[None, :]
        if scores.ndim != 2 or scores.shape[1] != g.n_columns:
            raise QueryError(
                f"scores has shape {scores.shape} but by={g.by!r} (with these owners/steps) gives {g.n_columns} columns. "
                "Pass the same by=/owners=/steps= that computed the scores."
            )
        self._check_provenance(scores, g)  # the count matches: is it also what these columns are?
        return scores


def _by_name(by: str | None) -> str:
    return "None (one column per occurrence)" if by is None else repr(by)


def _check_provenance_of(attr: Attributor, scores: np.ndarray, g: Grouping) -> None:
    """Refuse scores that provably, or possibly, label their columns wrongly under ``g`` (P5-06).

    * Known provenance (``scores`` is what :meth:`Attributor.scores` returned, a view of it or equal
      values): refused when it was computed with another ``by`` or step window.
    * Unknown provenance (a copy changed since, an array loaded from a file): refused only when the
      column count cannot tell occurrences from samples (as many occurrences as distinct samples:
      a one-epoch run) and the two labellings differ (rows not recorded in sorted sample-id order),
      since then the same array would be labelled with other samples' ids under the other ``by``.
    """
    known = attr._provenance(scores)
    if known:
        if any((by, start, stop) == (g.by, g.start, g.stop) for by, start, stop, _n in known):
            return
        by, start, stop, _n = known[0]
        raise QueryError(
            f"these scores were computed with by={_by_name(by)} over rows [{start}, {stop}) but are being labelled "
            f"with by={_by_name(g.by)} over rows [{g.start}, {g.stop}): every column would name another "
            f"{'occurrence' if g.by is None else g.by}'s score. Pass the same by=/steps= that computed them."
        )
    if g.by not in (None, "sample"):
        return
    ids = np.asarray(attr.run.sample_id[g.start : g.stop])
    uniq = np.unique(ids)
    if uniq.size != ids.size or g.n_columns != ids.size or np.array_equal(uniq, ids):
        return  # the counts tell occurrences from samples, or both labellings agree
    raise QueryError(
        f"cannot tell whether these {g.n_columns}-column scores are per occurrence or per sample: the selection has "
        f"{g.n_columns} occurrences of {g.n_columns} distinct samples, recorded in another order than the sorted "
        "sample ids, so labelling them with the wrong by= would pair every sample id with another sample's score. "
        "Pass the array that attr.scores(query, by=...) returned in this session (it is recognised, also through "
        "np.asarray or a copy with equal values), computed with the by= you pass here."
    )


def _parse_model(model: Any) -> nn.Module | None:
    """The model to take test gradients from: an ``nn.Module`` with values (a ``DataParallel``, DDP
    or ``torch.compile`` wrapper is unwrapped: the run recorded the module inside, under its own
    parameter names; a run an older version recorded with the wrapper's prefix keeps it, see
    :func:`datavalue.capture.unwrap_model`)."""
    if model is None:
        return None
    inner = unwrap_model(model)
    if inner is not model:
        logger.info("querying the module inside %s (the run recorded its parameter names without the wrapper's "
                    "prefix)", type(model).__name__)
        model = inner
    if not isinstance(model, nn.Module):
        raise QueryError(
            f"model must be the torch.nn.Module to explain (at the weights to explain), or None to query with test "
            f"gradients; got {type(model).__name__} {str(model)[:60]!r}. Load it first (model = Net(); "
            "model.load_state_dict(torch.load(path, weights_only=True)))."
        )
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise QueryError(
            f"the model's parameters {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the meta device (shapes, no "
            "values); test gradients need the weights. Materialise and load them first (model.to_empty(device='cpu'); "
            "model.load_state_dict(state))."
        )
    return model


def _final_pass_as_trajectory(run: Run, kind: str | None) -> str:
    parent = str(getattr(run.path, "parent", "<run>"))
    return (
        f"{run.path} is a final-weights pass (datavalue.capture.FinalPass), not a training trajectory: it records no "
        f"optimizer steps, so kind={kind or 'dvemb'!r} scores from it would be meaningless. Query the final model's "
        f"influence on the training run instead: datavalue.embeddings.build_influence({parent!r}), then "
        f"Attributor({parent!r}, model, kind='influence') (build_influence(..., curvature='none') for the plain "
        f"final-model gradient dot); trajectory queries use Attributor({parent!r}, model)."
    )


def _final_pass(run: Run) -> Run:
    from datavalue.errors import StoreNotFoundError
    from datavalue.store import FINAL_RUN

    try:
        final = open_run(run.path / FINAL_RUN)
    except StoreNotFoundError as exc:
        raise QueryError(
            f"{run.path} has no final-weights pass: kind='influence' needs one. Record it with "
            "`with datavalue.capture.FinalPass(run, model) as fp:` (then `with fp.batch(ids, tokens=...): "
            "loss.backward()` over the training data) and build it with datavalue.embeddings.build_influence(run)."
        ) from exc
    from datavalue.embeddings import unfinished_final_pass

    stale = stale_final_pass(run, final) or unfinished_final_pass(final)
    if stale is not None:
        raise QueryError(stale)
    return final


def _parse_chunk_rows(chunk_rows: int | None, array: Any) -> int:
    if chunk_rows is None:
        stored = int(array.chunks[0])
        row_bytes = int(array.shape[1]) * np.dtype(array.dtype).itemsize
        return stored * max(1, round(CHUNK_BYTES / max(1, stored * row_bytes)))
    if not isinstance(chunk_rows, (int, np.integer)) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise QueryError(f"chunk_rows must be a positive int, got {chunk_rows!r}.")
    return int(chunk_rows)
