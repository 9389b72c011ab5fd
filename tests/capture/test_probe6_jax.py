"""Sixth probe, JAX recorder: mixed-dtype leaves (P6-06), colliding leaf names (P6-09), the step's memory
estimate and ``max_memory=`` (P6-07), the resume message (P6-11), ``epoch=`` as a jax scalar (P6-14)."""

import re

import numpy as np
import pytest

import datavalue
from datavalue.errors import RecorderError, StoreMismatchError

jax = pytest.importorskip("jax")
jnp = jax.numpy

from datavalue.capture.jax import JaxRecorder  # noqa: E402


def _mixed(dt):
    rng = np.random.default_rng(0)
    params = {"emb": {"weight": jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32)).astype(dt)},
              "out": {"weight": jnp.asarray(rng.normal(size=(4, 16)).astype(np.float32))}}
    x = jnp.asarray(rng.normal(size=(3, 8)).astype(np.float32))
    y = jnp.asarray([0, 1, 2])

    def loss(p, xi, yi):
        h = jnp.tanh(p["emb"]["weight"].astype(jnp.float32) @ xi)
        return -jax.nn.log_softmax(p["out"]["weight"] @ h)[yi]

    return params, loss, x, y


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_p6_06_a_half_precision_first_leaf_does_not_round_the_float32_gradient(tmp_path, dt):
    params, loss, x, y = _mixed(jnp.dtype(dt))
    true = jax.grad(lambda p: jnp.mean(jax.vmap(lambda a, b: loss(p, a, b))(x, y)))(params)
    with JaxRecorder(tmp_path / "r.zarr", params, loss, proj_dim=None, storage_dtype="float64") as rec:
        g = rec.step(params, x, y, sample_ids=[0, 1, 2], lr=0.1)
    t = np.asarray(true["out"]["weight"], dtype=np.float64)
    got = np.asarray(g["out"]["weight"], dtype=np.float64)
    # was 2.4e-4 (float16) / 2.0e-3 (bfloat16): the weights 1/3 were rounded to the first leaf's dtype
    assert np.abs(got - t).max() / np.abs(t).max() < 1e-6
    assert g["out"]["weight"].dtype == jnp.float32 and g["emb"]["weight"].dtype == jnp.dtype(dt)  # each leaf's own
    run = datavalue.open_run(tmp_path / "r.zarr")
    assert run.manifest["capture_dtype"] == "float32"  # the promoted dtype (was the first leaf's)
    b = next(bb for bb in run.blocks if bb["params"] == ["out.weight"])
    stored = (run.weight[:, None] * np.asarray(run.grads[:].compute())[:, b["start"]:b["stop"]]).sum(0)
    assert np.abs(stored - t.ravel()).max() / np.abs(t).max() < 1e-6


def test_p6_06_an_all_float32_tree_is_unchanged(tmp_path):
    params, loss, x, y = _mixed(jnp.float32)
    with JaxRecorder(tmp_path / "r.zarr", params, loss, proj_dim=None) as rec:
        g = rec.step(params, x, y, sample_ids=[0, 1, 2], lr=0.1)
    assert {str(v.dtype) for v in jax.tree_util.tree_leaves(g)} == {"float32"}
    assert datavalue.open_run(tmp_path / "r.zarr").manifest["capture_dtype"] == "float32"


def test_p6_09_two_leaves_with_one_name_are_refused(tmp_path):
    params = {"a.b": jnp.ones(3), "a": {"b": jnp.zeros(3)}}
    loss = lambda p, x: jnp.sum(p["a.b"] * x) + 10 * jnp.sum(p["a"]["b"] * x)  # noqa: E731
    with pytest.raises(RecorderError, match=r"two leaves named 'a\.b': params\['a\.b'\] and params\['a'\]\['b'\]"):
        JaxRecorder(tmp_path / "r.zarr", params, loss, proj_dim=None)
    assert not (tmp_path / "r.zarr").exists()
    with pytest.raises(RecorderError, match="two leaves named '0'"):  # an int key and a str key
        JaxRecorder(tmp_path / "r.zarr", {0: jnp.ones(2), "0": jnp.ones(2)}, loss, proj_dim=None)
    # the same tree given at step() to a recorder created with distinct names is refused too
    ok = {"a_b": jnp.ones(3), "a": {"b": jnp.zeros(3)}}
    with JaxRecorder(tmp_path / "ok.zarr", ok, lambda p, x: jnp.sum(p["a_b"] * x) + 10 * jnp.sum(p["a"]["b"] * x),
                     proj_dim=None) as rec:
        g = rec.step(ok, jnp.ones((2, 3)), sample_ids=[0, 1], lr=0.1)
        np.testing.assert_allclose(np.asarray(g["a_b"]), 1.0)
        np.testing.assert_allclose(np.asarray(g["a"]["b"]), 10.0)
        with pytest.raises(RecorderError, match="two leaves named"):
            rec.step(params, jnp.ones((2, 3)), sample_ids=[0, 1], lr=0.1)


