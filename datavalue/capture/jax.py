"""Record per-sample projected gradients from a JAX / optax training loop.

Same store, same layout, same numpy-seeded sketches as the PyTorch :class:`~datavalue.Recorder`:
a JAX run and a PyTorch run of the same model produce the same vectors, and the rest of the
engine (embeddings, queries, royalties) cannot tell them apart.

Per-sample gradients come from ``jax.vmap(jax.grad(per_example_loss))`` inside one jitted
function that also projects them; :meth:`JaxRecorder.step` returns the batch gradient (the
weighted sum of the per-sample ones), so the training step needs no second backward.

Parameter conventions (a flat or nested dict; nested keys are joined with ``"."``, and two leaves that
would get one name are refused):

* ``"<layer>.weight"`` of shape ``(out, in)`` with optional ``"<layer>.bias"`` ``(out,)``: a
  Kronecker block ``(out) x (in + 1)``, exactly like ``torch.nn.Linear``.
* ``"<layer>.kernel"`` of shape ``(in, out)`` (flax ``Dense``) with optional ``"<layer>.bias"``:
  a Kronecker block ``(in + 1) x (out)``, bias as the last row.
* anything else: a dense block.

Example (optax SGD)::

    import jax, jax.numpy as jnp, optax
    from datavalue.capture.jax import JaxRecorder

    def per_example_loss(params, x, y):           # one example
        h = jnp.tanh(params["0.weight"] @ x + params["0.bias"])
        logits = params["2.weight"] @ h + params["2.bias"]
        return -jax.nn.log_softmax(logits)[y]

    opt = optax.sgd(0.1)
    state = opt.init(params)
    with JaxRecorder("runs/jax.zarr", params, per_example_loss, proj_dim=1024) as rec:
        for ids, x, y in batches:
            grads = rec.step(params, x, y, sample_ids=ids, lr=0.1)   # batch-mean gradient
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)

jax is imported only here; ``import datavalue`` never imports it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from datavalue.capture._exit import _OPEN, ClosesAtExit, _register_at_exit
from datavalue.capture._optim_resume import recorded_manifest, refuse_other_optimizer
from datavalue.capture._pipeline import (
    LOSS_REDUCTIONS,
    StepMemory,
    StepSink,
    parse_clip_coef,
    parse_epoch,
    parse_lr,
    parse_sample_ids,
    parse_seed,
    step_weights,
)
from datavalue.capture._projection import (
    SIDE_COLS,
    SIDE_DENSE,
    SIDE_ROWS,
    projection_matrix,
    resolve_sketch,
    split_budget,
)
from datavalue.errors import RecorderError, RecorderStateError, StoreMismatchError
from datavalue.store import fingerprint_params, package_versions, run_dir_path

__all__ = ["JaxRecorder", "flatten_params", "plan_blocks"]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> flat ``{"a.b.c": array}`` in insertion order.

    Nested keys are joined with ``"."``, so ``{"a.b": x}`` and ``{"a": {"b": y}}`` would both be named
    ``"a.b"``: a tree in which two leaves get one name is refused (``RecorderError``), since the two
    would otherwise share one value in the loss and one gradient.
    """
    out: dict[str, Any] = {}
    where: dict[str, tuple[Any, ...]] = {}
    _flatten_into(params, prefix, (), out, where)
    return out


def _flatten_into(params: Mapping[str, Any], prefix: str, path: tuple[Any, ...], out: dict[str, Any],
                  where: dict[str, tuple[Any, ...]]) -> None:
    for k, v in params.items():
        name, here = f"{prefix}{k}", (*path, k)
        if isinstance(v, Mapping):
            _flatten_into(v, name + ".", here, out, where)
            continue
        if name in where:
            show = lambda keys: "params" + "".join(f"[{key!r}]" for key in keys)  # noqa: E731
            raise RecorderError(
                f"params has two leaves named {name!r}: {show(where[name])} and {show(here)}. The JaxRecorder names a "
                "leaf by its keys joined with '.', so these two would share one name (one value in the loss, one "
                "gradient, one block of the run). Rename one of the keys (e.g. without '.'), then record.")
        where[name] = here
        out[name] = v


