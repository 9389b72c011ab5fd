"""Training that differs from what a run records, found by the fifth probe (issue 22): gradient ascent
(``SGD(maximize=True)``) built as descent, a parameter-only loss term (an L2 penalty), a second optimizer
stepping a recorded layer, weights edited after ``optimizer.step()``, and optimizer state lost mid-run or on
resume. Each test failed before its fix; next to each refusal the legitimate look-alike is accepted.

All models are tiny float64 MLPs on random data (seeded); tolerances are stated where numbers are compared.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import EmbeddingError
from datavalue.store import open_array, open_run

G = torch.Generator().manual_seed(5)
XS = [torch.randn(6, 4, generator=G, dtype=torch.float64) for _ in range(4)]
YS = [torch.randint(0, 3, (6,), generator=G) for _ in range(4)]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _ids(t, b=6):
    return range(b * t, b * t + b)


# ----------------------------------------------------------------------------- P5-09: maximize=True
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.05)])
def test_gradient_ascent_builds_the_embeddings_of_the_ascent(tmp_path, momentum, weight_decay):
    """``SGD(maximize=True)`` on a loss ``L`` takes exactly the steps of ``SGD(maximize=False)`` on ``-L``
    (torch negates the gradient before decay and momentum), so removing an occurrence moves the final weights
    the same way in both runs: their exact-Hessian embeddings must agree (float64, rtol 1e-9). Before the fix
    the ascent run was built as descent: its embeddings were those of the other sign."""
    E = {}
    for maximize in (True, False):
        sign = 1.0 if maximize else -1.0
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=momentum, weight_decay=weight_decay,
                              maximize=maximize)
        path = tmp_path / f"max{int(maximize)}.zarr"
        with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, curvature="hessian",
                                storage_dtype="float64") as rec:
            for t, (x, y) in enumerate(zip(XS, YS, strict=True)):
                loss = (lambda x=x, y=y, m=model, s=sign: s * F.cross_entropy(m(x), y))
                with rec.step(sample_ids=_ids(t), hessian_loss=loss):
                    loss().backward()
                opt.step()
                opt.zero_grad()
        assert open_run(path).optimizer["maximize"] is maximize
        datavalue.build_embeddings(path, curvature="hessian", progress=False)
        E[maximize] = np.asarray(open_array(path, "embeddings/hessian/values")[:])
    assert np.abs(E[False]).max() > 1e-3
    np.testing.assert_allclose(E[True], E[False], rtol=1e-9, atol=1e-12)


def test_gradient_ascent_last_step_embedding_has_the_ascent_sign(tmp_path):
    """The probe's check: with ``curvature="none"`` the last step's embedding of an occurrence is the update
    it made, ``+lr w g`` for ascent (``-lr w g`` removed), the negative of descent's."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    path = tmp_path / "asc.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64") as rec:
        for t, (x, y) in enumerate(zip(XS[:2], YS[:2], strict=True)):
            with rec.step(sample_ids=_ids(t)):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    datavalue.build_embeddings(path, curvature="none", progress=False)
    run = open_run(path)
    E = np.asarray(open_array(path, "embeddings/none/values")[:])
    last = slice(int(run.step_ptr[-2]), int(run.step_ptr[-1]))
    direct = run.lr[-1] * run.weight[last][:, None] * run.read("grads")[last]
    np.testing.assert_allclose(E[last], -direct, rtol=1e-6, atol=1e-12)  # the build runs in float32


def test_param_groups_that_disagree_on_maximize_are_refused_by_the_build(tmp_path):
    model = _model()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "maximize": True},
                           {"params": model[2].parameters()}], lr=0.1)
    path = tmp_path / "mixed.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64") as rec:
        with rec.step(sample_ids=_ids(0)):
            F.cross_entropy(model(XS[0]), YS[0]).backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(EmbeddingError, match=r"some param groups .* maximize=True .* and some without"):
        datavalue.build_embeddings(path, curvature="none", progress=False)
