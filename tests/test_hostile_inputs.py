"""Every bad input in docs/errors.md, each one a test: a typed error, never silent wrong numbers.

The table ``CASES`` is the single source of the rows of docs/errors.md (checked below).
"""

import contextlib
import json
import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import errors as E
from datavalue import shapley
from datavalue.store import RunWriter, StepBlock, open_run

ROOT = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


X, Y = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])


def _step(rec, model, ids=range(6), lr=0.1, x=X, **kw):
    with rec.step(sample_ids=ids, lr=lr, **kw):
        F.cross_entropy(model(x), Y).backward()
    model.zero_grad()


@pytest.fixture
def built(tmp_path):
    model = _model()
    path = tmp_path / "run.zarr"
    with datavalue.Recorder(path, model, proj_dim=16, chunk_rows=8) as rec:
        for t in range(3):
            _step(rec, model, ids=range(6 * t, 6 * t + 6))
    datavalue.build_embeddings(path, curvature="empirical_fisher", progress=False)
    return model, path


def rec_for(tmp_path, **kw):
    return datavalue.Recorder(tmp_path / "r.zarr", _model(), proj_dim=None, **kw)


# ----------------------------------------------------------------------------- cases
def c_ids_length(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, ids=range(5))


def c_ids_duplicate(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, ids=[0, 1, 2, 3, 4, 4])


def c_ids_float(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, ids=[0.5, 1, 2, 3, 4, 5])


def c_ids_2d(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, ids=np.arange(6).reshape(2, 3))


def c_ids_empty(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, ids=[])


def c_ids_beyond_int64(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, ids=[2**70 + i for i in range(6)])


def c_ids_strings(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, ids=list("abcdef"))


def c_lr_negative(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, lr=-0.1)


def c_lr_nan(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, lr=float("nan"))


def c_input_nan(tmp_path):
    x = X.clone()
    x[1, 0] = float("nan")
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, x=x)


def c_no_backward(tmp_path):
    with rec_for(tmp_path) as rec:
        with rec.step(sample_ids=range(6), lr=0.1):
            rec.model(X)


def c_nested(tmp_path):
    with rec_for(tmp_path) as rec:
        with rec.step(sample_ids=range(6), lr=0.1):
            with rec.step(sample_ids=range(6), lr=0.1):
                pass


def c_after_close(tmp_path):
    rec = rec_for(tmp_path)
    rec.close()
    _step(rec, rec.model)


def c_frozen_model(tmp_path):
    m = _model()
    for p in m.parameters():
        p.requires_grad_(False)
    datavalue.Recorder(tmp_path / "r.zarr", m)


def c_proj_dim_zero(tmp_path):
    datavalue.Recorder(tmp_path / "r.zarr", _model(), proj_dim=0)


def c_proj_dim_too_small(tmp_path):
    datavalue.Recorder(tmp_path / "r.zarr", _model(), proj_dim=1)


def c_tokens_missing(tmp_path):
    with rec_for(tmp_path, loss_reduction="token_mean") as rec:
        _step(rec, rec.model)


def c_tokens_negative(tmp_path):
    with rec_for(tmp_path, loss_reduction="token_mean") as rec:
        _step(rec, rec.model, tokens=[1, 2, -3, 4, 5, 6])


def c_existing_path(tmp_path):
    rec_for(tmp_path).close()
    rec_for(tmp_path)


def c_resume_other_projection(tmp_path):
    rec_for(tmp_path).close()
    datavalue.Recorder(tmp_path / "r.zarr", _model(), proj_dim=8, resume=True)


def c_open_missing(tmp_path):
    open_run(tmp_path / "nothing.zarr")