def _unflatten_like(params: Mapping[str, Any], flat: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        out[k] = _unflatten_like(v, flat, name + ".") if isinstance(v, Mapping) else flat[name]
    return out


def plan_blocks(flat: Mapping[str, Any], proj_dim: int | Mapping[str, int] | None) -> list[dict[str, Any]]:
    """Blocks in the PyTorch recorder's manifest format, for parameters named as documented above."""
    drafts = []
    used = set()
    for name, p in flat.items():
        if name in used:
            continue
        shape = tuple(np.shape(p))
        layer, _, leaf = name.rpartition(".")
        bias = f"{layer}.bias" if layer else "bias"
        has_bias = bias in flat and bias not in used and leaf in ("weight", "kernel") and len(shape) == 2
        if leaf == "weight" and len(shape) == 2:
            params = [name, bias] if has_bias else [name]
            drafts.append((name, "linear", "kron", params, (shape[0], shape[1] + has_bias), has_bias, 1))
        elif leaf == "kernel" and len(shape) == 2:
            params = [name, bias] if has_bias else [name]
            drafts.append((name, "dense_kernel", "kron", params, (shape[0] + has_bias, shape[1]), has_bias, 0))
        else:
            drafts.append((name, "dense", "dense", [name], (int(np.prod(shape)),), False, 1))
            params = [name]
        used.update(params)
    ks = split_budget([d[0] for d in drafts], [d[2] for d in drafts], [d[4] for d in drafts], proj_dim)
    blocks, start = [], 0
    for i, ((name, rule, kind, params, shape, has_bias, axis), (kr, kc, k)) in enumerate(zip(drafts, ks)):
        mod = name.rpartition(".")[0]
        blocks.append({"name": name, "index": i, "rule": rule, "kind": kind, "params": list(params), "shape": list(shape),
                       "k_rows": kr, "k_cols": kc, "k": k, "start": start, "stop": start + k, "has_bias": has_bias,
                       "modules": [mod], "bias_axis": axis})
        start += k
    return blocks


def _block_matrix(block: Mapping[str, Any], g: Mapping[str, Any]) -> jnp.ndarray:
    """Per-sample gradient of a block, ``(b, rows, cols)`` for kron or ``(b, n)`` for dense."""
    ps = [g[p] for p in block["params"]]
    b = ps[0].shape[0]
    if block["kind"] == "dense":
        return jnp.concatenate([p.reshape(b, -1) for p in ps], 1)
    if block["bias_axis"] == 1:
        mat = ps[0].reshape(b, block["shape"][0], -1)
        return jnp.concatenate([mat, ps[1].reshape(b, -1, 1)], 2) if block["has_bias"] else mat
    mat = ps[0].reshape(b, -1, block["shape"][1])
    return jnp.concatenate([mat, ps[1].reshape(b, 1, -1)], 1) if block["has_bias"] else mat


_OPT_KEYS = ("kind", "momentum", "weight_decay", "dampening", "nesterov")


def _opt_number(opt: Mapping[str, Any], key: str, hi: float | None = None) -> float:
    v = opt.get(key, 0.0)
    v = 0.0 if v is None else v
    ok = not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating))
    if not ok or not np.isfinite(float(v)) or float(v) < 0 or (hi is not None and float(v) > hi):
        rng = f"in [0, {hi:g}]" if hi is not None else "finite and >= 0"
        raise RecorderError(f"optimizer[{key!r}] must be a number {rng}, got {v!r} ({type(v).__name__}).")
    return float(v)


