"""Per-sample gradients in a run's own layout and projection (test/query gradients)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture._engine import Engine, to_numpy, trainable_fingerprint
from datavalue.capture._projection import run_sketch
from datavalue.capture._run_setup import wrapper_hint
from datavalue.errors import ModelMismatchError, QueryError
from datavalue.store import fingerprint_params


def engine_for_run(model: nn.Module, manifest: Mapping[str, Any]) -> Engine:
    """An :class:`Engine` that reproduces the recorded projection; checks the model fingerprint."""
    fp = manifest.get("model_fingerprint", {})
    mine = fingerprint_params(trainable_fingerprint(model))
    if fp.get("digest") != mine["digest"]:
        rec, now = fp.get("params", {}), mine["params"]
        missing = sorted(set(rec) - set(now))[:5]
        extra = sorted(set(now) - set(rec))[:5]
        shape = [f"{k}: {rec[k]} vs {now[k]}" for k in sorted(set(rec) & set(now)) if list(rec[k]) != list(now[k])][:5]
        raise ModelMismatchError(
            "the model does not match the run's fingerprint (trainable parameter names and shapes). "
            f"Missing: {missing}; unexpected: {extra}; shape differences: {shape}. "
            "Build the same architecture that was recorded (and the same requires_grad flags)." + wrapper_hint(rec, now)
        )
    proj = manifest["projection"]
    pd = proj["proj_dim"]
    eng = Engine(model, proj_dim=pd, seed=proj["seed"], layers=proj.get("layers"), sketch=run_sketch(proj),
                 split_bias=proj.get("split_bias", ()))
    recorded = [(b["name"], b["k"], b["start"]) for b in proj["blocks"]]
    if [(b.name, b.k, b.start) for b in eng.blocks] != recorded:
        raise ModelMismatchError("the model's capture plan differs from the recorded one (blocks or dimensions); "
                                 "was a LayerRule registered or removed since recording?")
    return eng


#: Relative difference of a tensor's digest (sum, sum of squares) above which a query's model is taken
#: for other weights than the run's (looser than resume's ``DIGEST_RTOL``: a model cast to another
#: dtype or moved to another device for the query is still "the final weights"; one epoch of
#: training or a fresh initialisation is far above it).
QUERY_DIGEST_RTOL = 1e-4


def weights_mismatch(model: nn.Module, run: Any, steps: int) -> str | None:
    """Why ``model`` is not at the weights ``run`` reached after ``steps`` steps, or None.

    Compares the model with the run's stored weights digest (``weights_digest``, written at every
    flush and close with ``optimizer=``; :mod:`datavalue.capture._resume`), within
    :data:`QUERY_DIGEST_RTOL`. None too when it cannot tell: no digest at ``steps`` (a run recorded
    without ``optimizer=``, or before digests existed), or a run that is not a local directory.
    """
    import math
    import os

    from datavalue.capture._resume import read_digests, weights_digest

    path = getattr(run, "path", run)
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    try:
        at = {int(h["steps"]): h["tensors"] for h in read_digests(path)}
    except Exception:  # an unreadable digest: not this check's business (resume refuses it)
        return None
    if int(steps) not in at:
        return None
    rec, now = at[int(steps)], weights_digest(model)
    off = []
    for name in sorted(set(rec) & set(now)):
        (n0, s0, q0), (_n1, s1, q1) = rec[name][:3], now[name][:3]
        scale = math.sqrt(max(n0, 1.0) * max(q0, q1, 1e-300))
        rel = max(abs(s0 - s1) / scale, abs(q0 - q1) / max(q0, q1, 1e-300))
        if rel > QUERY_DIGEST_RTOL:
            off.append((rel, name))
    if not off:
        return None
    worst = ", ".join(f"{name} (relative difference {rel:.2g})" for rel, name in sorted(off, reverse=True)[:3])
    return (
        f"the model's weights are not the ones {path} reached after its {steps} steps: {len(off)} of {len(now)} "
        f"trainable tensors differ ({worst}). The scores are defined at those weights (usually the final ones); "
        "with other weights they answer another question. If you meant the trained model, load it first: "
        "model.load_state_dict(torch.load(checkpoint, weights_only=True)) (a freshly built model holds its random "
        "initialisation). Other weights on purpose: ignore this warning."
    )


def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    run_or_manifest: Any,
    *,
    engine: Engine | None = None,
) -> np.ndarray:
    """``(m, k)`` projected gradients of ``m`` per-sample losses, in the run's layout.

    Args:
        model: the model at the weights of interest (e.g. the final weights).
        loss_fn: ``loss_fn(model) -> (m,)`` per-example losses (``reduction="none"``).
        run_or_manifest: a :class:`datavalue.store.Run`, its manifest dict, or a path.

    Parameters' ``.grad`` is left untouched.

    Example:
        >>> g = per_sample_gradients(model, lambda m: F.cross_entropy(m(x), y, reduction="none"), run)  # doctest: +SKIP
    """
    manifest = _manifest(run_or_manifest)
    eng = engine or engine_for_run(model, manifest)
    if (manifest.get("projection") or {}).get("precondition") == "adam":
        return _whitened_gradients(model, loss_fn, run_or_manifest, eng)
    return _gradients(model, loss_fn, eng)


def _whitened_gradients(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], run: Any, layout: Engine) -> np.ndarray:
    """A ``precondition="adam"`` run: exact per-sample gradients, whitened by the run's final ``sqrt(D_T)``,
    sketched like the run's rows."""
    from datavalue.capture._whiten import SQRT_D, Whitener, capture_engine
    from datavalue.store import open_run

    if isinstance(run, Mapping):
        raise QueryError("this run whitens gradients by Adam's preconditioner (precondition='adam'): pass the run "
                         "(or its path), not only its manifest, so that the final preconditioner can be read.")
    run = run if hasattr(run, "has_array") else open_run(run)
    if not run.has_array(SQRT_D):
        raise QueryError(f"{run.path} was recorded with precondition='adam' but holds no final preconditioner "
                         f"({SQRT_D}): the Recorder was not closed. Close it (rec.close(), or leave its with-block) "
                         "after the last step; a crashed run can be resumed and closed.")
    capture = capture_engine(model, layout)
    sqrt_d = torch.from_numpy(np.asarray(run.array(SQRT_D)[:], dtype=np.float64))
    if sqrt_d.numel() != capture.k:
        raise QueryError(f"{run.path}: {SQRT_D} has {sqrt_d.numel()} entries, the model captures {capture.k}.")
    X = torch.from_numpy(_gradients(model, loss_fn, capture)).to(torch.float64)
    return to_numpy(Whitener(layout, capture).sketch(X * sqrt_d))


