"""Exact first-order trajectory influence by replay: one backward pass through the recorded run.

The recorded run (``Recorder(..., checkpoint_every=N)``) holds the data order, each example's
weight in its step's loss, the learning rate of every param group at every step, the clipping
coefficients, and checkpoints of the weights and optimizer state. :func:`replay_influence` carries
the query's loss gradient at the final weights back through the linearised update of the optimizer
that was used::

    state_{t+1} = F_t(state_t, g_t(theta_t; keep)),   g_t = c_t * sum_z keep_z w_t(z) grad l(z; theta_t)
    lambda_T    = (grad L_test(theta_T), 0, 0)
    lambda_t    = (dF_t / d state_t)^T lambda_{t+1}       (the Hessian enters through g_t: an HVP)
    score_t(z)  = -d L_test / d keep_z = -w_t(z) * mu_t . grad l(z; theta_t),   mu_t = (dF_t / dg)^T lambda_{t+1}

``state`` is ``theta`` and, as the optimizer has them, SGD's momentum buffer or Adam's two moments
(the second one included); ``F_t`` is a functional re-implementation of torch's single-tensor
update (SGD with momentum, dampening, Nesterov, coupled decay, maximize; Adam/AdamW with bias
correction, eps, coupled or decoupled decay), differentiated by autograd, so the adjoint is the
exact vector-Jacobian product of the step; clipping by the global norm is differentiated too
(``clipping="norm"``: the coefficient is ``max_norm / (||g|| + 1e-6)`` on a clipped step, with
``max_norm`` recovered from the recorded coefficient) or held fixed (``"constant"``).

The weights of every step come from the nearest checkpoint by replaying forward (memory: one
checkpoint interval of states); each interval's replay must reproduce the next checkpoint
(:class:`ReplayMismatchError` otherwise: non-deterministic layers such as dropout, a different
optimizer, clipping the recorder was not told of, a loss function other than the stepped one).

The per-example dot products ``mu_t . grad l(z)`` for all ``b`` examples of a batch come without
per-sample gradients: a forward-mode JVP of the per-example loss vector along ``mu_t``
(``dots="jvp"``, ``torch.func.jvp`` over ``torch.func.functional_call``), or, in the same double
backward that gives ``lambda_t`` and the Hessian-vector product, the derivative with respect to
per-example multipliers ``keep`` of the loss (``dots="reverse"``, the default: no extra pass, and
no forward-mode AD needed). Cost per step: one forward and backward for the replay, one double
backward per query, and with ``dots="jvp"`` a JVP per query (docs/results/replay.md: on a tiny
GPT-2, 4.4-7.3x the training run with ``"reverse"``, 8.1-9.3x with ``"jvp"``).

Sign convention: ``score = loss(without) - loss(with)`` to first order; positive = helped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture._checkpoint import Checkpoint, checkpoint_steps, read_checkpoint
from datavalue.errors import DataValueError

logger = logging.getLogger(__name__)

__all__ = ["ReplayError", "ReplayMismatchError", "replay_scores"]

DOTS = ("jvp", "reverse")
CLIPPING = ("norm", "constant")
#: default check of a forward replay against the next checkpoint: ||theta_replay - theta_ckpt|| over
#: ||theta_ckpt - theta_start|| (the interval's movement), by dtype
DEFAULT_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}


class ReplayError(DataValueError, ValueError):
    """A replay cannot run: missing checkpoints, an unsupported optimizer, bad arguments."""


class ReplayMismatchError(DataValueError, RuntimeError):
    """Replaying the recorded steps from a checkpoint does not reproduce the next checkpoint."""


# ----------------------------------------------------------------------------- the optimizer, functionally
@dataclasses.dataclass(frozen=True)
class _Group:
    """One param group's static settings (from the checkpoint) and its parameters' indices."""

    index: list[int]
    settings: dict[str, Any]


@dataclasses.dataclass
class _State:
    """The optimizer's state before a step: ``theta`` and per-parameter moments (``None``: absent)."""

    theta: list[torch.Tensor]
    m: list[torch.Tensor | None]  # SGD momentum buffer or Adam exp_avg
    v: list[torch.Tensor | None]  # Adam exp_avg_sq
    count: list[float]  # Adam's step count before the update

    def detached(self) -> _State:
        d = lambda xs: [None if x is None else x.detach() for x in xs]  # noqa: E731
        return _State(d(self.theta), d(self.m), d(self.v), list(self.count))