def _parse_optimizer(optimizer: Any) -> dict[str, Any]:
    """The ``optimizer=`` description of a JaxRecorder, checked, as the manifest records it."""
    if optimizer is None:
        return {"kind": None, "dampening": 0.0, "nesterov": False}
    if not isinstance(optimizer, Mapping):
        raise RecorderError(f"optimizer must be a dict such as {{'kind': 'sgd', 'momentum': 0.9, 'weight_decay': 0.0}} "
                            f"or None, got {optimizer!r} ({type(optimizer).__name__}).")
    unknown = [k for k in optimizer if k not in _OPT_KEYS]
    if unknown:
        raise RecorderError(f"optimizer has unknown keys {unknown}; a JaxRecorder records {list(_OPT_KEYS)} of an SGD "
                            "update.")
    kind = optimizer.get("kind")
    if kind not in (None, "sgd"):
        raise RecorderError(f"optimizer['kind'] must be 'sgd' or None, got {kind!r}: the JaxRecorder does not capture "
                            "Adam's moments, which an Adam-aware build needs. Record an Adam run with the PyTorch "
                            "Recorder, or describe the update as SGD only if it is one.")
    nesterov = optimizer.get("nesterov", False)
    if not isinstance(nesterov, (bool, np.bool_)):
        raise RecorderError(f"optimizer['nesterov'] must be True or False, got {nesterov!r}.")
    opt = {"kind": kind, "momentum": _opt_number(optimizer, "momentum"),
           "weight_decay": _opt_number(optimizer, "weight_decay"),
           "dampening": _opt_number(optimizer, "dampening", hi=1.0), "nesterov": bool(nesterov)}
    if opt["nesterov"] and (opt["momentum"] <= 0 or opt["dampening"] != 0):
        raise RecorderError("optimizer['nesterov']=True needs momentum > 0 and dampening 0 (as torch.optim.SGD and "
                            f"optax.sgd define it), got momentum {opt['momentum']} and dampening {opt['dampening']}.")
    for key in ("momentum", "weight_decay"):  # as given before: only what was said is recorded
        if key not in optimizer:
            del opt[key]
    return opt


def _check_resume_optimizer(path: Any, opt: Mapping[str, Any]) -> None:
    """Refuse to resume a run recorded with another optimizer (the PyTorch Recorder's rule and words:
    a build models one optimizer over the whole run)."""
    manifest = recorded_manifest(path)
    if manifest is None:
        return
    recorded = manifest.get("optimizer")
    refuse_other_optimizer(path, recorded, opt,
                           resume_with=f"the optimizer= description the run was recorded with ({recorded!r})")


#: The writer's durability bound in steps (``StepSink(commit_every=)``), also the memory bound's.
_COMMIT_EVERY = 32


def _jax_scalar(value: Any) -> Any:
    """A 0-d integer jax (or numpy) array as a numpy integer, anything else as given: ``epoch=`` takes
    ``jnp.int32(0)`` as ``lr=`` and ``sample_ids=`` take jax values (P6-14)."""
    if hasattr(value, "__array__") and not isinstance(value, np.generic) and not hasattr(value, "detach"):
        arr = np.asarray(value)
        if arr.shape == () and np.issubdtype(arr.dtype, np.integer):
            return arr[()]
    return value


class _JaxStepMemory(StepMemory):
    """:class:`StepMemory`'s host buffers, plus what the jitted step holds for ``c`` examples at a time
    (``c`` = the batch, or ``vmap_chunk``; ``P`` parameters, ``P_b`` their bytes, ``s`` the capture
    dtype's size):

    * the per-sample gradients of ``jax.vmap(jax.grad(...))``: ``c P_b``;
    * their block matrices in the capture dtype and the sketches' intermediates:
      ``c (P s + sum over kron blocks of k_rows cols s)``;
    * the batch gradient: ``P_b`` plus its sums in at least float32, ``P w``.

    On the CPU backend these are host memory and count against the available memory; on an
    accelerator they are device memory, counted only against an explicit ``max_memory=``.
    """

    def set_device(self, blocks: list[dict[str, Any]], leaf_bytes: Mapping[str, int], wsize: int,
                   vmap_chunk: int | None) -> None:
        self.P_bytes = int(sum(leaf_bytes.values()))
        self.inter = sum(b["k_rows"] * b["shape"][1] for b in blocks if b["kind"] == "kron" and b["k_rows"] < b["shape"][0])
        self.wsize, self.vmap_chunk = int(wsize), vmap_chunk

    def device_parts(self, b: int) -> dict[str, int]:
        c = max(1, min(int(b), self.vmap_chunk or int(b)))
        return {f"per-sample gradients of {c} examples (jax.vmap)": c * self.P_bytes,
                "their block matrices and sketches": c * (self.P + self.inter) * self.s,
                "the batch gradient": self.P_bytes + self.P * self.wsize}

    def check(self, b: int) -> None:
        if b <= self.checked:
            return
        from datavalue._memory import check_memory

        host, device = self.parts(b), self.device_parts(b)
        counted = {**host, **device} if self.max_memory is not None or jax.default_backend() == "cpu" else host
        big = dict(sorted(counted.items(), key=lambda kv: -kv[1])[:3])
        chunk = (f"a smaller vmap_chunk= (now {self.vmap_chunk})" if self.vmap_chunk else
                 "JaxRecorder(..., vmap_chunk=N) (N examples per jax.vmap call: N x P per-sample gradients at a time, "
                 "the same rows and batch gradient)")
        check_memory(sum(counted.values()), what=f"recording a step of {b} examples", parts=big, error=RecorderError,
                     max_memory=self.max_memory,
                     fixes=f"pass {chunk}, smaller batches, a smaller proj_dim (k) or a smaller chunk_rows=")
        self.checked = b


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


