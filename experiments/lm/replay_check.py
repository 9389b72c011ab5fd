"""The exact replay (issue 23) as the ground truth on the LMs of issue 19. Public API only.

The small AdamW LM of ``run.py`` (same config, seeds, data, schedule, clipping, token-mean loss) is
recorded again, through ``train_reference``'s ``step_context`` as ``run.py`` does, once at exact
gradients with ``Recorder(..., optimizer=opt, checkpoint_every=N)`` (what the replay needs) and once
per sketch size of the study (what is scored). Then:

1. ``datavalue.replay_influence`` on the exact run for the study's held-out lines: the exact
   first-order (linearised) trajectory influence of every occurrence on every line.
2. Oracles: the replay against ``trajectory_loo(..., epsilon=...)`` (finite differences of the same
   linearisation) on a few occurrences, and against the study's full-removal trajectory LOO of its
   60 occurrences (the first-order ceiling, ``linearity.py``).
3. Every method's per-occurrence scores against the replay: Spearman over all occurrences per
   query line, averaged (and over the early / late halves of the steps).

    PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python experiments/lm/replay_check.py [--n-query 30]

The model is built with eager attention (the replay needs double backward, which the fused
attention kernels lack on CPU); the final weights are compared with the study's export.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import common as C  # noqa: E402
import methods as M  # noqa: E402
import run as R  # noqa: E402

import datavalue  # noqa: E402
from datavalue import open_run  # noqa: E402
from datavalue.testing import spearman_per_test, train_reference, trajectory_loo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("small", "large"), default="small")
    ap.add_argument("--n-query", type=int, default=30)
    ap.add_argument("--ks", default=None, help="sketch sizes; 'exact' = proj_dim None (default: small exact,1084,5420,16384; "
                    "large 22500,112500). The first one carries the checkpoints and is replayed.")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--n-fd", type=int, default=4, help="occurrences checked against finite differences")
    ap.add_argument("--epsilon", type=float, default=1e-6)
    ap.add_argument("--work", default="/tmp/lm_replay_check")
    ap.add_argument("--study-export", default=None, help="default /work/main/runs/lm/<size>-adamw/export")
    ap.add_argument("--out", default=None, help="default experiments/lm/replay_check_<size>.json")
    ap.add_argument("--skip-methods", action="store_true")
    ap.add_argument("--fd-sweep", default=None, help="only: the replay stored in --work (replay_truth.npz) against "
                    "trajectory_loo at these epsilons (comma list) on --n-fd of the study's occurrences, and the full removal")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tstart = time.time()
    out: dict = {"cmd": " ".join(sys.argv), "timings": {}}

    def log(*a):
        print(f"[{time.time() - tstart:7.1f}s]", *a, flush=True)

    def save():
        Path(args.out).write_text(json.dumps(out, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))

    # ------------------------------------------------------------------ the study's small AdamW LM
    study = C.Study(f"{args.size}-adamw", n_query=args.n_query, eager=True)
    name, arch, opt_cfg, n_train, B, T = study.name, study.arch, study.opt_cfg, study.n_train, study.B, study.T
    args.out = args.out or str(HERE / f"replay_check_{args.size}.json")
    args.study_export = args.study_export or f"/work/main/runs/lm/{name}/export"
    if args.ks is None:
        args.ks = "exact,1084,5420,16384" if args.size == "small" else "22500,112500"
    test_lines, X, Y, factory, P = study.test_lines, study.X, study.Y, study.factory, study.P
    batch_ids, batches, lrs2, rcfg, test_loss = study.batch_ids, study.batches, study.lrs2, study.rcfg, study.test_loss
    out.update(P=P, T=T, batch=B, n_train=n_train, n_query=len(test_lines), opt=opt_cfg, arch=arch,
               checkpoint_every=args.checkpoint_every)
    log(f"{name}: P={P}, T={T}, batch {B}, {n_train} lines, {len(test_lines)} query lines")

    if args.fd_sweep:
        fd_sweep(args, out, log, factory, batches, lrs2, rcfg, test_loss, T)
        return
    ks = [None if k == "exact" else int(k) for k in args.ks.split(",") if k]
    rkey = "exact" if ks[0] is None else str(ks[0])  # the run that carries the checkpoints
    out["replayed_run"] = rkey
    refs, models, paths = {}, {}, {}
    for k in ks:
        key = "exact" if k is None else str(k)
        model = factory()
        opt = C.make_optimizer(model, opt_cfg)
        path = work / f"{name}_{key}.zarr"
        t0 = time.perf_counter()
        kw = dict(checkpoint_every=args.checkpoint_every) if key == rkey else {}
        with datavalue.Recorder(path, model, proj_dim=k, seed=0, optimizer=opt, loss_reduction="token_mean",
                                curvature=None if k is None else "fisher", overwrite=True, **kw) as rec:
            ref = train_reference(factory, batches, lrs2, C.step_loss_fn, config=rcfg, model=model, optimizer=opt,
                                  verify=not refs, step_context=lambda t, b, lr, rec=rec: rec.step(
                                      sample_ids=b.sample_ids, tokens=C.n_tokens(b.targets[0]),
                                      fisher_mask=C.label_mask(b.targets[0]) if rec.fisher else None))
        out["timings"][f"record {key}"] = time.perf_counter() - t0
        refs[key], models[key], paths[key] = ref, model, path
        out.setdefault("runs", {})[key] = {"k": int(rec.proj_dim), "k_frac": rec.proj_dim / P}
        log(f"recorded {key} ({rec.proj_dim} cols) in {out['timings'][f'record {key}']:.1f}s")
    ref = refs[rkey]
    out["identical_final_weights_across_recordings"] = bool(all(
        torch.equal(ref.final_state[n], r.final_state[n]) for r in refs.values() for n in ref.final_state))
    # against the study's run (exported in float32; recorded there with the default attention kernel)
    exp = Path(args.study_export)
    if (exp / "final_model.pt").exists():
        st = torch.load(exp / "final_model.pt", weights_only=True)
        diffs = {n: float((ref.final_state[n].float() - v).abs().max()) for n, v in st.items() if n in ref.final_state}
        scale = max(float(v.abs().max()) for v in st.values())
        out["study_final_weights_max_abs_diff"] = max(diffs.values())
        out["study_final_weights_max_abs"] = scale
        log(f"final weights vs the study's export (float32): max |diff| {max(diffs.values()):.2e} (max |w| {scale:.2f})")
    save()

    # ----------------------------------------------------------------------------- the replay
    run = open_run(paths[rkey])
    R_ = int(run.step_ptr[run.n_steps])
    sid = np.asarray(run.sample_id[:R_])
    step_of = np.repeat(np.arange(run.n_steps), np.diff(np.asarray(run.step_ptr[: run.n_steps + 1])))

    def loss_fn(m, b):
        x, y = b
        tok = torch.as_tensor(C.n_tokens(y), dtype=torch.float64)
        return C.token_ce(m, x, y) / tok

    t0 = time.perf_counter()
    res = datavalue.replay_influence(str(paths[rkey]), factory(), lambda ids: (X[ids], Y[ids]), test_loss,
                                     loss_fn=loss_fn, description=f"{name} held-out lines", overwrite=True)
    out["timings"]["replay"] = time.perf_counter() - t0
    truth = np.asarray(res.scores(), dtype=np.float64)  # (m, R)
    out["replay_checks"] = res.attrs.get("checks")
    log(f"replay: {truth.shape[0]} queries x {truth.shape[1]} occurrences in {out['timings']['replay']:.1f}s "
        f"({out['timings']['replay'] / out['timings'][f'record {rkey}']:.1f}x the recorded run); checks {out['replay_checks']}")
    np.savez_compressed(work / "replay_truth.npz", truth=truth, sample_id=sid, step=step_of)
    out["replay_abs_median_by_quarter"] = [float(np.median(np.abs(truth[:, (step_of >= q * T // 4) & (step_of < (q + 1) * T // 4)])))
                                           for q in range(4)]
    save()

    # ----------------------------------------------------------------------------- oracles
    def row_of(t, s):
        r = np.flatnonzero((step_of == t) & (sid == s))
        assert r.size == 1, (t, s, r)
        return int(r[0])

    meta = json.loads((exp / "meta.json").read_text()) if (exp / "meta.json").exists() else None
    if meta is not None:
        removals = [tuple(x) for x in meta["loo_removals"]]
        full = np.asarray(meta["loo_truth"], np.float64)[: truth.shape[0]].T  # (60, m)
        rows60 = np.array([row_of(t, s) for t, s in removals])
        ne = len(removals) // 2
        rep60 = truth[:, rows60].T
        out["full_removal_abs_median"] = float(np.median(np.abs(full)))
        out["replay_vs_full_removal"] = {
            "all": spearman_per_test(rep60, full), "early": spearman_per_test(rep60[:ne], full[:ne]),
            "late": spearman_per_test(rep60[ne:], full[ne:])}
        log(f"replay vs the study's full-removal LOO (60 occurrences): {out['replay_vs_full_removal']}")
        # finite differences of the same linearisation, a few occurrences (half early, half late)
        pick = list(range(args.n_fd // 2)) + list(range(ne, ne + args.n_fd - args.n_fd // 2))
        rm = [removals[i] for i in pick]
        t0 = time.perf_counter()
        fd = trajectory_loo(ref, rm, test_loss, epsilon=args.epsilon)  # (n, m)
        fullr = trajectory_loo(ref, rm, test_loss)
        out["timings"]["fd oracle"] = time.perf_counter() - t0
        rep = truth[:, rows60[pick]].T
        rel = np.abs(rep - fd) / np.maximum(np.abs(fd), 1e-12)
        out["replay_vs_fd"] = {
            "epsilon": args.epsilon, "removals": rm, "max_rel": float(rel.max()), "median_rel": float(np.median(rel)),
            "max_abs": float(np.abs(rep - fd).max()), "median_abs_fd": float(np.median(np.abs(fd))),
            "full_removal_recomputed_vs_study_max_abs": float(np.abs(fullr - full[pick]).max())}
        log(f"replay vs trajectory_loo(epsilon={args.epsilon}) on {len(rm)} occurrences x {fd.shape[1]} queries: "
            f"max rel {rel.max():.2e}, median rel {np.median(rel):.2e}; full removal recomputed vs study max |diff| "
            f"{out['replay_vs_fd']['full_removal_recomputed_vs_study_max_abs']:.2e}")
    save()
    if args.skip_methods:
        return

    # ----------------------------------------------------------------------------- methods
    half = step_of < T // 2

    def rho(est):  # est (m, R)
        e, t = est.T, truth.T
        return {"all": spearman_per_test(e, t), "early": spearman_per_test(e[half], t[half]),
                "late": spearman_per_test(e[~half], t[~half])}

    def rho60(est):
        if meta is None:
            return None
        e = est[:, rows60].T
        return {"all": spearman_per_test(e, full), "early": spearman_per_test(e[:ne], full[:ne]),
                "late": spearman_per_test(e[ne:], full[ne:])}

    out["scores"] = {}
    out["scores_vs_full_removal_60"] = {}
    for key, path in paths.items():
        model = models[key].eval()
        ctx = M.Ctx(str(path), model, test_loss, lambda m, ids: C.token_ce(m, X[ids], Y[ids]),
                    lambda ids: C.n_tokens(Y[ids]), by=None, final_batches=batch_ids,
                    train_mask=lambda ids: C.label_mask(Y[ids]))
        assert np.array_equal(ctx.columns(), sid)
        reg: dict = {}
        if key != "exact" and out["runs"][key]["k"] <= R.FULL["dvemb_max"]:  # above: the builds do not fit (lm.md)
            reg["dvemb default"] = (M.dvemb, {})
            reg["dvemb none / layer"] = (M.dvemb, {"curvature": "none", "blocks": "layer"})
            reg["dvemb fisher / layer"] = (M.dvemb, {"curvature": "fisher", "blocks": "layer"})
        reg["tracin"] = (M.tracin, {})
        reg["final grad dot (sum)"] = (M.final_grad_dot, {})
        reg["influence fisher"] = (M.influence, {"curvature": "fisher"})
        if args.size == "small":
            reg["influence empirical_fisher"] = (M.influence, {"curvature": "empirical_fisher"})
        S, info = M.run_methods(ctx, reg, log=log)
        out["scores"][key], out["scores_vs_full_removal_60"][key] = {}, {}
        for meth, s in S.items():
            out["scores"][key][meth] = dict(rho(s), **info[meth])
            out["scores_vs_full_removal_60"][key][meth] = rho60(s)
            r = out["scores"][key][meth]
            log(f"K={key:>6} {meth:<28} vs replay {r['all']:+.3f} (early {r['early']:+.3f}, late {r['late']:+.3f})")
        out["scores"][key].update({m: i for m, i in info.items() if m not in S})
        out["runs"][key]["builds"] = ctx.cache.get("builds", [])
        save()
    out["wall_s"] = time.time() - tstart
    save()
    for p in paths.values():
        if p != paths[rkey]:
            shutil.rmtree(p, ignore_errors=True)
    log(f"done in {out['wall_s']:.0f}s; wrote {args.out}")


def fd_sweep(args, out, log, factory, batches, lrs2, rcfg, test_loss, T) -> None:
    """Convergence of the finite differences to the replay (the replay stored by a full run in --work)."""
    z = np.load(Path(args.work) / "replay_truth.npz")
    truth, sid, step_of = z["truth"], z["sample_id"], z["step"]
    meta = json.loads((Path(args.study_export) / "meta.json").read_text())
    removals = [tuple(x) for x in meta["loo_removals"]]
    ne = len(removals) // 2
    pick = list(range(args.n_fd // 2)) + list(range(ne, ne + args.n_fd - args.n_fd // 2))
    rm = [removals[i] for i in pick]
    rows = [int(np.flatnonzero((step_of == t) & (sid == s))[0]) for t, s in rm]
    rep = truth[:, rows].T  # (n, m)
    t0 = time.perf_counter()
    model = factory()
    ref = train_reference(factory, batches, lrs2, C.step_loss_fn, config=rcfg, model=model,
                          optimizer=C.make_optimizer(model, R.FULL["loo"][0][2]), verify=False)
    full = trajectory_loo(ref, rm, test_loss)
    sweep = {"removals": rm, "replay": rep, "full_removal": full, "fd": {}}
    for e in [float(x) for x in args.fd_sweep.split(",")]:
        fd = trajectory_loo(ref, rm, test_loss, epsilon=e)
        rel = np.abs(rep - fd) / np.maximum(np.abs(rep), 1e-12)
        sweep["fd"][f"{e:g}"] = {"values": fd, "rel_per_removal_max": rel.max(1), "rel_median": float(np.median(rel))}
        log(f"epsilon {e:g}: relative deviation from the replay, per removal (max over queries) "
            f"{np.array2string(rel.max(1), precision=2)}, median {np.median(rel):.2e}")
    sweep["seconds"] = time.perf_counter() - t0
    out["fd_sweep"] = sweep
    Path(args.out).write_text(json.dumps(out, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _cell(r) -> str:
    return "" if not r or "all" not in r else f"{r['all']:+.3f} ({r['early']:+.2f} / {r['late']:+.2f})"


def section() -> str:
    """The replay section of docs/results/lm.md from replay_check_<size>.json (``--report``)."""
    L = ["### Against the exact replay (issue 23): every occurrence", ""]
    for size in ("small", "large"):
        f = HERE / f"replay_check_{size}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        t = r["timings"]
        keys = list(r["scores"]) if "scores" in r else []
        rk = r["replayed_run"]
        L += [f"#### {size}-adamw: P = {r['P']:,}, {r['T']} steps, batch {r['batch']}, {r['n_query']} query lines, "
              f"{r['T'] * r['batch']} occurrences", "",
              f"Command: `PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 python experiments/lm/replay_check.py "
              f"--size {size} --n-query {r['n_query']}` ({r.get('wall_s', float('nan')):.0f} s wall, 2 shared cores, "
              "1 torch thread). The run of `run.py` recorded again through `train_reference`'s `step_context` "
              f"(eager attention), run `{rk}` with `checkpoint_every={r['checkpoint_every']}`; final weights equal "
              f"the study's exported run to {r.get('study_final_weights_max_abs_diff', float('nan')):.1e} (float32 export), "
              f"all recordings bit-identical: {r['identical_final_weights_across_recordings']}. "
              f"`replay_influence` ({r['n_query']} queries in one call): {t['replay']:.0f} s, "
              f"{t['replay'] / t[f'record {rk}']:.1f}x the recorded run ({t[f'record {rk}']:.0f} s, which includes "
              "`train_reference`'s verification replays); every checkpoint reproduced to "
              f"{max(r['replay_checks'].values()):.1e} (relative).", ""]
        fd, fr = r.get("replay_vs_fd"), r.get("replay_vs_full_removal")
        if fd:
            L += [f"- Replay vs `trajectory_loo(..., epsilon={fd['epsilon']:g})` (finite differences of the same "
                  f"linearisation), {len(fd['removals'])} occurrences x {r['n_query']} queries: median relative "
                  f"deviation {fd['median_rel']:.1e}, max {fd['max_rel']:.1e} (max absolute {fd['max_abs']:.1e}, "
                  f"median |value| {fd['median_abs_fd']:.1e})."]
        fs = HERE / f"replay_check_{size}_fd.json"
        if fs.exists():
            sw = json.loads(fs.read_text())["fd_sweep"]
            eps = list(sw["fd"])
            L += ["", f"Finite differences against the replay at decreasing epsilon (`--fd-sweep {','.join(eps)} --n-fd "
                  f"{len(sw['removals'])}`, {sw['seconds']:.0f} s): max relative deviation over the queries, per occurrence "
                  "(step, sample), and the values of the first query.", "",
                  "| occurrence | replay (query 0) | full removal (query 0) | " + " | ".join(f"eps {e}" for e in eps) + " |",
                  "|---|---|---|" + "---|" * len(eps)]
            for i, (t_, s_) in enumerate(sw["removals"]):
                L.append(f"| ({t_}, {s_}) | {sw['replay'][i][0]:.4g} | {sw['full_removal'][i][0]:.4g} | "
                         + " | ".join(f"{sw['fd'][e]['rel_per_removal_max'][i]:.1e} ({sw['fd'][e]['values'][i][0]:.4g})"
                                      for e in eps) + " |")
            L.append("")
        if r.get("replay_abs_median_by_quarter"):
            L += ["- Median |replay| by quarter of the steps (first to last): "
                  + ", ".join(f"{v:.2e}" for v in r["replay_abs_median_by_quarter"])
                  + f"; median |full-removal LOO| of the study's 60 occurrences: {r.get('full_removal_abs_median', float('nan')):.2e}."]
        if fr:
            L += [f"- Replay vs the study's full-removal trajectory LOO (its 60 occurrences): Spearman "
                  f"{_cell(fr)} (all (early / late); {r['n_query']} query lines): the first-order ceiling, what the exact "
                  "linearisation reaches against the removal itself (on the small LM `linearity.py` measured 0.514 "
                  "(0.28 / 0.99) at epsilon 1e-3)."]
        if keys:
            L += ["", f"Spearman against the replay over all {r['T'] * r['batch']} occurrences per query line, averaged "
                  f"(early / late = steps before / from {r['T'] // 2}). Right column: the same scores against the "
                  "full-removal LOO of the study's 60 occurrences (the study's table, recomputed).", ""]
            meths = []
            for k in keys:
                meths += [m for m in r["scores"][k] if m not in meths and "all" in r["scores"][k][m]]
            cols = [f"{k} ({100 * r['runs'][k]['k_frac']:.1f}% of P)" if k != "exact" else "exact" for k in keys]
            L += ["| method | " + " | ".join(cols) + " | " + " | ".join(f"{c}, vs 60 full removals" for c in cols) + " |",
                  "|---|" + "---|" * (2 * len(keys))]
            for m in meths:
                row = [_cell(r["scores"][k].get(m)) for k in keys]
                row += [_cell((r.get("scores_vs_full_removal_60") or {}).get(k, {}).get(m)) for k in keys]
                L.append(f"| {m} | " + " | ".join(row) + " |")
            L.append("")
    return "\n".join(L + [READING]) + "\n"


READING = """#### Reading (issue 19's goals restated against the replay)

