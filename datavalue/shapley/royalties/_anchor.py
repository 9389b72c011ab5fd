"""What anchors a royalty ledger beside its file: the per-append lock and the head file with its HMAC.

:class:`~datavalue.shapley.royalties.RoyaltyLedger` (``_ledger.py``) owns the rows and the hash
chain; this module owns the two sidecar files and the keyed MAC:

* ``<ledger>.lock``: held for one append (:func:`hold_lock`, on :class:`datavalue._lock.LockFile`), created atomically
  and naming the writer's pid, host and a token; a lock left by a dead process on this host is
  taken over (with a warning), one from another host never is;
* ``<ledger>.head``: the row count and the last row hash, replaced atomically after every append
  (:func:`write_head`) and compared with the chain on every read (:func:`check_head`), so rows
  deleted from the end, a rewritten tail, or more than the one row an interrupted append leaves
  after the head, are refused;
* HMAC-SHA256 (:func:`mac`) of every row's hash and of ``"<rows>:<last hash>"`` in the head, with a
  key kept away from the ledger's disk.

See the module docstring of ``_ledger.py`` and ``docs/shapley.md`` (section 8) for the layers of
tamper evidence these make up.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from datavalue._lock import LockFile, read_holder
from datavalue.shapley._errors import LedgerError
from datavalue.shapley.royalties._records import GenerationRecord

logger = logging.getLogger(__name__)

LEDGER_SCHEMA = "datavalue.shapley.royalty-ledger"  # the header line of every ledger
HEAD_SCHEMA = "datavalue.shapley.royalty-ledger-head"
MAC = "hmac-sha256"


def sidecar(path: Path, suffix: str) -> Path:
    """The file ``<path><suffix>`` beside ``path``."""
    return path.with_name(path.name + suffix)


def real(ledger: str | os.PathLike[str]) -> Path:
    """The ledger file a path leads to (symbolic links and ``..`` resolved).

    The head file and the lock are named after this file, not after the path given, so every path
    to one ledger (``current.jsonl -> 2025.jsonl``) shares one lock and one head.
    """
    return Path(os.path.realpath(ledger))


#: the header field of a ledger created with a head file: its head may not go missing
ANCHOR_FIELD, ANCHOR_HEAD = "anchor", "head-file"


def owned_by(ledger: str | os.PathLike[str], path: str | os.PathLike[str]) -> str | None:
    """Which of the ledger's own files ``path`` is (``"ledger"``, ``"head file"``, ``"lock file"``,
    ``"file"`` for the aside and temporary files), or ``None`` when it is none of them.

    Matches by name beside the ledger (the path given and the file it leads to), through symbolic
    links and ``..``, and by inode (a hard link to the ledger, its head or its lock).
    """
    out = Path(os.path.realpath(path))
    given = Path(ledger)
    bases = {(Path(os.path.realpath(given.parent)), given.name), (real(given).parent, real(given).name)}
    for parent, name in bases:
        if out.parent != parent:
            continue
        o = out.name
        if o == name:
            return "ledger"
        if o == name + ".head":
            return "head file"
        if o == name + ".lock":
            return "lock file"
        if o.startswith((name + ".head.replaced-", name + ".head.tmp-", name + ".torn-")) or (
            o.startswith(name + ".lock.") and o.endswith(".partial")
        ):
            return "file"  # a replaced head, a head being written, a torn line, a lock being made
    for what, mine in (("ledger", given), ("head file", head_path(given)), ("lock file", lock_path(given))):
        with contextlib.suppress(OSError):
            if os.path.samefile(path, mine):
                return what
    return None


def parse_key(key: bytes | str | None) -> bytes | None:
    if key is None:
        return None
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not data:
        raise LedgerError("key must be non-empty bytes or text; got an empty key.")
    return data


def mac(key: bytes, message: str) -> str:
    return MAC + ":" + hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and ``os.replace``."""
    tmp = sidecar(path, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no temporary left beside the ledger
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# ---------------------------------------------------------------------- the head file


def head_path(ledger: Path) -> Path:
    """The head file ``<ledger>.head`` anchoring the row count and the last hash (beside the file
    a link leads to)."""
    return sidecar(real(ledger), ".head")


def read_head_text(ledger: Path) -> str | None:
    """The head file's text, or ``None`` when there is none."""
    hp = head_path(ledger)
    try:
        return hp.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"cannot read the head file {hp} ({exc}).") from None


