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

Tamper evidence has three layers (see ``docs/shapley.md``, section 8):

* the hash chain: an edited, inserted or deleted row in the middle breaks it;
* the head file ``<ledger>.head`` (JSON: row count and last row hash, replaced atomically after
  every append): deleting rows from the end (which leaves a valid, shorter chain) no longer
  passes. It lives beside the ledger, so an attacker who can rewrite both files can rewrite both;
* a keyed MAC (``key=``, kept away from the ledger's disk): HMAC-SHA256 of every row's hash is
  stored in the row (``"mac"``) and of ``"<rows>:<last hash>"`` in the head. Without the key
  nobody can rebuild a chain, drop rows and re-anchor it so that ``verify(key)`` passes.

Appends hold the lock file ``<ledger>.lock`` (created with ``O_CREAT | O_EXCL``; it names the pid
and host of the writer) and first catch up with rows that other handles appended, so several
``RoyaltyLedger`` objects or processes on one host append one after the other without breaking
the chain. A lock left by a dead process on this host is taken over (with a warning); a lock
from another host never is. A final line cut short by a crash is refused with a message naming
it; :meth:`RoyaltyLedger.recover` moves it aside explicitly (never a line the head file records as
a row). A whole last row missing only its newline is a row (the next append writes the newline).
A crash between the row and the head leaves one row after the head (accepted with a warning, the
next append re-anchors it); more rows after the head are refused until
:meth:`RoyaltyLedger.reanchor` accepts them. One ``output_id`` is paid once.
The lock, the head file and the MAC live in ``_anchor.py``; this module keeps the rows and the chain.

Format: version 1 throughout. A keyed ledger's header has ``"mac": "hmac-sha256"`` and its rows
an extra ``"mac"`` field (not part of ``row_hash``). A ledger created with a head file says
``"anchor": "head-file"`` in its header (hashed into the chain), so its head going missing is an
error, not a warning (:meth:`RoyaltyLedger.reanchor` is the explicit repair); ledgers written before
the head file existed still open and verify, with a warning that they are unanchored, and gain a
head on next append. A head file that records rows where the ledger is missing or empty stops a
new ledger from being started over it.

Links: the head and the lock are named after the file a symbolic link leads to
(``current.jsonl -> 2025.jsonl`` uses ``2025.jsonl.head`` and ``2025.jsonl.lock``), so writers
through the link and through the file share one lock and one chain; the link is left as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import decimal
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from datavalue._files import inside_run_problem
from datavalue.shapley._errors import (
    InvalidGameError,
    InvalidPoolError,
    LedgerError,
    LedgerNotFoundError,
    OutputPathError,
    ReplayMismatchError,
)
from datavalue.shapley._validation import parse_values
from datavalue.shapley.estimators._exact import exact_from_utilities
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.royalties import _anchor
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

_SCHEMA = _anchor.LEDGER_SCHEMA
_VERSION = 1


@dataclasses.dataclass
class _Scan:
    """What one read of the ledger file found (rows verified against the chain)."""

    header: dict[str, Any]
    rows: list[GenerationRecord]
    macs: list[str | None]
    size: int  # bytes up to the end of the last complete row


def _hash_content(content: bytes | str) -> str:
    data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_object(line: bytes) -> bool:
    """Whether ``line`` is one whole JSON object (a ledger line's shape)."""
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


def _head_rows(head_text: str | None) -> int | None:
    """The row count a head file's text records (``None``: no head, or not one this can read)."""
    try:
        rows = json.loads(head_text)["rows"] if head_text is not None else None
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return rows if isinstance(rows, int) and not isinstance(rows, bool) else None



def _refuse_damaged_row(what: str, recorded: int | None, kept: int, fix: str) -> None:
    """A torn last line that the head file counts as a row was whole when written and damaged later (no
    interrupted append leaves that): refuse, ``what`` naming the line and the head file."""
    if recorded is not None and recorded > kept:
        raise LedgerError(
            f"{what} records {recorded} rows and only {kept} come before it: the line was a whole row when it was "
            f"written and was damaged later, which no interrupted append does. {fix}"
        )

def _rows_before(raw: bytes, cut: int) -> int:
    """How many rows the ledger bytes before ``cut`` hold (non-blank lines after the header)."""
    return max(0, sum(1 for line in raw[:cut].splitlines() if line.strip()) - 1)


def _parse_owners(owners: object) -> tuple[str, ...]:
    """Owner ids as given, one per player: a list (or tuple, array) of non-empty strings.

    Nothing is converted: ``None`` would be paid as an owner named ``'None'`` and a string
    ``'abc'`` would be split into the owners ``'a'``, ``'b'``, ``'c'``.
    """
    if isinstance(owners, str | bytes | Mapping | set | frozenset) or not isinstance(owners, Iterable):
        raise InvalidGameError(
            f"owners must be a list of owner ids (strings), one per player; got {owners!r} of type "
            f"{type(owners).__name__} (a string would be split into letters, a set has no order). Pass e.g. owners=['ann', 'bob', 'cy']."
        )
    out = []
    for i, o in enumerate(owners):
        if not isinstance(o, str) or not o:
            raise InvalidGameError(
                f"owners[{i}] must be a non-empty string (an owner id); got {o!r} of type "
                f"{type(o).__name__} in {list(owners)!r}. Nothing is converted: pass each owner's id "
                "as a string."
            )
        out.append(str(o))
    return tuple(out)


class RoyaltyLedger:
    """Append-only royalty ledger stored as JSON lines, anchored by a head file.

    Args:
        path: ledger file; created with a header when missing (``create=True``).
        currency: ISO currency code recorded in the header of a new ledger (default ``"USD"``);
            when reopening, ``None`` reads it and any other value must match.
        create: create the file if it does not exist (else raise ``LedgerNotFoundError``).
        key: secret for HMAC-SHA256 (bytes or text), kept away from the ledger's disk. A new
            ledger created with a key is keyed: every row and the head carry a MAC, appends
            need the key, and reading with the key checks every MAC. Without it a keyed
            ledger can be read (MACs unchecked, with a warning) but not appended to.
        repair: move a torn final line aside first (see :meth:`recover`).
        lock_timeout: seconds an append waits for another writer's ``<ledger>.lock``.

    Raises:
        LedgerError: the file is not a ledger, its last line is torn (see :meth:`recover`),
            its chain is broken, rows are missing against the head file or more than one row
            follows it (see :meth:`reanchor`), a MAC is wrong.
        OutputPathError: a new ledger would be created inside a datavalue run
            (:func:`datavalue._files.inside_run_problem`); nothing is written.

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

    _check_anchor = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        currency: str | None = None,
        create: bool = True,
        key: bytes | str | None = None,
        repair: bool = False,
        lock_timeout: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self.currency = currency or "USD"
        self.lock_timeout = float(lock_timeout)
        self._key = _anchor.parse_key(key)
        self._keyed = self._key is not None
        self._count = 0
        self._size = 0
        self._ids: set[str] = set()
        self._warned: set[str] = set()
        self._closed = False
        if self.path.is_dir():
            raise LedgerError(
                f"{self.path} is a directory; a royalty ledger is one JSON-lines file. Pass the ledger's file "
                f"(e.g. {self.path / 'ledger.jsonl'})."
            )
        if self.path.exists() and self.path.stat().st_size > 0:
            if repair:
                self.recover(self.path)
            header = self._read_header()
            self.currency = header["currency"]
            if currency is not None and currency != self.currency:
                raise LedgerError(
                    f"{self.path} is a {self.currency} ledger; got currency={currency!r}. "
                    "Use one ledger per currency."
                )
            self._keyed = header.get("mac") == _anchor.MAC
            if self._key is not None and not self._keyed:
                raise LedgerError(
                    f'{self.path} was created without a key (its header has no "mac"), so '
                    "its rows carry no MAC; got key=. Open it without key=, or start a new "
                    "keyed ledger. If it was created with a key, its header was rewritten: "
                    "restore from backup."
                )
            self._adopt(self._scan())
        elif create:
            inside = inside_run_problem(self.path, "a new royalty ledger (with its head and lock files)")
            if inside is not None:
                raise OutputPathError(inside)
            self._refuse_orphan_head()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            header = {
                "schema": _SCHEMA,
                "version": _VERSION,
                "currency": self.currency,
                "created": _dt.datetime.now(_dt.UTC).isoformat(),
                _anchor.ANCHOR_FIELD: _anchor.ANCHOR_HEAD,  # a missing head is an error from now on
            }
            if self._key is not None:
                header["mac"] = _anchor.MAC
            self._head = self._header_hash(header)
            self._write_head()  # first: a crash before the header leaves a 0-row head, never a headless ledger
            self.path.write_text(json.dumps(header, sort_keys=True) + "\n", encoding="utf-8")
            self._size = self.path.stat().st_size
        else:
            raise LedgerNotFoundError(f"ledger {self.path} does not exist.")

    def _refuse_orphan_head(self) -> None:
        """Refuse to start a new ledger where a head file says rows were written: the ledger was
        deleted, emptied or moved, and a fresh head would hide that for good."""
        text = self._read_head_text()
        if text is None:
            return
        try:
            rows = int(json.loads(text)["rows"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            rows = -1
        if rows == 0:
            return  # a creation cut short before the header was written: nothing was recorded
        said = f"records {rows} rows" if rows > 0 else "is not a ledger head file"
        raise LedgerError(
            f"ledger {self.path} is {'empty' if self.path.exists() else 'missing'}, but its head file "
            f"{self.head_path} {said}: the ledger was deleted, emptied or moved, and starting a new one "
            "here would hide that. Restore the ledger from backup (or open it where it now is); to "
            "start a new ledger at this path, move the head file away first."
        )

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _header_hash(header: dict[str, Any]) -> str:
        text = json.dumps(header, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def head_path(self) -> Path:
        """The head file ``<ledger>.head`` anchoring the row count and the last hash."""
        return _anchor.head_path(self.path)

    @property
    def lock_path(self) -> Path:
        """The writer's lock file ``<ledger>.lock`` (present only during an append)."""
        return _anchor.lock_path(self.path)

    @property
    def keyed(self) -> bool:
        """Whether the ledger was created with a key (its rows and head carry MACs). Opened without
        ``key=``, a keyed ledger's MACs were not checked: ``datavalue royalties`` refuses it then."""
        return self._keyed

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

    @staticmethod
    def _torn_tail(raw: bytes) -> tuple[int, int] | None:
        """``(line number, byte offset)`` of a torn final line, or ``None``.

        Torn: bytes after the last newline that are not a JSON object (a crash mid-write), or a
        last line that is not JSON. Only the final line can be torn; a bad line before it is a
        damaged ledger. A last line that is a whole JSON object missing only its newline (a write
        cut one byte short, an editor that strips the final newline) is no torn line: no proper
        prefix of a row's JSON parses, and the chain and the head check it as the row it is; the
        next append (or :meth:`recover`) writes the newline.
        """
        body = raw if raw.endswith(b"\n") else raw[: raw.rfind(b"\n") + 1]
        if len(body) < len(raw):
            if _json_object(raw[len(body) :]):
                return None
            return body.count(b"\n") + 1, len(body)
        start = raw.rfind(b"\n", 0, len(raw) - 1) + 1
        if start == 0:
            return None  # the header is the only line: not a torn row
        try:
            json.loads(raw[start:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return raw.count(b"\n"), start
        return None

    #: how often a read starts again when other handles appended between its reading the head
    #: file and the rows (more rows after the head than one interrupted append leaves)
    _RESCANS = 5

    def _scan(self) -> _Scan:
        """Read the file, refuse a torn tail, verify the chain, MACs and the head anchor.

        The head file is read *before* the ledger: a writer appends its row and only then
        replaces the head, so a reader racing a writer sees at least as many rows as the head
        it read (never a false "truncated"). Racing several appends, it can see more than the
        one row after the head that an interrupted append leaves: when the head file changed
        meanwhile, it reads both again rather than call those rows added by hand.
        """
        for attempt in range(self._RESCANS):
            head_text = self._read_head_text()
            try:
                return self._scan_once(head_text)
            except _anchor.BeyondHeadError:
                if attempt + 1 == self._RESCANS or self._read_head_text() == head_text:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _scan_once(self, head_text: str | None) -> _Scan:
        """One read of the ledger against the head file's text ``head_text`` (read before it)."""
        raw = self.path.read_bytes()
        torn = self._torn_tail(raw)
        if torn is not None:
            lineno, cut = torn
            _refuse_damaged_row(
                f"{self.path}:{lineno} is not a ledger row: the last line is torn (cut short or not JSON), but the head "
                f"file {self.head_path.name}", _head_rows(head_text) if self._check_anchor else None, _rows_before(raw, cut),
                "Restore the ledger from backup (RoyaltyLedger.recover would leave it truncated).")
            holder = self._read_lock()
            busy = (
                f" (a writer, pid {holder.get('pid')} on {holder.get('host')!r}, holds the lock: "
                "the line may still be being written; retry first)"
                if holder is not None
                else ""
            )
            raise LedgerError(
                f"{self.path}:{lineno} is not a ledger row: the last line is torn (cut short or "
                f"not JSON), as a crash during an append leaves it{busy}. Every row before it is "
                f"intact. RoyaltyLedger.recover({str(self.path)!r}) (or RoyaltyLedger(path, "
                "repair=True)) moves the torn tail to <ledger>.torn-<time> and keeps them; if "
                "no append was interrupted, restore from backup instead."
            )
        header = self._read_header()
        prev = self._header_hash(header)
        rows: list[GenerationRecord] = []
        macs: list[str | None] = []
        text = raw.decode("utf-8", errors="replace")
        numbered = [(i, ln) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
        lines = iter(numbered)
        next(lines)
        for lineno, line in lines:
            try:
                d = json.loads(line)
                rec = GenerationRecord.from_json(d)
            except (
                json.JSONDecodeError,
                KeyError,
                TypeError,
                ValueError,
                decimal.InvalidOperation,
            ) as exc:
                raise LedgerError(
                    f"{self.path}:{lineno} is not a ledger row ({exc}). Restore from backup."
                ) from None
            if rec.prev_hash != prev or rec.compute_hash() != rec.row_hash:
                raise LedgerError(
                    f"{self.path}:{lineno} (seq {rec.seq}) breaks the hash chain: the row was "
                    "edited, or a row before it was removed. Restore the ledger from backup."
                )
            mac = d.get("mac")
            if self._key is not None and (
                not isinstance(mac, str)
                or not hmac.compare_digest(mac, _anchor.mac(self._key, rec.row_hash))
            ):
                raise LedgerError(
                    f"{self.path}:{lineno} (seq {rec.seq}, output {rec.output_id!r}) has "
                    f"{'no' if mac is None else 'a wrong'} MAC for this key: the row was "
                    "rewritten by someone without the key, or the key is wrong."
                )
            prev = rec.row_hash
            rows.append(rec)
            macs.append(mac)
        if self._keyed and self._key is None:
            self._warn_once(
                "nokey",
                "ledger %s is keyed but was opened without key=: MACs not checked",
            )
        self._check_head(header, rows, head_text)
        return _Scan(header=header, rows=rows, macs=macs, size=len(raw))

    def _warn_once(self, what: str, msg: str, *args: object) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(msg, self.path, *args)

    def _read_head_text(self) -> str | None:
        return _anchor.read_head_text(self.path)

    def _check_head(
        self, header: dict[str, Any], rows: list[GenerationRecord], head_text: str | None
    ) -> None:
        """Compare the chain with the head file: refuses truncation and a replaced tail."""
        if not self._check_anchor:
            return
        _anchor.check_head(
            self.path,
            header_hash=self._header_hash(header),
            rows=rows,
            head_text=head_text,
            key=self._key,
            warn_once=self._warn_once,
            required=header.get(_anchor.ANCHOR_FIELD) == _anchor.ANCHOR_HEAD,
        )

    def _adopt(self, scan: _Scan) -> None:
        rows = scan.rows
        self._head = rows[-1].row_hash if rows else self._header_hash(scan.header)
        self._count = len(rows)
        self._size = scan.size
        self._ids = {r.output_id for r in rows}
        if len(self._ids) < len(rows):
            self._warn_once(
                "dupes",
                "ledger %s records some output_id twice (written by an older version); "
                "verify() reports them",
            )

    def records(self, period: Period | str | None = None) -> list[GenerationRecord]:
        """All rows (optionally those in ``period``), verifying the chain and its anchors.

        Raises:
            LedgerError: on a torn final line, a broken chain, a wrong MAC (with ``key=``) or
                rows missing against the head file.
        """
        if isinstance(period, str):
            period = Period.parse(period)
        rows = self._scan().rows
        return [r for r in rows if period is None or period.contains(r.timestamp)]

    def __len__(self) -> int:
        return self._count

    # ------------------------------------------------------------------ recovery
    @classmethod
    def recover(cls, path: str | os.PathLike[str]) -> Path | None:
        """Move a torn final line to ``<ledger>.torn-<UTC time>``; keep every complete row.

        Returns the file holding the torn bytes, or ``None`` when the last line was whole (a whole
        last line missing only its newline gets the newline, with a warning). Nothing is dropped
        silently: the torn bytes are kept beside the ledger and logged. A line the head file
        records as a row (damaged after it was written) is never moved aside: that would leave
        the ledger truncated. Hold no other handle that is appending while recovering.

        Raises:
            LedgerError: the head file records the torn line as a row (restore from backup).
        """
        path = Path(path)
        head_text = _anchor.read_head_text(path)  # before the rows, as every read (see _scan)
        raw = path.read_bytes()
        torn = cls._torn_tail(raw)
        if torn is None:
            if raw and not raw.endswith(b"\n"):
                with open(path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                logger.warning("ledger %s: its last line %d is whole but had no final newline; added the newline",
                               path, raw.count(b"\n") + 1)  # fmt: skip
            return None
        lineno, cut = torn
        _refuse_damaged_row(
            f"{path}:{lineno} is torn (cut short or not JSON), but the head file {_anchor.head_path(path).name}",
            _head_rows(head_text), _rows_before(raw, cut),
            "Moving it aside would leave the ledger truncated, so nothing was moved. Restore the ledger from backup.")
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        aside = _anchor.sidecar(_anchor.real(path), f".torn-{stamp}")
        with open(aside, "xb") as f:
            f.write(raw[cut:])
            f.flush()
            os.fsync(f.fileno())
        with open(path, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
        logger.warning(
            "ledger %s: moved the torn line %d (%d bytes) to %s",
            path,
            lineno,
            len(raw) - cut,
            aside,
        )
        return aside

    @classmethod
    def reanchor(
        cls, path: str | os.PathLike[str], *, key: bytes | str | None = None
    ) -> RoyaltyLedger:
        """Rewrite the head file from the ledger as it is now (after checking it by hand).

        For a ledger restored from backup, or one whose head file was lost. It makes the
        current rows the anchored truth, so use it only on a ledger you trust: this is exactly
        what an attacker who rewrote the file would do, which the key (kept elsewhere) stops.
        """
        path = Path(path)
        head = _anchor.head_path(path)
        old = _anchor.sidecar(head, f".replaced-{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%S%fZ}")
        if head.exists():
            os.replace(head, old)
        led = cls.__new__(cls)
        led._check_anchor = False  # the head is what we are about to write
        led.__init__(path, create=False, key=key)  # type: ignore[misc]
        led._check_anchor = True
        with led._locked():
            led._catch_up()  # rows appended since it was read are anchored too
            led._write_head()
        logger.warning("ledger %s re-anchored at %d rows", path, led._count)
        return led

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
        Given together, ``result``'s values must be the exact values of ``utilities``.

        Args:
            output_id: the generated output's id: a non-empty ``str`` (nothing is converted: ``5`` is
                refused, so ``5`` and ``"5"`` can never be recorded as one output).
            prompt: the prompt (kept for audit).
            revenue: revenue of this output (``Decimal``, on the cent grid).
            owners: owner id of each player, in player order: a list (or tuple, array) of
                non-empty strings; nothing is converted (``None``, a string to split, a set are refused).
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
        if not isinstance(output_id, str) or not output_id:
            raise InvalidGameError(
                f"output_id must be a non-empty str (the generated output's id; nothing is converted, so 5 and "
                f"'5' are never taken for one output); got {output_id!r} of type {type(output_id).__name__}. "
                f"Pass the id as text, e.g. output_id={str(output_id) if isinstance(output_id, int) else 'gen-1'!r}."
            )
        if self._closed:
            raise LedgerError(f"this handle on {self.path} is closed; open a new RoyaltyLedger.")
        if self._key is None and self._keyed:
            raise LedgerError(
                f"{self.path} is a keyed ledger (every row carries an HMAC); pass key= to append."
            )
        self._refuse_duplicate(output_id)  # early, before the split; checked again when locked
        owners = _parse_owners(owners)
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
        if result is not None and u is not None:  # the stored utilities must reproduce the row
            exact = exact_from_utilities(u)
            if not np.allclose(values, exact, rtol=1e-9, atol=1e-12):
                raise InvalidGameError(
                    f"result= gives the values {np.asarray(values).tolist()}, but the utilities= given "
                    f"with it have the Shapley values {exact.tolist()}; the row would pay by one and "
                    "store the other, so its utilities would no longer reproduce its amounts. Pass "
                    "utilities= alone (exact values, replayable), or result= alone (an estimate), or "
                    "both only when they agree."
                )
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
            seq=-1,  # seq and prev_hash are set under the lock, after catching up
            output_id=output_id,
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
            prev_hash="",
        )
        with self._locked():
            self._catch_up()
            self._refuse_duplicate(output_id)
            rec = dataclasses.replace(rec, seq=self._count, prev_hash=self._head)
            rec = dataclasses.replace(rec, row_hash=rec.compute_hash())
            self._append(rec)
        if rec.no_positive:
            logger.warning("ledger %s: output %s had no positive contributor", self.path, output_id)
        return rec

    def _refuse_duplicate(self, output_id: str) -> None:
        if output_id in self._ids:
            raise LedgerError(
                f"output {output_id!r} is already recorded in {self.path}; recording it again "
                "would pay it twice. Use a new output_id for a new sale of the same content."
            )

    def _append(self, rec: GenerationRecord) -> None:
        """Append one row and re-anchor the head. Call with the lock held, after catching up."""
        row: dict[str, Any] = {**rec.payload(), "row_hash": rec.row_hash}
        if self._key is not None:
            row["mac"] = _anchor.mac(self._key, rec.row_hash)
        line = json.dumps(row, sort_keys=True) + "\n"
        if not self._ends_with_newline():
            line = "\n" + line  # the last row (or the header) lost only its newline: end it first
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._head = rec.row_hash
        self._count += 1
        self._size += len(line.encode("utf-8"))
        self._ids.add(rec.output_id)
        self._write_head()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _write_head(self) -> None:
        _anchor.write_head(self.path, rows=self._count, last_hash=self._head, key=self._key)

    def _catch_up(self) -> None:
        """Adopt rows that other handles appended since this one last read or wrote."""
        if self.path.stat().st_size == self._size and self._tail_hash() == self._head:
            return
        count, head = self._count, self._head
        scan = self._scan()
        known = scan.rows[count - 1].row_hash if 0 < count <= len(scan.rows) else None
        if count == 0:
            known = self._header_hash(scan.header)
        if count > len(scan.rows) or known != head:
            raise LedgerError(
                f"{self.path} changed under this handle: its row {count - 1} is no longer the "
                "one this handle wrote or read. Reopen the ledger and verify() it."
            )
        self._adopt(scan)

    def _tail_hash(self) -> str | None:
        """The chain hash of the file's last line (reads only the end of the file)."""
        with open(self.path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            block = 1 << 16
            while True:
                start = max(0, end - block)
                f.seek(start)
                data = f.read(end - start)
                lines = data.rstrip(b"\n").split(b"\n")
                if len(lines) > 1 or start == 0:
                    break
                block *= 4
        try:
            last = json.loads(lines[-1])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(last, dict):
            return None
        if last.get("schema") == _SCHEMA:
            return self._header_hash(last)
        return last.get("row_hash")

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold ``<ledger>.lock`` (O_CREAT | O_EXCL, naming pid and host) for one append."""
        return _anchor.hold_lock(self.path, timeout=self.lock_timeout)

    def _read_lock(self) -> dict[str, Any] | None:
        return _anchor.read_lock(self.path)

    def close(self) -> None:
        """End appends through this handle (reading still works).

        The lock file is held only while one append writes (released even when it fails), so
        closing has no lock to release; it makes a later ``record`` on this handle an error.
        """
        self._closed = True

    def __enter__(self) -> RoyaltyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        """Check the whole ledger; returns the number of rows.

        Checks the hash chain, the head file (no rows missing from the end, the last hash
        matches), with ``key=`` every row's and the head's MAC, that no ``output_id`` is paid
        twice, and replays every row's split.

        Raises:
            LedgerError: on any of these; ``ReplayMismatchError`` when a split does not replay.
        """
        rows = self.records()
        seen: dict[str, int] = {}
        for rec in rows:
            if rec.output_id in seen:
                raise LedgerError(
                    f"{self.path}: output {rec.output_id!r} is recorded twice (seq "
                    f"{seen[rec.output_id]} and {rec.seq}), so it was paid twice."
                )
            seen[rec.output_id] = rec.seq
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
