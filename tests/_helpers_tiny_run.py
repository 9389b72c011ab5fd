"""A tiny classifier and a short recorded SGD run, shared by the fourth and fifth probes' tests.

``X`` (24, 4) float32 and ``Y`` (24,) in {0, 1, 2} come from their own seeded generators, so they are
the same whichever test module imports them first. :func:`tiny_mlp` is a 4-5-3 tanh MLP seeded
by ``seed``; :func:`record_tiny_run` records ``steps`` SGD steps (lr 0.1) of six samples each,
exact (``proj_dim=None``) unless a keyword says otherwise; :func:`tiny_query_loss` is the
per-example loss of the first three samples, a query for ``Attributor.scores``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import datavalue

X = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(1))


def tiny_mlp(seed: int = 0) -> torch.nn.Module:
    """A 4-5-3 MLP with tanh, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def record_tiny_run(path: Path, model: torch.nn.Module | None = None, steps: int = 4, *, x: torch.Tensor = X,
                    y: torch.Tensor = Y, **kw) -> torch.nn.Module:
    """Record ``steps`` SGD steps of ``model`` (default :func:`tiny_mlp`) on samples ``6t .. 6t+5`` of
    ``(x, y)`` into ``path``; ``kw`` goes to :class:`datavalue.Recorder`. Returns the trained model (the
    ``.module`` of a wrapper that has one)."""
    model = tiny_mlp() if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw.setdefault("proj_dim", None)
    with datavalue.Recorder(path, model, optimizer=opt, **kw) as rec:
        for t in range(steps):
            ids = np.arange(6 * t, 6 * t + 6)
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
    return getattr(model, "module", model)


def tiny_query_loss(m: torch.nn.Module) -> torch.Tensor:
    """Per-example cross-entropy of the first three samples: ``(3,)``."""
    return F.cross_entropy(m(X[:3]), Y[:3], reduction="none")