def _settings_diff(recorded: Mapping[str, Any], now: Mapping[str, Any], storage_dtype: str) -> list[str]:
    """What differs between a recorded run's manifest and this JaxRecorder's, field by field, in the
    PyTorch Recorder's words (``seed: recorded 0, now 1``)."""
    out = []
    rp, np_ = recorded.get("projection") or {}, now.get("projection") or {}
    for key, default in (("proj_dim", None), ("seed", 0), ("sketch", "gaussian"), ("layers", None)):
        a, b = rp.get(key, default), np_.get(key, default)
        if _canon(a) != _canon(b):
            out.append(f"{key}: recorded {a!r}, now {b!r}")
    ra = ((recorded.get("model_fingerprint") or {}).get("params")) or {}
    na = ((now.get("model_fingerprint") or {}).get("params")) or {}
    gone, new = [n for n in ra if n not in na], [n for n in na if n not in ra]
    if gone:
        out.append(f"parameters in the run, not in params now: {gone[:5]}")
    if new:
        out.append(f"parameters in params now, not in the run: {new[:5]}")
    out += [f"parameter {n!r} shape: recorded {list(ra[n])}, now {list(na[n])}" for n in ra
            if n in na and list(ra[n]) != list(na[n])][:5]
    if not out:  # the same settings and parameters plan the same blocks; anything else is named here
        rb, nb = rp.get("blocks") or [], np_.get("blocks") or []
        if len(rb) != len(nb):
            out.append(f"blocks: recorded {len(rb)}, now {len(nb)}")
        for i, (a, b) in enumerate(zip(rb, nb)):
            out += [f"block {i} ({a.get('name')!r}) {key}: recorded {a.get(key)!r}, now {b.get(key)!r}"
                    for key in sorted(set(a) | set(b)) if _canon(a.get(key)) != _canon(b.get(key))][:3]
    for key, a, b in (("loss_reduction", recorded.get("loss_reduction", "mean"), now.get("loss_reduction")),
                      ("storage_dtype", recorded.get("storage_dtype", "float32"), storage_dtype)):
        if a != b:
            out.append(f"{key}: recorded {a!r}, now {b!r}")
    return out


def _check_resume_settings(path: Any, manifest: Mapping[str, Any], storage_dtype: str) -> None:
    """Refuse to resume a run recorded with other settings, naming each that differs (P6-11)."""
    recorded = recorded_manifest(path)
    if recorded is None:
        return
    diff = _settings_diff(recorded, manifest, storage_dtype)
    if diff:
        raise StoreMismatchError(
            f"{path}: cannot resume: this JaxRecorder's settings (projection, parameters, loss reduction, storage) "
            f"differ from the run's: {'; '.join(diff)}. Re-create the JaxRecorder with the recorded settings "
            "(datavalue.store.open_run(path).manifest['projection'] holds them), or pass overwrite=True to start over.")


