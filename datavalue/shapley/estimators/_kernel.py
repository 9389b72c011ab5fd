"""KernelSHAP: Shapley values as a constrained least-squares fit, with paired sampling.

The Shapley value solves (Charnes et al. 1988; Lundberg & Lee 2017)::

    min_phi  E_{S ~ p} [ (v(S) - v(empty) - z_S . phi)**2 ]   s.t.  sum_i phi_i = v(N) - v(empty)

where ``z_S`` is the membership vector and coalitions ``0 < |S| < n`` are drawn from the Shapley
kernel ``p(S) proportional to (n - 1) / (C(n, |S|) |S| (n - |S|))``. With ``A = E[z z^T]`` and
``b = E[z (v(S) - v(empty))]`` the solution is ``phi = C b + d`` with
``C = A^-1 - A^-1 1 1^T A^-1 / (1^T A^-1 1)`` and ``d = A^-1 1 (v(N) - v(empty)) / (1^T A^-1 1)``;
``1^T C = 0`` makes every estimate efficient.

Two variants (Covert & Lee 2021, "Improving KernelSHAP"):

``variant="regression"`` (default, the classic estimator)
    estimate both ``A`` and ``b`` from the samples. Consistent and nearly unbiased; exact on
    additive games (the linear model fits perfectly); standard errors by the delta method, whose
    per-unit influence is ``C r_u`` with ``r_u = z_u (y_u - z_u . phi)``.
``variant="unbiased"``
    use the exact ``A`` (``A_ii = 1/2``, ``A_ij = c``) so ``phi = (b - mean(b)) / (1/2 - c) +
    (v(N) - v(empty)) / n`` is affine in the sample mean of ``b``: exactly unbiased, but often
    noisier.

Paired sampling draws ``S`` together with its complement (the pair is the i.i.d. unit), which
cancels much of the variance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError
from datavalue.shapley._validation import masks_from_bits
from datavalue.shapley.estimators._base import Moments, MonteCarloEstimator
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.estimators._stopping import StoppingRule

__all__ = ["kernel_shap", "shapley_kernel_constants"]

_VARIANTS = ("regression", "unbiased")


def shapley_kernel_constants(n: int) -> tuple[np.ndarray, float]:
    """Size distribution ``q(k)``, ``k = 1..n-1``, and the off-diagonal ``c = E[z_i z_j]``.

    Example:
        >>> q, c = shapley_kernel_constants(3)
        >>> q.tolist(), round(c, 6)
        ([0.5, 0.5], 0.166667)
    """
    ks = np.arange(1, n, dtype=np.float64)
    kernel = 1.0 / (ks * (n - ks))
    q = kernel / kernel.sum()
    if n < 3:
        return q, 0.0
    c = float(np.sum(q * ks * (ks - 1)) / (n * (n - 1)))
    return q, c


def kernel_shap(
    v: Any,
    n: int | None = None,
    *,
    n_samples: int | None = None,
    stop: StoppingRule | None = None,
    seed: Any = None,
    paired: bool = True,
    variant: str = "regression",
    batch_size: int = 128,
    n_jobs: int | None = None,
    client: Any = None,
) -> ShapleyResult:
    """Shapley values by KernelSHAP (constrained least squares), paired by default.

    Args:
        v: utility ``v(frozenset) -> float``, a game, a :class:`Utility` or ``CoalitionGame``.
        n: number of players (optional when ``v`` has ``.n``).
        n_samples: coalitions to draw (rounded up to even when paired).
        stop: a :class:`StoppingRule`.
        seed: root seed for reproducible sampling.
        paired: draw each coalition together with its complement.
        variant: ``"regression"`` (estimated ``A``) or ``"unbiased"`` (exact ``A``).
        batch_size: coalitions per batch.
        n_jobs: thread-pool size for utility evaluation.
        client: dask ``distributed.Client`` for utility evaluation.

    Returns:
        :class:`ShapleyResult` whose values sum to ``v(N) - v(empty)`` (up to rounding).

    Example:
        >>> res = kernel_shap(lambda S: 2.0 * (0 in S) + 1.0 * (1 in S), 3, n_samples=64, seed=0)
        >>> (res.values.round(6) + 0.0).tolist()      # additive game: the regression is exact
        [2.0, 1.0, 0.0]
    """
    return _KernelSHAP(
        v,
        n,
        n_samples=n_samples,
        stop=stop,
        seed=seed,
        paired=paired,
        variant=variant,
        batch_size=batch_size,
        n_jobs=n_jobs,
        client=client,
    ).run()


class _KernelSHAP(MonteCarloEstimator):
    """A unit is a coalition drawn from the Shapley kernel (with its complement when paired)."""

    def __init__(self, v: Any, n: int | None, *, paired: bool, variant: str, **kwargs: Any) -> None:
        super().__init__(v, n, **kwargs)
        if variant not in _VARIANTS:
            raise InvalidGameError(f"variant must be one of {_VARIANTS}; got {variant!r}.")
        self.paired, self.variant = paired, variant
        self.method = f"kernelshap-{variant}" + ("-paired" if paired else "")
        self.per_unit = 2 if paired else 1
        self.growth = 0.25 if variant == "regression" else 0.0  # its state() revisits every unit
        self.full = (1 << self.n) - 1
        self.v0, self.v_full = self.util.evaluate_masks([0, self.full])
        self.total = self.v_full - self.v0
        q, c = shapley_kernel_constants(self.n) if self.n > 1 else (np.ones(0), 0.0)
        self.q: np.ndarray = q
        self.a = 0.5 - c
        self.moments = Moments(self.n)  # unbiased variant: running mean of the centred b-samples
        self.units_z: list[np.ndarray] = []  # regression: every unit's memberships and utilities
        self.units_y: list[np.ndarray] = []

    def settled(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self.n == 1:  # one player gets everything
            self.method = "kernelshap"
            return np.array([self.v_full - self.v0]), np.array([1])
        return None

    def step(self, k: int) -> None:
        n, rng, per_unit = self.n, self.rng, self.per_unit
        sizes = rng.choice(np.arange(1, n), size=k, p=self.q)
        keys = rng.random((k, n))
        ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
        z = ranks < sizes[:, None]  # a uniform subset of each drawn size
        if self.paired:
            z = np.concatenate([z, ~z])
        y = self.util.evaluate_masks(masks_from_bits(z)) - self.v0
        if self.variant == "regression":
            self.units_z.append(z.reshape(per_unit, k, n).transpose(1, 0, 2))
            self.units_y.append(y.reshape(per_unit, k).T)
            return
        g = z * y[:, None]
        if self.paired:
            g = 0.5 * (g[:k] + g[k:])
        self.moments.add((g - g.mean(axis=1, keepdims=True)) / self.a)

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.variant == "regression":
            return self._state_regression()
        m = self.moments
        return m.mean + self.total / self.n, m.stderr(), m.count * self.per_unit

    def _state_regression(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, per_unit, total = self.n, self.per_unit, self.total
        if not self.units_z:
            return np.full(n, total / n), np.full(n, np.inf), np.zeros(n, dtype=np.int64)
        z = np.concatenate(self.units_z).astype(np.float64)  # (m, per_unit, n)
        y = np.concatenate(self.units_y)  # (m, per_unit)
        m = z.shape[0]
        a_hat = np.einsum("upi,upj->ij", z, z) / (m * per_unit)
        b_hat = np.einsum("upi,up->i", z, y) / (m * per_unit)
        try:
            ainv = np.linalg.inv(a_hat)
        except np.linalg.LinAlgError:
            ainv = None
        if ainv is None or not np.all(np.isfinite(ainv)) or np.linalg.cond(a_hat) > 1e12:
            # Too few units for an invertible A_hat yet: the exact-A estimate, stderr unknown.
            values = (b_hat - b_hat.mean()) / self.a + total / n
            return values, np.full(n, np.inf), np.full(n, m * per_unit)
        ainv_1 = ainv.sum(axis=1)
        cmat = ainv - np.outer(ainv_1, ainv_1) / ainv_1.sum()
        phi = cmat @ b_hat + ainv_1 * total / ainv_1.sum()
        resid = (z * (y - z @ phi)[..., None]).mean(axis=1)  # (m, n), pair-averaged residuals
        infl = resid @ cmat.T
        se = infl.std(axis=0, ddof=1) / np.sqrt(m) if m > 1 else np.full(n, np.inf)
        return phi, se, np.full(n, m * per_unit)
