"""The training-loop recorder: per-sample projected gradients of every step into a Zarr run.

Example:
    >>> import torch, datavalue
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> with datavalue.Recorder("/tmp/doc.zarr", model, proj_dim=None, optimizer=opt, overwrite=True) as rec:
    ...     for step in range(2):
    ...         with rec.step(sample_ids=range(8)):
    ...             loss = torch.nn.functional.cross_entropy(model(x), y)
    ...             loss.backward()
    ...         opt.step(); opt.zero_grad()
    >>> datavalue.store.open_run("/tmp/doc.zarr").n_steps
    2
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture._engine import Engine, to_numpy, trainable_fingerprint
from datavalue.capture._optim import is_adam, optimizer_config, step_fields, unwrap_optimizer
from datavalue.capture._projection import resolve_sketch
from datavalue.errors import NonFiniteError, RecorderError, RecorderStateError
from datavalue.store import RunWriter, StepBlock, fingerprint_params
from datavalue.store._schema import FLAG_NONFINITE, package_versions

logger = logging.getLogger(__name__)

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Recorder] = weakref.WeakKeyDictionary()

LOSS_REDUCTIONS = ("mean", "sum", "token_mean")
CURVATURES = (None, "none", "empirical_fisher", "fisher", "hessian")


def parse_sample_ids(sample_ids: Any) -> np.ndarray:
    """Validate ids (tensor, array, list or range of ints) into a 1-d int64 array without duplicates."""
    if torch.is_tensor(sample_ids):
        sample_ids = sample_ids.detach().cpu().numpy()
    arr = np.asarray(list(sample_ids) if isinstance(sample_ids, range) else sample_ids)
    if arr.ndim != 1:
        raise RecorderError(f"sample_ids must be 1-d (one id per example), got shape {arr.shape}.")
    if arr.size == 0:
        raise RecorderError("sample_ids is empty; a step needs at least one example.")
    if arr.dtype == object and all(isinstance(v, (int, np.integer)) for v in arr.tolist()):
        big = [v for v in arr.tolist() if not -(2**63) <= v < 2**63]
        if big:
            raise RecorderError(f"sample ids must fit in int64; got {big[:3]}. Map your keys to smaller int ids.")
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise RecorderError(f"sample_ids must be integers, got dtype {arr.dtype}; map your keys to int ids first.")
    arr = arr.astype(np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise RecorderError(
            f"sample_ids repeats ids {uniq[counts > 1][:5].tolist()} within one step; each example in a batch needs its "
            "own id (an example drawn twice in one batch: give each copy a distinct id)."
        )
    return arr


@dataclass(frozen=True)
class _DistInfo:
    """torch.distributed bookkeeping: rank, world size, and the collectives the recorder needs."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def detect(flag: bool | None) -> _DistInfo:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if flag and not on:
            raise RecorderError("distributed=True but no torch.distributed process group with more than one rank is initialised.")
        if flag is False or not on:
            return _DistInfo()
        return _DistInfo(dist.get_rank(), dist.get_world_size())

    def broadcast_int(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(t, src=0)
        return int(t.item())

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ranks' tensors along dim 0 (different lengths allowed), in rank order."""
        import torch.distributed as dist

        n = torch.tensor([t.shape[0]], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        m = max(int(s.item()) for s in sizes)
        pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype)
        out = [torch.zeros((m, *t.shape[1:]), dtype=t.dtype) for _ in range(self.world)]
        dist.all_gather(out, torch.cat([t.detach().cpu(), pad]))
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])

    def gather(self, g, ids, weights, fisher):
        g = self._all_gather(g)
        ids = to_numpy(self._all_gather(torch.from_numpy(ids)))
        weights = to_numpy(self._all_gather(torch.from_numpy(weights)))
        fisher = self._all_gather(fisher)
        return g, ids, weights, fisher


def step_weights(loss_reduction: str, b: int, tokens: Any = None) -> np.ndarray:
    """``(b,)`` weights ``w_t(z)`` of a step's examples in the stepped loss.

    ``"mean"``: 1/b; ``"sum"``: 1; ``"token_mean"``: tokens(z) / tokens(B) (``tokens`` required).
    """
    if loss_reduction == "mean":
        return np.full(b, 1.0 / b)
    if loss_reduction == "sum":
        return np.ones(b)
    if tokens is None:
        raise RecorderError('loss_reduction="token_mean" needs step(..., tokens=per-example token counts).')
    t = np.asarray(tokens.detach().cpu() if torch.is_tensor(tokens) else tokens, dtype=np.float64).reshape(-1)
    if t.size != b or (t < 0).any() or t.sum() <= 0:
        raise RecorderError(f"tokens must be {b} non-negative counts with a positive sum, got {t.size} values summing to {t.sum()}.")
    return t / t.sum()


