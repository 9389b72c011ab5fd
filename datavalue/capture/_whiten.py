"""Per-sample gradients whitened by the step's own Adam preconditioner, then sketched.

An AdamW step moves the weights by ``-lr c1 D_t m_t`` with the per-coordinate preconditioner
``D_t = 1 / (sqrt(v_hat_{t+1}) + eps)``. A sketch ``S`` does not commute with ``D_t``, so a run that
sketches raw gradients can only model ``D_t`` by block means, and the trajectory embeddings lose most
of what Adam does (``docs/results/adam_projection.md``). With ``precondition="adam"`` the recorder
keeps each step's per-sample gradients whole for the duration of the step (``b x P`` numbers, one
step at a time), multiplies them by ``sqrt(D_t)`` per coordinate once the step's clipped gradient (and
so ``v_{t+1}``) is known, and sketches the result with the run's own Kronecker sketch (applied to the
materialised matrices). In the whitened coordinates ``u = D^{-1/2} theta`` an AdamW step is SGD with
momentum (``beta1``) and a scalar step ``lr c1``, which the Adam-aware build then models exactly up to
the drift of ``D`` along the trajectory (``docs/math.md``); a test gradient is whitened with the final
``sqrt(D_T)``, stored in the run as ``precondition/sqrt_d``.

Torch-only; used by :class:`datavalue.capture.Recorder` and the query side's test gradients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture._engine import Engine
from datavalue.errors import RecorderError

#: Array holding ``sqrt(D_T)`` of the run's last step, in the exact capture layout.
SQRT_D = "precondition/sqrt_d"


def capture_engine(model: nn.Module, layout: Engine) -> Engine:
    """The exact engine whose hooks capture the per-sample gradients of a whitened run."""
    return Engine(model, proj_dim=None, seed=layout.seed, layers=layout.layers, sketch=layout.sketch, split_bias=())


def _column_index(capture: Engine) -> dict[str, torch.Tensor]:
    """For every parameter, the capture column of each of its entries (``p.shape`` int64)."""
    from datavalue.capture._gradients import exact_layout

    named = dict(capture.model.named_parameters())
    params = [p for b in capture.blocks for p in b.params]
    pos, off = {}, 0
    for name in params:
        n = named[name].numel()
        pos[name] = torch.arange(off, off + n, dtype=torch.float64).reshape(named[name].shape)
        off += n
    flat_of_col = exact_layout(pos, [b.to_json() for b in capture.blocks]).astype(np.int64)
    col_of_flat = np.empty_like(flat_of_col)
    col_of_flat[flat_of_col] = np.arange(flat_of_col.size)
    out, off = {}, 0
    for name in params:
        n = named[name].numel()
        out[name] = torch.from_numpy(col_of_flat[off : off + n].copy()).reshape(named[name].shape)
        off += n
    return out


class Whitener:
    """Maps exact per-sample rows of ``capture`` to whitened, sketched rows in ``layout``'s columns."""

    def __init__(self, layout: Engine, capture: Engine) -> None:
        from datavalue.capture._gradients import block_matrix

        self.layout, self.capture = layout, capture
        self.cols = _column_index(capture)
        self.index = []
        for b in layout.blocks:
            missing = [p for p in b.params if p not in self.cols]
            if missing:
                raise RecorderError(f"precondition='adam': parameters {missing} of block {b.name!r} are not captured.")
            self.index.append(block_matrix(b.to_json(), self.cols).to(torch.long))
        self.P = capture.k

    def sketch(self, X: torch.Tensor) -> torch.Tensor:
        """``(b, P)`` exact rows (already whitened) -> ``(b, k)`` in the layout's sketch."""
        parts = []
        for b, idx in zip(self.layout.blocks, self.index, strict=True):
            M = X[:, idx.reshape(-1)].reshape((X.shape[0],) + tuple(idx.shape))
            sk = self.layout.sketches[b.name]
            if b.kind == "kron":
                if sk.rows is not None:
                    M = torch.einsum("kr,brc->bkc", sk.rows.to(M.dtype), M)
                if sk.cols is not None:
                    M = torch.einsum("bkc,lc->bkl", M, sk.cols.to(M.dtype))
            elif sk.rows is not None:
                M = M @ sk.rows.to(M.dtype).T
            parts.append(M.reshape(X.shape[0], b.k))
        return torch.cat(parts, 1)

    def layout_vector(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors laid out in the capture columns: ``(P,)``."""
        out = torch.zeros(self.P, dtype=torch.float64)
        for name, cols in self.cols.items():
            t = named.get(name)
            if t is not None:
                out[cols.reshape(-1)] = t.detach().reshape(-1).to(torch.float64).cpu()
        return out


def adam_sqrt_d(model: nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    """``sqrt(D_{t+1})`` per parameter for the step about to be taken (call after clipping, before
    ``optimizer.step()``): ``v' = b2 v + (1 - b2) g^2`` from the optimizer's state and ``.grad``,
    ``D = 1 / (sqrt(v' / (1 - b2^(t+1))) + eps)``; coordinates whose ``v'`` is 0 (never a gradient) get 0."""
    from datavalue.capture._optim import unwrap_optimizer

    opt = unwrap_optimizer(optimizer)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = {}
    for name, p in model.named_parameters():
        g = group_of.get(id(p))
        if g is None or not p.requires_grad:
            continue
        st = opt.state.get(p, {})
        b2, eps = float(g["betas"][1]), float(g["eps"])
        v = st.get("exp_avg_sq")
        v = torch.zeros_like(p, dtype=torch.float64) if v is None else v.detach().to(torch.float64)
        step = float(st["step"]) + 1.0 if "step" in st else 1.0
        grad = torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.detach().to(torch.float64)
        v_next = b2 * v + (1.0 - b2) * grad * grad
        d = 1.0 / (torch.sqrt(v_next / (1.0 - b2**step)) + eps)
        out[name] = torch.where(v_next > 0, d.sqrt(), torch.zeros_like(d))
    return out


def check_optimizer(optimizer: Any) -> None:
    """``precondition="adam"`` models AdamW (or Adam without weight decay)."""
    from datavalue.capture._optim import is_adam, unwrap_optimizer

    if not is_adam(optimizer):
        raise RecorderError("precondition='adam' needs optimizer= a torch.optim.Adam or AdamW (the step's own "
                            f"preconditioner is read from it), got {type(optimizer).__name__}.")
    opt = unwrap_optimizer(optimizer)
    coupled = type(opt).__name__ == "Adam" and not any(g.get("decoupled_weight_decay") for g in opt.param_groups)
    if coupled and any(float(g.get("weight_decay", 0.0)) != 0.0 for g in opt.param_groups):
        raise RecorderError("precondition='adam' supports AdamW (decoupled weight decay) and Adam without weight decay; "
                            "Adam's coupled decay is not a scalar in the whitened coordinates. Use torch.optim.AdamW.")
    if any(g.get("amsgrad") for g in opt.param_groups):
        raise RecorderError("precondition='adam' does not support amsgrad=True.")
