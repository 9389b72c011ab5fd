"""The exact Hessian of a step's loss, sketched on both sides into a run's columns: ``S H S^T``.

``S`` is the recorder's gradient map (parameters -> the run's ``k`` columns, :func:`project_full`):
the identity layout for exact runs, the per-block Kronecker/dense sketch for projected ones. Its
adjoint ``S^T`` comes from a ``vjp`` of that linear map, ``H u`` from a ``vjp`` of the loss's
gradient (reverse over reverse, so any layer with a double backward works), and ``S (H S^T)`` from
``S`` again: ``k`` Hessian-vector products per step, batched with ``torch.func.vmap`` in chunks.

It is the curvature behind ``Recorder(..., curvature="hessian")``: the most faithful choice
(``docs/results/curvature_decomposition.md``) and the most expensive, meant for models of up to a
few thousand sketch columns (tests, validation, small production models).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from datavalue.capture._engine import Engine
from datavalue.capture._gradients import project_full
from datavalue.errors import RecorderError

#: Numbers held per chunk of Hessian-vector products (directions x parameters).
CHUNK_NUMBERS = 1 << 24


class _Closure(nn.Module):
    """Wraps a zero-argument loss closure that calls ``model`` so that ``functional_call`` can
    substitute the model's parameters while the closure runs."""

    def __init__(self, model: nn.Module, fn: Callable[[], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self) -> torch.Tensor:
        return self.fn()


def sketched_hessian(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], engine: Engine, *, chunk: int | None = None
) -> torch.Tensor:
    """``(k, k)`` matrix ``S H S^T`` with ``H`` the Hessian of ``loss_fn()`` in the model's trainable
    parameters at their current values.

    Args:
        model: the model ``loss_fn`` calls (its parameters are substituted, never modified).
        loss_fn: zero-argument closure returning the scalar loss the optimizer steps on (the same
            reduction: e.g. the batch mean), e.g. ``lambda: F.cross_entropy(model(x), y)``.
        engine: the recorder's capture engine (its blocks and sketches define ``S``).
        chunk: directions per batched product (default: about 16M numbers per chunk).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from datavalue.capture._engine import Engine
        >>> m = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
        >>> H = sketched_hessian(m, lambda: F.cross_entropy(m(x), y), Engine(m, proj_dim=None, seed=0))
        >>> tuple(H.shape), bool(torch.allclose(H, H.T))
        ((8, 8), True)
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    wrapper = _Closure(model, loss_fn)

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(wrapper, {f"model.{n}": v for n, v in p.items()}, ())
        if not torch.is_tensor(out) or out.dim() != 0:
            raise RecorderError(
                "hessian_loss must return the scalar loss the optimizer steps on (e.g. the batch mean), got "
                f"{type(out).__name__} with shape {tuple(getattr(out, 'shape', ()))}."
            )
        return out

    def sketch(named: dict[str, torch.Tensor]) -> torch.Tensor:
        return project_full(engine, named)

    k = engine.k
    P = sum(int(p.numel()) for p in params.values())
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    _, adjoint = torch.func.vjp(sketch, zeros)  # adjoint(e) = S^T e as a parameter dict
    device = engine.device
    # The extra forward must leave training as it was. BatchNorm in training mode normalises with
    # the batch statistics as the real step did, without updating its running statistics; the
    # random state is restored, so the loop's later dropout masks and sampling do not shift.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        for m in bns:
            m.track_running_stats = False
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _, hvp = torch.func.vjp(torch.func.grad(loss_of), params)  # hvp(u) = H u (H symmetric)
    finally:
        for m in bns:
            m.track_running_stats = True
    step = int(chunk) if chunk else max(1, min(k, CHUNK_NUMBERS // max(P, 1)))
    eye = torch.eye(k, dtype=engine.dtype, device=engine.device)
    rows = []
    for j in range(0, k, step):
        (U,) = torch.func.vmap(adjoint)(eye[j : j + step])
        (HU,) = torch.func.vmap(hvp)(U)
        rows.append(torch.func.vmap(sketch)(HU))
    H = torch.cat(rows)
    return 0.5 * (H + H.T)  # symmetric up to rounding; make it exactly so
