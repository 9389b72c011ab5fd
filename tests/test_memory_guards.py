"""Queries and recordings estimate their peak memory first and refuse, with the estimate and the cheaper
options, when it exceeds ``max_memory=`` or the available memory (issue 22, item 14).

The query estimate is checked against what a query really allocates (numpy's allocations, which
tracemalloc sees on every thread: the result, the chunks read, the per-chunk scores); the recorder's
against the sizes it is made of.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import _memory
from datavalue.capture._pipeline import VECTOR_CHUNK_BYTES, StepMemory
from datavalue.errors import QueryError, RecorderError
from datavalue.query import _attributor
from datavalue.store import open_run
from datavalue.store._writer import STEP_VECTOR_CHUNK_BYTES

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "run.zarr"
    model = _model()
    with datavalue.Recorder(path, model, proj_dim=32, chunk_rows=64) as rec:
        for t in range(40):
            with rec.step(sample_ids=range(16 * t, 16 * t + 16), lr=0.05):
                F.cross_entropy(model(X), Y).backward()
            model.zero_grad()
    datavalue.build_embeddings(path, progress=False)
    return path, model


def _loss(m):
    return F.cross_entropy(m(X), Y, reduction="none")


# ----------------------------------------------------------------------------- queries
def test_query_estimate_bounds_what_the_query_allocates(tmp_path):
    """A run of 12,800 occurrences scored against 64 test gradients: a 3.1 MiB result streamed in 50 chunks."""
    from datavalue.store import RunWriter, StepBlock

    rng = np.random.default_rng(0)
    k, b, T, m = 24, 64, 200, 64
    w = RunWriter(tmp_path / "w.zarr", {"projection": {"blocks": []}}, k=k, chunk_rows=256, background=False)
    for t in range(T):
        w.submit(StepBlock(step=t, sample_id=np.arange(b) + b * t, weight=np.full(b, 1 / b), grads=rng.normal(size=(b, k)),
                           flags=np.zeros(b, np.uint8), lr=0.1))
    w.close()
    q = rng.normal(size=(m, k))
    seen = {}

    def spy(need, **kw):
        seen["need"], seen["parts"] = need, kw["parts"]
        return _memory.check_memory(need, **kw)

    for client in ("synchronous", None):
        attr = datavalue.Attributor(tmp_path / "w.zarr", embeddings="grads", progress=False, client=client,
                                    chunk_rows=256)
        attr.scores(q)  # warm: lazy imports and caches are not the query's memory
        real = _attributor.check_memory
        _attributor.check_memory = spy
        try:
            tracemalloc.start()
            base, _ = tracemalloc.get_traced_memory()
            S = attr.scores(q)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        finally:
            _attributor.check_memory = real
        peak -= base
        assert S.shape == (m, T * b)
        assert seen["parts"][f"the ({m}, {T * b}) score matrix"] == S.nbytes  # the result, exactly
        assert peak <= seen["need"], (client, peak, seen)  # everything numpy held at once stays inside the estimate
        assert seen["need"] <= 3 * peak, (client, peak, seen)  # and the estimate is not a wild over-count


def test_query_refused_above_max_memory_with_the_cheaper_options(built):
    path, model = built
    attr = datavalue.Attributor(path, model, progress=False, max_memory=100_000, client="synchronous", chunk_rows=64)
    with pytest.raises(QueryError, match=r"this query would hold about .*\(16, 640\) score matrix 40\.0 KiB.*above "
                       r"max_memory=97\.7 KiB.*steps=.*top_k\(\).*lazy=True"):
        attr.scores(_loss)
    # the same question, asked cheaply, fits
    assert attr.top_k(_loss, k=3).to_frame().shape[0] > 0
    assert attr.scores(_loss, by="step").shape == (16, 40)
    assert attr.scores(_loss, steps=(0, 10)).shape == (16, 160)


def test_query_against_the_available_memory(built, monkeypatch):
    path, model = built
    monkeypatch.setattr(_memory, "available_memory", lambda: 60_000)
    attr = datavalue.Attributor(path, model, progress=False, client="synchronous", chunk_rows=64)
    with pytest.raises(QueryError, match=r"but the machine has 58\.6 KiB available.*DATAVALUE_MEMORY_CHECK=0"):
        attr.scores(_loss)
    monkeypatch.setenv("DATAVALUE_MEMORY_CHECK", "0")
    ref = datavalue.Attributor(path, model, progress=False).scores(_loss)
    assert np.isfinite(ref).all()


@pytest.mark.parametrize("bad", [0, -5, "lots", float("nan"), True])
def test_max_memory_must_be_a_size(built, bad):
    with pytest.raises(QueryError, match="max_memory must be"):
        datavalue.Attributor(built[0], built[1], progress=False, max_memory=bad)


# ----------------------------------------------------------------------------- recordings
def test_recorder_bound_is_made_of_its_buffers():
    mem = StepMemory(k=100, P=1000, chunk_rows=64, capture_itemsize=4, storage_itemsize=2, fisher_rows=3, adam=True,
                     whiten=True, background=True)
    parts = mem.parts(16)
    assert parts["the step's rows"] == 3 * 16 * 100 * 4
    # 64 queued steps + ceil(64 / 16) = 4 steps buffered until the chunk is full; each step: b (1 + F) k rows + Adam m, v
    assert parts["queued and buffered steps"] == (64 + 4) * (16 * 4 * 100 * 4 + 2 * 100 * 8)
    # grads and Fisher rows: one chunk each; adam_m, adam_v: a 256 KiB tail chunk each (float32)
    assert parts["the chunk being written"] == 2 * 64 * 100 * 2 + 2 * (256 << 10)
    assert VECTOR_CHUNK_BYTES == STEP_VECTOR_CHUNK_BYTES == 256 << 10
    assert parts["Adam moments"] == 2 * 100 * 8  # float64 in the run's k columns: nothing of size P (issue 20)
    assert parts["exact per-sample gradients (whitening)"] == 16 * 1000 * (4 + 16)
    sync = StepMemory(k=100, P=1000, chunk_rows=64, capture_itemsize=4, storage_itemsize=2, background=False)
    assert sync.parts(16)["queued and buffered steps"] == 4 * 16 * 100 * 4
    # the writer never lets more than commit_every steps wait uncommitted (submit blocks): the bound's cap
    capped = StepMemory(k=100, P=1000, chunk_rows=6400, capture_itemsize=4, storage_itemsize=2, fisher_rows=3,
                        background=True, commit_every=32)
    assert capped.parts(16)["queued and buffered steps"] == 32 * 16 * 4 * 100 * 4


def test_recorder_bound_of_many_fisher_rows_is_capped_by_commit_every(tmp_path):
    """4,000 Fisher samples a step, exact gradients: the old bound counted a whole chunk's worth of steps
    (each with its 4,001 rows) and refused a 3-example step as 31.6 GiB."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(tmp_path / "f.zarr", model, proj_dim=None, optimizer=opt, curvature="fisher",
                            fisher_samples=4000, storage_dtype="float64") as rec:
        parts = rec._memory.parts(3)
        assert parts["queued and buffered steps"] == 32 * 3 * 4001 * rec.layout.k * 4
        with rec.step(sample_ids=range(3), lr=0.1):
            F.cross_entropy(model(X[:3]), Y[:3]).backward()
        opt.step()  # with optimizer=, a step is written once its update has run
    assert open_run(tmp_path / "f.zarr").n_steps == 1


