"""The training-loop recorder: per-sample projected gradients of every step into a Zarr run.

Example:
    >>> import os, tempfile, torch, datavalue
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt) as rec:
    ...     for step in range(2):
    ...         with rec.step(sample_ids=range(8)):
    ...             loss = torch.nn.functional.cross_entropy(model(x), y)
    ...             loss.backward()
    ...         opt.step(); opt.zero_grad()
    >>> datavalue.store.open_run(path).n_steps
    2
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture._config import CaptureConfig
from datavalue.capture._engine import Engine, to_numpy
from datavalue.capture._exit import _OPEN, ClosesAtExit, _register_at_exit
from datavalue.capture._exit import EXIT_TIMEOUT as EXIT_TIMEOUT  # importable from here, as before
from datavalue.capture._fisher import _inverse_cdf, _logits_of
from datavalue.capture._optim import (
    BlockGradientCheck,
    UnrecordedGradients,
    is_adam,
    step_fields,
    unwrap_optimizer,
)
from datavalue.capture._pipeline import (
    DistInfo,
    StepMemory,
    StepSink,
    parse_clip_coef,
    parse_epoch,
    parse_lr,
    parse_sample_ids,
    parse_tokens,
    step_weights,
)
from datavalue.capture._projection import resolve_sketch
from datavalue.capture._resume_checks import ResumeChecks
from datavalue.capture._run_setup import (
    _DEFAULTS,
    _check_resume_config,
    _recorded_fisher_max_classes,
    base_manifest,
    unwrap_model,
)
from datavalue.errors import (
    RecorderError,
    RecorderStateError,
)
from datavalue.store import run_dir_path

logger = logging.getLogger(__name__)

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Recorder] = weakref.WeakKeyDictionary()

CURVATURES = (None, "none", "empirical_fisher", "fisher", "hessian")


class StepHandle:
    """Yielded by :meth:`Recorder.step`; set ``clip_coef`` after clipping if it is only known then."""

    def __init__(self, index: int, clip_coef: float | None) -> None:
        self.index = index
        self.clip_coef = clip_coef

    @property
    def clip_coef(self) -> float | None:
        """The step's clipping coefficient ``min(1, max_norm/norm)`` in ``(0, 1]``; ``None``: not clipped."""
        return self._clip_coef

    @clip_coef.setter
    def clip_coef(self, value: Any) -> None:
        self._clip_coef = parse_clip_coef(value)


