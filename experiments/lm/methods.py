"""Attribution methods of the LM study, public API only.

Every method is ``fn(ctx, **options) -> (m, n_columns)`` scores, where the columns are the run's
occurrences (``ctx.by is None``, in the run's row order) or its samples (``ctx.by == "sample"``,
sorted sample ids, trajectory methods summed over each sample's occurrences). Final-model methods
score a sample once; on occurrence columns every occurrence of a sample gets the sample's score.
Sign everywhere: positive = the training data helped (lowered the query loss).

A method that cannot run (missing API, too large) raises :class:`Skip` with the reason.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from datavalue import open_run
from datavalue.capture import per_sample_gradients
from datavalue.embeddings import build_embeddings
from datavalue.query import Attributor


class Skip(Exception):
    """The method does not apply here; the message says why."""


@dataclasses.dataclass
class Ctx:
    """What a method needs about one recorded run."""

    run_path: str
    model: torch.nn.Module                     # at the final weights
    query: Callable[[torch.nn.Module], torch.Tensor]   # model -> (m,) query losses
    train_loss: Callable[[torch.nn.Module, np.ndarray], torch.Tensor]  # (model, sample ids) -> (b,) summed token CE
    train_tokens: Callable[[np.ndarray], np.ndarray]   # sample ids -> (b,) label tokens
    by: str | None = None                      # None: occurrences; "sample": per sample
    exact_path: str | None = None              # an exact-layout run of the same model (proj_dim=None)
    final_batches: list[np.ndarray] | None = None  # batches for a no-update pass at the final weights
    train_mask: Callable[[np.ndarray], torch.Tensor] | None = None  # sample ids -> (b, L) positions in the loss
    cache: dict = dataclasses.field(default_factory=dict)

    @property
    def run(self):
        return open_run(self.run_path)

    def columns(self) -> np.ndarray:
        """Sample id of every column (occurrence or sample)."""
        run = self.run
        R = int(run.step_ptr[run.n_steps])
        sid = np.asarray(run.sample_id[:R])
        return sid if self.by is None else np.unique(sid)


def _attr(ctx: Ctx, **kw) -> np.ndarray:
    a = Attributor(ctx.run_path, ctx.model, progress=False, **kw)
    return np.asarray(a.scores(ctx.query, by=ctx.by), dtype=np.float64)


def dvemb(ctx: Ctx, curvature: str | None = None, blocks: str = "auto", optimizer: str | None = None) -> np.ndarray:
    """Data value embeddings: ``build_embeddings(path, ...)`` (defaults when nothing is given)."""
    kw: dict[str, Any] = {}
    if curvature is not None:
        kw["curvature"] = curvature
    if blocks != "auto":
        kw["blocks"] = blocks
    if optimizer is not None:
        kw["optimizer"] = optimizer
    info = build_embeddings(ctx.run_path, overwrite=True, progress=False, **kw)
    ctx.cache.setdefault("builds", []).append({"curvature": info.curvature, "blocks": blocks, "optimizer": info.optimizer,
                                               "choice": info.choice, "seconds": info.seconds})
    return _attr(ctx, curvature=info.curvature)


def tracin(ctx: Ctx) -> np.ndarray:
    return _attr(ctx, kind="tracin")


def grad_dot(ctx: Ctx) -> np.ndarray:
    return _attr(ctx, kind="grad_dot")


def _sample_ids(ctx: Ctx) -> np.ndarray:
    return np.unique(ctx.columns())


def _to_columns(ctx: Ctx, S: np.ndarray, sids: np.ndarray) -> np.ndarray:
    """``(m, n_samples)`` per-sample scores to the context's columns."""
    cols = ctx.columns()
    return S[:, np.searchsorted(sids, cols)]


def final_grad_dot(ctx: Ctx, exact: bool = False, reduction: str = "sum", chunk: int = 32) -> np.ndarray:
    """Final-model gradient dot product ``q . g_i`` with ``g_i`` the gradient of sample ``i``'s summed
    token loss (``reduction="sum"``: its share of the stepped loss up to the batch denominator) or of
    its token mean (``"mean"``), at the final weights, through ``datavalue.capture.per_sample_gradients``
    in the run's sketch (``exact=False``) or in an exact-layout run (``exact=True``)."""
    path = ctx.exact_path if exact else ctx.run_path
    if path is None:
        raise Skip("no exact-layout run")
    run = open_run(path)
    sids = _sample_ids(ctx)
    q = per_sample_gradients(ctx.model, ctx.query, run)
    S = np.zeros((q.shape[0], sids.size))
    for i in range(0, sids.size, chunk):
        ids = sids[i: i + chunk]
        if reduction == "sum":
            fn = lambda m, ids=ids: ctx.train_loss(m, ids)  # noqa: E731
        else:
            tok = torch.as_tensor(ctx.train_tokens(ids))
            fn = lambda m, ids=ids, tok=tok: ctx.train_loss(m, ids) / tok.to(next(m.parameters()).dtype)  # noqa: E731
        g = per_sample_gradients(ctx.model, fn, run)
        S[:, i: i + ids.size] = q.astype(np.float64) @ g.astype(np.float64).T
    return _to_columns(ctx, S, sids)


