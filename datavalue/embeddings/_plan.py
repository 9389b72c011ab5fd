"""The build plan: a run's per-step bookkeeping, validated once and made picklable for tasks.

``_make_plan`` reads what the recursion needs from the store (lr, clipping, weight decay,
momentum, which step creates the momentum buffer, block column ranges) so that every task works
from plain numpy arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from typing import Any

import numpy as np

from datavalue.embeddings._config import check_fisher_window
from datavalue.embeddings._hyper import parse_groups
from datavalue.errors import CurvatureUnavailableError, EmbeddingError, NonFiniteError

CURVATURES = ("hessian", "fisher", "empirical_fisher", "none")
#: Curvatures whose cross-layer terms ``blocks="auto"`` keeps (one operator over all columns).
FULL_CURVATURES = ("hessian", "fisher")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a task needs (picklable: plain numbers and numpy arrays)."""

    path: str
    curvature: str
    dtype: str
    blocks: tuple[tuple[int, int], ...]
    step_ptr: np.ndarray
    fisher_ptr: np.ndarray | None
    lr: np.ndarray
    grad_scale: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    fresh: np.ndarray
    dampening: float
    nesterov: bool
    momentum_mode: bool
    window: int
    explode: float
    clipping: str = "direction"
    adam: dict[str, Any] | None = None  # Adam-aware mode: betas, eps, decoupled, second_moment, exact
    #: per-(step, block) hyperparameters of a run whose param groups differ (``_hyper.Groups``); ``None``:
    #: the scalar ``lr``/``weight_decay``/``momentum`` above hold for every column
    groups: Any = None
    #: where the recursion runs: ``None`` numpy, else a torch device string (``datavalue.embeddings._backend``)
    device: str | None = None
    #: ``curvature="fisher"`` only: step ``t``'s Fisher is the mean of the recorded Fisher matrices of steps
    #: ``max(0, t - W) .. min(T - 1, t + W)`` (their rows pooled, :class:`._streamio._PooledFisher`); 0: its own
    fisher_window: int = 0
    #: the pooled windows end at step ``fisher_end - 1`` (0: the run's last step, ``n_steps - 1``): an extension
    #: replays the old build's last steps with the windows that build had (``_extend._PooledTail``)
    fisher_end: int = 0

    @property
    def n_steps(self) -> int:
        return int(self.lr.shape[0])

    def width(self, i: int) -> int:
        return _state_factor(self.adam is not None, self.momentum_mode) * (self.blocks[i][1] - self.blocks[i][0])


def _parse_curvature(run: Any, curvature: str | None) -> str:
    if curvature is None:
        return "hessian" if run.has_hessian else "fisher" if run.has_fisher else "empirical_fisher"
    if curvature not in CURVATURES:
        raise EmbeddingError(f"curvature must be one of {CURVATURES} or None, got {curvature!r}.")
    if curvature == "hessian" and not run.has_hessian:
        raise CurvatureUnavailableError(
            f"{run.path} holds no per-step Hessians, so curvature='hessian' is unavailable. Record with "
            "Recorder(..., curvature='hessian') and rec.step(..., hessian_loss=...) (k Hessian-vector products per "
            "step: small models), or build with curvature='fisher' or 'empirical_fisher'."
        )
    if curvature == "fisher" and not run.has_fisher:
        raise CurvatureUnavailableError(
            f"{run.path} holds no true-Fisher pseudo-gradients, so curvature='fisher' is unavailable. Record with "
            "Recorder(..., curvature='fisher') (one extra backward per step, the most faithful choice), or build with "
            "curvature='empirical_fisher'."
        )
    return curvature


#: What ``fisher_window="auto"`` becomes on a ``curvature="fisher"`` build with one operator over all columns
#: (``blocks`` resolved to ``"full"``) whose Fisher rows are sampled labels; every other build gets 0. See
#: :func:`resolve_fisher_window`.
AUTO_FISHER_WINDOW = 4


def parse_fisher_window(fisher_window: Any, curvature: str) -> int | str:
    """``fisher_window`` as an int ``W >= 0`` or ``"auto"`` (resolved with the blocks, :func:`resolve_fisher_window`);
    ``W > 0`` only with ``curvature="fisher"`` (it pools the stored true-Fisher rows of neighbouring steps; the other
    curvatures store no rows to pool)."""
    W = check_fisher_window(fisher_window)
    if W != "auto" and W > 0 and curvature != "fisher":
        raise EmbeddingError(
            f"fisher_window={W} applies to curvature='fisher' only (it pools the recorded true-Fisher rows of steps "
            f"t-{W}..t+{W}); this build's curvature is {curvature!r}. Build with curvature='fisher' (a run recorded "
            "with Recorder(..., curvature='fisher')), or leave fisher_window=0."
        )
    return W