- **The replay is right where a linearisation can be checked.** On the small LM it matches the finite
  differences of the same linearisation to a median 1.7e-6 relative (30 queries x 4 occurrences) and
  reproduces the first-order ceiling against the full removal (0.514 overall, 0.28 early, 0.99 late).
  On the larger LM it matches them for the late occurrences (step 20: the deviation falls as O(epsilon),
  to 6e-7); for the early ones (step 0) the finite differences are erratic from 1e-3 to 1e-5 and reach
  the replay's order of magnitude only at 1e-6 to 1e-7 (one occurrence, query 2: -30, 4862, 3116,
  -4.8e4, -1.7e5 at epsilon 1e-3 ... 1e-7 against the replay's -2.3e5, where the full removal moves the
  loss by +0.48), without converging. The likely cause (not isolated here): in AdamW's first steps the
  bias-corrected second moment is still one or a few gradients squared, so each coordinate's update is
  close to sign(g), whose derivative (up to 1/eps for coordinates whose gradient is near zero) is huge and
  holds only in a tiny radius. In the first quarter of the larger LM's steps the median |replay| is
  6.3e3 against a median |full removal| of 6.3e-2. There the exact linearisation is not a useful target
  (0.07 Spearman against the removal on the early occurrences); late it is (0.94).
