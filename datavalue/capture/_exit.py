"""A recorder its script never closes is closed when the interpreter exits (or when it is collected).

:class:`ClosesAtExit` is the part of :class:`~datavalue.capture.Recorder` (and so of
:class:`~datavalue.capture.FinalPass`) and of :class:`~datavalue.capture.jax.JaxRecorder` that
does it: the recorder adds itself to :data:`_OPEN` with :func:`_register_at_exit` when it opens
and takes itself out in ``close()``; at a normal exit :func:`_close_all_at_exit` commits what each
one still holds, through :meth:`ClosesAtExit._close_for_exit` (a subclass says how it closes then:
``FinalPass`` marks itself unfinished), and warns. See
"Durability" in the README.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any


class ClosesAtExit:
    """Closing a recorder that was never closed: at the interpreter's exit, or when it is garbage-collected.

    The recorder provides ``writer`` (its ``RunWriter``, or ``None`` on a rank that writes nothing),
    ``path``, ``closed`` and ``close()``.
    """

    writer: Any
    path: Path
    closed: bool

    def __del__(self) -> None:  # best effort: never lose queued steps
        try:
            if not self.closed:
                self._close_unclosed("when it was garbage-collected", warn_empty=False)
        except Exception:
            pass

    def _close_for_exit(self) -> None:
        """How a recorder its script never closed is closed (:meth:`_close_unclosed`)."""
        self.close()

    def _close_unclosed(self, when: str, *, warn_empty: bool = True) -> None:
        """Close a recorder that was never closed (at the interpreter's exit, or when collected) and say
        so on stderr, with how many steps this commit saved."""
        writer = self.writer
        before = writer.steps if writer is not None else 0
        self._close_for_exit()
        if writer is None:
            return
        saved = writer.steps - before
        if saved or warn_empty:
            import warnings

            warnings.warn(
                f"{type(self).__name__}({str(self.path)!r}) was never closed: committed {saved} steps {when} (the run "
                f"has {writer.steps}); call rec.close() (or use `with {type(self).__name__}(...) as rec:`): a kill "
                "loses what a recorder holds uncommitted.", RuntimeWarning, stacklevel=2)


#: The open recorders: ``id -> (weak reference, pid of the process that opened it)``. Weak: the exit hook
#: keeps no recorder alive (one collected was closed by its ``__del__``).
_OPEN: dict[int, tuple[weakref.ref[ClosesAtExit], int]] = {}
_HOOKED: list[bool] = []
#: Seconds the exit hook waits for a recorder's writer thread to commit (then it gives up and says so).
EXIT_TIMEOUT = 300.0


def _register_at_exit(rec: ClosesAtExit) -> None:
    """Add ``rec`` to the recorders the exit hook closes; install the hook once per process.

    The hook runs with the interpreter's thread-exit hooks (``threading._register_atexit``, as
    ``concurrent.futures`` does), before those shut down the thread pools zarr writes through; plain
    ``atexit`` runs too late for that. Registered after zarr imported ``concurrent.futures``, it runs
    before its shutdown (they run in reverse order)."""
    _OPEN[id(rec)] = (weakref.ref(rec), os.getpid())
    if not _HOOKED:
        import threading

        try:
            threading._register_atexit(_close_all_at_exit)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # not in this Python, or already shutting down
            import atexit

            atexit.register(_close_all_at_exit)
        _HOOKED.append(True)


def _close_all_at_exit() -> None:
    """At a normal interpreter exit: commit and close every recorder its script never closed, with a
    warning. Nothing in a forked child (the parent's recorders are not its own)."""
    import sys

    for key, (ref, pid) in list(_OPEN.items()):
        _OPEN.pop(key, None)
        rec = ref()
        if rec is None or rec.closed or os.getpid() != pid:
            continue
        try:
            if rec.writer is not None:  # a writer thread that is stuck must not hang the exit
                rec.writer.close_timeout = EXIT_TIMEOUT
            rec._close_unclosed("at exit")
        except Exception as exc:  # at exit nobody can catch it: say what was lost
            print(f"datavalue: {type(rec).__name__}({str(rec.path)!r}) was never closed and could not be committed "
                  f"at exit: {exc!r}", file=sys.stderr)
