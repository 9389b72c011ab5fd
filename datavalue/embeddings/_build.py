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
finished build after training resumed, with one map per block.
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

# auto's caps are read from the module when used (tests patch them)
from datavalue.embeddings import _plan as _plan_module
from datavalue.embeddings._config import BuildConfig
from datavalue.embeddings._plan import (
    CURVATURES,
    FULL_CURVATURES,
    _blocks,
    _digest,
    _kept_fraction,
    _make_plan,
    _parse_curvature,
    _parse_dtype,
    _Plan,
    _split,
    _state_factor,
)
from datavalue.embeddings._stream import _execute, _pad_op, _run_segments, _task, _write_pieces
from datavalue.errors import EmbeddingError, StoreExistsError

logger = logging.getLogger(__name__)

__all__ = [
    "BuildInfo",
    "CURVATURES",
    "build_embeddings",
    "build_metadata",
    "embeddings_at",
    "extend_embeddings",
]

ATTRS_KEY = "datavalue_embeddings"
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


# ---------------------------------------------------------------------- the plan


def _base(curvature: str) -> str:
    return f"embeddings/{curvature}"


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


def _load_ops(path: Any, curvature: str, plan: _Plan, K: int) -> list[list[np.ndarray]]:
    from datavalue.store import open_array

    per_block = [
        np.asarray(open_array(path, f"{_base(curvature)}/ops/block{i:03d}")[:])
        for i in range(len(plan.blocks))
    ]
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


# ---------------------------------------------------------------------- the choice, in words