class JaxRecorder(ClosesAtExit):
    """Records a JAX training loop into a datavalue run.

    Args:
        path: the run directory (Zarr v3).
        params: the initial parameters (flat or nested dict of arrays).
        per_example_loss: ``per_example_loss(params, *example) -> scalar`` for ONE example.
        proj_dim, seed, loss_reduction, storage_dtype, resume, overwrite, on_nonfinite, sketch: as for the
            PyTorch :class:`~datavalue.Recorder`.
        optimizer: ``{"kind": "sgd", "momentum": .., "weight_decay": .., "dampening": .., "nesterov": ..}``
            recorded into the run (optax transforms are opaque, so say what the update does), or
            ``None`` (plain SGD). Only SGD is recordable: an Adam-aware build needs the moments,
            which the JaxRecorder does not capture.
        max_memory: bytes (or ``"8 GiB"``) a step may take; before each larger batch the recorder
            estimates the step (the ``b x P`` per-sample gradients ``jax.vmap`` materialises, their
            block matrices, the batch gradient, and the PyTorch Recorder's host buffers) and refuses
            one above it (default: 90% of the available memory, on the CPU backend; on an
            accelerator the jax parts are device memory and count only against ``max_memory=``).
            docs/capture.md, "Host memory per step".
        vmap_chunk: examples per ``jax.vmap`` call (default: the whole batch): a step of ``b``
            examples runs ``ceil(b / vmap_chunk)`` calls, holding ``vmap_chunk x P`` per-sample
            gradients at a time; the rows and the batch gradient are the same (up to rounding).

    Leaves are named by their keys joined with ``"."``; a tree in which two leaves get one name
    (``{"a.b": x, "a": {"b": y}}``) is refused. Leaves may differ in dtype: the rows are captured in
    the leaves' promoted dtype (``capture_dtype``), the example weights and the batch gradient's sums
    in at least float32, and each leaf's gradient is returned in that leaf's dtype.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        params: Mapping[str, Any],
        per_example_loss: Callable[..., Any],
        *,
        proj_dim: int | Mapping[str, int] | None = 1024,
        seed: int = 0,
        loss_reduction: str = "mean",
        optimizer: Mapping[str, Any] | None = None,
        storage_dtype: str = "float32",
        resume: bool = False,
        overwrite: bool = False,
        on_nonfinite: str = "raise",
        chunk_rows: int | None = None,
        sketch: str | None = None,
        max_memory: int | str | None = None,
        vmap_chunk: int | None = None,
    ) -> None:
        if loss_reduction not in LOSS_REDUCTIONS:
            raise RecorderError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}.")
        if on_nonfinite not in ("raise", "skip"):
            raise RecorderError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        seed = parse_seed(seed)
        opt = _parse_optimizer(optimizer)
        if vmap_chunk is not None and (isinstance(vmap_chunk, (bool, np.bool_)) or not isinstance(
                vmap_chunk, (int, np.integer)) or vmap_chunk < 1):
            raise RecorderError(f"vmap_chunk must be a positive int (examples per jax.vmap call) or None (the whole "
                                f"batch at once), got {vmap_chunk!r} ({type(vmap_chunk).__name__}).")
        self.vmap_chunk = None if vmap_chunk is None else int(vmap_chunk)
        if not isinstance(params, Mapping):
            raise RecorderError(f"params must be a (nested) dict of arrays, got {type(params).__name__}.")
        flat = flatten_params(params)
        if not flat:
            raise RecorderError("params is empty; nothing to record.")
        self._shapes = {n: tuple(np.shape(p)) for n, p in flat.items()}
        self._dtypes = {n: jnp.asarray(p).dtype for n, p in flat.items()}
        # the capture dtype is the leaves' promoted one (float16 + float32 -> float32), never the first
        # leaf's; the example weights and the batch gradient's sums are at least float32 (P6-06)
        dtype = jnp.result_type(*self._dtypes.values())
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = jnp.dtype(jnp.float32)
        wdtype = jnp.result_type(dtype, jnp.float32)
        self._wdtype = wdtype
        self.blocks = plan_blocks(flat, proj_dim)
        if not isinstance(path, (str, os.PathLike)):
            raise RecorderError(f"path must be the run's directory, a str or os.PathLike (e.g. 'runs/exp1.zarr'), got "
                                f"{path!r} ({type(path).__name__}).")
        # the run's location as every reader reads it (file:// URLs, '::' refused), before the resume checks read it
        path = os.fspath(run_dir_path(path))
        try:
            kind = resolve_sketch(path, sketch, resume)
        except RecorderError:
            raise
        except ValueError as exc:  # an unknown sketch kind: the same error class as every other bad argument
            raise RecorderError(f"{exc}; leave sketch= unset for the default.") from exc
        if resume:
            _check_resume_optimizer(path, opt)
        self._memory = _JaxStepMemory(  # before the run is opened: a bad max_memory= leaves nothing behind
            k=self.blocks[-1]["stop"], P=sum(int(np.prod(s, dtype=np.int64)) for s in self._shapes.values()),
            chunk_rows=chunk_rows or 0, capture_itemsize=jnp.dtype(dtype).itemsize,
            storage_itemsize=np.dtype(storage_dtype).itemsize if storage_dtype in ("float16", "float32", "float64")
            else 4, max_memory=max_memory, commit_every=_COMMIT_EVERY)
        self._memory.set_device(self.blocks, {n: int(np.prod(s, dtype=np.int64)) * self._dtypes[n].itemsize
                                              for n, s in self._shapes.items()}, wdtype.itemsize, self.vmap_chunk)
        self.k = self.blocks[-1]["stop"]
        self.loss_reduction = loss_reduction
        self.on_nonfinite = on_nonfinite
        self._params_template = params
        mats = []
        for b in self.blocks:
            if b["kind"] == "kron":
                r = None if b["k_rows"] >= b["shape"][0] else jnp.asarray(projection_matrix(seed, b["index"], SIDE_ROWS, b["k_rows"], b["shape"][0], kind), dtype)
                c = None if b["k_cols"] >= b["shape"][1] else jnp.asarray(projection_matrix(seed, b["index"], SIDE_COLS, b["k_cols"], b["shape"][1], kind), dtype)
            else:
                r = None if b["k"] >= b["shape"][0] else jnp.asarray(projection_matrix(seed, b["index"], SIDE_DENSE, b["k"], b["shape"][0], kind), dtype)
                c = None
            mats.append((r, c))
        blocks = self.blocks

        def per_sample(params_flat, weights, *batch):
            def loss_one(pf, *ex):
                return per_example_loss(_unflatten_like(self._params_template, pf), *ex)

            g = jax.vmap(jax.grad(loss_one), in_axes=(None,) + (0,) * len(batch))(params_flat, *batch)
            cols = []
            for blk, (r, c) in zip(blocks, mats):
                m = _block_matrix(blk, g).astype(dtype)
                if blk["kind"] == "kron":
                    if r is not None:
                        m = jnp.einsum("kr,brc->bkc", r, m)
                    if c is not None:
                        m = jnp.einsum("brc,kc->brk", m, c)
                else:
                    m = m if r is None else m @ r.T
                cols.append(m.reshape(m.shape[0], -1))
            # summed in at least float32 (the leaf's dtype is restored once, in step())
            mean_grad = jax.tree_util.tree_map(
                lambda x: jnp.tensordot(weights, x.astype(jnp.result_type(x.dtype, wdtype)), axes=1), g)
            return jnp.concatenate(cols, 1), mean_grad

        self._per_sample = jax.jit(per_sample)
        self._momentum = float(opt.get("momentum", 0.0) or 0.0)
        self._weight_decay = float(opt.get("weight_decay", 0.0) or 0.0)
        manifest = {
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "versions": package_versions("jax", "numpy", "zarr"),
            "framework": "jax",
            "projection": {"proj_dim": dict(proj_dim) if isinstance(proj_dim, Mapping) else proj_dim, "seed": int(seed), "sketch": kind,
                           "layers": None, "k": self.k, "blocks": self.blocks},
            "model_fingerprint": fingerprint_params({n: list(np.shape(p)) for n, p in flat.items()}),
            "loss_reduction": loss_reduction,
            "curvature": {"fisher": None},
            "capture_dtype": str(dtype),
            "optimizer": opt,
        }
        if resume:
            _check_resume_settings(path, manifest, storage_dtype)
        mode = "resume" if resume else ("overwrite" if overwrite else "create")
        self._sink = StepSink(path, manifest, k=self.k, mode=mode, chunk_rows=chunk_rows, storage_dtype=storage_dtype,
                              on_nonfinite=on_nonfinite, commit_every=_COMMIT_EVERY)
        self.writer = self._sink.writer
        self._memory.chunk_rows = self._sink.chunk_rows  # the run's own (resume: as recorded)
        self.path = self.writer.path
        self.closed = False
        # a script that ends without close(): the interpreter's exit commits what this recorder holds, as for
        # the PyTorch Recorder (datavalue.capture._exit; close() takes it out; not in a forked child)
        _register_at_exit(self)

    @property
    def n_steps(self) -> int:
        return self._sink.next_step

    def step(self, params: Mapping[str, Any], *batch: Any, sample_ids: Any, lr: float, epoch: int | None = None,
             clip_coef: float | None = None, tokens: Any = None) -> Any:
        """Record one step at ``params`` (the weights *before* the update); returns the batch gradient.

        Args:
            params: current parameters (same structure as at construction).
            *batch: arrays with the batch dimension first, passed to ``per_example_loss`` per example.
            sample_ids: one int id per example.
            lr: the learning rate of this step (a finite non-negative number).
            epoch: the epoch this step belongs to (a non-negative int, or a 0-d integer jax array; stored as -1
                if not given).
            clip_coef: the step's gradient clipping coefficient ``min(1, max_norm/norm)`` in ``(0, 1]``.

        Returns:
            The gradient of the stepped loss (weighted sum of per-sample gradients), shaped like
            ``params``: feed it to your optax update.
        """
        if self.closed:
            raise RecorderStateError("this JaxRecorder is closed; open a new one with resume=True to record more steps.")
        ids = parse_sample_ids(sample_ids)
        lr, epoch, clip_coef = parse_lr(lr), parse_epoch(_jax_scalar(epoch)), parse_clip_coef(clip_coef)
        b = ids.size
        for arr in batch:
            if np.shape(arr)[0] != b:
                raise RecorderError(f"a batch array has {np.shape(arr)[0]} examples but sample_ids has {b}; pass one id per example.")
        w = step_weights(self.loss_reduction, b, np.asarray(tokens) if tokens is not None else None)
        flat = self._check_params(params)
        self._memory.check(b)  # before anything of the step is allocated
        wj = jnp.asarray(w, dtype=self._wdtype)
        c = b if self.vmap_chunk is None else min(b, self.vmap_chunk)
        if c >= b:
            rows, grad_flat = self._per_sample(flat, wj, *batch)
            rows = np.asarray(rows)
        else:  # ceil(b / c) vmapped calls: c x P per-sample gradients at a time, the same rows and sum
            parts, grad_flat = [], None
            for i in range(0, b, c):
                r, g = self._per_sample(flat, wj[i:i + c], *(arr[i:i + c] for arr in batch))
                parts.append(np.asarray(r))
                grad_flat = g if grad_flat is None else jax.tree_util.tree_map(jnp.add, grad_flat, g)
            rows = np.concatenate(parts, 0)
        grad_flat = {n: g.astype(self._dtypes[n]) for n, g in grad_flat.items()}  # each leaf's own dtype
        self._sink.submit(ids, w, rows, lr=lr, epoch=epoch, grad_scale=clip_coef,
                          momentum=self._momentum, weight_decay=self._weight_decay)
        return _unflatten_like(self._params_template, grad_flat)

    def _check_params(self, params: Any) -> dict[str, Any]:
        """``params`` flattened, refused unless it has exactly the leaves and shapes given at construction."""
        if not isinstance(params, Mapping):
            raise RecorderError(f"params must be the (nested) dict of arrays given to JaxRecorder, got "
                                f"{type(params).__name__}.")
        flat = flatten_params(params)
        missing = [n for n in self._shapes if n not in flat]
        extra = [n for n in flat if n not in self._shapes]
        if missing or extra:
            raise RecorderError(f"params at step() must have the leaves given to JaxRecorder: missing {missing[:5]}, "
                                f"unexpected {extra[:5]}; pass the whole parameter tree of the model being trained.")
        wrong = [f"{n}: {tuple(np.shape(flat[n]))} != {s}" for n, s in self._shapes.items() if tuple(np.shape(flat[n])) != s]
        if wrong:
            raise RecorderError(f"params at step() changed shape since JaxRecorder was created: {wrong[:5]}.")
        return flat

    def flush(self) -> None:
        """Block until every recorded step is committed to disk."""
        self._sink.flush()

    def close(self) -> None:
        """Flush pending steps. Idempotent.

        A recorder its script never closes is closed when the interpreter exits normally (or when it is
        garbage-collected), with a warning: see "Durability" in the README."""
        if not self.closed:
            self.closed = True
            _OPEN.pop(id(self), None)
            self._sink.close()

    def __enter__(self) -> JaxRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
