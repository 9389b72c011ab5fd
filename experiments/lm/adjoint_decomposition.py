"""Where the AdamW gap comes from (issue 19): the exact first-order trajectory influence of every
occurrence, computed as an adjoint (reverse) pass over the float64 reference run, with each piece of
the linearised AdamW step switched on or off. Public API only (``datavalue.testing``) plus torch.

The small AdamW LM of ``run.py`` (same config, seeds, data, schedule, clipping, token-mean loss) is
trained once by ``train_reference`` with a snapshot before every step. Then, for every held-out line,
one reverse pass carries the adjoint of ``(theta, m, v)`` from the final weights back to step 0:

    d theta_{s+1} = decay_s d theta_s - p_s * d m_s + q_s * d v_s
    d m_s = b1 d m_{s-1} + (1 - b1) d g_s,   d v_s = b2 d v_{s-1} + 2 (1 - b2) g_s * d g_s
    d g_s = c_s P_s (K_s d theta_s + d g_inj),  P_s = I - ghat ghat^T on clipped steps (else I)

(``p, q`` AdamW's per-coordinate coefficients from the step's real moments, ``c_s`` the clip
coefficient, ``K_s`` a curvature). An occurrence's score is its injection ``-g_i`` dotted with the
adjoint of ``d g`` at its step. Variants:

- ``hess+clip+v``: ``K`` = the exact Hessian of the step's loss (double backward), clip direction and
  second moment on: the exact linearisation, i.e. what ``datavalue.replay_influence`` computes (the
  reference of the columns "vs exact linearisation");
- ``hess+clip`` / ``hess+v``: the same without the second-moment perturbation / without the clip
  coefficient's dependence on the batch;
- ``ggn+clip+v``: ``K`` = the Gauss-Newton matrix (what a true Fisher estimates), exact per token;
- ``fisher-tok`` / ``fisher-seq``: ``K`` = the sampled-label Fisher (one label per token, fixed seed), with
  one row per token / per sequence (the recorder's ``curvature="fisher"`` rows are per sequence);
- ``ef+clip+v``: ``K`` = the empirical Fisher of the batch (``N_B sum_i g_i g_i^T``);
- ``none+clip+v``: no curvature (the direct effect of the removal on the rest of the run).

No sketch anywhere: this bounds what a trajectory method can reach with each curvature.

    PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python experiments/lm/adjoint_decomposition.py

Writes ``experiments/lm/adjoint_decomposition.json``. With ``--replay FILE`` (the ``replay_truth.npz``
that ``replay_check.py --ks exact --skip-methods --work DIR`` leaves in DIR) it also compares the
``hess+clip+v`` pass with ``replay_influence``; with the study's export (``runs/lm/small-adamw/export``,
from ``run.py``) it scores every variant against the study's 60 full removals.
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

import common as C  # noqa: E402

from datavalue.testing import spearman_per_test  # noqa: E402

#: variant -> (curvature, clip direction on, second moment on[, "block": AdamW's coefficients from the moments'
#: means over each parameter tensor, as the sketched builds keep them])
VARIANTS = {
    "hess+clip+v": ("hess", True, True),
    "hess+clip": ("hess", True, False),
    "hess+v": ("hess", False, True),
    "ggn+clip+v": ("ggn", True, True),
    "fisher-tok+clip+v": ("fisher-tok", True, True),
    "fisher-seq+clip+v": ("fisher-seq", True, True),
    "ef+clip+v": ("ef", True, True),
    "none+clip+v": ("none", True, True),
    "ggn+clip+v (block-mean moments)": ("ggn", True, True, "block"),
    "fisher-seq+clip+v (block-mean moments)": ("fisher-seq", True, True, "block"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-query", type=int, default=30)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--replay", default=None, help="replay_truth.npz of replay_check.py (optional cross-check)")
    ap.add_argument("--study-export", default=str(HERE.parents[1] / "runs/lm/small-adamw/export"))
    ap.add_argument("--out", default=str(HERE / "adjoint_decomposition.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    variants = [v for v in args.variants.split(",") if v]

    def log(*a):
        print(f"[{time.time() - t0:6.0f}s]", *a, flush=True)

    study = C.Study("small-adamw", n_query=args.n_query, eager=True)  # the study's small AdamW LM (run.py)
    name, opt_cfg, B, T, test_lines = study.name, study.opt_cfg, study.B, study.T, study.test_lines
    X, Y, batches, lrs = study.X, study.Y, study.batches, study.lrs
    R = study.replay_inputs()  # the run, its moments and gradients, in the optimizer's order
    log(f"{name}: trained {T} steps, {len(test_lines)} query lines")
    ref, sizes, work, tp, P = R.ref, R.sizes, R.work, R.tp, R.P
    flat, unflat, wd, Mm, Vv, G, per, gte = R.flat, R.unflat, R.wd, R.Mm, R.Vv, R.G, R.per, R.gte
    b1, b2 = opt_cfg["betas"]
    eps = opt_cfg["eps"]
    # the moments recorded by torch are reproduced from the per-sample gradients
    worst = max(np.abs(Mm[t] - b1 * Mm[t - 1] - (1 - b1) * G[t]).max() / np.abs(Mm[t]).max() for t in range(1, T))
    log(f"per-sample gradients of {T * B} occurrences, {len(test_lines)} test gradients; first moment check {worst:.1e}")

    s_ = np.arange(T)
    bc1, bc2 = 1 - b1 ** (s_ + 1), 1 - b2 ** (s_ + 1)
    vhat = Vv / bc2[:, None]
    den = np.sqrt(vhat) + eps
    p_co = lrs[:, None] / (bc1[:, None] * den)
    q_co = lrs[:, None] * (Mm / bc1[:, None]) / den**2 / (2 * np.maximum(np.sqrt(vhat), 1e-300) * bc2[:, None])
    decay = 1 - lrs[:, None] * wd[None]
    # the same coefficients from each parameter tensor's mean moments (what a sketched build keeps)
    cuts = np.cumsum([0] + sizes)
    Mb, Vb = np.empty_like(Mm), np.empty_like(Vv)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        Mb[:, lo:hi] = Mm[:, lo:hi].mean(1, keepdims=True)
        Vb[:, lo:hi] = Vv[:, lo:hi].mean(1, keepdims=True)
    vhb = Vb / bc2[:, None]
    denb = np.sqrt(vhb) + eps
    coef = {None: (p_co, q_co), "block": (lrs[:, None] / (bc1[:, None] * denb),
                                          lrs[:, None] * (Mb / bc1[:, None]) / denb**2 / (2 * np.maximum(np.sqrt(vhb), 1e-300) * bc2[:, None]))}

    lam = {k: gte.copy() for k in variants}  # adjoint of theta_{s+1}
    mu = {k: np.zeros_like(gte) for k in variants}  # adjoint of m_s
    nu = {k: np.zeros_like(gte) for k in variants}  # adjoint of v_s
    scores = {k: [None] * T for k in variants}
    gen = torch.Generator().manual_seed(0)
    for s in range(T - 1, -1, -1):
        b = batches[s]
        c, NB = float(ref.grad_scales[s]), b.targets[1]
        ids, lab = torch.as_tensor(X[b.sample_ids]), torch.as_tensor(Y[b.sample_ids])
        work.load_state_dict(ref.snapshots[s].model)
        curv, fseq = step_products(work, tp, ids, lab, NB, gen, flat, unflat,
                                   any(VARIANTS[k][0] == "fisher-seq" for k in variants))
        ghat = G[s] / np.linalg.norm(G[s])
        for k in variants:
            kind, use_clip, use_v = VARIANTS[k][:3]
            pc, qc = coef[VARIANTS[k][3] if len(VARIANTS[k]) > 3 else None]
            mu[k] = -pc[s][None] * lam[k] + b1 * mu[k]
            if use_v:
                nu[k] = qc[s][None] * lam[k] + b2 * nu[k]
            gam = (1 - b1) * mu[k] + (2 * (1 - b2) * G[s][None] * nu[k] if use_v else 0.0)
            if use_clip and c < 1.0:
                gam = gam - np.outer(gam @ ghat, ghat)
            if kind == "none":
                K = 0.0
            elif kind == "ef":
                K = NB * (gam @ per[s].T) @ per[s]
            elif kind == "fisher-seq":
                K = (gam @ fseq.T) @ fseq
            else:
                K = np.stack([curv(kind, x) for x in gam])
            lam[k] = decay[s][None] * lam[k] + c * K
            scores[k][s] = gam @ (-c * per[s]).T  # (m, b): change of each test loss when the occurrence is removed
        if s % 10 == 0:
            log(f"adjoint pass at step {s}")

    est = {k: np.concatenate(v, 1) for k, v in scores.items()}
    rows = [(t, int(x)) for t in range(T) for x in batches[t].sample_ids]
    late = np.array([r[0] for r in rows]) >= T // 2
    out = {"cmd": " ".join(sys.argv), "P": P, "T": T, "batch": B, "n_query": len(test_lines), "n_occurrences": len(rows),
           "first_moment_check": worst, "variants": {k: list(VARIANTS[k][:3]) for k in variants}, "scores": {}}

    def rho(e, tru, msk=None):
        e, tru = e.T, tru.T
        return spearman_per_test(e if msk is None else e[msk], tru if msk is None else tru[msk])

    exact = est.get("hess+clip+v")
    if args.replay and Path(args.replay).exists() and exact is not None:
        z = np.load(args.replay)
        key = {(int(a), int(b)): r for r, (a, b) in enumerate(zip(z["step"], z["sample_id"]))}
        rep = z["truth"][:, [key[r] for r in rows]]
        out["vs_replay_influence"] = {"spearman": rho(exact, rep),
                                      "max_rel": float(np.abs(exact - rep).max() / np.abs(rep).max())}
        log(f"hess+clip+v against datavalue.replay_influence: {out['vs_replay_influence']}")
    meta_p = Path(args.study_export) / "meta.json"
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else None
    if meta is not None:
        rem = [tuple(x) for x in meta["loo_removals"]]
        full = np.asarray(meta["loo_truth"], np.float64)[: len(test_lines)].T
        r60 = np.array([rows.index(x) for x in rem])
        ne = len(rem) // 2
    for k, e in est.items():
        row: dict = {}
        if exact is not None:
            row["vs_exact_linearisation"] = [rho(e, exact), rho(e, exact, ~late), rho(e, exact, late)]
        if meta is not None:
            e60 = e[:, r60].T
            row["vs_full_removal_60"] = [spearman_per_test(e60, full), spearman_per_test(e60[:ne], full[:ne]),
                                         spearman_per_test(e60[ne:], full[ne:])]
        out["scores"][k] = row
        log(k, {a: [round(x, 3) for x in b] for a, b in row.items()})
    out["wall_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(out, indent=1))
    Path(args.out).with_suffix(".md").write_text(report(out))
    log(f"wrote {args.out} and its .md")


def step_products(work, tp, ids, lab, NB, gen, flat, unflat, want_fseq):
    """At the weights loaded in ``work``: ``curv(kind, vec)``, the product of one step's curvature with a
    flat vector, and (``want_fseq``) the per-sequence sampled-label Fisher rows ``(b, P)``."""
    g1 = torch.autograd.grad(C.step_loss_fn(work, ids, (lab, NB)).sum(), tp, create_graph=True)
    logits = work(input_ids=ids).logits
    u = torch.zeros_like(logits, requires_grad=True)
    Jt_u = torch.autograd.grad(logits, tp, grad_outputs=u, create_graph=True)
    prob = torch.softmax(logits.detach(), -1)
    valid = torch.zeros(logits.shape[:2], dtype=torch.float64)
    valid[:, :-1] = (lab[:, 1:] != -100).double()
    # sampled labels (one per token) -> pseudo-residuals e_y - p, per token
    yhat = torch.multinomial(prob.reshape(-1, prob.shape[-1]), 1, generator=gen).view(prob.shape[:2])
    resid = (torch.nn.functional.one_hot(yhat, prob.shape[-1]).double() - prob) * valid[..., None]
    fseq = None
    if want_fseq:
        fseq = np.stack([flat(torch.autograd.grad(logits[i], tp, grad_outputs=resid[i], retain_graph=True))
                         for i in range(len(ids))]) / np.sqrt(NB)

    def jvp(vec):
        return torch.autograd.grad(Jt_u, u, grad_outputs=unflat(vec), retain_graph=True)[0]

    def jt(w):
        return flat(torch.autograd.grad(logits, tp, grad_outputs=w, retain_graph=True))

    def curv(kind, vec):
        if kind == "hess":
            return flat(torch.autograd.grad(g1, tp, grad_outputs=unflat(vec), retain_graph=True))
        if kind == "ggn":
            Jv = jvp(vec)
            return jt((prob * Jv - prob * (prob * Jv).sum(-1, keepdim=True)) * valid[..., None] / NB)
        if kind == "fisher-tok":
            return jt(resid * (resid * jvp(vec)).sum(-1, keepdim=True) / NB)
        raise ValueError(kind)

    return curv, fseq


WHAT = {
    "hess": "exact Hessian of the step's loss", "ggn": "Gauss-Newton (exact, per token)",
    "fisher-tok": "sampled-label Fisher, a row per token", "fisher-seq": "sampled-label Fisher, a row per sequence "
    "(the recorder's rows)", "ef": "empirical Fisher of the batch", "none": "none",
}


def report(out: dict) -> str:
    """The markdown fragment that ``report.py`` puts in docs/results/lm.md."""
    def cell(v):
        return f"{v[0]:+.3f} ({v[1]:+.2f} / {v[2]:+.2f})" if v else ""

    L = ["### Where the AdamW gap comes from: the exact first-order pass, one piece at a time", "",
         f"Command: `PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python experiments/lm/adjoint_decomposition.py "
         f"--replay <replay_check work dir>/replay_truth.npz` ({out['wall_s']:.0f} s wall, 2 shared cores). Small AdamW LM "
         f"(P = {out['P']:,}, {out['T']} steps, batch {out['batch']}, {out['n_occurrences']} occurrences x "
         f"{out['n_query']} held-out lines), float64, **exact gradients, no sketch**: one reverse pass per line carries the "
         "adjoint of AdamW's `(theta, m, v)` from the final weights to step 0, with the real per-coordinate moments; "
         "each row switches one piece of the linearised step off or swaps the curvature.", ""]
    if "vs_replay_influence" in out:
        v = out["vs_replay_influence"]
        L += [f"The full pass (`hess+clip+v`) is the exact linearisation: against `datavalue.replay_influence` on the "
              f"same run, Spearman {v['spearman']:.4f}, max |difference| {v['max_rel']:.1e} of the largest value.", ""]
    L += ["| variant | curvature | clip direction | second moment | vs exact linearisation: all (early / late) | "
          "vs 60 full removals: all (early / late) |", "|---|---|---|---|---|---|"]
    for k, r in out["scores"].items():
        kind, clip, v = out["variants"][k]
        L.append(f"| {k} | {WHAT[kind]} | {'on' if clip else 'off'} | {'on' if v else 'off'} | "
                 f"{cell(r.get('vs_exact_linearisation'))} | {cell(r.get('vs_full_removal_60'))} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
