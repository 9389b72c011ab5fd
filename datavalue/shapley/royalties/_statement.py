"""Per-owner period statements built from ledger rows.

Clipping negative values and normalising is not linear, so there are two honest ways to pay a
period, and the statement names the one it used:

``share-then-sum`` (default)
    Each output's pool is split when the output is sold (the ledger's amounts); an owner's
    period total is the sum of its per-output amounts. Every payment is traceable to one row.

``average-then-share``
    Each owner's values are averaged over the period's outputs, weighted by each output's pool
    (owners absent from an output count as 0), and the *period* pool is split once with the
    (single) policy of the period's rows. Smoother, but no per-output traceability.

Owner ids are resolved through an optional :class:`OwnerRegistry` so merged shell owners are
reported (and, under ``average-then-share``, valued) together with their real owner.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from datavalue.shapley._errors import InvalidGameError, LedgerError
from datavalue.shapley.royalties._records import GenerationRecord, Period
from datavalue.shapley.royalties._split import exact_sum, split_royalties, unsigned_zero

__all__ = ["AGGREGATIONS", "GenerationLine", "OwnerLine", "PeriodStatement", "build_statement"]

AGGREGATIONS = ("share-then-sum", "average-then-share")


@dataclasses.dataclass(frozen=True)
class OwnerLine:
    """One owner's totals for a period.

    Attributes:
        owner: canonical owner id; ``name`` its display name.
        amount: total paid for the period.
        share: ``amount / paid_total`` (0 when nothing was paid).
        n_generations: outputs in which the owner took part; ``n_paid``: of those, paid > 0.
        value_sum: sum of the owner's values over the period's outputs.
        value_stderr: standard error of ``value_sum`` (independent estimates per output).
    """

    owner: str
    name: str
    amount: Decimal
    share: float
    n_generations: int
    n_paid: int
    value_sum: float
    value_stderr: float


@dataclasses.dataclass(frozen=True)
class GenerationLine:
    """One output's split, with owners resolved through the registry."""

    seq: int
    output_id: str
    timestamp: _dt.datetime
    pool: Decimal
    amounts: dict[str, Decimal]
    values: dict[str, float]
    stderr: dict[str, float]
    unallocated: Decimal
    no_positive: bool
    policy: str