def c_open_not_a_run(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    open_run(tmp_path / "g.zarr")


def c_schema_edited(tmp_path):
    rec_for(tmp_path).close()
    zj = tmp_path / "r.zarr" / "zarr.json"
    meta = json.loads(zj.read_text())
    meta["attributes"]["datavalue"]["schema_version"] = 99
    zj.write_text(json.dumps(meta))
    open_run(tmp_path / "r.zarr")


def c_manifest_garbage(tmp_path):
    rec_for(tmp_path).close()
    (tmp_path / "r.zarr" / "zarr.json").write_text("{not json")
    open_run(tmp_path / "r.zarr")


def _small_run(tmp_path):
    w = RunWriter(tmp_path / "w.zarr", {"projection": {"blocks": []}}, k=4, chunk_rows=4, background=False)
    for t in range(3):
        w.submit(StepBlock(step=t, sample_id=np.arange(3) + 3 * t, weight=np.full(3, 1 / 3),
                           grads=np.ones((3, 4)) * (t + 1), flags=np.zeros(3, np.uint8), lr=0.1))
    w.close()
    return tmp_path / "w.zarr"


def c_chunk_flipped(tmp_path):
    p = _small_run(tmp_path)
    chunk = p / "grads" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    open_run(p).read("grads", 0, 9)


def c_chunk_truncated(tmp_path):
    p = _small_run(tmp_path)
    chunk = p / "grads" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    open_run(p).read("grads", 0, 9)


def c_chunk_deleted(tmp_path):
    p = _small_run(tmp_path)
    (p / "sample_id" / "c" / "1").unlink()
    open_run(p)


def c_writer_out_of_order(tmp_path):
    w = RunWriter(tmp_path / "w.zarr", {"projection": {"blocks": []}}, k=4, background=False)
    w.submit(StepBlock(step=5, sample_id=np.arange(2), weight=np.full(2, 0.5), grads=np.ones((2, 4)),
                       flags=np.zeros(2, np.uint8), lr=0.1))


def c_fisher_not_recorded(built):
    datavalue.build_embeddings(built[1], curvature="fisher", progress=False)


def c_rebuild_without_overwrite(built):
    datavalue.build_embeddings(built[1], curvature="empirical_fisher", progress=False)


def c_query_other_model(built):
    other = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    datavalue.Attributor(built[1], other, progress=False).scores(lambda m: F.cross_entropy(m(X), Y, reduction="none"))


def c_query_scalar_loss(built):
    datavalue.Attributor(built[1], built[0], progress=False).scores(lambda m: F.cross_entropy(m(X), Y))


def c_query_owners_missing(built):
    datavalue.Attributor(built[1], built[0], progress=False).scores(
        lambda m: F.cross_entropy(m(X), Y, reduction="none"), by="owner", owners={0: "a", 1: "b"})


def c_query_no_embeddings(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model)
    datavalue.Attributor(tmp_path / "r.zarr", rec.model, progress=False)


def c_pool_negative(tmp_path):
    shapley.split_royalties([1.0, 2.0], pool=Decimal("-5.00"))


def c_pool_float(tmp_path):
    shapley.split_royalties([1.0, 2.0], pool=12.5)


def c_pool_subcent(tmp_path):
    shapley.split_royalties([1.0, 2.0], pool=Decimal("10.001"))


def c_values_nan(tmp_path):
    shapley.split_royalties([1.0, float("nan")], pool=Decimal("10.00"))


def c_exact_too_many(tmp_path):
    shapley.exact(lambda S: float(len(S)), 40)


def c_ledger_edited_row(tmp_path):
    ledger = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    ledger.record(output_id="g1", prompt="p", revenue=Decimal("10.00"), owners=["a", "b"], result=[1.0, 2.0],
                  content=b"x", timestamp="2025-01-01")
    lines = (tmp_path / "l.jsonl").read_text().splitlines()
    lines[-1] = lines[-1].replace('"g1"', '"g2"')
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    shapley.RoyaltyLedger(tmp_path / "l.jsonl").records()


def c_ledger_malformed_row(tmp_path):
    ledger = shapley.RoyaltyLedger(tmp_path / "l.jsonl")
    ledger.record(output_id="g1", prompt="p", revenue=Decimal("10.00"), owners=["a", "b"], result=[1.0, 2.0],
                  content=b"x", timestamp="2025-01-01")
    with open(tmp_path / "l.jsonl", "a") as f:
        f.write("{this is not a row\n")
    shapley.RoyaltyLedger(tmp_path / "l.jsonl").records()


def c_cli_out_inside_run(built):
    from datavalue.cli import main

    rc = main(["archive", str(built[1]), str(built[1] / "inside.zip")])
    assert rc == 2
    raise E.StoreError("exit code 2")  # reached only when the CLI refused


def c_cli_refuses_overwrite(built):
    from datavalue.cli import main

    out = built[1].parent / "a.zip"
    assert main(["archive", str(built[1]), str(out)]) == 0
    assert main(["archive", str(built[1]), str(out)]) == 2
    raise E.StoreExistsError("exit code 2")


# ----------------------------------------------------------------------------- issue 22: training that differs
def c_lr_string(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, lr="abc")


def c_lr_complex(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, lr=1j)


def c_lr_tensor(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, lr=torch.tensor([0.1, 0.2]))


def c_lr_bool(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model, lr=True)


def c_accumulation_in_step(tmp_path):
    with rec_for(tmp_path) as rec:
        with rec.step(sample_ids=range(3), lr=0.1):  # ids of one micro-batch, two micro-batches run
            for mb in range(2):
                F.cross_entropy(rec.model(X[3 * mb : 3 * mb + 3]), Y[3 * mb : 3 * mb + 3]).backward()


def c_accumulation_outside_block(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "o.zarr", model, proj_dim=None, optimizer=opt) as rec:
        with rec.step(sample_ids=range(3)):  # the block holds the first micro-batch only
            F.cross_entropy(model(X[:3]), Y[:3]).backward()
        F.cross_entropy(model(X[3:]), Y[3:]).backward()  # the second, outside the block
        opt.step()


def _sgd_run(tmp_path, model, steps=1, **kw):
    """A recorder with ``optimizer=`` and ``steps`` correct steps (block, opt.step(), zero_grad())."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = datavalue.Recorder(tmp_path / "o.zarr", model, proj_dim=None, optimizer=opt, **kw)
    try:
        for t in range(steps):
            with rec.step(sample_ids=range(6 * t, 6 * t + 6)):
                F.cross_entropy(model(X * (1 + t)), Y).backward()
            opt.step()
            opt.zero_grad()
    except BaseException:
        rec.close()
        raise
    return rec, opt


@contextlib.contextmanager
def _second_block(tmp_path, **step_kw):
    """A run with one correct step, open, and step 1's block recorded (ids 6..11, ``step_kw`` to
    ``rec.step``): yields ``(rec, model, opt)`` for what the case does next; closes the run after."""
    model = _model()
    rec, opt = _sgd_run(tmp_path, model)
    with rec:
        with rec.step(sample_ids=range(6, 12), **step_kw):
            F.cross_entropy(model(X), Y).backward()
        yield rec, model, opt


def c_zero_grad_forgotten(tmp_path):
    with _second_block(tmp_path) as (rec, model, opt):
        opt.step()  # no opt.zero_grad() before this block: step 0's gradient is still in .grad
        with rec.step(sample_ids=range(12, 18)):
            F.cross_entropy(model(2 * X), Y).backward()
        opt.step()


def c_clip_not_told(tmp_path):
    with _second_block(tmp_path) as (rec, model, opt):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()


def c_scheduler_before_step(tmp_path):
    model = _model()
    rec, opt = _sgd_run(tmp_path, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with rec:
        with rec.step(sample_ids=range(6, 12)):
            F.cross_entropy(model(X), Y).backward()
        sched.step()
        opt.step()


def c_explicit_lr_unused(tmp_path):
    with _second_block(tmp_path, lr=0.5) as (rec, model, opt):
        opt.step()


def c_optimizer_step_skipped(tmp_path):
    with _second_block(tmp_path) as (rec, model, opt):
        opt.zero_grad()
        with rec.step(sample_ids=range(12, 18)):
            F.cross_entropy(model(X), Y).backward()


def c_optimizer_step_twice(tmp_path):
    with _second_block(tmp_path) as (rec, model, opt):
        opt.step()
        opt.step()


def c_resume_other_weights(tmp_path):
    model = _model()
    rec, _ = _sgd_run(tmp_path, model, steps=2)
    rec.close()
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    rec2, _ = _sgd_run(tmp_path, fresh, steps=1, resume=True)


def c_resume_older_checkpoint(tmp_path):
    model = _model()
    rec, opt = _sgd_run(tmp_path, model, steps=1)
    rec.flush()
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (1, 2):
        with rec.step(sample_ids=range(6 * t, 6 * t + 6)):
            F.cross_entropy(model(X), Y).backward()
        opt.step()
        opt.zero_grad()
    rec.close()
    model.load_state_dict(ckpt)
    _sgd_run(tmp_path, model, steps=1, resume=True)


def c_resume_other_optimizer(tmp_path):
    model = _model()
    with datavalue.Recorder(tmp_path / "o.zarr", model, proj_dim=None,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) as rec:
        _step(rec, model, lr=None)
    datavalue.Recorder(tmp_path / "o.zarr", model, proj_dim=None, resume=True,
                       optimizer=torch.optim.Adam(model.parameters(), lr=0.1))


def c_optimizer_lr_nan(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["lr"] = float("nan")  # what a broken scheduler leaves
    with datavalue.Recorder(tmp_path / "n.zarr", model, proj_dim=None, optimizer=opt) as rec:
        _step(rec, model, lr=None)


def c_trainable_changed(tmp_path):
    with rec_for(tmp_path) as rec:
        _step(rec, rec.model)
        rec.model[0].requires_grad_(False)  # a layer frozen (or unfrozen) mid-run
        _step(rec, rec.model, ids=range(6, 12))


def c_record_over_memory(tmp_path):
    with datavalue.Recorder(tmp_path / "m.zarr", _model(), proj_dim=None, max_memory=1000) as rec:
        _step(rec, rec.model)


# ----------------------------------------------------------------------------- issue 22: queries and royalties
def c_query_steps_float(built):
    datavalue.Attributor(built[1], built[0], progress=False).scores(
        lambda m: F.cross_entropy(m(X), Y, reduction="none"), steps=(1.5, 3))


def c_query_model_str(built):
    datavalue.Attributor(built[1], "str", progress=False)


def c_query_meta_model(built):
    datavalue.Attributor(built[1], _model().to("meta"), progress=False)


def c_query_cast_model(built):
    datavalue.Attributor(built[1], _model().double(), progress=False).scores(
        lambda m: F.cross_entropy(m(X), Y, reduction="none"))  # float inputs into a float64 model


def c_query_over_memory(built):
    datavalue.Attributor(built[1], built[0], progress=False, max_memory="1 KiB").scores(
        lambda m: F.cross_entropy(m(X), Y, reduction="none"))


def c_query_max_memory_garbage(built):
    datavalue.Attributor(built[1], built[0], progress=False, max_memory="lots")


def c_pool_bool(tmp_path):
    shapley.split_royalties([1.0, 2.0], pool=True)


def c_archive_not_a_run(tmp_path):
    (tmp_path / "x.txt").write_text("notes")
    from datavalue.store import archive_run

    archive_run(tmp_path / "x.txt", tmp_path / "x.zip")


def c_ledger_directory(tmp_path):
    shapley.RoyaltyLedger(tmp_path)


def c_registry_bad_json(tmp_path):
    (tmp_path / "owners.json").write_text("{not json")
    shapley.OwnerRegistry.load(tmp_path / "owners.json")


def c_registry_not_an_object(tmp_path):
    (tmp_path / "owners.json").write_text("[1, 2, 3]")
    shapley.OwnerRegistry.load(tmp_path / "owners.json")


# id: (callable, fixture, expected error type, message pattern, what the user gets told)
CASES = {
    "ids-length": (c_ids_length, "tmp", E.RecorderError, "sample_ids has 5", "one id per example"),
    "ids-duplicate": (c_ids_duplicate, "tmp", E.RecorderError, "repeats ids \\[4\\]", "each example needs its own id"),
    "ids-float": (c_ids_float, "tmp", E.RecorderError, "integers", "map keys to int ids"),
    "ids-2d": (c_ids_2d, "tmp", E.RecorderError, "1-d", "one id per example"),
    "ids-empty": (c_ids_empty, "tmp", E.RecorderError, "empty", "a step needs an example"),
    "ids-beyond-int64": (c_ids_beyond_int64, "tmp", E.RecorderError, "int64", "ids must fit int64"),
    "ids-strings": (c_ids_strings, "tmp", E.RecorderError, "integers", "map keys to int ids"),
    "lr-negative": (c_lr_negative, "tmp", E.RecorderError, "lr", "a finite, non-negative lr"),
    "lr-nan": (c_lr_nan, "tmp", E.RecorderError, "lr", "a finite, non-negative lr"),
    "input-nan": (c_input_nan, "tmp", E.NonFiniteError, "sample ids \\[1\\]", "nothing written; on_nonfinite='skip'"),
    "no-backward": (c_no_backward, "tmp", E.RecorderStateError, "no backward", "call loss.backward() inside"),
    "nested-steps": (c_nested, "tmp", E.RecorderStateError, "nested", "close the current step first"),
    "after-close": (c_after_close, "tmp", E.RecorderStateError, "closed", "resume=True"),
    "frozen-model": (c_frozen_model, "tmp", E.UnsupportedModelError, "no trainable parameters", "nothing to record"),
    "proj-dim-zero": (c_proj_dim_zero, "tmp", E.RecorderError, "proj_dim", "a positive int, a dict or None"),
    "proj-dim-too-small": (c_proj_dim_too_small, "tmp", E.RecorderError, "proj_dim", "at least one column per block"),
    "tokens-missing": (c_tokens_missing, "tmp", E.RecorderError, "tokens", "pass tokens= per example"),
    "tokens-negative": (c_tokens_negative, "tmp", E.RecorderError, "non-negative", "non-negative counts"),
    "path-exists": (c_existing_path, "tmp", E.StoreExistsError, "resume=True", "resume=True or overwrite=True"),
    "resume-mismatch": (c_resume_other_projection, "tmp", E.StoreMismatchError, "projection", "the recorded settings"),
    "open-missing": (c_open_missing, "tmp", E.StoreNotFoundError, "no datavalue run", "record one first"),
    "open-not-a-run": (c_open_not_a_run, "tmp", E.StoreMismatchError, "not a datavalue run", "wrong directory"),
    "schema-edited": (c_schema_edited, "tmp", E.StoreMismatchError, "schema version 99", "install the writing version"),
    "manifest-garbage": (c_manifest_garbage, "tmp", E.StoreCorruptError, "cannot open", "restore the run"),
    "chunk-flipped": (c_chunk_flipped, "tmp", E.StoreCorruptError, "grads/c/0/0 is corrupt", "names the chunk"),
    "chunk-truncated": (c_chunk_truncated, "tmp", E.StoreCorruptError, "grads/c/1/0 is corrupt", "names the chunk"),
    "chunk-deleted": (c_chunk_deleted, "tmp", E.StoreCorruptError, "sample_id/c/1 .*missing", "names the chunk"),
    "writer-out-of-order": (c_writer_out_of_order, "tmp", E.RecorderStateError, "out of order", "steps in order"),
    "fisher-not-recorded": (c_fisher_not_recorded, "built", E.CurvatureUnavailableError, "curvature=.fisher.", "Recorder(..., curvature='fisher')"),
    "rebuild-no-overwrite": (c_rebuild_without_overwrite, "built", E.StoreExistsError, "overwrite=True", "overwrite=True"),
    "query-other-model": (c_query_other_model, "built", E.ModelMismatchError, "fingerprint", "the recorded architecture"),
    "query-scalar-loss": (c_query_scalar_loss, "built", E.QueryError, "reduction='none'", "per-example losses"),
    "query-owners-missing": (c_query_owners_missing, "built", E.QueryError, "owner", "map every sample or unowned="),
    "query-no-embeddings": (c_query_no_embeddings, "tmp", E.QueryError, "build_embeddings", "build them first"),
    "pool-negative": (c_pool_negative, "tmp", shapley.InvalidPoolError, "", "a non-negative Decimal pool"),
    "pool-float": (c_pool_float, "tmp", shapley.InvalidPoolError, "", "Decimal or str, never float"),
    "pool-subcent": (c_pool_subcent, "tmp", shapley.InvalidPoolError, "", "whole cents"),
    "values-nan": (c_values_nan, "tmp", shapley.ShapleyError, "", "finite values"),
    "exact-too-many-players": (c_exact_too_many, "tmp", shapley.TooManyPlayersError, "permutation", "use permutation"),
    "ledger-edited-row": (c_ledger_edited_row, "tmp", shapley.ShapleyError, "hash chain", "restore from backup"),
    "ledger-malformed-row": (c_ledger_malformed_row, "tmp", shapley.ShapleyError, "not a ledger row", "restore from backup"),
    "cli-output-inside-run": (c_cli_out_inside_run, "built", E.StoreError, "exit code 2", "choose a path outside the run"),
    "cli-refuses-overwrite": (c_cli_refuses_overwrite, "built", E.StoreExistsError, "exit code 2", "--overwrite"),
    "lr-string": (c_lr_string, "tmp", E.RecorderError, "real number, got 'abc'", "a number, or optimizer="),
    "lr-complex": (c_lr_complex, "tmp", E.RecorderError, "real number, got 1j", "a number, or optimizer="),
    "lr-tensor": (c_lr_tensor, "tmp", E.RecorderError, "one number, got a tensor of shape \\(2,\\)", "the step's lr"),
    "lr-bool": (c_lr_bool, "tmp", E.RecorderError, "got True \\(bool\\)", "a number, or optimizer="),
    "accumulation-in-step": (c_accumulation_in_step, "tmp", E.RecorderError, "second forward and backward.*rec.microbatch",
                             "rec.microbatch / rec.commit_step"),
    "accumulation-outside-block": (c_accumulation_outside_block, "tmp", E.RecorderError,
                                   "optimizer.step\\(\\): a backward pass outside any recorded block",
                                   "rec.microbatch / rec.commit_step"),
    "zero-grad-forgotten": (c_zero_grad_forgotten, "tmp", E.RecorderError, "zero_grad\\(\\) was probably not called",
                            "opt.zero_grad() after every opt.step()"),
    "clip-not-told": (c_clip_not_told, "tmp", E.RecorderError, "scaled by 0\\.\\d+ after the step recorded clip_coef=1",
                      "h.clip_coef, or commit_step(clip_coef='auto')"),
    "scheduler-before-step": (c_scheduler_before_step, "tmp", E.RecorderError,
                              "param group 0 lr: recorded 0\\.1, now 0\\.05", "scheduler.step() after opt.step()"),
    "explicit-lr-unused": (c_explicit_lr_unused, "tmp", E.RecorderError, "recorded lr=0\\.5 .*updates with lr 0\\.1",
                           "omit lr= with optimizer="),
    "optimizer-step-skipped": (c_optimizer_step_skipped, "tmp", E.RecorderStateError,
                               "step 1 was recorded but optimizer.step\\(\\) never ran", "one opt.step() per block"),
    "optimizer-step-twice": (c_optimizer_step_twice, "tmp", E.RecorderError, "step 1's update already ran",
                             "one opt.step() per block"),
    "resume-other-weights": (c_resume_other_weights, "tmp", E.StoreMismatchError,
                             "not the ones the run reached after its 2 steps", "load the weights the run reached"),
    "resume-older-checkpoint": (c_resume_older_checkpoint, "tmp", E.StoreMismatchError,
                                "weights the run had after step 1, and the run has 3 steps", "the last flush's checkpoint, or a new run"),
    "resume-other-optimizer": (c_resume_other_optimizer, "tmp", E.StoreMismatchError, "optimizer kind: recorded 'sgd', now 'adam'",
                               "the recorded optimizer, or a new run"),
    "optimizer-lr-nan": (c_optimizer_lr_nan, "tmp", E.RecorderError, "param group 0 reports lr=nan", "check the scheduler"),
    "trainable-changed": (c_trainable_changed, "tmp", E.RecorderError, "no longer trainable: \\['0.bias', '0.weight'\\]",
                          "a new run with the new set"),
    "record-over-memory": (c_record_over_memory, "tmp", E.RecorderError, "above max_memory", "smaller proj_dim or batches"),
    "query-steps-float": (c_query_steps_float, "built", E.QueryError, "int step indices", "steps=(1, 3)"),
    "query-model-str": (c_query_model_str, "built", E.QueryError, "torch.nn.Module", "load the model first"),
    "query-meta-model": (c_query_meta_model, "built", E.QueryError, "meta device", "load the weights first"),
    "query-cast-model": (c_query_cast_model, "built", E.QueryError, "parameters are float64", "cast the inputs or model.float()"),
    "query-over-memory": (c_query_over_memory, "built", E.QueryError, "above max_memory", "top_k, by=, steps=, lazy=True"),
    "query-max-memory-garbage": (c_query_max_memory_garbage, "built", E.QueryError, "max_memory must be", "bytes or '8 GiB'"),
    "pool-bool": (c_pool_bool, "tmp", shapley.InvalidPoolError, "got the bool True", "an amount of money"),
    "archive-not-a-run": (c_archive_not_a_run, "tmp", E.StoreNotFoundError, "no datavalue run", "record one first"),
    "ledger-directory": (c_ledger_directory, "tmp", shapley.LedgerError, "is a directory", "the ledger's file"),
    "registry-bad-json": (c_registry_bad_json, "tmp", shapley.LedgerError, "not valid JSON", "restore or save again"),
    "registry-not-an-object": (c_registry_not_an_object, "tmp", shapley.LedgerError, "holds a JSON list", "what save writes"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(case, tmp_path, request):
    fn, fixture, exc, pattern, _ = CASES[case]
    arg = request.getfixturevalue("built") if fixture == "built" else tmp_path
    with pytest.raises(exc, match=pattern):
        fn(arg)


def test_errors_doc_lists_every_case():
    doc = (ROOT / "docs" / "errors.md").read_text()
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", doc, re.M)
    assert sorted(ids) == sorted(CASES), set(ids) ^ set(CASES)
    assert len(CASES) >= 25


def test_other_major_version_is_refused(tmp_path):
    rec_for(tmp_path).close()
    zj = tmp_path / "r.zarr" / "zarr.json"
    meta = json.loads(zj.read_text())
    meta["attributes"]["datavalue"]["versions"]["datavalue-engine"] = "7.0.0"
    zj.write_text(json.dumps(meta))
    with pytest.raises(E.StoreMismatchError, match="datavalue-engine 7.0.0"):
        open_run(tmp_path / "r.zarr")


# ----------------------------------------------------------------------------- issue 22: what works now
@pytest.mark.parametrize("wrap", ["DataParallel", "double", "half", "bfloat16"])
def test_queries_take_wrapped_and_cast_models(built, wrap):
    """A wrapped model is unwrapped (its ``module.*`` names are the run's); a cast model gives the scores of
    the recorded one up to its own precision (test inputs cast inside the loss)."""
    import copy

    model, path = built
    ref = datavalue.Attributor(path, model, progress=False).scores(lambda m: F.cross_entropy(m(X), Y, reduction="none"))
    other = torch.nn.DataParallel(copy.deepcopy(model)) if wrap == "DataParallel" else copy.deepcopy(model).to(
        getattr(torch, {"double": "float64", "half": "float16"}.get(wrap, wrap)))
    dtype = next(other.parameters()).dtype
    S = datavalue.Attributor(path, other, progress=False).scores(
        lambda m: F.cross_entropy(m(X.to(dtype)).float(), Y, reduction="none"))
    tol = {"DataParallel": 1e-6, "double": 1e-5, "half": 3e-2, "bfloat16": 2e-1}[wrap]
    np.testing.assert_allclose(S, ref, rtol=0, atol=tol * np.abs(ref).max())


CLI_CASES = {
    # id: (argv builder, what stderr says)
    "archive-a-file": (lambda t: ["archive", str(t / "x.txt"), str(t / "a.zip")], "no datavalue run at .*x.txt"),
    "archive-out-under-a-file": (lambda t: ["archive", str(t / "run.zarr"), str(t / "x.txt" / "a.zip")],
                                 "x.txt is a file, not a directory"),
    "royalties-ledger-directory": (lambda t: ["royalties", str(t), "--period", ":", "--out", str(t / "r.html")],
                                   "is a directory; a royalty ledger is one JSON-lines file"),
    "royalties-registry-bad-json": (lambda t: ["royalties", str(t / "l.jsonl"), "--period", ":", "--out",
                                               str(t / "r.html"), "--registry", str(t / "x.txt")], "not valid JSON"),
    "royalties-out-a-directory": (lambda t: ["royalties", str(t / "l.jsonl"), "--period", ":", "--out",
                                             str(t / "run.zarr"), "--format", "html", "--overwrite"],
                                  "--out .*run.zarr is a directory"),
    "royalties-out-under-a-file": (lambda t: ["royalties", str(t / "l.jsonl"), "--period", ":", "--out",
                                              str(t / "x.txt" / "r.html")], "x.txt is a file, not a directory"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_clearly(case, built, capsys):
    """Exit status 2 and one line on stderr, never a traceback; nothing written."""
    from datavalue.cli import main

    t = built[1].parent
    (t / "x.txt").write_text("notes")
    ledger = shapley.RoyaltyLedger(t / "l.jsonl")
    ledger.record(output_id="g1", prompt="p", revenue=Decimal("10.00"), owners=["a", "b"], result=[1.0, 2.0],
                  content=b"x", timestamp="2025-01-01")
    before = sorted(p.name for p in t.iterdir())
    argv, said = CLI_CASES[case]
    assert main(argv(t)) == 2
    err = capsys.readouterr().err
    assert re.search(said, err), err
    assert "Traceback" not in err
    assert sorted(p.name for p in t.iterdir()) == before


def test_errors_doc_lists_every_cli_case():
    doc = (ROOT / "docs" / "errors.md").read_text()
    ids = re.findall(r"^\| `cli:([a-z0-9-]+)` \|", doc, re.M)
    assert sorted(ids) == sorted(CLI_CASES), set(ids) ^ set(CLI_CASES)
