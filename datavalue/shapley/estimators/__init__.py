"""Estimators: from a game to values with standard errors.

Every estimator takes a utility (``v(frozenset) -> float``, a game, a :class:`Utility` or a
``CoalitionGame``), evaluates it through the coalition cache, and returns a frozen
:class:`ShapleyResult` (values, stderr, sample counts, cost).

* ``_exact``: enumeration of all ``2**n`` coalitions (the oracle): ``exact``, ``exact_banzhaf``,
  and the weight-matrix form ``exact_from_utilities`` / ``exact_weights``.
* ``_base``: ``MonteCarloEstimator``, the one batch loop every sampling estimator runs
  (budget and stopping, batch sizing, root seed, cost accounting, the result), and ``Moments``,
  the streaming mean and variance behind every standard error (internal: not exported).
* ``_permutation`` (antithetic permutation sampling), ``_stratified`` (size strata, Neyman
  allocation), ``_kernel`` (KernelSHAP, paired), ``_banzhaf`` (maximum sample reuse),
  ``_owen`` (Owen values, exact and sampled, and group Shapley values), ``_fgsv`` (the faithful
  group Shapley value: a group's summed work-level Shapley values, split-proof without a registry).
* ``_stopping``: composable stopping rules (``StderrBelow(1e-3) | MaxTime(60)``);
  ``_result``: :class:`ShapleyResult`.

To add a sampling estimator: subclass ``_base.MonteCarloEstimator``, implement ``step(k)`` (draw
and process ``k`` i.i.d. units) and ``state()`` (values, stderr, samples per player so far),
wrap it in a function with the usual signature, and add it to ``tests/shapley/test_calibration.py``.
"""

from datavalue.shapley.estimators._banzhaf import banzhaf_msr as banzhaf_msr
from datavalue.shapley.estimators._exact import exact as exact
from datavalue.shapley.estimators._exact import exact_banzhaf as exact_banzhaf
from datavalue.shapley.estimators._exact import exact_from_utilities as exact_from_utilities
from datavalue.shapley.estimators._exact import exact_weights as exact_weights
from datavalue.shapley.estimators._fgsv import fgsv_exact as fgsv_exact
from datavalue.shapley.estimators._fgsv import fgsv_from_utilities as fgsv_from_utilities
from datavalue.shapley.estimators._fgsv import fgsv_weights as fgsv_weights
from datavalue.shapley.estimators._kernel import kernel_shap as kernel_shap
from datavalue.shapley.estimators._owen import group_shapley as group_shapley
from datavalue.shapley.estimators._owen import owen_exact as owen_exact
from datavalue.shapley.estimators._owen import owen_from_utilities as owen_from_utilities
from datavalue.shapley.estimators._owen import owen_permutation as owen_permutation
from datavalue.shapley.estimators._permutation import permutation as permutation
from datavalue.shapley.estimators._result import ShapleyResult as ShapleyResult
from datavalue.shapley.estimators._stopping import MaxEvaluations as MaxEvaluations
from datavalue.shapley.estimators._stopping import MaxSamples as MaxSamples
from datavalue.shapley.estimators._stopping import MaxTime as MaxTime
from datavalue.shapley.estimators._stopping import Progress as Progress
from datavalue.shapley.estimators._stopping import StderrBelow as StderrBelow
from datavalue.shapley.estimators._stopping import StoppingRule as StoppingRule
from datavalue.shapley.estimators._stratified import stratified as stratified

__all__ = [
    "MaxEvaluations",
    "MaxSamples",
    "MaxTime",
    "Progress",
    "ShapleyResult",
    "StderrBelow",
    "StoppingRule",
    "banzhaf_msr",
    "exact",
    "exact_banzhaf",
    "exact_from_utilities",
    "exact_weights",
    "fgsv_exact",
    "fgsv_from_utilities",
    "fgsv_weights",
    "group_shapley",
    "kernel_shap",
    "owen_exact",
    "owen_from_utilities",
    "owen_permutation",
    "permutation",
    "stratified",
]
