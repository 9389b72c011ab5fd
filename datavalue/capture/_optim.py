"""What the recorders read from a torch optimizer: its configuration (manifest) and each step's
hyperparameters and state (per-step arrays).

Every torch recorder (``Recorder``, ``DataValueCallback``) calls :func:`optimizer_config` once and
:func:`step_fields` at every step, so what a run stores about its optimizer is decided here only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture._engine import Engine, to_numpy

logger = logging.getLogger(__name__)


def unwrap_optimizer(opt: Any) -> Any:
    """The torch optimizer under wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while opt is not None and isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):  # accelerate
        opt = opt.optimizer
    return opt


def is_adam(opt: Any) -> bool:
    """Whether ``opt`` (possibly wrapped) is a ``torch.optim.Adam``/``AdamW``."""
    return opt is not None and type(unwrap_optimizer(opt)).__name__.lower() in ("adam", "adamw")


def optimizer_config(opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The manifest's ``optimizer`` entry."""
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
    lrs = {float(gr["lr"]) for gr in opt.param_groups}
    if len(lrs) > 1:
        logger.warning("optimizer has param groups with different lr %s; the run records group 0's lr", sorted(lrs))
    return cfg


def optimizer_state(opt: torch.optim.Optimizer | None) -> dict[str, float]:
    """The step's ``lr``, ``momentum`` and ``weight_decay`` (NaN lr without an optimizer)."""
    if opt is None:
        return {"lr": float("nan"), "momentum": 0.0, "weight_decay": 0.0}
    g = unwrap_optimizer(opt).param_groups[0]
    lr = g["lr"]
    return {
        "lr": float(lr.item() if torch.is_tensor(lr) else lr),
        "momentum": float(g.get("momentum", 0.0) or 0.0),
        "weight_decay": float(g.get("weight_decay", 0.0) or 0.0),
    }


def adam_moments(opt: Any, model: nn.Module, engine: Engine) -> dict[str, Any]:
    """Adam/AdamW moments *before* this step's update (read before ``optimizer.step()``).

    ``adam_m[t]``, ``adam_v[t]`` are torch's ``exp_avg``/``exp_avg_sq`` after step ``t - 1``
    (zeros at the first step), in the run's columns: exact runs map every parameter to its
    column (``exact_layout``); projected runs store each block's mean of the moments in all its
    columns (a scalar preconditioner per block, see docs/math.md). ``adam_step[t]`` is the
    bias-correction count of step ``t``'s update (torch's ``state["step"]`` after it).
    """
    from datavalue.capture._gradients import block_matrix

    opt = unwrap_optimizer(opt)
    params = dict(model.named_parameters())
    m_named, v_named, steps = {}, {}, set()
    for name, p in params.items():
        st = opt.state.get(p, {})
        m_named[name] = st["exp_avg"].detach() if "exp_avg" in st else torch.zeros_like(p)
        v_named[name] = st["exp_avg_sq"].detach() if "exp_avg_sq" in st else torch.zeros_like(p)
        if p.requires_grad:
            s = st.get("step", 0)
            steps.add(float(s.item() if torch.is_tensor(s) else s))
    m_parts, v_parts = [], []
    for b in engine.blocks:
        bj = b.to_json()
        exact = b.k == int(np.prod(bj["shape"])) and engine.projection_json().get("proj_dim") is None
        mm = block_matrix(bj, m_named).to(torch.float64).reshape(-1)
        vv = block_matrix(bj, v_named).to(torch.float64).reshape(-1)
        if not exact:
            mm, vv = mm.mean().expand(b.k), vv.mean().expand(b.k)
        m_parts.append(mm)
        v_parts.append(vv)
    return {
        "adam_m": to_numpy(torch.cat(m_parts)),
        "adam_v": to_numpy(torch.cat(v_parts)),
        "adam_step": (max(steps) if steps else 0.0) + 1.0,
    }


def step_fields(opt: Any, model: nn.Module, engine: Engine, *, record_state: bool, lr: float | None = None) -> dict[str, Any]:
    """The optimizer's part of a step's ``StepBlock``: ``lr``, ``momentum``, ``weight_decay`` and
    ``extra`` (the Adam moments when ``record_state``). Read before ``optimizer.step()``.

    ``lr``: an explicit learning rate given to the recorder (overrides the optimizer's).
    """
    st = optimizer_state(opt)
    extra = adam_moments(opt, model, engine) if (record_state and opt is not None) else None
    return {
        "lr": float(lr) if lr is not None else st["lr"],
        "momentum": st["momentum"],
        "weight_decay": st["weight_decay"],
        "extra": extra,
    }
