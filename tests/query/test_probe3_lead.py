"""The third probe of issue 22 (defects 07, 08, 23, 24: the query and build parts): nothing rounded,
clipped or written under a misleading name; a path that leaves the run is refused, not handed to zarr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue.cli import main
from datavalue.errors import EmbeddingError, QueryError
from tests.query.test_replay_cli_errors import _argv, case  # noqa: F401  (a module fixture)

X = torch.randn(24, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
Y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(1))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("p3") / "r.zarr"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with datavalue.Recorder(path, model, proj_dim=None, storage_dtype="float64", optimizer=opt) as rec:
        for t in range(4):
            ids = np.arange(6 * t, 6 * t + 6)
            with rec.step(sample_ids=ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
    datavalue.build_embeddings(path, segments=2)
    return path, model


def Q(m):  # two test points' losses
    return F.cross_entropy(m(X[:2]), Y[:2], reduction="none")


def test_a_batch_tuple_as_query_is_refused_clearly(built):
    path, model = built
    with pytest.raises(QueryError, match=r"pass lambda m: loss\(m\(x\), y"):
        datavalue.Attributor(path, model).scores((X[:2], Y[:2]))


@pytest.mark.parametrize("steps", [(-100, None), (0, 5), (None, 99), (-5, -1)])
def test_a_step_window_past_the_run_is_refused_not_clipped(built, steps):
    path, model = built
    attr = datavalue.Attributor(path, model)
    with pytest.raises(QueryError, match=r"reaches past the run's steps 0\.\.3.*nothing is clipped"):
        attr.scores(Q, steps=steps)


def test_negative_ends_still_count_from_the_end(built):
    path, model = built
    attr = datavalue.Attributor(path, model)
    q = datavalue.Attributor(path, model).test_gradients(Q)
    np.testing.assert_array_equal(attr.scores(q, steps=(-2, None)), attr.scores(q, steps=(2, 4)))
    np.testing.assert_array_equal(attr.scores(q, steps=(-4, 4)), attr.scores(q))


@pytest.mark.parametrize("embeddings", ["../x", "embeddings/../grads", "/etc/passwd", "embeddings//values", ""])
def test_an_embeddings_path_that_leaves_the_run_is_refused(built, embeddings):
    path, model = built
    with pytest.raises(QueryError, match="embeddings must name an array inside the run"):
        datavalue.Attributor(path, model, embeddings=embeddings)


@pytest.mark.parametrize("step", [2.5, 2.0, "2", True, np.float64(2)])
def test_embeddings_at_takes_int_steps_only(built, step):
    path, _ = built
    with pytest.raises(EmbeddingError, match="step must be an int step index in 1..4"):
        datavalue.embeddings.embeddings_at(path, step)


def test_embeddings_at_still_takes_numpy_ints(built):
    path, _ = built
    assert datavalue.embeddings.embeddings_at(path, np.int64(2)).shape[0] == 12


@pytest.mark.parametrize("name", ["results.csv", "results.json", "results"])
def test_query_and_replay_refuse_an_out_named_for_another_format(case, capsys, tmp_path, name):  # noqa: F811
    c, spec, _ = case
    out = tmp_path / name
    assert main(["replay", *_argv(c, spec, out)]) == 1
    err = capsys.readouterr().err
    assert "written as Parquet, so the name must end in .parquet" in err and "Traceback" not in err
    argv = ["query", str(c.path), "--model", f"{spec}:nothing", "--data", f"{spec}:nothing", "--out", str(out)]
    assert main(argv) == 1  # before --model is loaded
    assert "must end in .parquet" in capsys.readouterr().err
    assert not out.exists()
