"""The gradient check of a recorded step: a cheap random reduction of the run's columns, and its tolerances.

:class:`GradientProbe` reduces the run's columns (and, by linearity, a full gradient in ``.grad``, in one
pass over it) to a few numbers per block; :func:`gradient_tolerances` says how far the two ways of
computing one step's gradient (per-example hooks, autograd) may differ by rounding. Two checks use them:
:class:`BlockGradientCheck` (a recorder without an optimizer: each block's ``.grad`` against its rows)
and ``_optim_checks.UnrecordedGradients`` (with ``optimizer=``: the update against the recorded step).
Split out of ``capture/_optim_checks.py`` (house rule on module size); ``_optim_checks`` and ``_optim``
re-export every name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from datavalue.capture._engine import Engine
from datavalue.errors import RecorderError

#: A step's gradient check (:class:`UnrecordedGradients`): the largest relative residual
#: ``|g - c r| / |g|`` of the applied gradient ``g`` (``.grad``, sketched) after removing its
#: best multiple of the recorded one ``r`` (the captured rows' sum), and the largest relative
#: difference between that multiple ``c`` and the recorded clip coefficient; ``max(GRADIENT_RTOL,
#: 4 u)`` for parameters whose dtype has unit roundoff ``u``. The honest residual is the rounding
#: of two ways of computing one sum (per-example hooks vs autograd): measured at most 5e-7 in
#: float32 (an MLP and a 2-layer GPT-2, sketched and exact), 1.4e-15 in float64, 5.6e-4 with
#: float16 weights and 4.3e-3 with bfloat16 weights (docs/capture.md); a forgotten ``zero_grad()``
#: gave 0.5-0.6, clipping to half the norm a multiple off by 0.5.
GRADIENT_RTOL = 1e-3
#: Slack for a gradient that is a small sum of large per-example terms (cancellation): the
#: residual is also accepted below ``max(GRADIENT_ATOL, u / 4)`` of the summed per-example norms.
GRADIENT_ATOL = 1e-5


class GradientProbe:
    """A fixed random reduction ``Q`` of a run's columns, applied to a sketched gradient (``Q s``) or,
    without sketching it first, to a full gradient (``Q S g``): the two agree by linearity.

    Per kron block (columns ``S_r M S_c^T``, ``k_r x k_c``) ``Q`` takes ``r^T (S_r M S_c^T)`` for one
    random ``r`` (``k_c`` numbers), computed from ``.grad`` as ``((r^T S_r) M) S_c^T``: one pass over
    the block's gradient instead of the ``k_r``-row sketch; per dense block (``S v``), ``R S v`` for a
    random ``R`` of :data:`DENSE_PROBES` rows. So checking ``.grad`` against the recorded rows costs
    about one read of the gradient (``project_full`` would sketch it whole). A random ``r`` (not one
    row of ``S_r``) keeps every coordinate of an exact block in view.
    """

    #: rows of ``R`` per dense block
    DENSE_PROBES = 4

    def __init__(self, engine: Engine, seed: int = 0) -> None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + 104729)
        dt, dev = engine.dtype, engine.device
        self.blocks: list[tuple[str, Any, torch.Tensor]] = []  # (kind, block, r): the reduction of the columns
        # the same reduction of a full gradient, per block: (kind, params, u, u_bias, right, right_bias)
        self.plan: list[tuple[Any, ...]] = []
        for b in engine.blocks:
            sk = engine.sketches[b.name]
            f64 = (lambda m: None if m is None else m.to(torch.float64).cpu())
            if b.kind == "kron":
                kr, kc = int(b.k_rows), int(b.k_cols)
                if kr * kc != b.k:
                    raise RecorderError(f"internal: block {b.name} has {b.k} columns, not {kr} x {kc}.")
                r = torch.randn(kr, generator=gen, dtype=torch.float64)
                u = r @ f64(sk.rows) if sk.rows is not None else r  # (rows,): r^T S_r
                rows, cols = b.shape
                cm = f64(sk.cols)  # (kc, cols) or None (identity)
                if b.bias_axis == 0:  # HF Conv1D: M = [W (in, out); b]: u^T M = u[:in] W + u[-1] b
                    u_w, u_b = (u[:-1], u[-1:]) if b.has_bias else (u, None)
                    right, right_b = cm, None
                else:  # M = [W.reshape(rows, -1) | b]: u^T M = [u W, u b]
                    u_w, u_b = u, (u if b.has_bias else None)
                    right, right_b = ((cm[:, :-1], cm[:, -1]) if b.has_bias else (cm, None)) if cm is not None else (None, None)
                cast = (lambda m: None if m is None else m.to(device=dev, dtype=dt).contiguous())
                self.blocks.append(("kron", b, r.to(device=dev, dtype=dt)))
                self.plan.append(("kron", list(b.params), b.bias_axis, cast(u_w), cast(u_b), cast(right), cast(right_b)))
            else:
                R = torch.randn(min(self.DENSE_PROBES, b.k), b.k, generator=gen, dtype=torch.float64)
                U = R @ f64(sk.rows) if sk.rows is not None else R  # (m, n)
                self.blocks.append(("dense", b, R.to(device=dev, dtype=dt)))
                self.plan.append(("dense", list(b.params), 0, U.to(device=dev, dtype=dt).contiguous(), None, None, None))

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., k)`` rows in the run's columns -> ``(..., m)``."""
        out = []
        for kind, b, r in self.blocks:
            xb = x[..., b.start : b.stop]
            if kind == "kron":
                out.append(torch.matmul(r, xb.reshape(*xb.shape[:-1], b.k_rows, b.k_cols)))
            else:
                out.append(torch.matmul(xb, r.T))
        return torch.cat(out, -1)

    def of_gradient(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``Q S g`` of a full gradient ``{name: tensor}`` (every captured parameter's)."""
        return torch.cat(self.of_blocks(named))

    def of_blocks(self, named: Mapping[str, torch.Tensor], only: Any = None) -> list[torch.Tensor]:
        """:meth:`of_gradient` block by block (``only``: the indices of the blocks wanted, default all); also
        the fingerprint of the weights themselves (``{name: parameter}``), read in one pass."""
        out = []
        for i, (kind, params, axis, u, u_b, right, right_b) in enumerate(self.plan):
            if only is not None and i not in only:
                continue
            if kind == "dense":
                ts = [named[q].reshape(-1) for q in params]
                v = torch.cat(ts) if len(ts) > 1 else ts[0]
                out.append(torch.mv(u, v.to(u.dtype)))
                continue
            w = named[params[0]]
            if w.dtype != u.dtype:
                w = w.to(u.dtype)
            if axis == 0:
                y = torch.mv(w.reshape(u.shape[0], -1).t(), u)
                if u_b is not None:
                    y = y + u_b * named[params[1]].reshape(-1).to(u.dtype)
                out.append(y if right is None else torch.mv(right, y))
                continue
            y = torch.mv(w.reshape(u.shape[0], -1).t(), u)
            if u_b is None:
                out.append(y if right is None else torch.mv(right, y))
                continue
            yb = torch.dot(u_b, named[params[1]].reshape(-1).to(u.dtype))
            if right is None:
                out.append(torch.cat([y, yb.reshape(1)]))
            else:
                out.append(torch.addmv(right_b * yb, right, y))
        return out


def gradient_tolerances(params: Any, compute_eps: float = 0.0) -> tuple[float, float]:
    """``(rtol, atol)`` of the gradient check for parameters of these dtypes (see :data:`GRADIENT_RTOL`), or for
    the compute precision ``compute_eps`` the engine's hooks saw when it is coarser (``torch.autocast``: the
    activations and output gradients in bfloat16 or float16, so ``.grad`` carries their rounding whatever the
    weights' dtype; measured 2.7e-3 with bfloat16 autocast, within ``4 u = 3.1e-2``)."""
    u = max((torch.finfo(q.dtype).eps for q in params if q.dtype.is_floating_point), default=0.0)
    u = max(u, float(compute_eps))
    return max(GRADIENT_RTOL, 4 * u), max(GRADIENT_ATOL, u / 4)


def _loss_scale(ratio: float, tol: float, compute_eps: float, params: Any) -> float | None:
    """The loss scale ``S`` when ``ratio`` (the applied gradient over the recorded one) is ``1/S`` for a power of two
    ``S >= 2`` and the step ran in a coarser precision than the weights' (``torch.autocast``) or ``S >= 256``: the
    signature of a ``torch.amp.GradScaler`` that unscaled ``.grad`` after the rows were captured; else ``None``."""
    if not (0.0 < ratio < 0.75):
        return None
    n = round(-math.log2(ratio))
    if n < 1 or abs(ratio * 2.0**n - 1.0) > tol:
        return None
    weights_eps = max((torch.finfo(q.dtype).eps for q in params if q.dtype.is_floating_point), default=0.0)
    return 2.0**n if (compute_eps > weights_eps or n >= 8) else None


def _residual(full: torch.Tensor, raw: torch.Tensor) -> tuple[float, float, float, float]:
    """``(coef, resid, |full|, |raw|^2)``: the best multiple ``coef`` of ``raw`` in ``full`` and what is left."""
    rr = float(raw @ raw)
    nf = float(full.norm())
    coef = float(full @ raw) / rr if rr > 0 else 0.0
    return coef, float((full - coef * raw).norm()), nf, rr


#: The likely causes of a gradient that the captured rows do not hold, most likely first.
NOT_PER_EXAMPLE = (
    "a loss term that is not a sum of per-example losses, whose gradient reaches .grad but no example's row (an L2 "
    "penalty such as `lam * sum(p.pow(2).sum())`: use the optimizer's weight_decay=, which the run records; another "
    "regulariser or auxiliary loss of the parameters: move it out of the recorded loss)"
)


class BlockGradientCheck:
    """Without ``optimizer=``: the gradient a recorded block adds to ``.grad`` must be the sum of the
    captured rows (both reduced by a :class:`GradientProbe`), else a part of the update is recorded
    nowhere (an L2 penalty in the loss). Costs one probe of ``.grad`` at the block's end, and one at its
    start when ``.grad`` is not empty then (``zero_grad(set_to_none=False)``, or accumulation)."""

    def __init__(self, engine: Engine) -> None:
        self.probe = GradientProbe(engine)
        self.engine = engine
        named = dict(engine.model.named_parameters())
        self._captured = {q: named[q] for b in engine.blocks for q in b.params if q in named}
        self.rtol, self.atol = gradient_tolerances(self._captured.values())

    def snapshot(self) -> torch.Tensor | None:
        """The probe of ``.grad`` now (``None``: no captured parameter holds a gradient)."""
        grads = {n: q.grad for n, q in self._captured.items()}
        if all(g is None for g in grads.values()):
            return None
        with torch.no_grad():
            grads = {n: g if g is not None else torch.zeros_like(self._captured[n]) for n, g in grads.items()}
            return self.probe.of_gradient(grads).to(torch.float64)

    def check(self, before: torch.Tensor | None, rows: torch.Tensor, step: int) -> None:
        """Refuse the block (step ``step``) when ``.grad`` grew by more than the rows' sum ``rows`` ``(b, k)``."""
        with torch.no_grad():
            red = self.probe.reduce(rows.detach())
            raw = red.sum(0).to(torch.float64)
            if not bool(torch.isfinite(raw).all()):
                return  # non-finite rows are the pipeline's to flag
            after = self.snapshot()
            full = torch.zeros_like(raw) if after is None else after.to(raw.device)
            if before is not None:
                full = full - before.to(raw.device)
            if not bool(torch.isfinite(full).all()):
                return
            scale = float(red.to(torch.float64).norm(dim=-1).sum())
        coef, resid, nf, rr = _residual(full, raw)
        rtol, atol = gradient_tolerances(self._captured.values(), self.engine.compute_eps)
        if resid > rtol * nf + atol * abs(coef) * scale:
            raise RecorderError(
                f"step {step}: the gradient this block's backward added to .grad is not the sum of the examples' "
                f"captured gradients: after removing its multiple {coef:.6g} of their sum, {resid / max(nf, 1e-300):.3g} "
                f"of its norm is left (more than rounding), so the run would miss that part of the update. Likely "
                f"causes, in order: (1) {NOT_PER_EXAMPLE}; (2) .grad edited inside the block other than by scaling "
                "(clipping is a scaling and is fine). Nothing was written for this step. Fix the loss (or the edit) "
                "and record the step again; with Recorder(..., optimizer=opt) the update itself is checked too."
            )