def resolve_fisher_window(fisher_window: int | str, curvature: str, spans: tuple[tuple[int, int], ...],
                          run: Any = None) -> int:
    """The int window of a build: ``fisher_window`` itself, or for ``"auto"`` :data:`AUTO_FISHER_WINDOW` when the
    build is ``curvature="fisher"`` with one operator over all columns and ``run``'s Fisher rows are sampled
    labels (:func:`sampled_fisher`), else 0.

    Why (docs/results/lm.md, ``fisher_window``): with one sampled label per position a step's Fisher is a few
    rank-one terms, and the cross-block operator carries their noise into every entry; pooling over ``W = 4``
    lifted the full operator's late removals from 0.54 to 0.70 on the AdamW LM at 5% of P (0.41 -> 0.52 at 1%),
    while the per-block operators moved by 0.01, and on the digits MLP with the exact 10-class Fisher (no label
    noise) ``W = 4`` moved the full operator by -0.004 to +0.0005: neither pays the ``2W + 1`` times Fisher flops."""
    if fisher_window != "auto":
        return int(fisher_window)
    if curvature != "fisher" or len(spans) != 1 or run is None or not sampled_fisher(run):
        return 0
    return AUTO_FISHER_WINDOW


def sampled_fisher(run: Any) -> bool:
    """Whether ``run``'s true-Fisher rows are sampled labels (``Recorder(fisher_samples=S)``: ``S`` rows per
    occurrence) rather than the exact class expectation (``C`` rows per occurrence). Runs without the recorder's
    Fisher entry in the manifest (written by hand) count as exact. ``S == C`` reads as sampled: pooling an exact
    Fisher was measured harmless (:func:`resolve_fisher_window`)."""
    info = (run.manifest.get("curvature") or {}).get("fisher")
    if not isinstance(info, dict) or not isinstance(info.get("samples"), int) or not run.has_fisher:
        return False
    T = int(run.n_steps)
    rows = int(np.asarray(run.step_ptr)[T]) if T else 0
    fisher_rows = int(np.asarray(run.fisher_ptr)[T]) if T else 0
    return rows > 0 and fisher_rows == int(info["samples"]) * rows


CLIPPING = ("direction", "constant")


def _parse_clipping(clipping: str) -> str:
    if clipping not in CLIPPING:
        raise EmbeddingError(f"clipping must be one of {CLIPPING}, got {clipping!r}.")
    return clipping


def _parse_dtype(dtype: str) -> str:
    d = str(np.dtype(dtype))
    if d not in ("float64", "float32"):
        raise EmbeddingError(f"dtype must be 'float64' or 'float32', got {dtype!r}.")
    return d


def _manifest_blocks(run: Any) -> list[dict[str, Any]]:
    """The run manifest's block entries (empty for a manifest without them)."""
    try:
        return list(run.blocks)
    except (KeyError, TypeError):
        return []


def _blocks(run: Any) -> tuple[tuple[int, int], ...]:
    k = int(run.proj_dim)
    blocks = _manifest_blocks(run)
    spans = sorted((int(b["start"]), int(b["stop"])) for b in blocks) or [(0, k)]
    pos = 0
    for a, b in spans:
        if a != pos or b <= a:
            raise EmbeddingError(
                f"{run.path}: manifest blocks {spans} do not tile the {k} gradient columns."
            )
        pos = b
    if pos != k:
        raise EmbeddingError(
            f"{run.path}: manifest blocks end at column {pos}, the gradients have {k}."
        )
    return tuple(spans)


BLOCK_MODES = ("auto", "layer", "full")
#: ``blocks="auto"`` keeps one operator over all columns while it takes at most this many bytes.
AUTO_FULL_BYTES = 256 << 20


def _state_factor(adam: bool, momentum_mode: bool) -> int:
    return 3 if adam else 2 if momentum_mode else 1


