"""What the sketch loses (issue 19): the fisher-seq + block-mean adjoint pass of ``adjoint_decomposition.py``
(0.76 on the late removals against the full-removal LOO) with the product's gradient sketch introduced one
piece at a time, at K = 1%, 5% and 15% of P. Public API only (``datavalue.capture``'s ``split_budget`` and
``projection_matrix``, ``datavalue.testing``) plus torch/numpy.

Everything runs in one reverse pass over the float64 reference run of the small AdamW LM (``run.py``'s
config, seeds, data, schedule, clipping). The adjoint of ``(theta, m, v)`` is carried per held-out line as in
``adjoint_decomposition.py``; a *space* is either the full parameter space (exact gradients) or a sketch
``S`` (``k`` columns), with per-column AdamW coefficients and a curvature made of rows (``K = F^T F``):

Full space (no sketch), from the 0.76 variant towards what a sketched build can keep:

- ``B0``: fisher-seq rows, AdamW's moments as per-tensor means, second moment with the real gradient,
  clip direction on, full curvature (``adjoint_decomposition``'s "fisher-seq+clip+v (block-mean moments)");
- ``B1``: the moments *and the step's gradient* (the ``r = 2 (1 - b2) g`` of the second-moment term) as
  means over each recorded block, as the recorder stores them (``adam_m``/``adam_v`` of a projected run);
- ``B2``: B1 without the clip direction (the Adam-aware build keeps only the clip coefficient);
- ``B3``: B2 with the curvature block-diagonal over the recorded blocks (``blocks="layer"``, what
  ``blocks="auto"`` picks for the Fisher below 25% of P kept): the product's build minus the sketch;
- ``B1-layer``: B1 with the curvature per recorded block (the clip direction kept);
- ``B3-tok``: B3 with one Fisher row per predicted token (same sampled labels);
- ``W0``: rows, curvature and test gradient whitened by AdamW's per-coordinate ``sqrt(D_t)``
  (``Recorder(precondition="adam")``), a scalar step ``lr c1``, no second moment, per block.

Sketched (at each K; the recorder's orthogonal Kronecker sketch, its water-filling budget over the blocks
it records for this model and optimizer, conv biases as their own blocks since the param groups differ):

- ``S0``: the exact B0 (or B3) adjoint, only the final dot product through the sketch ``<S a, S g>``;
- ``S1``: B3 carried in the sketch: sketched per-sequence Fisher rows, per-block coefficients (what the
  product's ``build_embeddings`` does on a ``Recorder(proj_dim=K, curvature="fisher")`` run);
- ``S1-full``: S1 with the cross-block curvature (``blocks="full"``);
- ``S1-prop``: S1 with the budget split in proportion to the blocks' sizes (``proj_dim`` as a dict);
- ``S2``: S1 with a dense orthogonal sketch of each block at the same per-block budget (not Kronecker);
- ``S3``: S1 with the per-token Fisher rows (sketched);
- ``S4``: W0 in the sketch (the product's whitened build);
- ``S5-layer`` / ``S5``: S1 with the clip direction carried in the sketch (``u`` from the sketched batch gradient,
  as the SGD scan does), with the curvature per block / across blocks (``S5`` is B1 in the sketch).

The sketch is checked against the product: a ``Recorder(proj_dim=K, optimizer=AdamW)`` recording of step 0 stores
the rows :class:`Sketch` computes (``vs_recorder_rows`` in the json, up to each row's scale and float32).

    PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 15 python experiments/lm/sketch_decomposition.py \
        --study-export runs/lm/small-adamw/export --replay <replay_check work dir>/replay_truth.npz

Writes ``experiments/lm/sketch_decomposition.json`` and ``.md`` (the fragment ``report.py`` includes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import adjoint_decomposition as AD  # noqa: E402
import common as C  # noqa: E402

from datavalue.capture import projection_matrix, split_budget  # noqa: E402
from datavalue.testing import spearman_per_test, train_reference  # noqa: E402

KS = (1084, 5420, 16384)  # run.py's sketch sizes for this run (1%, 5%, 15% of P)
SIDE_ROWS, SIDE_COLS, SIDE_DENSE = 0, 1, 2  # datavalue.capture's sketch sides (rows, cols, dense)


# ------------------------------------------------------------------------------------------ the sketch
def recorded_blocks(model, names: list[str], sizes: list[int]) -> list[dict]:
    """The blocks a ``Recorder(model, optimizer=<the study's AdamW>)`` records, in module order, each with the
    flat coordinates (in the optimizer's order ``names``) of its matrix, row-major: embeddings and Conv1D weights
    as Kronecker blocks (Conv1D rows = inputs), each Conv1D bias as its own dense block (its param group differs
    from the weight's, so the recorder splits it), a LayerNorm's weight and bias as one dense block."""
    off = dict(zip(names, np.cumsum([0] + sizes[:-1])))
    shape = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def coords(n):
        return np.arange(off[n], off[n] + int(np.prod(shape[n])))

    out = []
    for n, _ in model.named_parameters():
        if n.endswith("wte.weight") or n.endswith("wpe.weight") or (n.endswith(".weight") and len(shape[n]) == 2):
            out.append(dict(name=n, kind="kron", shape=shape[n], idx=coords(n)))
        elif ".ln_" in n and n.endswith(".weight"):
            b = n[: -len("weight")] + "bias"
            out.append(dict(name=n, kind="dense", shape=(2 * shape[n][0],), idx=np.concatenate([coords(n), coords(b)])))
        elif n.endswith(".bias") and ".ln_" not in n:
            out.append(dict(name=n, kind="dense", shape=shape[n], idx=coords(n)))
    assert sum(b["idx"].size for b in out) == sum(sizes), "the blocks must tile the parameters"
    return out


class Sketch:
    """``S``: ``(n, P) -> (n, k)`` on vectors in block order (the blocks' coordinates concatenated).

    ``kind="kron"``: the recorder's sketch (``P_rows W P_cols^T`` per Kronecker block, ``P v`` per dense block,
    ``projection_matrix(seed, block, side, ...)``, orthogonal, identity where a side is kept whole);
    ``kind="dense"``: each block's flattened vector times one orthogonal ``(k_b, dim_b)`` matrix, with the same
    per-block ``k_b`` (a dense sketch at the product's budget split)."""

    def __init__(self, blocks: list[dict], K: int, kind: str = "kron", seed: int = 0):
        split = split_budget([b["name"] for b in blocks], [b["kind"] for b in blocks], [b["shape"] for b in blocks], K)
        self.mats, widths = [], []
        for i, (b, (kr, kc, k)) in enumerate(zip(blocks, split)):
            dim = int(np.prod(b["shape"]))
            if b["kind"] == "kron" and kind == "kron":
                r, c = b["shape"]
                self.mats.append(("kron", (r, c), None if kr == r else projection_matrix(seed, i, SIDE_ROWS, kr, r, "orthogonal"),
                                  None if kc == c else projection_matrix(seed, i, SIDE_COLS, kc, c, "orthogonal")))
            else:
                side = SIDE_DENSE if b["kind"] == "dense" else SIDE_DENSE + 1  # a Kronecker block made dense: its own draw
                self.mats.append(("dense", dim, None if k == dim else projection_matrix(seed, i, side, k, dim, "orthogonal"), None))
            widths.append(k)
        self.widths = np.array(widths)
        self.k = int(self.widths.sum())
        e = np.cumsum([0] + widths)
        self.spans = list(zip(e[:-1], e[1:]))
        d = np.cumsum([0] + [b["idx"].size for b in blocks])
        self.in_spans = list(zip(d[:-1], d[1:]))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        out = np.empty((X.shape[0], self.k))
        for (kind, shp, A, B), (a, b), (oa, ob) in zip(self.mats, self.in_spans, self.spans):
            x = X[:, a:b]
            if kind == "kron":
                W = x.reshape(X.shape[0], *shp)
                if A is not None:
                    W = np.matmul(A, W)
                if B is not None:
                    W = np.matmul(W, B.T)
                out[:, oa:ob] = W.reshape(X.shape[0], -1)
            else:
                out[:, oa:ob] = x if A is None else x @ A.T
        return out

    def per_block(self, vals: np.ndarray) -> np.ndarray:
        """Per-block values ``(..., n_blocks)`` broadcast to the sketch's columns."""
        return np.repeat(vals, self.widths, axis=-1)


# ------------------------------------------------------------------------------------------ the pass
class Pass:
    """The adjoint of ``(theta, m, v)`` for every query line in one space (``adjoint_decomposition``'s
    recursion with the curvature ``K = F^T F`` from rows, full or block-diagonal over ``spans``)."""

    def __init__(self, lam0: np.ndarray, b1: float, b2: float, T: int):
        self.lam, self.mu, self.nu = lam0.copy(), np.zeros_like(lam0), np.zeros_like(lam0)
        self.b1, self.b2 = b1, b2
        self.scores = [None] * T
        self.gam = None

    def step(self, s, pc, qc, rr, dec, c, per, F, spans=None, ghat=None):
        b1, b2 = self.b1, self.b2
        self.mu = -pc * self.lam + b1 * self.mu
        gam = (1 - b1) * self.mu
        if qc is not None:
            self.nu = qc * self.lam + b2 * self.nu
            gam = gam + rr * self.nu
        if ghat is not None and c < 1.0:
            gam = gam - np.outer(gam @ ghat, ghat)
        if spans is None:
            K = (gam @ F.T) @ F
        else:
            K = np.empty_like(gam)
            for a, b in spans:
                K[:, a:b] = (gam[:, a:b] @ F[:, a:b].T) @ F[:, a:b]
        self.lam = dec * self.lam + c * K
        self.scores[s] = gam @ (-c * per).T
        self.gam = gam


def token_rows(work, tp, ids, lab, NB, gen_state, order, chunk=64):
    """The sampled-label Fisher rows of one step, one per predicted token ``(n_tok, P)`` (columns permuted by
    ``order``), with the labels ``adjoint_decomposition.step_products`` drew from the same generator state (so
    they sum, per sequence, to its per-sequence rows). Each sequence is run alone (causal, right-padded: the
    same logits) and its tokens' rows come from one batched backward."""
    gen = torch.Generator()
    gen.set_state(gen_state)
    with torch.no_grad():
        prob = torch.softmax(work(input_ids=ids).logits, -1)
    valid = torch.zeros(prob.shape[:2], dtype=torch.float64)
    valid[:, :-1] = (lab[:, 1:] != -100).double()
    yhat = torch.multinomial(prob.reshape(-1, prob.shape[-1]), 1, generator=gen).view(prob.shape[:2])
    resid = (torch.nn.functional.one_hot(yhat, prob.shape[-1]).double() - prob) * valid[..., None]
    rows, owner = [], []
    for i in range(len(ids)):
        pos = valid[i].nonzero()[:, 0]
        logits = work(input_ids=ids[i: i + 1]).logits
        for lo in range(0, len(pos), chunk):
            w = pos[lo: lo + chunk]
            go = torch.zeros((len(w),) + tuple(logits.shape), dtype=torch.float64)
            go[torch.arange(len(w)), 0, w] = resid[i, w]
            gs = torch.autograd.grad(logits, tp, grad_outputs=go, retain_graph=True, is_grads_batched=True)
            rows.append(np.concatenate([g.reshape(len(w), -1).numpy() for g in gs], 1)[:, order])
            owner += [i] * len(w)
    return np.concatenate(rows) / np.sqrt(NB), np.array(owner)


def check_against_recorder(factory, batch, lr, opt_cfg, rcfg, X, Y, blocks, perm, K) -> float:
    """Record step 0 with the product (``Recorder(proj_dim=K, optimizer=AdamW)``) and compare its stored rows
    with :class:`Sketch` of the per-sample gradients: the largest residual, relative to the largest stored
    entry, after each row's scale (the recorder stores a line's token-mean gradient; storage float32)."""
    import tempfile

    import datavalue
    from datavalue.store import open_run

    model = factory()
    opt = C.make_optimizer(model, opt_cfg)
    with tempfile.TemporaryDirectory(prefix="sketch_decomposition_") as d:
        with datavalue.Recorder(Path(d) / "r.zarr", model, proj_dim=K, seed=0, optimizer=opt,
                                loss_reduction="token_mean") as rec:
            train_reference(factory, [batch], np.array([[lr, lr]]), C.step_loss_fn, config=rcfg, model=model,
                            optimizer=opt, verify=False, step_context=lambda t, b, lr, rec=rec: rec.step(
                                sample_ids=b.sample_ids, tokens=C.n_tokens(b.targets[0])))
        stored = np.asarray(open_run(Path(d) / "r.zarr").grads[: len(batch.sample_ids)].compute(), np.float64)
    m0 = factory()
    params = [p for g in C.make_optimizer(m0, opt_cfg).param_groups for p in g["params"]]
    per = np.stack([np.concatenate([g.reshape(-1).numpy() for g in torch.autograd.grad(
        C.token_ce(m0, torch.as_tensor(X[[s]]), torch.as_tensor(Y[[s]]))[0], params)])[perm] for s in batch.sample_ids])
    mine = Sketch(blocks, K)(per)
    if mine.shape != stored.shape:
        return float("inf")
    scale = (stored * mine).sum(1) / (mine * mine).sum(1)
    return float(np.abs(stored - scale[:, None] * mine).max() / np.abs(stored).max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-query", type=int, default=30)
    ap.add_argument("--ks", default=",".join(str(k) for k in KS))
    ap.add_argument("--no-tok", action="store_true", help="skip the per-token rows (B3-tok, S3)")
    ap.add_argument("--replay", default=None, help="replay_truth.npz of replay_check.py (exact linearisation)")
    ap.add_argument("--study-export", default=str(HERE.parents[1] / "runs/lm/small-adamw/export"))
    ap.add_argument("--out", default=str(HERE / "sketch_decomposition.json"))
    ap.add_argument("--raw", default=None, help="also save every variant's (lines x occurrences) scores here (.npz)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    ks = [int(k) for k in args.ks.split(",") if k]

    def log(*a):
        print(f"[{time.time() - t0:6.0f}s]", *a, flush=True)

    study = C.Study("small-adamw", n_query=args.n_query, eager=True)  # the study's small AdamW LM (run.py)
    name, opt_cfg, B, T, test_lines = study.name, study.opt_cfg, study.B, study.T, study.test_lines
    X, Y, factory, batches, lrs, rcfg = study.X, study.Y, study.factory, study.batches, study.lrs, study.rcfg
    # the run, its moments and gradients, coordinates in the recorded blocks' order
    R = study.replay_inputs(order=lambda work, names, sizes: np.concatenate(
        [b["idx"] for b in recorded_blocks(work, names, sizes)]))
    log(f"{name}: trained {T} steps, {len(test_lines)} query lines")
    ref, names, sizes, work, tp, P = R.ref, R.names, R.sizes, R.work, R.tp, R.P
    flat, unflat, wd, Mm, Vv, G, per, gte = R.flat, R.unflat, R.wd, R.Mm, R.Vv, R.G, R.per, R.gte
    b1, b2 = opt_cfg["betas"]
    eps = opt_cfg["eps"]
    blocks = recorded_blocks(work, names, sizes)
    perm = R.perm  # optimizer order -> block order
    inv = np.empty_like(perm)
    inv[perm] = np.arange(P)
    nb = len(blocks)
    bsz = np.array([b["idx"].size for b in blocks])
    bcut = np.cumsum([0] + list(bsz))
    bspans = list(zip(bcut[:-1], bcut[1:]))
    log(f"per-sample gradients of {T * B} occurrences; {nb} recorded blocks")

    # ------------------------------------------------------------ AdamW's coefficients
    s_ = np.arange(T)
    bc1, bc2 = 1 - b1 ** (s_ + 1), 1 - b2 ** (s_ + 1)
    decay = 1 - lrs[:, None] * wd[None]

    def coefs(Mx, Vx, Gx):
        vh = Vx / bc2[:, None]
        den = np.sqrt(vh) + eps
        p = lrs[:, None] / (bc1[:, None] * den)
        q = lrs[:, None] * (Mx / bc1[:, None]) / den**2 / (2 * np.maximum(np.sqrt(vh), 1e-300) * bc2[:, None])
        return p, q, 2 * (1 - b2) * Gx

    # B0: per-tensor means of the moments (adjoint_decomposition's "block" variant), the real gradient in r
    tcut = np.cumsum([0] + sizes)
    Mt, Vt = np.empty_like(Mm), np.empty_like(Vv)
    for lo, hi in zip(tcut[:-1], tcut[1:]):
        sel = inv[lo:hi]  # this tensor's coordinates in block order
        Mt[:, sel] = Mm[:, sel].mean(1, keepdims=True)
        Vt[:, sel] = Vv[:, sel].mean(1, keepdims=True)
    pB0, qB0, rB0 = coefs(Mt, Vt, G)

    # B1..: per recorded block means of m, v and the step's gradient g (as a projected run stores them)
    def bmean(A):
        return np.stack([A[:, a:b].mean(1) for a, b in bspans], 1)  # (T, nb)

    pb, qb, rb = coefs(bmean(Mm), bmean(Vv), bmean(G))  # (T, nb)
    decb = bmean(decay)

    def full_of(v):
        return np.repeat(v, bsz, axis=-1)

    pB1, qB1, rB1 = full_of(pb), full_of(qb), full_of(rb)
    # whitened: sqrt(D_t) per coordinate from the real second moment after step t
    sqD = 1.0 / np.sqrt(np.sqrt(Vv / bc2[:, None]) + eps)
    pw = lrs / bc1

    # ------------------------------------------------------------ sketches
    sk, rec_check = {}, {}
    fracs = [f"{100 * K / P:.0f}%" for K in ks]  # "1%", "5%", "15%": the variants' tags
    for K, f in zip(ks, fracs):
        sk[("kron", f)] = Sketch(blocks, K, "kron")
        sk[("dense", f)] = Sketch(blocks, K, "dense")
        sk[("prop", f)] = Sketch(blocks, {b["name"]: max(1, round(K * b["idx"].size / P)) for b in blocks}, "kron")
        rec_check[f] = check_against_recorder(factory, batches[0], lrs[0], opt_cfg, rcfg, X, Y, blocks, perm, K)
        log(f"sketch {f} of P: K={K}, kron k={sk[('kron', f)].k}, dense k={sk[('dense', f)].k}; against the recorder's "
            f"stored rows of step 0: {rec_check[f]:.1e}")

    passes = {
        "B0": Pass(gte, b1, b2, T), "B1": Pass(gte, b1, b2, T), "B2": Pass(gte, b1, b2, T), "B3": Pass(gte, b1, b2, T),
        "W0": Pass(gte * sqD[-1], b1, b2, T), "B1-layer": Pass(gte, b1, b2, T),
    }
    if not args.no_tok:
        passes["B3-tok"] = Pass(gte, b1, b2, T)
    s0 = {}
    for f in fracs:
        S, Sd = sk[("kron", f)], sk[("dense", f)]
        Sg = S(gte)
        passes[f"S1 {f}"] = Pass(Sg, b1, b2, T)
        passes[f"S1-full {f}"] = Pass(Sg, b1, b2, T)
        passes[f"S2 {f}"] = Pass(Sd(gte), b1, b2, T)
        passes[f"S1-prop {f}"] = Pass(sk[("prop", f)](gte), b1, b2, T)
        if not args.no_tok:
            passes[f"S3 {f}"] = Pass(Sg, b1, b2, T)
        passes[f"S4 {f}"] = Pass(S(gte * sqD[-1]), b1, b2, T)
        passes[f"S5 {f}"] = Pass(Sg, b1, b2, T)
        passes[f"S5-layer {f}"] = Pass(Sg, b1, b2, T)
        passes[f"S1-nov {f}"] = Pass(Sg, b1, b2, T)
        passes[f"S1-full-nov {f}"] = Pass(Sg, b1, b2, T)
        for base in ("B0", "B3"):
            s0[f"S0 {base} {f}"] = [None] * T

    gen = torch.Generator().manual_seed(0)
    contrib = np.zeros(nb)
    for s in range(T - 1, -1, -1):
        b = batches[s]
        c, NB = float(ref.grad_scales[s]), b.targets[1]
        ids, lab = torch.as_tensor(X[b.sample_ids]), torch.as_tensor(Y[b.sample_ids])
        work.load_state_dict(ref.snapshots[s].model)
        gstate = gen.get_state()
        _, fseq = AD.step_products(work, tp, ids, lab, NB, gen, flat, unflat, True)
        ftok = None
        if not args.no_tok:
            ftok, owner = token_rows(work, tp, ids, lab, NB, gstate, perm)
            if s == T - 1:  # the token rows sum to the sequence rows (same sampled labels)
                chk = np.abs(np.stack([ftok[owner == i].sum(0) for i in range(len(ids))]) - fseq).max() / np.abs(fseq).max()
                log(f"per-token rows: {len(ftok)} at step {s}; their per-sequence sums vs the sequence rows: {chk:.1e}")
        ghat = G[s] / np.linalg.norm(G[s])
        ps = per[s]
        passes["B0"].step(s, pB0[s], qB0[s], rB0[s], decay[s], c, ps, fseq, None, ghat)
        passes["B1"].step(s, pB1[s], qB1[s], rB1[s], decay[s], c, ps, fseq, None, ghat)
        passes["B2"].step(s, pB1[s], qB1[s], rB1[s], decay[s], c, ps, fseq, None, None)
        passes["B3"].step(s, pB1[s], qB1[s], rB1[s], decay[s], c, ps, fseq, bspans, None)
        passes["B1-layer"].step(s, pB1[s], qB1[s], rB1[s], decay[s], c, ps, fseq, bspans, ghat)
        if s >= T // 2:  # each block's share of B3's late scores (sum of |gam_b . g_b| over lines and occurrences)
            gm = passes["B3"].gam
            contrib += [np.abs(gm[:, a:b] @ ps[:, a:b].T).sum() for a, b in bspans]
        if ftok is not None:
            passes["B3-tok"].step(s, pB1[s], qB1[s], rB1[s], decay[s], c, ps, ftok, bspans, None)
        wsq = sqD[s][None]
        passes["W0"].step(s, pw[s], None, None, decay[s], c, ps * wsq, fseq * wsq, bspans, None)
        for f in fracs:
            S, Sd = sk[("kron", f)], sk[("dense", f)]
            pk, qk, rk, dk = (S.per_block(x[s]) for x in (pb, qb, rb, decb))
            Sper, Sf = S(ps), S(fseq)
            passes[f"S1 {f}"].step(s, pk, qk, rk, dk, c, Sper, Sf, S.spans, None)
            passes[f"S1-full {f}"].step(s, pk, qk, rk, dk, c, Sper, Sf, None, None)
            passes[f"S1-nov {f}"].step(s, pk, None, None, dk, c, Sper, Sf, S.spans, None)
            passes[f"S1-full-nov {f}"].step(s, pk, None, None, dk, c, Sper, Sf, None, None)
            SG = S(G[s])[0]
            passes[f"S5 {f}"].step(s, pk, qk, rk, dk, c, Sper, Sf, None, SG / np.linalg.norm(SG))
            passes[f"S5-layer {f}"].step(s, pk, qk, rk, dk, c, Sper, Sf, S.spans, SG / np.linalg.norm(SG))
            passes[f"S2 {f}"].step(s, pk, qk, rk, dk, c, Sd(ps), Sd(fseq), Sd.spans, None)
            Sp = sk[("prop", f)]
            passes[f"S1-prop {f}"].step(s, *(Sp.per_block(x[s]) for x in (pb, qb, rb, decb)), c, Sp(ps), Sp(fseq),
                                        Sp.spans, None)
            if ftok is not None:
                passes[f"S3 {f}"].step(s, pk, qk, rk, dk, c, Sper, S(ftok), S.spans, None)
            passes[f"S4 {f}"].step(s, pw[s], None, None, dk, c, S(ps * wsq), S(fseq * wsq), S.spans, None)
            for base in ("B0", "B3"):
                s0[f"S0 {base} {f}"][s] = S(passes[base].gam) @ S(-c * ps).T
        if s % 10 == 0:
            log(f"reverse pass at step {s}")

    est = {k: np.concatenate(v.scores, 1) for k, v in passes.items()}
    est.update({k: np.concatenate(v, 1) for k, v in s0.items()})
    rows = [(t, int(x)) for t in range(T) for x in batches[t].sample_ids]
    if args.raw:
        np.savez(args.raw, rows=np.array(rows), contrib=contrib, **{k.replace(" ", "_"): v for k, v in est.items()})
    late = np.array([r[0] for r in rows]) >= T // 2

    def rho(e, tru, msk=None):
        e, tru = e.T, tru.T
        return spearman_per_test(e if msk is None else e[msk], tru if msk is None else tru[msk])

    out = {"cmd": " ".join(sys.argv), "P": P, "T": T, "batch": B, "n_query": len(test_lines),
           "n_occurrences": len(rows), "fracs": fracs, "ks": ks, "n_blocks": nb,
           "k": {f: {"K": K, "kron": sk[("kron", f)].k, "dense": sk[("dense", f)].k} for K, f in zip(ks, fracs)},
           "block_k": {f: [int(w) for w in sk[("kron", f)].widths] for f in fracs},
           "block_k_prop": {f: [int(w) for w in sk[("prop", f)].widths] for f in fracs},
           "block_score_share_late": (contrib / contrib.sum()).tolist(),
           "vs_recorder_rows": rec_check,
           "block_names": [b["name"] for b in blocks], "block_sizes": [int(x) for x in bsz], "scores": {}}
    rep = None
    if args.replay and Path(args.replay).exists():
        z = np.load(args.replay)
        key = {(int(a), int(b)): r for r, (a, b) in enumerate(zip(z["step"], z["sample_id"]))}
        rep = z["truth"][: len(test_lines), [key[r] for r in rows]]
    meta_p = Path(args.study_export) / "meta.json"
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else None
    if meta is not None:
        rem = [tuple(x) for x in meta["loo_removals"]]
        full = np.asarray(meta["loo_truth"], np.float64)[: len(test_lines)].T
        r60 = np.array([rows.index(x) for x in rem])
        ne = len(rem) // 2
    for k, e in est.items():
        row: dict = {}
        if rep is not None:
            row["vs_exact_linearisation"] = [rho(e, rep), rho(e, rep, ~late), rho(e, rep, late)]
        if meta is not None:
            e60 = e[:, r60].T
            row["vs_full_removal_60"] = [spearman_per_test(e60, full), spearman_per_test(e60[:ne], full[:ne]),
                                         spearman_per_test(e60[ne:], full[ne:])]
        ref_est = est["B0"] if not k.startswith("S0") else None
        if ref_est is not None:
            row["vs_B0"] = [rho(e, ref_est), rho(e, ref_est, ~late), rho(e, ref_est, late)]
        out["scores"][k] = row
        log(k, {a: [round(x, 3) for x in v] for a, v in row.items()})
    # where the score sits: each recorded block's share of the B3 pass's |gam . g| on the late occurrences
    out["wall_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(out, indent=1))
    Path(args.out).with_suffix(".md").write_text(report(out))
    log(f"wrote {args.out} and its .md")


WHAT = {
    "B0": "exact gradients; fisher-seq rows, moments as per-tensor means, clip direction on, full curvature (the 0.76 variant)",
    "B1": "B0 with m, v **and g** as means over each recorded block (as a projected run stores them)",
    "B2": "B1 without the clip direction (the Adam-aware build keeps only the clip coefficient)",
    "B3": "B2 with the curvature per recorded block (`blocks=\"layer\"`): the product's build without the sketch",
    "B1-layer": "B1 with the curvature per recorded block (clip direction kept)",
    "B3-tok": "B3 with one Fisher row per predicted token",
    "W0": "whitened by AdamW's per-coordinate `sqrt(D_t)` (`precondition=\"adam\"`), per block, no sketch",
    "S0 B0": "B0's exact adjoint, only the final dot product through the sketch",
    "S0 B3": "B3's exact adjoint, only the final dot product through the sketch",
    "S1": "B3 carried in the Kronecker sketch (the product's build)",
    "S1-full": "S1 with the cross-block curvature (`blocks=\"full\"`)",
    "S1-nov": "S1 without the second-moment term (what the product's build keeps under a sketch)",
    "S1-full-nov": "S1-full without the second-moment term (the product's `blocks=\"full\"` build)",
    "S1-prop": "S1 with the budget split in proportion to the blocks' sizes (`proj_dim` as a dict)",
    "S2": "S1 with a dense orthogonal sketch per block (same per-block budget)",
    "S3": "S1 with the per-token Fisher rows (sketched)",
    "S4": "W0 in the Kronecker sketch (the product's whitened build)",
    "S5": "B1 in the sketch: S1 with the clip direction (from the sketched batch gradient) and the cross-block curvature",
    "S5-layer": "S1 with the clip direction (curvature per block)",
}


def report(out: dict) -> str:
    """The markdown fragment that ``report.py`` puts in docs/results/lm.md."""
    def cell(v, i=2):
        return f"{v[i]:+.3f}" if v else ""

    fr = out["fracs"]
    L = ["### What the sketch loses: the fisher-seq pass, with the sketch one piece at a time", "",
         "Command: `PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 15 python experiments/lm/sketch_decomposition.py "
         f"--study-export runs/lm/small-adamw/export --replay <replay_check work dir>/replay_truth.npz` "
         f"({out['wall_s']:.0f} s wall, 2 shared cores). Same run, removals and float64 reference as the table above "
         f"(P = {out['P']:,}, {out['n_occurrences']} occurrences x {out['n_query']} held-out lines); sketches: the "
         f"recorder's orthogonal Kronecker sketch over its {out['n_blocks']} blocks (`split_budget`, `projection_matrix`), "
         "K = " + ", ".join(f"{out['k'][f]['K']:,} ({f}; {out['k'][f]['kron']:,} columns used)" for f in fr) + (f"; the sketch reproduces the product's stored rows (a `Recorder(proj_dim=K, optimizer=AdamW)` "
         f"recording of step 0) to {max(out['vs_recorder_rows'].values()):.0e} of the largest entry"
         if out.get("vs_recorder_rows") else "") + ". Cells: Spearman on the "
         "late removals (last third of the steps) against the 60 full removals, then against the exact "
         "linearisation (`replay_influence`) on all late occurrences (steps 30-59).", "",
         "| variant | what | no sketch | " + " | ".join(f"K = {f} of P" for f in fr) + " |",
         "|---|---|---|" + "---|" * len(fr)]
    sc = out["scores"]

    def both(r):
        if not r:
            return ""
        a = cell(r.get("vs_full_removal_60"))
        b = cell(r.get("vs_exact_linearisation"))
        return f"{a} / {b}" if b else a

    for k in ("B0", "B1", "B2", "B3", "B1-layer", "B3-tok", "W0"):
        if k in sc:
            L.append(f"| {k} | {WHAT[k]} | {both(sc[k])} |" + " |" * len(fr))
    for k in ("S0 B0", "S0 B3", "S1", "S1-full", "S1-nov", "S1-full-nov", "S1-prop", "S2", "S3", "S4", "S5-layer", "S5"):
        cells = [both(sc.get(f"{k} {f}")) for f in fr]
        if any(cells):
            L.append(f"| {k} | {WHAT[k]} | | " + " | ".join(cells) + " |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