- **Against the replay the goals are far off.** Small LM, all 960 occurrences, 30 lines: the best is the
  final-model `influence` (Fisher) at exact gradients, 0.234 (0.09 early / 0.47 late), then 0.221 at a 5%
  sketch; the default embeddings build reaches 0.096 / 0.136 / 0.187 at 1% / 5% / 15% of P (late half
  0.32 / 0.43 / 0.45); TracIn 0.09-0.11; the final-model gradient dot 0.13-0.14; `curvature="none"`
  0.08. Goal 0.9 (exact gradients): no method is within 0.65 of it; goal 0.8 (sketch at most 5% of P):
  the best sketched score is 0.22. Even on the late half, where the linearisation equals the removal to
  0.99, nothing reaches 0.49. On the larger LM (4 lines, 240 occurrences) every method sits at
  0.05-0.13 overall and 0.22-0.61 on the late half (best: `influence fisher` at 1%, 0.61).
- **So the gap is the methods, not the target.** Restricted to where first order is the right question
  (late occurrences), the exact first-order answer exists, is computable (305 s for 30 lines on the
  small LM, 205 s for 4 lines on the larger), and the approximate methods reach about half of it. The
  early occurrences of an AdamW run are out of reach of any first-order method, the replay included;
  issue 19's 0.9 / 0.8 goals can only be meant against the late (post-warm-up) occurrences or against a
  target that is not first order.
- **Reproduction.** On the small LM the right-hand columns (the same methods against the study's 60
  full removals) equal the study's table above to the third digit (e.g. exact TracIn 0.017, exact
  `influence fisher` 0.183, the default build at 5% 0.207): the re-recorded run is the study's run.
- **Caveats.** One seed, one run per size; the larger LM with 4 query lines only; the early/late split
  here is by halves of the steps (the study's 60 removals: first and last thirds). The `dvemb` builds
  were not run at exact gradients (they do not fit, as in the study) nor at 5% on the larger LM.
"""


if __name__ == "__main__":
    if "--report" in sys.argv:
        (HERE / "replay_check.md").write_text(section())
        print(section())
    else:
        main()
