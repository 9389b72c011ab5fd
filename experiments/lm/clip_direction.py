"""The clip direction in the Adam-aware build (issue 19, fourth pass): the small AdamW LM of ``run.py``
(``small-adamw``: same config, seeds, data, schedule, clipping, token-mean loss) recorded once through
``Recorder(proj_dim=K, optimizer=AdamW, curvature="fisher")`` on its float64 reference trajectory, then built with
``clipping="constant"`` (the Adam-aware build before: the clip coefficient only) and ``"direction"`` (the default:
the clipped step's dependence on the batch gradient's direction kept), per block and/or with ``blocks="full"``, and
scored through the study's attribution helper against the study's exported exact LOO (60 removals x 30 lines).
Public API only (``datavalue``, ``datavalue.testing``) plus the study's own modules.

    PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python experiments/lm/clip_direction.py --k 5420 --blocks auto,full \
        --study-export runs/lm/small-adamw/export

The study's export (``runs/lm/small-adamw/export``) comes from ``run.py``. Prints one line per build and writes
``lm_K.json`` into ``--work`` (a temporary directory by default).
"""

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import common as C  # noqa: E402
import methods as M  # noqa: E402
import run as RUN  # noqa: E402

import datavalue  # noqa: E402
from datavalue.embeddings import build_embeddings  # noqa: E402
from datavalue.testing import AdamConfig, Batch, spearman_per_test, train_reference  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--k", type=int, default=5420, help="proj_dim (5420: 5%% of P)")
ap.add_argument("--blocks", default="auto,full", help="comma-separated: auto (the default) and/or full")
ap.add_argument("--study-export", default=str(HERE.parents[1] / "runs/lm/small-adamw/export"))
ap.add_argument("--work", default=None, help="where the run and the json go (default: a temporary directory)")
args = ap.parse_args()
torch.set_num_threads(1)
K, BLOCKS = args.k, args.blocks.split(",")
work = args.work or tempfile.mkdtemp(prefix="clip_direction-")
t00 = time.time()
cfg = RUN.FULL
name, arch, opt_cfg, n_train, B, T, ks = cfg["loo"][0]
assert name == "small-adamw"
data = RUN.Data(cfg["L"])
test_lines = data.lines[: cfg["n_test"]]
train_lines = data.lines[100: 100 + n_train]
tr, te = data.enc(train_lines), data.enc(test_lines)
X, Y = tr["input_ids"], tr["labels"]
conf = C.make_config(data.V, data.L, **arch)
factory = C.make_factory(conf, seed=0, double=True)
P = C.n_params(factory())
batch_ids = C.epoch_batches(np.arange(n_train), B, T, np.random.default_rng(1))
batches = [Batch(b, X[b], (Y[b], float(C.n_tokens(Y[b]).sum()))) for b in batch_ids]
lrs = C.lr_schedule(T, opt_cfg)
lrs2 = np.stack([lrs, lrs], 1)
rcfg = AdamConfig(kind="adamw", betas=opt_cfg["betas"], eps=opt_cfg["eps"], weight_decay=opt_cfg["wd"],
                  max_grad_norm=opt_cfg["clip"], reduction="sum")
Xte, Yte = te["input_ids"], te["labels"]
test_loss = lambda m: C.token_ce(m, Xte, Yte)
model = factory()
opt = C.make_optimizer(model, opt_cfg)
path = os.path.join(work, f"lm_{K}.zarr")
with datavalue.Recorder(path, model, proj_dim=K, seed=0, optimizer=opt, loss_reduction="token_mean",
                        curvature="fisher", overwrite=True) as rec:
    ref = train_reference(factory, batches, lrs2, C.step_loss_fn, config=rcfg, model=model, optimizer=opt,
                          verify=True, step_context=lambda t, b, lr, rec=rec: rec.step(
                              sample_ids=b.sample_ids, tokens=C.n_tokens(b.targets[0]),
                              fisher_mask=C.label_mask(b.targets[0]) if rec.fisher else None))
print(f"P={P} K={rec.proj_dim} clipped steps {(ref.grad_scales < 1).sum()}/{T}", flush=True)
steps, sids = ref.occurrences()
rng = np.random.default_rng(2)
early = np.flatnonzero(steps < T // 3)
late = np.flatnonzero(steps >= T - T // 3)
rows = np.concatenate([np.sort(rng.choice(early, cfg["n_early"], replace=False)),
                       np.sort(rng.choice(late, cfg["n_late"], replace=False))])
removals = [(int(steps[r]), int(sids[r])) for r in rows]
exp = json.load(open(os.path.join(args.study_export, "meta.json")))
assert [tuple(r) for r in exp["loo_removals"]] == removals, "not the study's removals"
truth = np.asarray(exp["loo_truth"], dtype=np.float64).T  # the study's exact LOO (float64 run, exported)
print("truth", truth.shape, flush=True)
ne = cfg["n_early"]
def rho(est):
    return {"all": spearman_per_test(est, truth), "early": spearman_per_test(est[:ne], truth[:ne]),
            "late": spearman_per_test(est[ne:], truth[ne:])}
ctx = M.Ctx(path, model.eval(), test_loss, lambda m, ids: C.token_ce(m, X[ids], Y[ids]),
            lambda ids: C.n_tokens(Y[ids]), by=None, final_batches=batch_ids, train_mask=lambda ids: C.label_mask(Y[ids]))
out = {}
for blocks in BLOCKS:
    for clipping in ("constant", "direction"):
        t0 = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = build_embeddings(path, overwrite=True, progress=False, clipping=clipping,
                                    **({} if blocks == "auto" else {"blocks": blocks}))
        s = M._attr(ctx, curvature=info.curvature)
        r = rho(s[:, rows].T)
        out[f"{blocks} {clipping}"] = r
        print(f"blocks={blocks:5} ({len(info.blocks)} blocks, {info.curvature}) clipping={clipping:9} "
              f"all {r['all']:+.3f} early {r['early']:+.3f} late {r['late']:+.3f}  build {info.seconds:.0f}s total {time.time()-t0:.0f}s", flush=True)
json.dump(out, open(os.path.join(work, f"lm_{K}.json"), "w"), indent=1)
print(f"wall {time.time()-t00:.0f}s")
