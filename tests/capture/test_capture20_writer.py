"""Issue 20, sixth pass: the run writer's default chunking writes each chunk of a power-of-two batch once.

The writer commits when a chunk's worth of rows is pending and writes every chunk those rows touch whole,
the partial last one included. With 1,030 rows per chunk (``(4 << 20) // (4 k)`` at k = 1,018, the
benchmark MLP's) and steps of 128 rows, every commit rewrote a nearly empty tail chunk: 1.9x the
gradients' bytes. The default is now rounded down to a power of two.
"""

from __future__ import annotations

import numpy as np
import pytest

from datavalue.store import RunWriter, StepBlock, _writer, open_run
from datavalue.store._writer import default_chunk_rows

K = 1018
MANIFEST = {"projection": {"proj_dim": None, "seed": 0, "blocks": [
    {"name": "a", "index": 0, "rule": "linear", "kind": "dense", "params": ["a"], "shape": [K], "k_rows": K,
     "k_cols": 1, "k": K, "start": 0, "stop": K}]},
    "model_fingerprint": {"digest": "capture20"}, "loss_reduction": "mean", "curvature": {"fisher": None},
    "optimizer": {"kind": "sgd", "dampening": 0.0, "nesterov": False}}


def _block(t: int, b: int = 128) -> StepBlock:
    rng = np.random.default_rng(t)
    return StepBlock(step=t, sample_id=np.arange(b) + b * t, weight=np.full(b, 1.0 / b),
                     grads=rng.standard_normal((b, K)).astype(np.float32), flags=np.zeros(b, np.uint8), lr=0.1)


@pytest.mark.parametrize(("k", "rows"), [(1018, 1024), (1024, 1024), (1025, 512), (4096, 256), (100, 8192),
                                         (1, 65536), (10**6, 64), (33_000, 64)])
def test_default_chunk_rows_is_about_4_mib_rounded_down_to_a_power_of_two(k, rows):
    assert default_chunk_rows(k) == rows == RunWriter.default_chunk_rows(k)  # StepSink on ranks without a writer
    assert rows & (rows - 1) == 0


def test_a_power_of_two_batch_writes_each_gradient_chunk_once_and_reads_back(tmp_path, monkeypatch):
    written: dict[str, int] = {}
    orig = _writer._write_bytes

    def counting(path, data, crc):
        parts = path.parts
        name = parts[parts.index("c") - 1] if "c" in parts else path.name
        written[name] = written.get(name, 0) + len(data)
        return orig(path, data, crc)

    monkeypatch.setattr(_writer, "_write_bytes", counting)
    path = tmp_path / "r.zarr"
    steps = 24  # 3 chunks of 1,024 rows
    with RunWriter(path, MANIFEST, k=K, commit_interval=3600.0) as w:
        assert w.chunk_rows == 1024
        for t in range(steps):
            w.submit(_block(t))
    data = steps * 128 * K * 4
    # before: 1,030-row chunks, 1.9x the data (a partial chunk rewritten at every commit)
    assert written["grads"] == data
    run = open_run(path)
    assert run.n_steps == steps
    want = np.concatenate([_block(t).grads for t in range(steps)])
    np.testing.assert_array_equal(np.asarray(run.grads), want)


def test_an_explicit_chunk_rows_is_kept_and_reads_back(tmp_path):
    path = tmp_path / "r.zarr"
    with RunWriter(path, MANIFEST, k=K, chunk_rows=1030, commit_interval=3600.0) as w:
        for t in range(10):
            w.submit(_block(t))
    run = open_run(path)
    assert run.array("grads").chunks[0] == 1030
    np.testing.assert_array_equal(np.asarray(run.grads), np.concatenate([_block(t).grads for t in range(10)]))
