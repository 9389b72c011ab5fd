"""One no-update pass over the training data at the final weights, recorded into the run.

The trajectory embeddings answer "what did this occurrence do along the recorded training run";
a final-model influence function answers "which training data does the final model rely on"
(Koh & Liang 2017; EK-FAC influence as in Grosse et al. 2023 and kronfluence). Both need the same
sketched per-sample gradients; the second needs them at the *final* weights, once per training
example, plus the final model's curvature. :class:`FinalPass` records exactly that, with the run's
own sketch, into the child run ``<run>/final`` (a run of its own: ``datavalue.store.open_run``
reads it), from which :func:`datavalue.embeddings.build_influence` builds the preconditioned rows
that ``Attributor(run, model, kind="influence")`` scores with.

Conventions of the pass (whatever the run's loss reduction, so that the curvature and the rows
describe one objective):

* each example's row is the gradient of its **summed** loss ``L_z = s_z * l_z``: its share of the
  training objective ``J = sum_z L_z / sum_z s_z``, with ``s_z`` = its label-token count under
  ``loss_reduction="token_mean"`` (the Trainer's convention) and 1 otherwise;
* the row's stored ``weight`` is ``s_z``;
* with ``curvature="fisher"`` the Fisher pseudo-gradients ``f_z`` have ``E[f f^T] = GGN(L_z)``:
  one label drawn from the model per position that counts (``label_mask``), summed.

Example:
    >>> import os, tempfile, torch, datavalue
    >>> from datavalue.capture import FinalPass
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
    ...     with rec.step(sample_ids=range(8)):
    ...         torch.nn.functional.cross_entropy(model(x), y).backward()
    ...     opt.step(); opt.zero_grad()
    >>> with FinalPass(path, model) as fp:      # at the final weights, no update
    ...     with fp.batch(range(8)):
    ...         torch.nn.functional.cross_entropy(model(x), y).backward()
    >>> datavalue.store.open_run(os.path.join(path, "final")).n_rows
    8
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture._config import CaptureConfig
from datavalue.capture._engine import Engine
from datavalue.capture._gradients import engine_for_run
from datavalue.capture._pipeline import parse_sample_ids, step_weights
from datavalue.capture._run_setup import unwrap_model
from datavalue.capture.recorder import Recorder, StepHandle
from datavalue.errors import RecorderError, RecorderStateError, StoreReadOnlyError
from datavalue.store import FINAL_PASS_INTEGRATION, FINAL_RUN


def final_path(run: str | os.PathLike[str]) -> Path:
    """Where the final-weights pass of ``run`` lives (``<run>/final``, :data:`datavalue.store.FINAL_RUN`)."""
    return Path(run) / FINAL_RUN


class FinalPass(Recorder):
    """Record per-sample gradients (and Fisher pseudo-gradients) at the final weights, no update.

    Args:
        run: the recorded training run (``*.zarr``); the pass is written to ``<run>/final``.
        model: the model at the final weights, the architecture the run recorded (its fingerprint
            and capture plan are checked; the run's sketch is reused so that query gradients,
            trajectory rows and these rows share one space).
        curvature: ``"fisher"`` (default) also records true-Fisher pseudo-gradients for the
            curvature of :func:`~datavalue.embeddings.build_influence`; ``None`` records the
            gradients only (then only ``"empirical_fisher"`` and ``"none"`` can be built).
        fisher_samples: labels drawn per position for the Fisher pseudo-gradients.
        overwrite: replace an earlier pass.
        seed: seed of the Fisher label draws.
        background: write on a background thread.

    Use :meth:`batch` once per batch of training examples (every example once, or as often as you
    want it weighed); the block runs your forward and ``backward()`` of the loss **as it was
    stepped in training** (same reduction; pass ``tokens=`` under ``loss_reduction="token_mean"``).
    ``.grad`` is zeroed after each batch and no optimizer step is taken.
    """

    def __init__(
        self,
        run: str | os.PathLike[str],
        model: nn.Module,
        *,
        curvature: str | None = "fisher",
        fisher_samples: int = 1,
        overwrite: bool = False,
        seed: int = 0,
        background: bool = True,
    ) -> None:
        from datavalue.store import open_run

        parent = open_run(run)
        if not isinstance(parent.path, Path):  # a .zip archive, a URL or a zarr Store: open_run reads them only
            raise StoreReadOnlyError(
                f"{run} is an archive or a remote/in-memory store, which datavalue opens read-only; the final-weights "
                f"pass is written into the run (<run>/{FINAL_RUN}), so copy the run to a local directory (unzip the "
                "archive) and run FinalPass there."
            )
        if curvature not in (None, "none", "fisher"):
            raise RecorderError(f"FinalPass(curvature=...) must be 'fisher' or None, got {curvature!r}.")
        model = unwrap_model(model)  # DDP / DataParallel / torch.compile: the module inside, as the run recorded
        self._parent_manifest = dict(parent.manifest)
        engine_for_run(model, self._parent_manifest)  # fingerprint and capture plan, with a clear error
        recorded = CaptureConfig.from_manifest(self._parent_manifest)
        cfg = CaptureConfig(
            proj_dim=recorded.proj_dim, seed=recorded.seed, sketch=recorded.sketch, layers=recorded.layers,
            loss_reduction=recorded.loss_reduction, curvature=("fisher",) if curvature == "fisher" else (),
            storage_dtype=recorded.storage_dtype, fisher_samples=int(fisher_samples),
        )
        self.run_path = parent.path
        target = final_path(parent.path)
        if (target.exists() or target.is_symlink()) and not overwrite:
            from datavalue.store import what_is

            found = what_is(Path(target))
            if found != "run":  # not a pass datavalue wrote: overwrite=True would refuse it too
                raise RecorderError(
                    f"{target} exists and is {found}, not a final-weights pass: FinalPass writes its pass at "
                    f"<run>/{FINAL_RUN}, and replaces only a pass it wrote. Move or rename {target} and run again.")
            raise RecorderError(f"{target} already holds a final-weights pass; pass overwrite=True to replace it.")
        super().__init__(target, model, config=cfg, overwrite=overwrite, background=background,
                         integration={"name": FINAL_PASS_INTEGRATION, "run": str(parent.path),
                                      "run_steps": int(parent.n_steps),  # binds the pass to these steps
                                      # set True by a clean close() only: a pass cut short (an exception
                                      # in the with-block, kill -9) stays False and builds refuse it
                                      "complete": False,
                                      **({"run_id": parent.run_id,  # and to this run
                                          # and to this copy of it (a fork resumed elsewhere has another history)
                                          "run_lineage": parent.lineage_stamp()} if parent.run_id else {})})
        self._fisher_sum = True
        self._fisher_gen = torch.Generator(device="cpu").manual_seed(int(seed) + 104729)

    def _make_engine(self, model: nn.Module, **kw: Any) -> Engine:  # noqa: ARG002 - the run's engine, not a new split
        return engine_for_run(model, self._parent_manifest)

    @contextlib.contextmanager
    def batch(self, sample_ids: Any, *, tokens: Any = None, label_mask: Any = None) -> Iterator[None]:
        """Record one batch of training examples at the final weights (forward + backward inside).

        Args:
            sample_ids: the examples' ids, as the run recorded them.
            tokens: per-example label-token counts (runs with ``loss_reduction="token_mean"``).
            label_mask: ``(b, L)`` bool, the positions whose prediction enters each example's loss
                (sequence models; for a Hugging Face causal LM
                ``torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))``); default all.
        """
        self._check_open("fp.batch()")
        ids = parse_sample_ids(sample_ids)
        weights = step_weights(self.loss_reduction, ids.size, tokens)  # the user's loss: sum_z w_z l_z
        if self.loss_reduction == "token_mean":
            share = np.asarray(tokens.detach().cpu() if torch.is_tensor(tokens) else tokens, np.float64).reshape(-1)
        else:
            share = np.ones(ids.size)
        handle = StepHandle(self.n_steps, 1.0)
        with self._capture(ids, np.ones(ids.size), handle, label_mask if self.fisher else None) as captured:
            yield
        rows, fisher = captured
        safe = np.where(weights > 0, weights, 1.0)
        g = rows * torch.as_tensor(share / safe, dtype=rows.dtype, device=rows.device).unsqueeze(1)
        self._sink.submit(ids, share, g, fisher=fisher if self.fisher else None, lr=0.0, grad_scale=1.0)
        self.model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ finishing
    def close(self) -> None:
        """Commit the pass and mark it complete (``integration["complete"] = True`` in its manifest).

        Only this marks the pass complete: a ``with FinalPass(...)`` block left by an exception (a
        data-loader error, Ctrl-C) closes the pass unfinished (``complete`` stays False, the error is
        recorded as ``integration["aborted"]``), and :func:`~datavalue.embeddings.build_influence`
        and ``Attributor(run, model, kind="influence")`` refuse it. Idempotent."""
        if self.closed:
            return
        self._sink.flush()  # every batch on disk before the pass says it is whole
        self._mark(complete=True)
        super().close()

    def _mark(self, **entries: Any) -> None:
        integration = dict(self.writer.manifest.get("integration") or {}, **entries)
        self.writer.update_manifest(integration=integration)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        if self.closed:
            return
        try:  # the batches so far are kept (nothing written is lost) but the pass says it is unfinished
            self._sink.flush()
            self._mark(complete=False, aborted=f"{exc_type.__name__}: {exc}"[:500])
        finally:
            Recorder.close(self)

    def _close_for_exit(self) -> None:
        """Never closed (the script ended, or the pass was collected: ``ClosesAtExit.__del__``): its batches are
        committed, and the pass stays unfinished (builds refuse it): whether the loop over the data ended is
        unknown. A pass not closed explicitly is never marked complete."""
        try:
            self._sink.flush()
            self._mark(complete=False, aborted="never closed: the script ended without fp.close()")
        finally:
            Recorder.close(self)

    def step(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        raise RecorderStateError("a FinalPass records no optimizer steps: use `with fp.batch(ids, tokens=...): ...`.")

    def microbatch(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        raise RecorderStateError("a FinalPass records no optimizer steps: use `with fp.batch(ids, tokens=...): ...`.")