def _big():
    params = {"big": {"weight": jnp.zeros((100, 100), jnp.float32)}}  # P = 1e4, 40 KB a per-sample gradient
    loss = lambda p, x: jnp.sum(jnp.tanh(p["big"]["weight"] @ x))  # noqa: E731
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 100)).astype(np.float32))
    return params, loss, x


def test_p6_07_max_memory_refuses_a_step_before_it_runs_and_names_vmap_chunk(tmp_path):
    params, loss, x = _big()
    with JaxRecorder(tmp_path / "r.zarr", params, loss, proj_dim=16, chunk_rows=64, max_memory=3_000_000) as rec:
        with pytest.raises(RecorderError) as e:
            rec.step(params, x, sample_ids=np.arange(64), lr=0.1)
        msg = str(e.value)
        # 64 examples x 1e4 float32 per-sample gradients = 2.4 MiB, and as many again for the block matrices
        assert "recording a step of 64 examples would hold about" in msg and "above max_memory=" in msg
        assert "per-sample gradients of 64 examples (jax.vmap) 2.4 MiB" in msg and "vmap_chunk=" in msg
        assert rec.n_steps == 0
    assert datavalue.open_run(tmp_path / "r.zarr").n_steps == 0


def test_p6_07_vmap_chunk_fits_and_records_the_same_step(tmp_path):
    params, loss, x = _big()
    params = {"big": {"weight": jnp.asarray(np.random.default_rng(1).normal(size=(100, 100)).astype(np.float32) * 0.1)}}
    with JaxRecorder(tmp_path / "a.zarr", params, loss, proj_dim=16, chunk_rows=64) as rec:
        ga = rec.step(params, x, sample_ids=np.arange(64), lr=0.1)
    with JaxRecorder(tmp_path / "b.zarr", params, loss, proj_dim=16, chunk_rows=64, max_memory=3_000_000,
                     vmap_chunk=5) as rec:  # 13 calls, the last of 4 examples
        gb = rec.step(params, x, sample_ids=np.arange(64), lr=0.1)
    np.testing.assert_allclose(np.asarray(gb["big"]["weight"]), np.asarray(ga["big"]["weight"]), rtol=1e-5, atol=1e-7)
    a, b = datavalue.open_run(tmp_path / "a.zarr"), datavalue.open_run(tmp_path / "b.zarr")
    ra, rb = np.asarray(a.grads[:].compute()), np.asarray(b.grads[:].compute())
    # float32 rounding differs with the vmapped batch's size (measured 4.6e-6 against rows of size 5)
    np.testing.assert_allclose(rb, ra, rtol=0, atol=1e-5 * np.abs(ra).max())
    np.testing.assert_array_equal(b.sample_id, a.sample_id)


def test_p6_07_bad_max_memory_and_vmap_chunk_leave_nothing_behind(tmp_path):
    params, loss, _ = _big()
    for kw, pat in (({"max_memory": 0}, "max_memory must be"), ({"max_memory": "lots"}, "max_memory must be"),
                    ({"vmap_chunk": 0}, "vmap_chunk must be a positive int"),
                    ({"vmap_chunk": 2.0}, "vmap_chunk must be a positive int")):
        with pytest.raises(RecorderError, match=pat):
            JaxRecorder(tmp_path / "r.zarr", params, loss, proj_dim=16, **kw)
        assert not (tmp_path / "r.zarr").exists()


