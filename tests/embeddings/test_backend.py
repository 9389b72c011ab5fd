"""The torch backend of the recursion (``device=``) gives the numpy build's embeddings.

The numpy build is the reference (itself checked against the by-hand recursion, the exact
derivative and exact LOO in the other files here). Tolerances: float64 on the torch backend agrees
with numpy to ``1e-10`` of the largest entry (measured: <= 2e-16 absolute on the synthetic runs, the
two libraries order their sums differently); float32 to ``1e-4`` of the largest entry. CUDA runs the
same comparisons where a GPU is visible (skipped here), and ``device="cuda"`` on a machine without
one raises an error that says so.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from datavalue.embeddings import _core as core  # noqa: E402
from datavalue.embeddings import _hyper, build_embeddings, embeddings_at, extend_embeddings  # noqa: E402
from datavalue.embeddings._backend import get_backend, namespace, parse_device  # noqa: E402
from datavalue.errors import EmbeddingError  # noqa: E402
from datavalue.store import open_array  # noqa: E402

from ._synthetic import make_steps, write_run  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
TOL = {"float64": 1e-10, "float32": 1e-4}  # of the largest |entry| of the numpy result

SETTINGS = {
    "sgd": dict(),
    "momentum_wd": dict(momentum=0.9, weight_decay=0.01),
}


def _values(path, curvature, name="values"):
    return np.asarray(open_array(path, f"embeddings/{curvature}/{name}")[:])


def _close(got, want, dtype="float64"):
    scale = float(np.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


# ---------------------------------------------------------------------- the core, one step


def _t(x, device):
    return None if x is None else torch.as_tensor(x, device=device)


def _np(x):
    return None if x is None else x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("curv", ["empirical_fisher", "rows", "matrix", None])
@pytest.mark.parametrize("setting", ["plain", "momentum_wd_clip"])
def test_sgd_step_on_torch_equals_numpy(device, curv, setting):
    rng = np.random.default_rng(3)
    k, b = 9, 6
    G, w = rng.normal(size=(b, k)), rng.random(b) / b
    F = rng.normal(size=(4, k)) * 0.3
    S = rng.normal(size=(k, k))
    curvs = {"empirical_fisher": "empirical_fisher", "rows": F, "matrix": core.CurvMatrix((S + S.T) / 4), None: None}
    kw = dict(lr=0.2, curv=curvs[curv])
    n = k
    if setting == "momentum_wd_clip":
        u = rng.normal(size=k)
        kw.update(momentum=0.9, weight_decay=0.05, grad_scale=0.7, clip_u=u / np.linalg.norm(u))
        n = 2 * k
    R = np.hstack([np.eye(n, k) - rng.normal(size=(n, k)) * 0.1, rng.normal(size=(n, n - k)) * 0.1])
    st_np = core.state_from_operator(R, k)
    st_t = core.state_from_operator(torch.as_tensor(R, device=device), k)
    assert namespace(st_t.M).device == str(st_t.M.device)
    new_np, E_np = core.step_back(st_np, G, w, **kw)
    t_kw = dict(kw, curv=core.CurvMatrix(_t(kw["curv"].H, device)) if curv == "matrix" else
                _t(F, device) if curv == "rows" else kw["curv"])
    new_t, E_t = core.step_back(st_t, _t(G, device), _t(w, device), **t_kw)
    assert isinstance(E_t, torch.Tensor) and E_t.device.type == torch.device(device).type
    width = n
    _close(_np(core.operator(new_t, width)), core.operator(new_np, width))
    _close(_np(E_t), E_np)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("second_moment", [True, False])
@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_step_on_torch_equals_numpy(device, second_moment, decoupled):
    rng = np.random.default_rng(4)
    k, b = 8, 5
    G, w = rng.normal(size=(b, k)), np.full(b, 1.0 / b)
    coef = core.adam_coefficients(rng.normal(size=k) * 0.1, rng.random(k) * 0.01 + 1e-4, rng.normal(size=k),
                                  lr=1e-2, step=3.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                                  decoupled=decoupled, second_moment=second_moment)
    assert (coef.q is not None) == second_moment
    R = np.hstack([np.eye(k) - rng.normal(size=(k, k)) * 0.1, rng.normal(size=(k, 2 * k))])
    st_np = core.adam_state_from_operator(R, k)
    st_t = core.adam_state_from_operator(torch.as_tensor(R, device=device), k)
    F = rng.normal(size=(3, k)) * 0.3
    S = rng.normal(size=(k, k))
    for curv_np, curv_t in (("empirical_fisher", "empirical_fisher"), (F, _t(F, device)),
                            (core.CurvMatrix((S + S.T) / 4), core.CurvMatrix(_t((S + S.T) / 4, device)))):
        a, Ea = core.adam_step_back(st_np, G, w, coef, curv=curv_np, grad_scale=0.8)
        t, Et = core.adam_step_back(st_t, _t(G, device), _t(w, device), coef, curv=curv_t, grad_scale=0.8)
        assert t.finite()
        _close(_np(core.adam_operator(t)), core.adam_operator(a))
        _close(_np(Et), Ea)


@pytest.mark.parametrize("device", DEVICES)
def test_param_group_columns_on_torch_equal_numpy(device):
    """Per-column lr and coupled decay (``_hyper._step_back_columns``, param groups) on torch."""
    rng = np.random.default_rng(5)
    k, b = 7, 5
    G, w = rng.normal(size=(b, k)), rng.random(b) / b
    lr = np.array([0.1, 0.1, 0.3, 0.3, 0.0, 0.2, 0.1])
    wd = np.array([0.05, 0.05, 0.0, 0.0, 0.0, 0.01, 0.05])
    R = np.hstack([np.eye(2 * k, k) - rng.normal(size=(2 * k, k)) * 0.1, rng.normal(size=(2 * k, k)) * 0.1])
    kw = dict(curv="empirical_fisher", momentum=0.9, dampening=0.0, nesterov=False, fresh=False, grad_scale=0.7,
              embed=True, clip_u=None, clip_ug=None, inplace=True)
    new_np, E_np = _hyper._step_back_columns(core.state_from_operator(R.copy(), k), G, w, lr, wd, kw)
    st_t = core.state_from_operator(torch.as_tensor(R, device=device), k)
    new_t, E_t = _hyper._step_back_columns(st_t, _t(G, device), _t(w, device), lr, wd, kw)
    _close(_np(core.operator(new_t, 2 * k)), core.operator(new_np, 2 * k))
    _close(_np(E_t), E_np)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_row_split_gemms_on_torch_equal_numpy(device, dtype):
    """Operators at least ``SPLIT_MIN`` wide: inside ``gemm_threads`` the CPU products are split by rows
    over the pool (torch as numpy); on CUDA they run whole. Both equal numpy's split products."""
    from datavalue.embeddings import _gemm

    rng = np.random.default_rng(6)
    k, b = _gemm.SPLIT_MIN + 8, 5
    xp = get_backend(device)
    for n in (k, 2 * k):  # minus covering every column, and the first k of 2k
        M = rng.normal(size=(n, k)).astype(dtype)
        X = rng.normal(size=(b, k)).astype(dtype)
        with _gemm.gemm_threads(2), xp.scan_threads():
            assert _gemm._parts(n) is not None
            want = _gemm.matmul_T(X, M, alpha=0.3, minus=X)
            got = _gemm.matmul_T(xp.asarray(X), xp.asarray(M), alpha=0.3, minus=xp.asarray(X))
            _close(_np(got), want, dtype)
            Mt = xp.asarray(M)
            _gemm.sub_outer(M, want[:, :n], X, alpha=-0.7)
            _gemm.sub_outer(Mt, got[:, :n], xp.asarray(X), alpha=-0.7)
            _close(_np(Mt), M, dtype)


