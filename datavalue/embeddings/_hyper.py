"""Per-(step, block) optimizer hyperparameters of runs whose optimizer has several param groups.

A run recorded with more than one param group stores each group's ``lr``, ``momentum`` and
``weight_decay`` per step (``group_*`` arrays, ``(T, G)``) and which gradient columns belong to
which group (the manifest's ``projection["param_groups"]``). :func:`parse_groups` turns that into
:class:`Groups` for the build's operator blocks, and :func:`step_back` / :func:`adam_step_back` run
one block's recursion step with them. When every group shares its hyperparameters at every step
(or the run has one group, or predates the arrays) the plan carries ``groups=None`` and the scans
call the core exactly as before (bit-identical builds).

How an operator whose columns carry different learning rates or weight decays is stepped exactly,
without changing the core (docs/math.md, section 11). With per-column step sizes ``eta_j`` the SGD
step's row operator update is (section 3, ``B = diag(b_j)``, ``b_j = eta_j (nu + mu a)``,
``Gamma = diag(gamma_j)``, ``Lambda = diag(lambda_j)``)

    P = a R_v - R_theta B,   e = -c w P g,   R_theta <- R_theta + P (c H + Lambda),
    R_v <- beta_in (R_v - R_theta Gamma).

With ``eta0 = max_j eta_j`` and ``D = diag(eta_j / eta0)``, ``B = b0 D`` and ``Gamma = gamma0 D`` (one
momentum, dampening and Nesterov flag per operator), so the core's scalar step applied to the
*rescaled* state ``R_theta D`` yields the right ``P``, embeddings, curvature term and ``R_v``; it only
carries ``R_theta D`` instead of ``R_theta`` into the next state, which is fixed with the elementwise
term ``R_theta (I - D)``, and the per-column decay ``P Lambda`` is applied here (core decay 0). Both
corrections cost ``O(n k)`` per step against the core's ``O(b n k)``; nothing divides by a step size,
so groups with ``lr = 0`` are fine. Adam's coefficients are per parameter already; only AdamW's
decoupled decay ``R_theta diag(1 - eta_j lambda_j)`` and Adam's coupled ``P Lambda`` need the same
kind of elementwise correction.

What cannot be split by column is refused with what to do: a projected block whose parameters sit
in groups with different hyperparameters (a sketch column mixes them), groups with different
momentum, dampening or Nesterov inside one operator, and Adam groups with different betas.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from datavalue.embeddings import _core as core
from datavalue.embeddings._backend import namespace
from datavalue.errors import EmbeddingError, NonFiniteError

#: ``column_groups`` labels written by the recorder (``datavalue.capture._optim``).
MIXED = -1
NO_GROUP = -2


@dataclasses.dataclass(frozen=True)
class BlockGroups:
    """The param groups of one operator block's columns.

    Attributes:
        groups: ``(g,)`` group ids present in the block (the virtual group ``G`` stands for
            recorded parameters that no group holds: lr 0, no decay).
        cols: ``(k,)`` index into ``groups`` per column, or ``None`` when the block has one group.
        momentum: ``(T,)`` the block's SGD momentum (equal across its groups).
        fresh: ``(T,)`` the steps that create the block's momentum buffer.
        dampening, nesterov: the block's SGD settings (equal across its groups).
    """

    groups: np.ndarray
    cols: np.ndarray | None
    momentum: np.ndarray
    fresh: np.ndarray
    dampening: float
    nesterov: bool


@dataclasses.dataclass(frozen=True)
class Groups:
    """Per-group hyperparameters of every step and the column -> group map (picklable).

    Attributes:
        lr, weight_decay: ``(T, G + 1)`` per group (the last column: parameters in no group, zeros).
        eps: ``(G + 1,)`` Adam's eps per group.
        labels: ``(k,)`` group of every column (mixed projected blocks resolved to one of their
            groups after checking that those agree).
        blocks: one :class:`BlockGroups` per operator block of the plan.
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    eps: np.ndarray
    labels: np.ndarray
    blocks: tuple[BlockGroups, ...]

    def block_values(self, i: int, t: int) -> tuple[float | np.ndarray, float | np.ndarray]:
        """Block ``i``'s ``(lr, weight_decay)`` at step ``t``: floats when its groups agree, else
        ``(k_i,)`` per column."""
        bg = self.blocks[i]
        lr, wd = self.lr[t, bg.groups], self.weight_decay[t, bg.groups]
        lr_v = float(lr[0]) if bg.cols is None or np.all(lr == lr[0]) else lr[bg.cols]
        wd_v = float(wd[0]) if bg.cols is None or np.all(wd == wd[0]) else wd[bg.cols]
        return lr_v, wd_v

    def column_values(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lr, weight_decay, eps)`` of every column at step ``t``, each ``(k,)``."""
        return self.lr[t, self.labels], self.weight_decay[t, self.labels], self.eps[self.labels]


def _static(opt: dict[str, Any], g: int, key: str, default: Any) -> Any:
    groups = opt.get("groups") or []
    v = groups[g].get(key, default) if g < len(groups) else opt.get(key, default)
    return default if v is None else v


def _all_agree(run: Any, opt: dict[str, Any], hp: dict[str, np.ndarray], T: int) -> bool:
    G = hp["lr"].shape[1]
    for name in ("lr", "momentum", "weight_decay"):
        a = hp[name][:T]
        if not np.array_equal(a, np.repeat(a[:, :1], G, axis=1)):
            return False
    return all(_static(opt, g, key, None) == _static(opt, 0, key, None)
               for g in range(G) for key in ("dampening", "nesterov", "betas", "eps"))


def parse_groups(
    run: Any, spans: tuple[tuple[int, int], ...], *, handling: str, block_mode: Any
) -> Groups | None:
    """The plan's per-group hyperparameters for operator blocks ``spans``, or ``None`` when the run
    has no param groups or all its groups share every hyperparameter at every step (then the
    scalar ``lr``/``momentum``/``weight_decay`` arrays describe the run exactly)."""
    hp = getattr(run, "param_groups", None)
    opt = run.optimizer or {}
    if hp is None:
        static = [tuple(str(g.get(key)) for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov",
                                                        "betas", "eps")) for g in opt.get("groups") or []]
        agree_at_start = bool(static) and len(set(static)) == 1  # (their settings when recording started)
        if int(opt.get("n_groups", 1) or 1) > 1 and not agree_at_start:
            warnings.warn(
                f"{run.path}: the optimizer had {opt['n_groups']} param groups but the run holds no per-group "
                "hyperparameters (recorded by a front door or version that did not store them), so every column is "
                "modelled with group 0's lr, momentum and weight decay; that is wrong wherever the groups differ. "
                "Re-record with Recorder(..., optimizer=opt) to store every group's.",
                stacklevel=4,
            )
        return None
    T = int(run.n_steps)
    G = int(hp["lr"].shape[1])
    for name, a in hp.items():
        if not np.all(np.isfinite(a[:T])):
            bad = int(np.flatnonzero(~np.isfinite(a[:T]).all(1))[0])
            raise NonFiniteError(
                f"{run.path}: step {bad} has no per-group {name} (group_{name} is NaN there: the step was recorded "
                "without the optimizer's param groups). Re-record the run with Recorder(..., optimizer=opt)."
            )
    if G <= 1 or _all_agree(run, opt, hp, T):
        return None
    entry = run.column_groups or {}
    runs = entry.get("column_groups")
    k = spans[-1][1]
    if not runs:
        raise EmbeddingError(
            f"{run.path}: the optimizer has {G} param groups with different hyperparameters, but the manifest does not "
            "say which gradient columns belong to which group (projection['param_groups'] is missing: the capture "
            "engine was not given the optimizer). Re-record with Recorder(..., optimizer=opt)."
        )
    labels = np.empty(k, dtype=np.int64)
    for a, b, g in runs:
        labels[int(a) : int(b)] = int(g)
    labels[labels == NO_GROUP] = G  # virtual group: never updated
    lr = np.concatenate([hp["lr"][:T], np.zeros((T, 1))], axis=1)
    wd = np.concatenate([hp["weight_decay"][:T], np.zeros((T, 1))], axis=1)
    mom = np.concatenate([hp["momentum"][:T], np.full((T, 1), np.nan)], axis=1)
    statics = {key: [_static(opt, g, key, None) for g in range(G)] + [None]
               for key in ("dampening", "nesterov", "betas", "eps")}
    mixed_blocks = entry.get("mixed_blocks") or {}
    for name, groups in mixed_blocks.items():
        _check_mixed(run, name, [G if g == NO_GROUP else int(g) for g in groups], lr, wd, mom, statics)
    blocks_json = {b["name"]: b for b in run.blocks}
    for name, groups in mixed_blocks.items():
        b = blocks_json[name]
        first = [g for g in groups if g != NO_GROUP]
        labels[int(b["start"]) : int(b["stop"])] = int(first[0]) if first else G
    if np.any(labels == MIXED) or np.any(labels < 0) or np.any(labels > G):
        raise EmbeddingError(f"{run.path}: projection['param_groups'] holds unknown group labels.")
    if handling in ("adam", "adamw"):
        betas = {tuple(b) for b in statics["betas"][:G] if b is not None}
        if len(betas) > 1:
            raise EmbeddingError(
                f"{run.path}: the Adam param groups use different betas {sorted(betas)}; the Adam-aware build needs one "
                "pair. Build with optimizer='sgd-proxy', or train with one betas for every group."
            )
    eps = np.array([float(e) if e is not None else 1e-8 for e in statics["eps"]])
    sgd = handling == "sgd"
    out = []
    for a, b in spans:
        lab = labels[a:b]
        present, cols = np.unique(lab, return_inverse=True)
        real = [int(g) for g in present if g < G]
        m = mom[:, real] if real else np.zeros((T, 1))
        if sgd and not np.all(m == m[:, :1]):
            t = int(np.flatnonzero(~np.all(m == m[:, :1], axis=1))[0])
            raise EmbeddingError(
                f"{run.path}: the operator over columns {a}:{b} holds param groups {real} whose momentum differs "
                f"({m[t].tolist()} at step {t}); one operator needs one momentum. "
                + _fix_hint(block_mode)
            )
        for key in ("dampening", "nesterov"):
            vals = {statics[key][g] for g in real}
            if sgd and len(vals) > 1:
                raise EmbeddingError(
                    f"{run.path}: the operator over columns {a}:{b} holds param groups {real} with different {key} "
                    f"{sorted(vals, key=str)}. " + _fix_hint(block_mode)
                )
        momentum = m[:, 0].copy() if sgd else np.zeros(T)
        prev = np.concatenate([[0.0], momentum[:-1]])
        g0 = real[0] if real else 0
        out.append(BlockGroups(
            groups=present.astype(np.int64),
            cols=None if present.size == 1 else cols.astype(np.int64),
            momentum=momentum,
            fresh=(momentum != 0) & (prev == 0),
            dampening=float(statics["dampening"][g0] or 0.0) if real else 0.0,
            nesterov=bool(statics["nesterov"][g0]) if real else False,
        ))
    return Groups(lr=lr, weight_decay=wd, eps=eps, labels=labels, blocks=tuple(out))


def _fix_hint(block_mode: Any) -> str:
    if block_mode == "layer":
        return ("The recorded block mixes them: put each layer's parameters in groups that share momentum, dampening "
                "and nesterov.")
    return "Build with blocks='layer' (one operator per recorded block), or give the groups the same settings."


def _check_mixed(run: Any, name: str, groups: list[int], lr: np.ndarray, wd: np.ndarray, mom: np.ndarray,
                 statics: dict[str, list[Any]]) -> None:
    """A projected block whose parameters sit in several groups: fine while the groups agree."""
    g = np.asarray(groups)
    for label, arr in (("lr", lr), ("weight_decay", wd), ("momentum", mom)):
        sub = arr[:, g]
        same = np.all((sub == sub[:, :1]) | np.isnan(sub), axis=1)
        if not np.all(same):
            t = int(np.flatnonzero(~same)[0])
            raise EmbeddingError(
                f"{run.path}: block {name!r} is a projected (sketched) block whose parameters sit in param groups "
                f"{groups} with different {label} ({sub[t].tolist()} at step {t}); a sketch column mixes the "
                "parameters, so the groups cannot be told apart. Re-record with proj_dim=None (exact columns), or "
                "keep a layer's weight and bias in groups with the same hyperparameters (e.g. the same weight_decay)."
            )
    for key, vals in statics.items():
        if len({str(vals[i]) for i in g if i < len(vals) - 1}) > 1:
            raise EmbeddingError(
                f"{run.path}: block {name!r} is projected and mixes param groups {groups} with different {key}; "
                "re-record with proj_dim=None, or give those groups the same settings."
            )


# ---------------------------------------------------------------------- SGD


def _vec(xp: Any, v: Any, dtype: Any) -> Any:
    """A numpy vector of per-column values for arithmetic with the state: unchanged on numpy (its code as it
    always ran), moved to the state's device and dtype on the torch backend."""
    return v if xp.is_numpy else xp.asarray(v, dtype)