def test_recorder_refuses_a_step_above_max_memory_before_it_runs(tmp_path):
    model = _model()
    with datavalue.Recorder(tmp_path / "probe.zarr", model, proj_dim=32) as rec:
        k = rec.proj_dim  # 31: the sketch's split over the blocks
    bound = sum(StepMemory(k=k, P=0, chunk_rows=64, capture_itemsize=4, storage_itemsize=4,
                           commit_every=32).parts(16).values())
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=32, chunk_rows=64, max_memory=bound - 1) as rec:
        with rec.step(sample_ids=range(8), lr=0.1):  # a smaller batch fits
            F.cross_entropy(model(X[:8]), Y[:8]).backward()
        model.zero_grad()
        ran = []
        with pytest.raises(RecorderError, match=r"recording a step of 16 examples would hold about .*above "
                           r"max_memory=.*smaller proj_dim"):
            with rec.step(sample_ids=range(8, 24), lr=0.1):
                ran.append(1)
        assert not ran  # refused before the block's body
    assert open_run(tmp_path / "r.zarr").n_steps == 1
    with datavalue.Recorder(tmp_path / "r2.zarr", model, proj_dim=32, chunk_rows=64, max_memory=bound) as rec:
        with rec.step(sample_ids=range(16), lr=0.1):
            F.cross_entropy(model(X), Y).backward()
    assert open_run(tmp_path / "r2.zarr").n_steps == 1


def test_recorder_checks_micro_batched_steps_at_commit(tmp_path, monkeypatch):
    model = _model()
    monkeypatch.setattr(_memory, "available_memory", lambda: 1_000_000)
    with datavalue.Recorder(tmp_path / "m.zarr", model, proj_dim=None, chunk_rows=64, storage_dtype="float64") as rec:
        monkeypatch.setattr(_memory, "available_memory", lambda: 20_000)  # less memory by the time the step commits
        for mb in range(2):
            with rec.microbatch(range(8 * mb, 8 * mb + 8)):
                F.cross_entropy(model(X[8 * mb : 8 * mb + 8]), Y[8 * mb : 8 * mb + 8]).backward()
        with pytest.raises(RecorderError, match=r"step of 16 examples.*available.*DATAVALUE_MEMORY_CHECK=0"):
            rec.commit_step(lr=0.1)
    assert open_run(tmp_path / "m.zarr").n_steps == 0


@pytest.mark.parametrize("bad", [0, "lots", float("inf")])
def test_recorder_max_memory_must_be_a_size_and_nothing_is_created(tmp_path, bad):
    with pytest.raises(RecorderError, match="max_memory must be"):
        datavalue.Recorder(tmp_path / "x.zarr", _model(), proj_dim=None, max_memory=bad)
    assert not (tmp_path / "x.zarr").exists()
