"""The writer's chunk handling (issue 20): the tail buffer writes the same chunk files as the
concatenate-and-pad code it replaced, and per-step vector arrays get small chunks that every reader
(zarr, the embeddings' chunk-file reader, a resumed writer) takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import datavalue
from datavalue.store import open_run
from datavalue.store._schema import MARKED_ARRAYS, float_codecs, small_codecs, unwritten_value
from datavalue.store._writer import STEP_VECTOR_CHUNK_BYTES, _AppendArray, _grow, write_chunk


class _ReferenceAppend:
    """The slow oracle: ``_AppendArray`` as it was before issue 20 (concatenate the in-memory tail with
    the new rows, pad every chunk to full size in a new array, keep a copy of the new tail)."""

    def __init__(self, root, arr, length):
        self.root, self.arr, self.length = root, arr, int(length)
        self.C = int(arr.chunks[0])
        self.chunk_shape = tuple(int(c) for c in arr.chunks)
        start = (self.length // self.C) * self.C
        self.tail = np.asarray(arr[start : self.length]) if self.length > start else np.zeros((0, *arr.shape[1:]), arr.dtype)
        self.pad = unwritten_value(arr.dtype) if root.name in MARKED_ARRAYS else 0

    def append(self, data):
        if len(data) == 0:
            return
        data = np.asarray(data, dtype=self.arr.dtype).reshape(-1, *self.chunk_shape[1:])
        new_len = self.length + len(data)
        _grow(self.arr, new_len)
        C, first = self.C, self.length // self.C
        buf = np.concatenate([self.tail, data]) if len(self.tail) else data
        for i in range(-(-len(buf) // C)):
            write_chunk(self.root, first + i, buf[i * C : (i + 1) * C], C, pad=self.pad)
        rem = new_len % C
        self.tail = buf[len(buf) - rem :].copy() if rem else buf[:0].copy()
        self.length = new_len


def _chunk_files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("name", "dtype", "width", "source"), [
    ("grads", "float32", (5,), np.float32),  # marked: NaN padding
    ("grads", "float16", (3,), np.float32),  # converted on the way in
    ("sample_id", "int64", (), np.int64),  # marked: int64 minimum padding
    ("adam_m", "float32", (4,), np.float64),  # unmarked: zero padding, float64 -> float32
])
def test_append_writes_the_reference_chunks(tmp_path, name, dtype, width, source):
    """Random appends (inside a chunk, filling one exactly, spanning several), then the writer reopened
    after a crash (``length`` from the commit, tail read back) and more appends: every chunk file the
    tail buffer writes equals the old code's, byte for byte, after every append."""
    rng = np.random.default_rng(3)
    C = 7
    roots, arrays = {}, {}
    for side in ("new", "ref"):
        g = zarr.open_group(str(tmp_path / side), mode="w", zarr_format=3)
        arrays[side] = g.create_array(name, shape=(C, *width), chunks=(C, *width), dtype=dtype, fill_value=0,
                                      compressors=float_codecs() if name == "grads" else small_codecs(),
                                      config={"write_empty_chunks": True})
        roots[side] = tmp_path / side / name
    sizes = [3, 4, 7, 1, 0, 9, 14, 2, 6, 20, 5]
    new, ref = _AppendArray(roots["new"], arrays["new"], 0), _ReferenceAppend(roots["ref"], arrays["ref"], 0)
    for i, n in enumerate(sizes):
        if i == 6:  # reopen both, as a resumed writer does, mid-chunk
            length = new.length
            new = _AppendArray(roots["new"], zarr.open_array(str(roots["new"]), mode="r+"), length)
            ref = _ReferenceAppend(roots["ref"], zarr.open_array(str(roots["ref"]), mode="r+"), length)
        data = (rng.standard_normal((n, *width)) * 1e3).astype(source)
        new.append(data)
        ref.append(data)
        assert new.length == ref.length
        np.testing.assert_array_equal(new.tail, ref.tail)
        assert _chunk_files(roots["new"] / "c") == _chunk_files(roots["ref"] / "c")
    assert new.length == sum(sizes)


def _adam_run(path, k_hint, steps, *, resume=False, model=None, opt=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, model[0].in_features), torch.randint(0, 3, (4,))
    with datavalue.Recorder(path, model, proj_dim=k_hint, optimizer=opt, resume=resume, commit_every=4) as rec:
        for _ in range(steps):
            with rec.step(sample_ids=range(rec.n_steps * 4, rec.n_steps * 4 + 4)):
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return model, opt


def test_per_step_vectors_have_small_chunks_that_readers_take(tmp_path):
    """An exact run of 387 columns: ``adam_m``/``adam_v`` chunks of 256 KiB / (4 k) = 169 steps hold the
    few KiB a step adds, not 4 MiB; a run across chunk boundaries and a resume reads back whole (zarr,
    ``Run.read``, the chunk-file reader of the embeddings)."""
    from datavalue.store import fast_rows

    path = tmp_path / "r.zarr"
    _adam_run(path, None, 5)
    run = open_run(path)
    k = run.proj_dim
    assert k == 20 * 16 + 16 + 16 * 3 + 3
    rows = run.chunk_rows("adam_m")
    assert rows == STEP_VECTOR_CHUNK_BYTES // (4 * k) == run.chunk_rows("adam_v")
    assert rows * k * 4 <= STEP_VECTOR_CHUNK_BYTES < 4 << 20
    # a chunk of a few rows: record across several of them, resume in the middle of one
    many = tmp_path / "many.zarr"
    model2 = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 3))  # k = 60,803: 1 step a chunk
    model2, opt2 = _adam_run(many, None, 3, model=model2)
    assert open_run(many).chunk_rows("adam_v") == 1
    _adam_run(many, None, 2, resume=True, model=model2, opt=opt2)
    run = open_run(many)
    assert run.n_steps == 5
    m = run.read("adam_m")
    assert m.shape == (5, run.proj_dim) and np.all(np.isfinite(m)) and not m[0].any() and m[1:].any()
    np.testing.assert_array_equal(fast_rows(run.array("adam_m"))[0:5], m)
    np.testing.assert_array_equal(run.read("adam_step"), [1, 2, 3, 4, 5])


def test_adam_aware_build_reads_small_moment_chunks(tmp_path):
    """The Adam-aware build reads ``adam_m[t:t+2]`` in windows of the moments' own chunking; with 1-step
    chunks (crossing a chunk at every step) it gives the same embeddings as with one chunk for all steps."""
    from datavalue.embeddings import build_embeddings
    from datavalue.store import _writer

    outs = []
    for vector_bytes in (4 << 20, 1):
        path = tmp_path / f"r{vector_bytes}.zarr"
        old = _writer.STEP_VECTOR_CHUNK_BYTES
        _writer.STEP_VECTOR_CHUNK_BYTES = vector_bytes
        try:
            _adam_run(path, 12, 9)
        finally:
            _writer.STEP_VECTOR_CHUNK_BYTES = old
        run = open_run(path)
        assert (run.chunk_rows("adam_v") == 1) == (vector_bytes == 1)
        info = build_embeddings(path, "empirical_fisher", progress=False)
        assert info.optimizer == "adamw"
        outs.append(open_run(path).read(info.array))
    assert np.abs(outs[0]).max() > 0
    np.testing.assert_array_equal(outs[0], outs[1])
