"""How linear is a removal? The exact first-order ceiling of every first-order method.

For the small LM's LOO setting (same data, batches, removals as ``run.py``), compares the exact full
removal (``trajectory_loo``) with the exact linearisation (``trajectory_loo(..., epsilon=e)``: remove
the fraction ``e`` of the occurrence's weight, divide by ``e``) under AdamW and under plain SGD.
A first-order estimate (embeddings, TracIn, influence) can at best reach the linearisation's Spearman.

    HF_HUB_OFFLINE=1 python experiments/lm/linearity.py [--quick]
"""

from __future__ import annotations

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
import run as R  # noqa: E402

from datavalue.testing import (  # noqa: E402
    AdamConfig,
    Batch,
    SGDConfig,
    spearman_per_test,
    train_reference,
    trajectory_loo,
)


def main():
    torch.set_num_threads(1)
    quick = "--quick" in sys.argv
    cfg = R.QUICK if quick else R.FULL
    data = R.Data(cfg["L"])
    out = {}
    for spec in cfg["loo"][:2]:  # small-adamw, small-sgd
        name, arch, opt_cfg, n_train, B, T, _ = spec
        tr, te = data.enc(data.lines[100: 100 + n_train]), data.enc(data.lines[: cfg["n_test"]])
        X, Y = tr["input_ids"], tr["labels"]
        factory = C.make_factory(C.make_config(data.V, data.L, **arch), seed=0, double=True)
        batch_ids = C.epoch_batches(np.arange(n_train), B, T, np.random.default_rng(1))
        batches = [Batch(b, X[b], (Y[b], float(C.n_tokens(Y[b]).sum()))) for b in batch_ids]
        lrs = C.lr_schedule(T, opt_cfg)
        model = factory()
        opt = C.make_optimizer(model, opt_cfg)
        if opt_cfg["kind"] == "adamw":
            rcfg = AdamConfig(kind="adamw", betas=opt_cfg["betas"], eps=opt_cfg["eps"], weight_decay=opt_cfg["wd"],
                              max_grad_norm=opt_cfg["clip"], reduction="sum")
            lrs = np.stack([lrs, lrs], 1)
        else:
            rcfg = SGDConfig(max_grad_norm=opt_cfg["clip"], reduction="sum")
        ref = train_reference(factory, batches, lrs, C.step_loss_fn, config=rcfg, model=model, optimizer=opt, verify=False)
        steps, sids = ref.occurrences()
        rng = np.random.default_rng(2)  # the same removals as run.py
        early, late = np.flatnonzero(steps < T // 3), np.flatnonzero(steps >= T - T // 3)
        rows = np.concatenate([np.sort(rng.choice(early, cfg["n_early"], replace=False)),
                               np.sort(rng.choice(late, cfg["n_late"], replace=False))])
        removals = [(int(steps[r]), int(sids[r])) for r in rows]
        Xte, Yte = te["input_ids"], te["labels"]
        tl = lambda m, Xte=Xte, Yte=Yte: C.token_ce(m, Xte, Yte)  # noqa: E731
        t0 = time.perf_counter()
        full = trajectory_loo(ref, removals, tl)
        res = {"full_s": time.perf_counter() - t0}
        ne = cfg["n_early"]
        for eps in (1e-3,):
            lin = trajectory_loo(ref, removals, tl, epsilon=eps)
            res[f"eps={eps:g}"] = {"all": spearman_per_test(lin, full), "early": spearman_per_test(lin[:ne], full[:ne]),
                                   "late": spearman_per_test(lin[ne:], full[ne:])}
            print(name, eps, res[f"eps={eps:g}"], flush=True)
        out[name] = res
    (HERE / ("work-quick" if quick else ".") / "linearity.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
