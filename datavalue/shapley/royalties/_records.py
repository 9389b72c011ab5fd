"""The rows of a royalty ledger and the periods that select them.

:class:`GenerationRecord` (one generated output's split, as stored) and :class:`Period` (a
half-open time interval) are plain values shared by the ledger that writes and reads rows
(``_ledger``) and the statements that sum them (``_statement``). They live here, below both, so
neither of those modules imports the other for its types (``typing.get_type_hints`` works on
every public class).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from decimal import Decimal
from typing import Any

import numpy as np

from datavalue.shapley._errors import InvalidGameError

__all__ = ["GenerationRecord", "Period", "parse_timestamp"]


def parse_timestamp(value: object, *, name: str = "timestamp") -> _dt.datetime:
    """A timezone-aware UTC datetime from a datetime, date or ISO string (naive means UTC)."""
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise InvalidGameError(
                f"{name} must be an ISO date or datetime like 2025-01-31 or "
                f"2025-01-31T12:00:00+00:00; got {value!r}."
            ) from None
    if isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
        value = _dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, _dt.datetime):
        raise InvalidGameError(f"{name} must be a datetime or ISO string; got {value!r}.")
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    return value.astimezone(_dt.UTC)


@dataclasses.dataclass(frozen=True)
class Period:
    """A half-open time interval ``[start, end)``; ``None`` leaves a side open.

    Example:
        >>> p = Period.parse("2025-01-01:2025-02-01")
        >>> p.contains(parse_timestamp("2025-01-31T23:59:59")), p.contains(parse_timestamp("2025-02-01"))
        (True, False)
    """

    start: _dt.datetime | None = None
    end: _dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.start is not None:
            object.__setattr__(self, "start", parse_timestamp(self.start, name="start"))
        if self.end is not None:
            object.__setattr__(self, "end", parse_timestamp(self.end, name="end"))
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise InvalidGameError(
                f"period end must be after start; got start={self.start}, end={self.end}."
            )

    @classmethod
    def parse(cls, text: str) -> Period:
        """Parse ``START:END`` (ISO dates or datetimes; either side may be empty)."""
        if not isinstance(text, str) or ":" not in text:
            raise InvalidGameError(
                f"period must look like START:END, e.g. 2025-01-01:2025-02-01; got {text!r}."
            )
        # Datetimes contain colons too: try every split point and keep the one that parses.
        for pos in [i for i, ch in enumerate(text) if ch == ":"]:
            left, right = text[:pos], text[pos + 1 :]
            try:
                return cls(start=left or None, end=right or None)  # type: ignore[arg-type]
            except InvalidGameError:
                continue
        raise InvalidGameError(
            f"period must look like START:END with ISO dates, start before end, e.g. "
            f"2025-01-01:2025-02-01; got {text!r}."
        )

    def contains(self, ts: _dt.datetime) -> bool:
        """Whether ``start <= ts < end``."""
        return (self.start is None or ts >= self.start) and (self.end is None or ts < self.end)

    def label(self) -> str:
        """``START:END`` as ISO strings (empty for an open side)."""
        fmt = lambda t: "" if t is None else t.isoformat()  # noqa: E731
        return f"{fmt(self.start)}:{fmt(self.end)}"


@dataclasses.dataclass(frozen=True)
class GenerationRecord:
    """One ledger row: the split of one generated output's royalty pool."""

    seq: int
    output_id: str
    output_hash: str
    prompt: str
    timestamp: _dt.datetime
    revenue: Decimal
    royalty_rate: Decimal
    pool: Decimal
    currency: str
    owners: tuple[str, ...]
    policy: str
    method: str
    model_fingerprint: str
    run_fingerprint: str
    utilities: tuple[float, ...] | None
    values: tuple[float, ...]
    stderr: tuple[float, ...]
    shares: tuple[float, ...]
    amounts: tuple[Decimal, ...]
    unallocated: Decimal
    no_positive: bool
    prev_hash: str
    row_hash: str = ""

    def payload(self) -> dict[str, Any]:
        """Canonical JSON-able dict (money as strings), without ``row_hash``."""
        return {
            "seq": self.seq,
            "output_id": self.output_id,
            "output_hash": self.output_hash,
            "prompt": self.prompt,
            "timestamp": self.timestamp.isoformat(),
            "revenue": str(self.revenue),
            "royalty_rate": str(self.royalty_rate),
            "pool": str(self.pool),
            "currency": self.currency,
            "owners": list(self.owners),
            "policy": self.policy,
            "method": self.method,
            "model_fingerprint": self.model_fingerprint,
            "run_fingerprint": self.run_fingerprint,
            "utilities": None if self.utilities is None else list(self.utilities),
            "values": list(self.values),
            "stderr": [s if np.isfinite(s) else None for s in self.stderr],
            "shares": list(self.shares),
            "amounts": [str(a) for a in self.amounts],
            "unallocated": str(self.unallocated),
            "no_positive": self.no_positive,
            "prev_hash": self.prev_hash,
        }

    def compute_hash(self) -> str:
        """SHA-256 of the canonical payload."""
        text = json.dumps(self.payload(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GenerationRecord:
        """Parse a row as written by :class:`RoyaltyLedger`."""
        return cls(
            seq=int(d["seq"]),
            output_id=d["output_id"],
            output_hash=d["output_hash"],
            prompt=d["prompt"],
            timestamp=parse_timestamp(d["timestamp"]),
            revenue=Decimal(d["revenue"]),
            royalty_rate=Decimal(d["royalty_rate"]),
            pool=Decimal(d["pool"]),
            currency=d["currency"],
            owners=tuple(d["owners"]),
            policy=d["policy"],
            method=d["method"],
            model_fingerprint=d["model_fingerprint"],
            run_fingerprint=d["run_fingerprint"],
            utilities=None if d["utilities"] is None else tuple(float(x) for x in d["utilities"]),
            values=tuple(float(x) for x in d["values"]),
            stderr=tuple(float("inf") if s is None else float(s) for s in d["stderr"]),
            shares=tuple(float(x) for x in d["shares"]),
            amounts=tuple(Decimal(a) for a in d["amounts"]),
            unallocated=Decimal(d["unallocated"]),
            no_positive=bool(d["no_positive"]),
            prev_hash=d["prev_hash"],
            row_hash=d["row_hash"],
        )