class BeyondHeadError(LedgerError):
    """More rows follow the head file than one interrupted append leaves (:func:`check_head`).

    A reader that read the head just before other handles appended sees the same; it reads the head
    and the rows again before it believes this (``RoyaltyLedger._scan``)."""


def check_head(
    ledger: Path,
    *,
    header_hash: str,
    rows: Sequence[GenerationRecord],
    head_text: str | None,
    key: bytes | None,
    warn_once: Callable[..., None],
    required: bool = False,
) -> None:
    """Compare the chain with the head file: refuses truncation, a replaced tail and more rows after
    the head than one interrupted append leaves (:class:`BeyondHeadError`); one row after it is
    accepted with a warning (the next append re-anchors it).

    Args:
        ledger: the ledger file.
        header_hash: the chain hash of the ledger's header (the anchor of an empty ledger).
        rows: the rows read, verified against the chain.
        head_text: the head file's text read *before* the rows (:func:`read_head_text`).
        key: the HMAC key the ledger was opened with, if any.
        warn_once: ``warn_once(what, msg, *args)`` logs ``msg % (ledger, *args)`` once per handle.
        required: the ledger was created with a head file (its header says
            ``"anchor": "head-file"``), so a missing head is an error, not a warning.
    """
    hp = head_path(ledger)
    if head_text is None:
        if key is not None:
            raise LedgerError(
                f"keyed ledger {ledger} has no head file {hp.name}: rows may have been "
                "deleted from its end. Restore the head file (or the ledger) from backup."
            )
        if required:
            raise LedgerError(
                f"{ledger} has no head file {hp.name}, but it was created with one (its header "
                f"says {ANCHOR_FIELD!r}: {ANCHOR_HEAD!r}): rows may have been deleted from its end "
                f"({len(rows)} rows remain), e.g. the ledger was restored from an older backup without "
                "its head. Restore the head file with the ledger from backup; only after checking "
                "every row, RoyaltyLedger.reanchor(path) writes a new head from the rows as they are."
            )
        warn_once(
            "unanchored",
            "ledger %s has no head file: it is unanchored (the hash chain cannot show rows "
            "deleted from its end); the next append writes one",
        )
        return
    try:
        head = json.loads(head_text)
        n_head, h_head = int(head["rows"]), str(head["last_hash"])
        if head.get("schema") != HEAD_SCHEMA:
            raise ValueError(f"schema {head.get('schema')!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise LedgerError(
            f"{hp} is not a ledger head file ({exc}). Restore it from backup, or re-anchor "
            "with RoyaltyLedger.reanchor(path) after checking the ledger."
        ) from None
    if key is not None:
        got = head.get("mac")
        if not isinstance(got, str) or not hmac.compare_digest(got, mac(key, f"{n_head}:{h_head}")):
            raise LedgerError(
                f"head file {hp} has {'no' if got is None else 'a wrong'} MAC for this key: "
                "it was rewritten by someone without the key (rows may have been removed "
                "from the end), or the key is wrong. Restore from backup."
            )
    n = len(rows)
    if n < n_head:
        raise LedgerError(
            f"{ledger} was truncated: its head file {hp.name} records {n_head} rows "
            f"(last hash {h_head[:19]}...), the ledger has {n}. Rows were deleted from the "
            "end; restore the ledger from backup."
        )
    anchor = rows[n_head - 1].row_hash if n_head else header_hash
    if anchor != h_head:
        raise LedgerError(
            f"{ledger}: row {n_head - 1} has hash {anchor[:19]}..., but the head file "
            f"{hp.name} records {h_head[:19]}...: the chain was rewritten from that row on. "
            "Restore the ledger from backup."
        )
    if n > n_head + 1:
        raise BeyondHeadError(
            f"{ledger} has {n - n_head} rows beyond its head file {hp.name} (which records {n_head} "
            f"row{'' if n_head == 1 else 's'}, last "
            f"hash {h_head[:19]}...). An interrupted append leaves at most one row after the head (the row is "
            "written, then the head, one writer at a time), so these rows were added without the ledger's "
            "writer, or the head file was restored from an older backup than the ledger. Nothing was changed. "
            f"Check the rows seq {n_head}..{n - 1} (who is paid, and why), then accept them with "
            "RoyaltyLedger.reanchor(path), or restore the ledger and its head file from one backup."
        )
    if n > n_head:  # a crash between appending a row and replacing the head
        warn_once(
            "behind",
            "ledger %s has 1 row after its head (an append was interrupted); the next append re-anchors it",
        )