def step_back(
    plan: Any, i: int, t: int, state: core.BlockState, G: np.ndarray, w: np.ndarray, *, curv: Any,
    grad_scale: float, clip_u: np.ndarray | None, clip_ug: np.ndarray | None, embed: bool,
) -> tuple[core.BlockState, np.ndarray | None]:
    """Block ``i``'s SGD recursion step ``t`` (in place), with its param groups' hyperparameters."""
    if plan.groups is None:
        return core.step_back(
            state, G, w, lr=float(plan.lr[t]), curv=curv, weight_decay=float(plan.weight_decay[t]),
            momentum=float(plan.momentum[t]), dampening=plan.dampening, nesterov=plan.nesterov,
            fresh=bool(plan.fresh[t]), grad_scale=grad_scale, embed=embed, clip_u=clip_u, clip_ug=clip_ug,
            inplace=True,  # the scan owns its states
        )
    bg = plan.groups.blocks[i]
    lr, wd = plan.groups.block_values(i, t)
    kw = dict(curv=curv, momentum=float(bg.momentum[t]), dampening=bg.dampening, nesterov=bg.nesterov,
              fresh=bool(bg.fresh[t]), grad_scale=grad_scale, embed=embed, clip_u=clip_u, clip_ug=clip_ug,
              inplace=True)
    if np.ndim(lr) == 0 and np.ndim(wd) == 0:
        return core.step_back(state, G, w, lr=float(lr), weight_decay=float(wd), **kw)
    return _step_back_columns(state, G, w, np.broadcast_to(lr, (state.k,)), np.broadcast_to(wd, (state.k,)), kw)


