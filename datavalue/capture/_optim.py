"""What the recorders read from a torch optimizer: its configuration (manifest) and each step's
hyperparameters and state (per-step arrays).

Every torch recorder (``Recorder``, ``DataValueCallback``) calls :func:`optimizer_config` once and
:func:`step_fields` at every step, so what a run stores about its optimizer is decided here only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture._engine import Engine, to_numpy
from datavalue.capture._optim_resume import _GROUP_STATIC, RESUME_KEYS, optimizer_resume_diff  # noqa: F401
from datavalue.errors import RecorderError

logger = logging.getLogger(__name__)


def unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer under wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while opt is not None and isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):  # accelerate
        opt = opt.optimizer
    return opt


def is_adam(opt: Any) -> bool:
    """Whether ``opt`` (possibly wrapped) is a ``torch.optim.Adam``/``AdamW``."""
    return opt is not None and type(unwrap_optimizer(opt)).__name__.lower() in ("adam", "adamw")


#: ``column_groups`` entry of a projected column whose block mixes parameters of several groups.
MIXED = -1
#: ``column_groups`` entry of a recorded parameter that no param group holds (never updated).
NO_GROUP = -2


def optimizer_config(opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The manifest's ``optimizer`` entry.

    With more than one param group it also holds ``groups``: each group's static settings
    (dampening, nesterov, betas, eps, ...). The per-step values are the ``group_*`` arrays
    (:func:`step_fields`); which columns belong to which group is the projection's
    ``param_groups`` (:func:`column_groups`, written by ``Engine(..., optimizer=...)``); see
    docs/store-format.md.
    """
    if opt is None:
        return {"kind": None, "dampening": 0.0, "nesterov": False}
    opt = unwrap_optimizer(opt)
    g = opt.param_groups[0]
    kind = type(opt).__name__.lower()
    cfg: dict[str, Any] = {"kind": kind, "class": type(opt).__qualname__, "n_groups": len(opt.param_groups),
                           "dampening": float(g.get("dampening", 0.0) or 0.0), "nesterov": bool(g.get("nesterov", False))}
    for key in ("betas", "eps", "amsgrad", "maximize", "decoupled_weight_decay"):
        if key in g:
            cfg[key] = list(g[key]) if isinstance(g[key], tuple) else g[key]
    if len(opt.param_groups) > 1:
        cfg["groups"] = [_group_static(gr) for gr in opt.param_groups]
    return cfg