def influence(ctx: Ctx, curvature: str = "fisher") -> np.ndarray:
    """Final-model curvature-preconditioned influence from one no-update pass at the final weights
    (the kind being built; skipped while ``datavalue.capture.FinalPass`` does not exist)."""
    from datavalue.capture import FinalPass
    from datavalue.embeddings import build_influence

    if not ctx.cache.get("final_pass"):
        # every training example once (not the trajectory's batches: a final pass weighs each example once)
        sids = _sample_ids(ctx)
        batches = np.array_split(sids, max(1, sids.size // 16))
        t0 = time.perf_counter()
        with FinalPass(ctx.run_path, ctx.model, curvature="fisher", overwrite=True) as fp:
            for ids in batches:
                ntok = ctx.train_tokens(ids)
                mask = ctx.train_mask(ids) if ctx.train_mask is not None else None
                with fp.batch(ids, tokens=ntok, label_mask=mask):
                    loss = ctx.train_loss(ctx.model, ids).sum() / float(ntok.sum())
                    loss.backward()
        ctx.cache["final_pass"] = time.perf_counter() - t0
    build_influence(ctx.run_path, curvature=curvature, overwrite=True, progress=False)
    a = Attributor(ctx.run_path, ctx.model, kind="influence", curvature=curvature, progress=False)
    S = np.asarray(a.scores(ctx.query, by=ctx.by), dtype=np.float64)
    if S.shape[1] != ctx.columns().size:  # per sample while occurrences were asked: spread
        S = _to_columns(ctx, S, np.asarray(a.labels(by="sample")))
    return S


# ------------------------------------------------------------------------------------ registry
def registry(*, exact_run: bool, fisher: bool, full_blocks: bool, has_exact_path: bool, dvemb_ok: bool = True,
             whitened: bool = False) -> dict[str, tuple]:
    """``name -> (fn, kwargs)`` of the methods that apply to a run. A whitened run (``precondition="adam"``)
    gets its trajectory methods only: its rows are whitened, so the final-model ones are the raw run's."""
    reg: dict[str, tuple] = {}
    if whitened:
        if dvemb_ok:
            reg["dvemb default (whitened)"] = (dvemb, {})
            reg["dvemb none (whitened)"] = (dvemb, {"curvature": "none", "blocks": "layer"})
            reg["dvemb empirical_fisher (whitened)"] = (dvemb, {"curvature": "empirical_fisher", "blocks": "layer"})
        reg["grad_dot (whitened)"] = (grad_dot, {})
        return reg
    if not exact_run and dvemb_ok:  # Adam-aware builds over exact or 5% per-layer blocks do not fit here (lm.md)
        reg["dvemb default"] = (dvemb, {})
        curvs = ["none", "empirical_fisher"] + (["fisher"] if fisher else [])
        for c in curvs:
            reg[f"dvemb {c} / layer"] = (dvemb, {"curvature": c, "blocks": "layer"})
            if full_blocks and c != "none":  # ("fisher / layer" = the default build whenever auto picks layer)
                reg[f"dvemb {c} / full"] = (dvemb, {"curvature": c, "blocks": "full"})
        reg["dvemb sgd-proxy"] = (dvemb, {"optimizer": "sgd-proxy", "curvature": "empirical_fisher"})
    reg["tracin"] = (tracin, {})
    reg["grad_dot"] = (grad_dot, {})
    reg["final grad dot (sum)"] = (final_grad_dot, {})
    reg["final grad dot (token mean)"] = (final_grad_dot, {"reduction": "mean"})
    if has_exact_path and not exact_run:
        reg["final grad dot (sum), exact"] = (final_grad_dot, {"exact": True})
    for c in ("fisher", "empirical_fisher", "none"):
        reg[f"influence {c}"] = (influence, {"curvature": c})
    return reg


def run_methods(ctx: Ctx, reg: dict[str, tuple], log=print) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    out, info = {}, {}
    for name, (fn, kw) in reg.items():
        t0 = time.perf_counter()
        try:
            out[name] = fn(ctx, **kw)
            info[name] = {"secs": time.perf_counter() - t0}
            log(f"    {name}: {info[name]['secs']:.1f}s")
        except Skip as exc:
            info[name] = {"skipped": str(exc)}
            if not name.startswith("influence") or "influence fisher" == name:
                log(f"    {name}: skipped ({exc})")
        except Exception as exc:  # report, do not stop the study
            info[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            log(f"    {name}: ERROR {type(exc).__name__}: {str(exc)[:300]}")
    return out, info
