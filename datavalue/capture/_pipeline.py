"""One step pipeline for every recorder: a step's ids, weights and captured rows -> ``StepBlock``.

The torch :class:`~datavalue.Recorder`, the Hugging Face ``DataValueCallback`` (which drives a
``Recorder``) and the :class:`~datavalue.capture.jax.JaxRecorder` differ in how they *see* a step
(hooks in a ``with`` block, a Trainer's micro-batches, a jitted ``vmap(grad)``); what they do with
it is decided here only: validation of ids and weights, the gather across ``torch.distributed``
ranks, non-finite rows (raise, or store zeros and flag), the ``StepBlock``, and the writer's
lifecycle (rank 0 owns the run; the other ranks learn where it starts).

Example (what a recorder does with one step, here without any framework)::

    >>> import os, tempfile, numpy as np, datavalue
    >>> from datavalue.capture import StepSink, parse_sample_ids, step_weights
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> sink = StepSink(path, {"projection": {"k": 2}}, k=2)
    >>> ids = parse_sample_ids([3, 7])
    >>> sink.submit(ids, step_weights("mean", 2), np.array([[1.0, 0.0], [0.0, 2.0]]), lr=0.1)
    0
    >>> sink.close()
    >>> datavalue.store.open_run(path).sample_id.tolist()
    [3, 7]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from datavalue.errors import NonFiniteError, RecorderError, RecorderStateError
from datavalue.store import FLAG_NONFINITE, RunWriter, StepBlock

logger = logging.getLogger(__name__)

__all__ = ["DistInfo", "StepSink", "parse_sample_ids", "step_weights"]

LOSS_REDUCTIONS = ("mean", "sum", "token_mean")


def parse_sample_ids(sample_ids: Any) -> np.ndarray:
    """Validate ids (tensor, array, list or range of ints) into a 1-d int64 array without duplicates."""
    if hasattr(sample_ids, "detach") and hasattr(sample_ids, "cpu"):  # a torch tensor, without importing torch
        sample_ids = _tensor_to_numpy("sample_ids", sample_ids)
    if isinstance(sample_ids, range) and len(sample_ids) and all(
            -(2**63) < v < 2**63 for v in (sample_ids[0], sample_ids[-1])):
        # distinct ints by construction: no per-id Python checks (0.5 ms a step of 128 ids, issue 20)
        return np.arange(sample_ids.start, sample_ids.stop, sample_ids.step, dtype=np.int64)
    if isinstance(sample_ids, (list, tuple, range)):
        vals = list(sample_ids)
        bools = [v for v in vals if isinstance(v, (bool, np.bool_))]
        if bools:  # numpy would store True as id 1
            raise RecorderError(f"sample_ids must be integers, got the bool {bools[0]!r} among them; pass int ids "
                                "(a bool is not an id).")
        # Python ints stay exact: numpy would turn [1, 2**63] into float64 and lose the offending value
        ints = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals)
        arr = np.array(vals, dtype=object) if ints and vals else np.asarray(vals)
    else:
        arr = np.asarray(sample_ids)
    if arr.ndim != 1:
        raise RecorderError(f"sample_ids must be 1-d (one id per example), got shape {arr.shape}.")
    if arr.size == 0:
        raise RecorderError("sample_ids is empty; a step needs at least one example.")
    big: list[Any] = []
    if arr.dtype == object and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.tolist()):
        big = [v for v in arr.tolist() if not -(2**63) <= int(v) < 2**63]
        if not big:
            arr = arr.astype(np.int64)
    elif arr.dtype.kind == "u":  # uint64 values >= 2**63 would wrap to negative ids
        big = arr[arr > np.iinfo(np.int64).max].tolist()
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))]
            raise RecorderError(f"sample_ids must be integers, got non-integral float ids {bad[:3].tolist()}; map your "
                                "keys to int ids first.")
        # float64 has no value at 2**63 - 1: anything >= 2**63 (or < -2**63) is outside int64
        big = arr[(arr >= 2.0**63) | (arr < -(2.0**63))].tolist()
        if not big:
            arr = arr.astype(np.int64)
    if big:
        raise RecorderError(f"sample ids must fit in int64 (-2**63 .. 2**63-1); got {big[:3]}. Map your keys to "
                            "smaller int ids.")
    if not np.issubdtype(arr.dtype, np.integer):
        raise RecorderError(f"sample_ids must be integers, got dtype {arr.dtype}; map your keys to int ids first.")
    arr = arr.astype(np.int64)
    if (arr == np.iinfo(np.int64).min).any():  # the store's marker of rows not written yet
        raise RecorderError("sample id -2**63 is reserved (the store marks unwritten rows with it); map your keys to "
                            "other int ids.")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise RecorderError(
            f"sample_ids repeats ids {uniq[counts > 1][:5].tolist()} within one step; each example in a batch needs its "
            "own id (an example drawn twice in one batch: give each copy a distinct id)."
        )
    return arr


def parse_tokens(tokens: Any) -> np.ndarray:
    """Per-example token counts as ``(b,)`` float64: whole numbers (an int or float dtype holding
    integral values); bools (a mask passed for its counts), fractions, NaN and non-numbers are refused.
    Shared by ``rec.step``, ``rec.microbatch`` and ``FinalPass.batch``."""
    t = tokens
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    raw = np.asarray(t)
    if raw.dtype == bool or (isinstance(tokens, (list, tuple)) and any(isinstance(v, (bool, np.bool_)) for v in tokens)):
        raise RecorderError(
            f"tokens must be per-example token counts (ints), got bools {raw.reshape(-1)[:4].tolist()}; a bool is not a "
            "count. Pass the counts, e.g. tokens=(labels != -100).sum(1) (a mask's .sum(1), not the mask)."
        )
    if not np.issubdtype(raw.dtype, np.number):
        raise RecorderError(f"tokens must be per-example token counts (ints that fit in int64), got "
                            f"{raw.reshape(-1)[:4].tolist()} (dtype {raw.dtype}).")
    t = raw.astype(np.float64).reshape(-1)
    if not (np.isfinite(t) & (t == np.round(t))).all():
        bad = t[~(np.isfinite(t) & (t == np.round(t)))]
        raise RecorderError(
            f"tokens must be whole token counts, got {bad[:3].tolist()}: under loss_reduction='token_mean' each "
            "example's weight is its count over the batch's. For per-example weights of your own use "
            "loss_reduction='sum' with the weights inside the loss."
        )
    return t


def step_weights(loss_reduction: str, b: int, tokens: Any = None) -> np.ndarray:
    """``(b,)`` weights ``w_t(z)`` of a step's examples in the stepped loss.

    ``"mean"``: 1/b; ``"sum"``: 1; ``"token_mean"``: tokens(z) / tokens(B) (``tokens`` required).
    """
    if loss_reduction not in LOSS_REDUCTIONS:
        raise RecorderError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}.")
    if loss_reduction == "mean":
        return np.full(b, 1.0 / b)
    if loss_reduction == "sum":
        return np.ones(b)
    if tokens is None:
        raise RecorderError('loss_reduction="token_mean" needs step(..., tokens=per-example token counts).')
    t = parse_tokens(tokens)
    if t.size != b or (t < 0).any() or t.sum() <= 0:
        raise RecorderError(f"tokens must be {b} non-negative counts with a positive sum, got {t.size} values summing to {t.sum()}.")
    return t / t.sum()


@dataclass(frozen=True)
class DistInfo:
    """``torch.distributed`` bookkeeping: rank, world size, and the collectives a recorder needs.

    The default (rank 0 of 1) is what every single-process recorder (and JAX) uses; torch is
    imported only by the collectives, which run only when ``world > 1``.
    """

    rank: int = 0
    world: int = 1

    @staticmethod
    def detect(flag: bool | None) -> DistInfo:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if flag and not on:
            raise RecorderError("distributed=True but no torch.distributed process group with more than one rank is initialised.")
        if flag is False or not on:
            return DistInfo()
        return DistInfo(dist.get_rank(), dist.get_world_size())

    def broadcast_int(self, value: int) -> int:
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(t, src=0)
        return int(t.item())

    def all_sum(self, value: Any) -> Any:
        """Sum over ranks of a float or a numpy array (the value itself on one process)."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.as_tensor(np.asarray(value, dtype=np.float64)).clone()
        dist.all_reduce(t)
        return float(t.item()) if np.ndim(value) == 0 else t.numpy()

    def all_gather_rows(self, a: np.ndarray) -> np.ndarray:
        """Concatenate ranks' arrays along axis 0 (different lengths allowed), in rank order."""
        if self.world == 1:
            return a
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(a))
        n = torch.tensor([t.shape[0]], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        m = max(int(s.item()) for s in sizes)
        pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype)
        out = [torch.zeros((m, *t.shape[1:]), dtype=t.dtype) for _ in range(self.world)]
        dist.all_gather(out, torch.cat([t, pad]))
        return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)]).numpy()

    def all_gather_packed(self, arrays: list[np.ndarray], *, capacity: int = 0) -> tuple[list[np.ndarray], int]:
        """Concatenate each of ``arrays`` over ranks along axis 0 (rank order) in one collective.

        Every array travels as its raw bytes (no pickle, no conversion: the result is bit for bit
        what :meth:`all_gather_rows` gives), packed into one ``int64`` buffer per rank behind a
        header of ``1 + 1 + 3 n`` words (words used, ``n``; per array: dtype, rows, bytes). The
        buffers have a fixed length, ``capacity`` words, that every rank agrees on: when a rank's
        step needs more, the first gather carries the headers only and a second one, at the
        largest size needed, the data; the caller keeps the returned capacity for the next call.
        So the steady state is one ``all_gather`` per step (the per-rank sizes change only with
        the batch size) where :meth:`all_gather_rows` took two per array.

        Args:
            arrays: the same number of arrays on every rank, each ``(rows_r, *trailing)`` with the
                same trailing shape on every rank (rows may differ).
            capacity: the buffer length in words that the previous call returned (``0``: none yet).

        Returns:
            ``(gathered, capacity)``.
        """
        if self.world == 1:
            return list(arrays), capacity
        import torch
        import torch.distributed as dist

        arrays = [np.ascontiguousarray(a) for a in arrays]
        n = len(arrays)
        head = 2 + 3 * n
        sizes = [(a.nbytes + 7) // 8 for a in arrays]
        need = head + sum(sizes)
        length = max(int(capacity), head)
        buf = np.zeros(length, np.int64)
        buf[0], buf[1] = need, n
        for i, a in enumerate(arrays):
            buf[2 + 3 * i: 5 + 3 * i] = (_dtype_code(a.dtype), a.shape[0], a.nbytes)

        def pack(buf: np.ndarray) -> None:
            raw, at = buf.view(np.uint8), head * 8
            for a, words in zip(arrays, sizes):
                raw[at: at + a.nbytes] = a.reshape(-1).view(np.uint8)
                at += words * 8

        if need <= length:
            pack(buf)
        out = [torch.empty(length, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(out, torch.from_numpy(buf))
        bufs = [o.numpy() for o in out]
        if any(int(b[1]) != n for b in bufs):
            raise RecorderError(f"rank {self.rank} gathers {n} arrays per step but another rank gathers "
                                f"{[int(b[1]) for b in bufs]}; every rank must record with the same settings.")
        most = max(int(b[0]) for b in bufs)
        if most > length:  # a rank's step outgrew the agreed buffers: gather again at the size needed
            length = most
            buf = np.concatenate([buf[:head], np.zeros(length - head, np.int64)])
            pack(buf)
            out = [torch.empty(length, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(out, torch.from_numpy(buf))
            bufs = [o.numpy() for o in out]
        gathered = []
        for i, a in enumerate(arrays):
            parts = []
            for b in bufs:
                at = head + sum(int((b[2 + 3 * j + 2] + 7) // 8) for j in range(i))
                code, rows, nbytes = (int(x) for x in b[2 + 3 * i: 5 + 3 * i])
                dt = _dtype_of(code)
                if rows * int(np.prod(a.shape[1:], dtype=np.int64)) * dt.itemsize != nbytes:
                    raise RecorderError(f"array {i} of a rank has {rows} rows of {nbytes} bytes in all; rank "
                                        f"{self.rank}'s rows are {a.shape[1:]} each: every rank must record the same k.")
                parts.append(b.view(np.uint8)[at * 8: at * 8 + nbytes].view(dt).reshape(rows, *a.shape[1:]))
            gathered.append(np.concatenate(parts))
        return gathered, length


def _dtype_code(dt: np.dtype) -> int:
    """A numpy dtype as one int64 word (its ``dtype.str``, at most 8 ASCII bytes)."""
    code = np.dtype(dt).str.encode("ascii")
    if len(code) > 8 or np.dtype(dt).hasobject:
        raise RecorderError(f"cannot gather arrays of dtype {dt} across ranks; rows must be numeric.")
    return int.from_bytes(code.ljust(8, b"\0"), "little", signed=True)


def _dtype_of(code: int) -> np.dtype:
    return np.dtype(int(code).to_bytes(8, "little", signed=True).rstrip(b"\0").decode("ascii"))


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch, without importing it
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        return a.numpy()
    return np.asarray(a)


#: A row whose float16 copy is off by more than this fraction of its norm lost most of it (underflow).
NARROW_RTOL = 0.5


def _narrow(a: np.ndarray, step: int, ids: np.ndarray | None, what: str, on_nonfinite: str) -> tuple[np.ndarray, np.ndarray]:
    """``a`` (finite rows) cast to float16, and the rows that overflowed there (``on_nonfinite="skip"``).

    float16 holds magnitudes from about 6e-8 (subnormal) to 65504. A row with an entry above the
    range becomes inf: refused (``on_nonfinite="raise"``) or stored as zeros and flagged like any
    non-finite row. A non-zero row that the cast zeroes, or that keeps less than half its norm
    (:data:`NARROW_RTOL`), is refused whatever ``on_nonfinite`` says: it is not a bad loss but a
    storage too narrow for the gradients, and storing it would silently give zero influence.
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        h = a.astype(np.float16)
    over = ~np.isfinite(h).all(1)
    who = (lambda rows: f"sample ids {ids[rows][:10].tolist()}") if ids is not None else (lambda rows: f"rows {np.flatnonzero(rows)[:10].tolist()}")
    if over.any():
        if on_nonfinite == "raise":
            raise NonFiniteError(
                f"step {step}: {what} of {who(over)} exceed float16's range (largest |value| "
                f"{float(np.abs(a[over]).max()):.3g} > 65504) under storage_dtype='float16'; nothing was written for "
                "this step. Record with storage_dtype='float32' (or scale the loss down), or pass on_nonfinite='skip' "
                "to store those rows as zeros and flag them.")
        logger.warning("step %d: %d rows of %s overflow float16 storage; stored as zeros and flagged", step,
                       int(over.sum()), what)
    a64 = a.astype(np.float64)
    norm = np.sqrt(np.einsum("ij,ij->i", a64, a64))
    with np.errstate(over="ignore", invalid="ignore"):
        err = np.sqrt(np.einsum("ij,ij->i", h - a64, h - a64))
    lost = ~over & (norm > 0) & ~(err <= NARROW_RTOL * norm)
    if lost.any():
        zeroed = ~h[lost].any(1)
        raise RecorderError(
            f"step {step}: {what} of {who(lost)} underflow float16 storage (row norms down to "
            f"{float(norm[lost].min()):.3g}; {int(zeroed.sum())} of these {int(lost.sum())} rows would be stored as "
            f"exact zeros, the others lose more than {NARROW_RTOL:.0%} of their norm): float16 keeps no magnitude "
            "below 6e-8, so these examples would get zero or wrong influence. Record with storage_dtype='float32' "
            "(or scale the loss up); nothing was written for this step.")
    return h, over


class StepSink:
    """Turns each step's ids, weights and captured rows into a committed ``StepBlock``.

    Owns the run's writer (on rank 0); every recorder submits through :meth:`submit`, so the
    checks and the stored layout are the same whatever the training loop.

    Args:
        path, manifest, k, mode, chunk_rows, storage_dtype, fisher, background: the
            :class:`~datavalue.store.RunWriter`'s (``mode`` is ``"create"``, ``"overwrite"`` or
            ``"resume"``).
        on_nonfinite: ``"raise"`` (nothing is written for a step with a non-finite row) or
            ``"skip"`` (such rows are stored as zeros and flagged).
        dist: the ``torch.distributed`` view (default: one process).
        commit_every: the writer's durability bound in steps (:class:`~datavalue.store.RunWriter`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Mapping[str, Any],
        *,
        k: int,
        mode: str = "create",
        chunk_rows: int | None = None,
        storage_dtype: str = "float32",
        fisher: bool = False,
        background: bool = True,
        on_nonfinite: str = "raise",
        dist: DistInfo | None = None,
        commit_every: int = 32,
    ) -> None:
        if on_nonfinite not in ("raise", "skip"):
            raise RecorderError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        self.dist = dist or DistInfo()
        self.on_nonfinite = on_nonfinite
        self.fisher = bool(fisher)
        self.storage_dtype = str(storage_dtype)
        self.k = int(k)
        self.writer: RunWriter | None = None
        if self.dist.rank == 0:
            try:
                self.writer = RunWriter(path, dict(manifest), k=self.k, mode=mode, chunk_rows=chunk_rows,
                                        storage_dtype=storage_dtype, fisher=self.fisher, background=background,
                                        commit_every=commit_every)
            except Exception:
                self.dist.broadcast_int(-1)
                raise
        #: rows per chunk (the writer's; on other ranks the writer's default, for memory bounds)
        self.chunk_rows = self.writer.chunk_rows if self.writer is not None else int(
            chunk_rows or RunWriter.default_chunk_rows(self.k))
        start = self.dist.broadcast_int(self.writer.steps if self.writer is not None else 0)
        if start < 0:
            raise RecorderStateError("rank 0 could not open the run (see its error); this rank stops too.")
        self.next_step = start
        self.closed = False
        self._held: tuple[int, StepBlock | None] | None = None
        self._gather_words = 0  # the agreed length of all_gather_packed's buffers

    def submit(
        self,
        ids: np.ndarray,
        weights: np.ndarray,
        grads: Any,
        *,
        lr: float,
        epoch: int | None = None,
        grad_scale: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        fisher: Any = None,
        extra: Mapping[str, Any] | None = None,
        hessian: Any = None,
        hold: bool = False,
    ) -> int:
        """Commit one optimizer step; returns its index.

        Args:
            ids: ``(b,)`` this rank's sample ids (:func:`parse_sample_ids`).
            weights: ``(b,)`` each example's weight in the *global* stepped loss (after the
                average over ranks that DDP takes).
            grads: ``(b, k)`` unweighted per-sample gradients (torch or numpy).
            fisher: ``(f, k)`` pseudo-gradient rows (weights included) when the run records them.
            extra: optional per-step entries (the optimizer's state, see ``_optim.step_fields``).
            hessian: ``(k, k)`` sketched Hessian of the step (``curvature="hessian"``).
            hold: keep the step back until :meth:`release` (then it is written) or :meth:`drop`
                (then it never is): a recorder holds each step until its optimizer update is seen
                to apply what the step records. It counts as submitted (``next_step``) and against
                the writer's durability bound while held; one step at a time.
        """
        if self.closed:
            raise RecorderStateError("this run's step pipeline is closed; open a new recorder with resume=True.")
        step = self.next_step
        ids = np.asarray(ids, np.int64)
        weights = np.asarray(weights, np.float64).reshape(-1)
        g = _to_numpy(grads)
        if g.ndim != 2 or g.shape != (ids.size, self.k) or weights.shape != ids.shape:
            raise RecorderError(
                f"step {step}: expected ({ids.size}, {self.k}) gradient rows and {ids.size} weights for {ids.size} ids, "
                f"got rows {g.shape} and {weights.size} weights."
            )
        if not np.all(np.isfinite(weights)) or (weights < 0).any():
            raise RecorderError(f"step {step}: example weights must be finite and non-negative, got {weights[:5]}...")
        f = None if fisher is None else _to_numpy(fisher)
        if self.fisher and f is None:
            f = np.zeros((0, self.k), g.dtype)
        if self.dist.world > 1:  # one collective per step (two when a rank's step outgrows the buffers)
            parts = [g, ids, weights] + ([f] if f is not None else [])
            parts, self._gather_words = self.dist.all_gather_packed(parts, capacity=self._gather_words)
            g, ids, weights = parts[:3]
            if f is not None:
                f = parts[3]
            if np.unique(ids).size != ids.size:
                raise RecorderError(f"step {step}: sample ids repeat across ranks; each example needs a unique id.")
        flags = np.zeros(ids.size, np.uint8)
        finite = np.isfinite(g).all(1)
        if not finite.all():
            bad = ids[~finite]
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"step {step}: non-finite per-sample gradients for sample ids {bad[:10].tolist()}; nothing was "
                    "written for this step. Fix the loss, or pass on_nonfinite='skip' to store zeros and flag the rows."
                )
            logger.warning("step %d: %d non-finite rows stored as zeros and flagged", step, bad.size)
            g = np.where(finite[:, None], g, 0).astype(g.dtype, copy=False)
            flags[~finite] |= FLAG_NONFINITE
        if f is not None:
            f = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
        if self.storage_dtype == "float16":  # checked after the cast: what is stored is what counts
            g, lost = _narrow(g, step, ids, "per-sample gradients", self.on_nonfinite)
            g[lost] = 0
            flags[lost] |= FLAG_NONFINITE
            if f is not None and f.size:
                f, lost_f = _narrow(f, step, None, "Fisher pseudo-gradients", self.on_nonfinite)
                f[lost_f] = 0
        extra = dict(extra) if extra else None
        if hessian is not None:
            H = _to_numpy(hessian)
            if not np.all(np.isfinite(H)):
                if self.on_nonfinite == "raise":
                    raise NonFiniteError(
                        f"step {step}: the Hessian of hessian_loss is non-finite; nothing was written for this "
                        "step. Fix the loss, or pass on_nonfinite='skip' (the step's Hessian is then stored as NaN and "
                        "a curvature='hessian' build stops there)."
                    )
                H = np.full_like(H, np.nan)
            extra = dict(extra or {}, hessian=H)
        if self._held is not None:
            raise RecorderStateError(f"internal: step {self._held[0]} is still held; release or drop it first.")
        if self.writer is not None:  # rank 0 commits
            block = StepBlock(
                step=step, sample_id=ids, weight=weights, grads=g, flags=flags, lr=float(lr),
                epoch=-1 if epoch is None else int(epoch), grad_scale=1.0 if grad_scale is None else float(grad_scale),
                momentum=float(momentum), weight_decay=float(weight_decay), fisher=f, extra=extra,
            )
            if hold:
                self.writer.check_block(block)
                self.writer.wait_for_room()  # the held step counts against the durability bound
            else:
                self.writer.submit(block)
        else:
            block = None
        if hold:
            self._held = (step, block)
        self.next_step += 1  # after the writer took it: a step it refused is not counted
        return step

    @property
    def held(self) -> int | None:
        """The index of the step held back (``submit(..., hold=True)``), or ``None``."""
        return None if self._held is None else self._held[0]

    def release(self) -> None:
        """Submit the held step to the writer (its update was applied)."""
        if self._held is None:
            return
        _, block = self._held
        self._held = None
        if block is not None:
            self.writer.submit(block)

    def drop(self) -> int | None:
        """Forget the held step: nothing of it is written and its index is free again. Returns it."""
        if self._held is None:
            return None
        step, _ = self._held
        self._held = None
        self.next_step -= 1
        return step

    def flush(self) -> None:
        """Block until every submitted step is committed to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the writer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._held is not None:  # the recorder decides (release or drop) before it closes the sink
            logger.warning("step %d was held back when the step pipeline closed; it was not written", self.drop())
        if self.writer is not None:
            self.writer.close()


def parse_lr(lr: Any) -> float:
    """A step's learning rate: a finite, non-negative real number or a one-element tensor."""
    value = lr
    if hasattr(lr, "detach") and hasattr(lr, "numel"):  # a torch tensor, without importing torch
        if lr.numel() != 1:
            raise RecorderError(f"lr must be one number, got a tensor of shape {tuple(lr.shape)}; pass the step's "
                                "learning rate (e.g. optimizer.param_groups[0]['lr']).")
        value = _tensor_to_numpy("lr", lr, scalar=True)
    elif hasattr(lr, "__array__") and not isinstance(lr, (np.ndarray, np.generic)):  # a jax array, without importing jax
        lr = value = np.asarray(lr)
    if isinstance(value, np.ndarray) and value.shape != ():  # one rule with tensors: one number, not a container
        raise RecorderError(f"lr must be one number, got an array of shape {value.shape}; pass the step's learning "
                            "rate (e.g. float(lr[0]), or optimizer.param_groups[0]['lr']).")
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RecorderError(f"lr must be a finite, non-negative real number, got {lr!r} ({type(lr).__name__}); pass "
                            "e.g. lr=0.1, or omit it and give Recorder(..., optimizer=opt).")
    value = float(value)
    if not (np.isfinite(value) and value >= 0):
        raise RecorderError(f"lr must be a finite, non-negative number, got {lr!r}.")
    return value


def _tensor_to_numpy(name: str, t: Any, *, scalar: bool = False) -> Any:
    """A torch tensor's values on the host (``scalar``: its one value as a Python number); a clear
    error for one that holds none (the meta device) or that numpy cannot hold."""
    try:
        host = t.detach().cpu()
        return host.reshape(()).item() if scalar else np.asarray(host.numpy())
    except Exception as e:  # meta tensors, tensors numpy cannot hold (bfloat16 ids...)
        raise RecorderError(f"{name} must be values the host can read, got a tensor on device "
                            f"{getattr(t, 'device', '?')} of dtype {getattr(t, 'dtype', '?')} ({type(e).__name__}: {e}); "
                            "pass a CPU or GPU tensor, or a list of numbers.") from None


def parse_epoch(epoch: Any) -> int | None:
    """A step's epoch: ``None`` (stored as -1) or a non-negative int; nothing is rounded or coerced."""
    if epoch is None:
        return None
    if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)):
        raise RecorderError(f"epoch must be a non-negative int or None, got {epoch!r} ({type(epoch).__name__}); pass "
                            "the integer epoch (e.g. int(state.epoch) for a fractional one), or omit it.")
    if not 0 <= int(epoch) < 2**63:
        raise RecorderError(f"epoch must be a non-negative int (0 .. 2**63-1), got {epoch!r}; omit it when unknown "
                            "(stored as -1).")
    return int(epoch)


def parse_clip_coef(clip_coef: Any, *, auto: bool = False) -> float | None:
    """A step's gradient clipping coefficient ``min(1, max_norm / norm)``: ``None`` (no clipping, stored
    as 1) or a real number in ``(0, 1]``. ``auto``: the caller also takes the string ``"auto"``."""
    if clip_coef is None:
        return None
    value = clip_coef
    if hasattr(clip_coef, "detach") and hasattr(clip_coef, "numel") and clip_coef.numel() == 1:  # torch, unimported
        value = _tensor_to_numpy("clip_coef", clip_coef, scalar=True)
    elif isinstance(clip_coef, np.ndarray) and clip_coef.size == 1:
        value = clip_coef.reshape(()).item()
    what = "a number in (0, 1], None or 'auto'" if auto else "a number in (0, 1] or None"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RecorderError(f"clip_coef must be {what}, got {clip_coef!r} ({type(clip_coef).__name__}); it is the "
                            "clipping coefficient min(1, max_norm / total_norm) of the step (1 or None: not clipped).")
    value = float(value)
    if not (np.isfinite(value) and 0 < value <= 1):
        raise RecorderError(f"clip_coef must be {what}, got {clip_coef!r}: a clipping coefficient "
                            "min(1, max_norm / total_norm) lies in (0, 1] (1 or None: not clipped). Pass "
                            "min(1.0, max_norm / float(total_norm)) with total_norm from clip_grad_norm_.")
    return value


def parse_seed(seed: Any) -> int:
    """The root seed of the sketches: an int in ``0 .. 2**63-1`` (numpy's SeedSequence takes no negative
    seed; torch's generators, seeded with offsets of it, no more than 64 bits)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) and not (
            hasattr(seed, "__index__") and not isinstance(seed, float)):
        raise RecorderError(f"seed must be an int, got {seed!r} ({type(seed).__name__}).")
    if not 0 <= int(seed) < 2**63:
        raise RecorderError(f"seed must be an int in 0 .. 2**63-1, got {int(seed)}; pick a smaller non-negative seed.")
    return int(seed)

#: Steps the background writer may hold in its queue (``RunWriter(max_queue=)``).
WRITER_QUEUE = 64
#: Bytes of a per-step vector array's chunk at 4 bytes a number (``datavalue.store``'s writer,
#: ``STEP_VECTOR_CHUNK_BYTES``; tests/test_memory_guards.py checks that the two agree).
VECTOR_CHUNK_BYTES = 256 << 10


class StepMemory:
    """The host memory a recorder holds for its steps, and the check before each larger batch.

    Per step of ``b`` examples the recorder holds at most (bytes; ``s`` the capture dtype's size,
    ``F`` Fisher rows per example, ``P`` trainable parameters):

    * the step's rows while it is committed: ``3 b k s`` (captured, divided by the weights, numpy);
    * steps queued for the background writer and buffered until a chunk is full, of which the writer
      never lets more than ``commit_every`` wait uncommitted (``submit`` blocks):
      ``min(commit_every, 64 + ceil(chunk_rows / b)) * (b (1 + F) k s + A)``, where ``A = 2 k 8`` with
      Adam moments (``64``: the writer's queue; none without a background writer);
    * the chunk being written: ``chunk_rows k`` in the storage dtype (twice with Fisher rows, which
      have their own array; the writer keeps each array's tail chunk in one buffer), and with Adam
      moments the tail chunks of ``adam_m`` and ``adam_v`` (``VECTOR_CHUNK_BYTES`` each in float32, or
      one step's ``4 k`` when that is larger; twice in float64 storage);
    * Adam moments read from the optimizer: ``2 k 8`` (float64, in the run's columns: projected runs
      sum each parameter's moments on its device, exact runs copy them into the columns, so nothing of
      size ``P`` is made on the host);
    * ``precondition="adam"``: the step's exact per-sample gradients ``b P s`` and their whitened
      float64 copies ``2 b P 8``.

    :meth:`check` refuses a batch whose bound exceeds ``max_memory`` (or the available memory),
    before anything of the step runs; each batch size is checked once.
    """

    def __init__(self, *, k: int, P: int, chunk_rows: int, capture_itemsize: int, storage_itemsize: int,
                 fisher_rows: int = 0, adam: bool = False, whiten: bool = False, background: bool = True,
                 max_memory: Any = None, commit_every: int | None = None) -> None:
        from datavalue._memory import parse_max_memory

        self.k, self.P, self.chunk_rows = int(k), int(P), int(chunk_rows)
        self.s, self.storage_itemsize = int(capture_itemsize), int(storage_itemsize)
        self.F, self.adam, self.whiten, self.background = int(fisher_rows), bool(adam), bool(whiten), bool(background)
        self.max_memory = parse_max_memory(max_memory, RecorderError)
        self.commit_every = None if commit_every is None else int(commit_every)
        self.checked = 0

    def parts(self, b: int) -> dict[str, int]:
        """The bound's pieces for a batch of ``b`` examples (bytes)."""
        b = max(1, int(b))
        per_step = b * (1 + self.F) * self.k * self.s + (2 * self.k * 8 if self.adam else 0)
        held = (WRITER_QUEUE if self.background else 0) + -(-self.chunk_rows // b)
        if self.commit_every is not None:  # the writer blocks submit() at commit_every uncommitted steps
            held = min(held, self.commit_every)
        chunk = (2 if self.F else 1) * self.chunk_rows * self.k * self.storage_itemsize
        if self.adam:  # adam_m, adam_v: float32, or float64 in float64 storage
            chunk += 2 * max(VECTOR_CHUNK_BYTES, 4 * self.k) * (2 if self.storage_itemsize == 8 else 1)
        out = {"the step's rows": 3 * b * self.k * self.s, "queued and buffered steps": held * per_step,
               "the chunk being written": chunk}
        if self.adam:
            out["Adam moments"] = 2 * self.k * 8
        if self.whiten:
            out["exact per-sample gradients (whitening)"] = b * self.P * (self.s + 16)
        return out

    def check(self, b: int) -> None:
        """Refuse a batch of ``b`` examples whose bound does not fit (once per larger batch)."""
        if b <= self.checked:
            return
        from datavalue._memory import check_memory

        parts = self.parts(b)
        big = dict(sorted(parts.items(), key=lambda kv: -kv[1])[:3])
        check_memory(
            sum(parts.values()), what=f"recording a step of {b} examples", parts=big, error=RecorderError,
            max_memory=self.max_memory,
            fixes=("record with a smaller proj_dim (k) or smaller batches, a smaller chunk_rows=, background=False (no "
                   "write queue)" + (", or precondition='none' (whitening holds b x P exact gradients)" if self.whiten
                                     else "")),
        )
        self.checked = b