def _step_back_columns(state: core.BlockState, G: np.ndarray, w: np.ndarray, lr: np.ndarray, wd: np.ndarray,
                       kw: dict[str, Any]) -> tuple[core.BlockState, np.ndarray | None]:
    """One step with per-column ``lr`` and coupled ``wd`` ``(k,)`` (module docstring): the core's
    scalar step on ``R_theta D``, then ``+ R_theta (I - D)`` and ``+ P Lambda``."""
    k, M = state.k, state.M
    xp = namespace(M)  # the vectors below are numpy; on the torch backend they move to M's device
    eta0 = float(lr.max())
    D = lr / eta0 if eta0 > 0 else np.ones(k)
    coef = core.step_coefficients(eta0, momentum=kw["momentum"], dampening=kw["dampening"],
                                  nesterov=kw["nesterov"], fresh=kw["fresh"])
    scaled = np.flatnonzero(D != 1.0)
    decayed = np.flatnonzero(wd != 0.0)
    # P = a R_v - b0 (Theta0 - M) D on the decayed columns, from the state before the step
    P_l = None
    if decayed.size:
        bD = _vec(xp, coef.b * D[decayed], M.dtype)
        P_l = M[:, decayed] * bD
        P_l[decayed, np.arange(decayed.size)] -= bD
        if state.Rv is not None and coef.a != 0.0:
            P_l += coef.a * state.Rv[:, decayed]
    carry = None
    if scaled.size:
        d = _vec(xp, D[scaled], M.dtype)
        carry = M[:, scaled] * (1.0 - d)  # M (I - D) on those columns
        M[:, scaled] *= d  # R_theta D  <=>  M D + Theta0 (I - D)
        M[scaled, scaled] += 1.0 - d
    new, E = core.step_back(state, G, w, lr=eta0, weight_decay=0.0, **kw)
    M2 = new.M
    if carry is not None:
        d = _vec(xp, D[scaled], M.dtype)
        M2[:, scaled] += carry  # M' = M~' - Theta0 (I - D) + M (I - D)
        M2[scaled, scaled] -= 1.0 - d
    if P_l is not None:
        M2[:, decayed] -= P_l * _vec(xp, wd[decayed], M.dtype)
    return new, E


