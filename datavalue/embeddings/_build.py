"""Builders: stream a recorded run backward through the recursion and write embeddings.

``build_embeddings`` reads the run's rows in reverse step order, in row windows, keeps one
operator per block (memory ``O(sum_l n_l k_l + one window)``), and writes
``embeddings/<curvature>/values`` ``(R, k)``. With ``segments=K`` ("influence checkpointing") the
trajectory is cut into ``K`` contiguous step ranges:

* pass 1 computes every segment's transfer operator ``Phi_s`` per block, in parallel;
* a cheap sequential chaining gives each segment the operator at its end,
  ``R^(b_s) = R^(T) Phi_{K-1} ... Phi_{s+1}``;
* pass 2 runs the segments' recursions (with embeddings) in parallel.

Work is expressed as ``dask.delayed`` tasks, run by a ``dask.distributed.Client`` when one is
given (``client=``) and by the threaded scheduler otherwise (numpy releases the GIL in BLAS).
Tasks write whole output chunks they own; the chunks shared by two segments come back to the
driver, which writes them, so no two writers ever touch one chunk.

The transfer operators are stored under ``embeddings/<curvature>/ops/block<l>`` ``(K, w, w)``
(``w = k_l``, or ``2 k_l`` when the run uses momentum) so that :func:`embeddings_at` gives
embeddings with respect to an intermediate checkpoint and :func:`extend_embeddings` updates a
finished build after training resumed, with one map per block (both in
:mod:`datavalue.embeddings._extend`). What a build stores about itself (its choice of curvature
and blocks, its config) is read and written by :mod:`datavalue.embeddings._metadata`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import time
import warnings
from typing import Any

import numpy as np

from datavalue.embeddings._backend import parse_device
from datavalue.embeddings._check import refuse_final_pass
from datavalue.embeddings._config import BuildConfig
from datavalue.embeddings._metadata import ATTRS_KEY, _base, _choice, _mib, _operator_bytes
from datavalue.embeddings._plan import (
    CURVATURES,
    _digest,
    _make_plan,
    _parse_curvature,
    _parse_dtype,
    _Plan,
    _split,
    _state_factor,
    parse_fisher_window,
)
from datavalue.embeddings._stream import _pad_op, _run_segments
from datavalue.errors import EmbeddingError, StoreExistsError, StoreReadOnlyError
from datavalue.store import (
    check_step_values,
    check_workers_see_run,
    is_local,
    refuse_foreign_below,
    writes_run,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BuildInfo",
    "CURVATURES",
    "build_embeddings",
]

FORMAT_VERSION = 1
SIGN = (
    "influence = loss(without occurrence) - loss(with) ~= values[r] @ test_grad; positive = helpful"
)


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What a build (or extension) did.

    Attributes:
        path: the run.
        curvature: ``"hessian"``, ``"fisher"``, ``"empirical_fisher"`` or ``"none"``.
        array: name of the embeddings array inside the run (``embeddings/<curvature>/values``).
        dtype: compute dtype of the recursion.
        n_steps, n_rows: steps and rows covered.
        segments: the ``(start, stop)`` step ranges of the segments.
        velocity: whether ``v_values`` (the momentum part, needed to extend momentum runs) was kept.
        optimizer: how the optimizer was modelled (``"sgd"`` exact, ``"adam"``/``"adamw"``
            Adam-aware, or ``"sgd-proxy"``).
        max_operator: largest ``|entry|`` the operator reached (a health indicator).
        expansive_steps: first steps at which the operator passed the explosion threshold.
        seconds: wall time.
        blocks: the ``(start, stop)`` column spans that got one operator each.
        choice: which curvature and blocks the build used and why (also logged at INFO and
            stored in the build's metadata, shown by ``datavalue info``).
        fisher_window: the ``W`` the Fisher was pooled over (steps ``t - W .. t + W``; 0: each step's
            own, and for every other curvature), the int ``fisher_window="auto"`` resolved to.
    """

    path: str
    curvature: str
    array: str
    dtype: str
    n_steps: int
    n_rows: int
    segments: tuple[tuple[int, int], ...]
    velocity: bool
    optimizer: str
    max_operator: float
    expansive_steps: tuple[int, ...]
    seconds: float
    blocks: tuple[tuple[int, int], ...] = ()
    choice: str = ""
    fisher_window: int = 0


