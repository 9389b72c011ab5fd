"""Sixth probe, paths and the CLI: relative run paths with a dask ``client=`` (P6-01), ``file://``
URLs (P6-05), a run directory named ``*.zip`` (P6-10), ``::`` in a run name (P6-13), ``query
--data`` returning a model (P6-12), ``royalties --out -`` and ``query --steps -1:`` (P6-14)."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from decimal import Decimal

import numpy as np
import pytest
import torch
from torch import nn

import datavalue
from datavalue.cli import join_negative_values, main
from datavalue.errors import StoreMismatchError, StoreNotFoundError
from datavalue.query import Attributor
from datavalue.store import RunPathError, archive_run, check_workers_see_run, open_run
from tests.query.conftest import D, data, record, test_loss

torch.set_num_threads(1)


def _other_model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(D, 10), nn.Tanh(), nn.Linear(10, 3))


def _loss():
    _, _, xt, yt = data()
    return test_loss(xt, yt)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """``A/r.zarr`` and ``B/r.zarr``: same shapes, other initial weights (so other scores), both built."""
    root = tmp_path_factory.mktemp("p6runs")
    (root / "A").mkdir()
    (root / "B").mkdir()
    ma = record(root / "A" / "r.zarr")
    mb = record(root / "B" / "r.zarr", model=_other_model())
    for sub in ("A", "B"):
        datavalue.build_embeddings(root / sub / "r.zarr", progress=False)
    return root, ma, mb


# ------------------------------------------------------------------ P6-01: relative paths on a cluster
@pytest.mark.timeout(300)
def test_relative_run_path_on_a_process_cluster_is_the_clients_run(two_runs, monkeypatch):
    """The workers start in A/, the client then moves to B/ and names ``r.zarr``: every answer is B's
    (before: the workers opened A's run: A's scores, and B's rebuilt embeddings made from A's rows)."""
    distributed = pytest.importorskip("distributed")
    root, _, mb = two_runs
    loss = _loss()
    want = Attributor(root / "B" / "r.zarr", mb, progress=False).scores(loss)
    want_tracin = Attributor(root / "B" / "r.zarr", mb, kind="tracin", progress=False).scores(loss)
    other = Attributor(root / "A" / "r.zarr", mb, progress=False).scores(loss)
    assert np.abs(want - other).max() > 1e-3  # the two runs answer differently
    ref_emb = open_run(root / "B" / "r.zarr").read("embeddings/empirical_fisher/values")
    monkeypatch.chdir(root / "A")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        assert set(client.run(os.getcwd).values()) == {str(root / "A")}  # the workers' cwd is A/
        monkeypatch.chdir(root / "B")
        attr = Attributor("r.zarr", mb, progress=False, client=client)
        np.testing.assert_allclose(attr.scores(loss), want, rtol=1e-6)  # before: A's scores
        assert attr.path == root / "B" / "r.zarr"
        tracin = Attributor("r.zarr", mb, kind="tracin", progress=False, client=client)
        np.testing.assert_allclose(tracin.scores(loss), want_tracin, rtol=1e-6)
        # a segmented build on the workers, over B's own embeddings
        datavalue.build_embeddings("r.zarr", segments=2, client=client, overwrite=True, progress=False)
    got = open_run(root / "B" / "r.zarr").read("embeddings/empirical_fisher/values")
    np.testing.assert_allclose(got, ref_emb, rtol=1e-6, atol=1e-10)


class _Workers:
    """A stand-in for a ``dask.distributed.Client`` whose one worker runs the check function for real,
    on a filesystem where ``swap`` happens while it looks (the run hidden, or replaced by another)."""

    scheduler = object()

    def __init__(self, swap):
        self.swap = swap

    def run(self, fn, *args):
        with self.swap():
            return {"tcp://10.0.0.9:40000": fn(*args)}


def test_a_worker_that_cannot_see_the_run_is_told_to_share_the_path(two_runs):
    root, model, _ = two_runs
    path = root / "A" / "r.zarr"
    hidden = path.with_name("hidden.zarr")

    @contextlib.contextmanager
    def hide():
        path.rename(hidden)
        try:
            yield
        finally:
            hidden.rename(path)

    with pytest.raises(StoreNotFoundError, match="cannot read the run at .*same absolute path.*shared"):
        Attributor(path, model, progress=False, client=_Workers(hide))


def test_a_worker_that_sees_another_run_at_the_path_is_refused(two_runs):
    root, _, mb = two_runs
    a, b = root / "A" / "r.zarr", root / "B" / "r.zarr"
    @contextlib.contextmanager
    def swap():  # the worker's filesystem holds A's run where the client has B's
        tmp = b.with_name("r.zarr.client")
        b.rename(tmp)
        a.rename(b)
        try:
            yield
        finally:
            b.rename(a)
            tmp.rename(b)

    with pytest.raises(StoreMismatchError, match="reads another run at"):
        check_workers_see_run(_Workers(swap), open_run(b).path, open_run(b).run_id)
    with pytest.raises(StoreMismatchError, match="reads another run at"):
        Attributor(b, mb, progress=False, client=_Workers(swap))


# ------------------------------------------------------------------ P6-05: file:// URLs
def test_file_url_is_the_local_path_for_the_recorder_and_every_reader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = "file://" + str(tmp_path / "viaurl.zarr")
    model = record(url, epochs=1)
    assert sorted(os.listdir(tmp_path)) == ["viaurl.zarr"]  # before: a tree named file: in the cwd
    assert open_run(url).path == tmp_path / "viaurl.zarr"
    datavalue.build_embeddings(url, progress=False)
    s_url = Attributor(url, model, progress=False).scores(_loss())
    s_dir = Attributor(tmp_path / "viaurl.zarr", model, progress=False).scores(_loss())
    np.testing.assert_array_equal(s_url, s_dir)
    out = archive_run(url, "file://" + str(tmp_path / "a.zip"))
    assert out == tmp_path / "a.zip" and open_run(out).n_steps == open_run(url).n_steps
    assert main(["info", url]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a.zip", "viaurl.zarr"]


def test_other_urls_are_refused_by_writers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = nn.Linear(3, 2)
    with pytest.raises(RunPathError, match="recording needs a local path.*s3://bucket/x.zarr"):
        datavalue.Recorder("s3://bucket/x.zarr", model, proj_dim=None)
    with pytest.raises(RunPathError, match="names a file on host 'otherhost'"):
        datavalue.Recorder("file://otherhost/x.zarr", model, proj_dim=None)
    assert os.listdir(tmp_path) == []  # nothing created (before: ./s3:/bucket/x.zarr)


# ------------------------------------------------------------------ P6-10: a run directory named *.zip
def test_a_run_directory_named_zip_opens_as_a_directory(tmp_path, capsys):
    path = tmp_path / "run.zip"
    model = record(path, epochs=1)
    assert path.is_dir()
    assert open_run(path).n_steps == 5
    datavalue.build_embeddings(path, progress=False)
    assert Attributor(str(path), model, progress=False).scores(_loss()).shape == (5, 40)
    assert main(["info", str(path)]) == 0 and "run.zip" in capsys.readouterr().out
    z = archive_run(path, tmp_path / "packed.zip")  # a real archive still opens as one
    assert open_run(z).n_steps == 5 and not isinstance(open_run(z).path, os.PathLike)


# ------------------------------------------------------------------ P6-13: '::' in a run name
def test_double_colon_in_a_run_name_is_one_clear_refusal(tmp_path):
    path = tmp_path / "c::d.zarr"
    with pytest.raises(RunPathError, match=r"contains '::'.*URL chaining"):
        datavalue.Recorder(path, nn.Linear(3, 2), proj_dim=None)
    assert os.listdir(tmp_path) == []
    good = tmp_path / "cd.zarr"
    record(good, epochs=1)
    good.rename(path)  # a run copied under such a name by hand: readers say the same
    with pytest.raises(RunPathError, match="contains '::'"):
        open_run(path)
    with pytest.raises(RunPathError, match="contains '::'"):
        datavalue.build_embeddings(str(path), progress=False)


# ------------------------------------------------------------------ P6-12: query --data returning a model
def test_query_data_returning_a_model_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "r.zarr"
    record(path, epochs=1)
    datavalue.build_embeddings(path, progress=False)
    mod = tmp_path / "p6_user_mod.py"
    mod.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        def model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear({D}, 10), nn.Tanh(), nn.Linear(10, 3))

        def two_args():
            return lambda model, batch: model(batch)
    """))
    out = tmp_path / "o.parquet"
    rc = main(["query", str(path), "--model", f"{mod}:model", "--data", f"{mod}:model", "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "returned a torch.nn.Module (Sequential)" in err and "Traceback" not in err
    rc = main(["query", str(path), "--model", f"{mod}:model", "--data", f"{mod}:two_args", "--out", str(out),
               "--no-progress"])
    assert rc == 1 and "cannot be called with one argument" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ P6-14: --steps -1:, --out -
def test_negative_step_window_is_accepted_with_a_space():
    assert join_negative_values(["query", "r", "--steps", "-1:", "--top-k", "3"]) == \
        ["query", "r", "--steps=-1:", "--top-k", "3"]
    assert join_negative_values(["query", "r", "--steps", "-3:-1"]) == ["query", "r", "--steps=-3:-1"]
    assert join_negative_values(["--steps", "--top-k"]) == ["--steps", "--top-k"]  # argparse says what is missing
    assert join_negative_values(["--", "--steps", "-1:"]) == ["--", "--steps", "-1:"]


def test_query_steps_negative_end_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "r.zarr"
    record(path, epochs=1)
    datavalue.build_embeddings(path, progress=False)
    mod = tmp_path / "p6_user_mod2.py"
    _, _, xt, yt = data()
    torch.save((xt, yt), tmp_path / "t.pt")
    mod.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        def model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear({D}, 10), nn.Tanh(), nn.Linear(10, 3))

        def pairs():
            return torch.load({str(tmp_path / "t.pt")!r})
    """))
    common = ["query", str(path), "--model", f"{mod}:model", "--data", f"{mod}:pairs", "--by", "step", "--top-k",
              "0", "--no-progress"]
    assert main([*common, "--steps", "-2:", "--out", str(tmp_path / "a.parquet")]) == 0
    assert main([*common, "--steps=-2:", "--out", str(tmp_path / "b.parquet")]) == 0
    import pandas as pd

    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert a["step"].tolist() == [3, 4]


@pytest.fixture
def ledger(tmp_path):
    from datavalue import shapley

    led = shapley.RoyaltyLedger(tmp_path / "ledger.jsonl")
    for day in (1, 2):
        led.record(output_id=f"gen-{day}", content=f"out {day}", prompt="p", owners=["ann", "bob"],
                   revenue=Decimal("10.00"), royalty_rate=Decimal("0.5"), result=[1.0, 3.0],
                   timestamp=f"2025-01-0{day}")
    return led.path


def test_royalties_out_dash_writes_to_stdout(ledger, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["royalties", str(ledger), "--period", "2025-01-01:2025-02-01", "--out", "-", "--format", "json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads(cap.out)
    assert doc["n_generations"] == 2 and Decimal(doc["paid_total"]) == Decimal("10.00")
    assert "standard output" in cap.err
    assert not (tmp_path / "-").exists()  # before: a file named '-'
    rc = main(["royalties", str(ledger), "--period", "2025-01-01:2025-02-01", "--out", "-"])
    assert rc == 2 and "pass --format" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()
