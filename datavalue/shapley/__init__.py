"""Cooperative games, Shapley estimators and exact-cent royalty reports.

Players are copyright owners (or their works); a utility ``v(frozenset) -> float`` says how good
a coalition's model is, e.g. the log-likelihood of a generated output under the model trained
on that coalition's data. This package estimates each player's Shapley value (and Owen, group
Shapley and Banzhaf values), splits a royalty pool in exact cents, and keeps an auditable
ledger with period statements and reports.

Example:
    >>> from decimal import Decimal
    >>> from datavalue import shapley
    >>> v = lambda S: float(min(len(S & {0}), len(S & {1, 2})))      # a glove game
    >>> res = shapley.exact(v, 3)
    >>> res.values.round(4).tolist()
    [0.6667, 0.1667, 0.1667]
    >>> [str(a) for a in shapley.split_royalties(res.values, pool=Decimal("1234.56"))]
    ['823.04', '205.76', '205.76']

Imports numpy, scipy and the standard library only (no torch, pandas, matplotlib or dask).

Layout (every public name is re-exported here; the subpackages are for reading the code):

* ``games/``: closed-form games, the cached :class:`Utility`, :class:`CoalitionGame`.
* ``estimators/``: exact enumeration, the Monte Carlo estimators (one shared batch loop),
  Owen, group and faithful group (FGSV) values, stopping rules, :class:`ShapleyResult`.
* ``royalties/``: policies and the exact-cent split, the ledger, statements, owners, reports.
* ``_errors`` (one exception tree) and ``_validation`` (the ``parse_*`` boundary checks) serve all
  three. Dependencies point one way: games <- estimators <- royalties.
"""

# games/: what a coalition is worth (closed-form games, the cached Utility, CoalitionGame).
from datavalue.shapley import games as games
from datavalue.shapley._errors import CacheMismatchError as CacheMismatchError
from datavalue.shapley._errors import InvalidGameError as InvalidGameError
from datavalue.shapley._errors import InvalidPoolError as InvalidPoolError
from datavalue.shapley._errors import InvalidValuesError as InvalidValuesError
from datavalue.shapley._errors import LedgerError as LedgerError
from datavalue.shapley._errors import LedgerNotFoundError as LedgerNotFoundError
from datavalue.shapley._errors import NoPositiveContributionError as NoPositiveContributionError
from datavalue.shapley._errors import OutputExistsError as OutputExistsError
from datavalue.shapley._errors import OutputPathError as OutputPathError
from datavalue.shapley._errors import PolicyError as PolicyError
from datavalue.shapley._errors import ReplayMismatchError as ReplayMismatchError
from datavalue.shapley._errors import ShapleyError as ShapleyError
from datavalue.shapley._errors import TooManyPlayersError as TooManyPlayersError
from datavalue.shapley._errors import UnknownOwnerError as UnknownOwnerError
from datavalue.shapley._errors import UtilityError as UtilityError
from datavalue.shapley._validation import MAX_EXACT_PLAYERS as MAX_EXACT_PLAYERS

# estimators/: from a game to values with standard errors.
from datavalue.shapley.estimators import MaxEvaluations as MaxEvaluations
from datavalue.shapley.estimators import MaxSamples as MaxSamples
from datavalue.shapley.estimators import MaxTime as MaxTime
from datavalue.shapley.estimators import Progress as Progress
from datavalue.shapley.estimators import ShapleyResult as ShapleyResult
from datavalue.shapley.estimators import StderrBelow as StderrBelow
from datavalue.shapley.estimators import StoppingRule as StoppingRule
from datavalue.shapley.estimators import banzhaf_msr as banzhaf_msr
from datavalue.shapley.estimators import exact as exact
from datavalue.shapley.estimators import exact_banzhaf as exact_banzhaf
from datavalue.shapley.estimators import exact_from_utilities as exact_from_utilities
from datavalue.shapley.estimators import exact_weights as exact_weights
from datavalue.shapley.estimators import fgsv_exact as fgsv_exact
from datavalue.shapley.estimators import fgsv_from_utilities as fgsv_from_utilities
from datavalue.shapley.estimators import fgsv_weights as fgsv_weights
from datavalue.shapley.estimators import group_shapley as group_shapley
from datavalue.shapley.estimators import kernel_shap as kernel_shap
from datavalue.shapley.estimators import owen_exact as owen_exact
from datavalue.shapley.estimators import owen_from_utilities as owen_from_utilities
from datavalue.shapley.estimators import owen_permutation as owen_permutation
from datavalue.shapley.estimators import permutation as permutation
from datavalue.shapley.estimators import stratified as stratified
from datavalue.shapley.games import AdditiveGame as AdditiveGame
from datavalue.shapley.games import CoalitionGame as CoalitionGame
from datavalue.shapley.games import DiskCache as DiskCache
from datavalue.shapley.games import Utility as Utility

# royalties/: from values to exact-cent payments, the ledger, statements and reports.
from datavalue.shapley.royalties import GenerationLine as GenerationLine
from datavalue.shapley.royalties import GenerationRecord as GenerationRecord
from datavalue.shapley.royalties import OwnerLine as OwnerLine
from datavalue.shapley.royalties import OwnerRegistry as OwnerRegistry
from datavalue.shapley.royalties import Period as Period
from datavalue.shapley.royalties import PeriodStatement as PeriodStatement
from datavalue.shapley.royalties import RoyaltyLedger as RoyaltyLedger
from datavalue.shapley.royalties import RoyaltyPolicy as RoyaltyPolicy
from datavalue.shapley.royalties import RoyaltySplit as RoyaltySplit
from datavalue.shapley.royalties import available_policies as available_policies
from datavalue.shapley.royalties import exact_sum as exact_sum
from datavalue.shapley.royalties import get_policy as get_policy
from datavalue.shapley.royalties import infer_format as infer_format
from datavalue.shapley.royalties import register_policy as register_policy
from datavalue.shapley.royalties import render_report as render_report
from datavalue.shapley.royalties import split_royalties as split_royalties
from datavalue.shapley.royalties import write_report as write_report

__all__ = [
    "MAX_EXACT_PLAYERS",
    "AdditiveGame",
    "CacheMismatchError",
    "CoalitionGame",
    "DiskCache",
    "GenerationLine",
    "GenerationRecord",
    "InvalidGameError",
    "InvalidPoolError",
    "InvalidValuesError",
    "LedgerError",
    "LedgerNotFoundError",
    "MaxEvaluations",
    "MaxSamples",
    "MaxTime",
    "NoPositiveContributionError",
    "OutputExistsError",
    "OutputPathError",
    "OwnerLine",
    "OwnerRegistry",
    "Period",
    "PeriodStatement",
    "PolicyError",
    "Progress",
    "ReplayMismatchError",
    "RoyaltyLedger",
    "RoyaltyPolicy",
    "RoyaltySplit",
    "ShapleyError",
    "ShapleyResult",
    "StderrBelow",
    "StoppingRule",
    "TooManyPlayersError",
    "UnknownOwnerError",
    "Utility",
    "UtilityError",
    "available_policies",
    "banzhaf_msr",
    "exact",
    "exact_banzhaf",
    "exact_from_utilities",
    "exact_sum",
    "exact_weights",
    "fgsv_exact",
    "fgsv_from_utilities",
    "fgsv_weights",
    "games",
    "get_policy",
    "group_shapley",
    "infer_format",
    "kernel_shap",
    "owen_exact",
    "owen_from_utilities",
    "owen_permutation",
    "permutation",
    "register_policy",
    "render_report",
    "split_royalties",
    "stratified",
    "write_report",
]