def test_p6_07_the_default_check_uses_the_available_memory(tmp_path, monkeypatch):
    import datavalue._memory as mem

    params, loss, x = _big()
    monkeypatch.setattr(mem, "available_memory", lambda: 2_000_000)
    with JaxRecorder(tmp_path / "r.zarr", params, loss, proj_dim=16, chunk_rows=64) as rec:
        if jax.default_backend() == "cpu":
            with pytest.raises(RecorderError, match="but the machine has 1.9 MiB available"):
                rec.step(params, x, sample_ids=np.arange(64), lr=0.1)
        monkeypatch.setenv("DATAVALUE_MEMORY_CHECK", "0")
        rec.step(params, x, sample_ids=np.arange(64), lr=0.1)
        assert rec.n_steps == 1


def _tiny(tmp_path, **kw):
    params = {"0": {"weight": jnp.ones((4, 3)), "bias": jnp.zeros(4)}}
    loss = lambda p, x: jnp.sum(p["0"]["weight"] @ x + p["0"]["bias"])  # noqa: E731
    with JaxRecorder(tmp_path / "j.zarr", params, loss, proj_dim=4, seed=0) as r:
        r.step(params, jnp.ones((2, 3)), sample_ids=[0, 1], lr=0.1)
    return params, loss


def test_p6_11_resume_names_the_setting_that_differs(tmp_path):
    params, loss = _tiny(tmp_path)
    run = tmp_path / "j.zarr"
    with pytest.raises(StoreMismatchError, match=r"cannot resume: .*: seed: recorded 0, now 1\. Re-create"):
        JaxRecorder(run, params, loss, proj_dim=4, seed=1, resume=True)
    with pytest.raises(StoreMismatchError, match=r"proj_dim: recorded 4, now 8\. "):
        JaxRecorder(run, params, loss, proj_dim=8, resume=True)
    with pytest.raises(StoreMismatchError, match=r"sketch: recorded '\w+', now '\w+'"):
        kind = datavalue.open_run(run).manifest["projection"]["sketch"]
        JaxRecorder(run, params, loss, proj_dim=4, resume=True,
                    sketch="orthogonal" if kind == "gaussian" else "gaussian")
    other = {"0": {"weight": jnp.ones((5, 3)), "bias": jnp.zeros(5)}}
    with pytest.raises(StoreMismatchError, match=r"parameter '0\.weight' shape: recorded \[4, 3\], now \[5, 3\]"):
        JaxRecorder(run, other, loss, proj_dim=4, resume=True)
    with pytest.raises(StoreMismatchError, match=r"storage_dtype: recorded 'float32', now 'float64'"):
        JaxRecorder(run, params, loss, proj_dim=4, resume=True, storage_dtype="float64")
    with JaxRecorder(run, params, loss, proj_dim=4, resume=True) as r:  # the same settings resume
        r.step(params, jnp.ones((2, 3)), sample_ids=[2, 3], lr=0.1)
    assert datavalue.open_run(run).n_steps == 2


def test_p6_14_epoch_takes_a_jax_integer_scalar(tmp_path):
    params, loss = _tiny(tmp_path)
    with JaxRecorder(tmp_path / "e.zarr", params, loss, proj_dim=4) as r:
        r.step(params, jnp.ones((2, 3)), sample_ids=jnp.asarray([0, 1]), lr=jnp.float32(0.1), epoch=jnp.int32(3))
        r.step(params, jnp.ones((2, 3)), sample_ids=[0, 1], lr=0.1, epoch=np.int64(4))
        for bad in (jnp.float32(1.0), jnp.asarray([1, 2]), jnp.asarray(True)):
            with pytest.raises(RecorderError, match="epoch must be a non-negative int"):
                r.step(params, jnp.ones((2, 3)), sample_ids=[0, 1], lr=0.1, epoch=bad)
        with pytest.raises(RecorderError, match="epoch must be a non-negative int"):
            r.step(params, jnp.ones((2, 3)), sample_ids=[0, 1], lr=0.1, epoch=jnp.int32(-1))
    assert datavalue.open_run(tmp_path / "e.zarr").epoch.tolist() == [3, 4]


def test_errors_doc_lists_these_tests():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
    section = doc[doc.index("### JAX recorder (sixth probe)"):]
    end = section.find("\n## ", 3)
    end2 = section.find("\n### ", 3)
    section = section[:min(e for e in (end, end2, len(section)) if e >= 0)]
    here = {name for name in globals() if name.startswith("test_") and name != "test_errors_doc_lists_these_tests"}
    listed = set(re.findall(r"`(test_[a-z0-9_]+)`", section))
    assert here == listed, here ^ listed
