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


def test_orthogonal_sketch_rows_are_a_scaled_orthonormal_frame():
    a = projection_matrix(7, 2, 1, 5, 30, "orthogonal")
    np.testing.assert_allclose(a @ a.T, 30 / 5 * np.eye(5), atol=1e-12)
    np.testing.assert_array_equal(a, projection_matrix(7, 2, 1, 5, 30, "orthogonal"))  # deterministic
    # unbiased for inner products: the mean of P^T P over seeds tends to I (Haar frame: E = I exactly);
    # 400 seeds, 5 of 30 dims: each diagonal entry has sd about sqrt(2 (30/5 - 1) / 400) = 0.16 -> 4 sd bound
    mean = np.mean([(lambda p: p.T @ p)(projection_matrix(s, 0, 1, 5, 30, "orthogonal")) for s in range(400)], 0)
    assert np.abs(np.diag(mean) - 1).max() < 0.64 and np.abs(mean - np.diag(np.diag(mean))).max() < 0.64
    with pytest.raises(ValueError, match="sketch must be"):
        projection_matrix(7, 2, 1, 5, 30, "sparse")


def test_runs_without_a_sketch_kind_are_read_and_resumed_as_gaussian(tmp_path):
    """Runs written before the manifest named the sketch used Gaussian matrices: test gradients
    for them and a resumed recording must keep using Gaussian ones."""
    import zarr

    from datavalue.capture._gradients import engine_for_run
    from datavalue.store._schema import MANIFEST_KEY

    torch.manual_seed(0)
    model = torch.nn.Linear(30, 20).double()
    x, y = torch.randn(6, 30, dtype=torch.float64), torch.randint(0, 20, (6,))
    path = tmp_path / "old.zarr"
    with datavalue.Recorder(path, model, proj_dim=64, storage_dtype="float64", sketch="gaussian") as rec:
        with rec.step(sample_ids=range(6), lr=0.1):
            F.cross_entropy(model(x), y).backward()
    g = zarr.open_group(str(path), mode="r+")
    man = dict(g.attrs[MANIFEST_KEY])
    assert man["projection"].pop("sketch") == "gaussian"
    g.attrs[MANIFEST_KEY] = man  # as an older version wrote it
    eng = engine_for_run(model, open_run(path).manifest)
    assert eng.sketch == "gaussian"
    with datavalue.Recorder(path, model, proj_dim=64, storage_dtype="float64", resume=True) as rec:
        with rec.step(sample_ids=range(6, 12), lr=0.1):
            F.cross_entropy(model(x), y).backward()
    grads = open_run(path).read("grads")
    np.testing.assert_allclose(grads[6:], grads[:6], atol=1e-12)  # same batch, same weights, same sketch
    # a new run defaults to the orthogonal sketch, whose rows differ
    new = _grads(tmp_path, model, x, y, 64, 0, "new")
    assert open_run(tmp_path / "new.zarr").manifest["projection"]["sketch"] == "orthogonal"
    assert not np.allclose(new, grads[:6])