def _group_static(group: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _GROUP_STATIC:
        if key in group:
            v = group[key].item() if torch.is_tensor(group[key]) else group[key]
            out[key] = [float(x) for x in v] if isinstance(v, tuple | list) else (
                float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
    return out


def column_groups(opt: Any, engine: Engine) -> dict[str, Any]:
    """The projection's ``param_groups`` entry: ``{"n_groups": G, "column_groups": [[start, stop,
    group], ...], "mixed_blocks": {block: [groups]}}``, runs over the run's gradient columns.

    Exact blocks (``proj_dim=None``) map every column to its parameter's group, through the same
    layout as the gradients (``block_matrix``: a Linear's ``[W | b]``); a projected column mixes the
    parameters of its block, so a block whose parameters sit in several groups is ``-1`` (mixed) in
    every column (the engine splits a Linear's bias off when the groups differ, so this is left for
    layers whose rule cannot). ``-2``: a recorded parameter that no group holds (never updated).
    Builds accept a mixed block only while its groups' hyperparameters agree at every step.
    """
    from datavalue.capture._gradients import block_matrix

    opt = unwrap_optimizer(opt)
    of_param = {id(p): gi for gi, gr in enumerate(opt.param_groups) for p in gr["params"]}
    named = dict(engine.model.named_parameters())
    exact_run = engine.proj_dim is None
    labels, mixed = [], {}
    for b in engine.blocks:
        gids = {q: of_param.get(id(named[q]), NO_GROUP) for q in b.params}
        if len(set(gids.values())) == 1:
            labels.append(np.full(b.k, next(iter(gids.values())), dtype=np.int64))
            continue
        bj = b.to_json()
        if exact_run and b.k == int(np.prod(bj["shape"])):
            lab = {q: torch.full(named[q].shape, float(gids[q]), dtype=torch.float64) for q in b.params}
            labels.append(block_matrix(bj, lab).reshape(-1).numpy().astype(np.int64))
        else:
            mixed[b.name] = sorted(set(gids.values()))
            labels.append(np.full(b.k, MIXED, dtype=np.int64))
    lab = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    edges = np.flatnonzero(np.diff(lab)) + 1
    starts = np.concatenate([[0], edges]).astype(int)
    stops = np.concatenate([edges, [lab.size]]).astype(int)
    runs = [[int(a), int(b), int(lab[a])] for a, b in zip(starts, stops, strict=True) if b > a]
    return {"n_groups": len(opt.param_groups), "column_groups": runs, "mixed_blocks": mixed}


def _value(x: Any) -> float:
    return float(x.item() if torch.is_tensor(x) else x)


def check_hyperparameters(opt: Any, step: int) -> None:
    """Refuse a step whose optimizer reports a learning rate, momentum, weight decay, betas or eps that
    no update can have (NaN, infinite, negative; betas outside ``[0, 1)``): recorded, it would poison
    every build. Reads what each param group holds now (what ``optimizer.step()`` is about to use)."""
    for gi, g in enumerate(unwrap_optimizer(opt).param_groups):
        bad = []
        for key in ("lr", "momentum", "weight_decay", "eps", "dampening"):
            if key in g and g[key] is not None:
                try:
                    if isinstance(g[key], (str, bytes, bool)):
                        raise TypeError(key)
                    v = _value(g[key])
                except (TypeError, ValueError, RuntimeError):
                    bad.append(f"{key}={g[key]!r} (not a number)")
                    continue
                if not math.isfinite(v) or v < 0:
                    bad.append(f"{key}={v!r}")
        for i, beta in enumerate(g.get("betas") or ()):
            try:
                v = float("nan") if isinstance(beta, (str, bytes, bool)) else _value(beta)
            except (TypeError, ValueError, RuntimeError):
                v = float("nan")
            if not (math.isfinite(v) and 0.0 <= v < 1.0):
                bad.append(f"betas[{i}]={beta!r}")
        if bad:
            raise RecorderError(
                f"step {step}: the optimizer's param group {gi} reports {', '.join(bad)}; an update needs finite, "
                "non-negative hyperparameters (betas in [0, 1)). Nothing was written for this step. Check what "
                "sets them (a scheduler, a manual param_groups edit) before optimizer.step()."
            )


def optimizer_state(opt: torch.optim.Optimizer | None) -> dict[str, float]:
    """The step's ``lr``, ``momentum`` and ``weight_decay`` of param group 0 (NaN lr without an
    optimizer); :func:`group_state` gives every group's."""
    if opt is None:
        return {"lr": float("nan"), "momentum": 0.0, "weight_decay": 0.0}
    g = unwrap_optimizer(opt).param_groups[0]
    return {
        "lr": _value(g["lr"]),
        "momentum": float(g.get("momentum", 0.0) or 0.0),
        "weight_decay": float(g.get("weight_decay", 0.0) or 0.0),
    }


def group_state(opt: Any) -> dict[str, np.ndarray]:
    """Every param group's ``lr``, ``momentum`` and ``weight_decay`` now, as ``group_*`` ``(G,)`` arrays."""
    groups = unwrap_optimizer(opt).param_groups
    return {
        "group_lr": np.array([_value(g["lr"]) for g in groups], dtype=np.float64),
        "group_momentum": np.array([float(g.get("momentum", 0.0) or 0.0) for g in groups], dtype=np.float64),
        "group_weight_decay": np.array([float(g.get("weight_decay", 0.0) or 0.0) for g in groups], dtype=np.float64),
    }


def adam_moments(opt: Any, model: nn.Module, engine: Engine, *, precise: bool = True) -> dict[str, Any]:
    """Adam/AdamW moments *before* this step's update (read before ``optimizer.step()``).

    ``adam_m[t]``, ``adam_v[t]`` are torch's ``exp_avg``/``exp_avg_sq`` after step ``t - 1``
    (zeros at the first step), in the run's columns: exact runs map every parameter to its
    column (``exact_layout``); projected runs store each block's mean of the moments in all its
    columns (a scalar preconditioner per block, see docs/math.md). ``adam_step[t]`` is the
    bias-correction count of step ``t``'s update (torch's ``state["step"]`` after it).

    It runs at every recorded step, so it makes one pass over the moments and one device-to-host
    copy (issue 20): a projected block's mean is the sum of its parameters' moments, each summed
    in float64 on their device, over the block's size (the mean of the concatenated block up to
    float64 rounding, without concatenating or converting the moments); an exact block copies each
    parameter (converted) into its columns of one float64 vector. A parameter without state yet
    (no update so far, or in no param group) counts as zeros.

    ``precise=False`` sums each projected parameter's moments in its own dtype, float32 at least (torch's cascade sum)
    before the float64 total: about 6x faster on the CPU (0.2 against 1.5 ms per step of the 670k
    parameter MLP of ``benchmarks/capture_overhead.py``), at a relative error of the order of float32's
    rounding (1e-8 to 1e-7 of the block's mean ``|moment|``), which the recorder uses when it stores
    the moments as float32 or float16 anyway; ``True`` (float64 sums) is what float64 storage gets.
    """
    opt = unwrap_optimizer(opt)
    params = dict(model.named_parameters())
    state = opt.state
    steps = set()
    for p in params.values():
        if p.requires_grad:
            s = (state.get(p) or {}).get("step", 0)
            steps.add(float(s.item() if torch.is_tensor(s) else s))
    m, v = _moments_in_columns(state, params, engine, precise=precise)
    return {"adam_m": m, "adam_v": v, "adam_step": (max(steps) if steps else 0.0) + 1.0}


_MOMENTS = ("exp_avg", "exp_avg_sq")


def _moment(state: Any, p: torch.Tensor, key: str) -> torch.Tensor | None:
    st = state.get(p)  # opt.state is a defaultdict: .get does not insert
    t = st.get(key) if st else None
    return None if t is None else t.detach()


def _moments_in_columns(state: Any, params: Mapping[str, torch.Tensor], engine: Engine, *,
                        precise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(k,)`` float64 ``adam_m``, ``adam_v`` in the run's columns (see :func:`adam_moments`)."""
    from datavalue.capture._gradients import block_matrix

    blocks = engine.blocks
    unprojected = engine.proj_dim is None
    exact = [unprojected and b.k == int(np.prod(b.shape)) for b in blocks]
    sizes = [0] * len(blocks)  # elements of each projected block
    sums: list[torch.Tensor] = []  # projected blocks: each parameter's moment summed in float64 ...
    owner: list[int] = []  # ... and where it adds: 2 * block + (0: exp_avg, 1: exp_avg_sq)
    out = None  # exact blocks: both moments in their columns, float64, on the moments' device
    if any(exact):
        device = next((t.device for p in params.values() if (t := _moment(state, p, "exp_avg")) is not None), None)
        out = torch.empty((2, sum(b.k for b, e in zip(blocks, exact, strict=True) if e)), dtype=torch.float64,
                          device=device)
    at = 0
    for i, b in enumerate(blocks):
        if not exact[i]:
            for q in b.params:
                p = params[q]
                sizes[i] += p.numel()
                st = state.get(p)  # opt.state is a defaultdict: .get does not insert
                if st:
                    for j, key in enumerate(_MOMENTS):
                        t = st.get(key)
                        if t is not None:  # the state of an optimizer's parameter needs no detach
                            # precise=False: float32 at least, never a bf16/fp16 sum (0.3% off, P9-15)
                            sums.append(t.sum(dtype=torch.float64 if precise
                                              else torch.promote_types(t.dtype, torch.float32)))
                            owner.append(2 * i + j)
            continue
        for j, key in enumerate(_MOMENTS):
            flat = out[j, at : at + b.k]
            views = _param_views(flat, b, params)
            if views is None:  # a layout these views do not cover (a custom rule's): block_matrix's own
                named = {q: _moment(state, params[q], key) for q in b.params}
                named = {q: torch.zeros_like(params[q]) if t is None else t for q, t in named.items()}
                flat.copy_(block_matrix(b.to_json(), named).reshape(-1))
                continue
            for view, q in views:
                t = _moment(state, params[q], key)
                if t is None:
                    view.zero_()
                else:
                    view.copy_(t.reshape(view.shape))
        at += b.k
    widths = [b.k for b in blocks]
    n = len(blocks)
    totals = np.zeros(2 * n, dtype=np.float64)
    if sums:  # one device-to-host copy; bincount adds each block's sums in order, from +0.0
        if len({t.device for t in sums}) > 1:  # a model split over devices
            sums = [t.cpu() for t in sums]
        if not precise:  # one dtype for the stack (parameters of mixed dtypes)
            sums = [t.to(torch.float64) for t in sums]
        totals = np.bincount(np.asarray(owner), weights=to_numpy(torch.stack(sums)), minlength=2 * n)
    means = totals.reshape(n, 2) / np.maximum(np.asarray(sizes, dtype=np.float64), 1.0)[:, None]
    if out is None:  # a projected run: every column holds its block's mean
        return np.repeat(means[:, 0], widths), np.repeat(means[:, 1], widths)
    host = to_numpy(out)
    if all(exact):
        return host[0], host[1]
    m, v = np.repeat(means[:, 0], widths), np.repeat(means[:, 1], widths)
    col, at = 0, 0
    for i, b in enumerate(blocks):
        if exact[i]:
            m[col : col + b.k], v[col : col + b.k] = host[0, at : at + b.k], host[1, at : at + b.k]
            at += b.k
        col += b.k
    return m, v


def _param_views(flat: torch.Tensor, b: Any, params: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, str]] | None:
    """Views of ``flat`` (one exact block's ``k`` columns) that each of the block's parameters fills, in
    ``_gradients.block_matrix``'s layout; ``None`` when the block's shape does not match its parameters."""
    sizes = [params[q].numel() for q in b.params]
    if sum(sizes) != flat.numel():
        return None
    if b.kind != "kron":
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return [(flat[offsets[i] : offsets[i + 1]], q) for i, q in enumerate(b.params)]
    rows, cols = b.shape
    if rows * cols != flat.numel() or len(b.params) != 1 + bool(b.has_bias):
        return None
    mat = flat.view(rows, cols)
    if not b.has_bias:
        return [(mat, b.params[0])]
    if b.bias_axis == 0:  # HF Conv1D / flax kernel: [W; b], W (in, out)
        views = [(mat[: rows - 1], b.params[0]), (mat[rows - 1], b.params[1])]
    else:
        views = [(mat[:, : cols - 1], b.params[0]), (mat[:, cols - 1], b.params[1])]
    return views if all(v.numel() == n for (v, _), n in zip(views, sizes, strict=True)) else None


def step_fields(opt: Any, model: nn.Module, engine: Engine, *, record_state: bool, lr: float | None = None,
                step: int = -1, precise: bool = True) -> dict[str, Any]:
    """The optimizer's part of a step's ``StepBlock``: ``lr``, ``momentum``, ``weight_decay`` (param
    group 0) and ``extra``: the Adam moments when ``record_state``, and with more than one param group
    each group's ``group_lr``, ``group_momentum``, ``group_weight_decay`` ``(G,)``. Read before
    ``optimizer.step()``.

    ``precise``: float64 sums of the Adam moments (see :func:`adam_moments`).

    ``lr``: an explicit learning rate given to the recorder (overrides the optimizer's). With several
    param groups the groups' lrs are read from the optimizer, so an explicit ``lr`` that disagrees
    with group 0's is refused rather than recorded inconsistently.
    """
    if opt is not None:
        check_hyperparameters(opt, step)
    st = optimizer_state(opt)
    extra = adam_moments(opt, model, engine, precise=precise) if (record_state and opt is not None) else None
    if opt is not None and len(unwrap_optimizer(opt).param_groups) > 1:
        groups = group_state(opt)
        if lr is not None and not np.isclose(float(lr), groups["group_lr"][0], rtol=1e-12, atol=0.0):
            raise RecorderError(
                f"rec.step(lr={float(lr)!r}) disagrees with the optimizer's param group 0 (lr "
                f"{groups['group_lr'][0]!r}); with {groups['group_lr'].size} param groups the recorder reads every "
                "group's lr from the optimizer. Set the lrs on optimizer.param_groups and pass lr=None."
            )
        extra = dict(extra or {}, **groups)
    return {
        "lr": float(lr) if lr is not None else st["lr"],
        "momentum": st["momentum"],
        "weight_decay": st["weight_decay"],
        "extra": extra,
    }


# the update checks live in their own module; these names stay importable from here
from datavalue.capture._optim_checks import (  # noqa: E402, F401
    GRADIENT_ATOL,
    GRADIENT_RTOL,
    NOT_PER_EXAMPLE,
    ONE_OPTIMIZER,
    WEIGHTS_RTOL,
    BlockGradientCheck,
    GradientProbe,
    PendingStep,
    UnrecordedGradients,
    gradient_tolerances,
)