def _kind(name: str) -> str:
    k = name.lower()
    if k not in ("sgd", "adam", "adamw"):
        raise ReplayError(f"replay supports torch.optim.SGD, Adam and AdamW; the run's optimizer is {name}. "
                          "Use the embeddings (build_embeddings) for other optimizers.")
    return k


def _update(kind: str, groups: list[_Group], hp: dict[str, np.ndarray], st: _State,
            g: list[torch.Tensor | None]) -> _State:
    """One torch step, out of place and differentiable: ``st`` before the update, ``g`` the gradient
    the optimizer sees (clipped; ``None``: the parameter has no gradient this step and is skipped,
    as torch does). ``hp``: this step's ``lr``, ``momentum``, ``weight_decay`` per group."""
    theta, m, v, count = list(st.theta), list(st.m), list(st.v), list(st.count)
    for gi, grp in enumerate(groups):
        s = grp.settings
        lr, wd = float(hp["lr"][gi]), float(hp["weight_decay"][gi])
        for i in grp.index:
            gr = g[i]
            if gr is None:
                continue
            p = theta[i]
            if s.get("maximize"):
                gr = -gr
            if kind == "sgd":
                mom, damp = float(hp["momentum"][gi]), float(s.get("dampening", 0.0) or 0.0)
                if wd != 0:
                    gr = gr.add(p, alpha=wd)
                if mom != 0:
                    buf = gr if m[i] is None else m[i].mul(mom).add(gr, alpha=1 - damp)
                    m[i] = buf
                    gr = gr.add(buf, alpha=mom) if s.get("nesterov") else buf
                theta[i] = p.add(gr, alpha=-lr)
                continue
            b1, b2 = (float(x) for x in s["betas"])
            eps = float(s["eps"])
            decoupled = kind == "adamw" or bool(s.get("decoupled_weight_decay"))
            count[i] = count[i] + 1.0
            if wd != 0:
                if decoupled:
                    p = p.mul(1 - lr * wd)
                else:
                    gr = gr.add(p, alpha=wd)
            mi = torch.zeros_like(p) if m[i] is None else m[i]
            vi = torch.zeros_like(p) if v[i] is None else v[i]
            mi = mi.lerp(gr, 1 - b1)
            vi = vi.mul(b2).addcmul(gr, gr, value=1 - b2)
            step = count[i]
            bc1, bc2 = 1 - b1**step, 1 - b2**step
            live = vi > 0  # sqrt is not differentiable at 0; such coordinates had no gradient at all
            sv = torch.where(live, torch.where(live, vi, torch.ones_like(vi)).sqrt(), torch.zeros_like(vi))
            denom = (sv / bc2**0.5).add(eps)
            theta[i] = p.addcdiv(mi, denom, value=-lr / bc1)
            m[i], v[i] = mi, vi
    return _State(theta, m, v, count)


