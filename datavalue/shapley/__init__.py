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
"""

from datavalue.shapley import games as games
from datavalue.shapley._banzhaf import banzhaf_msr as banzhaf_msr
from datavalue.shapley._cache import DiskCache as DiskCache
from datavalue.shapley._coalition_game import CoalitionGame as CoalitionGame
from datavalue.shapley._errors import CacheMismatchError as CacheMismatchError
from datavalue.shapley._errors import InvalidGameError as InvalidGameError
from datavalue.shapley._errors import InvalidPoolError as InvalidPoolError
from datavalue.shapley._errors import InvalidValuesError as InvalidValuesError
from datavalue.shapley._errors import LedgerError as LedgerError
from datavalue.shapley._errors import LedgerNotFoundError as LedgerNotFoundError
from datavalue.shapley._errors import NoPositiveContributionError as NoPositiveContributionError
from datavalue.shapley._errors import OutputExistsError as OutputExistsError
from datavalue.shapley._errors import PolicyError as PolicyError
from datavalue.shapley._errors import ReplayMismatchError as ReplayMismatchError
from datavalue.shapley._errors import ShapleyError as ShapleyError
from datavalue.shapley._errors import TooManyPlayersError as TooManyPlayersError
from datavalue.shapley._errors import UnknownOwnerError as UnknownOwnerError
from datavalue.shapley._errors import UtilityError as UtilityError
from datavalue.shapley._exact import exact as exact
from datavalue.shapley._exact import exact_banzhaf as exact_banzhaf
from datavalue.shapley._exact import exact_from_utilities as exact_from_utilities
from datavalue.shapley._exact import exact_weights as exact_weights
from datavalue.shapley._kernel import kernel_shap as kernel_shap
from datavalue.shapley._ledger import GenerationRecord as GenerationRecord
from datavalue.shapley._ledger import Period as Period
from datavalue.shapley._ledger import RoyaltyLedger as RoyaltyLedger
from datavalue.shapley._owen import group_shapley as group_shapley
from datavalue.shapley._owen import owen_exact as owen_exact
from datavalue.shapley._owen import owen_from_utilities as owen_from_utilities
from datavalue.shapley._owen import owen_permutation as owen_permutation
from datavalue.shapley._owners import OwnerRegistry as OwnerRegistry
from datavalue.shapley._permutation import permutation as permutation
from datavalue.shapley._report import infer_format as infer_format
from datavalue.shapley._report import render_report as render_report
from datavalue.shapley._report import write_report as write_report
from datavalue.shapley._result import ShapleyResult as ShapleyResult
from datavalue.shapley._royalties import RoyaltyPolicy as RoyaltyPolicy
from datavalue.shapley._royalties import RoyaltySplit as RoyaltySplit
from datavalue.shapley._royalties import available_policies as available_policies
from datavalue.shapley._royalties import exact_sum as exact_sum
from datavalue.shapley._royalties import get_policy as get_policy
from datavalue.shapley._royalties import register_policy as register_policy
from datavalue.shapley._royalties import split_royalties as split_royalties
from datavalue.shapley._statement import GenerationLine as GenerationLine
from datavalue.shapley._statement import OwnerLine as OwnerLine
from datavalue.shapley._statement import PeriodStatement as PeriodStatement
from datavalue.shapley._stopping import MaxEvaluations as MaxEvaluations
from datavalue.shapley._stopping import MaxSamples as MaxSamples
from datavalue.shapley._stopping import MaxTime as MaxTime
from datavalue.shapley._stopping import Progress as Progress
from datavalue.shapley._stopping import StderrBelow as StderrBelow
from datavalue.shapley._stopping import StoppingRule as StoppingRule
from datavalue.shapley._stratified import stratified as stratified
from datavalue.shapley._utility import Utility as Utility
from datavalue.shapley._validation import MAX_EXACT_PLAYERS as MAX_EXACT_PLAYERS
from datavalue.shapley.games import AdditiveGame as AdditiveGame

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
