"""What a resumed :class:`~datavalue.capture.Recorder` checks, and what every flush vouches for.

The run's side of these checks (the weights digest, the optimizer state the last step left) is
``datavalue.capture._resume``; :class:`ResumeChecks` is the recorder's side: it asks rank 0, tells
every rank the answer so that all refuse together, and stores the digest after a flush.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datavalue.errors import RecorderStateError, StoreCorruptError, StoreMismatchError

# the Recorder's own logger: what these checks say keeps the source it had when they were Recorder code
logger = logging.getLogger("datavalue.capture.recorder")

#: What a refused resume adds to its error: the recorder closed itself (see ``ResumeChecks._abandon_resume``).
CLOSED = ("This Recorder was closed (nothing written, its lock released): fix the weights or the optimizer's state, "
          "then create a new Recorder(..., resume=True).")


class ResumeChecks:
    """The resume checks of a recorder.

    The recorder provides ``path``, ``model``, ``optimizer``, ``writer``, ``n_steps``, ``_dist`` (its
    ``DistInfo``), ``_sink`` (its ``StepSink``), ``_resume_weights`` (``True`` until the weights of a
    resumed run were checked, before its first block), ``checkpoint_every`` and ``close()``.

    A refused resume (weights or optimizer state at the first block, the optimizer's state at the first
    update) closes the recorder (:meth:`_abandon_resume`) before the error is raised.
    """

    path: Path
    model: Any
    optimizer: Any
    writer: Any
    n_steps: int
    _dist: Any
    _sink: Any
    _resume_weights: bool
    checkpoint_every: int | None
    close: Callable[[], None]

    def _resumed_state(self, resume: bool) -> str | None:
        """On resume: the optimizer state the run's last step left, in words (rank 0 reads the run; every rank
        learns whether there is one, so that all refuse a fresh optimizer's first update together)."""
        if not resume:
            return None
        from datavalue.capture._resume import resumed_optimizer_state

        said = resumed_optimizer_state(self.path, self.n_steps) if self._dist.rank == 0 else None
        if self._dist.broadcast_int(int(said is not None)) and said is None:
            said = "optimizer state (see rank 0)"
        return said

    def _resumed_count(self, resume: bool) -> int | None:
        """On resume: the Adam step count the run's last step left (rank 0 reads the run and tells every
        rank), or ``None``; the first update refuses an optimizer state holding another count (P8-10)."""
        if not resume:
            return None
        from datavalue.capture._resume import resumed_adam_count

        count = resumed_adam_count(self.path, self.n_steps) if self._dist.rank == 0 else None
        count = self._dist.broadcast_int(-1 if count is None else count)
        return None if count < 0 else count

    def _resume_expectations(self, resume: bool) -> dict[str, Any]:
        """What the optimizer's first update after a resume must find (``UnrecordedGradients``'s keywords):
        the state the run's last step left, its Adam step count, and what to do when that update refuses the
        resume (:meth:`_abandon_resume`)."""
        return {"resumed_state": self._resumed_state(resume), "resumed_count": self._resumed_count(resume),
                "on_resume_refused": self._abandon_resume if resume else None}

    def _abandon_resume(self) -> None:
        """A resume check refused: close this recorder without vouching for anything (no weights or optimizer
        digest, no checkpoint: they would record the refused weights or state as the run's), so that nothing of
        it stays registered (no exit-hook warning), its writer lock is released and its model can be given to a
        new ``Recorder(..., resume=True)`` once the weights or state are fixed (issue 22)."""
        self._resume_weights = True  # _record_weights vouches for nothing
        self.checkpoint_every = None  # close() would rewrite the run's last checkpoint from them
        try:
            self.close()
        except Exception as exc:  # the refusal is what the caller must see; this is logged
            logger.warning("%s: closing the recorder after its resume was refused failed: %r", self.path, exc)

    def _check_resume_weights(self) -> None:
        from datavalue.capture._resume import check_resume_optimizer, check_resume_weights

        err = None
        if self._dist.rank == 0:
            try:
                marked = self.writer is not None and self.writer.keeps_weights_digest
                what = check_resume_weights(self.path, self.model, self.n_steps, marked=marked)
                if what == "matched":  # the optimizer's state too, recorded at the same flush
                    check_resume_optimizer(self.path, self.model, self.optimizer, self.n_steps)
            except (StoreMismatchError, StoreCorruptError) as exc:
                err = exc
            else:
                if what == "unchecked":
                    logger.info("%s: resuming after %d steps; the run was not flushed at that step (killed after its "
                                "last flush?), so the model's weights could not be checked", self.path, self.n_steps)
                elif what == "no digest" and self.n_steps > 0:
                    logger.warning("%s: resuming after %d steps; the run holds no weights digest (recorded without "
                                   "optimizer=, or by a datavalue version before it was kept), so whether the model "
                                   "holds the weights the run reached cannot be checked", self.path, self.n_steps)
        ok = self._dist.broadcast_int(0 if err is None else -1)
        if ok < 0:
            self._abandon_resume()
        if err is not None:
            err.args = (f"{err} {CLOSED}",)
            raise err
        if ok < 0:
            raise RecorderStateError(f"rank 0 refused to resume the run with these weights (see its error); this rank "
                                     f"stops too. {CLOSED}")
        self._resume_weights = False

    def _record_weights(self) -> None:
        """After a flush: the digest of the weights after the run's committed steps (with ``optimizer=``,
        when the last written step's update has run; a step waiting for its update is not written)."""
        if self.optimizer is None or self._dist.rank != 0 or self._resume_weights:
            return  # (a resumed recorder that has not checked the weights has nothing new to vouch for)
        from datavalue.capture._resume import optimizer_state_digest, record_digest, weights_digest

        held = self._sink.held is not None
        # the optimizer's state: after the update of the last written step (a held step's has not run)
        record_digest(self.path, self.n_steps - int(held), weights_digest(self.model),
                      optimizer=optimizer_state_digest(self.model, self.optimizer))
        if self.writer is not None:  # after the member: a run that says so and lacks it was damaged
            self.writer.mark_weights_digest()
