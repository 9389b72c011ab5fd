"""Closed-form games of the brief: their known values against exact enumeration."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from datavalue import shapley
from datavalue.shapley import games

from ._helpers import PROPERTY


def test_glove_game_brief_values():
    # Brief (1-based L={1}, R={2,3}) == 0-based L={0}, R={1,2}: phi = (2/3, 1/6, 1/6).
    g = games.GloveGame(n=3, left={0}, right={1, 2})
    np.testing.assert_allclose(shapley.exact(g).values, [2 / 3, 1 / 6, 1 / 6], atol=1e-12)
    np.testing.assert_allclose(g.shapley_values(), [2 / 3, 1 / 6, 1 / 6], atol=1e-12)


def test_weighted_voting_brief_values():
    g = games.WeightedVotingGame(quota=3, weights=(2, 1, 1))
    np.testing.assert_allclose(shapley.exact(g).values, [2 / 3, 1 / 6, 1 / 6], atol=1e-12)
    np.testing.assert_allclose(g.shapley_values(), [2 / 3, 1 / 6, 1 / 6], atol=1e-12)


@pytest.mark.parametrize(
    "game",
    [
        games.UnanimityGame(n=1, carrier={0}),
        games.UnanimityGame(n=5, carrier={1, 3}),
        games.UnanimityGame(n=6, carrier={0, 2, 4, 5}, scale=-3.5),
        games.GloveGame(n=6, left={0, 1, 2}, right={3, 4}),
        games.GloveGame(n=4, left={0}, right=set()),
        games.AirportGame(costs=(1.0, 2.0, 4.0, 4.0, 7.0)),
        games.AirportGame(costs=(5.0, 0.5, 3.0)),
        games.WeightedVotingGame(quota=51, weights=(50, 30, 20, 1)),
        games.WeightedVotingGame(quota=4, weights=(1, 1, 1, 1, 1)),
        games.SymmetricGame(n=5, f=lambda k: np.sqrt(k) + 2.0),
        games.AdditiveGame(contributions=[1.5, -2.0, 0.0, 3.25], base=-7.0),
    ],
    ids=lambda g: type(g).__name__,
)
def test_closed_form_matches_enumeration(game):
    np.testing.assert_allclose(shapley.exact(game).values, game.shapley_values(), atol=1e-12)


def test_airport_formula_by_hand():
    # c = (1, 3): runway segment 1 shared by both, segment 2 only for player 1.
    np.testing.assert_allclose(games.AirportGame(costs=(1.0, 3.0)).shapley_values(), [-0.5, -2.5])


def test_unanimity_and_symmetric_banzhaf_closed_forms():
    for g in (
        games.UnanimityGame(n=5, carrier={0, 2, 3}),
        games.SymmetricGame(n=4, f=[0, 1, 4, 2, 8]),
    ):
        np.testing.assert_allclose(shapley.exact_banzhaf(g).values, g.banzhaf_values(), atol=1e-12)


@PROPERTY
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=7))
def test_airport_closed_form_property(costs):
    g = games.AirportGame(costs=tuple(costs))
    np.testing.assert_allclose(shapley.exact(g).values, g.shapley_values(), atol=1e-9)


@PROPERTY
@given(st.lists(st.integers(0, 6), min_size=1, max_size=7), st.integers(1, 20))
def test_weighted_voting_dp_property(weights, quota):
    g = games.WeightedVotingGame(quota=quota, weights=tuple(weights))
    np.testing.assert_allclose(shapley.exact(g).values, g.shapley_values(), atol=1e-12)


@PROPERTY
@given(st.lists(st.sampled_from("LRN"), min_size=1, max_size=7))
def test_glove_counting_formula_property(sides):
    left = {i for i, s in enumerate(sides) if s == "L"}
    right = {i for i, s in enumerate(sides) if s == "R"}
    g = games.GloveGame(n=len(sides), left=left, right=right)
    np.testing.assert_allclose(shapley.exact(g).values, g.shapley_values(), atol=1e-12)


def test_additive_game_from_attributions_is_first_order_sum():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=40)
    owners = rng.integers(0, 4, size=40)
    g = shapley.AdditiveGame.from_attributions(scores, owners, n_owners=5, base=-3.0)
    sums = np.array([scores[owners == k].sum() for k in range(5)])
    np.testing.assert_allclose(g.shapley_values(), sums)
    # The docstring's claim: Shapley of the additive game == each owner's sum, checked exactly.
    np.testing.assert_allclose(shapley.exact(g).values, sums, atol=1e-12)
    assert g(frozenset()) == -3.0
    assert g.shapley_values()[4] == 0.0  # an owner without examples


def test_additive_game_with_owner_names():
    g = shapley.AdditiveGame.from_attributions([1.0, 2.0, 4.0], ["bob", "ann", "bob"])
    assert g.names == ("ann", "bob")
    np.testing.assert_allclose(g.shapley_values(), [2.0, 5.0])


def test_game_utilities_are_indexed_by_bitmask():
    g = games.GloveGame(n=3, left={0}, right={1, 2})
    u = g.utilities()
    assert u[0b011] == g({0, 1}) == 1.0 and u[0b110] == g({1, 2}) == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: games.UnanimityGame(n=3, carrier=set()),
        lambda: games.UnanimityGame(n=3, carrier={5}),
        lambda: games.UnanimityGame(n=0, carrier={0}),
        lambda: games.GloveGame(n=3, left={0}, right={0, 1}),
        lambda: games.AirportGame(costs=(-1.0, 2.0)),
        lambda: games.AirportGame(costs=(float("nan"),)),
        lambda: games.WeightedVotingGame(quota=0, weights=(1, 2)),
        lambda: games.WeightedVotingGame(quota=2, weights=(1.5, 2)),
        lambda: games.SymmetricGame(n=3, f=[0, 1]),
        lambda: shapley.AdditiveGame.from_attributions([1.0, 2.0], [0]),
    ],
)
def test_invalid_games_raise_typed_errors(make):
    with pytest.raises(shapley.ShapleyError) as info:
        make()
    assert isinstance(info.value, ValueError)
