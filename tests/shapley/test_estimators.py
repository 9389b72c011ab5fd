"""Monte Carlo estimators against the exact oracle, within their own stated error.

Stated criterion: at seed 0 (and 1, 2), ``|estimate - exact| <= 4 * stderr + 1e-9`` for every
player of every test game (Banzhaf MSR against exact Banzhaf).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from datavalue import shapley
from datavalue.shapley import games

from ._helpers import ABS_TOL, Z

GAMES = {
    "glove": games.GloveGame(n=5, left={0, 1}, right={2, 3}),
    "unanimity": games.UnanimityGame(n=6, carrier={1, 3, 4}),
    "airport": games.AirportGame(costs=(3.0, 1.0, 4.0, 1.0, 5.0, 9.0)),
    "voting": games.WeightedVotingGame(quota=6, weights=(4, 3, 2, 1, 1)),
    "symmetric": games.SymmetricGame(n=5, f=lambda k: k**1.5),
    "additive": shapley.AdditiveGame(contributions=[0.5, -1.0, 2.0, 0.0, 0.25]),
    # Larger games, where stratified sampling samples (rather than censuses) most strata.
    "unanimity11": games.UnanimityGame(n=11, carrier={0, 4, 7}),
    "airport10": games.AirportGame(costs=(3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0)),
    "voting10": games.WeightedVotingGame(quota=9, weights=(5, 4, 3, 2, 1, 1, 1, 1, 1, 1)),
}
ESTIMATORS = {
    "permutation": lambda g, s: shapley.permutation(g, n_samples=2000, seed=s),
    "permutation_plain": lambda g, s: shapley.permutation(
        g, n_samples=2000, seed=s, antithetic=False
    ),
    "stratified": lambda g, s: shapley.stratified(g, n_samples=600, seed=s),
    "kernel_regression": lambda g, s: shapley.kernel_shap(g, n_samples=2000, seed=s),
    "kernel_unbiased": lambda g, s: shapley.kernel_shap(
        g, n_samples=4000, seed=s, variant="unbiased"
    ),
    "owen_singletons": lambda g, s: shapley.owen_permutation(
        g, g.n, [[i] for i in range(g.n)], n_samples=2000, seed=s
    ),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
@pytest.mark.parametrize("game", sorted(GAMES))
def test_within_stated_error(game, estimator, seed):
    g = GAMES[game]
    res = ESTIMATORS[estimator](g, seed)
    truth = g.shapley_values()
    assert res.converged
    assert np.all(np.abs(res.values - truth) <= Z * res.stderr + ABS_TOL), (
        res.values,
        truth,
        res.stderr,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("game", sorted(GAMES))
def test_banzhaf_msr_within_stated_error(game, seed):
    g = GAMES[game]
    res = shapley.banzhaf_msr(g, n_samples=3000, seed=seed)
    truth = shapley.exact_banzhaf(g).values
    assert np.all(np.abs(res.values - truth) <= Z * res.stderr + ABS_TOL)
    assert res.n_samples.tolist() == [3000] * g.n


def test_permutation_contract_and_counts():
    g = GAMES["airport"]
    res = shapley.permutation(g, g.n, n_samples=2000, seed=0)
    assert res.values.shape == res.stderr.shape == (6,)
    assert res.n_samples.tolist() == [2000] * 6 and res.converged
    assert 0 < res.n_evaluations <= 64  # cached: at most 2**6 distinct coalitions
    np.testing.assert_allclose(res.values.sum(), g({0, 1, 2, 3, 4, 5}) - g(set()))


def test_same_seed_same_result_other_seed_differs():
    g = GAMES["voting"]
    a = shapley.permutation(g, n_samples=200, seed=7)
    b = shapley.permutation(g, n_samples=200, seed=7)
    c = shapley.permutation(g, n_samples=200, seed=8)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)


def test_antithetic_pairs_cancel_glove_variance():
    # For the glove game c_i(pi) + c_i(reverse pi) is constant, so antithetic sampling is exact.
    g = GAMES["glove"]
    anti = shapley.permutation(g, n_samples=200, seed=0)
    plain = shapley.permutation(g, n_samples=200, seed=0, antithetic=False)
    assert anti.stderr.max() < 1e-12 < plain.stderr[:4].min()  # player 4 is null
    np.testing.assert_allclose(anti.values, g.shapley_values(), atol=1e-12)


def test_stratified_neyman_beats_uniform_on_skewed_strata():
    # Unanimity on 3 of 8 players: marginal contributions vary only in the large strata.
    g = games.UnanimityGame(n=8, carrier={0, 1, 2})
    ney = shapley.stratified(g, n_samples=400, seed=0, census_max=4)
    uni = shapley.stratified(g, n_samples=400, seed=0, census_max=4, allocation="uniform")
    assert ney.stderr[:3].mean() < uni.stderr[:3].mean()


def test_small_strata_are_censused_exactly():
    g = GAMES["airport"]  # n = 6: every stratum has at most 10 coalitions
    res = shapley.stratified(g, n_samples=600, seed=0)
    np.testing.assert_allclose(res.values, g.shapley_values(), atol=1e-12)
    assert np.all(res.stderr == 0)


def test_single_player_games():
    g = shapley.AdditiveGame(contributions=[2.5], base=1.0)
    for fn in (shapley.permutation, shapley.stratified, shapley.kernel_shap, shapley.banzhaf_msr):
        res = fn(g, n_samples=4, seed=0)
        np.testing.assert_allclose(res.values, [2.5])


def test_more_than_62_players_use_python_int_masks():
    a = np.linspace(-1, 1, 70)
    res = shapley.permutation(shapley.AdditiveGame(contributions=a), n_samples=4, seed=0)
    np.testing.assert_allclose(res.values, a, atol=1e-12)
    msr = shapley.banzhaf_msr(shapley.AdditiveGame(contributions=a), n_samples=64, seed=0)
    assert msr.values.shape == (70,) and np.all(np.isfinite(msr.values))


# ------------------------------------------------------------------- stopping rules
def test_stderr_rule_stops_early_and_reports_convergence():
    g = GAMES["airport"]
    stop = shapley.StderrBelow(0.05) | shapley.MaxTime(30)
    res = shapley.permutation(g, stop=stop, n_samples=100_000, seed=0, batch_size=32)
    assert res.converged and res.stderr.max() <= 0.05
    assert res.n_samples.min() < 100_000


def test_budget_reached_before_goal_is_not_converged():
    g = GAMES["airport"]
    res = shapley.permutation(g, stop=shapley.StderrBelow(1e-6), n_samples=64, seed=0)
    assert not res.converged and res.n_samples.min() == 64


def test_and_needs_both_rules():
    g = GAMES["voting"]
    rule = shapley.MaxSamples(100) & shapley.MaxSamples(300)
    res = shapley.permutation(g, stop=rule, seed=0, batch_size=16)
    assert res.n_samples.min() == 300 and res.converged
    assert rule.max_samples_hint() == 300
    assert (shapley.MaxSamples(100) | shapley.MaxSamples(300)).max_samples_hint() == 100
    assert (shapley.MaxSamples(10) & shapley.MaxTime(1)).max_samples_hint() is None


def test_max_time_stops_a_slow_utility():
    def slow(S):
        time.sleep(0.002)
        return float(len(S) ** 2)

    t0 = time.monotonic()
    res = shapley.permutation(slow, 30, stop=shapley.MaxTime(0.2), seed=0, batch_size=2)
    assert res.converged and time.monotonic() - t0 < 5.0


def test_max_evaluations_rule():
    g = GAMES["airport"]
    res = shapley.kernel_shap(g, stop=shapley.MaxEvaluations(20), seed=0, batch_size=4)
    assert res.converged and 20 <= res.n_evaluations <= 64


def test_every_estimator_accepts_stop_rules():
    g = GAMES["unanimity"]
    rule = shapley.MaxSamples(200) | shapley.MaxTime(20)
    for fn in (shapley.permutation, shapley.stratified, shapley.kernel_shap, shapley.banzhaf_msr):
        assert fn(g, stop=rule, seed=0).converged
    assert shapley.owen_permutation(g, 6, [[0, 1, 2], [3, 4, 5]], stop=rule, seed=0).converged


@pytest.mark.parametrize(
    "make",
    [
        lambda: shapley.MaxSamples(0),
        lambda: shapley.MaxSamples(2.5),
        lambda: shapley.MaxTime(-1),
        lambda: shapley.StderrBelow(0.0),
        lambda: shapley.StderrBelow(-0.1),
        lambda: shapley.MaxSamples(3) | 5,
        lambda: shapley.permutation(lambda S: 0.0, 3),  # no budget at all
        lambda: shapley.permutation(lambda S: 0.0, 3, n_samples=10, batch_size=0),
        lambda: shapley.permutation(lambda S: 0.0, 3, n_samples=10, seed=-1),
        lambda: shapley.stratified(lambda S: 0.0, 6, n_samples=3),  # below the pilot
        lambda: shapley.stratified(lambda S: 0.0, 6, n_samples=100, allocation="magic"),
        lambda: shapley.kernel_shap(lambda S: 0.0, 3, n_samples=10, variant="magic"),
    ],
)
def test_bad_estimator_settings_raise(make):
    with pytest.raises(shapley.InvalidGameError):
        make()


def test_result_helpers():
    res = shapley.permutation(GAMES["airport"], n_samples=200, seed=0)
    lo, hi = res.confidence_interval(0.95)
    assert np.all(lo <= res.values) and np.all(res.values <= hi)
    back = shapley.ShapleyResult.from_dict(res.to_dict())
    np.testing.assert_array_equal(back.values, res.values)
    agg = res.aggregate([[0, 1], [2, 3, 4, 5]])
    np.testing.assert_allclose(agg.values.sum(), res.values.sum())
    assert "permutation" in repr(res)
    with pytest.raises(shapley.InvalidValuesError):
        shapley.ShapleyResult(
            values=[1.0],
            stderr=[0.0, 1.0],
            n_evaluations=0,
            n_samples=[1],
            converged=True,
            method="x",
        )