# ---------------------------------------------------------------------- the plan


def _unfinished(path: Any, base: str) -> bool:
    """Whether ``base/values`` exists from a build that never completed."""
    from datavalue.store import open_array

    try:
        arr = open_array(path, f"{base}/values")
    except Exception:
        return False
    return not dict(arr.attrs.get(ATTRS_KEY, {})).get("complete", False)


def _read_attrs(path: Any, curvature: str) -> dict[str, Any]:
    from datavalue.store import open_array

    arr = open_array(path, f"{_base(curvature)}/values")
    meta = dict(arr.attrs.get(ATTRS_KEY, {}))
    if not meta:
        raise EmbeddingError(
            f"{path}/{_base(curvature)}/values has no build attributes; rebuild with overwrite=True."
        )
    if not meta.get("complete", False):
        raise EmbeddingError(
            f"{path}/{_base(curvature)}: the last build or extension did not finish. "
            f"Rebuild with build_embeddings({str(path)!r}, {curvature!r}, overwrite=True)."
        )
    return meta


def _store_ops(
    path: Any, curvature: str, plan: _Plan, ops: list[list[np.ndarray] | None], append_to: int = 0
) -> None:
    from datavalue.store import create_array, open_array, write_all

    K = len(ops)
    for i in range(len(plan.blocks)):
        w = plan.width(i)
        name = f"{_base(curvature)}/ops/block{i:03d}"
        if append_to:
            old = np.asarray(open_array(path, name)[:])
            w = max(w, old.shape[1])
            data = np.zeros((append_to + K, w, w))
            data[:append_to, : old.shape[1], : old.shape[2]] = old
        else:
            data = np.empty((K, w, w))  # _pad_op writes every entry
        for s, op in enumerate(ops):
            _pad_op(None if op is None else op[i], w, out=data[append_to + s])
        arr = create_array(
            path,
            name,
            shape=data.shape,
            dtype="float64",
            chunks=(1, w, w),
            overwrite=True,
            attrs={
                "meaning": "transfer operator of each segment, rows/cols (delta theta, delta v)"
            },
        )
        write_all(arr, data)


def _read_ops(path: Any, name: str) -> np.ndarray:
    """The stored operators ``name`` (``embeddings/<c>/ops/block<l>``), every chunk checked: a deleted
    chunk (it would read as a zero operator) or a damaged one is a ``StoreCorruptError`` naming it."""
    from datavalue.errors import StoreCorruptError
    from datavalue.store import open_array, read_checked

    try:
        return read_checked(open_array(path, name), name, location=path)
    except StoreCorruptError as exc:
        raise StoreCorruptError(
            f"{str(exc).rstrip()} (the build's stored transfer operators: rebuild it with "
            f"build_embeddings({str(path)!r}, ..., overwrite=True))."
        ) from exc


def check_ops(path: Any, curvature: str, plan: _Plan) -> None:
    """Every stored operator chunk of the ``curvature`` build is there and intact (before a writer
    that reads them, :func:`~datavalue.embeddings.extend_embeddings`, changes anything)."""
    for i in range(len(plan.blocks)):
        _read_ops(path, f"{_base(curvature)}/ops/block{i:03d}")