def _resolve_blocks(
    run: Any, blocks: Any, *, curvature: str, adam: bool, momentum_mode: bool, dtype: str
) -> tuple[tuple[int, int], ...]:
    """Column spans of the operators: the recorded blocks (``"layer"``), one span (``"full"``), or
    for ``"auto"``: ``"full"`` with the true Fisher or the exact Hessian when its operator fits :data:`AUTO_FULL_BYTES`,
    else ``"layer"``. An explicit sequence of spans (a stored build's) is validated and used as is.

    Why ``"auto"`` depends on the curvature (measured, docs/results/loo_fidelity.md): the full true
    Fisher beat the per-layer one with exact gradients and moderate sketches, while the full
    *empirical* Fisher scored lower than its per-layer form on the digits MLP (0.886 vs 0.929 at
    lr 0.07); with ``"none"`` the operator stays the identity and blocks do not matter. Under heavy
    compression (a sketch keeping under :data:`AUTO_FULL_KEPT` of the dimensions) it stays per layer,
    for SGD and Adam/AdamW runs alike (the evidence, both optimizers, is at :data:`AUTO_FULL_KEPT`)."""
    spans = _blocks(run)
    k = spans[-1][1]
    if not isinstance(blocks, str):
        given = tuple((int(a), int(b)) for a, b in blocks)
        edges = [a for a, _ in given] + [given[-1][1]] if given else []
        if not given or edges[0] != 0 or edges[-1] != k or any(
            x[1] != y[0] for x, y in zip(given, given[1:])
        ) or any(b <= a for a, b in given):
            raise EmbeddingError(f"{run.path}: block spans {given} do not tile the {k} gradient columns.")
        return given
    if blocks not in BLOCK_MODES:
        raise EmbeddingError(
            f"blocks must be one of {BLOCK_MODES}, got {blocks!r}: 'layer' keeps one operator per recorded block "
            "(memory sum of k_l^2), 'full' one operator over all columns (cross-layer curvature, memory k^2)."
        )
    if blocks == "layer" or len(spans) == 1 or (blocks == "auto" and curvature not in FULL_CURVATURES):
        return spans
    if blocks == "full":
        return ((0, k),)
    width = _state_factor(adam, momentum_mode) * k
    fits = width * width * np.dtype(dtype).itemsize <= AUTO_FULL_BYTES
    return ((0, k),) if fits and _kept_fraction(run) >= AUTO_FULL_KEPT else spans


#: ``blocks="auto"`` takes the full operator only while the sketch keeps at least this fraction of
#: the recorded parameters' dimensions. Under heavy compression the cross-layer operator measured
#: worse, with SGD and with AdamW (Spearman against exact trajectory LOO):
#:
#: - SGD, a 241-column sketch (0.5%) of a 50,890-parameter MLP with the exact 10-class Fisher
#:   (docs/results/poison.md, exact-LOO check): 0.17 with one full operator against 0.33 per layer
#:   (0.20 against 0.38 when this threshold was set);
#: - AdamW, the small GPT-2 LM of docs/results/lm.md (P = 108,416, token-mean loss, one sampled Fisher
#:   label per position, the default ``clipping="direction"``), late / all removals, mean of three
#:   Fisher draws: at 1% of P full 0.41 / 0.09 against per layer 0.44 / 0.13; at 5% of P full 0.54 /
#:   0.10 against 0.55 / 0.18 (the draws spread the full operator by 0.2: 0.40 to 0.62, per layer 0.52
#:   to 0.57). With 8 Fisher labels per position (``Recorder(fisher_samples=8)``) the full operator
#:   wins the late removals (0.77 against 0.57 at 5%, three draws; 0.47 against 0.45 at 1%) but still
#:   loses the early ones (all removals 0.06 against 0.16 at 5%), and at 5% its state (0.70 GB) is
#:   over :data:`AUTO_FULL_BYTES` anyway;
#: - at 1,018 of 3,322 dims (31%) and with exact gradients the full operator was better everywhere
#:   (docs/results/loo_fidelity.md).
AUTO_FULL_KEPT = 0.25


def _kept_fraction(run: Any) -> float:
    """Stored columns / parameter dimensions of the recorded blocks (1.0 for exact runs)."""
    blocks = _manifest_blocks(run)
    k = sum(int(b["stop"]) - int(b["start"]) for b in blocks)
    dims = sum(int(np.prod(b["shape"])) if b.get("shape") else int(b["stop"]) - int(b["start"]) for b in blocks)
    return k / dims if dims else 1.0


OPTIMIZERS = ("adam", "adamw", "sgd", "sgd-proxy")