# ---------------------------------------------------------------------- Adam


def adam_coefficients(
    plan: Any, t: int, m_next: np.ndarray, v_next: np.ndarray, g: np.ndarray, *, step: float,
    betas: tuple[float, float], eps: float, decoupled: bool, second_moment: bool, unit_preconditioner: bool = False,
) -> core.AdamStepCoef:
    """Step ``t``'s Adam coefficients over all columns. With param groups: per-column lr and eps;
    the decay is applied per block by :func:`adam_step_back` (``decay``/``lam`` here: 1 and 0)."""
    if plan.groups is None:
        return core.adam_coefficients(
            m_next, v_next, g, lr=float(plan.lr[t]), step=step, betas=betas, eps=eps,
            weight_decay=float(plan.weight_decay[t]), decoupled=decoupled, second_moment=second_moment,
            unit_preconditioner=unit_preconditioner,
        )
    lr, _, eps_c = plan.groups.column_values(t)
    c = core.adam_coefficients(m_next, v_next, g, lr=lr, step=step, betas=betas, eps=eps_c, weight_decay=0.0,
                               decoupled=True, second_moment=second_moment, unit_preconditioner=unit_preconditioner)
    return dataclasses.replace(c, decay=1.0, lam=0.0)


def adam_step_back(
    plan: Any, i: int, t: int, state: core.AdamBlockState, G: np.ndarray, w: np.ndarray,
    coef_all: core.AdamStepCoef, *, curv: Any, grad_scale: float, embed: bool,
    clip_u: np.ndarray | None = None, clip_ug: np.ndarray | None = None,
) -> tuple[core.AdamBlockState, np.ndarray | None]:
    """Block ``i``'s Adam-aware step ``t`` with its columns of ``coef_all`` and its groups' decay
    (``clip_u``/``clip_ug``: the clipped step's direction, as for :func:`step_back`)."""
    a, b = plan.blocks[i]
    coef = core.AdamStepCoef(
        p=coef_all.p[a:b],
        q=None if coef_all.q is None else coef_all.q[a:b],
        r=None if coef_all.r is None else coef_all.r[a:b],
        b1=coef_all.b1, b2=coef_all.b2, decay=coef_all.decay, lam=coef_all.lam,
    )
    if plan.groups is None:
        return core.adam_step_back(state, G, w, coef, curv=curv, grad_scale=grad_scale, embed=embed, clip_u=clip_u,
                                  clip_ug=clip_ug)
    lr, wd = plan.groups.block_values(i, t)
    decoupled = bool(plan.adam["decoupled"])
    if np.ndim(lr) == 0 and np.ndim(wd) == 0:
        lr, wd = float(lr), float(wd)
        coef = dataclasses.replace(coef, decay=1.0 - lr * wd if decoupled else 1.0, lam=0.0 if decoupled else wd)
        return core.adam_step_back(state, G, w, coef, curv=curv, grad_scale=grad_scale, embed=embed, clip_u=clip_u,
                                  clip_ug=clip_ug)
    k = state.k
    lr_c, wd_c = np.broadcast_to(lr, (k,)), np.broadcast_to(wd, (k,))
    new, E = core.adam_step_back(state, G, w, coef, curv=curv, grad_scale=grad_scale, embed=embed, clip_u=clip_u,
                                  clip_ug=clip_ug)
    M_old, M2 = state.M, new.M  # adam_step_back is pure: state is the state before the step
    xp = namespace(M_old)  # numpy vectors move to the torch backend's device
    cols = np.flatnonzero(wd_c != 0.0)
    if not cols.size:
        return new, E
    if decoupled:
        # R_theta' = R_theta diag(delta) + P A: the core kept R_theta; M' += (Theta0 - M) (I - delta)
        x = _vec(xp, lr_c[cols] * wd_c[cols], M_old.dtype)  # 1 - delta
        Z = -M_old[:, cols] * x
        Z[cols, np.arange(cols.size)] += x
        M2[:, cols] += Z
    else:
        # coupled Adam: P A += P diag(lambda), P = (1 - b1) R_m + R_v diag(r) - R_theta diag(s)
        p = np.asarray(coef.p)
        s = (1.0 - coef.b1) * p
        if coef.q is not None and coef.r is not None:
            s = s - np.asarray(coef.q) * np.asarray(coef.r)
        s_c = _vec(xp, s[cols], M_old.dtype)
        P = M_old[:, cols] * s_c
        P[cols, np.arange(cols.size)] -= s_c
        if state.Rm is not None:
            P += (1.0 - coef.b1) * state.Rm[:, cols]
        if state.Rv is not None and coef.r is not None:
            P += state.Rv[:, cols] * _vec(xp, np.asarray(coef.r)[cols], M_old.dtype)
        M2[:, cols] -= P * _vec(xp, wd_c[cols], M_old.dtype)
    return new, E
