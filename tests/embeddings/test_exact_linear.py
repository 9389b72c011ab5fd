"""On a linear least-squares model the dynamics are linear in the weights, so the recursion with
the exact curvature must reproduce exact trajectory LOO to rounding, for every optimizer setting.
This pins the momentum / dampening / Nesterov / weight-decay / scale bookkeeping to torch.optim.SGD.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datavalue.embeddings import _core as core
from datavalue.testing import Batch, SGDConfig, train_reference, trajectory_loo


def _problem(seed=0, n=24, d=4, bs=6, epochs=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    batches = []
    for _e in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            batches.append(Batch(idx.numpy(), X[idx], y[idx]))
    Xt = torch.randn(5, d, generator=g, dtype=torch.float64)
    return batches, Xt


def _factory():
    torch.manual_seed(0)
    return nn.Linear(4, 1).double()


def _loss(model, x, y):
    return 0.5 * (model(x).squeeze(-1) - y) ** 2


def _rows(model, x, y):
    """Exact per-sample gradients and Hessian factors, layout [W | b] flattened row-major."""
    with torch.no_grad():
        r = (model(x).squeeze(-1) - y).numpy()
    a = np.concatenate([x.numpy(), np.ones((x.shape[0], 1))], axis=1)
    return r[:, None] * a, a


CONFIGS = {
    "sgd": SGDConfig(),
    "weight_decay": SGDConfig(weight_decay=0.05),
    "momentum": SGDConfig(momentum=0.9),
    "momentum_dampening_wd": SGDConfig(momentum=0.8, dampening=0.3, weight_decay=0.02),
    "nesterov_wd": SGDConfig(momentum=0.7, nesterov=True, weight_decay=0.05),
    "fixed_scales": SGDConfig(momentum=0.5, grad_scales=tuple(np.linspace(0.4, 1.0, 8))),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exact_on_linear_dynamics(name):
    cfg = CONFIGS[name]
    batches, Xt = _problem()
    T = len(batches)
    lrs = np.linspace(0.15, 0.05, T)
    ref = train_reference(_factory, batches, lrs, _loss, config=cfg)
    steps, ids = ref.occurrences()
    removals = list(zip(steps.tolist(), ids.tolist(), strict=True))
    truth = trajectory_loo(ref, removals, lambda m: m(Xt).squeeze(-1))  # linear test functional

    k = 5
    st = core.init_state(k)
    out = [None] * T
    for t in range(T - 1, -1, -1):
        model = ref.model_at(t)
        b = batches[t]
        G, A = _rows(model, b.inputs, b.targets)
        w = ref.weights[t]
        F = np.sqrt(w)[:, None] * A  # exact Hessian factors
        fresh = cfg.momentum != 0 and t == 0
        st, out[t] = core.step_back(
            st,
            G,
            w,
            lr=lrs[t],
            curv=F,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            dampening=cfg.dampening,
            nesterov=cfg.nesterov,
            fresh=fresh,
            grad_scale=ref.grad_scales[t],
        )
    E = np.concatenate(out)
    gt = np.concatenate([Xt.numpy(), np.ones((Xt.shape[0], 1))], axis=1)
    est = E @ gt.T
    np.testing.assert_allclose(est, truth, rtol=0, atol=1e-9 * np.abs(truth).max())
    assert np.abs(truth).max() > 1e-4


def test_loo_replay_is_bit_exact_and_not_aliased():
    batches, Xt = _problem()
    ref = train_reference(
        _factory, batches, np.full(len(batches), 0.1), _loss, config=SGDConfig(momentum=0.9)
    )
    # removing the same occurrence twice gives the identical number (the snapshot is not mutated)
    a = trajectory_loo(ref, [(3, int(batches[3].sample_ids[0]))] * 2, lambda m: m(Xt).squeeze(-1))
    assert np.array_equal(a[0], a[1]) and np.abs(a).max() > 0
    # all occurrences of a sample vs the sum of its single occurrences: equal to first order only
    # (the second removed gradient is taken at already-perturbed weights)
    sid = int(batches[0].sample_ids[0])
    occ = [(t, sid) for t, b in enumerate(batches) if sid in b.sample_ids]
    assert len(occ) == 2
    both = trajectory_loo(ref, [sid], lambda m: m(Xt).squeeze(-1))[0]
    single = trajectory_loo(ref, occ, lambda m: m(Xt).squeeze(-1)).sum(0)
    assert not np.allclose(both, single, rtol=1e-6)
    np.testing.assert_allclose(both, single, rtol=0.2)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_clipping_direction_is_first_order_exact(momentum):
    """Norm clipping makes the step nonlinear in the weights and in the removal. Keeping
    d(c g_hat) = c (I - u u^T) d g_hat reproduces the exact derivative of the final weights in
    the occurrence's weight (a finite difference, epsilon=1e-6); treating c as a constant does not."""
    batches, Xt = _problem(n=24, bs=6)
    T = len(batches)
    cfg = SGDConfig(momentum=momentum, max_grad_norm=0.3)
    ref = train_reference(_factory, batches, np.full(T, 0.1), _loss, config=cfg)
    assert (ref.grad_scales < 1).mean() > 0.5
    steps, ids = ref.occurrences()
    removals = list(zip(steps.tolist(), ids.tolist(), strict=True))
    deriv = trajectory_loo(ref, removals, lambda m: m(Xt).squeeze(-1), epsilon=1e-6)
    gt = np.concatenate([Xt.numpy(), np.ones((Xt.shape[0], 1))], axis=1)
    errs = {}
    for mode in ("constant", "direction"):
        st = core.init_state(5)
        out = [None] * T
        for t in range(T - 1, -1, -1):
            b = batches[t]
            G, A = _rows(ref.model_at(t), b.inputs, b.targets)
            w = ref.weights[t]
            u = None
            if mode == "direction" and ref.grad_scales[t] < 1:
                g_hat = w @ G
                u = g_hat / np.linalg.norm(g_hat)
            st, out[t] = core.step_back(
                st,
                G,
                w,
                lr=0.1,
                curv=np.sqrt(w)[:, None] * A,
                momentum=momentum,
                fresh=momentum != 0 and t == 0,
                grad_scale=ref.grad_scales[t],
                clip_u=u,
            )
        est = np.concatenate(out) @ gt.T
        errs[mode] = np.abs(est - deriv).max() / np.abs(deriv).max()
    assert errs["direction"] < 1e-4, errs
    assert errs["constant"] > 0.1, errs
