"""A small tanh MLP on sklearn's 8x8 digits, recorded through the real Recorder, with exact
trajectory LOO ground truth from datavalue.testing (shared by the fidelity tests)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.capture import per_sample_gradients
from datavalue.store import open_array, open_run
from datavalue.testing import (
    AdamConfig,
    Batch,
    SGDConfig,
    spearman_per_test,
    train_reference,
    trajectory_loo,
)


@dataclasses.dataclass
class Case:
    path: str
    rows: np.ndarray  # the occurrences given exact LOO (row indices of the run)
    truth: np.ndarray  # (len(rows), m) loss(without) - loss(with)
    test_grads: np.ndarray  # (m, k) at the final weights, the run's layout
    ref: object
    accuracy: float

    def spearman(self, curvature: str) -> float:
        E = np.asarray(open_array(self.path, f"embeddings/{curvature}/values")[:])
        return spearman_per_test(E[self.rows] @ self.test_grads.T, self.truth)


def _data(n_train, n_test, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)  # standardised pixels
    X = torch.tensor(x, dtype=torch.float64)
    Y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    return X, Y, perm[:n_train], perm[n_train : n_train + n_test], g


def make_case(
    path,
    *,
    lr,
    momentum=0.0,
    weight_decay=0.0,
    dampening=0.0,
    nesterov=False,
    max_grad_norm=None,
    hidden=16,
    n_train=256,
    n_test=40,
    batch=32,
    epochs=3,
    n_removals=200,
    seed=0,
    adam: str | None = None,
    betas=(0.9, 0.999),
    eps=1e-8,
    epsilon: float | None = None,
    proj_dim: int | None = None,
    curvature: str | tuple[str, ...] = "fisher",
    sketch: str | None = None,
    precondition: str = "none",
) -> Case:
    """``adam="adamw"``/``"adam"`` trains with torch's AdamW/Adam (``weight_decay`` applies to it)
    instead of SGD; ``epsilon`` also computes the exact first-order target ``case.linear``."""
    X, Y, tr, te, g = _data(n_train, n_test, seed)
    batches = []
    for _ in range(epochs):
        p = tr[torch.randperm(n_train, generator=g)]
        for i in range(0, n_train, batch):
            idx = p[i : i + batch]
            batches.append(Batch(idx.numpy(), X[idx], Y[idx]))

    def factory():
        torch.manual_seed(seed + 1)
        return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()

    def ce(m, x, y):
        return F.cross_entropy(m(x), y, reduction="none")

    model = factory()
    if adam is not None:
        config = AdamConfig(
            kind=adam, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm
        )
        opt = config.optimizer(model.parameters(), lr)
    else:
        opt = torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            dampening=dampening,
            nesterov=nesterov,
        )
        config = SGDConfig(
            momentum=momentum,
            weight_decay=weight_decay,
            dampening=dampening,
            nesterov=nesterov,
            max_grad_norm=max_grad_norm,
        )
    rec = datavalue.Recorder(
        path, model, proj_dim=proj_dim, optimizer=opt, curvature=curvature, storage_dtype="float64",
        sketch=sketch, precondition=precondition,
    )
    hessian = "hessian" in ((curvature,) if isinstance(curvature, str) else curvature)

    def step_context(t, b, lr_):
        loss = (lambda: ce(model, b.inputs, b.targets).mean()) if hessian else None
        return rec.step(sample_ids=b.sample_ids, lr=lr_, hessian_loss=loss)

    with rec:
        ref = train_reference(
            factory,
            batches,
            np.full(len(batches), lr),
            ce,
            model=model,
            optimizer=opt,
            config=config,
            step_context=step_context,
        )
    run = open_run(path)
    steps, ids = ref.occurrences()
    assert np.array_equal(run.sample_id, ids), "the run's rows are not the reference's occurrences"
    final = ref.final_model()
    test_loss = lambda m: ce(m, X[te], Y[te])  # noqa: E731
    test_grads = per_sample_gradients(final, test_loss, run)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ids), size=min(n_removals, len(ids)), replace=False))
    removals = list(zip(steps[rows].tolist(), ids[rows].tolist(), strict=True))
    truth = trajectory_loo(ref, removals, test_loss)
    with torch.no_grad():
        acc = float((final(X[te]).argmax(1) == Y[te]).double().mean())
    case = Case(str(path), rows, truth, test_grads, ref, acc)
    case.clip_fraction = float(np.mean(ref.grad_scales < 1.0))
    case.linear = None
    if epsilon is not None:
        case.linear = trajectory_loo(ref, removals, test_loss, epsilon=epsilon)
    case.test_loss = test_loss
    return case
