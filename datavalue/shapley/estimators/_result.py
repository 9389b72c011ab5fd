"""The result every estimator returns: values with their uncertainty and cost.

``ShapleyResult`` is frozen; its arrays are read-only copies. It round-trips through plain JSON
(``to_dict`` / ``from_dict``) so ledgers and caches never need pickle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from datavalue.shapley._errors import InvalidValuesError
from datavalue.shapley._validation import parse_partition

__all__ = ["ShapleyResult"]


def _frozen_array(x: object, *, dtype: type, name: str, n: int | None) -> np.ndarray:
    arr = np.array(x, dtype=dtype, copy=True).reshape(-1)
    if n is not None and arr.shape != (n,):
        raise InvalidValuesError(
            f"ShapleyResult.{name} must have shape ({n},) like values; got {arr.shape}."
        )
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class ShapleyResult:
    """Values of a cooperative game, one per player, with standard errors and costs.

    Attributes:
        values: ``(n,)`` estimated values (Shapley, Owen, Banzhaf... see ``method``).
        stderr: ``(n,)`` standard error of each value (zeros for exact methods; ``inf`` when
            too few samples were drawn to estimate it).
        n_evaluations: calls made to the user's utility during this run (cache hits excluded).
        n_samples: ``(n,)`` samples (marginal contributions or coalitions) used per player.
        converged: whether the stopping rule was met (always ``True`` for exact methods).
        method: estimator name, e.g. ``"exact"``, ``"permutation"``, ``"kernelshap"``.
        elapsed_s: wall-clock seconds spent.

    Example:
        >>> import numpy as np
        >>> r = ShapleyResult(values=[0.5, 0.5], stderr=[0, 0], n_evaluations=4,
        ...                   n_samples=[2, 2], converged=True, method="exact")
        >>> float(r.values.sum())
        1.0
    """

    values: np.ndarray
    stderr: np.ndarray
    n_evaluations: int
    n_samples: np.ndarray
    converged: bool
    method: str
    elapsed_s: float = 0.0

    def __post_init__(self) -> None:
        values = _frozen_array(self.values, dtype=np.float64, name="values", n=None)
        if values.size == 0:
            raise InvalidValuesError("ShapleyResult.values must hold at least one player.")
        n = values.size
        stderr = _frozen_array(self.stderr, dtype=np.float64, name="stderr", n=n)
        samples = _frozen_array(self.n_samples, dtype=np.int64, name="n_samples", n=n)
        if np.any(np.isnan(values)) or np.any(np.isnan(stderr)) or np.any(stderr < 0):
            raise InvalidValuesError(
                "ShapleyResult needs non-NaN values and non-negative stderr; got "
                f"values={values.tolist()}, stderr={stderr.tolist()}."
            )
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "stderr", stderr)
        object.__setattr__(self, "n_samples", samples)
        object.__setattr__(self, "n_evaluations", int(self.n_evaluations))
        object.__setattr__(self, "converged", bool(self.converged))
        object.__setattr__(self, "method", str(self.method))
        object.__setattr__(self, "elapsed_s", float(self.elapsed_s))

    @property
    def n(self) -> int:
        """Number of players."""
        return int(self.values.size)

    @property
    def total(self) -> float:
        """Sum of the values (``v(N) - v(empty)`` for efficient methods)."""
        return float(self.values.sum())

    def confidence_interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Normal-approximation interval ``values -/+ z * stderr`` at ``level``.

        Example:
            >>> r = ShapleyResult(values=[1.0], stderr=[0.1], n_evaluations=0, n_samples=[100],
            ...                   converged=True, method="permutation")
            >>> lo, hi = r.confidence_interval(0.95)
            >>> round(float(hi[0] - lo[0]), 3)
            0.392
        """
        if not 0.0 < level < 1.0:
            raise InvalidValuesError(f"level must be in (0, 1); got {level}.")
        z = float(stats.norm.ppf(0.5 + level / 2.0))
        return self.values - z * self.stderr, self.values + z * self.stderr

    def aggregate(self, groups: Sequence[Sequence[int]]) -> ShapleyResult:
        """Sum values over disjoint groups of players (e.g. works -> owners).

        The summed ``stderr`` is the conservative bound ``sum_i stderr_i`` (valid whatever the
        correlation between players' estimates); exact methods keep zero.

        Example:
            >>> r = ShapleyResult(values=[1.0, 2.0, 3.0], stderr=[0, 0, 0], n_evaluations=8,
            ...                   n_samples=[4, 4, 4], converged=True, method="exact")
            >>> r.aggregate([[0, 2], [1]]).values.tolist()
            [4.0, 2.0]
        """
        parsed = parse_partition(groups, self.n, name="groups", cover=False)
        return dataclasses.replace(
            self,
            values=[float(self.values[list(g)].sum()) for g in parsed],
            stderr=[float(self.stderr[list(g)].sum()) for g in parsed],
            n_samples=[int(self.n_samples[list(g)].min()) for g in parsed],
            method=f"{self.method}+aggregate",
        )

    def rescaled(self, total: float) -> ShapleyResult:
        """Scale values (and stderr) so they sum to ``total``.

        Semivalues such as Banzhaf are not efficient; rescale them to ``v(N) - v(empty)`` before
        they can pay anyone. Raises if the current sum is zero.

        Example:
            >>> r = ShapleyResult(values=[1.0, 3.0], stderr=[0, 0], n_evaluations=4,
            ...                   n_samples=[2, 2], converged=True, method="banzhaf")
            >>> r.rescaled(2.0).values.tolist()
            [0.5, 1.5]
        """
        s = float(self.values.sum())
        if s == 0.0 or not math.isfinite(float(total)):
            raise InvalidValuesError(
                f"cannot rescale values summing to {s} to total {total}; expected a non-zero "
                "sum and a finite total. Use an efficient estimator (Shapley) instead."
            )
        k = float(total) / s
        return dataclasses.replace(
            self,
            values=self.values * k,
            stderr=self.stderr * abs(k),
            method=f"{self.method}+rescaled",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``inf`` stderr is written as ``None``)."""
        return {
            "values": self.values.tolist(),
            "stderr": [None if not math.isfinite(s) else s for s in self.stderr.tolist()],
            "n_evaluations": self.n_evaluations,
            "n_samples": self.n_samples.tolist(),
            "converged": self.converged,
            "method": self.method,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapleyResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            values=d["values"],
            stderr=[math.inf if s is None else s for s in d["stderr"]],
            n_evaluations=d["n_evaluations"],
            n_samples=d["n_samples"],
            converged=d["converged"],
            method=d["method"],
            elapsed_s=d.get("elapsed_s", 0.0),
        )

    def __repr__(self) -> str:
        vals = np.array2string(self.values, precision=4, threshold=8)
        errs = np.array2string(self.stderr, precision=2, threshold=8)
        return (
            f"ShapleyResult(method={self.method!r}, n={self.n}, values={vals}, stderr={errs}, "
            f"n_evaluations={self.n_evaluations}, converged={self.converged})"
        )