@dataclasses.dataclass(frozen=True)
class PeriodStatement:
    """Owner totals and reconciliation for a period.

    ``reconciles`` is ``True`` when ``paid_total + unallocated_total == pool_total`` and the
    owners' amounts sum to ``paid_total`` (always, by construction; reports show it).
    """

    period: Period
    aggregation: str
    currency: str
    policies: tuple[str, ...]
    pool_total: Decimal
    paid_total: Decimal
    unallocated_total: Decimal
    n_no_positive: int
    owners: tuple[OwnerLine, ...]
    generations: tuple[GenerationLine, ...]

    @property
    def n_generations(self) -> int:
        """Number of outputs in the period."""
        return len(self.generations)

    @property
    def reconciles(self) -> bool:
        """Whether the totals add up exactly."""
        owners_sum = exact_sum(o.amount for o in self.owners)
        return (
            owners_sum == self.paid_total
            and exact_sum([self.paid_total, self.unallocated_total]) == self.pool_total
        )

    def amount_of(self, owner: str) -> Decimal:
        """Period amount of a canonical owner id (0 when absent)."""
        return next((o.amount for o in self.owners if o.owner == owner), Decimal("0.00"))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, money as strings."""
        return {
            "schema": "datavalue.shapley.royalty-statement",
            "version": 1,
            "period": {
                "start": None if self.period.start is None else self.period.start.isoformat(),
                "end": None if self.period.end is None else self.period.end.isoformat(),
            },
            "aggregation": self.aggregation,
            "currency": self.currency,
            "policies": list(self.policies),
            "n_generations": self.n_generations,
            "n_no_positive": self.n_no_positive,
            "pool_total": str(self.pool_total),
            "paid_total": str(self.paid_total),
            "unallocated_total": str(self.unallocated_total),
            "reconciles": self.reconciles,
            "owners": [
                {
                    "owner": o.owner,
                    "name": o.name,
                    "amount": str(o.amount),
                    "share": o.share,
                    "n_generations": o.n_generations,
                    "n_paid": o.n_paid,
                    "value_sum": o.value_sum,
                    "value_stderr": o.value_stderr if math.isfinite(o.value_stderr) else None,
                }
                for o in self.owners
            ],
            "generations": [
                {
                    "seq": g.seq,
                    "output_id": g.output_id,
                    "timestamp": g.timestamp.isoformat(),
                    "pool": str(g.pool),
                    "policy": g.policy,
                    "amounts": {k: str(v) for k, v in g.amounts.items()},
                    "values": g.values,
                    "stderr": {k: (v if math.isfinite(v) else None) for k, v in g.stderr.items()},
                    "unallocated": str(g.unallocated),
                    "no_positive": g.no_positive,
                }
                for g in self.generations
            ],
        }


def _resolve(registry: Any, owner: str) -> str:
    return registry.resolve(owner) if registry is not None else owner


def _name(registry: Any, owner: str) -> str:
    return registry.name(owner) if registry is not None else owner


def build_statement(
    records: Sequence[GenerationRecord],
    *,
    period: Period,
    aggregation: str = "share-then-sum",
    registry: Any = None,
    currency: str = "USD",
) -> PeriodStatement:
    """Aggregate ledger rows into a :class:`PeriodStatement`.

    Args:
        records: rows of the period (``RoyaltyLedger.records(period)``).
        period: the period (for the report header).
        aggregation: ``"share-then-sum"`` or ``"average-then-share"`` (see module docs).
        registry: optional :class:`OwnerRegistry` resolving shell owners.
        currency: currency code for the report.
    """
    if aggregation not in AGGREGATIONS:
        raise InvalidGameError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}.")
    zero = Decimal("0.00")
    lines: list[GenerationLine] = []
    for rec in records:
        amounts: dict[str, Decimal] = {}
        values: dict[str, float] = {}
        var: dict[str, float] = {}
        # rows written before money and values were normalised may hold -0.00 / -0.0: never printed signed
        for owner, a, v, s in zip(rec.owners, rec.amounts, rec.values, rec.stderr, strict=True):
            key = _resolve(registry, owner)
            amounts[key] = unsigned_zero(exact_sum([amounts.get(key, zero), a]))
            values[key] = values.get(key, 0.0) + v + 0.0
            var[key] = (
                var.get(key, 0.0) + s * s
            )  # shells of one owner: summed (bound if correlated)
        lines.append(
            GenerationLine(
                seq=rec.seq,
                output_id=rec.output_id,
                timestamp=rec.timestamp,
                pool=unsigned_zero(rec.pool),
                amounts=amounts,
                values=values,
                stderr={k: math.sqrt(x) for k, x in var.items()},
                unallocated=unsigned_zero(rec.unallocated),
                no_positive=rec.no_positive,
                policy=rec.policy,
            )
        )
    owners = sorted({k for g in lines for k in g.amounts})
    pool_total = exact_sum([zero, *(g.pool for g in lines)])
    policies = tuple(sorted({g.policy for g in lines}))
    value_sum = {o: sum(g.values.get(o, 0.0) for g in lines) + 0.0 for o in owners}
    value_se = {o: math.sqrt(sum(g.stderr.get(o, 0.0) ** 2 for g in lines)) for o in owners}
    n_gen = {o: sum(o in g.amounts for g in lines) for o in owners}
    n_paid = {o: sum(g.amounts.get(o, zero) > 0 for g in lines) for o in owners}

    if aggregation == "share-then-sum":
        totals = {o: exact_sum([zero, *(g.amounts.get(o, zero) for g in lines)]) for o in owners}
        unallocated = exact_sum([zero, *(g.unallocated for g in lines)])
        n_no_positive = sum(g.no_positive for g in lines)
    else:
        if len(policies) > 1:
            raise LedgerError(
                f"average-then-share needs one policy for the whole period; the rows use "
                f"{list(policies)}. Report sub-periods separately or use share-then-sum."
            )
        totals, unallocated, n_no_positive = {o: zero for o in owners}, zero, 0
        if lines:
            weights = [float(g.pool) for g in lines]
            if sum(weights) == 0:
                weights = [1.0] * len(lines)
            wsum = math.fsum(weights)
            # weights normalised first: each term is at most its value, so a mean of finite values
            # never overflows (revenue x value did for values near 1e308: P5-01); fsum keeps it exact-ish
            shares = [w / wsum for w in weights]
            mean = [
                math.fsum(w * g.values.get(o, 0.0) for w, g in zip(shares, lines, strict=True)) + 0.0 for o in owners
            ]
            if not all(math.isfinite(v) for v in mean):  # cannot happen for finite values; named if it does
                big = sorted(lines, key=lambda g: -max((abs(v) for v in g.values.values()), default=0.0))[:3]
                raise LedgerError(
                    "average-then-share: the pool-weighted mean of the period's values is not finite; the largest "
                    f"values are in outputs {[g.output_id for g in big]}. Report the period with share-then-sum, "
                    "or report those outputs' sub-period separately."
                )
            split = split_royalties(mean, pool=pool_total, policy=policies[0])
            totals = dict(zip(owners, split.amounts, strict=True))
            unallocated = split.unallocated
            n_no_positive = int(split.no_positive)
    paid_total = exact_sum([zero, *totals.values()])
    owner_lines = tuple(
        sorted(
            (
                OwnerLine(
                    owner=o,
                    name=_name(registry, o),
                    amount=totals[o],
                    share=float(totals[o] / paid_total) if paid_total > 0 else 0.0,
                    n_generations=n_gen[o],
                    n_paid=n_paid[o],
                    value_sum=value_sum[o],
                    value_stderr=value_se[o],
                )
                for o in owners
            ),
            key=lambda line: (-line.amount, line.owner),
        )
    )
    return PeriodStatement(
        period=period,
        aggregation=aggregation,
        currency=currency,
        policies=policies,
        pool_total=pool_total,
        paid_total=paid_total,
        unallocated_total=unallocated,
        n_no_positive=n_no_positive,
        owners=owner_lines,
        generations=tuple(lines),
    )
