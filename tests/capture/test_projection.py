"""The Kronecker sketch preserves inner products (JL), is seeded by numpy, and splits budgets as documented."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.capture import projection_matrix, split_budget
from datavalue.store import open_run


def _grads(tmp_path, model, x, y, proj_dim, seed, name):
    path = tmp_path / f"{name}.zarr"
    with datavalue.Recorder(path, model, proj_dim=proj_dim, seed=seed, storage_dtype="float64") as rec:
        with rec.step(sample_ids=range(len(x)), lr=0.1):
            F.cross_entropy(model(x), y).backward()
    model.zero_grad()
    return open_run(path).grads.compute()


def test_inner_products_within_jl_tolerance(tmp_path):
    """One Linear(200 -> 100) block, proj_dim 4096 -> a 64 x 64 Kronecker sketch.

    For rank-one per-sample gradients u v^T the sketched inner product is the product of two
    independent JL estimates, relative standard deviation about sqrt(1/64 + 1/64) = 0.18 of
    ||g_i|| ||g_j||. Bound (seed 0, 45 pairs): every pair within 4 sd = 0.71, and the mean over
    20 seeds within 4 sd / sqrt(20) of the exact value (unbiased).
    """
    torch.manual_seed(0)
    model = torch.nn.Linear(200, 100).double()
    x, y = torch.randn(10, 200, dtype=torch.float64), torch.randint(0, 100, (10,))
    exact = _grads(tmp_path, model, x, y, None, 0, "exact")
    norms = np.linalg.norm(exact, axis=1)
    scale = np.outer(norms, norms)
    iu = np.triu_indices(10, 1)
    true_ip = (exact @ exact.T)[iu] / scale[iu]
    sd = np.sqrt(1 / 64 + 1 / 64)
    ests = []
    for seed in range(20):
        proj = _grads(tmp_path, model, x, y, 4096, seed, f"p{seed}")
        assert proj.shape == (10, 4096)
        ests.append((proj @ proj.T)[iu] / scale[iu])
    err0 = np.abs(ests[0] - true_ip)
    assert err0.max() < 4 * sd, err0.max()
    mean_err = np.abs(np.mean(ests, 0) - true_ip)
    assert mean_err.max() < 4 * sd / np.sqrt(20), mean_err.max()


def test_projection_matrices_come_from_numpy_seed_sequence():
    a = projection_matrix(7, 2, 1, 5, 30)
    rng = np.random.default_rng(np.random.SeedSequence([7, 2, 1]))
    np.testing.assert_array_equal(a, rng.standard_normal((5, 30)) / np.sqrt(5))
    assert not np.allclose(a, projection_matrix(7, 2, 0, 5, 30))  # sides independent


def test_budget_rule():
    # small blocks that fit their share are exact; the rest share what is left
    out = split_budget(["a", "b", "c"], ["dense", "kron", "kron"], [(10,), (100, 785), (10, 101)], 1024)
    assert out[0] == (10, 1, 10)  # exact dense
    kr, kc, k = out[2]
    assert (kr, kc) == (10, 50) and k == 500  # 10 rows kept exactly, columns projected
    assert out[1][2] <= 1024 - 10 - 500 and out[1][0] == 22
    assert sum(o[2] for o in out) <= 1024
    # a dict per block, and exact when None
    assert split_budget(["a"], ["kron"], [(4, 5)], {"a": 6}) == [(2, 3, 6)]
    assert split_budget(["a"], ["kron"], [(4, 5)], None) == [(4, 5, 20)]
    with pytest.raises(ValueError, match="missing"):
        split_budget(["a", "b"], ["kron", "kron"], [(4, 5), (4, 5)], {"a": 6})
