"""``DataValueCallback``: record a ``transformers.Trainer`` run into a datavalue store.

It records the per-sample projected gradients of the real training steps: the Trainer's own
forward and backward (no second backward), its actual learning rate, gradient accumulation
(all micro-batches of an optimizer step form one step of the run) and the clipping coefficient.

Sample ids come from a dataset column (default ``"sample_id"``). The Trainer drops columns its
model does not accept unless ``TrainingArguments(remove_unused_columns=False)``; the callback
removes the id column from the model's inputs before the forward. Weights: with ``labels`` the
stepped loss is the token mean over the whole optimizer step (transformers' ``num_items_in_batch``
semantics), so ``w(z) = tokens(z) / tokens(step)`` with tokens counted as the Trainer does
(shifted labels != -100); without labels, a plain mean over examples.

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
from collections.abc import Mapping

import numpy as np
import torch
from transformers import TrainerCallback

from datavalue.capture._engine import Engine, to_numpy
from datavalue.capture._gradients import project_full
from datavalue.capture._optim import optimizer_state
from datavalue.capture._projection import resolve_sketch
from datavalue.capture.recorder import base_manifest, parse_sample_ids
from datavalue.errors import NonFiniteError, RecorderError
from datavalue.store import RunWriter, StepBlock
from datavalue.store._schema import FLAG_NONFINITE

logger = logging.getLogger(__name__)

__all__ = ["DataValueCallback"]


class DataValueCallback(TrainerCallback):
    """Records every optimizer step of a ``transformers.Trainer`` run.

    Args:
        path: the run directory (Zarr v3).
        proj_dim, seed, layers, storage_dtype, resume, overwrite, on_nonfinite, sketch: as for
            :class:`datavalue.Recorder`.
        id_column: the dataset column with one int id per example.
        shift_labels: count tokens on ``labels[..., 1:]`` (causal LM). ``None``: guess from the
            model (``True`` for ``*ForCausalLM``/``*LMHeadModel``).
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
    ) -> None:
        self.path = path
        self.sketch = sketch
        self.proj_dim, self.seed, self.layers = proj_dim, seed, layers
        self.id_column = id_column
        self.storage_dtype = storage_dtype
        self.mode = "resume" if resume else ("overwrite" if overwrite else "create")
        self.on_nonfinite = on_nonfinite
        self.shift_labels = shift_labels
        self.engine: Engine | None = None
        self.writer: RunWriter | None = None
        self._hook = None
        self._micro: list[tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]] = []
        self._current: tuple[np.ndarray, np.ndarray] | None = None
        self._step = 0
        self.uses_num_items = False

    # -------------------------------------------------------------- lifecycle
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "remove_unused_columns", False):
            raise RecorderError(
                "DataValueCallback needs the sample id column in the batches, but TrainingArguments has "
                "remove_unused_columns=True, which drops it. Pass TrainingArguments(..., remove_unused_columns=False)."
            )
        if model is None:
            raise RecorderError("the Trainer did not pass the model to the callback.")
        self.model = model
        self.optimizer = optimizer
        if self.shift_labels is None:
            name = type(model).__name__
            self.shift_labels = name.endswith("ForCausalLM") or name.endswith("LMHeadModel")
        self.engine = Engine(model, proj_dim=self.proj_dim, seed=self.seed, layers=self.layers,
                             sketch=resolve_sketch(self.path, self.sketch, self.mode == "resume"))
        manifest = base_manifest(self.engine, model, loss_reduction="token_mean", optimizer=optimizer,
                                 integration={"name": "transformers.Trainer",
                                              "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
                                              "max_grad_norm": float(args.max_grad_norm)})
        self.writer = RunWriter(self.path, manifest, k=self.engine.k, mode=self.mode, storage_dtype=self.storage_dtype)
        self._step = self.writer.steps
        self.engine.attach()
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True, prepend=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.engine is not None:
            self.engine.detach()
        if self.writer is not None:
            self.writer.close()

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
        self._close_micro()
        ids = parse_sample_ids(ids)
        labels = kwargs.get("labels")
        if labels is not None and torch.is_tensor(labels) and labels.dim() >= 1:
            lab = labels[..., 1:] if (self.shift_labels and labels.dim() > 1) else labels
            tokens = lab.ne(-100).reshape(lab.shape[0], -1).sum(1).to("cpu").numpy().astype(np.float64)
        else:
            tokens = np.ones(ids.size)
        self.uses_num_items = self.uses_num_items or "num_items_in_batch" in kwargs
        self._current = (ids, tokens)
        self.engine.begin(ids.size)
        return args, kwargs

    def _close_micro(self) -> None:
        if self._current is None:
            return
        ids, tokens = self._current
        sink = self.engine.end()
        self._micro.append((ids, tokens, sink))
        self._current = None

    # -------------------------------------------------------------- optimizer step
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._close_micro()
        if not self._micro:
            return
        eng = self.engine
        ids = np.concatenate([m[0] for m in self._micro])
        tokens = np.concatenate([m[1] for m in self._micro])
        if self.uses_num_items:  # one token mean over the whole optimizer step
            w = tokens / max(tokens.sum(), 1.0)
        else:  # each micro-batch's mean, divided by the number of micro-batches
            w = np.concatenate([m[1] / max(m[1].sum(), 1.0) for m in self._micro]) / len(self._micro)
        captured = torch.cat([eng.assemble(m[2], m[0].size) for m in self._micro])
        self._micro = []
        if len(np.unique(ids)) != ids.size:
            raise RecorderError(f"step {self._step}: sample ids repeat within one optimizer step; ids must be unique per example.")
        # clipping: the accumulated .grad is now coef * (sum of captured rows); both sketched
        with torch.no_grad():
            full = project_full(eng, {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None})
            raw = captured.sum(0)
            denom = float(raw @ raw)
            coef = float(full @ raw) / denom if denom > 0 else 1.0
        if args.max_grad_norm is None or args.max_grad_norm <= 0 or coef > 1 - 1e-6:
            coef = 1.0
        wt = torch.as_tensor(w, dtype=captured.dtype, device=captured.device)
        safe = torch.where(wt > 0, wt, torch.ones_like(wt))
        g = captured / safe.unsqueeze(1)
        flags = np.zeros(ids.size, np.uint8)
        finite = torch.isfinite(g).all(1)
        if not bool(finite.all()):
            if self.on_nonfinite == "raise":
                raise NonFiniteError(f"step {self._step}: non-finite per-sample gradients for ids {ids[~to_numpy(finite)][:10].tolist()}.")
            g = torch.where(finite.unsqueeze(1), g, torch.zeros_like(g))
            flags[~to_numpy(finite)] |= FLAG_NONFINITE
        opt = optimizer_state(optimizer or self.optimizer)
        epoch = int(state.epoch) if state.epoch is not None else -1
        self.writer.submit(StepBlock(step=self._step, sample_id=ids, weight=w, grads=to_numpy(g), flags=flags, lr=opt["lr"],
                                     epoch=epoch, grad_scale=coef, momentum=opt["momentum"], weight_decay=opt["weight_decay"]))
        self._step += 1
