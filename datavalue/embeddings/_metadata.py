"""What a build stored about itself: its choice of curvature and blocks, its metadata, its config.

A build's attributes live on ``embeddings/<curvature>/values`` under :data:`ATTRS_KEY`. This module
states the build's choice in words (:func:`_choice`, logged at INFO, stored as ``choice`` and shown
by ``datavalue info``), reads the stored metadata back (:func:`build_metadata`) and recovers the
options a stored build was made with (:func:`stored_config`, :func:`_stored_blocks`,
:func:`_replay_optimizer`), which extensions, checkpoints and :func:`~datavalue.embeddings.check_build`
must reuse rather than today's defaults.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# auto's caps are read from the module when used (tests patch them)
from datavalue.embeddings import _plan as _plan_module
from datavalue.embeddings._config import BuildConfig
from datavalue.embeddings._plan import (
    CURVATURES,
    FULL_CURVATURES,
    _blocks,
    _kept_fraction,
    _Plan,
    _state_factor,
)
from datavalue.errors import EmbeddingError

__all__ = ["ATTRS_KEY", "build_metadata", "stored_config"]

ATTRS_KEY = "datavalue_embeddings"


def _base(curvature: str) -> str:
    """Where the build of ``curvature`` lives inside the run."""
    return f"embeddings/{curvature}"


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


def _choice(run: Any, requested_curvature: str | None, requested_blocks: Any, plan: _Plan,
            requested_window: int | str = 0) -> dict[str, Any]:
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
    if plan.fisher_window > 0:
        summary += f"; Fisher pooled over steps t-{plan.fisher_window}..t+{plan.fisher_window} (fisher_window"
        summary += "='auto': sampled Fisher labels, one operator over all columns)" if requested_window == "auto" \
            else ")"
    elif requested_window == "auto" and plan.curvature == "fisher":
        summary += ("; each step's own Fisher (fisher_window='auto' pools sampled Fisher labels under one operator "
                    "over all columns only)")
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


# ---------------------------------------------------------------------- the stored config


def stored_config(meta: dict[str, Any]) -> BuildConfig:
    """The :class:`BuildConfig` a build was made with (builds from before ``build_config`` was
    stored: from their own metadata keys)."""
    if meta.get("build_config"):
        cfg = dict(meta["build_config"])
        # builds from before fisher_window was a config field: the window they had (0), not today's default
        cfg.setdefault("fisher_window", meta.get("fisher_window", 0) or 0)
        return BuildConfig.from_json(cfg)
    return BuildConfig(curvature=meta.get("curvature"), dtype=meta.get("dtype", "float64"),
                       storage_dtype=meta.get("storage_dtype", "float32"), clipping=meta.get("clipping", "direction"),
                       blocks=meta.get("block_mode", "layer") if meta.get("block_mode") in ("auto", "layer", "full")
                       else "layer")


def _stored_blocks(meta: dict[str, Any]) -> Any:
    """The operator spans of a stored build. Never the current default: an extension or a checkpoint
    must use the very blocks the build was made with (builds made before ``blocks`` existed were
    per layer)."""
    return meta.get("blocks") or "layer"


def _stored_fisher_window(meta: dict[str, Any], where: Any = "this build") -> int:
    """The ``fisher_window`` a stored build was made with, as the int it resolved to (builds from before it
    existed: 0, each step's own Fisher). Like the blocks, never today's default: a checkpoint, an extension and
    :func:`~datavalue.embeddings.check_build` must pool as the build did.

    Raises:
        EmbeddingError: the stored value is not an int ``>= 0`` (metadata edited or damaged), or is ``> 0`` on a
            build whose curvature is not ``"fisher"``; naming ``where`` and the rebuild.
    """
    W = meta.get("fisher_window", 0)
    W = 0 if W is None else W
    curvature = meta.get("curvature")
    if isinstance(W, bool) or not isinstance(W, int) or W < 0 or (W > 0 and curvature != "fisher"):
        raise EmbeddingError(
            f"{where}: the build's stored fisher_window is {W!r}"
            + (f" on a {curvature!r} build" if isinstance(W, int) and not isinstance(W, bool) and W > 0 else "")
            + ", which no build stores (an int >= 0, > 0 only for curvature='fisher'): its metadata was edited or "
            f"damaged. Rebuild it with build_embeddings(run, {curvature!r}, fisher_window=..., overwrite=True)."
        )
    return W


def rebuild_call(path: Any, curvature: str | None, meta: dict[str, Any], prefix: str = "") -> str:
    """The call that rebuilds the build ``meta`` describes with its own Fisher window (a hint in error messages:
    a rebuild without it would pool differently, or not at all)."""
    try:
        W = _stored_fisher_window(meta)
    except EmbeddingError:
        W = 0
    window = f", fisher_window={W}" if W > 0 else ""
    return f"{prefix}build_embeddings({str(path)!r}, curvature={curvature!r}{window}, overwrite=True)"


def _replay_optimizer(meta: dict[str, Any]) -> str | None:
    """The optimizer handling a stored build used (older builds: the default choice)."""
    return "sgd-proxy" if meta.get("optimizer") == "sgd-proxy" else None
