"""An append-only, hash-chained JSON-lines ledger with one row per generated output.

Each row records everything needed to audit and replay one payment: the output's id and content
hash, the prompt, revenue, royalty rate and pool, the policy id, model and run fingerprints, the
owners (one per player), the coalition utilities (when the exact game was computed: then
``exact_from_utilities`` recomputes the values), the values with their standard errors, the
shares and the exact-cent amounts. Rows carry ``prev_hash`` and ``row_hash`` (SHA-256 of the
canonical JSON of the row), so an edited or deleted row is detected when the ledger is read.

File layout (``schema`` header, then rows)::

    {"schema": "datavalue.shapley.royalty-ledger", "version": 1, "currency": "USD", ...}
    {"seq": 0, "output_id": "gen-1", "pool": "0.05", "amounts": ["0.03", "0.02"], ...}

Single writer: appends from several processes at once are not supported.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from datavalue.shapley._errors import (
    InvalidGameError,
    InvalidPoolError,
    LedgerError,
    LedgerNotFoundError,
    ReplayMismatchError,
)
from datavalue.shapley._validation import parse_values
from datavalue.shapley.estimators._exact import exact_from_utilities
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.royalties._records import GenerationRecord, Period, parse_timestamp
from datavalue.shapley.royalties._split import (
    CENT,
    RoyaltySplit,
    get_policy,
    parse_money,
    split_royalties,
)
from datavalue.shapley.royalties._statement import PeriodStatement, build_statement

__all__ = ["RoyaltyLedger"]

logger = logging.getLogger(__name__)

_SCHEMA = "datavalue.shapley.royalty-ledger"
_VERSION = 1


def _hash_content(content: bytes | str) -> str:
    data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RoyaltyLedger:
    """Append-only royalty ledger stored as JSON lines.

    Args:
        path: ledger file; created with a header when missing (``create=True``).
        currency: ISO currency code recorded in the header of a new ledger (default ``"USD"``);
            when reopening, ``None`` reads it and any other value must match.
        create: create the file if it does not exist (else raise ``LedgerNotFoundError``).

    Example:
        >>> import os, tempfile
        >>> from decimal import Decimal
        >>> from datavalue import shapley
        >>> ledger = RoyaltyLedger(os.path.join(tempfile.mkdtemp(), "ledger.jsonl"))
        >>> game = shapley.games.GloveGame(n=3, left={0}, right={1, 2})
        >>> row = ledger.record(output_id="gen-1", content=b"<image bytes>", prompt="gloves",
        ...                     revenue=Decimal("10.00"), royalty_rate=Decimal("0.5"),
        ...                     owners=["ann", "bob", "cy"], utilities=game.utilities(),
        ...                     timestamp="2025-01-15")
        >>> [str(a) for a in row.amounts]
        ['3.34', '0.83', '0.83']
        >>> ledger.statement(period="2025-01-01:2025-02-01").paid_total
        Decimal('5.00')
    """

    def __init__(
        self, path: str | os.PathLike[str], *, currency: str | None = None, create: bool = True
    ) -> None:
        self.path = Path(path)
        self.currency = currency or "USD"
        self._count = 0
        if self.path.exists() and self.path.stat().st_size > 0:
            header = self._read_header()
            self.currency = header["currency"]
            if currency is not None and currency != self.currency:
                raise LedgerError(
                    f"{self.path} is a {self.currency} ledger; got currency={currency!r}. "
                    "Use one ledger per currency."
                )
            self._head = self._header_hash(header)
            for rec in self.records():
                self._head = rec.row_hash
                self._count += 1
        elif create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = {
                "schema": _SCHEMA,
                "version": _VERSION,
                "currency": self.currency,
                "created": _dt.datetime.now(_dt.UTC).isoformat(),
            }
            self.path.write_text(json.dumps(header, sort_keys=True) + "\n", encoding="utf-8")
            self._head = self._header_hash(header)
        else:
            raise LedgerNotFoundError(f"ledger {self.path} does not exist.")

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _header_hash(header: dict[str, Any]) -> str:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _lines(self) -> Iterator[tuple[int, str]]:
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line

    def _read_header(self) -> dict[str, Any]:
        for _, line in self._lines():
            try:
                header = json.loads(line)
            except json.JSONDecodeError:
                header = None
            if not isinstance(header, dict) or header.get("schema") != _SCHEMA:
                raise LedgerError(
                    f"{self.path} is not a royalty ledger (expected a header with schema "
                    f"{_SCHEMA!r} on line 1)."
                )
            if header.get("version") != _VERSION:
                raise LedgerError(
                    f"{self.path} has ledger version {header.get('version')}; this library "
                    f"reads version {_VERSION}."
                )
            return header
        raise LedgerError(f"{self.path} is empty.")

    def records(self, period: Period | str | None = None) -> list[GenerationRecord]:
        """All rows (optionally those in ``period``), verifying the hash chain."""
        if isinstance(period, str):
            period = Period.parse(period)
        header = self._read_header()
        prev = self._header_hash(header)
        out = []
        lines = self._lines()
        next(lines)
        for lineno, line in lines:
            try:
                rec = GenerationRecord.from_json(json.loads(line))
            except (
                json.JSONDecodeError,
                KeyError,
                TypeError,
                ValueError,
                decimal.InvalidOperation,
            ) as exc:
                raise LedgerError(f"{self.path}:{lineno} is not a ledger row ({exc}).") from None
            if rec.prev_hash != prev or rec.compute_hash() != rec.row_hash:
                raise LedgerError(
                    f"{self.path}:{lineno} (seq {rec.seq}) breaks the hash chain: the row was "
                    "edited, or a row before it was removed. Restore the ledger from backup."
                )
            prev = rec.row_hash
            if period is None or period.contains(rec.timestamp):
                out.append(rec)
        return out

    def __len__(self) -> int:
        return self._count

    # ------------------------------------------------------------------ writing
    def record(
        self,
        *,
        output_id: str,
        prompt: str,
        revenue: Decimal | int | str,
        owners: Sequence[str],
        result: ShapleyResult | Sequence[float] | np.ndarray | None = None,
        utilities: Sequence[float] | np.ndarray | None = None,
        content: bytes | str | None = None,
        output_hash: str | None = None,
        royalty_rate: Decimal | int | str = Decimal(1),
        policy: str = "srs-v1",
        timestamp: _dt.datetime | str | None = None,
        model_fingerprint: str = "",
        run_fingerprint: str = "",
    ) -> GenerationRecord:
        """Split one output's pool and append the row.

        The pool is ``revenue * royalty_rate`` rounded half-even to the cent. Values come from
        ``result`` (any estimator) or, when only ``utilities`` (all ``2**n`` coalitions by
        bitmask) are given, from exact enumeration; stored utilities make the row replayable.

        Args:
            output_id: the generated output's id.
            prompt: the prompt (kept for audit).
            revenue: revenue of this output (``Decimal``, on the cent grid).
            owners: owner id of each player, in player order.
            result: a :class:`ShapleyResult` or per-owner values.
            utilities: ``(2**n,)`` coalition utilities.
            content: the output's bytes or text (hashed; the content itself is not stored).
            output_hash: a precomputed content hash instead of ``content``.
            royalty_rate: the owners' contractual share rho in ``[0, 1]``.
            policy: royalty policy id.
            timestamp: when the output was sold (defaults to now, UTC).
            model_fingerprint: identifies the generating model.
            run_fingerprint: identifies the training run / coalition models / store.
        """
        owners = tuple(str(o) for o in owners)
        if len(set(owners)) != len(owners) or not owners:
            raise InvalidGameError(f"owners must be distinct and non-empty; got {list(owners)}.")
        if (content is None) == (output_hash is None):
            raise InvalidGameError("pass exactly one of content= (hashed here) or output_hash=.")
        u = None if utilities is None else parse_values(utilities, name="utilities")
        if result is None and u is None:
            raise InvalidGameError("pass result= (values) and/or utilities= for the split.")
        if isinstance(result, ShapleyResult):
            values, stderr, method = result.values, result.stderr, result.method
        elif result is not None:
            values = parse_values(result)
            stderr, method = np.zeros(values.size), "given"
        else:
            values = exact_from_utilities(u)
            stderr, method = np.zeros(values.size), "exact"
        if u is not None and u.size != 1 << values.size:
            raise InvalidGameError(
                f"utilities must have 2**n = {1 << values.size} entries for {values.size} "
                f"owners; got {u.size}."
            )
        if values.size != len(owners):
            raise InvalidGameError(f"{values.size} values for {len(owners)} owners.")
        revenue_d = parse_money(revenue, name="revenue")
        rate = parse_money(royalty_rate, name="royalty_rate", quantum=Decimal("1E-12"))
        if rate > 1:
            raise InvalidPoolError(f"royalty_rate must be in [0, 1]; got {rate}.")
        with decimal.localcontext() as ctx:
            ctx.prec = 80
            pool = (revenue_d * rate).quantize(CENT, rounding=decimal.ROUND_HALF_EVEN)
        pol = get_policy(policy)
        split: RoyaltySplit = split_royalties(values, pool=pool, policy=pol)
        rec = GenerationRecord(
            seq=self._count,
            output_id=str(output_id),
            output_hash=output_hash if output_hash is not None else _hash_content(content),  # type: ignore[arg-type]
            prompt=str(prompt),
            timestamp=parse_timestamp(
                timestamp if timestamp is not None else _dt.datetime.now(_dt.UTC)
            ),
            revenue=revenue_d,
            royalty_rate=rate,
            pool=pool,
            currency=self.currency,
            owners=owners,
            policy=pol.id,
            method=method,
            model_fingerprint=str(model_fingerprint),
            run_fingerprint=str(run_fingerprint),
            utilities=None if u is None else tuple(u.tolist()),
            values=tuple(float(x) for x in values),
            stderr=tuple(float(x) for x in stderr),
            shares=split.shares,
            amounts=split.amounts,
            unallocated=split.unallocated,
            no_positive=split.no_positive,
            prev_hash=self._head,
        )
        rec = dataclasses.replace(rec, row_hash=rec.compute_hash())
        self._append(rec)
        if rec.no_positive:
            logger.warning("ledger %s: output %s had no positive contributor", self.path, output_id)
        return rec

    def _append(self, rec: GenerationRecord) -> None:
        line = json.dumps({**rec.payload(), "row_hash": rec.row_hash}, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._head = rec.row_hash
        self._count += 1

    # ------------------------------------------------------------------ audit
    def replay(self, rec: GenerationRecord) -> RoyaltySplit:
        """Recompute a row's split (from its utilities when it was exact) and compare.

        Raises:
            ReplayMismatchError: if the recomputed values or amounts differ from the row's.
        """
        values = np.asarray(rec.values)
        if rec.utilities is not None and rec.method == "exact":
            recomputed = exact_from_utilities(np.asarray(rec.utilities))
            if not np.allclose(recomputed, values, rtol=1e-9, atol=1e-12):
                raise ReplayMismatchError(
                    f"row {rec.seq} ({rec.output_id}): values recomputed from the stored "
                    f"utilities {recomputed.tolist()} differ from the stored {values.tolist()}."
                )
            values = recomputed
        split = split_royalties(values, pool=rec.pool, policy=rec.policy)
        if split.amounts != rec.amounts or split.unallocated != rec.unallocated:
            raise ReplayMismatchError(
                f"row {rec.seq} ({rec.output_id}): replaying policy {rec.policy} gives "
                f"{[str(a) for a in split.amounts]}; the ledger has {[str(a) for a in rec.amounts]}."
            )
        return split

    def verify(self) -> int:
        """Check the hash chain and replay every row; returns the number of rows."""
        rows = self.records()
        for rec in rows:
            self.replay(rec)
        return len(rows)

    def statement(
        self,
        period: Period | str | None = None,
        *,
        aggregation: str = "share-then-sum",
        registry: Any = None,
    ) -> PeriodStatement:
        """Per-owner statement for a period.

        Args:
            period: a :class:`Period`, ``"START:END"``, or ``None`` for all rows.
            aggregation: ``"share-then-sum"`` (sum of per-output amounts) or
                ``"average-then-share"`` (split the period pool by pool-weighted mean values).
            registry: an :class:`OwnerRegistry` resolving shell owners.
        """
        if isinstance(period, str):
            period = Period.parse(period)
        period = period if period is not None else Period()
        return build_statement(
            self.records(period),
            period=period,
            aggregation=aggregation,
            registry=registry,
            currency=self.currency,
        )

    def __repr__(self) -> str:
        return f"RoyaltyLedger({str(self.path)!r}, rows={self._count}, currency={self.currency!r})"