def _load_ops(path: Any, curvature: str, plan: _Plan, K: int) -> list[list[np.ndarray]]:
    per_block = [_read_ops(path, f"{_base(curvature)}/ops/block{i:03d}") for i in range(len(plan.blocks))]
    out = []
    for s in range(K):
        ops = []
        for i, arr in enumerate(per_block):
            op = arr[s]
            if np.isnan(op).any():
                raise EmbeddingError(
                    f"{path}: segment {s} has no stored transfer operator; rebuild with segments > 1 "
                    "or velocity=True."
                )
            w = plan.width(i)
            if op.shape[0] < w:
                op = _pad_op(op, w)
            elif op.shape[0] > w:
                if np.any(op[w:]) or np.any(op[:, w:]):
                    raise EmbeddingError(
                        f"{path}: stored operator of segment {s} carries velocity the run lacks."
                    )
                op = op[:w, :w]
            ops.append(op)
        out.append(ops)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------- public


_BUILD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BuildConfig)}


# the memory reading is shared with queries and recordings (datavalue._memory)
from datavalue._memory import MEMORY_CHECK_ENV, available_memory, fmt_bytes, parse_max_memory  # noqa: E402


def refuse_read_only_run(path: Any, what: str) -> None:
    """Refuse a build in a run datavalue opens read-only (a ``.zip`` archive, a URL), before any other check:
    "Pass overwrite=True" would only fail there too (P9-17).

    Raises:
        StoreReadOnlyError: naming how to unpack the archive and build there.
    """
    if is_local(path):
        return
    call = "datavalue.build_embeddings" if what == "build_embeddings" else f"datavalue.embeddings.{what}"
    s = os.fspath(path) if isinstance(path, str | os.PathLike) else repr(path)
    if s.endswith(".zip") and "://" not in s:
        out = s[: -len(".zip")] + (".zarr" if not s[: -len(".zip")].endswith(".zarr") else "")
        raise StoreReadOnlyError(
            f"{what}: {s} is a run archive (.zip), which is read-only: embeddings cannot be built, rebuilt or extended "
            "in it "
            f"(overwrite=True cannot either). Unpack it to a directory and build there: `unzip {s} -d {out}` "
            f"(or zipfile.ZipFile({s!r}).extractall({out!r})), then {call}({out!r}, ...)."
        )
    raise StoreReadOnlyError(
        f"{what}: {s} is a remote or in-memory store, which datavalue opens read-only: embeddings cannot be built "
        "or extended in it. Copy the run to a local directory and build there."
    )


def state_bytes(plan: _Plan, segments: int = 1) -> int:
    """Estimated memory of the backward recursion's state: per block the ``k x k`` operator plus its
    momentum / first-moment part (SGD momentum, Adam) and second-moment part (Adam with ``delta v``), in
    the build's dtype; with parallel segments each running segment also holds its transfer operator."""
    itemsize = np.dtype(plan.dtype).itemsize
    parts = 1 + int(plan.adam is not None or plan.momentum_mode) + int(bool(plan.adam and plan.adam["second_moment"]))
    seq = sum((b - a) ** 2 for a, b in plan.blocks) * parts * itemsize
    if segments > 1:
        workers = min(int(segments), os.cpu_count() or 1)
        seq += workers * _operator_bytes(plan.blocks, _state_factor(plan.adam is not None, plan.momentum_mode), plan.dtype)
    return int(seq)


def _check_memory(path: Any, plan: _Plan, segments: int, max_memory: int | None = None) -> None:
    """Refuse a build whose state cannot fit, before it starts (instead of an out-of-memory kill):
    above ``max_memory`` when the caller gave one (``build_embeddings(..., max_memory="8 GiB")``),
    else above 90% of the available memory."""
    need = state_bytes(plan, segments)
    widths = sorted((b - a for a, b in plan.blocks), reverse=True)
    if max_memory is not None:
        if need > max_memory:
            raise EmbeddingError(
                f"{path}: this build would hold about {fmt_bytes(need)} of recursion state ({len(widths)} operator(s), the "
                f"widest {widths[0]:,} columns), above max_memory={fmt_bytes(max_memory)}. Record with a smaller proj_dim, "
                "build fewer columns per operator (blocks='layer' instead of 'full'), or raise max_memory=."
            )
        return
    if os.environ.get(MEMORY_CHECK_ENV, "1") == "0":
        return
    have = available_memory()
    if have is None or need <= 0.9 * have:
        return
    raise EmbeddingError(
        f"{path}: this build would hold about {_mib(need)} of recursion state ({len(widths)} operator(s), the widest "
        f"{widths[0]:,} columns), but the machine has {_mib(have)} available. Record with a smaller proj_dim (the "
        "state grows with the square of each block's columns), build fewer columns per operator (blocks='layer' "
        f"instead of 'full'), or set {MEMORY_CHECK_ENV}=0 to try anyway."
    )


