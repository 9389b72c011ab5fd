"""Recovering a royalty ledger's file: a torn last line, a head file without its ledger, re-anchoring.

:class:`~datavalue.shapley.royalties.RoyaltyLedger` (``_ledger.py``) reads and appends rows and keeps
the hash chain; ``_anchor.py`` owns the head file, the lock and the MAC. This module decides about,
and repairs, what an interrupted append, a lost file or a restore from backup leaves behind:

* a torn last line (:func:`torn_tail`): bytes after the last newline that are not a JSON object, or
  a last line that is not JSON, as a crash mid-append leaves it. Every read refuses it
  (:func:`refuse_torn_tail`, naming the line and a writer that holds the lock);
  :func:`recover` (``RoyaltyLedger.recover``) moves it aside to ``<ledger>.torn-<time>``. A torn
  line that the head file counts as a row was whole when written and damaged later: both refuse it,
  since moving it aside would leave the ledger truncated;
* a head file that records rows where the ledger is missing or empty (:func:`refuse_orphan_head`):
  starting a new ledger over it would hide that rows were written;
* re-anchoring (``RoyaltyLedger.reanchor``): once the ledger was read and checked and the lock taken,
  the old head file is copied aside (:func:`copy_head_aside`) and the head written again from the rows
  as they are.

A refusal changes no file: ``recover`` checks that the file is a ledger (:func:`refuse_not_a_ledger`)
and takes the ledger's lock before it moves anything; ``RoyaltyLedger(path, repair=True)`` first checks
the rows that :func:`bytes_kept` says recovering keeps.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path

from datavalue._files import atomic_write
from datavalue.shapley._errors import LedgerError, LedgerNotFoundError
from datavalue.shapley.royalties import _anchor

__all__ = [
    "bytes_kept",
    "copy_head_aside",
    "recover",
    "refuse_not_a_ledger",
    "refuse_orphan_head",
    "refuse_torn_tail",
    "torn_tail",
]

logger = logging.getLogger(__name__)


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


def torn_tail(raw: bytes) -> tuple[int, int] | None:
    """``(line number, byte offset)`` of a torn final line in the ledger bytes ``raw``, or ``None``.

    Torn: bytes after the last newline that are not a JSON object (a crash mid-write), or a
    last line that is not JSON. Only the final line can be torn; a bad line before it is a
    damaged ledger. A last line that is a whole JSON object missing only its newline (a write
    cut one byte short, an editor that strips the final newline) is no torn line: no proper
    prefix of a row's JSON parses, and the chain and the head check it as the row it is; the
    next append (or :func:`recover`) writes the newline.
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


def refuse_torn_tail(path: Path, raw: bytes, *, head_text: str | None) -> None:
    """Refuse the ledger ``path`` read as ``raw`` when its last line is torn.

    ``head_text`` is the head file's text read before ``raw`` (``None``: not consulted, as when
    re-anchoring); a torn line it counts as a row is refused as damaged, not as a crash's leftover.

    Raises:
        LedgerError: the last line is torn (say how to recover), or damaged after it was written.
    """
    torn = torn_tail(raw)
    if torn is None:
        return
    lineno, cut = torn
    _refuse_damaged_row(
        f"{path}:{lineno} is not a ledger row: the last line is torn (cut short or not JSON), but the head "
        f"file {_anchor.head_path(path).name}", _head_rows(head_text), _rows_before(raw, cut),
        "Restore the ledger from backup (RoyaltyLedger.recover would leave it truncated).")
    holder = _anchor.read_lock(path)
    busy = (
        f" (a writer, pid {holder.get('pid')} on {holder.get('host')!r}, holds the lock: "
        "the line may still be being written; retry first)"
        if holder is not None
        else ""
    )
    raise LedgerError(
        f"{path}:{lineno} is not a ledger row: the last line is torn (cut short or "
        f"not JSON), as a crash during an append leaves it{busy}. Every row before it is "
        f"intact. RoyaltyLedger.recover({str(path)!r}) (or RoyaltyLedger(path, "
        "repair=True)) moves the torn tail to <ledger>.torn-<time> and keeps them; if "
        "no append was interrupted, restore from backup instead."
    )