def _wide_run(path, k, b, T, momentum):
    from datavalue.store import RunWriter, StepBlock

    manifest = {
        "projection": {"proj_dim": None, "seed": 0, "blocks": [{"name": "b0", "index": 0, "start": 0, "stop": k, "k": k}]},
        "loss_reduction": "mean",
        "optimizer": {"kind": "sgd", "dampening": 0.0, "nesterov": False},
        "curvature": {"fisher": None},
    }
    rng = np.random.default_rng(7)
    w = RunWriter(path, manifest, k=k, chunk_rows=2 * b, storage_dtype="float64", background=False)
    for t in range(T):
        w.submit(StepBlock(step=t, sample_id=np.arange(b, dtype=np.int64) + b * t, weight=np.full(b, 1.0 / b),
                           grads=rng.normal(size=(b, k)) / np.sqrt(k), flags=np.zeros(b, np.uint8), lr=0.5,
                           grad_scale=float(rng.uniform(0.6, 1.0)), momentum=momentum, weight_decay=0.01))
    w.close()
    return path


@pytest.mark.parametrize("device", DEVICES)
def test_wide_block_build_on_torch_equals_numpy(tmp_path, device):
    """One operator wider than ``SPLIT_MIN`` (the row-split GEMMs of a sequential CPU build), with momentum."""
    path = _wide_run(tmp_path / "w.zarr", 520, 6, 7, momentum=0.9)
    got = {}
    for dev in (None, device):
        build_embeddings(path, progress=False, storage_dtype="float64", overwrite=True, device=dev)
        got[dev] = (_values(path, "empirical_fisher"), _values(path, "empirical_fisher", "v_values"))
    for a, b in zip(got[device], got[None], strict=True):
        _close(a, b)


