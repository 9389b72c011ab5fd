"""Every bad input in docs/errors.md, each one a test: a typed error, never silent wrong numbers.

The table ``CASES`` is the single source of the rows of docs/errors.md (checked below).
"""

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
