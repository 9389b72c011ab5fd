"""JAX/optax recording gives the same run as PyTorch (same weights, data, batches)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.store import open_run

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 4, 40)
    batches = [rng.permutation(40)[:8] for _ in range(6)]
    return model, x, y, batches


def per_example_loss(params, x, y):
    h = jnp.tanh(params["0"]["weight"] @ x + params["0"]["bias"])
    logits = params["2"]["weight"] @ h + params["2"]["bias"]
    return -jax.nn.log_softmax(logits)[y]


@pytest.mark.parametrize("proj_dim", [None, 48])
def test_jax_and_torch_runs_match(tmp_path, proj_dim):
    from datavalue.capture.jax import JaxRecorder

    model, x, y, batches = _setup()
    params = {"0": {"weight": jnp.asarray(model[0].weight.detach().numpy()), "bias": jnp.asarray(model[0].bias.detach().numpy())},
              "2": {"weight": jnp.asarray(model[2].weight.detach().numpy()), "bias": jnp.asarray(model[2].bias.detach().numpy())}}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "t.zarr", model, proj_dim=proj_dim, seed=5, optimizer=opt) as rec:
        for ids in batches:
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(torch.from_numpy(x[ids])), torch.from_numpy(y[ids])).backward()
            opt.step()
            opt.zero_grad()
    tx = optax.sgd(0.1)
    state = tx.init(params)
    with JaxRecorder(tmp_path / "j.zarr", params, per_example_loss, proj_dim=proj_dim, seed=5,
                     optimizer={"kind": "sgd"}) as jrec:
        for ids in batches:
            grads = jrec.step(params, jnp.asarray(x[ids]), jnp.asarray(y[ids]), sample_ids=ids, lr=0.1)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    t, j = open_run(tmp_path / "t.zarr"), open_run(tmp_path / "j.zarr")
    strip = lambda bl: [(b["name"], b["k"], b["k_rows"], b["k_cols"], b["start"]) for b in bl]
    assert strip(t.blocks) == strip(j.blocks)
    assert t.manifest["model_fingerprint"]["digest"] == j.manifest["model_fingerprint"]["digest"]
    np.testing.assert_array_equal(t.sample_id, j.sample_id)
    np.testing.assert_array_equal(t.weight, j.weight)
    np.testing.assert_allclose(j.grads.compute(), t.grads.compute(), rtol=1e-5, atol=1e-5)
    # the final weights agree too (the returned batch gradient drove the optax update)
    np.testing.assert_allclose(np.asarray(params["2"]["weight"]), model[2].weight.detach().numpy(), atol=1e-5)
    # embeddings and scores built from the two runs agree
    from datavalue.store import open_array

    for p in (tmp_path / "t.zarr", tmp_path / "j.zarr"):
        datavalue.build_embeddings(p, curvature="empirical_fisher", progress=False)
    et = np.asarray(open_array(tmp_path / "t.zarr", "embeddings/empirical_fisher/values")[:])
    ej = np.asarray(open_array(tmp_path / "j.zarr", "embeddings/empirical_fisher/values")[:])
    np.testing.assert_allclose(ej, et, rtol=1e-4, atol=1e-5)
    q = datavalue.per_sample_gradients(model, lambda m: F.cross_entropy(m(torch.from_numpy(x[:5])), torch.from_numpy(y[:5]), reduction="none"), t)
    np.testing.assert_allclose(q @ ej.T, q @ et.T, rtol=1e-4, atol=1e-5)


def test_importing_datavalue_never_imports_jax():
    import subprocess
    import sys

    code = "import sys, datavalue, datavalue.capture, datavalue.store; print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