# ----------------------------------------------------------------------------- the model, functionally
class _Objective(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` substitutes the weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.model, batch)


@dataclasses.dataclass
class _Setup:
    run: Any
    obj: _Objective
    query_obj: _Objective
    names: list[str]
    kind: str
    groups: list[_Group]
    get_batch: Callable[[np.ndarray], Any]
    clipping: str
    device: torch.device
    dtype: torch.dtype
    #: parameters the optimizer does not update and buffers, from the checkpoint (held fixed)
    constants: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def params(self, theta: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.constants | {f"model.{n}": t for n, t in zip(self.names, theta, strict=True)}

    def hold(self, ck: Checkpoint) -> None:
        """Take the frozen parameters and buffers from checkpoint ``ck`` (those the model has)."""
        own = {n for n, _ in self.obj.model.named_parameters()} | {n for n, _ in self.obj.model.named_buffers()}
        self.constants = {f"model.{n}": t.to(self.device) for n, t in ck.model.items()
                          if n in own and n not in set(self.names)}

    def losses(self, theta: Sequence[torch.Tensor], batch: Any, n: int) -> torch.Tensor:
        out = torch.func.functional_call(self.obj, self.params(theta), (batch,))
        if not torch.is_tensor(out) or out.dim() != 1 or out.shape[0] != n:
            raise ReplayError(f"loss_fn(model, batch) must return one loss per example ({n},), got "
                              f"{getattr(out, 'shape', type(out).__name__)}.")
        return out

    def hyper(self, t: int) -> dict[str, np.ndarray]:
        run, G = self.run, len(self.groups)
        if run.has_param_groups:
            hp = run.param_groups
            return {k: np.asarray(hp[k][t], np.float64) for k in ("lr", "momentum", "weight_decay")}
        if G != 1:
            raise ReplayError(f"{run.path}: the checkpoints have {G} param groups but the run has no per-group "
                              "learning rates (group_lr).")
        return {"lr": np.array([run.lr[t]]), "momentum": np.array([run.momentum[t]]),
                "weight_decay": np.array([run.weight_decay[t]])}

    def step_data(self, t: int) -> tuple[np.ndarray, torch.Tensor, Any, float]:
        run = self.run
        a, b = int(run.step_ptr[t]), int(run.step_ptr[t + 1])
        ids = run.sample_id[a:b]
        w = torch.as_tensor(run.weight[a:b], dtype=self.dtype, device=self.device)
        return ids, w, self.get_batch(ids), float(run.grad_scale[t])


def _clip(g: list[torch.Tensor | None], c: float, clipping: str, graph: bool) -> list[torch.Tensor | None]:
    """The clipped gradient: ``c g`` with the recorded coefficient; with ``graph`` and a clipped step
    (``c < 1``, ``clipping="norm"``) as ``max_norm / (||g|| + 1e-6) g`` (torch's clip_grad_norm_),
    ``max_norm = c (||g|| + 1e-6)``, so that its derivative is the clipping's."""
    if c == 1.0:
        return g
    live = [x for x in g if x is not None]
    if graph and clipping == "norm" and c < 1.0 and live:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in live]))
        max_norm = c * (float(norm.detach()) + 1e-6)
        coef = max_norm / (norm + 1e-6)
        return [None if x is None else x * coef for x in g]
    return [None if x is None else x * c for x in g]


def _gradient(setup: _Setup, theta: list[torch.Tensor], batch: Any, w: torch.Tensor, keep: torch.Tensor | None,
              *, graph: bool) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    losses = setup.losses(theta, batch, w.shape[0])
    weights = w if keep is None else w * keep
    total = (losses * weights).sum()
    g = torch.autograd.grad(total, theta, create_graph=graph, allow_unused=True)
    return list(g), losses


def _state_from(setup: _Setup, ck: Checkpoint) -> _State:
    theta, m, v, count = [], [], [], []
    for n in setup.names:
        theta.append(ck.model[n].to(device=setup.device))
        st = ck.state.get(n, {})
        if setup.kind == "sgd":
            buf = st.get("momentum_buffer")
            m.append(buf.to(setup.device) if torch.is_tensor(buf) else None)
            v.append(None)
            count.append(0.0)
        else:
            m.append(st["exp_avg"].to(setup.device) if "exp_avg" in st else None)
            v.append(st["exp_avg_sq"].to(setup.device) if "exp_avg_sq" in st else None)
            s = st.get("step", 0.0)
            count.append(float(s.item() if torch.is_tensor(s) else s))
    return _State(theta, m, v, count)


def _deviation(a: _State, b: _State, start: _State) -> float:
    num = sum(float(torch.sum((x.double() - y.double()) ** 2)) for x, y in zip(a.theta, b.theta, strict=True))
    den = sum(float(torch.sum((y.double() - s.double()) ** 2)) for y, s in zip(b.theta, start.theta, strict=True))
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def _forward(setup: _Setup, start: _State, t0: int, t1: int) -> list[_State]:
    """States before steps ``t0 .. t1`` (``t1 - t0 + 1`` of them), replayed from ``start``."""
    states = [start]
    st = start
    for t in range(t0, t1):
        _, w, batch, c = setup.step_data(t)
        theta = [x.detach().requires_grad_(True) for x in st.theta]
        with torch.enable_grad():
            g, _ = _gradient(setup, theta, batch, w, None, graph=False)
        g = [None if x is None else x.detach() for x in g]
        with torch.no_grad():
            st = _update(setup.kind, setup.groups, setup.hyper(t), st, _clip(g, c, setup.clipping, graph=False))
        states.append(st.detached())
    return states


def _backward_step(setup: _Setup, st: _State, t: int, adj: list[_State], dots: str) -> tuple[list[_State], np.ndarray]:
    """Carry every query's adjoint back over step ``t``; returns the new adjoints and ``(m, b)`` scores."""
    try:
        return _backward_step_impl(setup, st, t, adj, dots)
    except (NotImplementedError, RuntimeError) as exc:
        text = str(exc)
        if "not implemented" not in text.lower() and "forward AD" not in text:
            raise
        raise ReplayError(
            f"step {t}: an operation of the model has no {'forward-mode' if 'forward AD' in text else 'second'} "
            f"derivative in torch ({text.splitlines()[0][:160]}). Replay needs double backward (Hessian-vector "
            "products) and, with dots='jvp', forward-mode AD. Fused attention kernels lack them on some devices: "
            "build transformers models with attn_implementation='eager', or pass dots='reverse' if only the "
            "forward-mode derivative is missing.") from exc


def _backward_step_impl(setup: _Setup, st: _State, t: int, adj: list[_State], dots: str
                        ) -> tuple[list[_State], np.ndarray]:
    ids, w, batch, c = setup.step_data(t)
    theta = [x.detach().requires_grad_(True) for x in st.theta]
    m = [None if x is None else x.detach().requires_grad_(True) for x in st.m]
    v = [None if x is None else x.detach().requires_grad_(True) for x in st.v]
    keep = torch.ones_like(w).requires_grad_(True) if dots == "reverse" else None
    with torch.enable_grad():
        g, _ = _gradient(setup, theta, batch, w, keep, graph=True)
        new = _update(setup.kind, setup.groups, setup.hyper(t), _State(theta, m, v, list(st.count)),
                      _clip(g, c, setup.clipping, graph=True))
        outs = []
        for i, x in enumerate(new.theta):
            outs.append(("theta", i, x))
        for i, x in enumerate(new.m):
            if x is not None:
                outs.append(("m", i, x))
        for i, x in enumerate(new.v):
            if x is not None:
                outs.append(("v", i, x))
        ins = theta + [x for x in m if x is not None] + [x for x in v if x is not None]
        live_g = [x for x in g if x is not None]
        extra = [keep] if keep is not None else live_g
        new_adj, scores = [], []
        for q in adj:
            grad_out = [getattr(q, part)[i] for part, i, _ in outs]
            pairs = [(o[2], go) for o, go in zip(outs, grad_out, strict=True) if go is not None and o[2].requires_grad]
            res = torch.autograd.grad([p for p, _ in pairs], ins + extra, grad_outputs=[go for _, go in pairs],
                                      retain_graph=True, allow_unused=True)
            k = len(theta)
            th = [torch.zeros_like(x) if r is None else r.detach() for r, x in zip(res[:k], theta, strict=True)]
            rest = iter(res[k : len(ins)])
            mm = [None if x is None else _or_zero(next(rest), x) for x in m]
            vv = [None if x is None else _or_zero(next(rest), x) for x in v]
            new_adj.append(_State(th, mm, vv, []))
            if keep is not None:
                r = res[len(ins)]
                scores.append(-(torch.zeros_like(w) if r is None else r.detach()))
            else:
                mu = [_or_zero(r, x) for r, x in zip(res[len(ins):], live_g, strict=True)]
                scores.append(_jvp_dots(setup, st.theta, g, mu, batch, w))
    return new_adj, torch.stack(scores).detach().to(torch.float64).cpu().numpy()


def _or_zero(r: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if r is None else r.detach()


def _jvp_dots(setup: _Setup, theta: list[torch.Tensor], g: list[torch.Tensor | None], mu: list[torch.Tensor],
              batch: Any, w: torch.Tensor) -> torch.Tensor:
    """``-w_z mu . grad l(z)`` for every example: one forward-mode pass of the loss vector along ``mu``."""
    it = iter(mu)
    tangent = tuple(next(it) if x is not None else torch.zeros_like(p) for x, p in zip(g, theta, strict=True))
    primal = tuple(x.detach() for x in theta)
    _, d = torch.func.jvp(lambda *ps: setup.losses(ps, batch, w.shape[0]), primal, tangent)
    return -(w * d).detach()


def _query_adjoints(setup: _Setup, theta: list[torch.Tensor], query: Callable[[nn.Module], torch.Tensor],
                    st: _State) -> tuple[list[_State], np.ndarray]:
    x = [t.detach().requires_grad_(True) for t in theta]
    with torch.enable_grad():
        out = torch.func.functional_call(setup.query_obj, setup.params(x), (None,))
        if not torch.is_tensor(out) or out.dim() != 1 or out.shape[0] == 0:
            raise ReplayError(f"query(model) must return a non-empty vector of per-test-point losses (m,), got "
                              f"{getattr(out, 'shape', type(out).__name__)}.")
        adj = []
        for j in range(out.shape[0]):
            gr = torch.autograd.grad(out[j], x, retain_graph=True, allow_unused=True)
            th = [_or_zero(r, p) for r, p in zip(gr, x, strict=True)]
            adj.append(_State(th, [None if y is None else torch.zeros_like(y) for y in st.m],
                              [None if y is None else torch.zeros_like(y) for y in st.v], []))
    return adj, out.detach().to(torch.float64).cpu().numpy()


def _batches(batches: Any, collate: Callable[[list[Any]], Any] | None) -> Callable[[np.ndarray], Any]:
    if callable(batches) and not hasattr(batches, "__getitem__"):
        return batches
    if hasattr(batches, "__getitem__"):
        if collate is None:
            from torch.utils.data import default_collate as collate
        return lambda ids: collate([batches[int(i)] for i in ids])
    raise ReplayError(f"batches must be a callable ids -> batch or a dataset indexable by sample id, got "
                      f"{type(batches).__name__}.")


# ----------------------------------------------------------------------------- the public function
def _parse_steps(steps: Any, T: int) -> tuple[int, int]:
    """``(t0, t1)`` from ``steps`` (``None``: the whole run; a ``None`` end is open). Only int step indices:
    a float or a bool is refused, never truncated; negative ends count from the end; an end past the run or
    an empty or reversed window is refused (the same rule as the query package's ``parse_steps``, which
    capture may not import)."""
    if steps is None:
        return 0, T
    if isinstance(steps, str | bytes):
        raise ReplayError(f"steps must be a pair of int step indices (t0, t1), got the string {steps!r}; "
                          "pass e.g. steps=(0, 4).")
    try:
        t0, t1 = steps
    except (TypeError, ValueError):
        raise ReplayError(f"steps must be a pair of int step indices (t0, t1) (half-open, like range), got "
                          f"{steps!r}; pass e.g. steps=(0, 4).") from None
    for end in (t0, t1):
        if end is not None and (isinstance(end, bool | np.bool_) or not isinstance(end, int | np.integer)):
            raise ReplayError(f"steps must be a pair of int step indices (t0, t1) (None for an open end), got "
                              f"{steps!r} ({type(end).__name__} {end!r}); nothing is rounded: pass e.g. "
                              "steps=(0, 4).")
    for end in (t0, t1):  # negative ends count from the end (like range); past either end is an error, not clipped
        if end is not None and not -T <= end <= T:
            raise ReplayError(f"steps={steps!r} reaches past the run's steps 0..{T - 1} (ends may lie in -{T}..{T}; "
                              "negative ones count from the end); nothing is clipped.")
    a, b, _ = slice(None if t0 is None else int(t0), None if t1 is None else int(t1)).indices(T)
    if b <= a:
        raise ReplayError(f"steps={steps!r} is empty or reversed (steps {a}..{b - 1}; half-open, like range); the run "
                          f"has steps 0..{T - 1}: pass t0 < t1, e.g. steps=({a}, {a + 1}).")
    return a, b


def replay_scores(
    run: Any,
    model: nn.Module,
    batches: Any,
    query: Callable[[nn.Module], torch.Tensor],
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    steps: tuple[int, int] | None = None,
    dots: str = "reverse",
    clipping: str = "norm",
    collate: Callable[[list[Any]], Any] | None = None,
    tolerance: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The replay's numbers, not written anywhere: ``{"scores": (R, m), "test_losses": (m,), "checks":
    {checkpoint step: deviation}, "steps": (t0, t1), "rows": (r0, r1), "seconds": float, ...}``.

    Arguments as :func:`datavalue.replay_influence`, which also stores the scores in the run and
    returns them as a :class:`datavalue.query.ReplayResult`.
    """
    from datavalue.store import Run, open_run

    run = run if isinstance(run, Run) else open_run(run)
    if dots not in DOTS:
        raise ReplayError(f"dots must be one of {DOTS}, got {dots!r}.")
    if clipping not in CLIPPING:
        raise ReplayError(f"clipping must be one of {CLIPPING}, got {clipping!r}.")
    T = run.n_steps
    ckpts = [s for s in checkpoint_steps(run) if s <= T]
    if not ckpts or ckpts[-1] != T:
        raise ReplayError(f"{run.path} has no checkpoint of the final weights (step {T}; checkpoints at {ckpts}). "
                          "Record with Recorder(..., checkpoint_every=N): it writes one on close().")
    t0, t1 = _parse_steps(steps, T)
    if not 0 <= t0 <= t1 <= T:
        raise ReplayError(f"steps must be a window (t0, t1) inside 0..{T}, got {steps!r}.")
    if t0 < ckpts[0]:
        raise ReplayError(f"{run.path}: the first checkpoint is at step {ckpts[0]}; steps before it cannot be replayed. "
                          f"Pass steps=({ckpts[0]}, {T}).")
    final = read_checkpoint(run, T)
    kind = _kind(final.optimizer)
    named = dict(model.named_parameters())
    names = [n for grp in final.groups for n in grp["params"]]
    missing = [n for n in names if n not in named]
    if missing:
        raise ReplayError(f"the model has no parameters {missing[:5]} that the run's optimizer held; pass the "
                          "architecture the run was recorded with.")
    groups, pos = [], {n: i for i, n in enumerate(names)}
    for grp in final.groups:
        settings = {k: v for k, v in grp.items() if k != "params"}
        if settings.get("amsgrad"):
            raise ReplayError("replay does not support Adam(amsgrad=True).")
        groups.append(_Group([pos[n] for n in grp["params"]], settings))
    p0 = named[names[0]]
    setup = _Setup(run=run, obj=_Objective(model, loss_fn), query_obj=_Objective(model, lambda m, _: query(m)),
                   names=names, kind=kind, groups=groups, get_batch=_batches(batches, collate), clipping=clipping,
                   device=p0.device, dtype=final.model[names[0]].dtype)
    tol = DEFAULT_TOLERANCE.get(setup.dtype, 3e-2) if tolerance is None else float(tolerance)
    was_training = model.training
    started = time.perf_counter()
    R0, R1 = int(run.step_ptr[t0]), int(run.step_ptr[t1])
    try:
        model.eval()
        setup.hold(final)
        end = _state_from(setup, final)
        adj, test_losses = _query_adjoints(setup, end.theta, query, end)
        model.train()
        scores = np.zeros((R1 - R0, len(adj)))
        checks: dict[int, float] = {}
        first = max(s for s in ckpts if s <= t0)
        bounds = [s for s in ckpts if s > first]
        it = list(zip([first, *bounds[:-1]], bounds, strict=True))[::-1]  # intervals [a, b), the last first
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=T - t0, desc="replay")
        for a, b in it:
            start = read_checkpoint(run, a)
            setup.hold(start)
            states = _forward(setup, _state_from(setup, start), a, b)
            dev = _deviation(states[-1], _state_from(setup, read_checkpoint(run, b)), states[0])
            checks[b] = dev
            if not dev <= tol:
                raise ReplayMismatchError(
                    f"{run.path}: replaying steps {a}..{b - 1} from the step-{a} checkpoint does not reproduce the "
                    f"step-{b} checkpoint (relative deviation {dev:.3g} of the interval's movement, tolerance {tol:g}). "
                    "Causes: randomness in the step (dropout: replay needs a deterministic step), a loss_fn that is "
                    "not the loss that was stepped on (per-example losses whose weighted sum, with the run's weights, "
                    "is the stepped loss), batches(ids) returning other examples, clipping or gradient scaling the "
                    "recorder was not told of (rec.step(..., clip_coef=...)), or an optimizer other than torch's "
                    "SGD/Adam/AdamW. Pass tolerance= to accept a larger rounding drift (float32/bf16 training).")
            states.pop()  # the state at b: checked, not needed any more (each step's state is dropped once used)
            for t in range(b - 1, max(a, t0) - 1, -1):  # the adjoint is carried from T; scores kept inside [t0, t1)
                adj, s = _backward_step(setup, states.pop(), t, adj, dots)
                if t < t1:
                    r0, r1 = int(run.step_ptr[t]) - R0, int(run.step_ptr[t + 1]) - R0
                    scores[r0:r1] = s.T
                if bar is not None:
                    bar.update(1)
            del states
        if bar is not None:
            bar.close()
    finally:
        model.train(was_training)
    return {"scores": scores, "test_losses": test_losses, "checks": checks, "steps": (t0, t1), "rows": (R0, R1),
            "seconds": time.perf_counter() - started, "dots": dots, "clipping": clipping, "tolerance": tol,
            "optimizer": final.optimizer}
