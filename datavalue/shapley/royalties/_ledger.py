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
The lock, the head file and the MAC live in ``_anchor.py``; the torn-line checks, ``recover``, the
orphaned-head check and keeping a head aside for ``reanchor`` in ``_recovery.py``; the checks of
``record``'s inputs in ``_record_checks.py``; this module keeps the rows and the chain.

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
import errno
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from datavalue._files import inside_run_problem, unexpanded_home_problem, unshare
from datavalue.shapley._errors import (
    LedgerError,
    LedgerNotFoundError,
    OutputPathError,
    ReplayMismatchError,
)
from datavalue.shapley.estimators._exact import exact_from_utilities
from datavalue.shapley.estimators._result import ShapleyResult
from datavalue.shapley.royalties import _anchor, _record_checks, _recovery
from datavalue.shapley.royalties._records import GenerationRecord, Period, parse_timestamp
from datavalue.shapley.royalties._split import (
    RoyaltySplit,
    get_policy,
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


def _refuse_unwritable(path: Path, exc: OSError) -> None:
    """Raise :class:`LedgerError` for a new ledger whose directory cannot be written (read-only file
    system, no permission); other errors are the caller's to re-raise."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "is on a read-only file system" if exc.errno == errno.EROFS else "cannot be written by this user"
        raise LedgerError(
            f"cannot create the ledger {path}: its directory {path.parent} {why}. A ledger is created with its "
            "head file beside it and appended to in place: create it in a writable directory.") from exc


def _refuse_home(path: str | os.PathLike[str], *, creating: bool) -> None:
    """Refuse a ledger path starting with ``~`` that does not exist as given: Python does not expand it
    (``RoyaltyLedger("~/l.jsonl")`` created ``./~/l.jsonl``; issue 22). ``creating``: the ledger would be
    created there (:class:`OutputPathError`), else it is looked for (:class:`LedgerNotFoundError`)."""
    home = unexpanded_home_problem(path, "the ledger", creating=creating)
    if home is not None:
        raise (OutputPathError if creating else LedgerNotFoundError)(home)


def _hash_content(content: bytes | str) -> str:
    data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
            (:func:`datavalue._files.inside_run_problem`), or at a path starting with ``~`` (Python does not
            expand it: :func:`datavalue._files.unexpanded_home_problem`); nothing is written.
        LedgerNotFoundError: ``create=False`` and no ledger at ``path`` (one starting with ``~``: said so).

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
        _refuse_home(path, creating=create)
        # absolute now: a relative path must keep naming this ledger after os.chdir (P8-07); links are kept
        self.path = Path(os.path.abspath(os.fspath(path)))
        if currency is not None:  # printed in every statement, report and CLI summary line
            if not isinstance(currency, str) or not currency:
                raise LedgerError(f"currency must be a currency code such as 'USD' (a non-empty str); got {currency!r}.")
            _record_checks.check_id_text(currency, "currency", LedgerError)
        self.currency = currency or "USD"
        self.lock_timeout = float(lock_timeout)
        self._key = _anchor.parse_key(key)
        self._keyed = self._key is not None
        self._count = 0
        self._size = 0
        self._ids: set[str] = set()
        self._last_time: _dt.datetime | None = None  # the latest row timestamp (record() refuses earlier ones)
        self._warned: set[str] = set()
        self._closed = False
        if self.path.is_dir():
            raise LedgerError(
                f"{self.path} is a directory; a royalty ledger is one JSON-lines file. Pass the ledger's file "
                f"(e.g. {self.path / 'ledger.jsonl'})."
            )
        if self.path.exists() and self.path.stat().st_size > 0:
            header = self._read_header()  # the header, currency and key first: a refusal moves nothing
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
            if repair:
                self._repair()
            self._adopt(self._scan())
        elif create:
            inside = inside_run_problem(self.path, "a new royalty ledger (with its head and lock files)")
            if inside is not None:
                raise OutputPathError(inside)
            _recovery.refuse_orphan_head(self.path)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                _refuse_unwritable(self.path, exc)
                raise
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
            try:
                self._write_head()  # first: a crash before the header leaves a 0-row head, never a headless ledger
            except OSError as exc:
                _refuse_unwritable(self.path, exc)
                raise
            self.path.write_text(json.dumps(header, sort_keys=True) + "\n", encoding="utf-8")
            self._size = self.path.stat().st_size
        else:
            raise LedgerNotFoundError(f"ledger {self.path} does not exist.")

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
        with open(self.path, encoding="utf-8", errors="replace") as f:  # not UTF-8: "not a royalty ledger"
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

    def _scan_once(self, head_text: str | None, raw: bytes | None = None) -> _Scan:
        """One read of the ledger against the head file's text ``head_text`` (read before it);
        ``raw``: check these bytes instead of the file's (what a repair would leave)."""
        raw = self.path.read_bytes() if raw is None else raw
        _recovery.refuse_torn_tail(self.path, raw, head_text=head_text if self._check_anchor else None)
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
        if not self._check_anchor:
            return None  # re-anchoring: the head is neither read nor compared (it may be unreadable)
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
        self._last_time = max((r.timestamp for r in rows), default=None)  # a back-dated row is never the bound
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
    def recover(cls, path: str | os.PathLike[str], *, lock_timeout: float = 10.0) -> Path | None:
        """Move a torn final line to ``<ledger>.torn-<UTC time>``; keep every complete row.

        Returns the file holding the torn bytes, or ``None`` when the last line was whole (a whole
        last line missing only its newline gets the newline, with a warning). Nothing is dropped
        silently: the torn bytes are kept beside the ledger and logged. A line the head file
        records as a row (damaged after it was written) is never moved aside: that would leave
        the ledger truncated. It holds ``<ledger>.lock`` (waiting up to ``lock_timeout`` seconds),
        so it never moves a line a live writer is still writing. A refusal changes no file.

        Raises:
            LedgerNotFoundError: there is no ledger at ``path``.
            LedgerError: the file is not a royalty ledger (no ledger header on its first line), the head
                file records the torn line as a row (restore from backup), or another writer holds the lock.
        """
        _refuse_home(path, creating=False)
        return _recovery.recover(Path(path), lock_timeout=lock_timeout)

    def _repair(self) -> None:
        """``repair=True``: check the ledger as :meth:`recover` would leave it, then recover it, so a
        ledger refused for another reason (a damaged row, rows missing against the head) keeps its
        torn line where it was."""
        for attempt in range(self._RESCANS):
            head_text = self._read_head_text()
            raw = self.path.read_bytes()
            kept = _recovery.bytes_kept(self.path, raw, head_text=head_text)
            try:
                self._scan_once(head_text, raw=raw[:kept])
                break
            except _anchor.BeyondHeadError:
                if attempt + 1 == self._RESCANS or self._read_head_text() == head_text:
                    raise
        self.recover(self.path, lock_timeout=self.lock_timeout)

    @classmethod
    def reanchor(
        cls, path: str | os.PathLike[str], *, key: bytes | str | None = None, lock_timeout: float = 10.0
    ) -> RoyaltyLedger:
        """Rewrite the head file from the ledger as it is now (after checking it by hand).

        For a ledger restored from backup, or one whose head file was lost. It makes the
        current rows the anchored truth, so use it only on a ledger you trust: this is exactly
        what an attacker who rewrote the file would do, which the key (kept elsewhere) stops.

        The ledger is read and checked (header, chain, with ``key=`` every MAC; the head file is
        neither read nor compared) and ``<ledger>.lock`` taken (waiting up to ``lock_timeout``
        seconds) before anything is written; then the old head is copied to
        ``<ledger>.head.replaced-<UTC time>`` and the new one replaces it atomically. A refusal (no
        ledger, not a ledger, a torn last line, a damaged row, a wrong key, another writer's lock)
        changes no file.

        Raises:
            LedgerNotFoundError: there is no ledger at ``path``.
            LedgerError: the ledger cannot be read as it is (see above), or another writer holds the lock.
        """
        path = Path(path)
        led = cls.__new__(cls)
        led._check_anchor = False  # the head is what we are about to write: not read, not compared
        led.__init__(path, create=False, key=key, lock_timeout=lock_timeout)  # type: ignore[misc]
        with led._locked(action="reanchor"):
            led._catch_up()  # rows appended since it was read are anchored too
            aside = _recovery.copy_head_aside(path)
            try:
                led._write_head()
            except BaseException:  # the old head is still in place: drop its copy, change nothing
                if aside is not None:
                    with contextlib.suppress(OSError):
                        aside.unlink()
                raise
        led._check_anchor = True
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
        allow_backdated: bool = False,
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
            revenue: revenue of this output (``Decimal``, ``int`` or text, on the cent grid): text is plain
                decimal digits with at most one point and an optional sign (``"12.50"``; ``"1e3"``, ``"1_000"``,
                ``" 5 "``, ``"NaN"`` are refused), and amounts must be below ``10**30``.
            owners: owner id of each player, in player order: a list (or tuple, array) of
                non-empty strings; nothing is converted (``None``, a string to split, a set are refused).
            result: a :class:`ShapleyResult` or per-owner values.
            utilities: ``(2**n,)`` coalition utilities.
            content: the output's bytes or text (hashed; the content itself is not stored).
            output_hash: a precomputed content hash instead of ``content``.
            royalty_rate: the owners' contractual share rho in ``[0, 1]`` (text as for ``revenue``).
            policy: royalty policy id.
            timestamp: when the output was sold (defaults to now, UTC). Refused when earlier than the
                ledger's last row (it would change periods whose statements may be issued) or later
                than now plus 5 minutes (``_record_checks.FUTURE_SKEW``), unless ``allow_backdated``.
            model_fingerprint: identifies the generating model.
            run_fingerprint: identifies the training run / coalition models / store.
            allow_backdated: accept a timestamp before the last row's or ahead of the clock (a
                deliberate correction of a closed period: re-issue its statements).
        """
        output_id = _record_checks.parse_output_id(output_id)
        if self._closed:
            raise LedgerError(f"this handle on {self.path} is closed; open a new RoyaltyLedger.")
        if self._key is None and self._keyed:
            raise LedgerError(
                f"{self.path} is a keyed ledger (every row carries an HMAC); pass key= to append."
            )
        self._refuse_duplicate(output_id)  # early, before the split; checked again when locked
        row = _record_checks.parse_row_inputs(
            owners=owners,
            result=result,
            utilities=utilities,
            content=content,
            output_hash=output_hash,
            revenue=revenue,
            royalty_rate=royalty_rate,
        )
        owners, values, stderr, method, u = row.owners, row.values, row.stderr, row.method, row.utilities
        revenue_d, rate, pool = row.revenue, row.royalty_rate, row.pool
        pol = get_policy(policy)
        split: RoyaltySplit = split_royalties(values, pool=pool, policy=pol)
        rec = GenerationRecord(
            seq=-1,  # seq and prev_hash are set under the lock, after catching up
            output_id=output_id,
            output_hash=output_hash if output_hash is not None else _hash_content(content),  # type: ignore[arg-type]
            prompt=str(prompt),
            timestamp=_dt.datetime.now(_dt.UTC) if timestamp is None else parse_timestamp(timestamp),
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
            values=tuple(float(x) + 0.0 for x in values),  # + 0.0: a -0.0 is stored (and printed) as 0.0
            stderr=tuple(float(x) + 0.0 for x in stderr),
            shares=split.shares,
            amounts=split.amounts,
            unallocated=split.unallocated,
            no_positive=split.no_positive,
            prev_hash="",
        )
        with self._locked():
            self._catch_up()
            self._refuse_duplicate(output_id)
            when = _record_checks.check_timestamp(None if timestamp is None else rec.timestamp, self._last_time,
                                                  now=_dt.datetime.now(_dt.UTC), allow_backdated=allow_backdated,
                                                  path=self.path)
            rec = dataclasses.replace(rec, seq=self._count, prev_hash=self._head, timestamp=when)
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
        self._unshare()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._head = rec.row_hash
        self._count += 1
        self._size += len(line.encode("utf-8"))
        self._ids.add(rec.output_id)
        self._last_time = max(rec.timestamp, self._last_time or rec.timestamp)
        self._write_head()

    def _unshare(self) -> None:
        """Give the ledger its own inode before appending when another directory shares it (a
        hard-link snapshot, ``cp -al``): a copy renamed over it, so the snapshot keeps its rows and
        stays consistent with its own head file. Call with the lock held."""
        unshare(_anchor.real(self.path))

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

    def _locked(self, action: str = "append") -> contextlib.AbstractContextManager[None]:
        """Hold ``<ledger>.lock`` (O_CREAT | O_EXCL, naming pid and host) for one append (or ``action``)."""
        return _anchor.hold_lock(self.path, timeout=self.lock_timeout, action=action)

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
