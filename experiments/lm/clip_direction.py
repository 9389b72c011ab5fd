"""The clip direction in the Adam-aware build (issue 19, fourth pass): the small AdamW LM of ``run.py``
(``small-adamw``: same config, seeds, data, schedule, clipping, token-mean loss) recorded once through
``Recorder(proj_dim=K, optimizer=AdamW, curvature="fisher")`` on its float64 reference trajectory, then built with
``clipping="constant"`` (the Adam-aware build before: the clip coefficient only) and ``"direction"`` (the default:
the clipped step's dependence on the batch gradient's direction kept), per block and/or with ``blocks="full"``, and
scored through the study's attribution helper against the study's exported exact LOO (60 removals x 30 lines).
Public API only (``datavalue``, ``datavalue.testing``) plus the study's own modules, except ``--fisher-draws``
(other sampled Fisher labels: the recorder's private label generator reseeded, ``common.Study.record``).

``--fisher-window 0,2,4,8`` (session 12) builds each recording with the Fisher pooled over steps t-W..t+W
(``build_embeddings(fisher_window=W)``, passed even for ``W = 0``: since session 13 the default ``"auto"`` pools
``W = 4`` for these sampled labels under ``blocks="full"``); each result also carries its build time (``build_s``).

``--fisher-draws 3 --blocks layer,full --clipping direction`` is the session-11 check of ``blocks="full"`` under
AdamW (``AUTO_FULL_KEPT``'s LM evidence, docs/results/lm.md); ``--fisher-samples 8`` the same with 8 labels per
position. Without the export the exact LOO is computed (about 75 s) and saved there.

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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import common as C  # noqa: E402
import methods as M  # noqa: E402

from datavalue.embeddings import build_embeddings  # noqa: E402
from datavalue.testing import spearman_per_test  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--k", type=int, default=5420, help="proj_dim (5420: 5%% of P)")
ap.add_argument("--blocks", default="auto,full", help="comma-separated: auto (the default), layer and/or full")
ap.add_argument("--clipping", default="constant,direction", help="comma-separated: constant and/or direction")
ap.add_argument("--fisher-draws", type=int, default=1,
                help="recordings with other sampled Fisher labels (draw 0: the recorder's own; same sketch)")
ap.add_argument("--fisher-samples", type=int, default=1, help="Recorder(fisher_samples=): labels per position")
ap.add_argument("--fisher-window", default="0",
                help="comma-separated build_embeddings(fisher_window=W): the Fisher pooled over steps t-W..t+W")
ap.add_argument("--study-export", default=str(HERE.parents[1] / "runs/lm/small-adamw/export"))
ap.add_argument("--work", default=None, help="where the run and the json go (default: a temporary directory)")
args = ap.parse_args()
torch.set_num_threads(1)
K, BLOCKS = args.k, args.blocks.split(",")
WINDOWS = [int(w) for w in args.fisher_window.split(",")]
work = args.work or tempfile.mkdtemp(prefix="clip_direction-")
t00 = time.time()
S = C.Study("small-adamw")
out = {}
for draw in range(args.fisher_draws):
    path = os.path.join(work, f"lm_{K}.zarr")
    ref, model, kept = S.record(path, K, curvature="fisher", fisher_draw=draw, fisher_samples=args.fisher_samples)
    print(f"P={S.P} K={kept} clipped steps {(ref.grad_scales < 1).sum()}/{S.T}; Fisher draw {draw}, "
          f"{args.fisher_samples} label(s) per position", flush=True)
    removals, truth = S.truth(ref, args.study_export)  # the study's exact LOO (float64 run, exported by run.py)
    rows = S.rows(ref, removals)
    ne = S.cfg["n_early"]

    def rho(est, truth=truth, ne=ne):
        return {"all": spearman_per_test(est, truth), "early": spearman_per_test(est[:ne], truth[:ne]),
                "late": spearman_per_test(est[ne:], truth[ne:])}

    ctx = S.ctx(path, model)
    for blocks in BLOCKS:
        for clipping in args.clipping.split(","):
            for W in WINDOWS:
                t0 = time.time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    info = build_embeddings(path, overwrite=True, progress=False, clipping=clipping,
                                            **({} if blocks == "auto" else {"blocks": blocks}),
                                            fisher_window=W)  # always: the default ("auto") pools 4 under "full"
                s = M._attr(ctx, curvature=info.curvature)
                r = rho(s[:, rows].T)
                r["build_s"] = info.seconds
                key = f"draw {draw} {blocks} {clipping}" + (f" W={W}" if len(WINDOWS) > 1 or W else "")
                out[key] = r
                print(f"draw {draw} blocks={blocks:5} ({len(info.blocks)} blocks, {info.curvature}) "
                      f"clipping={clipping:9} W={W} all {r['all']:+.3f} early {r['early']:+.3f} late {r['late']:+.3f}"
                      f"  build {info.seconds:.0f}s total {time.time() - t0:.0f}s", flush=True)
                json.dump(out, open(os.path.join(work, f"lm_{K}.json"), "w"), indent=1)  # kept as it goes
json.dump(out, open(os.path.join(work, f"lm_{K}.json"), "w"), indent=1)
print(f"wall {time.time() - t00:.0f}s")