def write_head(ledger: Path, *, rows: int, last_hash: str, key: bytes | None) -> None:
    """Replace ``<ledger>.head`` atomically (with its MAC when ``key`` is given)."""
    head: dict[str, Any] = {
        "schema": HEAD_SCHEMA,
        "ledger": real(ledger).name,
        "rows": rows,
        "last_hash": last_hash,
    }
    if key is not None:
        head["mac"] = mac(key, f"{rows}:{last_hash}")
    write_atomic(head_path(ledger), json.dumps(head, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- the per-append lock
# The generic lock file (create atomically, name the holder, take over a dead one on this host
# safely, never another host's) is datavalue._lock.LockFile, shared with the run store.


def lock_path(ledger: Path) -> Path:
    """The writer's lock file ``<ledger>.lock`` (present only during an append; beside the file a
    link leads to)."""
    return sidecar(real(ledger), ".lock")


#: What a writer holding the lock for each action does, and what to do when the lock cannot be taken:
#: ``(busy hint, read-only hint)`` (issue 22: ``recover`` on a read-only directory said "Appending ...").
_LOCK_HINTS = {
    "append": ("It is appending: retry later, or raise lock_timeout.",
               "Appending writes the ledger, its head and its lock in that directory: copy them to a writable place "
               "and append there. Reading it where it is (statement, verify) works."),
    "recover": ("It is appending (the torn line may still be being written): retry when it has finished, or raise "
                "lock_timeout.",
                "RoyaltyLedger.recover moves the torn last line to <ledger>.torn-<time> in that directory and "
                "truncates the ledger in place, so nothing was changed: make the directory writable (or copy the "
                "ledger and its head file to a writable place and recover the copy there). Reading the ledger needs "
                "the torn line gone first."),
    "reanchor": ("It is appending: retry when it has finished, or raise lock_timeout.",
                 "RoyaltyLedger.reanchor keeps the old head file as <ledger>.head.replaced-<time> and writes a new "
                 "head in that directory, so nothing was changed: make the directory writable (or copy the ledger "
                 "and its head file to a writable place and re-anchor the copy there)."),
}


@contextlib.contextmanager
def hold_lock(ledger: Path, *, timeout: float, action: str = "append") -> Iterator[None]:
    """Hold ``<ledger>.lock`` (created atomically, naming pid and host) for one ``action`` (``"append"``,
    ``"recover"`` or ``"reanchor"``: what the messages say when the lock is busy or cannot be created)."""
    busy, read_only = _LOCK_HINTS[action]
    lock = LockFile(lock_path(ledger), subject=f"ledger {ledger}", error=LedgerError,
                    busy_hint=busy, read_only_hint=read_only)
    lock.acquire(timeout)
    try:
        yield
    finally:
        lock.release()


def read_lock(ledger: Path) -> dict[str, Any] | None:
    """Who holds ``<ledger>.lock`` (its JSON), or ``None`` when it is gone or being written."""
    return read_holder(lock_path(ledger))