# ---------------------------------------------------------------------- whole builds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("curvature", ["empirical_fisher", "fisher", "none"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_build_on_torch_equals_numpy(tmp_path, device, setting, curvature):
    """Sequential and segmented (K=3) builds, float64 and float32, per-layer and full operators;
    the synthetic steps are clipped (``grad_scale < 1``), so the clip-direction path runs too."""
    steps = make_steps(1, 23, fisher=True, **SETTINGS[setting])
    path = write_run(tmp_path / "r.zarr", steps, fisher=True)
    for dtype in ("float64", "float32"):
        for blocks in ("layer", "full"):
            kw = dict(progress=False, storage_dtype="float64", overwrite=True, dtype=dtype, blocks=blocks)
            build_embeddings(path, curvature, **kw)
            want = _values(path, curvature)
            for K in (1, 3):
                info = build_embeddings(path, curvature, segments=K, device=device, **kw)
                assert len(info.segments) == K
                meta = dict(open_array(path, f"embeddings/{curvature}/values").attrs["datavalue_embeddings"])
                assert meta["device"] == str(torch.device(device))
                _close(_values(path, curvature), want, dtype)
                if setting == "momentum_wd":  # the momentum part (v_values) too
                    v = _values(path, curvature, "v_values")
                    assert np.abs(v).max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_extend_and_checkpoints_on_torch_equal_numpy(tmp_path, device):
    steps = make_steps(5, 14, momentum=0.9, weight_decay=0.01)
    more = make_steps(6, 9, t0=14, momentum=0.9, weight_decay=0.01)
    results = {}
    for dev in (None, device):
        path = write_run(tmp_path / f"{dev}.zarr", steps)
        build_embeddings(path, segments=2, progress=False, storage_dtype="float64", device=dev)
        write_run(path, more, mode="resume")
        extend_embeddings(path, segments=2, progress=False, device=dev)
        at = np.asarray(embeddings_at(path, 14, progress=False, device=dev)[:])
        results[dev] = (_values(path, "empirical_fisher"), _values(path, "empirical_fisher", "v_values"), at)
    for got, want in zip(results[device], results[None], strict=True):
        _close(got, want)