def check_path(path: Any) -> None:
    """Refuse a ``path`` that is no run location (an open ``Run`` was replaced by its path already,
    :func:`datavalue.store.writes_run`): a clear error instead of "cannot open the zarr group at <...>"."""
    import zarr.abc.store

    if not isinstance(path, (str, os.PathLike, zarr.abc.store.Store)):
        raise EmbeddingError(
            f"path must be a run's path (a str or os.PathLike, e.g. 'runs/x.zarr') or an open datavalue Run, got "
            f"{type(path).__name__}: pass the run's path."
        )


def check_client(client: Any) -> None:
    """Refuse a ``client=`` that is neither None (local threads) nor a ``dask.distributed.Client``,
    before a build reads or deletes anything (it would fail only when the tasks are sent, after
    ``overwrite=True`` removed the finished build)."""
    if client is None:
        return
    try:
        from dask.distributed import Client
    except ImportError:  # distributed not installed: whatever was passed cannot be a Client
        Client = None  # noqa: N806
    if Client is not None and isinstance(client, Client):
        return
    if isinstance(client, str):
        raise EmbeddingError(
            f"client must be a dask.distributed.Client or None (local threads), got the string {client!r}. To run on "
            f"a cluster, connect first and pass the client: client=dask.distributed.Client({client!r})."
        )
    raise EmbeddingError(
        f"client must be a dask.distributed.Client or None (local threads), got {type(client).__name__}"
        + ("" if Client is not None else " (and dask.distributed is not installed: pip install distributed)") + "."
    )


def check_chunk_memory(path: Any, chunk: int, k: int, storage_dtype: str, n_outputs: int, default: int,
                       max_memory: int | None = None) -> None:
    """Refuse ``chunk_rows`` whose output chunks cannot fit in memory, before anything is deleted.

    A build holds each output chunk it fills and the one being written (zarr stores edge chunks
    whole, so even a run with fewer rows gets a whole chunk): ``2 * chunk * k * itemsize`` per output.
    """
    from datavalue._memory import check_memory

    per = int(chunk) * int(k) * np.dtype(storage_dtype).itemsize
    check_memory(2 * per * int(n_outputs), what=f"{path}: a build with chunk_rows={chunk:,} ({k:,} columns)",
                 fixes=f"pass a smaller chunk_rows= (default: the run's, {int(default):,})", error=EmbeddingError,
                 parts={"one output chunk": per}, max_memory=max_memory)