def refuse_orphan_head(path: Path) -> None:
    """Refuse to start a new ledger at ``path`` where a head file says rows were written: the ledger
    was deleted, emptied or moved, and a fresh head would hide that for good."""
    text = _anchor.read_head_text(path)
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
        f"ledger {path} is {'empty' if path.exists() else 'missing'}, but its head file "
        f"{_anchor.head_path(path)} {said}: the ledger was deleted, emptied or moved, and starting a new one "
        "here would hide that. Restore the ledger from backup (or open it where it now is); to "
        "start a new ledger at this path, move the head file away first."
    )


def refuse_not_a_ledger(path: Path, raw: bytes) -> None:
    """Refuse to repair ``path`` (read as ``raw``) unless its first line is a ledger's header: the
    ledger's rule for a torn last line would cut the last line off any other file (a CSV, notes).

    A file whose only line is cut short and starts like a JSON object is let through (a header cut
    short when the ledger was created; recovering moves it aside).
    """
    lines = raw.split(b"\n")
    whole = [ln for ln in lines[:-1] if ln.strip()]  # lines a newline ends
    first = whole[0] if whole else lines[-1].strip()
    if not first:
        return  # empty: nothing to recover
    try:
        header = json.loads(first)
    except (ValueError, UnicodeDecodeError, RecursionError):
        if not whole and first.startswith(b"{"):
            return  # the header itself was cut short
        header = None
    if not isinstance(header, dict) or header.get("schema") != _anchor.LEDGER_SCHEMA:
        raise LedgerError(
            f"{path} is not a royalty ledger (expected a header with schema {_anchor.LEDGER_SCHEMA!r} on line 1), "
            "so there is no torn ledger line to move aside; nothing was changed. Pass the ledger's file."
        )


def bytes_kept(path: Path, raw: bytes, *, head_text: str | None) -> int:
    """How many leading bytes of the ledger ``path`` (read as ``raw``, after the head file's text
    ``head_text``) :func:`recover` keeps: all of them, or those before a torn last line.

    Raises:
        LedgerError: the head file records the torn line as a row (recovering would truncate the ledger).
    """
    torn = torn_tail(raw)
    if torn is None:
        return len(raw)
    lineno, cut = torn
    _refuse_damaged_row(
        f"{path}:{lineno} is torn (cut short or not JSON), but the head file {_anchor.head_path(path).name}",
        _head_rows(head_text), _rows_before(raw, cut),
        "Moving it aside would leave the ledger truncated, so nothing was moved. Restore the ledger from backup.")
    return cut


def recover(path: Path, *, lock_timeout: float = 10.0) -> Path | None:
    """The body of :meth:`RoyaltyLedger.recover` (see there): move a torn final line aside, or add a
    whole last line's missing newline, holding the ledger's lock. Returns the file holding the torn
    bytes, or ``None``. Every refusal comes before the first change."""
    if path.is_dir():
        raise LedgerError(f"{path} is a directory; a royalty ledger is one JSON-lines file. Pass the ledger's file.")
    if not path.exists():
        raise LedgerNotFoundError(f"ledger {path} does not exist; there is nothing to recover.")
    refuse_not_a_ledger(path, path.read_bytes())
    with _anchor.hold_lock(path, timeout=lock_timeout, action="recover"):  # never cut a line a live writer is writing
        return _recover_locked(path)