@pytest.fixture(scope="module")
def adam_hessian_case(tmp_path_factory):
    from ._digits import make_case

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_case(tmp_path_factory.mktemp("adamw") / "r.zarr", lr=1e-2, weight_decay=0.01, adam="adamw",
                         n_removals=2, n_test=2, n_train=128, epochs=2, hidden=4, curvature=("fisher", "hessian"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
def test_adam_and_hessian_builds_on_torch_equal_numpy(adam_hessian_case, device):
    """AdamW runs (3k state with the second-moment term, and 2k without), the true Fisher and the exact
    Hessian curvature blocks, one full operator and per-layer ones, sequential and segmented."""
    c = adam_hessian_case
    for curv, kw in (("fisher", dict(blocks="layer")), ("fisher", dict(blocks="full", segments=2)),
                     ("hessian", dict(blocks="full")), ("hessian", dict(blocks="layer", segments=2)),
                     ("fisher", dict(blocks="layer", adam_second_moment=False)),
                     ("fisher", dict(blocks="full", dtype="float32"))):
        got = {}
        for dev in (None, device):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = build_embeddings(c.path, curv, progress=False, overwrite=True, device=dev, **kw)
            assert info.optimizer == "adamw"
            got[dev] = _values(c.path, curv)
        _close(got[device], got[None], kw.get("dtype", "float64"))


def test_segments_on_worker_processes_with_the_torch_backend(tmp_path):
    """The device travels with the plan to spawned worker processes (2 workers, 4 segments), and the
    result equals the sequential numpy build."""
    distributed = pytest.importorskip("distributed")
    steps = make_steps(3, 17, momentum=0.8)
    path = write_run(tmp_path / "r.zarr", steps)
    build_embeddings(path, progress=False, storage_dtype="float64")
    want = _values(path, "empirical_fisher")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        info = build_embeddings(path, segments=4, client=client, progress=False, storage_dtype="float64",
                                overwrite=True, device="cpu")
    assert len(info.segments) == 4
    _close(_values(path, "empirical_fisher"), want)


def test_a_cpu_build_leaves_torchs_threads_as_it_found_them(tmp_path):
    """The scan holds torch to one intra-op thread (``TorchBackend.scan_threads``) and gives the setting
    back, also when segments run on the threaded scheduler's workers."""
    import threading

    path = write_run(tmp_path / "r.zarr", make_steps(1, 9))
    before = torch.get_num_threads()
    seen = []
    for K in (1, 3):
        build_embeddings(path, progress=False, overwrite=True, device="cpu", segments=K)
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert torch.get_num_threads() == before
    assert seen == [before, before]


# ---------------------------------------------------------------------- errors and layering


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_says_so(tmp_path):
    path = write_run(tmp_path / "r.zarr", make_steps(0, 3))
    with pytest.raises(EmbeddingError, match=r"device='cuda' asks for a CUDA GPU.*device='cpu'"):
        build_embeddings(path, progress=False, device="cuda")
    with pytest.raises(EmbeddingError, match="CUDA GPU"):
        extend_embeddings(path, progress=False, device="cuda:1")


def test_bad_devices_and_missing_torch(monkeypatch):
    assert parse_device(None) is None and parse_device("numpy") is None
    assert parse_device(torch.device("cpu")) == "cpu"
    with pytest.raises(EmbeddingError, match="not a torch device"):
        parse_device("gpu0")
    with pytest.raises(EmbeddingError, match="'cpu' or 'cuda'"):
        parse_device("meta")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(EmbeddingError, match=r"torch cannot be imported.*pip install torch"):
        parse_device("cpu")
    assert get_backend(None).is_numpy


def test_the_numpy_path_does_not_import_torch():
    code = (
        "import sys, numpy as np, datavalue.embeddings, datavalue.embeddings._backend as b; "
        "from datavalue.embeddings import _core as core; "
        "s, E = core.step_back(core.init_state(2), np.ones((1, 2)), np.ones(1), lr=0.1); "
        "assert b.namespace(s.M).is_numpy and b.parse_device(None) is None; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