@writes_run("build_embeddings")  # one writer per run (datavalue.store.lock_run)
def build_embeddings(
    path: str | os.PathLike[str],
    curvature: str | None = None,
    *,
    dtype: str = "float64",
    segments: int = 1,
    client: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    chunk_rows: int | None = None,
    storage_dtype: str = "float32",
    velocity: bool | None = None,
    clipping: str = "direction",
    explode_threshold: float = 1e6,
    optimizer: str | None = None,
    adam_second_moment: bool = True,
    blocks: str = "auto",
    config: BuildConfig | None = None,
    device: Any = None,
    max_memory: int | str | None = None,
    fisher_window: int | str = "auto",
) -> BuildInfo:
    """Data value embeddings of every recorded occurrence, w.r.t. the final weights.

    Writes ``embeddings/<curvature>/values`` ``(R, k)`` into the run: row ``r`` is the
    first-order change of the final weights (in the recorded projection) when occurrence ``r`` is
    removed from its step, keeping every other example's weight. The influence on a test point is
    ``values[r] @ test_grad`` with ``test_grad`` its gradient at the final weights in the same
    layout (``datavalue.capture.per_sample_gradients``). Sign: influence =
    ``loss(without) - loss(with)``; positive = the occurrence helped.

    Args:
        path: a run recorded by ``datavalue.Recorder``: its path, or an open ``Run`` (its path is used).
        curvature: ``"hessian"`` (each step's exact Hessian, recorded with
            ``Recorder(..., curvature="hessian")``; exact to first order with exact gradients and
            ``blocks="full"``; small models), ``"fisher"`` (true-Fisher pseudo-gradients recorded
            with ``Recorder(..., curvature="fisher")``), ``"empirical_fisher"`` (the paper's
            ``sum w g g^T``), ``"none"`` (``H = 0``); default: ``"hessian"`` if the run has it, else
            ``"fisher"`` if the run has it, else ``"empirical_fisher"``.
        dtype: compute dtype of the recursion, ``"float64"`` (default) or ``"float32"``.
        segments: cut the trajectory into this many segments, processed in parallel (two passes;
            same result as ``segments=1`` to rounding). The two passes do about twice the flops of
            one sequential scan, so this pays off from about three workers on; it also stores
            the transfer operators that :func:`embeddings_at` and :func:`extend_embeddings` use.
        client: a ``dask.distributed.Client`` to run the segments on (default: local threads).
        overwrite: replace an existing build of this curvature (else ``StoreExistsError``).
        progress: show a tqdm progress bar.
        chunk_rows: rows per chunk of the output (default: the run's row chunk).
        storage_dtype: dtype of the stored embeddings (``"float32"``; ``"float64"`` for oracles).
        velocity: also store ``v_values``, the momentum part, needed by :func:`extend_embeddings`
            on momentum runs (default: whenever the run uses momentum; doubles the work there).
        clipping: on clipped steps (``grad_scale < 1``), ``"direction"`` keeps the first-order
            dependence of the coefficient ``max_norm / ||g_hat||`` on the weights and on the
            removed example, with ``g_hat`` the step's gradient summed from the stored rows (exact
            when every parameter is recorded unprojected, approximate under a sketch or when
            some parameters are not recorded); ``"constant"`` treats it as a fixed factor. Both the
            SGD and the Adam-aware scans keep the direction; runs recorded with
            ``precondition="adam"`` (whitened rows) keep the coefficient only (``docs/math.md``
            sections 5 and 10).
        explode_threshold: warn when an operator entry exceeds this (expansive steps).
        optimizer: how to model the optimizer: ``"adamw"``/``"adam"`` (Adam-aware: the linearised
            dynamics of weights, first and second moments, ``docs/math.md`` section 10; needs the
            moments recorded by ``Recorder(..., optimizer=opt)``, ``record_optimizer_state``),
            ``"sgd"`` (SGD runs), ``"sgd-proxy"`` (an Adam run treated as SGD, the paper's proxy).
            Default: from the recorded optimizer (Adam-aware when the moments are there, else the
            proxy with a warning).
        adam_second_moment: keep the second-moment perturbation ``delta v`` in the Adam state
            (``3k`` state; ``False``: ``2k``, measured in docs/results/adam.md). Projected runs
            always drop it (their stored moments are block means).
        blocks: the operator's block structure. ``"auto"`` (default): ``"full"`` for
            ``curvature="fisher"`` or ``"hessian"`` while its state takes at most 256 MiB (``k`` up
            to 5,792 in float64 for SGD, half that with momentum, a third for Adam) and the sketch
            keeps at least a quarter of the parameters' dimensions (exact gradients always do),
            else ``"layer"``; the choice and its reason are logged at INFO and stored in the
            build's metadata (:func:`build_metadata`, ``datavalue info``). The cap is per state:
            with ``segments > 1`` every segment running at once holds its own. ``"layer"`` (the
            paper's block-diagonal form): one operator per recorded block (no cross-layer
            curvature; memory ``sum_l k_l^2``). ``"full"``: one operator over all ``k`` columns
            (memory ``k^2``, flops ``B k^2`` per step). Cross-layer true-Fisher curvature matters
            at larger learning rates (docs/results/loo_fidelity.md, costs in
            docs/results/defaults.md); the empirical Fisher did better per layer, and so did the
            true Fisher under a heavy sketch (docs/results/poison.md; on the AdamW LM of
            docs/results/lm.md at 1% and 5% of P too). Under a sketch the full operator is
            sensitive to the Fisher's sampled labels (the recorded draw moved it by 0.2 there);
            record with ``Recorder(..., fisher_samples=8)`` before building ``"full"`` with
            sampled labels, or pool the recorded Fisher over neighbouring steps with
            ``fisher_window`` (below; about two thirds of the 8 labels' gain there, no re-recording).
        config: a :class:`~datavalue.embeddings.BuildConfig` holding the options above (then
            leave those keywords at their defaults). Either way the validated config is stored in
            the build's metadata (``build_config``) and :func:`extend_embeddings` reuses it.
        device: where the recursion's math runs. ``None`` (default): numpy on the CPU, as always.
            A torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``): the same
            recursion on torch tensors there (torch is imported only then). Rows are read from the
            store as numpy and moved to the device once per window; embeddings come back once per
            output chunk. The compute ``dtype`` is kept (``"float32"`` is the fast choice on a GPU).
            Results equal the numpy build's to rounding (``tests/embeddings/test_backend.py``).
            Not part of the stored config (it does not change the result); recorded in the
            metadata as ``device``. With ``segments > 1`` every segment's task runs on this device
            (on a ``client``, on each worker's). Raises ``EmbeddingError`` when torch is missing or
            no CUDA device is visible.

        max_memory: bytes (or a string such as ``"8 GiB"``) the build may hold, as for queries and
            recorders. The recursion state and the output chunks are estimated before anything is
            read or deleted, and the build is refused (``EmbeddingError``, with the estimate and the
            cheaper options) when they exceed it. ``None`` (default): 90% of the available memory
            (``DATAVALUE_MEMORY_CHECK=0`` turns that automatic check off).
        fisher_window: ``curvature="fisher"`` only: an int ``W >= 0`` or ``"auto"``. With ``W > 0``
            step ``t``'s curvature is the mean of the recorded Fisher matrices of steps
            ``max(0, t - W) .. min(T - 1, t + W)`` (their stored rows pooled, each step's scaled by
            ``1 / sqrt(n_t)``, ``n_t`` the steps pooled), which averages out the noise of the
            sampled labels (one label per position leaves each step's Fisher a few rank-one terms)
            at no recording cost, assuming the weights move little over ``2W + 1`` steps. ``0``:
            each step's own Fisher. ``"auto"`` (default): ``4`` when the Fisher rows are sampled
            labels (``Recorder(fisher_samples=S)``: ``S`` rows per occurrence) and the build has one
            operator over all columns, else ``0`` (per block the pooling moved the LM's scores by
            0.01; an exact class expectation has no label noise). Costs ``2W + 1`` times the Fisher
            rows' flops per step (the LM's full build at 5%: 50 s at ``W = 0``, 132 s at 4). Stored
            in the build's metadata as the int it resolved to (``fisher_window``; the request in
            ``build_config``); :func:`embeddings_at`, :func:`check_build` and
            :func:`extend_embeddings` reuse it. An extension recomputes the old last ``W`` steps,
            whose pooled curvature the new steps change, and carries the older rows over
            (``datavalue.embeddings._pooledtail``): equal to a rebuild to rounding. Measured on the
            AdamW LM of ``docs/results/lm.md`` (section 1, ``fisher_window``).

    Returns:
        :class:`BuildInfo`.

    Raises:
        CurvatureUnavailableError: ``"fisher"`` or ``"hessian"`` on a run that did not record it.
        EmbeddingError: a ``path`` that is neither a path nor a ``Run``; a ``client`` that is not a ``dask.distributed.Client``, a ``chunk_rows`` whose
            output chunks cannot fit in memory (checked before ``overwrite=True`` deletes anything).
            A ``fisher_window`` that is neither an int ``>= 0`` (a bool is refused) nor ``"auto"``, or
            ``> 0`` with a curvature other than ``"fisher"``.
        StoreExistsError: the build exists and ``overwrite`` is False.
        NonFiniteError: NaN/Inf in the gradients, curvature or operator (with the step index).

    Example:
        >>> info = build_embeddings("runs/x.zarr", "fisher", progress=False)      # doctest: +SKIP
        >>> emb = datavalue.store.open_run("runs/x.zarr").read("embeddings/fisher/values")  # doctest: +SKIP
        >>> info = build_embeddings("runs/x.zarr", dtype="float32", device="cuda", overwrite=True)  # doctest: +SKIP
    """
    from datavalue.store import create_array, delete_path, open_run

    t_start = time.perf_counter()
    limit = parse_max_memory(max_memory, EmbeddingError)
    device = parse_device(device)  # before anything is read or written: a missing torch / GPU fails here
    check_client(client)
    check_path(path)
    options = dict(curvature=curvature, dtype=dtype, segments=segments, chunk_rows=chunk_rows,
                   storage_dtype=storage_dtype, velocity=velocity, clipping=clipping,
                   explode_threshold=explode_threshold, optimizer=optimizer, adam_second_moment=adam_second_moment,
                   blocks=blocks, fisher_window=fisher_window)
    if config is not None:
        if not isinstance(config, BuildConfig):
            raise EmbeddingError(f"config must be a datavalue.embeddings.BuildConfig, got {type(config).__name__}.")
        changed = [k for k, v in options.items() if v != _BUILD_DEFAULTS[k]]
        if changed:
            raise EmbeddingError(f"pass either config= or the keyword options, not both (also given: {changed}); "
                                 "use dataclasses.replace(config, ...) to change a config.")
        cfg = config
    else:
        cfg = BuildConfig(**options)
    (curvature, dtype, segments, chunk_rows, storage_dtype, velocity, clipping, explode_threshold, optimizer,
     adam_second_moment, blocks, fisher_window) = (getattr(cfg, k) for k in options)
    run = open_run(path)
    path = run.path  # absolute (a file:// URL: its local path): what the tasks open, on any worker
    refuse_read_only_run(path, "build_embeddings")  # before "already holds a build: pass overwrite=True" (P9-17)
    check_workers_see_run(client, path, run.run_id, "build_embeddings(client=)'s segment tasks")
    refuse_final_pass(run, "build_embeddings")
    check_step_values(run, error=EmbeddingError)  # lr, gradient scales, row weights: as the recorder requires
    requested_curvature = curvature
    curvature = _parse_curvature(run, curvature)
    fisher_window = parse_fisher_window(fisher_window, curvature)
    dtype = _parse_dtype(dtype)
    storage_dtype = _parse_dtype(storage_dtype)
    T, R = int(run.n_steps), int(run.n_rows)
    if T == 0:
        raise EmbeddingError(f"{path} has no committed steps; record some training first.")
    base = _base(curvature)
    if not overwrite and _unfinished(path, base):
        # an interrupted build is never marked complete: restart it instead of demanding overwrite=True
        logger.warning("%s/%s: replacing an unfinished (interrupted) build", path, base)
        overwrite = True
    if run.has_array(f"{base}/values") and not overwrite:
        raise StoreExistsError(
            f"{path} already holds {base}/values. Pass overwrite=True to rebuild it, or extend_embeddings() to add "
            "steps recorded since."
        )
    if overwrite:  # a user's file inside the build is never deleted with it
        refuse_foreign_below(path, base)
    plan, handling = _make_plan(
        run, curvature, dtype, chunk_rows, explode_threshold, clipping, optimizer, adam_second_moment, blocks,
        fisher_window,
    )
    if plan.adam is not None:
        if velocity:
            raise EmbeddingError("velocity=True is for SGD momentum runs; Adam-aware builds store delta theta only.")
    plan = dataclasses.replace(plan, device=device)
    choice = _choice(run, requested_curvature, blocks, plan, requested_window=fisher_window)
    logger.info("%s: building embeddings with %s", path, choice["summary"])
    _check_memory(path, plan, segments, limit)
    vel = plan.adam is None and plan.momentum_mode and (
        velocity is None or bool(velocity)
    )  # v is fictitious without momentum
    k = int(run.proj_dim)
    chunk = int(chunk_rows or run.row_chunk)
    check_chunk_memory(path, chunk, k, storage_dtype, 1 + int(vel), run.row_chunk,
                       limit)  # before overwrite deletes
    bounds = _split(plan.step_ptr, 0, T, segments)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "curvature": curvature,
        "dtype": dtype,
        "storage_dtype": storage_dtype,
        "n_steps": T,
        "n_rows": R,
        "segments": [list(b) for b in bounds],
        "velocity": vel,
        "momentum_mode": plan.momentum_mode,
        "optimizer": handling,
        "optimizer_manifest": run.optimizer,
        "clipping": plan.clipping,
        "fisher_window": plan.fisher_window,
        "block_mode": blocks,
        "blocks": [list(b) for b in plan.blocks],
        "choice": choice,
        "build_config": cfg.to_json(),
        "device": device or "numpy",
        "adam": None if plan.adam is None else dict(plan.adam, betas=list(plan.adam["betas"])),
        "run_digest": _digest(plan, T),
        "run_generation": int(getattr(run, "generation", -1)),
        "sign": SIGN,
        "created": _now(),
        "complete": False,
    }
    if overwrite:
        delete_path(path, base)
    values = create_array(
        path,
        f"{base}/values",
        shape=(R, k),
        dtype=storage_dtype,
        chunks=(chunk, k),
        attrs={ATTRS_KEY: meta},
        overwrite=overwrite,
    )
    outputs = [values]
    if vel:
        outputs.append(
            create_array(
                path,
                f"{base}/v_values",
                shape=(R, k),
                dtype=storage_dtype,
                chunks=(chunk, k),
                attrs={"meaning": "delta v_T of each removal (momentum part)"},
                overwrite=True,
            )
        )
    res = _run_segments(
        plan,
        bounds,
        final_velocity=vel,
        known_ops=None,
        outputs=outputs,
        out_offset=0,
        n_out=R,
        out_chunk=chunk,
        client=client,
        progress=progress,
        desc=f"embeddings ({curvature})",
    )
    if any(op is not None for op in res["ops"]):
        _store_ops(path, curvature, plan, res["ops"])
    meta.update(
        max_operator=res["max_op"],
        expansive_steps=res["expansive"],
        complete=True,
        ops_stored=any(op is not None for op in res["ops"]),
    )
    values.attrs[ATTRS_KEY] = meta
    _warn_expansive(path, res)
    return BuildInfo(
        path=str(path),
        curvature=curvature,
        array=f"{base}/values",
        dtype=dtype,
        n_steps=T,
        n_rows=R,
        segments=tuple(bounds),
        velocity=vel,
        optimizer=handling,
        max_operator=res["max_op"],
        expansive_steps=tuple(res["expansive"]),
        seconds=time.perf_counter() - t_start,
        blocks=plan.blocks,
        choice=choice["summary"],
        fisher_window=plan.fisher_window,
    )


def _warn_expansive(path: Any, res: dict[str, Any]) -> None:
    if res["expansive"]:
        msg = (
            f"{path}: the embedding operator grew past the explosion threshold (max |entry| {res['max_op']:.3g}) "
            f"at steps {res['expansive'][:10]}: those steps are expansive (eta * lambda_max(H) > 2) and the "
            "first-order estimate is unreliable there. Validate with datavalue.testing.trajectory_loo."
        )
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