def _cannot_recover(path: Path, step: str, exc: OSError, changed: str = "nothing was changed") -> LedgerError:
    """The error for an OS refusal while recovering (a read-only ledger file, a full disk): what failed, that the
    ledger is as it was, how to fix it (issue 22: the raw ``OSError`` came through)."""
    return LedgerError(
        f"cannot recover the ledger {path}: {step} failed ({exc.strerror or exc}); {changed}. Make the ledger and its "
        "directory writable (or free space), or copy the ledger and its head file to a writable place and recover "
        "the copy there."
    )


def _shared(path: Path) -> bool:
    """Whether another directory shares the ledger's file (a hard-link snapshot: ``st_nlink > 1``)."""
    return os.stat(_anchor.real(path)).st_nlink > 1


def _rewrite(path: Path, data: bytes) -> None:
    """Replace the ledger's file by ``data`` through a temporary (fsynced, then renamed over it, as
    ``RoyaltyLedger._unshare`` does before an append): the file gets its own inode, and a snapshot
    sharing the old one keeps its bytes. Call with the ledger's lock held."""
    target = _anchor.real(path)
    with atomic_write(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        shutil.copymode(target, tmp)


def _recover_locked(path: Path) -> Path | None:
    head_text = _anchor.read_head_text(path)  # before the rows, as every read (RoyaltyLedger._scan)
    raw = path.read_bytes()
    refuse_not_a_ledger(path, raw)
    cut = bytes_kept(path, raw, head_text=head_text)
    if cut == len(raw):
        if raw and not raw.endswith(b"\n"):
            try:
                if _shared(path):
                    _rewrite(path, raw + b"\n")
                else:
                    with open(path, "ab") as f:
                        f.write(b"\n")
                        f.flush()
                        os.fsync(f.fileno())
            except OSError as exc:
                raise _cannot_recover(path, "adding the last line's missing newline", exc) from exc
            logger.warning("ledger %s: its last line %d is whole but had no final newline; added the newline",
                           path, raw.count(b"\n") + 1)  # fmt: skip
        return None
    lineno = raw.count(b"\n", 0, cut) + 1
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    aside = _anchor.sidecar(_anchor.real(path), f".torn-{stamp}")
    made = False
    try:
        f = open(aside, "xb")  # noqa: SIM115 (a name that exists is never ours to remove below)
        made = True
        with f:
            f.write(raw[cut:])
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # the directory is read-only, the disk full: the torn line stays where it was
        if made:
            with contextlib.suppress(OSError):
                aside.unlink()
        raise _cannot_recover(path, f"keeping the torn line {lineno} in {aside.name}", exc) from exc
    try:
        if _shared(path):  # a hard-link snapshot (cp -al) shares the file: keep its bytes as they are
            _rewrite(path, raw[:cut])
        else:
            with open(path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
    except OSError as exc:  # the ledger file is read-only: it still holds the torn line, so drop the copy
        with contextlib.suppress(OSError):
            aside.unlink()
        raise _cannot_recover(path, f"cutting the torn line {lineno} off the ledger", exc) from exc
    logger.warning(
        "ledger %s: moved the torn line %d (%d bytes) to %s",
        path,
        lineno,
        len(raw) - cut,
        aside,
    )
    return aside


def copy_head_aside(path: Path) -> Path | None:
    """Copy the ledger's head file (if any) to ``<ledger>.head.replaced-<UTC time>`` before it is
    re-anchored (the head stays in place until the new one replaces it atomically); returns the
    copy, or ``None`` when there was no head.

    Raises:
        LedgerError: the head file cannot be read (nothing was written).
    """
    head = _anchor.head_path(path)
    old = _anchor.sidecar(head, f".replaced-{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%S%fZ}")
    try:
        data = head.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(
            f"cannot read the head file {head} to keep it as {old.name} ({exc.strerror or exc}); nothing was "
            "changed. Make it readable (or move it away yourself), then re-anchor."
        ) from None
    f = open(old, "xb")  # noqa: SIM115 (a name that exists is never ours to remove below)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, an interrupt: no half copy left beside the ledger
        with contextlib.suppress(OSError):
            old.unlink()
        raise
    return old
