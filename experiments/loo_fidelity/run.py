"""Fidelity of data value embeddings against exact trajectory-specific LOO on real MNIST.

For each learning rate: one float64 SGD run of a small tanh MLP on 14x14 MNIST, recorded four times
on the identical trajectory (exact gradients and projections 4096 / 1024 / 256, all with true-Fisher
pseudo-gradients), embeddings built for curvature none / empirical_fisher / fisher, and their
estimates compared (Spearman per test point, averaged) with exact TSLOO from
``datavalue.testing.trajectory_loo`` for single-occurrence and all-epoch removals. Baselines: TracIn
with per-step checkpoints, gradient dot product at the final model, and an influence function with a
damped exact Hessian at the final model.

Usage:
    .venv/bin/python experiments/loo_fidelity/run.py            # full (writes docs/results/loo_fidelity.{md,png})
    .venv/bin/python experiments/loo_fidelity/run.py --quick    # smoke test, one lr (about 2 min)

Sign convention: influence = loss(without) - loss(with); positive = the occurrence helped.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import datavalue
from datavalue.data import load_mnist
from datavalue.store import open_array, open_run
from datavalue.testing import Batch, spearman_per_test, train_reference, trajectory_loo

ROOT = Path(__file__).resolve().parents[2]
CURVS = ("none", "empirical_fisher", "fisher", "hessian")
CURV_LABEL = {"none": "none (H=0)", "empirical_fisher": "empirical Fisher", "fisher": "true Fisher",
              "hessian": "exact Hessian"}
# (curvature, blocks): per-layer operators and one full operator (cross-layer curvature); H = 0 has no operator
VARIANTS = (("none", "layer"), ("empirical_fisher", "layer"), ("empirical_fisher", "full"), ("fisher", "layer"),
            ("fisher", "full"), ("hessian", "layer"), ("hessian", "full"))
BLOCK_LABEL = {"layer": " per layer", "full": " full"}


# ----------------------------------------------------------------------------- data and model
def pool2(x: np.ndarray) -> np.ndarray:
    """28x28 -> 14x14 by 2x2 average pooling, flattened."""
    n = x.shape[0]
    return x.reshape(n, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(n, 196)


def load_data(n_train: int, n_test: int, data_seed: int) -> tuple[torch.Tensor, ...]:
    """(Xtr, Ytr, Xte, Yte): real MNIST subsets (seeds data_seed, data_seed + 1), 14x14, float64."""
    xtr, ytr = load_mnist("train", n_train, seed=data_seed)
    xte, yte = load_mnist("test", n_test, seed=data_seed + 1)
    return (torch.tensor(pool2(xtr), dtype=torch.float64), torch.tensor(ytr),
            torch.tensor(pool2(xte), dtype=torch.float64), torch.tensor(yte))


def make_factory(hidden: int, seed: int):
    def factory() -> nn.Module:
        g = torch.get_rng_state()
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(196, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
        torch.set_rng_state(g)
        return m

    return factory


def ce(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def make_batches(X, Y, bs, epochs, seed):
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    out, ep = [], []
    for e in range(epochs):
        perm = rng.permutation(n)
        for i in range(0, n, bs):
            idx = np.sort(perm[i : i + bs])
            out.append(Batch(idx, X[idx], Y[idx]))
            ep.append(e)
    return out, ep


# ----------------------------------------------------------------------------- torch.func helpers
def flat_grads(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> np.ndarray:
    """(n, P) exact per-example gradients of the CE loss, parameters flattened in named order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, X, Y)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k in params], 1).numpy()


