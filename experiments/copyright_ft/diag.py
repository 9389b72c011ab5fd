"""Why the full fine-tune's fast path misses and LoRA's does not: the sketch, or the regime?

Re-runs only the fast path of chosen grid points of ``results/copyright_ft.json`` (same outputs,
same exact Shapley values from the stored coalition utilities) with other sketch sizes and
curvatures, and writes ``results/copyright_ft_diag.json``.

Usage: PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python experiments/copyright_ft/diag.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import run as R  # noqa: E402

import datavalue  # noqa: E402
from datavalue import shapley  # noqa: E402
from datavalue.embeddings import build_embeddings  # noqa: E402
from datavalue.query import Attributor  # noqa: E402

VARIANTS = [  # (method, lr, epochs, proj_dim, curvature)
    ("full", 1e-4, 1, 512, "empirical_fisher"),
    ("full", 1e-4, 1, 8192, "empirical_fisher"),
    ("full", 1e-4, 1, 32768, "empirical_fisher"),
    ("full", 1e-4, 4, 32768, "empirical_fisher"),
    ("full", 1e-3, 1, 32768, "empirical_fisher"),
    ("lora", 1e-4, 1, 512, "empirical_fisher"),
    ("lora", 1e-4, 1, 2048, "empirical_fisher"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)

    res = json.loads((C.HERE / "results" / "copyright_ft.json").read_text())
    st = R.Study(args, log)
    work = C.ROOT / "runs" / "copyright_ft" / "diag"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = []
    for method, lr, e, k, curv in VARIANTS:
        if method == "lora" and not C.have_peft():
            continue
        row = next(r for r in res["rows"] if (r["method"], r["lr"], r["epochs"]) == (method, lr, e))
        phi = shapley.exact_from_utilities(np.array(row["U"]))
        n = phi.shape[1]
        U = np.array(row["U"])
        loo = U[:, [(1 << n) - 1] * n] - U[:, [((1 << n) - 1) ^ (1 << i) for i in range(n)]]
        X, Y = C.output_tensors(st.corpus, row["outputs"])
        model = st.fresh(method)
        path = work / f"{method}_{k}.zarr"
        t = time.perf_counter()
        rec = (lambda opt, model=model, path=path, k=k: datavalue.Recorder(
            path, model, proj_dim=k, seed=0, optimizer=opt, loss_reduction="sum", overwrite=True))
        C.finetune(model, st.ids, st.lab, C.epoch_slots(len(st.pool), e, R.BATCH), np.ones(len(st.pool), bool),
                   lr=lr, norm=st.norm, recorder=rec)
        model.eval()
        build_embeddings(path, curvature=curv, progress=False, overwrite=True)
        owners_map = {int(i): str(st.owner_of[i]) for i in range(len(st.pool))}
        attr = Attributor(path, model, curvature=curv, progress=False)
        S = np.asarray(attr.scores(lambda mm, X=X, Y=Y: C.neg_log_lik(mm, X, Y), by="owner", owners=owners_map), np.float64)
        labels = [str(x) for x in attr.labels(by="owner", owners=owners_map)]
        S = S[:, [labels.index(o) for o in C.OWNERS]]
        wall = time.perf_counter() - t
        m, mv = C.compare(phi, S), C.compare(loo, S)
        out.append({"method": method, "lr": lr, "epochs": e, "proj_dim": k, "curvature": curv, "wall_s": wall,
                    "vs_exact": {x: m[x] for x in ("tau_mean", "top_agree", "l1_mean", "corr", "rms_ratio")},
                    "vs_loo": {x: mv[x] for x in ("tau_mean", "top_agree", "corr")}})
        log(f"{method} lr {lr:g} ep {e} proj_dim {k} {curv}: tau {m['tau_mean']:.2f} top {m['top_agree']:.0%} "
            f"corr {m['corr']:.2f} | vs LOO tau {mv['tau_mean']:.2f} corr {mv['corr']:.2f} | {wall:.1f}s")
    (C.HERE / "results" / "copyright_ft_diag.json").write_text(json.dumps(
        {"command": "experiments/copyright_ft/diag.py", "total_s": time.perf_counter() - T0, "rows": out}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
