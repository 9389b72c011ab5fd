"""Synthetic runs written through the store's RunWriter, and the recursion run by hand on them."""

from __future__ import annotations

import numpy as np

from datavalue.embeddings import _core as core
from datavalue.store import RunWriter, StepBlock

BLOCKS = [(0, 4), (4, 7)]
K = 7


def manifest(*, momentum_kind="sgd", dampening=0.0, nesterov=False):
    return {
        "projection": {
            "proj_dim": None,
            "seed": 0,
            "blocks": [
                {"name": f"b{i}", "index": i, "start": a, "stop": b, "k": b - a}
                for i, (a, b) in enumerate(BLOCKS)
            ],
        },
        "loss_reduction": "mean",
        "optimizer": {"kind": momentum_kind, "dampening": dampening, "nesterov": nesterov},
        "curvature": {"fisher": None},
    }


def make_steps(seed, T, *, momentum=0.0, weight_decay=0.0, fisher=False, scale=0.5, t0=0):
    rng = np.random.default_rng(seed)
    steps = []
    for t in range(t0, t0 + T):
        b = int(rng.integers(1, 6))
        steps.append(
            StepBlock(
                step=t,
                sample_id=np.arange(b, dtype=np.int64) + 100 * t,
                weight=np.full(b, 1.0 / b),
                grads=rng.normal(size=(b, K)) * scale,
                flags=np.zeros(b, np.uint8),
                lr=float(rng.uniform(0.05, 0.4)),
                grad_scale=float(rng.uniform(0.6, 1.0)),
                momentum=momentum,
                weight_decay=weight_decay,
                fisher=rng.normal(size=(3, K)) * 0.3 if fisher else None,
            )
        )
    return steps


def write_run(path, steps, *, fisher=False, chunk_rows=5, mode="create", **mkw):
    w = RunWriter(
        path,
        manifest(**mkw),
        k=K,
        mode=mode,
        chunk_rows=chunk_rows,
        storage_dtype="float64",
        fisher=fisher,
        background=False,
    )
    for s in steps:
        w.submit(s)
    w.close()
    return path


FULL = [(0, BLOCKS[-1][1])]


def by_hand(steps, curvature, *, dampening=0.0, nesterov=False, stop=None, clipping="direction", blocks=None):
    """Embeddings w.r.t. the weights after step ``stop - 1`` by the pure core, one block at a time.

    ``blocks``: the operator spans, ``FULL`` (one operator) or ``BLOCKS`` (the recorded layer
    blocks, what ``blocks="layer"`` builds; the default ``blocks="auto"`` builds ``FULL`` for the
    true Fisher on these small runs, ``BLOCKS`` for the other curvatures)."""
    if blocks is None:
        blocks = BLOCKS
    steps = steps[:stop] if stop is not None else steps
    out = [None] * len(steps)
    states = [core.init_state(b - a) for a, b in blocks]
    for t in range(len(steps) - 1, -1, -1):
        s = steps[t]
        fresh = s.momentum != 0 and (t == 0 or steps[t - 1].momentum == 0)
        u = ug = None
        if clipping == "direction" and s.grad_scale < 1:
            g_hat = s.weight @ s.grads
            u = g_hat / np.linalg.norm(g_hat)
            ug = s.grads @ u  # inner products with the whole direction, all blocks
        parts = []
        for i, (a, b) in enumerate(blocks):
            curv = {"empirical_fisher": "empirical_fisher", "none": None}.get(curvature)
            if curvature == "fisher":
                curv = s.fisher[:, a:b]
            states[i], E = core.step_back(
                states[i],
                s.grads[:, a:b],
                s.weight,
                lr=s.lr,
                curv=curv,
                weight_decay=s.weight_decay,
                momentum=s.momentum,
                dampening=dampening,
                nesterov=nesterov,
                fresh=fresh,
                grad_scale=s.grad_scale,
                clip_u=None if u is None else u[a:b],
                clip_ug=ug,
            )
            parts.append(E)
        out[t] = np.concatenate(parts, axis=1)
    return np.concatenate(out)