def _optimizer_handling(run: Any, optimizer: str | None = None) -> tuple[str, dict[str, Any]]:
    """How to model the recorded optimizer: ``"sgd"`` (exact), ``"adam"``/``"adamw"``
    (Adam-aware, needs the recorded moments) or ``"sgd-proxy"`` (Adam run treated as SGD)."""
    opt = run.optimizer or {}
    kind = opt.get("kind")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise EmbeddingError(f"optimizer must be one of {OPTIMIZERS} or None, got {optimizer!r}.")
    if kind in (None, "sgd"):
        if optimizer in ("adam", "adamw"):
            raise EmbeddingError(
                f"{run.path} was not trained with Adam/AdamW (recorded optimizer: {kind!r}); "
                "optimizer='adam'/'adamw' needs a run recorded with Recorder(..., optimizer=<Adam/AdamW>)."
            )
        return "sgd", opt
    is_adam = kind in ("adam", "adamw")
    if optimizer in ("adam", "adamw") or (optimizer is None and is_adam and run.has_adam_state):
        if not is_adam:
            raise EmbeddingError(f"{run.path} was trained with {kind!r}, not Adam/AdamW.")
        if not run.has_adam_state:
            raise EmbeddingError(
                f"{run.path} holds no Adam moments (arrays adam_m, adam_v, adam_step), which Adam-aware embeddings "
                "need. Record with Recorder(..., optimizer=opt, record_optimizer_state=True) (the default for "
                "Adam/AdamW optimizers), or build the SGD proxy with optimizer='sgd-proxy'."
            )
        if run.adam_first_step() != 0:
            raise EmbeddingError(
                f"{run.path}: Adam moments were recorded only from step {run.adam_first_step()} on (the run was resumed "
                "by a Recorder that stored them); re-record the whole run, or use optimizer='sgd-proxy'."
            )
        if opt.get("amsgrad") or opt.get("maximize"):
            raise EmbeddingError(f"{run.path}: amsgrad/maximize Adam is not supported by the Adam-aware build.")
        decoupled = kind == "adamw" or bool(opt.get("decoupled_weight_decay", False))
        return ("adamw" if decoupled else "adam"), opt
    if optimizer == "sgd":
        raise EmbeddingError(f"{run.path} was trained with {kind!r}; use optimizer='sgd-proxy' to treat it as SGD.")
    warnings.warn(
        f"{run.path} was trained with {kind!r}; the embeddings treat it as SGD with the recorded learning rates "
        "(momentum and preconditioning ignored, the paper's proxy). Validate with datavalue.testing.trajectory_loo "
        "before trusting rankings at a large learning rate"
        + (
            "; record with Recorder(..., optimizer=opt, record_optimizer_state=True) for Adam-aware embeddings."
            if is_adam and optimizer is None
            else "."
        ),
        stacklevel=3,
    )
    return "sgd-proxy", opt


def _make_plan(
    run: Any,
    curvature: str,
    dtype: str,
    window: int | None,
    explode: float,
    clipping: str = "direction",
    optimizer: str | None = None,
    second_moment: bool = True,
    blocks: Any = "layer",
    fisher_window: int | str = 0,
) -> tuple[_Plan, str]:
    handling, opt = _optimizer_handling(run, optimizer)
    T = int(run.n_steps)
    momentum = np.asarray(run.momentum, dtype=np.float64)[:T].copy()
    hp = run.param_groups if getattr(run, "has_param_groups", False) else None
    if hp is not None and hp["momentum"].shape[1] > 1 and np.all(np.isfinite(hp["momentum"][:T])):
        momentum = hp["momentum"][:T].max(axis=1)  # any group's momentum: the state carries velocity
    if handling != "sgd":
        momentum[:] = 0.0
    if np.any(momentum < 0) or np.any(momentum >= 1):
        raise EmbeddingError(
            f"{run.path}: momentum must lie in [0, 1), got range [{momentum.min()}, {momentum.max()}]."
        )
    prev = np.concatenate([[0.0], momentum[:-1]])
    # torch creates the momentum buffer (buf = d, no dampening) on the first step with momentum != 0
    fresh = (momentum != 0) & (prev == 0)
    lr = np.asarray(run.lr, dtype=np.float64)[:T]
    if not np.all(np.isfinite(lr)):
        bad = int(np.flatnonzero(~np.isfinite(lr))[0])
        raise NonFiniteError(
            f"{run.path}: the recorded lr of step {bad} is {lr[bad]}; pass lr= to rec.step() or optimizer=."
        )
    weight_decay = np.asarray(run.weight_decay, dtype=np.float64)[:T]
    if _maximize(run, opt):
        # torch's maximize=True steps with -grad: theta' = theta - lr (-g + wd theta) (momentum alike) is the
        # descent step with (-lr, -wd) (the velocity changes sign with it), so the recursion takes both negated
        lr, weight_decay = -lr, -weight_decay
    spans = _resolve_blocks(
        run, blocks, curvature=curvature, adam=handling in ("adam", "adamw"), momentum_mode=bool(np.any(momentum != 0)),
        dtype=dtype,
    )
    plan = _Plan(
        path=str(run.path),
        curvature=curvature,
        dtype=dtype,
        blocks=spans,
        step_ptr=np.asarray(run.step_ptr, dtype=np.int64)[: T + 1],
        fisher_ptr=np.asarray(run.fisher_ptr, dtype=np.int64)[: T + 1]
        if curvature == "fisher"
        else None,
        lr=lr,
        grad_scale=np.asarray(run.grad_scale, dtype=np.float64)[:T],
        weight_decay=weight_decay,
        momentum=momentum,
        fresh=fresh,
        dampening=float(opt.get("dampening", 0.0) or 0.0),
        nesterov=bool(opt.get("nesterov", False)),
        momentum_mode=bool(np.any(momentum != 0)),
        window=int(window or max(run.row_chunk, 1)),
        explode=float(explode),
        clipping=_parse_clipping(clipping),
        adam=_adam_info(run, opt, handling, second_moment) if handling in ("adam", "adamw") else None,
        groups=parse_groups(run, spans, handling=handling, block_mode=blocks),
        fisher_window=resolve_fisher_window(parse_fisher_window(fisher_window, curvature), curvature, spans, run),
    )
    if plan.groups is not None and _maximize(run, opt):
        raise EmbeddingError(
            f"{run.path}: the run was trained with maximize=True (gradient ascent) and param groups whose lr, momentum "
            "or weight decay differ; the SGD build models maximize=True only when every group shares them. Give the "
            "groups the same hyperparameters, or validate with datavalue.replay_influence (which models maximize)."
        )
    return plan, handling