def _gradients(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], eng: Engine) -> np.ndarray:
    eng.attach()
    try:
        eng.begin(None)
        try:
            losses = loss_fn(model)
            if not torch.is_tensor(losses) or losses.dim() != 1:
                raise QueryError(
                    "loss_fn must return a 1-d tensor of per-example losses (use reduction='none'), got "
                    f"{type(losses).__name__} with shape {getattr(losses, 'shape', None)}."
                )
            m = losses.shape[0]
            eng.batch_size = m
            eng.grad_wrt_outputs(losses.sum())
            sink = dict(eng.sink or {})
        finally:
            eng.end()
        return to_numpy(eng.assemble(sink, m))
    finally:
        eng.detach()


def _manifest(x: Any) -> Mapping[str, Any]:
    if isinstance(x, Mapping):
        return x
    if hasattr(x, "manifest"):
        return x.manifest
    from datavalue.store import open_run

    return open_run(x).manifest


def block_matrix(block: Mapping[str, Any], named: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A full-parameter tensor dict laid out as one block: ``(rows, cols)`` (kron) or ``(n,)`` (dense).

    Kronecker blocks are ``[W.reshape(rows, -1) | bias]`` (``[W; bias]`` for ``bias_axis=0``);
    dense blocks concatenate their parameters flattened.
    """
    ts = [named[p] for p in block["params"]]
    if block["kind"] != "kron":
        return torch.cat([t.reshape(-1) for t in ts])
    rows, cols = block["shape"]
    if block.get("bias_axis", 1) == 0:  # HF Conv1D / flax kernel: W (in, out)
        mat = ts[0].reshape(-1, cols)
        return torch.cat([mat, ts[1].reshape(1, cols)], 0) if block.get("has_bias") else mat
    mat = ts[0].reshape(rows, -1)
    return torch.cat([mat, ts[1].reshape(rows, 1)], 1) if block.get("has_bias") else mat


def project_full(engine: Engine, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sketch of a full gradient (e.g. the accumulated ``.grad``) in the engine's columns: ``(k,)``.

    By linearity it equals the sum of the sketched per-sample gradients that produced it.
    Parameters missing from ``named`` (no gradient) count as zeros.
    """
    parts = []
    for b in engine.blocks:
        if any(named.get(p) is None for p in b.params):
            parts.append(torch.zeros(b.k, dtype=engine.dtype, device=engine.device))
            continue
        m = block_matrix(b.to_json(), named).to(engine.dtype)
        sk = engine.sketches[b.name]
        if b.kind == "kron":
            m = sk.right(sk.left(m.T).T)  # P_rows M P_cols^T
        else:
            m = sk.dense(m)
        parts.append(m.reshape(-1))
    return torch.cat(parts)


def exact_layout(named: Mapping[str, torch.Tensor], blocks: list[Mapping[str, Any]]) -> np.ndarray:
    """Lay full-parameter tensors (e.g. ``{name: p.grad}``) out in an *exact* run's columns.

    Used as a slow oracle (a plain backward per example) and to turn a full gradient into the
    exact-run layout; see :func:`block_matrix` for the layout.
    """
    parts = []
    for b in blocks:
        if b["k"] != int(np.prod(b["shape"])):
            raise QueryError(f"block {b['name']} is projected; exact_layout needs a run recorded with proj_dim=None.")
        parts.append(block_matrix(b, {p: named[p].detach().to(torch.float64) for p in b["params"]}).reshape(-1))
    return torch.cat(parts).cpu().numpy()
