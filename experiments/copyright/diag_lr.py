"""Side check: is the fast path right where first-order theory says it should be?

Quick config (3 owners), test points = 3 of each owner's own training lines: fast-path owner
values (embeddings curvature none / empirical Fisher, and TracIn) against retraining
leave-one-owner-out under the same data-order rule.

Usage:
    .venv/bin/python experiments/copyright/diag_lr.py 0.1 1 slots   # small step, one epoch
    .venv/bin/python experiments/copyright/diag_lr.py 1.0 8 slots   # the full run's lr and epochs
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import datavalue
from datavalue.embeddings import build_embeddings
from datavalue.query import Attributor

sys.path.insert(0, str(Path(__file__).parent))
import run as R  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    lr, ep, order = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    cfg = dict(R.QUICK, lr=lr, epochs=ep, order=order, proj_dim=1024)
    lines, own, vocab = R.load_corpus(cfg)
    codec = R.Codec(vocab, cfg["ctx"])
    data = [codec.windows(codec.encode(s), 0) for s in lines]
    cfg["norm"] = float(cfg["batch"] * np.mean([len(y) for _, y in data]))
    orders = R.epoch_orders(len(data), ep)
    oa = np.array([o or "" for o in own])
    owners = list(cfg["owners"])
    base = np.flatnonzero(oa == "")
    parts = [np.flatnonzero(oa == o) for o in owners]
    model = R.make_model(cfg, codec.V)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    path = "/tmp/copyright_diag.zarr"
    with datavalue.Recorder(path, model, proj_dim=cfg["proj_dim"], seed=0, optimizer=opt, overwrite=True,
                            loss_reduction="sum" if order == "slots" else "token_mean") as rec:
        R.train(cfg, codec, data, np.arange(len(data)), orders, model=model, opt=opt, recorder=rec)
    rng = np.random.default_rng(0)
    tests = [{"prompt": lines[j][:5], "text": lines[j][5:]} for p in parts for j in rng.choice(p, 3, replace=False)]
    X, Y = R.output_batch(codec, tests)
    with torch.no_grad():
        v_full = -R.neg_log_lik(model, X, Y).double().numpy()
    loo = []
    for i in range(len(owners)):
        ids = np.concatenate([base] + [parts[j] for j in range(len(owners)) if j != i])
        mi, _ = R.train(cfg, codec, data, ids, orders)
        with torch.no_grad():
            loo.append(v_full + R.neg_log_lik(mi, X, Y).double().numpy())
    loo = np.stack(loo, 1)
    owner_of = {int(i): own[i] for i in range(len(data)) if own[i]}
    found = {}
    for name, kw in (("none", {"curvature": "none"}), ("empirical_fisher", {"curvature": "empirical_fisher"}),
                     ("tracin", {"kind": "tracin"})):
        if "curvature" in kw:
            build_embeddings(path, curvature=kw["curvature"], progress=False, overwrite=True)
        attr = Attributor(path, model, progress=False, **kw)
        S = attr.scores(lambda mm: R.neg_log_lik(mm, X, Y), by="owner", owners=owner_of, unowned="drop")
        lab = [str(x) for x in attr.labels(by="owner", owners=owner_of, unowned="drop")]
        found[name] = S[:, [lab.index(o) for o in owners]]
    for name, v in found.items():
        corr = np.corrcoef(v.ravel(), loo.ravel())[0, 1]
        print(f"{name:17s} corr vs retrain LOO {corr:.3f}   slope {(v * loo).sum() / (loo * loo).sum():.2f}")


if __name__ == "__main__":
    main()
