"""Sanity check for the poison study: exact trajectory leave-one-out (``datavalue.testing``) of poisoned and
clean images, compared with each method's score, on a smaller version of the same setup (float64).

Answers: are DVEmb's curvature variants faithful to what removing a poisoned image actually does, and is
the exact LOO itself a good poison detector (redundancy: 1 of many poisoned images removed)?

    python experiments/poison/loo_check.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import run as P  # noqa: E402

import datavalue  # noqa: E402
from datavalue.embeddings import build_embeddings  # noqa: E402
from datavalue.query import Attributor  # noqa: E402
from datavalue.testing import Batch, train_reference, trajectory_loo  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full-blocks", action="store_true",
                    help="also the true Fisher with one operator over all columns (blocks='full'), as AUTO_FULL_KEPT's check")
    ap.add_argument("--work", default=None, help="where the run and loo_check.md go (default: experiments/poison/work)")
    ap.add_argument("--no-influence-fn", action="store_true", help="skip the GGN+CG influence function (the slow row)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = dict(P.FULL, n_train=1000, epochs=6, n_query=50, cg_iters=50)
    n_each = 10 if args.quick else 25
    work = Path(args.work) if args.work else HERE / ("work-quick" if args.quick else "work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = P.make_data(cfg)
    X, Y = torch.from_numpy(data["x"]).double(), torch.from_numpy(data["y"])
    rng = np.random.default_rng(1)
    batches = [Batch(ids, X[ids], Y[ids]) for e in range(cfg["epochs"]) for ids in P.epoch_ids(cfg, data, "all", e, rng)]
    lrs = np.full(len(batches), cfg["lr"])
    model = P.make_model(cfg).double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    path = work / "loo_check.zarr"
    ce = lambda m, x, y: F.cross_entropy(m(x), y, reduction="none")  # noqa: E731
    with datavalue.Recorder(path, model, proj_dim=cfg["proj_dim"], optimizer=opt, curvature="fisher",
                            overwrite=True) as rec:
        ref = train_reference(lambda: P.make_model(cfg).double(), batches, lrs, ce, model=model, optimizer=opt,
                              step_context=lambda t, b, lr: rec.step(sample_ids=torch.from_numpy(b.sample_ids)))
    model.eval()
    acc, asr = P.evaluate(model.float(), data, cfg)
    model.double()
    print(f"trained {len(batches)} steps: clean acc {acc:.3f}, ASR {asr:.3f} ({time.time() - t0:.0f}s)", flush=True)
    query = P.make_query(cfg, data, "target_ce")
    test_loss = lambda m: query(m, double=True)  # noqa: E731
    pois = rng.choice(data["poisoned"], n_each, replace=False)
    clean = rng.choice(np.flatnonzero(~data["is_p"]), n_each, replace=False)
    chosen = np.r_[pois, clean]
    lab = np.r_[np.ones(n_each, bool), np.zeros(n_each, bool)]
    loo = trajectory_loo(ref, [int(i) for i in chosen], test_loss).sum(1)
    print(f"exact LOO of {len(chosen)} images ({time.time() - t0:.0f}s)", flush=True)
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    rows = [("exact trajectory LOO", 1.0, roc_auc_score(lab, loo), float(np.mean(loo[lab])), float(np.mean(loo[~lab])))]
    for curv in ("none", "empirical_fisher", "fisher"):
        build_embeddings(path, curvature=curv, progress=False, overwrite=True)
    methods = [("dvemb:none", dict(curvature="none")), ("dvemb:empirical_fisher", dict(curvature="empirical_fisher")),
               ("dvemb:fisher", dict(curvature="fisher")), ("tracin", dict(kind="tracin")),
               ("grad_dot", dict(kind="grad_dot"))]
    for name, kw in methods:
        attr = Attributor(path, model, progress=False, **kw)
        S = attr.scores(test_loss, by="sample").sum(0)
        ids = np.asarray(attr.labels(by="sample"))
        s = S[np.searchsorted(ids, chosen)]
        rows.append((name, spearmanr(s, loo)[0], roc_auc_score(lab, s), float(np.mean(s[lab])), float(np.mean(s[~lab]))))
    if args.full_blocks:  # the same Fisher build with one operator over all columns (replaces the per-layer one)
        for blocks in ("layer", "full"):
            info = build_embeddings(path, curvature="fisher", blocks=blocks, progress=False, overwrite=True)
            attr = Attributor(path, model, progress=False, curvature="fisher")
            S = attr.scores(test_loss, by="sample").sum(0)
            s = S[np.searchsorted(np.asarray(attr.labels(by="sample")), chosen)]
            rows.append((f"dvemb:fisher blocks={blocks} ({len(info.blocks)} operators)", spearmanr(s, loo)[0],
                         roc_auc_score(lab, s), float(np.mean(s[lab])), float(np.mean(s[~lab]))))
    if not args.no_influence_fn:
        S, _ = P.influence_function_scores(model.float(), cfg, data, np.arange(len(X)), query)
        s = S[chosen]
        rows.append(("influence_fn (GGN+CG)", spearmanr(s, loo)[0], roc_auc_score(lab, s), float(np.mean(s[lab])),
                     float(np.mean(s[~lab]))))
    lines = [f"LOO check: {cfg['n_train']} train ({int(data['is_p'].sum())} poisoned), {cfg['epochs']} epochs, "
             f"{len(batches)} steps, float64; ASR {asr:.3f}; {n_each} poisoned + {n_each} clean images removed "
             "(every epoch) one at a time; query = summed target CE on triggered held-out images.", "",
             "| scores | Spearman vs exact LOO | AUC poisoned vs clean (these 2n) | mean score poisoned | mean score clean |",
             "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3g} | {r[4]:.3g} |" for r in rows]
    txt = "\n".join(lines) + "\n"
    (work / "loo_check.md").write_text(txt)
    print(txt)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
