"""Games: what a coalition is worth.

A utility is anything that maps a coalition (a ``frozenset`` of player indices ``0..n-1``) to a
float. This subpackage holds the ways to state one and to evaluate it efficiently:

* ``_analytic``: closed-form games with known Shapley values (unanimity, glove, airport, weighted
  voting, symmetric, additive), the oracles of the tests and of the docs.
* ``_utility``: :class:`Utility`, the caching, de-duplicating, parallel wrapper that every
  estimator evaluates through (``as_utility`` turns a plain callable or a game into one).
* ``_coalition_game``: :class:`CoalitionGame`, an expensive ``train_and_eval`` with a resumable
  on-disk cache; ``_cache``: that JSON-lines cache (:class:`DiskCache`).

``from datavalue.shapley import games`` then ``games.GloveGame(...)`` is the documented way in;
every name here is also on ``datavalue.shapley`` where it was public before.

To add a closed-form game: subclass :class:`Game` in ``_analytic``, implement ``__call__`` and
``shapley_values`` (without enumerating coalitions), and add a test against ``shapley.exact``.
"""

from datavalue.shapley.games._analytic import AdditiveGame as AdditiveGame
from datavalue.shapley.games._analytic import AirportGame as AirportGame
from datavalue.shapley.games._analytic import Game as Game
from datavalue.shapley.games._analytic import GloveGame as GloveGame
from datavalue.shapley.games._analytic import SymmetricGame as SymmetricGame
from datavalue.shapley.games._analytic import UnanimityGame as UnanimityGame
from datavalue.shapley.games._analytic import WeightedVotingGame as WeightedVotingGame
from datavalue.shapley.games._cache import DiskCache as DiskCache
from datavalue.shapley.games._coalition_game import CoalitionGame as CoalitionGame
from datavalue.shapley.games._utility import Utility as Utility

__all__ = [
    "AdditiveGame",
    "AirportGame",
    "CoalitionGame",
    "DiskCache",
    "Game",
    "GloveGame",
    "SymmetricGame",
    "UnanimityGame",
    "Utility",
    "WeightedVotingGame",
]
