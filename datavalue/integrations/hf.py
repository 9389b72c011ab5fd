"""``DataValueCallback``: record a ``transformers.Trainer`` run into a datavalue store.

It drives a :class:`datavalue.Recorder` (the same step pipeline as a plain training loop), so a
Trainer run stores everything a plain loop stores: the per-sample projected gradients of the
Trainer's own forward and backward (no second backward), its actual learning rate, the optimizer's
state for Adam-aware builds (the Trainer's default AdamW), the optional true-Fisher rows
(``curvature="fisher"``), gradient accumulation (all micro-batches of an optimizer step form one
step of the run), the clipping coefficient, and DDP under ``torchrun``/accelerate (each rank
records its part; rank 0 writes). A model already being recorded is refused (double-attach guard).

Sample ids come from a dataset column (default ``"sample_id"``). The Trainer drops columns its
model does not accept unless ``TrainingArguments(remove_unused_columns=False)``; the callback
removes the id column from the model's inputs before the forward. Weights: with ``labels`` the
stepped loss is the token mean over the whole optimizer step (transformers' ``num_items_in_batch``
semantics), so ``w(z) = tokens(z) / tokens(step)`` with tokens counted as the Trainer does
(shifted labels != -100); without labels, a plain mean over examples. With ``compute_loss_func=`` or
``label_smoothing_factor`` the Trainer pops the labels before the forward: they are read in its
``compute_loss`` (a ``compute_loss_func`` is taken to reduce as the model does: token sum / num_items).

Example::

    from datavalue.integrations.hf import DataValueCallback
    ds = ds.add_column("sample_id", list(range(len(ds))))
    args = TrainingArguments("out", remove_unused_columns=False, ...)
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[DataValueCallback("runs/hf.zarr", proj_dim=1024)])
    trainer.train()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from datavalue.capture import Recorder, parse_sample_ids
from datavalue.errors import RecorderError, RecorderStateError

logger = logging.getLogger(__name__)

__all__ = ["DataValueCallback"]


class DataValueCallback(TrainerCallback):
    """Records every optimizer step of a ``transformers.Trainer`` run.

    Args:
        path: the run directory (Zarr v3).
        proj_dim, seed, layers, storage_dtype, resume, overwrite, on_nonfinite, sketch, curvature,
            record_optimizer_state, fisher_max_classes, fisher_samples, chunk_rows, background,
            distributed: as for :class:`datavalue.Recorder` (the Trainer's optimizer is passed to
            it, so AdamW runs store their moments and build Adam-aware by default).
            ``curvature="hessian"`` is not available here (it needs a per-step loss closure).
        id_column: the dataset column with one int id per example.
        shift_labels: count tokens on ``labels[..., 1:]`` (causal LM). ``None``: guess from the
            model (``True`` for ``*ForCausalLM``/``*LMHeadModel``).

    Attributes:
        recorder: the :class:`datavalue.Recorder` of the current ``train()`` call (``None``
            before it starts).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        proj_dim: int | Mapping[str, int] | None = 1024,
        seed: int = 0,
        id_column: str = "sample_id",
        layers: list[str] | None = None,
        storage_dtype: str = "float32",
        resume: bool = False,
        overwrite: bool = False,
        on_nonfinite: str = "raise",
        shift_labels: bool | None = None,
        sketch: str | None = None,
        curvature: str | Sequence[str] | None = None,
        record_optimizer_state: bool | None = None,
        fisher_max_classes: int | None = None,
        fisher_samples: int = 1,
        chunk_rows: int | None = None,
        background: bool = True,
        distributed: bool | None = None,
    ) -> None:
        kinds = (curvature,) if curvature is None or isinstance(curvature, str) else tuple(curvature)
        if "hessian" in kinds:
            raise RecorderError(
                "DataValueCallback cannot record curvature='hessian' (it needs a closure recomputing each step's loss); "
                "use curvature='fisher', or a plain loop with datavalue.Recorder(..., curvature='hessian')."
            )
        if resume and overwrite:
            raise RecorderError("pass at most one of resume=True and overwrite=True.")
        self.path = path
        self.id_column = id_column
        self.shift_labels = shift_labels
        self._resume, self._overwrite = resume, overwrite
        self._recorder_kw: dict[str, Any] = dict(
            proj_dim=proj_dim, seed=seed, layers=layers, storage_dtype=storage_dtype, on_nonfinite=on_nonfinite,
            sketch=sketch, curvature=curvature, record_optimizer_state=record_optimizer_state,
            fisher_max_classes=fisher_max_classes, fisher_samples=fisher_samples, chunk_rows=chunk_rows,
            background=background, distributed=distributed,
        )
        self.recorder: Recorder | None = None
        self._hook = None
        self._micro: list[tuple[float | None, np.ndarray]] = []  # (num_items_in_batch, tokens) of each micro-batch
        self._n_items: float | None = None
        self._current: tuple[np.ndarray, Any] | None = None
        self._args = None
        self.uses_num_items = False
        self._warned_custom_loss = False
        self._trained = False

    # -------------------------------------------------------------- lifecycle
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "remove_unused_columns", False):
            raise RecorderError(
                "DataValueCallback needs the sample id column in the batches, but TrainingArguments has "
                "remove_unused_columns=True, which drops it. Pass TrainingArguments(..., remove_unused_columns=False)."
            )
        if model is None:
            raise RecorderError("the Trainer did not pass the model to the callback.")
        if self.recorder is not None and not self.recorder.closed:
            raise RecorderStateError(f"this DataValueCallback is already recording to {self.path}; one train() at a time.")
        if self.shift_labels is None:
            self.shift_labels = _shifts_labels(model)
        self._args = args
        integration = {"name": "transformers.Trainer", "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
                       "max_grad_norm": float(args.max_grad_norm or 0.0)}
        # a second train() with the same callback continues its own run
        resume = self._resume or self._trained
        self.recorder = Recorder(self.path, model, optimizer=optimizer, loss_reduction="token_mean", resume=resume,
                                 overwrite=self._overwrite and not self._trained, integration=integration,
                                 **self._recorder_kw)
        self._trained = True
        self.model = self.recorder.model
        self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True, prepend=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def on_save(self, args, state, control, **kwargs):
        """The Trainer saved a checkpoint: commit every recorded step and the weights' digest, so that a
        run resumed from this checkpoint (``resume_from_checkpoint``) finds all its steps and is checked
        against these weights (docs/capture.md, "What a crash loses")."""
        if self.recorder is not None and not self.recorder.closed:
            self.recorder.flush()

    def close(self) -> None:
        """Detach from the model and commit every recorded step. Idempotent."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._end_micro(ok=False)
        if self.recorder is not None:
            self.recorder.close()

    # -------------------------------------------------------------- micro-batches
    def _pre_forward(self, module, args, kwargs):
        ids = kwargs.pop(self.id_column, None)
        if ids is None:
            if module.training and torch.is_grad_enabled():
                raise RecorderError(
                    f"a training batch has no '{self.id_column}' column: add one int id per example to the dataset "
                    f"(ds.add_column('{self.id_column}', ...)) or pass DataValueCallback(id_column=...)."
                )
            return args, kwargs
        if not (module.training and torch.is_grad_enabled()):
            return args, kwargs
        self._end_micro(ok=True)
        ids = parse_sample_ids(ids)
        labels = kwargs.get("labels")
        n_items = kwargs.get("num_items_in_batch")
        if labels is None:
            # with compute_loss_func= or label_smoothing_factor the Trainer pops the labels before the forward and
            # computes the loss from them itself: read them (and its token count) in its compute_loss (P6-08)
            popped = _popped_labels()
            if popped is not None:
                labels, popped_items, custom = popped
                n_items = popped_items if n_items is None else n_items
                if custom and not self._warned_custom_loss:
                    self._warned_custom_loss = True
                    logger.warning(
                        "%s: the Trainer has a compute_loss_func; each example's weight is recorded as its label-token "
                        "count over num_items_in_batch (the model's own loss: a token sum divided by num_items_in_batch). "
                        "A compute_loss_func that reduces otherwise (a mean of per-example means, per-example weights) "
                        "makes the stored rows and weights wrong although the gradient check passes; record such a "
                        "loss in a plain loop with datavalue.Recorder (rec.microbatch(ids), then rec.commit_step(weights=...)).",
                        self.path)
        fisher_mask = None
        if labels is not None and torch.is_tensor(labels) and labels.dim() >= 1:
            tokens, positions = _label_tokens(labels, self.shift_labels)
            if self.recorder.fisher and labels.dim() == 2:  # the positions whose prediction enters the loss
                fisher_mask = positions
        else:
            tokens = np.ones(ids.size)
        self.uses_num_items = self.uses_num_items or n_items is not None
        # the stepped loss divides by the Trainer's own count (it may count unshifted labels: use it, not ours)
        self._n_items = float(n_items.sum() if torch.is_tensor(n_items) else n_items) if n_items is not None else None
        # the micro-batch's backward runs after this forward, outside any hook: keep its block open
        # until the next micro-batch's forward or the optimizer step
        ctx = self.recorder.microbatch(ids, tokens=tokens, fisher_mask=fisher_mask)
        ctx.__enter__()
        self._current = (tokens, ctx)
        return args, kwargs

    def _end_micro(self, *, ok: bool) -> None:
        if self._current is None:
            return
        tokens, ctx = self._current
        self._current = None
        if ok:
            ctx.__exit__(None, None, None)
            self._micro.append((self._n_items, tokens))
        else:  # training stopped mid-step: nothing of this step is committed
            ctx.__exit__(RecorderStateError, RecorderStateError("training stopped"), None)
            self._micro = []

    # -------------------------------------------------------------- optimizer step
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._end_micro(ok=True)
        if not self._micro:
            return
        rec = self.recorder
        micro, self._micro = self._micro, []
        tokens = np.concatenate([m[1] for m in micro])
        world = rec.dist.world
        if self.uses_num_items:  # the step's summed token loss over the Trainer's num_items_in_batch
            n_items = micro[0][0] if micro[0][0] is not None else float(tokens.sum())
            # average_tokens_across_devices: num_items is the global count and the loss is scaled by the world
            # size, which DDP's average undoes; otherwise each rank divides by its own count and DDP averages
            scale = 1 if getattr(args, "average_tokens_across_devices", False) else world
            w = tokens / max(n_items, 1.0) / scale
        else:  # each micro-batch's mean, divided by the number of micro-batches and by DDP's average
            w = np.concatenate([m[1] / max(m[1].sum(), 1.0) for m in micro]) / (len(micro) * world)
        clip = "auto" if (args.max_grad_norm is not None and args.max_grad_norm > 0) else None
        epoch = int(state.epoch) if state.epoch is not None else None
        rec.commit_step(weights=w, clip_coef=clip, epoch=epoch)


def _popped_labels() -> tuple[torch.Tensor, Any, bool] | None:
    """``(labels, num_items_in_batch, has compute_loss_func)`` of the ``Trainer.compute_loss`` call this forward runs in, when it popped
    the labels from the inputs (it does with ``compute_loss_func=`` or ``label_smoothing_factor``, then passes them
    to that loss and not to the model), else ``None``. Read from the calling frame of transformers' own
    ``Trainer.compute_loss`` (a subclass's override that calls ``super().compute_loss`` is found too)."""
    import sys

    from transformers import Trainer

    code = getattr(Trainer.compute_loss, "__code__", None)
    f = sys._getframe(1)
    for _ in range(64):
        if f is None:
            return None
        if f.f_code is code:
            labels = f.f_locals.get("labels")
            if torch.is_tensor(labels) and labels.dim() >= 1:
                trainer = f.f_locals.get("self")
                return labels, f.f_locals.get("num_items_in_batch"), getattr(trainer, "compute_loss_func", None) is not None
            return None
        f = f.f_back
    return None


def _shifts_labels(model: Any) -> bool:
    """Whether the model shifts ``labels`` inside its loss (causal LMs), guessed from its class name."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _label_tokens(labels: torch.Tensor, shift: bool) -> tuple[np.ndarray, torch.Tensor]:
    """Each example's label-token count as the Trainer counts them, and the logits positions whose
    prediction enters the loss (``(b, L)`` for 2-d labels: the shifted labels padded at the end)."""
    lab = labels[..., 1:] if (shift and labels.dim() > 1) else labels
    valid = lab.ne(-100)
    tokens = valid.reshape(valid.shape[0], -1).sum(1).to("cpu").numpy().astype(np.float64)
    positions = F.pad(valid, (0, 1)) if (shift and labels.dim() > 1) else valid
    return tokens, positions


def final_pass(
    trainer: Any,
    run: str | os.PathLike[str],
    *,
    curvature: str | None = "fisher",
    id_column: str = "sample_id",
    batch_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> int:
    """Record the final-weights pass of a Trainer run (for ``Attributor(run, model, kind="influence")``).

    Runs the trained ``trainer.model`` once over ``trainer.train_dataset`` in order (the Trainer's data
    collator, no shuffling, no update, ``model.eval()`` so that dropout is off) inside a
    :class:`datavalue.capture.FinalPass`, with the Trainer's loss (the token mean over the batch of the
    shifted labels) and each example's label-token count. Returns the number of examples recorded.
    Then ``datavalue.embeddings.build_influence(run)``.

    Example::

        trainer.train()                                   # recorded by DataValueCallback(run)
        final_pass(trainer, run)
        datavalue.embeddings.build_influence(run)
        attr = Attributor(run, trainer.model, kind="influence")
    """
    from torch.utils.data import DataLoader

    from datavalue.capture import FinalPass

    model = trainer.model
    ds = trainer.train_dataset
    if ds is None or id_column not in getattr(ds, "column_names", ()):
        raise RecorderError(f"final_pass needs trainer.train_dataset with a '{id_column}' column (the run's sample ids).")
    shift = _shifts_labels(model)
    bs = int(batch_size or trainer.args.per_device_train_batch_size)
    loader = DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=trainer.data_collator)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = 0
    it: Any = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="final pass")
    try:
        with FinalPass(run, model, curvature=curvature, overwrite=overwrite) as fp, torch.enable_grad():
            for batch in it:
                batch = dict(batch)
                ids = batch.pop(id_column)
                batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                labels = batch.get("labels")
                if labels is None:
                    raise RecorderError("final_pass needs 'labels' in the collated batches (the loss the Trainer steps on).")
                tokens, mask = _label_tokens(labels, shift)
                with fp.batch(ids, tokens=tokens, label_mask=mask if fp.fisher else None):
                    out = model(**batch)
                    out.loss.backward()
                n += int(tokens.size)
    finally:
        model.train(was_training)
    return n