def _maximize(run: Any, opt: dict[str, Any]) -> bool:
    """Whether the recorded SGD stepped with ``maximize=True`` (gradient ascent); refused when the param
    groups disagree (one operator per block needs one sign)."""
    flags = {bool(g.get("maximize", False)) for g in opt.get("groups") or []} or {bool(opt.get("maximize", False))}
    if len(flags) > 1:
        raise EmbeddingError(
            f"{run.path}: some param groups of the recorded optimizer step with maximize=True (gradient ascent) and "
            "some without; the build models one sign per run. Train every group with the same maximize, or use "
            "datavalue.replay_influence (which models each group's)."
        )
    return flags.pop()


def _adam_info(run: Any, opt: dict[str, Any], handling: str, second_moment: bool) -> dict[str, Any]:
    exact = run.manifest.get("projection", {}).get("proj_dim") is None
    betas = opt.get("betas") or [0.9, 0.999]
    whitened = run.manifest.get("projection", {}).get("precondition") == "adam"
    return {
        # rows whitened by the step's sqrt(D) at record time: SGD with momentum in whitened coordinates
        "whitened": whitened,
        "betas": (float(betas[0]), float(betas[1])),
        "eps": float(opt.get("eps", 1e-8)),
        "decoupled": handling == "adamw",
        # under a sketch the stored moments are block means: the v-term needs per-parameter g
        "second_moment": bool(second_moment) and exact,
        "exact": exact,
    }


def _digest(plan: _Plan, T: int) -> str:
    """Fingerprint of the first ``T`` steps' bookkeeping (a resumed run must keep it)."""
    h = hashlib.sha256()
    for arr in (
        plan.step_ptr[: T + 1],
        plan.lr[:T],
        plan.grad_scale[:T],
        plan.weight_decay[:T],
        plan.momentum[:T],
    ):
        h.update(np.ascontiguousarray(arr).tobytes())
    if plan.fisher_ptr is not None:
        h.update(np.ascontiguousarray(plan.fisher_ptr[: T + 1]).tobytes())
    if plan.groups is not None:  # runs whose param groups differ (older builds never had any)
        for arr in (plan.groups.lr[:T], plan.groups.weight_decay[:T], plan.groups.labels):
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _split(step_ptr: np.ndarray, lo: int, hi: int, K: int) -> list[tuple[int, int]]:
    """``K`` contiguous step ranges covering ``[lo, hi)`` with about equal row counts."""
    n = hi - lo
    K = max(1, min(int(K), n))
    rows = step_ptr[lo : hi + 1].astype(np.float64)
    targets = rows[0] + (rows[-1] - rows[0]) * np.arange(1, K) / K
    cuts = lo + np.searchsorted(rows, targets, side="left")
    bounds = [lo]
    for c in cuts:
        c = int(min(max(c, bounds[-1] + 1), hi - (K - len(bounds))))
        bounds.append(c)
    bounds.append(hi)
    return [(bounds[i], bounds[i + 1]) for i in range(K)]


# ---------------------------------------------------------------------- row streaming