def _mib(n: float) -> str:
    """``n`` bytes for people: ``"200 B"``, ``"11.2 MiB"``, ``"256 MiB"``, ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _curvature_reason(run: Any, requested: str | None, chosen: str) -> str:
    """Why ``chosen``: the caller's choice, or the default's preference among what the run recorded."""
    if requested is not None:
        return "requested"
    if chosen in ("hessian", "fisher"):
        lesser = ["fisher"] if chosen == "hessian" and run.has_fisher else []
        return f"recorded; preferred over {' and '.join([*lesser, 'empirical_fisher'])}"
    return "the run holds no true-Fisher rows or Hessians; Recorder(..., curvature='fisher') records them"


def _operator_bytes(spans: Any, factor: int, dtype: str) -> int:
    """Bytes of the recursion's state over ``spans``: ``sum_l (factor k_l)^2`` entries (``factor``
    2 with momentum, 3 for Adam), the estimate ``blocks="auto"`` compares with its cap."""
    return int(sum((factor * (b - a)) ** 2 for a, b in spans) * np.dtype(dtype).itemsize)


def _describe_spans(spans: Any) -> str:
    widths = [b - a for a, b in spans]
    if len(widths) == 1:
        return f"1 operator over {widths[0]:,} columns"
    return f"{len(widths)} operators of {' / '.join(f'{w:,}' for w in widths)} columns"


def _blocks_reason(run: Any, requested: Any, plan: _Plan, factor: int) -> str:
    """Why ``plan.blocks``: the caller's choice, the stored build's, or which test of ``"auto"`` decided
    (the tests of :func:`datavalue.embeddings._plan._resolve_blocks`, in its order)."""
    if not isinstance(requested, str):
        return "the column spans given"
    if requested != "auto":
        return "requested"
    recorded = _blocks(run)
    k = recorded[-1][1]
    cap, min_kept = _plan_module.AUTO_FULL_BYTES, _plan_module.AUTO_FULL_KEPT
    if len(recorded) == 1:
        return "the run records one block"
    if len(plan.blocks) == 1:
        return f"one operator keeps the cross-layer curvature; it fits the {_mib(cap)} cap"
    if plan.blocks != recorded:
        return f"grouped under the {_mib(cap)} cap"
    if plan.curvature not in FULL_CURVATURES:
        return (
            "blocks do not change curvature 'none'"
            if plan.curvature == "none"
            else f"{plan.curvature} measured better per layer (docs/results/loo_fidelity.md)"
        )
    full = _operator_bytes(((0, k),), factor, plan.dtype)
    if full > cap:
        return (
            f"per layer: one operator over all {k:,} columns would take {_mib(full)}, over the "
            f"{_mib(cap)} cap (blocks='full' forces it)"
        )
    kept = _kept_fraction(run)
    if kept < min_kept:
        return (
            f"per layer: the sketch keeps {kept:.1%} of the parameters' dimensions (< {min_kept:.0%}), "
            "where one operator over all columns measured worse (docs/results/poison.md)"
        )
    return "per layer"


def _choice(run: Any, requested_curvature: str | None, requested_blocks: Any, plan: _Plan) -> dict[str, Any]:
    """The build's choice of curvature and blocks with the reasons, for the log, the metadata and
    :class:`BuildInfo`."""
    factor = _state_factor(plan.adam is not None, plan.momentum_mode)
    nbytes = _operator_bytes(plan.blocks, factor, plan.dtype)
    mode = requested_blocks if isinstance(requested_blocks, str) else "spans"
    curv_reason = _curvature_reason(run, requested_curvature, plan.curvature)
    blocks_reason = _blocks_reason(run, requested_blocks, plan, factor)
    summary = (
        f"curvature: {plan.curvature} ({curv_reason}), blocks: {mode} -> {_describe_spans(plan.blocks)} "
        f"(operator state {_mib(nbytes)}; {blocks_reason})"
    )
    return {
        "curvature": plan.curvature,
        "curvature_reason": curv_reason,
        "block_mode": mode,
        "blocks_reason": blocks_reason,
        "operator_bytes": nbytes,
        "summary": summary,
    }


def build_metadata(path: str | os.PathLike[str], curvature: str | None = None) -> dict[str, Any]:
    """The stored metadata of a build: what it chose and why, its shape, health and provenance.

    Args:
        path: a run.
        curvature: which build (default as in :func:`build_embeddings`).

    Returns:
        A copy of the build's attributes (``embeddings/<curvature>/values``): ``curvature``,
        ``block_mode`` (what was asked), ``blocks`` (the column spans with one operator each),
        ``choice`` (``summary``, ``curvature_reason``, ``blocks_reason``, ``operator_bytes``; derived
        from the other keys for builds made before the choice was stored), ``n_steps``, ``optimizer``,
        ``max_operator``, ``complete`` (``False`` for an interrupted build) and more.

    Raises:
        EmbeddingError: no build of that curvature, or one without build attributes.

    Example:
        >>> build_metadata("runs/x.zarr")["choice"]["summary"]  # doctest: +SKIP
        'curvature: fisher (recorded; preferred over empirical_fisher), blocks: auto -> 1 operator over ...'
    """
    from datavalue.store import open_array, open_run

    run = open_run(path)
    if curvature is None:
        built = [c for c in CURVATURES if run.has_array(f"{_base(c)}/values")]
        if not built:
            raise EmbeddingError(f"{path} has no embeddings yet; build them with build_embeddings({str(path)!r}).")
        curvature = built[0]  # CURVATURES is in order of preference
    if not run.has_array(f"{_base(curvature)}/values"):
        raise EmbeddingError(
            f"{path} has no {curvature!r} build; build it with build_embeddings({str(path)!r}, {curvature!r})."
        )
    meta = dict(open_array(path, f"{_base(curvature)}/values").attrs.get(ATTRS_KEY, {}))
    if not meta:
        raise EmbeddingError(f"{path}/{_base(curvature)}/values has no build attributes; rebuild with overwrite=True.")
    if "choice" not in meta:  # a build made before the choice was stored
        spans = [tuple(b) for b in meta.get("blocks", [])]
        mode = meta.get("block_mode", "layer")
        desc = _describe_spans(spans) if spans else "one operator per recorded block"
        meta["choice"] = {
            "curvature": curvature,
            "block_mode": mode,
            "summary": f"curvature: {curvature}, blocks: {mode} -> {desc} (built before the choice was recorded)",
        }
    return meta


# ---------------------------------------------------------------------- public


_BUILD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BuildConfig)}


def stored_config(meta: dict[str, Any]) -> BuildConfig:
    """The :class:`BuildConfig` a build was made with (builds from before ``build_config`` was
    stored: from their own metadata keys)."""
    if meta.get("build_config"):
        return BuildConfig.from_json(meta["build_config"])
    return BuildConfig(curvature=meta.get("curvature"), dtype=meta.get("dtype", "float64"),
                       storage_dtype=meta.get("storage_dtype", "float32"), clipping=meta.get("clipping", "direction"),
                       blocks=meta.get("block_mode", "layer") if meta.get("block_mode") in ("auto", "layer", "full")
                       else "layer")


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
) -> BuildInfo:
    """Data value embeddings of every recorded occurrence, w.r.t. the final weights.

    Writes ``embeddings/<curvature>/values`` ``(R, k)`` into the run: row ``r`` is the
    first-order change of the final weights (in the recorded projection) when occurrence ``r`` is
    removed from its step, keeping every other example's weight. The influence on a test point is
    ``values[r] @ test_grad`` with ``test_grad`` its gradient at the final weights in the same
    layout (``datavalue.capture.per_sample_gradients``). Sign: influence =
    ``loss(without) - loss(with)``; positive = the occurrence helped.

    Args:
        path: a run recorded by ``datavalue.Recorder``.
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
            some parameters are not recorded); ``"constant"`` treats it as a fixed factor.
        explode_threshold: warn when an operator entry exceeds this (expansive steps).
        optimizer: how to model the optimizer: ``"adamw"``/``"adam"`` (Adam-aware: the linearised
            dynamics of weights, first and second moments, ``docs/math.md`` section 7; needs the
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
            true Fisher under a heavy sketch (docs/results/poison.md).
        config: a :class:`~datavalue.embeddings.BuildConfig` holding the options above (then
            leave those keywords at their defaults). Either way the validated config is stored in
            the build's metadata (``build_config``) and :func:`extend_embeddings` reuses it.

    Returns:
        :class:`BuildInfo`.

    Raises:
        CurvatureUnavailableError: ``"fisher"`` or ``"hessian"`` on a run that did not record it.
        StoreExistsError: the build exists and ``overwrite`` is False.
        NonFiniteError: NaN/Inf in the gradients, curvature or operator (with the step index).

    Example:
        >>> info = build_embeddings("runs/x.zarr", "fisher", progress=False)      # doctest: +SKIP
        >>> emb = datavalue.store.open_run("runs/x.zarr").read("embeddings/fisher/values")  # doctest: +SKIP
    """
    from datavalue.store import create_array, delete_path, open_run

    t_start = time.perf_counter()
    options = dict(curvature=curvature, dtype=dtype, segments=segments, chunk_rows=chunk_rows,
                   storage_dtype=storage_dtype, velocity=velocity, clipping=clipping,
                   explode_threshold=explode_threshold, optimizer=optimizer, adam_second_moment=adam_second_moment,
                   blocks=blocks)
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
     adam_second_moment, blocks) = (getattr(cfg, k) for k in options)
    run = open_run(path)
    requested_curvature = curvature
    curvature = _parse_curvature(run, curvature)
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
    plan, handling = _make_plan(
        run, curvature, dtype, chunk_rows, explode_threshold, clipping, optimizer, adam_second_moment, blocks
    )
    if plan.adam is not None:
        if velocity:
            raise EmbeddingError("velocity=True is for SGD momentum runs; Adam-aware builds store delta theta only.")
    choice = _choice(run, requested_curvature, blocks, plan)
    logger.info("%s: building embeddings with %s", path, choice["summary"])
    vel = plan.adam is None and plan.momentum_mode and (
        velocity is None or bool(velocity)
    )  # v is fictitious without momentum
    k = int(run.proj_dim)
    chunk = int(chunk_rows or run.row_chunk)
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
        "block_mode": blocks,
        "blocks": [list(b) for b in plan.blocks],
        "choice": choice,
        "build_config": cfg.to_json(),
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


def embeddings_at(
    path: str | os.PathLike[str],
    step: int,
    curvature: str | None = None,
    *,
    client: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Any:
    """Embeddings of the occurrences before ``step`` w.r.t. the checkpoint *before* step ``step``.

    Uses the stored transfer operators of the segments that end at or before ``step`` and
    recomputes only the segment that contains it, then runs the earlier segments in parallel.
    Test gradients must be taken at that checkpoint's weights.

    Args:
        path: a run with a finished build of ``curvature``.
        step: ``1 <= step <= T``; ``T`` is the final model (the main build). Segment boundaries are
            cheapest.
        curvature: which build (default as in :func:`build_embeddings`).
        client, progress: as in :func:`build_embeddings`.
        overwrite: replace an earlier result for this step.

    Returns:
        The ``(step_ptr[step], k)`` zarr array ``embeddings/<curvature>/at/<step>/values``
        (read-only). Sign: influence = ``loss(without) - loss(with)`` at that checkpoint.
    """
    from datavalue.store import create_array, open_array, open_run

    run = open_run(path)
    curvature = _parse_curvature(run, curvature)
    meta = _read_attrs(path, curvature)
    T = int(meta["n_steps"])
    step = int(step)
    if not 1 <= step <= T:
        raise EmbeddingError(f"step must lie in 1..{T} (the built steps), got {step}.")
    base = _base(curvature)
    if step == T:
        return open_array(path, f"{base}/values")
    name = f"{base}/at/{step}/values"
    if run.has_array(name) and not overwrite:
        raise StoreExistsError(f"{path}/{name} exists; pass overwrite=True to recompute it.")
    _refuse_adam(path, meta, "embeddings_at")
    plan, _ = _make_plan(
        run, curvature, meta["dtype"], None, 1e6, meta.get("clipping", "direction"),
        _replay_optimizer(meta), blocks=_stored_blocks(meta),
    )
    seg = [tuple(b) for b in meta["segments"]]
    bounds, known = [], {}
    inside = [s for s, (lo, hi) in enumerate(seg) if lo < step]
    if meta.get("ops_stored"):
        ops = _load_ops(path, curvature, plan, len(seg))
    else:
        ops = None
    for s in inside:
        lo, hi = seg[s]
        bounds.append((lo, min(hi, step)))
        if hi <= step and ops is not None:
            known[len(bounds) - 1] = ops[s]
    k = int(run.proj_dim)
    R_b = int(plan.step_ptr[step])
    chunk = int(run.row_chunk)
    out = create_array(
        path,
        name,
        shape=(R_b, k),
        dtype=meta["storage_dtype"],
        chunks=(chunk, k),
        overwrite=True,
        attrs={ATTRS_KEY: {"checkpoint_step": step, "curvature": curvature, "sign": SIGN}},
    )
    _run_segments(
        plan,
        bounds,
        final_velocity=False,
        known_ops=known,
        outputs=[out],
        out_offset=0,
        n_out=R_b,
        out_chunk=chunk,
        client=client,
        progress=progress,
        desc=f"embeddings at step {step}",
    )
    return open_array(path, name)


def extend_embeddings(
    path: str | os.PathLike[str],
    curvature: str | None = None,
    *,
    segments: int = 1,
    client: Any = None,
    progress: bool = True,
) -> BuildInfo:
    """Bring a finished build up to date after the run was resumed and trained further.

    The steps recorded since the build are run backward (their own embeddings come out directly);
    their operator ``R`` at the old end (per block ``n x w``) then maps every old embedding:
    ``[e_new, v_new] = R @ [e_old, v_old]``: one ``k x k`` map per block for plain SGD, ``2k x 2k``
    when momentum carries velocity across the old end. That needs the old build's ``v_values``
    (kept by default for momentum runs); without them, if the first new step carries velocity,
    this raises and asks for a rebuild. Equal to a full rebuild up to rounding.

    Returns:
        :class:`BuildInfo` of the extended build.
    """
    from datavalue.store import open_array, open_run

    t_start = time.perf_counter()
    run = open_run(path)
    curvature = _parse_curvature(run, curvature)
    meta = _read_attrs(path, curvature)
    T0, R0 = int(meta["n_steps"]), int(meta["n_rows"])
    T1, R1 = int(run.n_steps), int(run.n_rows)
    _refuse_adam(path, meta, "extend_embeddings")
    stored = stored_config(meta)
    plan, handling = _make_plan(
        run, curvature, stored.dtype, None, stored.explode_threshold, stored.clipping,
        _replay_optimizer(meta), blocks=_stored_blocks(meta),
    )
    if T1 < T0 or int(plan.step_ptr[T0]) != R0 or _digest(plan, T0) != meta["run_digest"]:
        raise EmbeddingError(
            f"{path}: the first {T0} steps differ from the ones the build was made from (the run was overwritten or "
            f"truncated). Rebuild with build_embeddings({str(path)!r}, {curvature!r}, overwrite=True)."
        )
    base = _base(curvature)
    values = _writable(path, f"{base}/values")
    if T1 == T0:
        return _info_from_meta(path, curvature, dict(meta, blocks=[list(b) for b in plan.blocks]),
                               time.perf_counter() - t_start)
    logger.info(
        "%s: extending the %s build from step %d to %d with its stored blocks (%s)",
        path, curvature, T0, T1, _describe_spans(plan.blocks),
    )
    had_vel = bool(meta["velocity"])
    vel = had_vel or plan.momentum_mode
    if not had_vel and plan.momentum[T0] != 0 and not plan.fresh[T0]:
        # the first new step carries velocity built up by the old steps
        raise EmbeddingError(
            f"{path}: step {T0} carries momentum from the old steps, so extending needs their velocity part "
            f"(v_values), which this build did not keep (velocity=False). Rebuild with "
            f"build_embeddings({str(path)!r}, {curvature!r}, overwrite=True)."
        )
    k = int(run.proj_dim)
    chunk = int(values.chunks[0])
    meta["complete"] = False
    values.attrs[ATTRS_KEY] = meta
    values.resize((R1, k))
    outputs = [values]
    if vel:
        if had_vel:
            v_arr = _writable(path, f"{base}/v_values")
            v_arr.resize((R1, k))
        else:
            from datavalue.store import create_array

            v_arr = create_array(
                path,
                f"{base}/v_values",
                shape=(R1, k),
                dtype=meta["storage_dtype"],
                chunks=(chunk, k),
                overwrite=True,
                attrs={"meaning": "delta v_T of each removal (momentum part)"},
            )
        outputs.append(v_arr)
    bounds = _split(plan.step_ptr, T0, T1, segments)
    res = _run_segments(
        plan,
        bounds,
        final_velocity=vel,
        known_ops=None,
        outputs=outputs,
        out_offset=0,
        n_out=R1,
        out_chunk=chunk,
        client=client,
        progress=progress,
        desc=f"extend ({curvature})",
    )
    maps = res["start"]  # per block: (n, w) operator at the old end T0
    # old rows: one map per block, chunk-parallel; the chunk shared with new rows goes via the driver
    old_in = [open_array(path, f"{base}/values")] + (
        [open_array(path, f"{base}/v_values")] if had_vel else []
    )
    fns = [
        _task(_map_rows, plan, maps, old_in, outputs, c0, min(c0 + chunk, R0), chunk, vel)
        for c0 in range(0, R0, chunk)
    ]
    pieces = []
    for p in _execute(fns, client, None):
        pieces.extend(p)
    _write_pieces(outputs, pieces, chunk)
    if any(op is not None for op in res["ops"]):
        if meta.get("ops_stored"):
            _store_ops(path, curvature, plan, res["ops"], append_to=len(meta["segments"]))
    else:
        meta["ops_stored"] = False
    meta.update(
        n_steps=T1,
        n_rows=R1,
        segments=meta["segments"] + [list(b) for b in bounds],
        velocity=vel,
        momentum_mode=bool(meta.get("momentum_mode")) or plan.momentum_mode,
        run_digest=_digest(plan, T1),
        max_operator=max(float(meta.get("max_operator", 0.0)), res["max_op"]),
        expansive_steps=sorted(set(meta.get("expansive_steps", [])) | set(res["expansive"])),
        extended=meta.get("extended", []) + [{"from_step": T0, "to_step": T1, "at": _now()}],
        blocks=[list(b) for b in plan.blocks],  # also for builds made before the spans were stored
        block_mode=meta.get("block_mode", "layer"),
        complete=True,
    )
    values.attrs[ATTRS_KEY] = meta
    _warn_expansive(path, res)
    return _info_from_meta(path, curvature, meta, time.perf_counter() - t_start, handling=handling)


def _stored_blocks(meta: dict[str, Any]) -> Any:
    """The operator spans of a stored build. Never the current default: an extension or a checkpoint
    must use the very blocks the build was made with (builds made before ``blocks`` existed were
    per layer)."""
    return meta.get("blocks") or "layer"


def _refuse_adam(path: Any, meta: dict[str, Any], what: str) -> None:
    if meta.get("optimizer") in ("adam", "adamw"):
        raise EmbeddingError(
            f"{path}: {what} is not implemented for Adam-aware builds yet (no transfer operators of the 3k Adam "
            f"state); rebuild with build_embeddings(..., overwrite=True) after training resumed."
        )


def _replay_optimizer(meta: dict[str, Any]) -> str | None:
    """The optimizer handling a stored build used (older builds: the default choice)."""
    return "sgd-proxy" if meta.get("optimizer") == "sgd-proxy" else None


def _writable(path: Any, name: str) -> Any:
    """A writable handle on a derived array of the run."""
    import zarr

    from datavalue.store import open_array

    open_array(path, name)  # existence check with the store's error
    return zarr.open_array(str(os.path.join(os.fspath(path), name)), mode="r+", zarr_format=3)


def _map_rows(
    plan: _Plan,
    maps: list[np.ndarray],
    old_in: list[Any],
    outputs: list[Any],
    c0: int,
    c1: int,
    chunk: int,
    vel: bool,
) -> list[tuple[int, list[np.ndarray]]]:
    e = np.asarray(old_in[0][c0:c1], dtype=np.float64)
    v = np.asarray(old_in[1][c0:c1], dtype=np.float64) if len(old_in) > 1 else None
    new_e = np.empty_like(e)
    new_v = np.empty_like(e) if vel else None
    for i, (a, b) in enumerate(plan.blocks):
        kb = b - a
        Rm = maps[i].astype(np.float64)
        X = (
            e[:, a:b]
            if Rm.shape[1] == kb
            else np.concatenate(
                [e[:, a:b], v[:, a:b] if v is not None else np.zeros((c1 - c0, kb))], axis=1
            )
        )
        Y = X @ Rm.T
        new_e[:, a:b] = Y[:, :kb]
        if new_v is not None:
            new_v[:, a:b] = Y[:, kb:] if Y.shape[1] > kb else 0.0
    parts = [new_e] + ([new_v] if new_v is not None else [])
    if c1 - c0 == chunk:
        for arr, p in zip(outputs, parts, strict=True):
            arr[c0:c1] = p
        return []
    return [(c0, parts)]


def _info_from_meta(
    path: Any, curvature: str, meta: dict[str, Any], seconds: float, handling: str | None = None
) -> BuildInfo:
    return BuildInfo(
        path=str(path),
        curvature=curvature,
        array=f"{_base(curvature)}/values",
        dtype=meta["dtype"],
        n_steps=int(meta["n_steps"]),
        n_rows=int(meta["n_rows"]),
        segments=tuple(tuple(b) for b in meta["segments"]),
        velocity=bool(meta["velocity"]),
        optimizer=handling or meta["optimizer"],
        max_operator=float(meta.get("max_operator", 0.0)),
        expansive_steps=tuple(meta.get("expansive_steps", [])),
        seconds=seconds,
        blocks=tuple(tuple(b) for b in meta.get("blocks", [])),
        choice=str(meta.get("choice", {}).get("summary", "")),
    )
