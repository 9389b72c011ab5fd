"""Whether derived data, and a final pass, belong to this run and to this copy of its history.

Every derived array (an embedding build, an influence build, a replay, a checkpoint array) carries the
run's id and a stamp of its resume history (:func:`~datavalue.store.create_array` writes both);
:func:`foreign_derived` refuses one copied in from another run, :func:`forked_derived` one built on
another copy of the run (a fork resumed elsewhere), :func:`stale_final_pass` a final-weights pass that
no longer describes the run's final weights. Each returns the reason as a message, or ``None``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from datavalue.store._schema import (
    FINAL_RUN,
    LINEAGE_KEY,
    LINEAGE_STAMP_KEY,
    RUN_ID_KEY,
    lineage_stamp,
)

if TYPE_CHECKING:
    from datavalue.store._reader import Run

# the reader's logger: the notes these checks log keep the source they had in datavalue.store._reader
logger = logging.getLogger("datavalue.store._reader")


def foreign_derived(run: Run, name: str, *, fix: str) -> str | None:
    """Why the derived array or group ``name`` of ``run`` (an embedding build, an influence build, a
    replay, a checkpoint array) is not this run's, or None.

    :func:`create_array` stamps the run's id (:data:`RUN_ID_KEY`) on every derived array it writes;
    one carrying another id was copied in from another run, and its values describe other training
    even when its shape and bookkeeping match. ``fix`` (how to rebuild it) ends the message. Not
    checked: a run without an id (written before run ids), and derived data without one (written
    before derived data carried it): read with an INFO note, its other checks still apply.
    """
    run_id = run.run_id
    if run_id is None:
        return None
    try:
        found = run._group[name].attrs.get(RUN_ID_KEY)
    except KeyError:
        return None
    if found is None:
        logger.info("%s/%s carries no run id (written before derived data carried one); its run id is not checked",
                    run.path, name)
        return None
    if found != run_id:
        return (
            f"{run.path}/{name} was written for another run (run id {found!r}; this run's is {run_id!r}): it was "
            f"copied in from another run, so its values describe other training. {fix}"
        )
    return forked_derived(run, name, fix=fix)


def forked_derived(run: Run, name: str, *, fix: str, stamp: Any = None) -> str | None:
    """Why the derived data ``name`` (or the :data:`LINEAGE_STAMP_KEY` value ``stamp``) was built on
    another fork of ``run``'s history, or None.

    Two copies of one run (``cp -r a.zarr b.zarr``) share the run id; resumed separately, each
    appends its own entry to its history (:data:`LINEAGE_KEY`). Derived data record the history they
    were built after; the run's history must still start with it (a run resumed and trained further
    since only appends). Derived data without the stamp (written before it existed) are read with a
    warning, unchecked.
    """
    if stamp is None:
        try:
            stamp = run._group[name].attrs.get(LINEAGE_STAMP_KEY)
        except KeyError:
            return None
    if stamp is None:
        logger.warning("%s/%s records no resume history (written before datavalue kept one): whether it was built "
                       "on this copy of the run is not checked (a copied-and-resumed fork would pass)", run.path, name)
        return None
    try:
        n, digest = int(stamp[0]), str(stamp[1])
    except (TypeError, ValueError, IndexError):
        return (f"{run.path}/{name}: its {LINEAGE_STAMP_KEY} attribute is {stamp!r}, expected [n, sha256]; it was "
                f"edited or damaged, so which copy of the run it was built on is unknown. {fix}")
    history = run.lineage
    if n <= len(history) and lineage_stamp(history, n) == [n, digest]:
        return None
    return (
        f"{run.path}/{name} was built on another copy of this run: it has the run's id, but it was written after "
        f"{n} resume(s) whose history this run does not share (the run has {len(history)} resume(s), "
        f"{LINEAGE_KEY}). The run directory was copied (a fork) and both copies were resumed on different data, or "
        f"the run was restored from an older copy and resumed: its values describe the other copy's training. {fix}"
    )


def stale_final_pass(parent: Run, final: Run) -> str | None:
    """Why the final pass ``final`` no longer describes ``parent``'s final weights, or None.

    A :class:`~datavalue.capture.FinalPass` records the training run's committed step count
    (manifest ``integration["run_steps"]``); once the run was resumed and trained further, the pass
    (and its influence builds) describe a model that many steps old. The pass records too the
    training run's id (``integration["run_id"]``): a ``final/`` copied in from another run names another id."""
    parent_id, bound = parent.run_id, (final.manifest.get("integration") or {}).get("run_id")
    if final.is_final_pass and parent_id is not None and bound is not None and bound != parent_id:
        return (
            f"{final.path} is the final-weights pass of another run (run id {bound!r}; {parent.path} has "
            f"{parent_id!r}): it was copied in from another run, so it describes another model. Record the pass at "
            f"this run's final weights (FinalPass({str(parent.path)!r}, model, overwrite=True)) and rebuild with "
            f"datavalue.embeddings.build_influence({str(parent.path)!r}, overwrite=True)."
        )
    if final.is_final_pass and parent_id is not None and bound is not None:
        # the same run id: a copy of the run (a fork) resumed elsewhere has another history
        forked = forked_derived(parent, FINAL_RUN, stamp=(final.manifest.get("integration") or {}).get("run_lineage"),
                                fix=f"Record the pass at this run's final weights (FinalPass({str(parent.path)!r}, "
                                    f"model, overwrite=True)) and rebuild with datavalue.embeddings.build_influence("
                                    f"{str(parent.path)!r}, overwrite=True).")
        if forked is not None:
            return forked
    if final.is_final_pass and parent_id is not None and bound is None:
        logger.info("%s records no training-run id (written before it was stored); its run is not checked", final.path)
    if final.is_final_pass and final.final_pass_steps is None:
        logger.info("%s records no step count (written before it was stored); its freshness is not checked", final.path)
        return None
    steps = final.final_pass_steps
    if steps is None or steps == parent.n_steps:
        return None
    return (
        f"{final.path} was recorded at the weights after step {steps} of {parent.path}, but the run now has "
        f"{parent.n_steps} committed steps (trained further since): its influence would describe a model "
        f"{abs(parent.n_steps - steps)} steps away from the final one. Record the pass again at the final weights "
        f"(FinalPass({str(parent.path)!r}, model, overwrite=True)) and rebuild with "
        f"datavalue.embeddings.build_influence({str(parent.path)!r}, overwrite=True)."
    )