class StepHandle:
    """Yielded by :meth:`Recorder.step`; set ``clip_coef`` after clipping if it is only known then."""

    def __init__(self, index: int, clip_coef: float | None) -> None:
        self.index = index
        self.clip_coef = clip_coef


class Recorder:
    """Records, at every optimizer step, each example's (projected) gradient and the step's lr.

    Args:
        path: where the Zarr v3 run is written (a directory).
        model: the ``torch.nn.Module`` being trained.
        proj_dim: total sketch dimension split over layers (see ``datavalue.capture._projection``),
            a dict ``{block name: k}``, or ``None`` to store exact per-sample gradients.
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
            model has at most this many outputs, else sample ``fisher_samples`` labels per example.
        chunk_rows: rows per Zarr chunk (default: about 4 MiB of gradients).
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
        fisher_max_classes: int = 16,
        fisher_samples: int = 1,
        chunk_rows: int | None = None,
        background: bool = True,
        distributed: bool | None = None,
        record_optimizer_state: bool | None = None,
        hessian_max_dim: int = 4096,
        sketch: str | None = None,
    ) -> None:
        model = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
        if not isinstance(model, nn.Module):
            raise RecorderError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise RecorderError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}.")
        kinds = (curvature,) if curvature is None or isinstance(curvature, str) else tuple(curvature)
        if not kinds or any(c not in CURVATURES for c in kinds):
            raise RecorderError(f"curvature must be one of {CURVATURES} or a sequence of them, got {curvature!r}.")
        if on_nonfinite not in ("raise", "skip"):
            raise RecorderError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        if storage_dtype not in ("float32", "float16", "float64"):
            raise RecorderError(f"storage_dtype must be 'float32', 'float16' or 'float64', got {storage_dtype!r}.")
        if resume and overwrite:
            raise RecorderError("pass at most one of resume=True and overwrite=True.")
        if proj_dim is not None and not isinstance(proj_dim, Mapping) and int(proj_dim) < 1:
            raise RecorderError(f"proj_dim must be a positive int, a dict or None, got {proj_dim!r}.")
        other = _ATTACHED.get(model)
        if other is not None and not other.closed:
            raise RecorderStateError(f"this model already has an open Recorder writing to {other.path}; close it first.")
        self.model = model
        self.optimizer = optimizer
        self.loss_reduction = loss_reduction
        self.on_nonfinite = on_nonfinite
        self.fisher = "fisher" in kinds
        self.hessian = "hessian" in kinds
        self.fisher_max_classes = int(fisher_max_classes)
        self.fisher_samples = int(fisher_samples)
        adam = is_adam(optimizer)
        if record_optimizer_state and not adam:
            raise RecorderError("record_optimizer_state=True needs optimizer= a torch.optim.Adam or AdamW.")
        if adam and (getattr(unwrap_optimizer(optimizer), "defaults", {}).get("amsgrad") and record_optimizer_state):
            raise RecorderError("record_optimizer_state does not support amsgrad=True.")
        self.record_optimizer_state = adam if record_optimizer_state is None else bool(record_optimizer_state)
        try:
            self.engine = Engine(model, proj_dim=proj_dim, seed=seed, layers=layers,
                                 sketch=resolve_sketch(path, sketch, resume), optimizer=optimizer)
        except ValueError as exc:
            if isinstance(exc, RecorderError):
                raise
            raise RecorderError(f"cannot split proj_dim={proj_dim!r} over the model's blocks: {exc}") from exc
        if self.hessian and self.engine.k > int(hessian_max_dim):
            raise RecorderError(
                f"curvature='hessian' with k={self.engine.k} columns costs {self.engine.k} Hessian-vector products and "
                f"{self.engine.k}^2 stored numbers per step, above hessian_max_dim={int(hessian_max_dim)}. Use a smaller "
                "proj_dim, curvature='fisher', or raise hessian_max_dim if you mean it."
            )
        self._fisher_gen = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)
        manifest = base_manifest(
            self.engine, model, loss_reduction=loss_reduction, optimizer=optimizer,
            fisher={"max_classes": self.fisher_max_classes, "samples": self.fisher_samples} if self.fisher else None,
            hessian={"kind": "exact", "sketch": "both sides"} if self.hessian else None,
        )
        mode = "resume" if resume else ("overwrite" if overwrite else "create")
        self._dist = _DistInfo.detect(distributed)
        if self.hessian and self._dist.world > 1:
            raise RecorderError("curvature='hessian' is not supported under torch.distributed; use curvature='fisher'.")
        self.writer: RunWriter | None = None
        if self._dist.rank == 0:
            try:
                self.writer = RunWriter(path, manifest, k=self.engine.k, mode=mode, chunk_rows=chunk_rows,
                                        storage_dtype=storage_dtype, fisher=self.fisher, background=background)
            except Exception:
                self._dist.broadcast_int(-1)
                raise
        start = self._dist.broadcast_int(self.writer.steps if self.writer is not None else 0)
        if start < 0:
            raise RecorderStateError("rank 0 could not open the run (see its error); this rank stops too.")
        self.path = Path(path)
        self._next_step = start
        self._active: StepHandle | None = None
        self.closed = False
        self._fisher_rows: list[torch.Tensor] = []
        self._hessian: torch.Tensor | None = None
        self._weights_t: torch.Tensor | None = None
        self.engine.attach(root_hook=self._on_model_output if self.fisher else None)
        _ATTACHED[model] = self
        logger.info("recording %s: %d blocks, k=%d, starting at step %d", self.path, len(self.engine.blocks), self.engine.k, self._next_step)

    # ------------------------------------------------------------------ info
    @property
    def proj_dim(self) -> int:
        """Actual number of gradient columns stored per occurrence."""
        return self.engine.k

    @property
    def blocks(self) -> list[dict[str, Any]]:
        return [b.to_json() for b in self.engine.blocks]

    @property
    def n_steps(self) -> int:
        """Steps recorded so far (including those of a resumed run)."""
        return self._next_step

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
        """
        if self.closed:
            raise RecorderStateError("this Recorder is closed; open a new one with resume=True to record more steps.")
        if self._active is not None:
            raise RecorderStateError("rec.step() blocks cannot be nested: close the current step before starting another.")
        ids = parse_sample_ids(sample_ids)
        if lr is None and self.optimizer is None:
            raise RecorderError("no lr: pass rec.step(..., lr=...) or create the Recorder with optimizer=...")
        if lr is not None and not (np.isfinite(float(lr)) and float(lr) >= 0):
            raise RecorderError(f"lr must be a finite, non-negative number, got {lr!r}.")
        weights = step_weights(self.loss_reduction, ids.size, tokens)
        if self.hessian and hessian_loss is None:
            raise RecorderError(
                "this Recorder records curvature='hessian': pass rec.step(..., hessian_loss=lambda: loss_fn(model(x), y)), "
                "a closure recomputing the batch's stepped loss."
            )
        if hessian_loss is not None and not self.hessian:
            raise RecorderError("hessian_loss= is only used with Recorder(..., curvature='hessian').")
        self._hessian = None
        if hessian_loss is not None:
            from datavalue.capture._hessian import sketched_hessian

            with torch.enable_grad():  # at the weights before this step's update; hooks are idle
                self._hessian = sketched_hessian(self.model, hessian_loss, self.engine)
        handle = StepHandle(self._next_step, clip_coef)
        self._active = handle
        self._fisher_rows = []
        self._weights_t = torch.as_tensor(weights / self._dist.world, dtype=self.engine.dtype, device=self.engine.device)
        self.engine.begin(ids.size)
        ok = False
        try:
            yield handle
            ok = True
        finally:
            sink = self.engine.end()
            self._active = None
            if ok:
                self._finish(handle, ids, weights, sink, lr, epoch)

    def _finish(self, handle: StepHandle, ids, weights, sink, lr, epoch) -> None:
        eng = self.engine
        if eng.n_grad_events == 0:
            raise RecorderStateError(
                "no backward pass reached the model inside rec.step(): call loss.backward() inside the with-block "
                f"(forward calls seen: {eng.n_forward_events})."
            )
        g = eng.assemble(sink, ids.size)
        w = torch.as_tensor(weights, dtype=g.dtype, device=g.device)
        g = g / w.unsqueeze(1)  # captured: grad of w*l; stored: grad of l
        weights = np.asarray(weights, np.float64) / self._dist.world  # DDP averages the ranks' gradients
        fisher_t = torch.cat(self._fisher_rows) if self._fisher_rows else torch.zeros(0, eng.k, dtype=g.dtype, device=g.device)
        if self._dist.world > 1:
            g, ids, weights, fisher_t = self._dist.gather(g, ids, weights, fisher_t)
            if np.unique(ids).size != ids.size:
                raise RecorderError(f"step {handle.index}: sample ids repeat across ranks; each example needs a unique id.")
        b = ids.size
        flags = np.zeros(b, np.uint8)
        finite = torch.isfinite(g).all(1)
        if not bool(finite.all()):
            bad = ids[~to_numpy(finite)]
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"step {handle.index}: non-finite per-sample gradients for sample ids {bad[:10].tolist()}; nothing was "
                    "written for this step. Fix the loss, or pass on_nonfinite='skip' to store zeros and flag the rows."
                )
            logger.warning("step %d: %d non-finite rows stored as zeros and flagged", handle.index, bad.size)
            g = torch.where(finite.unsqueeze(1), g, torch.zeros_like(g))
            flags[~to_numpy(finite)] |= FLAG_NONFINITE
        fisher = np.nan_to_num(to_numpy(fisher_t), nan=0.0, posinf=0.0, neginf=0.0) if self.fisher else None
        fields = step_fields(self.optimizer, self.model, self.engine, record_state=self.record_optimizer_state, lr=lr)
        extra = fields.pop("extra")
        if self._hessian is not None:
            H = to_numpy(self._hessian)
            if not np.all(np.isfinite(H)):
                if self.on_nonfinite == "raise":
                    raise NonFiniteError(
                        f"step {handle.index}: the Hessian of hessian_loss is non-finite; nothing was written for this "
                        "step. Fix the loss, or pass on_nonfinite='skip' (the step's Hessian is then stored as NaN and "
                        "a curvature='hessian' build stops there)."
                    )
                H = np.full_like(H, np.nan)
            extra = dict(extra or {}, hessian=H)
        self._next_step += 1
        if self.writer is None:  # not rank 0
            return
        self.writer.submit(StepBlock(
            step=handle.index, sample_id=ids, weight=np.asarray(weights, np.float64), grads=to_numpy(g), flags=flags,
            epoch=-1 if epoch is None else int(epoch),
            grad_scale=1.0 if handle.clip_coef is None else float(handle.clip_coef),
            fisher=fisher, extra=extra, **fields,
        ))

    # ------------------------------------------------------------------ fisher
    def _on_model_output(self, output: Any) -> None:
        """Root forward hook: true-Fisher pseudo-gradients while the graph is still alive."""
        eng = self.engine
        if self._active is None or eng.sink is None or eng._replaying or not torch.is_grad_enabled():
            return
        logits = _logits_of(output)
        if logits is None or not logits.requires_grad:
            return
        b = logits.shape[0]
        C = logits.shape[-1]
        p = torch.softmax(logits.detach().to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
        n_pos = int(np.prod(logits.shape[1:-1])) if logits.dim() > 2 else 1
        sw = self._weights_t.to(p.dtype).sqrt().reshape((b,) + (1,) * (logits.dim() - 1)) / n_pos
        grad_sink, rows = eng.sink, []
        try:
            if C <= self.fisher_max_classes:
                for c in range(C):
                    onehot = torch.zeros_like(p)
                    onehot[..., c] = 1.0
                    v = sw * p[..., c : c + 1].sqrt() * (p - onehot)
                    rows.append(self._pseudo_pass(logits, v.to(logits.dtype), b))
            else:
                for _ in range(self.fisher_samples):
                    flat = p.reshape(-1, C).cpu()
                    yhat = torch.multinomial(flat, 1, generator=self._fisher_gen).reshape(p.shape[:-1]).to(p.device)
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
        """Block until every recorded step is committed to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush pending steps, detach hooks. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.engine.detach()
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: never lose queued steps
        try:
            if not self.closed:
                self.close()
        except Exception:
            pass


def base_manifest(engine: Engine, model: nn.Module, *, loss_reduction: str, optimizer: Any,
                  fisher: dict[str, Any] | None = None, hessian: dict[str, Any] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """The run manifest every torch recorder writes (see ``docs/store-format.md``)."""
    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": package_versions("torch", "numpy", "zarr"),
        "projection": engine.projection_json(),
        "model_fingerprint": fingerprint_params(trainable_fingerprint(model)),
        "model_class": type(model).__qualname__,
        "loss_reduction": loss_reduction,
        "curvature": {"fisher": fisher, **({"hessian": hessian} if hessian else {})},
        "capture_dtype": str(engine.dtype).replace("torch.", ""),
        "optimizer": optimizer_config(optimizer),
        **extra,
    }


def _logits_of(output: Any) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None
