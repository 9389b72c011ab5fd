"""``datavalue query``: thin over the API, file or module functions, refuses to overwrite."""

from __future__ import annotations

import argparse
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from datavalue._cli_query import add_parser, parse_steps_arg
from datavalue.errors import QueryError
from datavalue.query import Attributor
from datavalue.query._load import resolve_callable
from tests.query.conftest import data


def _cli(argv):
    parser = argparse.ArgumentParser(prog="datavalue")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["query", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def user_file(tiny, tmp_path_factory):
    """A user's script: the trained model from a state dict, and the test set as (x, y) or a loss."""
    path, model, _, _ = tiny
    d = tmp_path_factory.mktemp("user")
    torch.save(model.state_dict(), d / "weights.pt")
    _, _, xt, yt = data()
    torch.save((xt, yt), d / "test.pt")
    src = textwrap.dedent(f"""
        import torch
        import torch.nn.functional as F
        from torch import nn

        def model():
            m = nn.Sequential(nn.Linear({xt.shape[1]}, 10), nn.Tanh(), nn.Linear(10, 3))
            m.load_state_dict(torch.load({str(d / "weights.pt")!r}))
            return m

        def pairs():
            return torch.load({str(d / "test.pt")!r})

        def loss():
            x, y = pairs()
            return lambda m: F.cross_entropy(m(x), y, reduction="none")

        def not_a_model():
            return 3
    """)
    (d / "user_query_mod.py").write_text(src)
    return d


def test_query_writes_top_k_parquet(tiny, user_file, tmp_path, capsys):
    out = tmp_path / "res.parquet"
    f = user_file / "user_query_mod.py"
    rc = _cli([str(tiny[0]), "--model", f"{f}:model", "--data", f"{f}:pairs", "--top-k", "3", "--out", str(out),
               "--no-progress"])
    assert rc == 0 and "wrote 30 rows" in capsys.readouterr().out
    got = pd.read_parquet(out)
    expect = Attributor(tiny[0], tiny[1], progress=False).top_k(tiny[3], k=3, by="sample").to_frame()
    pd.testing.assert_frame_equal(got, expect, check_dtype=False)
    # refuses to overwrite, then does with --overwrite; a loss function works like (x, y)
    again = [str(tiny[0]), "--model", f"{f}:model", "--data", f"{f}:loss", "--top-k", "3", "--out", str(out),
             "--no-progress"]
    assert _cli(again) == 1 and "--overwrite" in capsys.readouterr().err
    assert _cli([*again, "--overwrite", "--by", "occurrence"]) == 0
    got = pd.read_parquet(out)
    assert {"row", "step", "epoch", "sample_id", "score"} <= set(got.columns) and len(got) == 30


def test_module_function_and_all_scores(tiny, user_file, tmp_path, monkeypatch):
    monkeypatch.chdir(user_file)  # module:function resolves from the current directory
    out = tmp_path / "all.parquet"
    rc = _cli([str(tiny[0]), "--model", "user_query_mod:model", "--data", "user_query_mod:pairs", "--top-k", "0",
               "--by", "step", "--steps", "2:5", "--out", str(out), "--no-progress"])
    assert rc == 0
    got = pd.read_parquet(out)
    expect = Attributor(tiny[0], tiny[1], progress=False).stage_influence(tiny[3], normalize_by_lr=False, steps=(2, 5))
    assert got["step"].tolist() == [2, 3, 4]
    np.testing.assert_allclose(got[[f"test_{i}" for i in range(5)]].to_numpy().T, expect, rtol=1e-6)


def test_bad_specs_are_clear_errors(tiny, user_file, tmp_path, capsys):
    with pytest.raises(QueryError, match="module:function"):
        resolve_callable("nocolon")
    with pytest.raises(QueryError, match="no such file"):
        resolve_callable(str(tmp_path / "missing.py") + ":f")
    with pytest.raises(QueryError, match="no function"):
        resolve_callable(f"{user_file / 'user_query_mod.py'}:nothing")
    assert parse_steps_arg("3:") == (3, None)
    with pytest.raises(QueryError):
        parse_steps_arg("3")
    f = user_file / "user_query_mod.py"
    rc = _cli([str(tiny[0]), "--model", f"{f}:not_a_model", "--data", f"{f}:pairs", "--out", str(tmp_path / "x.pq")])
    assert rc == 1 and "torch.nn.Module" in capsys.readouterr().err


def test_info_shows_each_builds_choice_of_curvature_and_blocks(tmp_path, capsys):
    """``datavalue build`` (default blocks: auto) then ``datavalue info``: every build says which
    curvature and blocks it used and why; a build without build attributes does not break info."""
    import json

    import torch.nn.functional as F

    import datavalue
    from datavalue.cli import main
    from tests.query.conftest import make_model

    x, y, _, _ = data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.zarr"
    with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, curvature="fisher") as rec:
        for idx in torch.arange(len(x)).split(8):
            with rec.step(sample_ids=idx):
                F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    assert main(["build", str(path)]) == 0
    out = capsys.readouterr().out
    assert "curvature: fisher (recorded; preferred over empirical_fisher), blocks: auto -> 1 operator over 103" in out
    assert main(["build", str(path), "--curvature", "empirical_fisher", "--blocks", "layer"]) == 0
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  fisher: 5 steps, complete\n    curvature: fisher (recorded; preferred over empirical_fisher)\n" in out
    assert "    blocks: auto -> 1 operator over 103 columns (operator state 82.9 KiB; one operator keeps" in out
    assert "    curvature: empirical_fisher (requested)\n    blocks: layer -> 2 operators of 70 / 33 columns" in out
    assert main(["info", str(path), "--json"]) == 0
    builds = json.loads(capsys.readouterr().out)["builds"]
    assert builds["fisher"]["blocks"] == [[0, 103]] and builds["fisher"]["choice"]["block_mode"] == "auto"
    assert builds["empirical_fisher"]["choice"]["operator_bytes"] == (70**2 + 33**2) * 8
    # embeddings written without build attributes (as the query tests do) are listed with the reason
    from tests.query.conftest import write_embeddings

    write_embeddings(path, curvature="none")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  none: " in out and "has no build attributes" in out
