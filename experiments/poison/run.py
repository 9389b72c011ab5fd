"""Finding poisoned training data (a backdoor) with data value embeddings and baselines.

A 784-64-10 MLP is trained with plain SGD on a 3000-image subset of real MNIST in which 2.5% of the
images (taken from non-target classes) carry a trigger (a 4x4 white square in the bottom-right
corner) and are relabelled to the target class. The attack success rate (ASR) is measured on
held-out triggered test images of the other classes. The triggered behaviour is attributed to the
training data: test loss = cross-entropy w.r.t. the TARGET label on held-out triggered images,
training samples ranked by their summed ``by="sample"`` score (highest = most helpful to the
backdoor). Methods: data value embeddings (curvature none / empirical_fisher / fisher; recorded
with ``curvature="fisher"``), TracIn (``kind="tracin"``, final checkpoint), gradient dot product
(``kind="grad_dot"``), and influence functions (final model; exact per-sample gradients; damped
Gauss-Newton Hessian inverted by conjugate gradients).

Three schedules with the same number of poisoned occurrences per poisoned image where it matters:
``all`` (poison in every epoch), ``early`` (poisoned images only in the first third of the epochs),
``late`` (only in the last third).

    python experiments/poison/run.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import datavalue  # noqa: E402
from datavalue.capture import FinalPass  # noqa: E402
from datavalue.data import load_mnist  # noqa: E402
from datavalue.embeddings import build_embeddings, build_influence  # noqa: E402
from datavalue.query import Attributor  # noqa: E402

FULL = dict(n_train=3000, poison_frac=0.025, target=0, epochs=9, batch=32, lr=0.1, hidden=64, proj_dim=256,
            n_query=100, n_asr=1000, damping=0.01, cg_iters=50, schedules=("all", "early", "late"))
QUICK = dict(FULL, n_train=1000, epochs=3, proj_dim=128, n_query=50, n_asr=300, cg_iters=30)
KS = (10, 25, 50, 100)
QUERIES = ("target_ce", "trigger_diff")
METHODS = ("dvemb:none", "dvemb:empirical_fisher", "dvemb:fisher", "tracin", "grad_dot", "influence:fisher",
           "influence:none", "influence_fn")


def add_trigger(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, 28, 28).copy()
    x[:, 23:27, 23:27] = 1.0
    return x.reshape(-1, 784)


def make_data(cfg):
    x, y = load_mnist("train", n=cfg["n_train"], seed=0)
    rng = np.random.default_rng(0)
    n_p = int(round(cfg["poison_frac"] * len(x)))
    cand = np.flatnonzero(y != cfg["target"])
    poisoned = np.sort(rng.choice(cand, n_p, replace=False))
    x, y = x.copy(), y.copy()
    x[poisoned] = add_trigger(x[poisoned])
    y[poisoned] = cfg["target"]
    xt, yt = load_mnist("test", n=None, seed=None)
    other = np.flatnonzero(yt != cfg["target"])
    q_idx = other[: cfg["n_query"]]                                   # attribution queries
    a_idx = other[cfg["n_query"]: cfg["n_query"] + cfg["n_asr"]]      # ASR evaluation (disjoint)
    return dict(x=x, y=y, poisoned=poisoned, is_p=np.isin(np.arange(len(x)), poisoned),
                xq=add_trigger(xt[q_idx]), xq_clean=xt[q_idx], xa=add_trigger(xt[a_idx]), ya=yt[a_idx],
                xc=xt[:2000], yc=yt[:2000])


def make_model(cfg):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], 10))


def epoch_ids(cfg, data, schedule, epoch, rng):
    n, E = len(data["x"]), cfg["epochs"]
    third = max(1, E // 3)
    if schedule == "all":
        active = np.ones(n, bool)
    elif schedule == "early":
        active = ~data["is_p"] | (epoch < third)
    elif schedule == "late":
        active = ~data["is_p"] | (epoch >= E - third)
    else:
        raise ValueError(schedule)
    ids = rng.permutation(np.flatnonzero(active))
    return [ids[i: i + cfg["batch"]] for i in range(0, len(ids), cfg["batch"])]


def train(cfg, data, schedule, run_path):
    model = make_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.0)
    X, Y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    rng = np.random.default_rng(1)
    with datavalue.Recorder(run_path, model, proj_dim=cfg["proj_dim"], seed=0, optimizer=opt, curvature="fisher",
                            overwrite=True) as rec:
        for epoch in range(cfg["epochs"]):
            for ids in epoch_ids(cfg, data, schedule, epoch, rng):
                with rec.step(sample_ids=torch.from_numpy(ids), epoch=epoch):
                    F.cross_entropy(model(X[ids]), Y[ids]).backward()
                opt.step()
                opt.zero_grad()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model, data, cfg):
    acc = float((model(torch.from_numpy(data["xc"])).argmax(1).numpy() == data["yc"]).mean())
    asr = float((model(torch.from_numpy(data["xa"])).argmax(1).numpy() == cfg["target"]).mean())
    # the same held-out images without the trigger: how often they are (mis)classified as the target anyway
    return acc, asr


def metrics(score: np.ndarray, is_p: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    order = np.argsort(-score, kind="stable")
    n_p = int(is_p.sum())
    out = {}
    for k in KS:
        hit = int(is_p[order[:k]].sum())
        out[f"P@{k}"] = hit / k
        out[f"R@{k}"] = hit / n_p
    out["AUC"] = float(roc_auc_score(is_p, score))
    return out


def clean_target_share(score, data, ids, k=100):
    """Share of the top k that are clean images of the target class (genuinely helpful to predicting it)."""
    top = ids[np.argsort(-score, kind="stable")[:k]]
    return float(np.mean(~data["is_p"][top] & (data["y"][top] == FULL["target"])))


# -------------------------------------------------------------------- influence functions (GGN + CG)
def influence_function_scores(model, cfg, data, train_ids, query):
    """score_i = g_i . (G + damping I)^-1 g_test, g_test the gradient of the summed query loss, G the
    Gauss-Newton matrix of the mean training loss at the final weights (exact gradients, all params)."""
    from torch.func import functional_call, grad, jvp, vjp, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat0 = torch.cat([params[k].reshape(-1) for k in names]).double()

    def unflat(v):
        return {k: t.view(s) for k, t, s in zip(names, torch.split(v, sizes), shapes)}

    Xtr = torch.from_numpy(data["x"][train_ids]).double()
    Ytr = torch.from_numpy(data["y"][train_ids])
    mdl = model.double()

    def logits_of(v, x):
        return functional_call(mdl, unflat(v), (x,))

    def ggn_vec(v):
        f = lambda w: logits_of(w, Xtr)  # noqa: E731
        z, jv = jvp(f, (flat0,), (v,))
        p = torch.softmax(z, 1)
        hjv = p * jv - p * (p * jv).sum(1, keepdim=True)  # softmax-CE Hessian times Jv
        _, back = vjp(f, flat0)
        return back(hjv / len(Xtr))[0] + cfg["damping"] * v

    g_test = torch.autograd.functional.jacobian(
        lambda w: query(lambda x: logits_of(w, x.double()), double=True).sum(), flat0)
    # conjugate gradients
    x = torch.zeros_like(g_test)
    r = g_test.clone()
    p = r.clone()
    rs = r @ r
    for _ in range(cfg["cg_iters"]):
        Ap = ggn_vec(p)
        a = rs / (p @ Ap)
        x += a * p
        r -= a * Ap
        rs_new = r @ r
        if rs_new.sqrt() < 1e-6 * g_test.norm():
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    resid = float(rs_new.sqrt() / g_test.norm())

    def loss_one(w, xi, yi):
        return F.cross_entropy(logits_of(w, xi[None]), yi[None])

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))
    scores = []
    for i in range(0, len(Xtr), 500):
        scores.append((per(flat0, Xtr[i: i + 500], Ytr[i: i + 500]) @ x).numpy())
    model.float()
    return np.concatenate(scores), resid


# ------------------------------------------------------------------------------------------ main
def make_query(cfg, data, name):
    """query(f) -> (m,) per-test-point losses, f a function from images to logits."""
    xq, xc = torch.from_numpy(data["xq"]), torch.from_numpy(data["xq_clean"])
    tgt = torch.full((len(xq),), cfg["target"])

    def q(f, double=False):
        a = xq.double() if double else xq
        ce = F.cross_entropy(f(a), tgt, reduction="none")
        if name == "target_ce":      # the triggered behaviour: CE of the target label on triggered images
            return ce
        b = xc.double() if double else xc  # "trigger_diff": the part of it that the trigger causes
        return ce - F.cross_entropy(f(b), tgt, reduction="none")
    return q


def _final_pass(run_path, model, data, cfg) -> None:
    """One no-update pass over the training images at the final weights (once per run)."""
    if (Path(run_path) / "final").exists():
        return
    run = datavalue.open_run(run_path)
    ids = np.unique(np.asarray(run.sample_id[: run.n_rows]))
    with FinalPass(run_path, model) as fp:
        for i in range(0, ids.size, cfg["batch"]):
            b = ids[i: i + cfg["batch"]]
            with fp.batch(b):
                F.cross_entropy(model(torch.from_numpy(data["x"][b])), torch.from_numpy(data["y"][b])).backward()


def attribute(cfg, data, model, run_path, log, qname):
    query = make_query(cfg, data, qname)
    loss_fn = lambda m: query(m)  # noqa: E731
    res, raw = {}, {}
    ids_ref = None
    for meth in METHODS[:-1]:
        t0 = time.time()
        if meth.startswith("dvemb:"):
            attr = Attributor(run_path, model, curvature=meth.split(":")[1], progress=False)
        elif meth.startswith("influence:"):  # the final model's influence in the run's sketch (FinalPass)
            _final_pass(run_path, model, data, cfg)
            build_influence(run_path, curvature=meth.split(":")[1], overwrite=True, progress=False)
            attr = Attributor(run_path, model, kind="influence", curvature=meth.split(":")[1], progress=False)
        else:
            attr = Attributor(run_path, model, kind=meth, progress=False)
        S = attr.scores(loss_fn, by="sample").sum(0)
        ids = np.asarray(attr.labels(by="sample"))
        if ids_ref is None:
            ids_ref = ids
        assert np.array_equal(ids, ids_ref)
        raw[meth] = S
        res[meth] = metrics(S, data["is_p"][ids])
        res[meth]["cleantgt@100"] = clean_target_share(S, data, ids)
        res[meth]["secs"] = time.time() - t0
    t0 = time.time()
    S, resid = influence_function_scores(model, cfg, data, ids_ref, query)
    raw["influence_fn"] = S
    res["influence_fn"] = metrics(S, data["is_p"][ids_ref])
    res["influence_fn"]["cleantgt@100"] = clean_target_share(S, data, ids_ref)
    res["influence_fn"]["secs"] = time.time() - t0
    res["influence_fn"]["cg_resid"] = resid
    return res, raw, ids_ref


def plot(all_res, raws, data, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(len(all_res), 2, figsize=(11, 4.2 * len(all_res)), squeeze=False)
    for row, (qname, qres) in enumerate(all_res.items()):
        ax = axes[row, 0]
        sched0 = next(iter(qres))
        S, ids = raws[qname][sched0]
        for meth in METHODS:
            fpr, tpr, _ = roc_curve(data["is_p"][ids], S[meth])
            ax.plot(fpr, tpr, label=f"{meth} (AUC {qres[sched0][meth]['AUC']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.5)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("false-positive rate (clean flagged)")
        ax.set_ylabel("recall of poisoned images")
        ax.set_title(f"query {qname}: poison schedule '{sched0}'")
        ax.legend(fontsize=7)
        ax = axes[row, 1]
        scheds = list(qres)
        w = 0.8 / len(scheds)
        for j, s in enumerate(scheds):
            ax.bar(np.arange(len(METHODS)) + j * w, [qres[s][m]["AUC"] for m in METHODS], w, label=f"poison {s}")
        ax.set_xticks(np.arange(len(METHODS)) + w * (len(scheds) - 1) / 2)
        ax.set_xticklabels([m.replace("dvemb:", "DVEmb\n").replace("empirical_fisher", "emp.Fisher") for m in METHODS],
                           fontsize=7)
        ax.set_ylim(0.0, 1.0)
        ax.axhline(0.5, color="k", lw=0.5, ls=":")
        ax.set_ylabel("ROC AUC")
        ax.set_title(f"query {qname}: poison all / early / late")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_md(path, cfg, data, all_res, evals, wall, cmd, figname, n_steps):
    n_p = int(data["is_p"].sum())
    L = ["# Finding poisoned training data (backdoor)", "",
         f"Command: `{cmd}` (wall time {wall:.0f} s on 2 shared CPU cores).", "",
         "## Setup",
         f"- Real MNIST, {cfg['n_train']} training images; {n_p} ({100 * cfg['poison_frac']:.1f}%) images of non-target "
         f"classes get a trigger (4x4 white square, pixels 23-26 x 23-26) and the label {cfg['target']}.",
         f"- MLP 784-{cfg['hidden']}-10 (ReLU), SGD lr {cfg['lr']} momentum 0, batch {cfg['batch']}, {cfg['epochs']} "
         f"epochs; `Recorder(proj_dim={cfg['proj_dim']}, curvature=\"fisher\")` (exact 10-class Fisher).",
         f"- Query (the triggered behaviour): cross-entropy w.r.t. label {cfg['target']} on {cfg['n_query']} held-out "
         "triggered test images of other classes; per training image the score is "
         "`Attributor.scores(loss_fn, by=\"sample\").sum(0)` (sum over occurrences and query points); highest = most "
         "helpful to the backdoor. ASR measured on a disjoint set of "
         f"{cfg['n_asr']} triggered test images of other classes.",
         "- Influence functions: final model, exact (unprojected) per-sample gradients of all "
         f"{sum(p.numel() for p in make_model(cfg).parameters())} parameters, "
         f"`(G + {cfg['damping']} I)^-1 g_test` with G the Gauss-Newton matrix of the mean training loss "
         f"(PSD stand-in for the Hessian), solved by conjugate gradients ({cfg['cg_iters']} iterations max).",
         "- Schedules: `all` = poisoned images in every epoch; `early` = only in the first third of the epochs; "
         "`late` = only in the last third (same number of poisoned occurrences as `early`).", "",
         "## Backdoor", "",
         "| schedule | steps | clean test acc | attack success rate |", "|---|---|---|---|"]
    for s, (acc, asr) in evals.items():
        L.append(f"| {s} | {n_steps[s]} | {acc:.3f} | {asr:.3f} |")
    L += ["", "Queries: `target_ce` = CE of the target label on the triggered query images (the triggered behaviour "
          "as specified); `trigger_diff` = that CE minus the CE of the target label on the same images without the "
          "trigger (the part of the behaviour the trigger causes; cancels the plain 'predict the target class' "
          "help that clean target-class images give)."]
    for qname, qres in all_res.items():
        for s in qres:
            L += ["", f"## Query `{qname}`, poison schedule `{s}` ({n_p} poisoned of {cfg['n_train']})", "",
                  "| method | " + " | ".join(f"P@{k}" for k in KS) + " | " + " | ".join(f"R@{k}" for k in KS)
                  + " | AUC | clean target-class share of top 100 | query s |",
                  "|---|" + "---|" * (2 * len(KS) + 3)]
            for m, r in qres[s].items():
                L.append(f"| {m} | " + " | ".join(f"{r[f'P@{k}']:.2f}" for k in KS) + " | "
                         + " | ".join(f"{r[f'R@{k}']:.2f}" for k in KS) + f" | {r['AUC']:.3f} | {r['cleantgt@100']:.2f} | {r['secs']:.1f} |")
    cols = [(q, s) for q in all_res for s in all_res[q]]
    L += ["", "## Early vs late poison: AUC", "", "| method | " + " | ".join(f"{q} / {s}" for q, s in cols) + " |",
          "|---|" + "---|" * len(cols)]
    for m in METHODS:
        L.append(f"| {m} | " + " | ".join(f"{all_res[q][s][m]['AUC']:.3f}" for q, s in cols) + " |")
    L += ["", f"![poison]({figname})", "",
          "## Notes", "",
          "- With momentum 0 and a constant lr, `dvemb:none` (H = 0: embedding = lr x gradient), TracIn with the final "
          "checkpoint and the gradient dot product give the same ranking (identical P@k/R@k/AUC): expected.",
          "- `trigger_diff` anti-ranks the poison for the gradient methods (AUC << 0.5): a poisoned image (digit c "
          "with trigger, label target) also raises the target logit of the *clean* digit c, i.e. lowers the subtracted "
          "clean-image CE, so its net effect on the difference is negative. The plain `target_ce` query is the "
          "meaningful one here; `trigger_diff` is kept as a negative result.",
          "- Early/late: `early` = poisoned images only in the first third of the epochs, `late` = only in the last third.",
          "- Curvature under a heavy sketch: here 241 dims keep 0.5% of the 50,890 parameters' dimensions, and the "
          "curvature options rank the poison worse than `none` (AUC above; Spearman with exact LOO below). With one "
          "full operator for the true Fisher (`blocks=\"full\"`) the LOO check fell further, from 0.381 to 0.202 (run "
          "2026-11-22, session 2; with the current build 0.332 per layer against 0.171 full, AUC 0.573 against 0.514 on "
          "the 25 + 25 removed images: `python experiments/poison/loo_check.py --full-blocks --no-influence-fn`, "
          "2026-12-02), so `blocks=\"auto\"` stays per layer when a sketch keeps under a quarter of the dimensions "
          "(docs/math.md, section 4; the AdamW LM at 1% and 5% of P agrees, docs/results/lm.md). A sketch far smaller than the per-step curvature's rank (320 Fisher "
          "rows per step) piles its trace onto few dimensions and over-damps. For detection work on heavily compressed "
          "runs, `curvature=\"none\"` (or a larger `proj_dim`) ranks best here.",
          ""]
    loo = HERE / "work" / "loo_check.md"
    if loo.exists():
        L += ["## Exact leave-one-out check (`python experiments/poison/loo_check.py`)", "",
              loo.read_text(), ""]
    Path(path).write_text("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    work = HERE / ("work-quick" if args.quick else "work")
    work.mkdir(parents=True, exist_ok=True)
    outdir = work if args.quick else ROOT / "docs" / "results"
    tstart = time.time()

    def log(msg):
        print(f"[{time.time() - tstart:6.1f}s] {msg}", flush=True)

    data = make_data(cfg)
    log(f"data: {len(data['x'])} train, {data['is_p'].sum()} poisoned")
    all_res, raws, evals, n_steps = {}, {}, {}, {}
    for sched in cfg["schedules"]:
        run_path = work / f"run_{sched}.zarr"
        t0 = time.time()
        model = train(cfg, data, sched, run_path)
        evals[sched] = evaluate(model, data, cfg)
        n_steps[sched] = datavalue.open_run(run_path).n_steps
        log(f"{sched}: trained in {time.time() - t0:.1f}s; clean acc {evals[sched][0]:.3f}, ASR {evals[sched][1]:.3f}")
        for curv in ("none", "empirical_fisher", "fisher"):
            t1 = time.time()
            build_embeddings(run_path, curvature=curv, progress=False, overwrite=True)
            log(f"  build {curv}: {time.time() - t1:.1f}s")
        for qname in QUERIES:
            res, raw, ids = attribute(cfg, data, model, run_path, log, qname)
            all_res.setdefault(qname, {})[sched] = res
            raws.setdefault(qname, {})[sched] = (raw, ids)
            for m, r in res.items():
                log(f"  {qname} {m:>24}: " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
    plot(all_res, raws, data, cfg, outdir / "poison.png")
    wall = time.time() - tstart
    cmd = "python experiments/poison/run.py" + (" --quick" if args.quick else "")
    (work / "results.json").write_text(json.dumps({"cfg": cfg, "results": all_res, "evals": evals, "wall": wall},
                                                  default=float))
    write_md(outdir / "poison.md", cfg, data, all_res, evals, wall, cmd, "poison.png", n_steps)
    log(f"done in {wall:.0f}s")


if __name__ == "__main__":
    main()