class Recorder(ClosesAtExit, ResumeChecks):
    """Records, at every optimizer step, each example's (projected) gradient and the step's lr.

    Args:
        path: where the Zarr v3 run is written (a directory).
        model: the ``torch.nn.Module`` being trained.
        proj_dim: total sketch dimension split over layers (see ``datavalue.capture._projection``),
            a dict ``{block name: k}``, or ``None`` to store exact per-sample gradients. Larger budgets
            than the default cost more than issue 20's 1.15x: on a small GPT-2 with AdamW (2-core CPU,
            docs/results/capture.md) LoGra-like 64 x 64 per block about 1.3-1.45x the plain step,
            16,384 in total about 1.35-1.4x (1024 and 4096: 1.1-1.25x).
        seed: root seed of the projection matrices.
        optimizer: the torch optimizer; when given, the actual lr, momentum and weight decay of
            every step are read from its first param group, and ``lr`` may be omitted.
        curvature: ``"fisher"`` also records true-Fisher pseudo-gradients (the recorder runs the
            extra backward itself; labels from the model's softmax); ``"hessian"`` records each
            step's exact Hessian sketched on both sides (``S H S^T``, ``k x k`` per step; pass
            ``rec.step(..., hessian_loss=...)``; ``k`` Hessian-vector products per step, for small
            models); a sequence such as ``("fisher", "hessian")`` records both; ``None``,
            ``"none"`` and ``"empirical_fisher"`` need nothing extra.
        loss_reduction: how the stepped loss combines examples: ``"mean"`` (weight 1/|B|),
            ``"sum"`` (weight 1) or ``"token_mean"`` (weight tokens(z)/tokens(B), pass ``tokens=``).
        layers: module names to capture (default: all modules with trainable parameters).
        storage_dtype: ``"float32"`` (default), ``"float16"``, or ``"float64"`` (oracles, tiny models).
        resume: continue an existing run after its last committed step (the configuration must match).
        overwrite: replace an existing run.
        on_nonfinite: ``"raise"`` (default) or ``"skip"`` (store zeros and flag the rows).
        fisher_max_classes: with ``curvature="fisher"``, use the exact class expectation when the
            model has at most this many outputs (and one prediction per example), else sample
            ``fisher_samples`` labels per example and position (sequence outputs: the Fisher of the
            example's mean loss over its positions; pass ``fisher_mask=`` to count only labelled ones).
            The exact expectation runs one extra backward pass per class (and stores ``C`` rows per
            example): ``C`` times the sampled form's cost, far above issue 20's 2x on any model whose
            step is more than Python (measured on a 2-core CPU, 10 classes: 9-12x the plain step on a
            0.8 M-parameter MLP, against 2.7-3.1x with sampled labels; docs/results/capture.md). Default
            ``None``: 16 (exact up to 16 classes) for models of at most 131,072 trainable parameters
            (``datavalue.capture._config.FISHER_EXACT_MAX_PARAMS``), where the whole step costs a few
            milliseconds, and 1 (sampled labels) above; on ``resume``, the run's own value. Sampled
            labels, the cheap form, are one extra backward pass: issue 20's 2x is not met on this CPU
            either (2.7-3.1x on that MLP, 2.1-2.7x on a small GPT-2).
        chunk_rows: rows per Zarr chunk (default: about 4 MiB of gradients, rounded down to a power of two,
            so that steps of a power-of-two batch fill chunks exactly and none is rewritten at a commit).
        commit_every: durability bound in steps (default 32): a ``kill -9`` loses at most the last
            ``commit_every`` recorded steps (and at most about 10 s of them); ``rec.flush()``
            commits everything now, ``1`` commits every step (docs/capture.md, "What a crash loses").
        background: write on a background thread (default True).
        distributed: record under ``torch.distributed`` (default: when a process group with more
            than one rank is initialised). Each rank records its local part of the global batch
            (pass the local ``sample_ids``); per-sample weights account for DDP's averaging over
            ranks; rows are gathered to rank 0, which owns the manifest and commits, in rank order.
        hessian_max_dim: refuse ``curvature="hessian"`` above this many columns (its cost grows as
            ``k`` Hessian-vector products and ``k^2`` stored numbers per step).
        sketch: ``"orthogonal"`` (default for new runs: orthonormal rows per side, more faithful when
            ``k`` is a sizeable fraction of a layer's size) or ``"gaussian"``; on ``resume`` the
            run's own kind (see ``datavalue.capture._projection``).
        record_optimizer_state: store the Adam/AdamW moments of every step (per-step arrays
            ``adam_m``, ``adam_v``, ``adam_step``; ``2 T k`` numbers), which Adam-aware embeddings
            need (``build_embeddings(..., optimizer="adamw")``). Default: whenever ``optimizer``
            is a ``torch.optim.Adam``/``AdamW``. ``True`` with another optimizer is an error.
        config: a :class:`~datavalue.capture.CaptureConfig` holding the capture options above
            (then leave those keywords at their defaults). Either way the validated config is
            ``rec.config`` and is stored in the manifest (``capture_config``); ``resume=True``
            compares it with the run's.
        integration: what drives this recorder (e.g. ``{"name": "transformers.Trainer", ...}``),
            stored in the manifest as ``integration``.
        precondition: ``"none"`` (default) or ``"adam"``: whiten every per-sample gradient by the
            step's own Adam preconditioner ``sqrt(1 / (sqrt(v_hat_{t+1}) + eps))`` per coordinate
            before the sketch (AdamW, or Adam without weight decay; needs ``optimizer=`` and a
            ``proj_dim``). The step's per-sample gradients are held whole until the step commits
            (``b x P`` numbers); the Adam-aware build then models the step exactly up to the drift
            of the preconditioner, which a sketch of raw gradients cannot (``datavalue.capture._whiten``).
            Cost: it cannot meet issue 20's 1.15x: 4-5x the plain step on a small GPT-2 (AdamW,
            proj_dim 1024 or 4096, 2-core CPU; docs/results/capture.md), spent materialising,
            converting to float64, whitening and sketching the ``b x P`` per-sample gradients.
        max_memory: bytes (or ``"8 GiB"``) the recorder's host buffers may take; a step whose bound
            exceeds it (default: the available memory) is refused before it runs. Per step of ``b``
            examples the bound is ``min(commit_every, 64 + ceil(chunk_rows / b)) (b (1 + F) k s + 16 k)`` of queued
            steps (``s`` the capture dtype's size, ``F`` Fisher rows per example, ``16 k`` with Adam
            moments) + ``3 b k s`` for the step's rows + ``chunk_rows k`` of the chunk being written +
            ``16 k`` for Adam moments + ``b P (s + 16)`` with ``precondition="adam"`` (``P`` parameters)
            (docs/capture.md, "Host memory per step"; ``DATAVALUE_MEMORY_CHECK=0`` skips the default check).
        checkpoint_every: write the model's weights and the optimizer's whole state into the run
            (``checkpoints/<step>/``) before every ``N``-th step's update, at step 0 and after the
            last step (on ``close``), for exact replay (:func:`datavalue.replay_influence`; needs
            ``optimizer=``). Memory of a replay grows with ``N``, its disk use with ``T / N``.

    Sign convention of everything built from a run: influence = loss(without) - loss(with);
    positive means the occurrence helped.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: nn.Module,
        *,
        proj_dim: int | Mapping[str, int] | None = 1024,
        seed: int = 0,
        optimizer: torch.optim.Optimizer | None = None,
        curvature: str | Sequence[str] | None = None,
        loss_reduction: str = "mean",
        layers: Sequence[str] | None = None,
        storage_dtype: str = "float32",
        resume: bool = False,
        overwrite: bool = False,
        on_nonfinite: str = "raise",
        fisher_max_classes: int | None = None,
        fisher_samples: int = 1,
        chunk_rows: int | None = None,
        background: bool = True,
        distributed: bool | None = None,
        record_optimizer_state: bool | None = None,
        hessian_max_dim: int = 4096,
        sketch: str | None = None,
        integration: Mapping[str, Any] | None = None,
        config: CaptureConfig | None = None,
        precondition: str = "none",
        commit_every: int = 32,
        max_memory: int | str | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        model = unwrap_model(model)  # DDP / DataParallel / torch.compile: record the module inside (no prefix)
        if not isinstance(model, nn.Module):
            raise RecorderError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        options = dict(proj_dim=proj_dim, seed=seed, sketch=sketch, layers=layers, loss_reduction=loss_reduction,
                       curvature=curvature, storage_dtype=storage_dtype, on_nonfinite=on_nonfinite,
                       fisher_max_classes=fisher_max_classes, fisher_samples=fisher_samples, hessian_max_dim=hessian_max_dim,
                       record_optimizer_state=record_optimizer_state, chunk_rows=chunk_rows, precondition=precondition,
                       commit_every=commit_every, checkpoint_every=checkpoint_every)
        if config is not None:
            if not isinstance(config, CaptureConfig):
                raise RecorderError(f"config must be a datavalue.capture.CaptureConfig, got {type(config).__name__}.")
            changed = [k for k, v in options.items() if v != _DEFAULTS[k]]
            if changed:
                raise RecorderError(f"pass either config= or the keyword options, not both (also given: {changed}); "
                                    "use dataclasses.replace(config, ...) to change a config.")
            cfg = config
        else:
            cfg = CaptureConfig(**options)
        if resume and overwrite:
            raise RecorderError("pass at most one of resume=True and overwrite=True.")
        if not isinstance(path, (str, os.PathLike)):
            raise RecorderError(f"path must be the run's directory, a str or os.PathLike (e.g. 'runs/exp1.zarr'), got "
                                f"{path!r} ({type(path).__name__}).")
        path = os.fspath(run_dir_path(path))  # absolute, once (a later os.chdir must not move the run); file:// URLs
        cfg = dataclasses.replace(cfg, fisher_max_classes=cfg.resolved_fisher_max_classes(  # None: by size / the run's
            sum(p.numel() for p in model.parameters() if p.requires_grad), _recorded_fisher_max_classes(path, resume)))
        (proj_dim, seed, sketch, layers, loss_reduction, storage_dtype, on_nonfinite, chunk_rows, hessian_max_dim) = (
            cfg.proj_dim, cfg.seed, cfg.sketch, cfg.layers, cfg.loss_reduction, cfg.storage_dtype, cfg.on_nonfinite,
            cfg.chunk_rows, cfg.hessian_max_dim)
        record_optimizer_state = cfg.record_optimizer_state
        layers = list(layers) if layers is not None else None
        other = _ATTACHED.get(model)
        if other is not None and not other.closed:
            raise RecorderStateError(f"this model already has an open Recorder writing to {other.path}; close it first.")
        self.model = model
        self.optimizer = optimizer
        self.loss_reduction = loss_reduction
        self.on_nonfinite = on_nonfinite
        self.fisher = cfg.fisher
        self.hessian = cfg.hessian
        self.fisher_max_classes = cfg.fisher_max_classes
        self.fisher_samples = cfg.fisher_samples
        # the Adam moments' block means: float64 sums only where they are stored in float64 (issue 20)
        self._precise_moments = np.dtype(storage_dtype) == np.float64
        adam = is_adam(optimizer)
        if record_optimizer_state and not adam:
            raise RecorderError("record_optimizer_state=True needs optimizer= a torch.optim.Adam or AdamW.")
        if adam and (getattr(unwrap_optimizer(optimizer), "defaults", {}).get("amsgrad") and record_optimizer_state):
            raise RecorderError("record_optimizer_state does not support amsgrad=True.")
        self.record_optimizer_state = adam if record_optimizer_state is None else bool(record_optimizer_state)
        self.checkpoint_every = cfg.checkpoint_every
        if self.checkpoint_every is not None and optimizer is None:
            raise RecorderError("checkpoint_every needs Recorder(..., optimizer=...): a checkpoint holds the optimizer's state.")
        try:
            self.engine = self._make_engine(model, proj_dim=proj_dim, seed=seed, layers=layers,
                                            sketch=resolve_sketch(path, sketch, resume), optimizer=optimizer)
        except ValueError as exc:
            if isinstance(exc, RecorderError):
                raise
            raise RecorderError(f"cannot split proj_dim={proj_dim!r} over the model's blocks: {exc}") from exc
        # the run's columns (manifest, store) come from ``layout``; hooks run on ``engine``. They are one
        # engine unless precondition="adam", which captures exact per-sample gradients and sketches them
        # itself after whitening (datavalue.capture._whiten)
        self.layout = self.engine
        self.precondition = cfg.precondition
        self._whitener = None
        self._sqrt_d: torch.Tensor | None = None
        if self.precondition == "adam":
            from datavalue.capture import _whiten

            _whiten.check_optimizer(optimizer)
            if proj_dim is None:
                raise RecorderError("precondition='adam' whitens gradients before a sketch; with proj_dim=None the "
                                    "Adam-aware build already uses the exact per-coordinate preconditioner. Drop "
                                    "precondition= or pass a proj_dim.")
            self.engine = _whiten.capture_engine(model, self.layout)
            self._whitener = _whiten.Whitener(self.layout, self.engine)
        # the Fisher pseudo-gradient passes and the real backward sketch the same saved inputs: once per block
        self.engine.memo_inputs = bool(self.fisher)
        if self.hessian and self.engine.k > int(hessian_max_dim):
            raise RecorderError(
                f"curvature='hessian' with k={self.engine.k} columns costs {self.engine.k} Hessian-vector products and "
                f"{self.engine.k}^2 stored numbers per step, above hessian_max_dim={int(hessian_max_dim)}. Use a smaller "
                "proj_dim, curvature='fisher', or raise hessian_max_dim if you mean it."
            )
        self._fisher_gen = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)
        self.config = dataclasses.replace(cfg, sketch=self.layout.sketch, record_optimizer_state=self.record_optimizer_state)
        if resume:
            _check_resume_config(path, self.config, optimizer)
        manifest = base_manifest(
            self.layout, model, loss_reduction=loss_reduction, optimizer=optimizer,
            fisher={"max_classes": self.fisher_max_classes, "samples": self.fisher_samples} if self.fisher else None,
            hessian={"kind": "exact", "sketch": "both sides"} if self.hessian else None,
            capture_config=self.config.to_json(),
            **({"integration": dict(integration)} if integration else {}),
        )
        mode = "resume" if resume else ("overwrite" if overwrite else "create")
        self._dist = DistInfo.detect(distributed)
        if self.hessian and self._dist.world > 1:
            raise RecorderError("curvature='hessian' is not supported under torch.distributed; use curvature='fisher'.")
        if self.precondition != "none":
            manifest["projection"]["precondition"] = self.precondition
        self._memory = StepMemory(  # before the run is opened: a bad max_memory= leaves nothing behind
            k=self.layout.k, P=sum(p.numel() for p in model.parameters() if p.requires_grad), fisher_rows=max(
                cfg.fisher_max_classes, cfg.fisher_samples) if self.fisher else 0, chunk_rows=chunk_rows or 0,
            capture_itemsize=self.engine.dtype.itemsize, storage_itemsize=np.dtype(storage_dtype).itemsize,
            adam=self.record_optimizer_state, whiten=self._whitener is not None, background=background,
            max_memory=max_memory, commit_every=cfg.commit_every)
        self._sink = StepSink(path, manifest, k=self.layout.k, mode=mode, chunk_rows=chunk_rows, storage_dtype=storage_dtype,
                              fisher=self.fisher, background=background, on_nonfinite=on_nonfinite, dist=self._dist,
                              commit_every=cfg.commit_every)
        self.writer = self._sink.writer
        self._memory.chunk_rows = self._sink.chunk_rows  # the run's own (resume: as recorded)
        self.path = Path(path)
        self._active: StepHandle | None = None
        self.closed = False
        self._fisher_rows: list[torch.Tensor] = []
        self._hessian: torch.Tensor | None = None
        self._weights_t: torch.Tensor | None = None
        self._micro: list[tuple[np.ndarray, Any, torch.Tensor, list[torch.Tensor]]] = []
        self._fisher_mask: torch.Tensor | None = None
        self._fisher_sum = False  # FinalPass: per-example losses summed over positions
        self.engine.attach(root_hook=self._on_model_output if self.fisher else None)
        # every step is held back from the writer until its optimizer update is seen to apply what it records
        self._unrecorded = UnrecordedGradients(
            self.engine, optimizer, release=lambda _step: self._sink.release(), drop=self._drop_held,
            compare_gradients=self._dist.world == 1, **self._resume_expectations(resume),
        ) if optimizer is not None else None
        # without optimizer=: each block's gradient must be its rows' (a parameter-only loss term is not)
        self._block_check = BlockGradientCheck(self.engine) if optimizer is None and self._dist.world == 1 else None
        self._sqrt_d_before: torch.Tensor | None = None
        self._resume_weights = bool(resume)  # checked before the first block (datavalue.capture._resume)
        _ATTACHED[model] = self
        # a script that ends without close(): the interpreter's exit commits what this recorder holds (a weak
        # set: the hook keeps nothing alive; close() takes it out; not in a forked child)
        _register_at_exit(self)
        logger.info("recording %s: %d blocks, k=%d, starting at step %d", self.path, len(self.layout.blocks), self.layout.k, self.n_steps)

    def _make_engine(self, model: nn.Module, **kw: Any) -> Engine:
        """The capture engine (a subclass may reproduce a recorded one instead)."""
        return Engine(model, **kw)

    # ------------------------------------------------------------------ info
    @property
    def proj_dim(self) -> int:
        """Actual number of gradient columns stored per occurrence."""
        return self.layout.k

    @property
    def blocks(self) -> list[dict[str, Any]]:
        return [b.to_json() for b in self.layout.blocks]

    @property
    def n_steps(self) -> int:
        """Steps recorded so far (including those of a resumed run)."""
        return self._sink.next_step

    @property
    def dist(self) -> DistInfo:
        """The ``torch.distributed`` view this recorder uses (rank, world size, collectives)."""
        return self._dist

    # ------------------------------------------------------------------ the step
    @contextlib.contextmanager
    def step(
        self,
        sample_ids: Any,
        lr: float | None = None,
        *,
        epoch: int | None = None,
        clip_coef: float | None = None,
        tokens: Any = None,
        hessian_loss: Callable[[], torch.Tensor] | None = None,
        fisher_mask: Any = None,
    ) -> Iterator[StepHandle]:
        """Record the backward pass run inside the ``with`` block as one optimizer step.

        Args:
            sample_ids: one int id per example in the batch (tensor, array, list).
            lr: the step's learning rate; optional when ``optimizer=`` was given.
            epoch: the epoch this step belongs to (stored; -1 if not given).
            clip_coef: gradient clipping coefficient of the step (``min(1, max_norm/norm)``);
                may also be set later on the yielded handle (``h.clip_coef = ...``).
            tokens: per-example token counts, required for ``loss_reduction="token_mean"``.
            hessian_loss: with ``curvature="hessian"``, a zero-argument closure that recomputes the
                loss the optimizer steps on for this batch (same reduction), e.g.
                ``lambda: F.cross_entropy(model(x), y)``. It is evaluated at the current weights
                (before ``optimizer.step()``) with the parameters substituted functionally:
                ``.grad``, BatchNorm running statistics and the random state are left as they were,
                so training is unchanged. Dropout inside the closure draws its own masks (not the
                real step's): for an exact match use deterministic layers or eval mode.
            fisher_mask: with ``curvature="fisher"`` and a sequence output ``(b, L, C)``, a ``(b, L)``
                bool tensor of the positions whose prediction enters the loss (for a Hugging Face
                causal LM: ``torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))``); default all.
        """
        self._check_open("rec.step()")
        self._check_applied()
        if self._micro:
            raise RecorderStateError(
                f"{len(self._micro)} micro-batch(es) recorded with rec.microbatch() are waiting for rec.commit_step(); "
                "commit them before starting a rec.step() block."
            )
        ids = parse_sample_ids(sample_ids)
        epoch, clip_coef = parse_epoch(epoch), parse_clip_coef(clip_coef)
        self._check_lr(lr)
        self._memory.check(ids.size)
        weights = step_weights(self.loss_reduction, ids.size, tokens)
        if self.hessian and hessian_loss is None:
            raise RecorderError(
                "this Recorder records curvature='hessian': pass rec.step(..., hessian_loss=lambda: loss_fn(model(x), y)), "
                "a closure recomputing the batch's stepped loss."
            )
        if hessian_loss is not None and not self.hessian:
            raise RecorderError("hessian_loss= is only used with Recorder(..., curvature='hessian').")
        hessian = None
        if hessian_loss is not None:
            from datavalue.capture._hessian import sketched_hessian

            with torch.enable_grad():  # at the weights before this step's update; hooks are idle
                hessian = sketched_hessian(self.model, hessian_loss, self.engine)
        handle = StepHandle(self.n_steps, clip_coef)
        w_final = weights / self._dist.world  # DDP averages the ranks' gradients
        before = self._block_check.snapshot() if self._block_check is not None else None
        with self._capture(ids, w_final, handle, fisher_mask) as captured:
            yield handle
        rows, fisher = captured
        if self._block_check is not None:
            self._block_check.check(before, rows, self.n_steps)
        g = rows / torch.as_tensor(weights, dtype=rows.dtype, device=rows.device).unsqueeze(1)  # captured: grad of w*l
        self._commit(ids, w_final, g, fisher, lr=lr, epoch=epoch, clip_coef=handle.clip_coef, hessian=hessian, raw=rows)

    @contextlib.contextmanager
    def microbatch(self, sample_ids: Any, *, tokens: Any = None, fisher_mask: Any = None) -> Iterator[None]:
        """Record one micro-batch of an optimizer step built by gradient accumulation.

        Run each micro-batch's forward and ``backward()`` inside ``with rec.microbatch(ids):``,
        then call :meth:`commit_step` once, before ``optimizer.step()``. The micro-batches of a
        step form one step of the run (like :meth:`step` with all their examples). ``tokens``:
        per-example token counts (``loss_reduction="token_mean"``); ``fisher_mask``: as for :meth:`step`.

        Example::

            for micro in chunks:                       # gradient accumulation
                with rec.microbatch(micro.ids):
                    (loss_fn(model(micro.x), micro.y) / len(chunks)).backward()
            rec.commit_step(clip_coef="auto")          # after clip_grad_norm_, before opt.step()
            opt.step(); opt.zero_grad()
        """
        self._check_open("rec.microbatch()")
        self._check_applied()
        if self.hessian:
            raise RecorderError("curvature='hessian' needs one closure per step: use rec.step(..., hessian_loss=...).")
        ids = parse_sample_ids(sample_ids)
        if tokens is not None:  # a micro-batch may hold no counted token; the step as a whole must
            tokens = parse_tokens(tokens)  # whole counts: no bools, fractions or NaN (one rule with rec.step)
            if tokens.size != ids.size or not np.all(np.isfinite(tokens)) or (tokens < 0).any():
                raise RecorderError(f"tokens must be {ids.size} non-negative counts (one per example), got {tokens[:5]}...")
        elif self.loss_reduction == "token_mean":
            raise RecorderError('loss_reduction="token_mean" needs rec.microbatch(..., tokens=per-example token counts).')
        handle = StepHandle(self.n_steps, None)
        before = self._block_check.snapshot() if self._block_check is not None else None
        with self._capture(ids, None, handle, fisher_mask) as captured:
            yield
        rows, fisher = captured
        if self._block_check is not None:
            try:
                self._block_check.check(before, rows, self.n_steps)
            except RecorderError:
                self._micro.clear()  # the step's other micro-batches cannot be committed without this one
                raise
        self._micro.append((ids, tokens, rows, fisher))

    def commit_step(
        self,
        *,
        lr: float | None = None,
        epoch: int | None = None,
        clip_coef: float | str | None = None,
        weights: Any = None,
    ) -> int:
        """Close an optimizer step recorded with :meth:`microbatch`; returns its index.

        Call it after gradient clipping and before ``optimizer.step()`` (the optimizer's state and
        hyperparameters are read now).

        Args:
            lr, epoch: as for :meth:`step`.
            clip_coef: the clipping coefficient, or ``"auto"`` to measure it: the parameters'
                accumulated ``.grad`` (clipped) against the sum of the captured rows, both sketched
                (exact by linearity when every trainable parameter is captured).
            weights: each example's weight in the stepped loss (in micro-batch order; under DDP,
                in the global loss after the average over ranks). Default, from
                ``loss_reduction``: ``"mean"``, each micro-batch's mean divided by the number of
                micro-batches; ``"sum"``, 1; ``"token_mean"``, tokens(z) / tokens(step) over all
                the step's micro-batches (transformers' ``num_items_in_batch``), divided by the
                number of ranks.
        """
        self._check_open("rec.commit_step()")
        if not self._micro:
            raise RecorderStateError("rec.commit_step() without micro-batches: record them with `with rec.microbatch(ids): ...`.")
        self._check_lr(lr)
        epoch, clip_coef = parse_epoch(epoch), "auto" if isinstance(clip_coef, str) and clip_coef == "auto" else parse_clip_coef(clip_coef, auto=True)
        micro, self._micro = self._micro, []
        ids = np.concatenate([m[0] for m in micro])
        parse_sample_ids(ids)  # unique over the whole step
        world = self._dist.world
        if weights is not None:
            w_final = np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, np.float64).reshape(-1)
            if w_final.shape != ids.shape or not np.all(np.isfinite(w_final)) or (w_final < 0).any():
                raise RecorderError(f"weights must be {ids.size} finite non-negative numbers (one per example of the step), "
                                    f"got {w_final.size}.")
        elif self.loss_reduction == "token_mean":
            tokens = np.concatenate([m[1] for m in micro])
            w_final = step_weights("token_mean", ids.size, tokens) / world
        elif self.loss_reduction == "sum":
            w_final = np.ones(ids.size) / world
        else:
            w_final = np.concatenate([np.full(m[0].size, 1.0 / m[0].size) for m in micro]) / (len(micro) * world)
        captured = torch.cat([m[2] for m in micro])  # rows of grad(w_local * l), w_local = world * w_final
        w_local = torch.as_tensor(w_final * world, dtype=captured.dtype, device=captured.device)
        if clip_coef == "auto":
            clip_coef = self._measure_clip(captured)
        elif isinstance(clip_coef, str):
            raise RecorderError(f"clip_coef must be a number, None or 'auto', got {clip_coef!r}.")
        g = captured / torch.where(w_local > 0, w_local, torch.ones_like(w_local)).unsqueeze(1)
        fisher = None
        if self.fisher:  # rows were taken with unit weights: scale each example's by sqrt(w_final)
            parts = []
            for (mids, _, _, frows), sw in zip(micro, np.split(np.sqrt(w_final), np.cumsum([m[0].size for m in micro])[:-1])):
                f = torch.cat(frows) if frows else torch.zeros(0, self.engine.k, dtype=captured.dtype, device=captured.device)
                f = f.reshape(-1, mids.size, f.shape[-1]) * torch.as_tensor(sw, dtype=f.dtype, device=f.device)[None, :, None]
                parts.append(f.reshape(-1, f.shape[-1]))
            fisher = torch.cat(parts)
        return self._commit(ids, w_final, g, fisher, lr=lr, epoch=epoch, clip_coef=clip_coef, raw=captured)

    # ------------------------------------------------------------------ internals of a step
    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RecorderStateError("this Recorder is closed; open a new one with resume=True to record more steps.")
        if self._active is not None:
            raise RecorderStateError(f"{what} blocks cannot be nested inside another rec.step()/rec.microbatch() block: close that block first.")

    def _check_lr(self, lr: Any) -> None:
        if lr is None and self.optimizer is None:
            raise RecorderError("no lr: pass rec.step(..., lr=...) or create the Recorder with optimizer=...")
        if lr is not None:
            parse_lr(lr)

    @contextlib.contextmanager
    def _capture(self, ids: np.ndarray, fisher_weights: np.ndarray | None, handle: StepHandle, fisher_mask: Any = None):
        """Hooks live for the block; yields a list that holds ``(rows, fisher_rows)`` afterwards.

        ``rows``: ``(b, k)`` captured gradients of the loss as stepped (weights inside);
        ``fisher_weights``: the examples' weights for the Fisher pseudo-gradients (``None``: 1).
        """
        self._active = handle
        self._fisher_rows = []
        fw = np.ones(ids.size) if fisher_weights is None else fisher_weights
        self._weights_t = torch.as_tensor(fw, dtype=self.engine.dtype, device=self.engine.device)
        if fisher_mask is not None and not self.fisher:
            raise RecorderError("fisher_mask= is only used with curvature='fisher'.")
        self._fisher_mask = None if fisher_mask is None else torch.as_tensor(fisher_mask).detach().bool()
        if self._fisher_mask is not None and (self._fisher_mask.dim() < 1 or self._fisher_mask.shape[0] != ids.size):
            raise RecorderError(f"fisher_mask must have one row per example ({ids.size}, ...), got shape "
                                f"{tuple(self._fisher_mask.shape)}.")
        self.engine.begin(ids.size)
        if self._unrecorded is not None:
            self._unrecorded.block_started()
        out: list[Any] = []
        ok = False
        try:
            yield out
            ok = True
        finally:
            sink = self.engine.end()
            self._active = None
            self._fisher_mask = None
        if ok:
            eng = self.engine
            if eng.n_grad_events == 0:
                raise RecorderStateError(
                    "no backward pass reached the model inside the recorded block: call loss.backward() inside the "
                    f"with-block (forward calls seen: {eng.n_forward_events})."
                )
            fisher = self._fisher_rows
            if fisher_weights is not None:
                fisher = torch.cat(fisher) if fisher else torch.zeros(0, eng.k, dtype=eng.dtype, device=eng.device)
            out[:] = [eng.assemble(sink, ids.size), fisher]

    def _measure_clip(self, captured: torch.Tensor) -> float:
        from datavalue.capture._gradients import project_full

        with torch.no_grad():
            full = project_full(self.engine, {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None})
            raw = captured.sum(0).to(full.dtype)
            if self._dist.world > 1:  # .grad is the average over ranks of each rank's sum
                raw = torch.as_tensor(self._dist.all_sum(to_numpy(raw)) / self._dist.world, dtype=full.dtype)
            denom = float(raw @ raw)
            coef = float(full @ raw) / denom if denom > 0 else 1.0
        return 1.0 if coef > 1 - 1e-6 else coef

    def _check_applied(self) -> None:
        """Refuse a block while the previous recorded step still waits for its optimizer update, and a
        resumed run's first block when the model does not hold the weights the run reached."""
        if self._unrecorded is not None:
            self._unrecorded.before_block()
        if self._resume_weights:
            self._check_resume_weights()

    def _drop_held(self, step: int) -> None:
        """A held step was refused (its update differs from the record, or never ran): forget it."""
        self._sink.drop()
        if self._whitener is not None:
            self._sqrt_d = self._sqrt_d_before

    def _commit(self, ids, w_final, g, fisher, *, lr, epoch, clip_coef, hessian=None, raw=None) -> int:
        """The optimizer's fields of the step, then the shared step pipeline.

        ``raw``: ``(b, k)`` the captured rows as the backward produced them (weights inside, before any
        whitening), whose sum the optimizer's step pre-hook compares with ``.grad``.
        """
        self.layout.check_trainable(self.n_steps)
        self._memory.check(ids.size)
        guard = self._unrecorded
        self._sqrt_d_before = self._sqrt_d
        if self._whitener is not None:  # exact rows -> whitened by this step's sqrt(D), sketched
            from datavalue.capture._whiten import adam_sqrt_d

            sqrt_d = self._whitener.layout_vector(adam_sqrt_d(self.model, self.optimizer)).to(g.device)
            g = self._whitener.sketch(g.to(torch.float64) * sqrt_d).to(g.dtype)
            if fisher is not None:
                fisher = self._whitener.sketch(fisher.to(torch.float64) * sqrt_d).to(g.dtype)
            self._sqrt_d = sqrt_d
        fields = step_fields(self.optimizer, self.model, self.layout, record_state=self.record_optimizer_state, lr=lr,
                             step=self.n_steps, precise=self._precise_moments)
        if self.checkpoint_every is not None and self.n_steps % self.checkpoint_every == 0:
            self._checkpoint(self.n_steps)  # before this step's update: the weights theta_t
        step = self._sink.submit(ids, w_final, g, fisher=fisher if self.fisher else None, hessian=hessian,
                                 epoch=epoch, grad_scale=clip_coef, hold=guard is not None, **fields)
        if guard is not None:
            guard.expect(step, raw, clip=clip_coef, lr=None if lr is None else float(lr))
        return step

    # ------------------------------------------------------------------ fisher
    def _on_model_output(self, output: Any) -> None:
        """Root forward hook: true-Fisher pseudo-gradients while the graph is still alive.

        Each example's pseudo-gradient ``f`` satisfies ``E[f f^T] = w * GGN(l)``, the Gauss-Newton
        matrix of its loss ``l`` with weight ``w``. For a sequence output ``(b, L, C)`` the loss is
        taken as the mean over the positions that count (``fisher_mask``; default all ``L``):
        one label is drawn per position and the pseudo-gradient is ``sum_pos g_pos / sqrt(n)``
        (``E[(sum g)(sum g)^T] = sum_pos F_pos`` because the positions' draws are independent and
        have zero mean). The exact class expectation (``C <= fisher_max_classes``) is used for
        one-position outputs only: enumerating classes jointly over positions would add
        cross-position terms that the expectation does not have.
        """
        eng = self.engine
        if self._active is None or eng.sink is None or eng._replaying or not torch.is_grad_enabled():
            return
        logits = _logits_of(output)
        if logits is None or not logits.requires_grad:
            return
        b = logits.shape[0]
        C = logits.shape[-1]
        p = torch.softmax(logits.detach().to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
        pos_shape = tuple(logits.shape[1:-1])
        mask = self._fisher_mask
        if mask is not None:
            if tuple(mask.shape) != (b,) + pos_shape:
                raise RecorderError(f"fisher_mask has shape {tuple(mask.shape)}; the model's logits {tuple(logits.shape)} "
                                    f"need ({b}, {', '.join(map(str, pos_shape))}) (one flag per predicted position).")
            mask = mask.to(device=p.device, dtype=p.dtype).unsqueeze(-1)
            n_pos = mask.reshape(b, -1).sum(1).clamp_min(1.0).reshape((b,) + (1,) * (logits.dim() - 1))
        else:
            n_pos = torch.full((b,) + (1,) * (logits.dim() - 1), float(np.prod(pos_shape)) if pos_shape else 1.0,
                               dtype=p.dtype, device=p.device)
        # a summed per-example loss (FinalPass) takes no 1/sqrt(n): E[f f^T] = sum_pos F_pos
        scale = torch.ones_like(n_pos) if self._fisher_sum else n_pos.rsqrt()
        sw = self._weights_t.to(p.dtype).sqrt().reshape((b,) + (1,) * (logits.dim() - 1)) * scale
        if mask is not None:
            sw = sw * mask
        grad_sink, rows = eng.sink, []
        try:
            if C <= self.fisher_max_classes and logits.dim() == 2:
                for c in range(C):
                    onehot = torch.zeros_like(p)
                    onehot[..., c] = 1.0
                    v = sw * p[..., c : c + 1].sqrt() * (p - onehot)
                    rows.append(self._pseudo_pass(logits, v.to(logits.dtype), b))
            else:
                # labels by inverse CDF: one uniform per position from the run's generator, O(C) per row
                # (torch.multinomial drew one exponential per class: 70x slower on 1,024 x 2,048 logits);
                # the cumulative sums stay on the model's device, in float64 where it has it
                cdf = p.reshape(-1, C).to(torch.float32 if p.device.type == "mps" else torch.float64).cumsum(-1)
                for _ in range(self.fisher_samples):
                    u = torch.rand(cdf.shape[0], 1, generator=self._fisher_gen, dtype=torch.float64)
                    yhat = _inverse_cdf(cdf, u.to(device=cdf.device, dtype=cdf.dtype)).reshape(p.shape[:-1])
                    onehot = torch.nn.functional.one_hot(yhat, C).to(p.dtype)
                    v = sw * (p - onehot) / float(np.sqrt(self.fisher_samples))
                    rows.append(self._pseudo_pass(logits, v.to(logits.dtype), b))
        finally:
            eng.sink = grad_sink
        self._fisher_rows.append(torch.cat(rows))

    def _pseudo_pass(self, logits: torch.Tensor, v: torch.Tensor, b: int) -> torch.Tensor:
        eng = self.engine
        eng.sink = {}
        eng.grad_wrt_outputs(logits, v)
        return eng.assemble(eng.sink, b)

    # ------------------------------------------------------------------ close
    def flush(self) -> None:
        """Block until every recorded step is committed to disk: a ``kill -9`` after it returns loses
        none of them. Call it where you save a checkpoint, so that a resume from that checkpoint
        finds every step before it (between flushes, at most ``commit_every`` steps are at risk).
        With ``optimizer=``, a step is written once its ``optimizer.step()`` has run: a block still
        waiting for it is not part of the flush. It also stores a digest of the weights, which
        ``resume=True`` checks (``datavalue.capture._resume``)."""
        self._sink.flush()
        self._record_weights()

    def close(self) -> None:
        """Flush pending steps, detach hooks. Idempotent.

        A recorder its script never closes is closed when the interpreter exits normally (or when it is
        garbage-collected), with a warning: see "Durability" in the README."""
        if self.closed:
            return
        self.closed = True
        _OPEN.pop(id(self), None)
        self.engine.detach()
        if getattr(self, "_unrecorded", None) is not None:
            nonfinite = self._unrecorded.nonfinite_weights()
            moved = [] if nonfinite else self._unrecorded.moved_since_update()  # NaN != NaN: not a "move"
            if nonfinite:  # an update overflowed (P9-16): say that, not that something edited the weights
                logger.warning("%s: the weights of %s hold NaN or inf at close (an optimizer update overflowed: in "
                               "float16, Adam's eps=1e-8 rounds to 0); the model's final weights are not usable",
                               self.path, nonfinite[:3])
            if moved:  # the steps are written; the weights the model ends with are not the run's
                logger.warning("%s: the weights of %s changed after the last optimizer.step() (weight clipping, an EMA "
                               "copied back?); the run's last step does not lead to the model's final weights",
                               self.path, moved[:3])
            self._unrecorded.remove()
            dropped = self._unrecorded.finish()
            if dropped is not None:  # the model never took that update: the run ends before it
                logger.warning("%s: step %d was recorded but optimizer.step() never ran after it; it was not written "
                               "(the run has %d steps)", self.path, dropped, self.n_steps)
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        try:  # written while the run's writer lock is still held (released by the sink's close)
            if self.checkpoint_every is not None and self.n_steps:
                self._checkpoint(self.n_steps)  # the final weights (after the last update)
            if self._sqrt_d is not None and self._dist.rank == 0:
                self._sink.flush()
                self._write_sqrt_d()
            if self.optimizer is not None and self._dist.rank == 0:
                self._sink.flush()
                self._record_weights()
        finally:
            self._sink.close()

    def _checkpoint(self, step: int) -> None:
        if self._dist.rank == 0:
            from datavalue.capture._checkpoint import write_checkpoint

            write_checkpoint(self.path, step, self.model, self.optimizer)

    def _write_sqrt_d(self) -> None:
        """The last step's ``sqrt(D)`` (exact capture layout), with which queries whiten test gradients."""
        from datavalue.capture._whiten import SQRT_D
        from datavalue.store import create_array

        assert self._sqrt_d is not None
        d = to_numpy(self._sqrt_d).astype(np.float64)
        arr = create_array(self.path, SQRT_D, shape=d.shape, dtype="float64", chunks=(max(1, d.size),),
                           attrs={"step": int(self.n_steps), "meaning": "sqrt(1 / (sqrt(v_hat_T) + eps)) per captured "
                                  "coordinate after the run's last step (precondition='adam')"}, overwrite=True)
        arr[:] = d

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
