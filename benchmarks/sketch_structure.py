"""Study: Kronecker vs dense per-layer sketches at the same budget (section C's MLPs), offline.

Our recorder sketches a Linear layer's per-sample gradient ``g a^T`` with a Kronecker product of two
small orthogonal sketches (``(S_out g)(S_in a)^T``), which never materialises the gradient. dattri's
dense projection sketches the whole flattened gradient with one dense matrix. This study separates
the two effects (sketch structure, per-layer budget split) on the same trajectory:

1. train section C's MLP once with an *exact* run (``proj_dim=None``), same data, seed and schedule;
2. project the stored exact per-sample gradients and the exact test gradients offline, per layer,
   with the same number of dimensions ``k`` per layer: (a) the Kronecker sketch the recorder uses;
   (b) a Khatri-Rao sketch, ``(S_out g) * (S_in a) / sqrt(k)`` elementwise with ``k``-row side
   matrices (Gaussian, or stacked orthogonal frames), which also never materialises ``g a^T`` and
   costs ``k (out + in)`` per example; (c) a dense orthogonal sketch of the flattened layer gradient
   (``k x size`` per example); three seeds each;
3. run the recursion (``datavalue.embeddings._core.step_back``, empirical Fisher, per-layer
   operators) on each, and score Spearman (mean over test points, all-epoch scores) against the
   exact build of the same run.

Budget splits: the recorder's default (water-filling), proportional to layer size, proportional to
the square root of layer size. Uses internal functions; not part of the public API.

Run: ``python benchmarks/sketch_structure.py [--quick]``; writes ``docs/results/sketch_structure.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("TQDM_DISABLE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the small MLP (P=2410)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "results" / "sketch_structure.md"))
    a = ap.parse_args()
    cfgs = [dict(d=64, h=32, c=10, n=512, B=32, E=4, m=32)]
    if not a.quick:
        cfgs.append(dict(d=128, h=64, c=10, n=2048, B=64, E=5, m=64))
    lines = ["# Kronecker, Khatri-Rao and dense per-layer sketches (offline study)", "",
             f"Command: `python benchmarks/sketch_structure.py{' --quick' if a.quick else ''}`. Section C's MLPs "
             "(benchmarks/build_vs_dattri.py), K = 1024, orthogonal sketches, empirical-Fisher recursion with "
             f"per-layer operators; Spearman against the exact build of the same run, mean of {a.seeds} sketch "
             "seeds (min-max in brackets).", ""]
    t0 = time.perf_counter()
    for cfg in cfgs:
        lines += study(cfg, a.seeds)
    lines += ["", f"Total time {time.perf_counter() - t0:.0f} s."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def study(cfg, n_seeds, K=1024):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from build_vs_dattri import _train_with, make_data, make_model
    from scipy.stats import spearmanr

    import datavalue
    from datavalue.capture._projection import projection_matrix, split_budget
    from datavalue.embeddings import _core as core
    from datavalue.store import open_run

    torch.set_num_threads(2)
    d, h, c, n, B, E, m = (cfg[k] for k in "d h c n B E m".split())
    x, y = make_data(n + m, d, c, 0, torch.float32)
    xt, yt, x, y = x[n:], y[n:], x[:n], y[:n]
    model = make_model("mlp", d, c, h, torch.float32)
    path = os.path.join(tempfile.mkdtemp(), "exact.zarr")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float32")
    _train_with(model, opt, x, y, B, E, 0.1, rec=rec)
    run = open_run(path)
    G = run.read("grads").astype(np.float64)
    ptr, lr, w, sid = run.step_ptr, run.lr, run.read("weight"), run.sample_id
    Gt = datavalue.per_sample_gradients(model, lambda mm: F.cross_entropy(mm(xt), yt, reduction="none"),
                                        run).astype(np.float64)
    blocks = run.manifest["projection"]["blocks"]
    names = [b["name"] for b in blocks]
    kinds = [b["kind"] for b in blocks]
    shapes = [b["shape"] for b in blocks]
    sizes = [int(np.prod(s)) for s in shapes]
    starts = np.cumsum([0, *sizes])

    def sketches(kind, ks, seed):
        fns = []
        for i, (b, (kr, kc, k)) in enumerate(zip(blocks, ks, strict=True)):
            if k >= sizes[i]:
                fns.append(lambda X: X)
            elif kind == "kron" and b["kind"] == "kron":
                o, q = b["shape"]
                So = projection_matrix(seed, i, 0, kr, o, "orthogonal") if kr < o else np.eye(o)
                Sq = projection_matrix(seed, i, 1, kc, q, "orthogonal") if kc < q else np.eye(q)
                fns.append(lambda X, So=So, Sq=Sq, o=o, q=q: np.einsum(
                    "ro,nos,cs->nrc", So, X.reshape(-1, o, q), Sq, optimize=True).reshape(X.shape[0], -1))
            elif kind in ("kr", "kr-ortho") and b["kind"] == "kron":
                o, q = b["shape"]
                rng = np.random.default_rng([seed, i, 7])
                def frames(kk, dim, kind=kind, rng=rng):
                    if kind == "kr":
                        return rng.standard_normal((kk, dim))
                    reps = -(-kk // dim)
                    fr = [np.linalg.qr(rng.standard_normal((dim, dim)))[0] * np.sqrt(dim) for _ in range(reps)]
                    return np.concatenate(fr)[:kk]
                So, Sq = frames(k, o), frames(k, q)
                fns.append(lambda X, So=So, Sq=Sq, o=o, q=q, k=k: np.einsum(
                    "jo,nos,js->nj", So, X.reshape(-1, o, q), Sq, optimize=True) / np.sqrt(k))
            else:
                S = projection_matrix(seed, i, 2, k, sizes[i], "orthogonal")
                fns.append(lambda X, S=S: X @ S.T)
        return fns

    def scores(fns):
        def proj(X):
            return np.concatenate([f(X[:, a:b]) for f, a, b in zip(fns, starts[:-1], starts[1:], strict=True)], 1)

        P, T = proj(G), proj(Gt)
        widths = [f(np.zeros((1, b - a))).shape[1] for f, a, b in zip(fns, starts[:-1], starts[1:], strict=True)]
        ks = np.cumsum([0, *widths])
        states = [core.init_state(b - a) for a, b in zip(ks[:-1], ks[1:], strict=True)]
        V = np.zeros_like(P)
        for t in range(run.n_steps - 1, -1, -1):
            r0, r1 = ptr[t], ptr[t + 1]
            for i, (a, b) in enumerate(zip(ks[:-1], ks[1:], strict=True)):
                states[i], V[r0:r1, a:b] = core.step_back(states[i], P[r0:r1, a:b], w[r0:r1], lr=float(lr[t]),
                                                          inplace=True)
        S = V @ T.T
        tot = np.zeros((int(sid.max()) + 1, S.shape[1]))
        np.add.at(tot, sid, S)
        return tot

    ref = scores([lambda X: X for _ in blocks])

    def sp(s):
        return float(np.mean([spearmanr(s[:, j], ref[:, j])[0] for j in range(s.shape[1])]))

    P = sum(sizes)
    out = [f"## MLP {d}-{h}-{c}, P = {P:,}, {run.n_steps} steps of {B}", "",
           "| budget split | dims per layer | Kronecker | Khatri-Rao gaussian | Khatri-Rao stacked orthogonal | dense |", "|---|---|---|---|---|---|"]
    splits = [("water-filling (default)", split_budget(names, kinds, shapes, K))]
    for label, wts in (("proportional to size", sizes), ("proportional to sqrt(size)", [s ** 0.5 for s in sizes])):
        alloc = [min(sz, int(round(K * v / sum(wts)))) for v, sz in zip(wts, sizes, strict=True)]
        splits.append((label, split_budget(names, kinds, shapes, dict(zip(names, alloc, strict=True)))))
    for label, ks in splits:
        cells = []
        for kind in ("kron", "kr", "kr-ortho", "dense"):
            vals = [sp(scores(sketches(kind, ks, seed))) for seed in range(n_seeds)]
            cells.append(f"{np.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
        dims = " / ".join(str(k[2]) if kk == "dense" else f"{k[2]} ({k[0]}x{k[1]})" for k, kk in zip(ks, kinds, strict=True))
        out.append(f"| {label} | {dims} | " + " | ".join(cells) + " |")
    return [*out, ""]


if __name__ == "__main__":
    main()
