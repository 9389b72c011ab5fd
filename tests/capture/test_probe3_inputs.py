"""Third probe of issue 22: what a recorder is given is refused, never rounded or coerced.

Each test failed before its fix: a clipping coefficient outside ``(0, 1]`` was stored as the
step's ``grad_scale`` (a negative one flips the step's gradients in the build), ``epoch=1.5`` was
stored as 1, ``sample_ids=[True, 2]`` as id 1, ids on the meta device and ``seed=2**70`` raised
torch's own errors, the :class:`~datavalue.capture.jax.JaxRecorder` stored a negative lr and
described Adam as SGD, and ``overwrite=True`` deleted a user's files inside the run directory.
The cases are listed in ``docs/errors.md`` ("Third probe").
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.errors import RecorderError, StoreExistsError
from datavalue.store import open_run

BAD_CLIPS = [-1.0, 0.0, 2.0, 1.0 + 1e-9, "0.5", True, math.nan, math.inf, [0.5], torch.tensor([0.5, 0.5])]
BAD_EPOCHS = [1.5, "1", True, -1, 2.0, np.float64(3.0), 2**63]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _batch(n: int = 3):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 4, generator=g), torch.arange(n) % 3


def _trained_step(rec, model, opt, ids=(0, 1, 2)) -> None:
    """One recorded step as training runs it: the block, the optimizer's update, then zero_grad (the
    recorder checks that the update applies what the step records: lr from the optimizer)."""
    x, y = _batch(len(ids))
    with rec.step(sample_ids=list(ids)):
        F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _one_step(rec, model, ids=(0, 1, 2), **kw) -> None:
    x, y = _batch(len(ids))
    with rec.step(sample_ids=list(ids), lr=0.1, **kw):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad()


# ------------------------------------------------------------------ clip_coef
@pytest.mark.parametrize("clip", BAD_CLIPS, ids=repr)
def test_a_clip_coef_outside_the_unit_interval_is_refused_in_step(tmp_path, clip):
    model = _model()
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match=r"clip_coef must be a number in \(0, 1\] or None"):
            _one_step(rec, model, clip_coef=clip)
        _one_step(rec, model, ids=(3, 4, 5))  # recording goes on
    assert open_run(tmp_path / "r.zarr").grad_scale.tolist() == [1.0]


@pytest.mark.parametrize("clip", [-0.5, 1.5, "0.5", math.nan], ids=repr)
def test_a_clip_coef_set_on_the_handle_is_checked(tmp_path, clip):
    model = _model()
    x, y = _batch()
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match=r"clip_coef must be a number in \(0, 1\] or None"):
            with rec.step(sample_ids=[0, 1, 2], lr=0.1) as h:
                F.cross_entropy(model(x), y).backward()
                h.clip_coef = clip
        model.zero_grad()
        with rec.step(sample_ids=[0, 1, 2], lr=0.1) as h:  # a valid one, a tensor from clip_grad_norm_ included
            F.cross_entropy(model(x), y).backward()
            h.clip_coef = torch.clamp(0.05 / torch.tensor(0.2), max=1.0)
        model.zero_grad()
        _one_step(rec, model, ids=(3, 4, 5), clip_coef=1)
    assert open_run(tmp_path / "r.zarr").grad_scale.tolist() == [0.25, 1.0]


@pytest.mark.parametrize("clip", [-1.0, 2.0, "half", True], ids=repr)
def test_commit_step_refuses_a_bad_clip_coef_and_keeps_the_micro_batches(tmp_path, clip):
    model = _model()
    x, y = _batch()
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None) as rec:
        with rec.microbatch([0, 1, 2]):
            F.cross_entropy(model(x), y).backward()
        with pytest.raises(RecorderError, match=r"clip_coef must be a number in \(0, 1\], None or 'auto'"):
            rec.commit_step(lr=0.1, clip_coef=clip)
        assert rec.commit_step(lr=0.1, clip_coef=0.5) == 0  # the micro-batch was not dropped
    assert open_run(tmp_path / "r.zarr").grad_scale.tolist() == [0.5]


# ------------------------------------------------------------------ epoch, ids
@pytest.mark.parametrize("epoch", BAD_EPOCHS, ids=repr)
def test_an_epoch_that_is_not_a_non_negative_int_is_refused(tmp_path, epoch):
    model = _model()
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match="epoch must be a non-negative int"):
            _one_step(rec, model, epoch=epoch)
        with rec.microbatch([0, 1, 2]):
            F.cross_entropy(model(_batch()[0]), _batch()[1]).backward()
        with pytest.raises(RecorderError, match="epoch must be a non-negative int"):
            rec.commit_step(lr=0.1, epoch=epoch)
        rec.commit_step(lr=0.1, epoch=np.int64(2))
        _one_step(rec, model, ids=(3, 4, 5))
    assert open_run(tmp_path / "r.zarr").epoch.tolist() == [2, -1]


@pytest.mark.parametrize("ids", [[True, 2, 3], (0, np.bool_(True)), [False]], ids=repr)
def test_bools_among_sample_ids_are_refused(tmp_path, ids):
    model = _model()
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match="got the bool"):
            _one_step(rec, model, ids=ids)


def test_ids_and_lr_on_the_meta_device_get_a_recorder_error(tmp_path):
    model = _model()
    x, y = _batch(2)
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=None) as rec:
        with pytest.raises(RecorderError, match="sample_ids must be values the host can read.*meta"):
            with rec.step(sample_ids=torch.arange(2, device="meta"), lr=0.1):
                F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        with pytest.raises(RecorderError, match="lr must be values the host can read.*meta"):
            with rec.step(sample_ids=[0, 1], lr=torch.tensor(0.1, device="meta")):
                F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        with rec.step(sample_ids=torch.tensor([0, 1]), lr=torch.tensor(0.1, dtype=torch.bfloat16)):
            F.cross_entropy(model(x), y).backward()
    assert open_run(tmp_path / "r.zarr").sample_id.tolist() == [0, 1]


@pytest.mark.parametrize("seed", [2**70, 2**63, -1, 1.0, "7"], ids=repr)
def test_a_seed_outside_0_to_2_63_is_refused(tmp_path, seed):
    with pytest.raises(RecorderError, match="seed must be an int"):
        datavalue.Recorder(tmp_path / "r.zarr", _model(), seed=seed, proj_dim=4)
    assert not (tmp_path / "r.zarr").exists()


def test_the_largest_seed_records(tmp_path):
    model = _model()
    with datavalue.Recorder(tmp_path / "r.zarr", model, seed=2**63 - 1, proj_dim=4, curvature="fisher") as rec:
        _one_step(rec, model)
    assert open_run(tmp_path / "r.zarr").manifest["projection"]["seed"] == 2**63 - 1


# ------------------------------------------------------------------ JaxRecorder
def _jax():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return pytest.importorskip("jax")


def _jax_record(path: Path, *, rec_kw=None, step_kw=None, params=None):
    jax = _jax()
    from datavalue.capture.jax import JaxRecorder

    jnp = jax.numpy
    p0 = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}

    def loss(p, x, y):
        return -jax.nn.log_softmax(x @ p["w"] + p["b"])[y]

    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    with JaxRecorder(path, p0, loss, proj_dim=None, **(rec_kw or {})) as rec:
        kw = dict(sample_ids=[0, 1, 2, 3], lr=0.1)
        kw.update(step_kw or {})
        rec.step(p0 if params is None else params(p0), x, y, **kw)
    return open_run(path)


@pytest.mark.parametrize("step_kw, match", [
    (dict(lr=-1.0), "lr must be a finite, non-negative"),
    (dict(lr=True), "lr must be a finite, non-negative"),
    (dict(lr="abc"), "lr must be a finite, non-negative"),
    (dict(lr=np.array([0.1, 0.2])), "lr must be one number, got an array of shape"),
    (dict(lr=math.nan), "lr must be a finite, non-negative"),
    (dict(clip_coef=-1.0), r"clip_coef must be a number in \(0, 1\]"),
    (dict(clip_coef=2.0), r"clip_coef must be a number in \(0, 1\]"),
    (dict(epoch=1.5), "epoch must be a non-negative int"),
    (dict(sample_ids=[True, 1, 2, 3]), "got the bool"),
], ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_jax_recorder_refuses_bad_step_values(tmp_path, step_kw, match):
    with pytest.raises(RecorderError, match=match):
        _jax_record(tmp_path / "r.zarr", step_kw=step_kw)
    assert open_run(tmp_path / "r.zarr").n_steps == 0


@pytest.mark.parametrize("optimizer, match", [
    ({"kind": "adam"}, "must be 'sgd' or None"),
    ({"kind": "sgd", "betas": (0.9, 0.99)}, "unknown keys"),
    ({"kind": "sgd", "momentum": -1}, r"optimizer\['momentum'\] must be a number"),
    ({"kind": "sgd", "momentum": True}, r"optimizer\['momentum'\] must be a number"),
    ({"kind": "sgd", "weight_decay": math.inf}, r"optimizer\['weight_decay'\] must be a number"),
    ({"kind": "sgd", "dampening": 2.0}, r"optimizer\['dampening'\] must be a number in \[0, 1\]"),
    ({"kind": "sgd", "nesterov": 1}, "must be True or False"),
    ({"kind": "sgd", "nesterov": True}, "needs momentum > 0"),
    ("sgd", "optimizer must be a dict"),
], ids=repr)
def test_jax_recorder_refuses_an_optimizer_it_cannot_record(tmp_path, optimizer, match):
    with pytest.raises(RecorderError, match=match):
        _jax_record(tmp_path / "r.zarr", rec_kw=dict(optimizer=optimizer))
    assert not (tmp_path / "r.zarr").exists()


def test_jax_recorder_records_the_optimizer_and_a_jax_scalar_lr(tmp_path):
    jax = _jax()
    run = _jax_record(tmp_path / "r.zarr", rec_kw=dict(optimizer={"kind": "sgd", "momentum": 0.9, "nesterov": True}),
                      step_kw=dict(lr=jax.numpy.asarray(0.05), epoch=np.int32(1), clip_coef=np.float32(0.5)))
    assert run.optimizer == {"kind": "sgd", "momentum": 0.9, "dampening": 0.0, "nesterov": True}
    assert run.lr.tolist() == [float(np.float32(0.05))] and run.momentum.tolist() == [0.9]  # jax holds float32
    assert run.epoch.tolist() == [1] and run.grad_scale.tolist() == [0.5]


@pytest.mark.parametrize("change, match", [
    (lambda p: {**p, "extra": p["b"]}, r"unexpected \['extra'\]"),
    (lambda p: {"w": p["w"]}, r"missing \['b'\]"),
    (lambda p: {"w": p["w"], "b": p["w"]}, "changed shape"),
    (lambda p: [p["w"], p["b"]], "must be the \\(nested\\) dict"),
], ids=["extra leaf", "missing leaf", "changed shape", "a list"])
def test_jax_recorder_refuses_params_that_are_not_the_recorded_tree(tmp_path, change, match):
    with pytest.raises(RecorderError, match=match):
        _jax_record(tmp_path / "r.zarr", params=change)


# ------------------------------------------------------------------ overwrite=True
def _record(path: Path, *, overwrite: bool = False, **kw) -> None:
    model = _model()
    with datavalue.Recorder(path, model, proj_dim=None, overwrite=overwrite, **kw) as rec:
        _one_step(rec, model)


def test_overwrite_refuses_a_run_holding_files_datavalue_did_not_write(tmp_path):
    path = tmp_path / "r.zarr"
    _record(path)
    (path / "NOTES.txt").write_text("mine")
    (path / "checkpoint-500").mkdir()
    (path / "checkpoint-500" / "model.safetensors").write_text("weights")
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    with pytest.raises(StoreExistsError, match=r"2 entries datavalue did not write: 'NOTES.txt', 'checkpoint-500'.*"
                                               "nothing was deleted"):
        _record(path, overwrite=True)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before  # nothing deleted, nothing added
    assert (path / "NOTES.txt").read_text() == "mine" and open_run(path).n_steps == 1
    (path / "NOTES.txt").unlink()
    import shutil

    shutil.rmtree(path / "checkpoint-500")
    _record(path, overwrite=True)  # once they are gone, the run is replaced
    assert open_run(path).n_steps == 1


def test_overwrite_replaces_a_run_with_everything_datavalue_builds_in_it(tmp_path):
    path = tmp_path / "r.zarr"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, checkpoint_every=1) as rec:
        for t in range(2):
            _trained_step(rec, model, opt, ids=(3 * t, 3 * t + 1, 3 * t + 2))
    datavalue.build_embeddings(path, progress=False)
    (path / ".c.0.999999999.1.partial").write_bytes(b"")  # a dead writer's temporary
    assert {"embeddings", "checkpoints"} <= {p.name for p in path.iterdir()}
    _record(path, overwrite=True)
    assert sorted(p.name for p in path.iterdir() if p.name in ("embeddings", "checkpoints")) == []
    assert open_run(path).n_steps == 1


def test_the_run_members_cover_what_datavalue_writes(tmp_path):
    from datavalue.store._schema import RUN_MEMBERS

    path = tmp_path / "r.zarr"
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with datavalue.Recorder(path, model, proj_dim=6, optimizer=opt, checkpoint_every=1, curvature="fisher",
                            precondition="adam") as rec:
        _trained_step(rec, model, opt)
    datavalue.build_embeddings(path, progress=False)
    names = {p.name for p in path.iterdir()} - {"writer.lock"}
    assert names <= RUN_MEMBERS, names - RUN_MEMBERS


def test_demo_overwrite_refuses_a_run_holding_a_users_file_in_one_line(tmp_path, monkeypatch, capsys):
    import datavalue.data
    from datavalue.cli import main

    def fake_mnist(split="train", n=None, *, seed=0, flatten=True):  # offline, every class in both splits
        rng = np.random.default_rng([0 if split == "train" else 1, seed or 0])
        n = n or 100
        return rng.random((n, 784), dtype=np.float32), np.arange(n, dtype=np.int64) % 10

    monkeypatch.setattr(datavalue.data, "load_mnist", fake_mnist)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-train", "96", "--epochs", "1", "--proj-dim", "64", "--quiet"]
    assert main(args) == 0
    (out / "run.zarr" / "NOTES.txt").write_text("mine")
    stamp = (out / "top_k.txt").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "datavalue did not write: 'NOTES.txt'" in err and "Traceback" not in err
    assert (out / "run.zarr" / "NOTES.txt").read_text() == "mine"
    assert (out / "top_k.txt").stat().st_mtime_ns == stamp and datavalue.open_run(out / "run.zarr").n_steps > 0


def test_a_jax_nesterov_run_builds_the_embeddings_of_the_same_torch_run(tmp_path):
    """``{"kind": "sgd", "momentum": .9, "nesterov": True}`` is recorded as Nesterov (not plain SGD):
    the JAX run of an optax Nesterov loop builds the embeddings of the torch run of the same training."""
    jax = _jax()
    optax = pytest.importorskip("optax")
    from datavalue.capture.jax import JaxRecorder
    from datavalue.store import open_array

    jnp = jax.numpy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((24, 6)).astype(np.float32), rng.integers(0, 3, 24)
    batches = [rng.permutation(24)[:6] for _ in range(5)]
    params = {k: {"weight": jnp.asarray(model[int(k)].weight.detach().numpy()),
                  "bias": jnp.asarray(model[int(k)].bias.detach().numpy())} for k in ("0", "2")}

    def loss(p, xi, yi):
        h = jnp.tanh(p["0"]["weight"] @ xi + p["0"]["bias"])
        return -jax.nn.log_softmax(p["2"]["weight"] @ h + p["2"]["bias"])[yi]

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    with datavalue.Recorder(tmp_path / "t.zarr", model, proj_dim=None, optimizer=opt) as rec:
        for ids in batches:
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(torch.from_numpy(x[ids])), torch.from_numpy(y[ids])).backward()
            opt.step()
            opt.zero_grad()
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    state = tx.init(params)
    with JaxRecorder(tmp_path / "j.zarr", params, loss, proj_dim=None,
                     optimizer={"kind": "sgd", "momentum": 0.9, "nesterov": True}) as jrec:
        for ids in batches:
            grads = jrec.step(params, jnp.asarray(x[ids]), jnp.asarray(y[ids]), sample_ids=ids, lr=0.1)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["2"]["weight"]), model[2].weight.detach().numpy(), atol=1e-5)
    emb = {}
    for name in ("t", "j"):
        datavalue.build_embeddings(tmp_path / f"{name}.zarr", curvature="empirical_fisher", progress=False)
        emb[name] = np.asarray(open_array(tmp_path / f"{name}.zarr", "embeddings/empirical_fisher/values")[:])
    np.testing.assert_allclose(emb["j"], emb["t"], rtol=1e-4, atol=1e-5)
    assert open_run(tmp_path / "j.zarr").optimizer["nesterov"] is True