def full_hessian(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, chunk: int = 128) -> np.ndarray:
    """(P, P) exact Hessian of the mean training loss (forward-over-reverse HVPs, in chunks)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    P = flat0.numel()

    def loss(flat):
        parts = torch.split(flat, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return F.cross_entropy(functional_call(model, p, (X,)), Y)

    g = grad(loss)

    def hvp(v):
        return jvp(g, (flat0,), (v,))[1]

    H = np.empty((P, P))
    eye = torch.eye(P, dtype=torch.float64)
    for i in range(0, P, chunk):
        H[i : i + chunk] = vmap(hvp)(eye[i : i + chunk]).numpy()
    return 0.5 * (H + H.T)


# ----------------------------------------------------------------------------- one learning rate
def record(path, factory, batches, lrs, epochs_of, proj):
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=float(lrs[0]))
    rec = datavalue.Recorder(path, model, proj_dim=proj, seed=0, optimizer=opt, curvature=("fisher", "hessian"),
                             storage_dtype="float64", overwrite=True)

    def step(t, b, lr):
        # the exact Hessian of the stepped (batch-mean) loss, S H S^T, recorded next to the Fisher rows
        return rec.step(sample_ids=b.sample_ids, lr=lr, epoch=epochs_of[t],
                        hessian_loss=lambda: ce(model, b.inputs, b.targets).mean())

    with rec:
        ref = train_reference(factory, batches, lrs, ce, model=model, optimizer=opt, verify=proj is None,
                              step_context=step)
    return ref


def run_lr(lr, a, data, workdir, log):
    Xtr, Ytr, Xte, Yte = data
    factory = make_factory(a.hidden, a.seed)
    batches, epochs_of = make_batches(Xtr, Ytr, a.batch_size, a.epochs, a.seed + 1)
    T = len(batches)
    lrs = np.full(T, lr)
    test_loss = lambda m: ce(m, Xte, Yte)  # noqa: E731
    res: dict = {"lr": lr, "timings": {}}

    # --- record the identical trajectory once per projection
    t0 = time.perf_counter()
    refs, paths = {}, {}
    n_params = sum(p.numel() for p in factory().parameters())
    for proj in [None, *a.projs]:
        if proj is not None and proj >= n_params:
            log(f"proj {proj} >= {n_params} parameters: the recorder would store it exactly (= the exact row); skipped")
            continue
        key = "exact" if proj is None else str(proj)
        paths[key] = workdir / f"lr{lr}_{key}.zarr"
        refs[key] = record(paths[key], factory, batches, lrs, epochs_of, proj)
    ref = refs["exact"]
    for key, r in refs.items():
        same = all(torch.equal(ref.final_state[n], r.final_state[n]) for n in ref.final_state)
        if not same:
            raise RuntimeError(f"lr {lr}: the {key} recording did not reproduce the exact run's final weights")
    res["identical_final_weights"] = True
    res["timings"]["record"] = time.perf_counter() - t0

    final = ref.final_model()
    with torch.no_grad():
        final.eval()
        res["train_loss"] = float(ce(final, Xtr, Ytr).mean())
        res["train_acc"] = float((final(Xtr).argmax(1) == Ytr).double().mean())
        res["test_loss"] = float(test_loss(final).mean())
        res["test_acc"] = float((final(Xte).argmax(1) == Yte).double().mean())
        init = factory()
        res["init_test_loss"] = float(test_loss(init).mean())
    log(f"lr {lr}: T={T}, train loss {res['train_loss']:.3f} acc {res['train_acc']:.3f}, "
        f"test loss {res['test_loss']:.3f} (init {res['init_test_loss']:.3f}) acc {res['test_acc']:.3f}")

    # --- removals
    steps, ids = ref.occurrences()
    rng = np.random.default_rng(a.seed + 2)
    pick = np.sort(rng.choice(steps.size, a.n_single, replace=False))
    single = list(zip(steps[pick].tolist(), ids[pick].tolist()))
    all_ids = np.sort(rng.choice(np.unique(ids), a.n_all, replace=False))

    t0 = time.perf_counter()
    truth = trajectory_loo(ref, single + all_ids.tolist(), test_loss)
    truth_s, truth_a = truth[: len(single)], truth[len(single) :]
    res["timings"]["tsloo"] = time.perf_counter() - t0
    res["truth_abs_median"] = float(np.median(np.abs(truth)))

    def aggregate(scores_per_row):
        """scores (R, m) per recorded occurrence -> single-removal rows and all-epoch sums."""
        s = scores_per_row[pick]
        al = np.stack([scores_per_row[ids == sid].sum(0) for sid in all_ids])
        return s, al

    scores: dict[str, tuple[float, float]] = {}

    # --- embeddings
    t0 = time.perf_counter()
    for key, path in paths.items():
        run = open_run(path)
        if not (np.array_equal(run.row_step, steps) and np.array_equal(run.sample_id, ids)):
            raise RuntimeError(f"{key}: the run's row order differs from the reference's occurrences")
        gte = datavalue.per_sample_gradients(final, test_loss, run)  # (m, k) at the final weights
        for c, blocks in VARIANTS:
            tb = time.perf_counter()
            datavalue.build_embeddings(path, c, overwrite=True, progress=False, storage_dtype="float64", blocks=blocks)
            res["timings"][f"build_{key}_{c}_{blocks}"] = time.perf_counter() - tb
            E = np.asarray(open_array(path, f"embeddings/{c}/values")[:])
            est_s, est_a = aggregate(E @ gte.T)
            name = f"DVEmb {CURV_LABEL[c]}{BLOCK_LABEL[blocks]}, {'exact' if key == 'exact' else 'proj ' + key}"
            scores[name] = (spearman_per_test(est_s, truth_s), spearman_per_test(est_a, truth_a))
            log(f"  {name}: {scores[name][0]:.3f} / {scores[name][1]:.3f}  ({time.perf_counter() - tb:.1f}s)")
    res["timings"]["embeddings"] = time.perf_counter() - t0

    # --- baselines (exact gradients, parameter layout)
    t0 = time.perf_counter()
    w = np.concatenate(ref.weights)
    lr_row = ref.lrs[steps]
    tracin = np.empty((steps.size, Xte.shape[0]))
    for t in range(T):
        m_t = ref.model_at(t)  # weights before step t
        rows = np.flatnonzero(steps == t)
        b = batches[t]
        tracin[rows] = (lr_row[rows] * w[rows])[:, None] * (flat_grads(m_t, b.inputs, b.targets) @ flat_grads(m_t, Xte, Yte).T)
    est_s, est_a = aggregate(tracin)
    scores["TracIn (per-step checkpoints)"] = (spearman_per_test(est_s, truth_s), spearman_per_test(est_a, truth_a))

    g_tr = flat_grads(final, Xtr, Ytr)  # (n, P) at theta_T
    g_te = flat_grads(final, Xte, Yte)
    dot = (lr_row * w)[:, None] * (g_tr[ids] @ g_te.T)
    est_s, est_a = aggregate(dot)
    scores["grad dot (final model)"] = (spearman_per_test(est_s, truth_s), spearman_per_test(est_a, truth_a))

    H = full_hessian(final, Xtr, Ytr)
    P = H.shape[0]
    damp = a.if_damping * np.trace(H) / P
    import scipy.linalg
    import scipy.sparse.linalg

    lam_min = float(scipy.sparse.linalg.eigsh(H, k=1, which="SA", return_eigenvectors=False)[0])
    lam_max = float(scipy.sparse.linalg.eigsh(H, k=1, which="LA", return_eigenvectors=False)[0])
    X = scipy.linalg.solve(H + damp * np.eye(P), g_te.T, assume_a="sym")  # (P, m)
    n = Xtr.shape[0]
    infl = (g_tr @ X) / n  # removing z once: dtheta ~ (1/n) H^-1 g_z; d loss_test ~ g_test . dtheta
    occ_per_id = np.bincount(ids, minlength=n)
    est_s = infl[ids[pick]] / occ_per_id[ids[pick]][:, None]
    est_a = infl[all_ids]
    scores["influence function (damped exact Hessian)"] = (spearman_per_test(est_s, truth_s), spearman_per_test(est_a, truth_a))
    # the prescribed damping does not make an indefinite Hessian positive definite; a second variant that does
    damp_pd = max(0.0, -lam_min) + damp
    X = scipy.linalg.solve(H + damp_pd * np.eye(P), g_te.T, assume_a="sym")
    infl = (g_tr @ X) / n
    est_s = infl[ids[pick]] / occ_per_id[ids[pick]][:, None]
    est_a = infl[all_ids]
    scores["influence function (damping |lambda_min| + above)"] = (spearman_per_test(est_s, truth_s), spearman_per_test(est_a, truth_a))
    res["hessian"] = {"P": P, "damping": damp, "damping_pd": damp_pd, "lambda_min": lam_min, "lambda_max": lam_max}
    res["timings"]["baselines"] = time.perf_counter() - t0
    for k in list(scores)[-4:]:
        log(f"  {k}: {scores[k][0]:.3f} / {scores[k][1]:.3f}")
    res["scores"] = scores
    res["T"] = T
    res["n_rows"] = int(steps.size)
    res["proj_k"] = {key: int(open_run(p).proj_dim) for key, p in paths.items()}
    return res


# ----------------------------------------------------------------------------- report
def write_report(results, a, cmd, wall, out_md: Path, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(r["lr"], kind) for r in results for kind in ("single", "all")]
    methods = list(results[0]["scores"])
    table = {m: [] for m in methods}
    for r in results:
        for m in methods:
            table[m].extend(r["scores"][m])

    lines = []
    lines.append("# Fidelity of data value embeddings vs exact trajectory-specific LOO (real MNIST)\n")
    lines.append("Generated by `experiments/loo_fidelity/run.py`; do not edit by hand.\n")
    lines.append("Metric: Spearman correlation across removed occurrences for each test point, averaged over test "
                 "points (`datavalue.testing.spearman_per_test`), estimate vs exact TSLOO "
                 "(`datavalue.testing.trajectory_loo`, float64 replay from per-step snapshots, denominator kept). "
                 "\"single\" = one occurrence (step, sample) removed; \"all\" = the sample removed from every epoch "
                 "(estimate = sum over its occurrences).\n")
    head = "| method | " + " | ".join(f"lr {lr} {k}" for lr, k in cols) + " |"
    lines.append(head)
    lines.append("|" + "---|" * (len(cols) + 1))
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in table[m]) + " |")
    lines.append("")

    # goal check
    lines.append("## Goal check\n")
    dv = [m for m in methods if m.startswith("DVEmb")]
    base = [m for m in methods if not m.startswith("DVEmb")]
    for j, (lr, k) in enumerate(cols):
        fisher1024 = table.get("DVEmb true Fisher full, proj 1024", [float("nan")] * len(cols))[j]
        worst_dv = min(table[m][j] for m in dv)
        worst_dv_m = min(dv, key=lambda m: table[m][j])
        best_b = max(table[m][j] for m in base)
        best_b_m = max(base, key=lambda m: table[m][j])
        lines.append(f"- lr {lr} {k}: Fisher (full operator)@1024 = {fisher1024:.3f} ({'>= 0.9' if fisher1024 >= 0.9 else 'BELOW 0.9'}); "
                     f"best baseline {best_b_m} {best_b:.3f} vs worst curvature option {worst_dv_m} {worst_dv:.3f} "
                     f"({'all baselines below all DVEmb options' if best_b < worst_dv else 'ORDERING VIOLATED'}).")
    lines.append("")

    lines.append("## Setup\n")
    lines.append(f"- Command: `{cmd}`")
    lines.append(f"- Wall time: {wall:.0f} s on {platform.machine()} ({torch.get_num_threads()} torch threads), "
                 f"torch {torch.__version__}, numpy {np.__version__}.")
    lines.append(f"- Data: real MNIST (`datavalue.data.load_mnist`), {a.n_train} train (seed {a.data_seed}), "
                 f"{a.n_test} test (seed {a.data_seed + 1}), 28x28 -> 14x14 by 2x2 average pooling, pixels in [0, 1].")
    lines.append(f"- Model: MLP 196-{a.hidden}-10, tanh, float64, init seed {a.seed}; "
                 f"{results[0]['hessian']['P']} parameters.")
    lines.append(f"- Training: plain SGD (no momentum, no weight decay), batch-mean CE loss, batch size {a.batch_size}, "
                 f"{a.epochs} epochs, {results[0]['T']} steps, {results[0]['n_rows']} recorded occurrences; batch order "
                 f"seed {a.seed + 1}; constant lr per run.")
    lines.append("- Recording: `datavalue.Recorder(curvature=(\"fisher\", \"hessian\"), storage_dtype=\"float64\", seed=0)` "
                 "(each step's exact Hessian sketched on both sides via `rec.step(..., hessian_loss=...)`) with "
                 f"proj_dim None (exact) and {', '.join(k for k in results[0]['proj_k'] if k != 'exact')} (stored dims: "
                 + ", ".join(f"{k}: {v}" for k, v in results[0]["proj_k"].items())
                 + ")"
                 + "".join(f"; proj_dim {q} was skipped because it is >= the {results[0]['hessian']['P']} parameters "
                           "(the recorder's water-filling would store it exactly, i.e. the 'exact' rows)"
                           for q in a.projs if q >= results[0]["hessian"]["P"])
                 + ". Each projection is a separate recording of the identical trajectory (same init and batches); "
                 "the final weights of all recordings were checked to agree bit for bit.")
    lines.append("- Embeddings: `datavalue.build_embeddings(path, curvature, storage_dtype=\"float64\", blocks=...)` for "
                 "none / empirical_fisher / fisher / hessian, with one operator per layer (`blocks=\"layer\"`, the paper's "
                 "block-diagonal form) and one operator over all columns (`blocks=\"full\"`, cross-layer curvature; "
                 "what the default `blocks=\"auto\"` picks for the true Fisher at 1024 dims and exact, docs/results/defaults.md); estimate = embedding @ test gradient at the final weights "
                 "(`datavalue.per_sample_gradients`, same projection).")
    lines.append(f"- Removals (seed {a.seed + 2}): {a.n_single} random occurrences (single) and {a.n_all} random "
                 f"sample ids (all epochs); {a.n_test} test points, per-test loss = cross entropy.")
    lines.append("- Baselines (exact gradients): TracIn = lr_t * w_t * g_t(z) . g_test(theta_t) with theta_t the "
                 "weights before step t (`Reference.model_at`), summed over occurrences for \"all\"; grad dot = "
                 "g(theta_T, z) . g_test(theta_T) (times lr*w; summed over occurrences); influence function = "
                 "(1/n) g_test^T (H + lambda I)^-1 g(theta_T, z) with H the exact Hessian of the mean training loss at "
                 f"theta_T and lambda = {a.if_damping:g} * trace(H)/P (single occurrence: divided by the number of "
                 "occurrences). The Hessian is indefinite here, so a second influence-function row adds |lambda_min| to the "
                 "damping (positive definite).")
    lines.append("")
    lines.append("## Per learning rate\n")
    lines.append("| lr | train loss | train acc | test loss (init) | test acc | median abs TSLOO | "
                 "Hessian lambda_min / lambda_max / damping |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        h = r["hessian"]
        lines.append(f"| {r['lr']} | {r['train_loss']:.3f} | {r['train_acc']:.3f} | {r['test_loss']:.3f} "
                     f"({r['init_test_loss']:.3f}) | {r['test_acc']:.3f} | {r['truth_abs_median']:.2e} | "
                     f"{h['lambda_min']:.3g} / {h['lambda_max']:.3g} / {h['damping']:.3g} |")
    lines.append("")
    lines.append("Timings (s): " + "; ".join(
        f"lr {r['lr']}: record {r['timings']['record']:.0f}, TSLOO {r['timings']['tsloo']:.0f}, "
        f"embeddings {r['timings']['embeddings']:.0f}, baselines {r['timings']['baselines']:.0f}" for r in results) + ".")
    lines.append("")
    lines.append("## Reading\n")
    lines.append("READING_PLACEHOLDER")
    lines.append("")
    lines.append(f"![grouped bar chart]({out_png.name})")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    reading = Path(a.reading).read_text().strip() if a.reading else (
        "(automatic run; see the goal check above.)")
    out_md.write_text(text.replace("READING_PLACEHOLDER", reading))

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cols) + 4), 5))
    wbar = 0.8 / len(methods)
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        ax.bar(np.arange(len(cols)) + (i - len(methods) / 2 + 0.5) * wbar, table[m], wbar, label=m, color=cmap(i % 20))
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(cols)))
    ax.set_xticklabels([f"lr {lr}\n{k}" for lr, k in cols])
    ax.set_ylabel("Spearman vs exact TSLOO (mean over test points)")
    ax.set_ylim(min(0.0, min(min(v) for v in table.values())) - 0.02, 1.02)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"MNIST 14x14, MLP 196-{a.hidden}-10, SGD, {a.epochs} epochs, n={a.n_train}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (< 3 min)")
    p.add_argument("--lrs", type=float, nargs="+", default=None)
    p.add_argument("--projs", type=int, nargs="+", default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-single", type=int, default=None)
    p.add_argument("--n-all", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--if-damping", type=float, default=1e-3)
    p.add_argument("--workdir", type=str, default=None, help="where the runs go (default: a temp dir, deleted)")
    p.add_argument("--out", type=str, default=None, help="markdown path (default docs/results/loo_fidelity.md)")
    p.add_argument("--reading", type=str, default=None, help="file with the 'Reading' paragraph to insert")
    p.add_argument("--from-json", type=str, default=None,
                   help="rewrite the report and plot from a saved results.json (no recomputation)")
    a = p.parse_args(argv)
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        b = argparse.Namespace(**{**saved["args"], "reading": a.reading})
        out_md = Path(b.out) if b.out else ROOT / "docs/results/loo_fidelity.md"
        write_report(saved["results"], b, saved["cmd"], saved["wall_s"], out_md, out_md.with_suffix(".png"))
        return
    q = a.quick
    a.lrs = a.lrs or ([0.2] if q else [0.05, 0.2, 0.8])
    a.projs = a.projs or ([256] if q else [4096, 1024, 256])
    a.n_train = a.n_train or (128 if q else 512)
    a.n_test = a.n_test or (20 if q else 50)
    a.n_single = a.n_single or (30 if q else 80)
    a.n_all = a.n_all or (15 if q else 40)
    if a.quick and a.out is None:
        a.out = str(ROOT / "experiments/loo_fidelity/quick.md")
    out_md = Path(a.out) if a.out else ROOT / "docs/results/loo_fidelity.md"
    out_png = out_md.with_suffix(".png")
    torch.use_deterministic_algorithms(True)

    t_all = time.perf_counter()
    data = load_data(a.n_train, a.n_test, a.data_seed)

    def log(msg):
        print(f"[{time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)

    tmp = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="loo_fidelity_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        results = [run_lr(lr, a, data, tmp, log) for lr in a.lrs]
    finally:
        if not a.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t_all
    cmd = ".venv/bin/python experiments/loo_fidelity/" + Path(sys.argv[0]).name + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    write_report(results, a, cmd, wall, out_md, out_png)
    json_path = ROOT / "experiments/loo_fidelity" / ("quick.json" if a.quick else "results.json")
    json_path.write_text(json.dumps({"args": vars(a), "cmd": cmd, "wall_s": wall, "results": results}, indent=1))
    log(f"wrote {out_md} and {out_png} (wall {wall:.0f}s)")


if __name__ == "__main__":
    main()
