"""Coalition cache, on-disk resume, thread-pool and dask evaluation."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from datavalue import shapley
from datavalue.shapley import games

GLOVE = games.GloveGame(n=5, left={0, 1}, right={2, 3})


def test_memory_cache_evaluates_each_coalition_once(counter):
    c = counter(GLOVE)
    util = shapley.Utility(c, 5)
    first = shapley.exact(util)
    assert first.n_evaluations == 32 and c.total == 32
    again = shapley.permutation(util, n_samples=500, seed=0)
    assert again.n_evaluations == 0 and c.total == 32
    assert max(c.calls.values()) == 1
    assert util.cached({0, 2}) == 1.0 and util.cached({0, 2}) == GLOVE({0, 2})


def test_disk_cache_resumes_after_interruption(tmp_path, counter):
    path = tmp_path / "coalitions.jsonl"
    c = counter(GLOVE)

    class Crash(RuntimeError):
        pass

    def flaky(S):
        if c.total >= 11:
            raise Crash("node lost")
        return c(S)

    game = shapley.CoalitionGame(flaky, 5, cache_path=path, fingerprint="glove-v1")
    with pytest.raises(Crash):
        shapley.exact(game)
    game.close()
    assert c.total == 11
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["schema"] == "datavalue.shapley.utility-cache" and header["n"] == 5
    assert len(lines) == 1 + 11 and all(set(json.loads(x)) == {"mask", "value"} for x in lines[1:])

    resumed = shapley.CoalitionGame(c, 5, cache_path=path, fingerprint="glove-v1")
    res = shapley.exact(resumed)
    assert res.n_evaluations == 32 - 11 and c.total == 32  # only the missing 21 were trained
    assert max(c.calls.values()) == 1
    np.testing.assert_allclose(res.values, GLOVE.shapley_values(), atol=1e-12)
    resumed.close()

    never = shapley.CoalitionGame(lambda S: 1 / 0, 5, cache_path=path, fingerprint="glove-v1")
    assert shapley.exact(never).n_evaluations == 0
    np.testing.assert_array_equal(never.utilities(), GLOVE.utilities())  # floats round-trip
    never.close()


def test_disk_cache_refuses_other_games(tmp_path):
    path = tmp_path / "c.jsonl"
    with shapley.CoalitionGame(GLOVE, 5, cache_path=path, fingerprint="a") as g:
        g({0, 1})
    with pytest.raises(shapley.CacheMismatchError, match="fingerprint"):
        shapley.CoalitionGame(GLOVE, 5, cache_path=path, fingerprint="b")
    with pytest.raises(shapley.CacheMismatchError, match="n=5"):
        shapley.CoalitionGame(GLOVE, 6, cache_path=path, fingerprint="a")
    other = tmp_path / "not-a-cache.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(shapley.CacheMismatchError, match="not a datavalue utility cache"):
        shapley.CoalitionGame(GLOVE, 5, cache_path=other)


def test_disk_cache_drops_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    with shapley.CoalitionGame(GLOVE, 5, cache_path=path) as g:
        g({0, 2}), g({1, 3})
    with open(path, "a") as f:
        f.write('{"mask": 7, "val')  # the process died mid-write
    with shapley.CoalitionGame(GLOVE, 5, cache_path=path) as g:
        assert len(g.utility) == 2
        g({0, 1, 2})
    assert "partial line" in caplog.text
    with shapley.CoalitionGame(GLOVE, 5, cache_path=path) as g:
        assert len(g.utility) == 3


def test_no_pickle_in_the_package():
    import pathlib

    import datavalue.shapley as pkg

    for src in pathlib.Path(pkg.__file__).parent.rglob("*.py"):
        text = src.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, src


def slow_glove(S):
    time.sleep(0.001)
    return GLOVE(S)


def test_thread_pool_matches_serial(counter):
    c = counter(slow_glove)
    threads = set()

    def tracked(S):
        threads.add(threading.get_ident())
        return c(S)

    serial_exact = shapley.exact(GLOVE)
    serial_perm = shapley.permutation(GLOVE, n_samples=300, seed=3)
    par_exact = shapley.exact(tracked, 5, n_jobs=4)
    par_perm = shapley.permutation(slow_glove, 5, n_samples=300, seed=3, n_jobs=4)
    np.testing.assert_array_equal(par_exact.values, serial_exact.values)
    np.testing.assert_array_equal(par_perm.values, serial_perm.values)
    np.testing.assert_array_equal(par_perm.stderr, serial_perm.stderr)
    assert par_exact.n_evaluations == 32 and c.total == 32
    assert len(threads) > 1


def test_thread_pool_keeps_finished_results_when_one_fails(tmp_path, counter):
    c = counter(slow_glove)

    def sometimes(S):
        if S == frozenset({0, 1, 2}):
            raise RuntimeError("out of memory")
        return c(S)

    path = tmp_path / "c.jsonl"
    with shapley.CoalitionGame(sometimes, 5, cache_path=path, n_jobs=4) as g:
        with pytest.raises(RuntimeError, match="out of memory"):
            shapley.exact(g)
        assert len(g.utility) == 31 == c.total  # every other coalition was kept
    with shapley.CoalitionGame(c, 5, cache_path=path) as g:
        shapley.exact(g)
    assert c.total == 32 and g.utility.cache[frozenset({0, 2})] == 1.0


def test_thread_pool_with_disk_cache(tmp_path):
    path = tmp_path / "c.jsonl"
    with shapley.CoalitionGame(slow_glove, 5, cache_path=path, n_jobs=3) as g:
        res = shapley.kernel_shap(g, n_samples=200, seed=0)
    with shapley.CoalitionGame(lambda S: 1 / 0, 5, cache_path=path) as g:
        again = shapley.kernel_shap(g, n_samples=200, seed=0)
    np.testing.assert_array_equal(res.values, again.values)
    assert again.n_evaluations == 0


def test_dask_client_matches_serial():
    distributed = pytest.importorskip("distributed")
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"
    ) as client:
        par_exact = shapley.exact(GLOVE, client=client)
        par_perm = shapley.permutation(GLOVE, n_samples=300, seed=3, client=client)
        # A different utility of the same shape must not hit dask's result cache.
        other = shapley.exact(lambda S: 2.0 * GLOVE(S), 5, client=client)
    np.testing.assert_array_equal(par_exact.values, shapley.exact(GLOVE).values)
    np.testing.assert_array_equal(
        par_perm.values, shapley.permutation(GLOVE, n_samples=300, seed=3).values
    )
    np.testing.assert_allclose(other.values, 2 * par_exact.values)
    assert par_exact.n_evaluations == 32


def test_duck_typed_client(counter):
    class FakeClient:  # anything with map/gather works; dask is never imported by the package
        def __init__(self):
            self.mapped = 0

        def map(self, fn, items):
            self.mapped += len(items)
            return [fn(x) for x in items]

        def gather(self, futures):
            return list(futures)

    fake = FakeClient()
    res = shapley.exact(GLOVE, client=fake)
    assert fake.mapped == 32
    np.testing.assert_allclose(res.values, GLOVE.shapley_values(), atol=1e-12)
    with pytest.raises(shapley.InvalidGameError, match="map"):
        shapley.exact(GLOVE, client=object())


def test_parallel_settings_are_validated():
    with pytest.raises(shapley.InvalidGameError):
        shapley.exact(GLOVE, n_jobs=0)
    util = shapley.Utility(GLOVE, 5, n_jobs=2)
    with pytest.raises(shapley.InvalidGameError, match="constructing"):
        shapley.exact(util, n_jobs=3)
