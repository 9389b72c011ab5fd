"""Royalties for 1,000 owners in the fine-tuning regime (issue 21, part 2).

The owners' text of ``run.py`` (five chatterbot-corpus categories, long lines cut at word
boundaries into pieces of at most 62 characters: 1,148 pieces) is split among 1,000 synthetic
owners: a seeded permutation gives pieces 0..999 one owner each, the other pieces go to owners drawn
with probability ~ 1/(rank+1) (a few owners hold several works). The same pretrained base as
``run.py`` is fine-tuned on all of it (one configuration, ``--method/--lr/--epochs``).

* Fast path: one recorded fine-tune, ``build_embeddings``, ``Attributor.scores(by="owner")`` over
  1,000 owners: each owner's value in the additive game (= its FGSV in the first-order game: the
  sum of its works' values, whatever the grouping). Cost per owner.
* Retraining game, Monte Carlo where affordable: for a few owners (the three with the largest summed
  positive fast value, and ``--mc-owners`` - 3 at random: one by default) the unbiased size-stratified estimator
  ``phi_i = E_{k ~ U{0..n-1}} E_{S ~ U(k-subsets of N minus i)} [v(S + i) - v(S)]`` with ``--samples``
  draws each (2 fine-tunes per draw; every fine-tune scores all outputs), its standard error, and
  retraining leave-one-owner-out for the same owners.
* The royalty statement of the period: every output recorded in a ``RoyaltyLedger`` (pool = 30% of
  $1.00 per output, ``srs-v1``, share-then-sum), exact-cent statement, HTML / CSV / JSON reports.

Usage: PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python experiments/copyright_ft/many.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

import datavalue  # noqa: E402
from datavalue import shapley  # noqa: E402
from datavalue.embeddings import build_embeddings  # noqa: E402
from datavalue.query import Attributor  # noqa: E402

N_OWNERS, BATCH, N_OUT, GEN_LEN, TEMP = 1000, 16, 20, 40, 0.8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="lora", choices=("full", "lora"))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=6, help="Monte Carlo draws per owner (2 fine-tunes each)")
    ap.add_argument("--mc-owners", type=int, default=4)
    ap.add_argument("--out", default=str(C.HERE / "results"))
    args = ap.parse_args()
    if args.method == "lora" and not C.have_peft():
        print("peft does not import: using the full fine-tune")
        args.method = "full"
    torch.set_num_threads(1)
    T0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)

    corpus = C.Corpus()
    cache = C.ROOT / "runs" / "copyright_ft"
    base, _ = C.base_model(corpus, cache, log)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh():
        m = C.new_model(corpus)
        m.load_state_dict(base_state)
        return C.adapt(m, args.method)

    # ---------------------------------------------------------------- 1,000 synthetic owners
    pool = corpus.many
    rng = np.random.default_rng(21)
    perm = rng.permutation(len(pool))
    owner_of = np.empty(len(pool), dtype=np.int64)
    owner_of[perm[:N_OWNERS]] = np.arange(N_OWNERS)
    p = 1.0 / np.arange(1, N_OWNERS + 1)
    owner_of[perm[N_OWNERS:]] = rng.choice(N_OWNERS, len(pool) - N_OWNERS, p=p / p.sum())
    names = [f"owner-{i:04d}" for i in range(N_OWNERS)]
    works = np.bincount(owner_of, minlength=N_OWNERS)
    ids, lab = corpus.encode(pool)
    norm = float(BATCH * C.LM.n_tokens(lab).mean())
    slots = C.epoch_slots(len(pool), args.epochs, BATCH)
    log(f"{len(pool)} works, {N_OWNERS} owners (works per owner: max {works.max()}, "
        f"{(works > 1).sum()} owners with more than one), {len(slots)} fine-tuning steps")

    def finetune(member: np.ndarray):
        m = fresh()
        st, secs = C.finetune(m, ids, lab, slots, member, lr=args.lr, norm=norm, checkpoints={len(slots)})
        C.load_trainable(m, st[len(slots)])
        return m.eval(), secs

    # ---------------------------------------------------------------- fast path (recorded)
    work = cache / "many"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = fresh()
    t = time.perf_counter()
    rec = (lambda opt: datavalue.Recorder(work / "ft.zarr", model, proj_dim=2048 if args.method == "full" else None,
                                          seed=0, optimizer=opt, loss_reduction="sum", overwrite=True))
    C.finetune(model, ids, lab, slots, np.ones(len(pool), bool), lr=args.lr, norm=norm, recorder=rec)
    t_record = time.perf_counter() - t
    model.eval()
    gen = torch.Generator().manual_seed(5)
    outs = []
    for i, j in enumerate(np.random.default_rng(5).choice(len(pool), N_OUT, replace=False)):
        pr = C.prompt_of(pool[j])
        outs.append({"id": f"gen-{i:03d}", "prompt": pr, "prompt_owner": names[owner_of[j]],
                     "text": C.generate(model, corpus, pr, GEN_LEN, TEMP, gen)})
    X, Y = C.output_tensors(corpus, outs)
    t = time.perf_counter()
    build_embeddings(work / "ft.zarr", progress=False, overwrite=True)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    owners_map = {int(j): names[owner_of[j]] for j in range(len(pool))}
    attr = Attributor(work / "ft.zarr", model, progress=False)
    S = np.asarray(attr.scores(lambda mm: C.neg_log_lik(mm, X, Y), by="owner", owners=owners_map), np.float64)
    lab_o = [str(x) for x in attr.labels(by="owner", owners=owners_map)]
    fast = S[:, [lab_o.index(nm) for nm in names]]  # (outputs, owners)
    t_query = time.perf_counter() - t
    t_fast = t_record + t_build + t_query
    log(f"fast path: record {t_record:.1f}s, build {t_build:.1f}s, owner query {t_query:.1f}s "
        f"-> {1000 * t_fast / N_OWNERS:.1f} ms per owner")

    # ---------------------------------------------------------------- retraining game, Monte Carlo
    with torch.no_grad():
        v_base = -C.neg_log_lik(fresh().eval(), X, Y).double().numpy()
    full_m, full_s = finetune(np.ones(len(pool), bool))
    with torch.no_grad():
        v_full = -C.neg_log_lik(full_m, X, Y).double().numpy() - v_base
        v_rec = -C.neg_log_lik(model, X, Y).double().numpy() - v_base
    np.testing.assert_allclose(v_full, v_rec, atol=1e-4)  # the recorded run is the all-owner fine-tune

    def v(members: np.ndarray) -> tuple[np.ndarray, float]:
        mem = np.isin(owner_of, members)
        m, secs = finetune(mem)
        with torch.no_grad():
            return -C.neg_log_lik(m, X, Y).double().numpy() - v_base, secs

    pos = np.clip(fast, 0, None).sum(0)
    top = list(np.argsort(-pos)[:3])
    rest = [i for i in range(N_OWNERS) if i not in top]
    chosen = top + list(np.random.default_rng(3).choice(rest, max(0, args.mc_owners - 3), replace=False))
    mc, ft_secs, n_ft = {}, full_s, 1
    srng = np.random.default_rng(2025)
    for i in chosen:
        others = np.array([j for j in range(N_OWNERS) if j != i])
        marg = []
        for _ in range(args.samples):
            k = int(srng.integers(0, N_OWNERS))
            Sset = srng.choice(others, k, replace=False)
            a, s1 = v(np.append(Sset, i))
            b, s2 = v(Sset)
            marg.append(a - b)
            ft_secs += s1 + s2
            n_ft += 2
        marg = np.array(marg)  # (samples, outputs)
        loo_v, s3 = v(others)
        ft_secs += s3
        n_ft += 1
        mc[names[i]] = {"works": int(works[i]), "phi_mc": marg.mean(0).tolist(),
                        "stderr": (marg.std(0, ddof=1) / np.sqrt(len(marg))).tolist(),
                        "loo": (v_full - loo_v).tolist(), "fast": fast[:, i].tolist(),
                        "chosen_as": "top-3 by fast value" if i in top else "random"}
        e = mc[names[i]]
        log(f"{names[i]} ({works[i]} works): MC phi mean over outputs {np.mean(e['phi_mc']):+.4f} "
            f"(stderr {np.mean(e['stderr']):.4f}), LOO {np.mean(e['loo']):+.4f}, fast {np.mean(e['fast']):+.4f}")
    log(f"retraining: {n_ft} fine-tunes, {ft_secs:.1f}s of fine-tuning ({ft_secs / n_ft:.2f}s each)")

    # ---------------------------------------------------------------- the period's royalty statement
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    led_path = work / "ledger.jsonl"
    ledger = shapley.RoyaltyLedger(led_path)
    t = time.perf_counter()
    for i, o in enumerate(outs):
        ledger.record(output_id=o["id"], prompt=o["prompt"], content=o["prompt"] + o["text"], revenue=Decimal("1.00"),
                      royalty_rate=Decimal("0.30"), owners=names, result=fast[i],
                      timestamp=f"2025-04-{1 + i % 28:02d}T12:00:00", model_fingerprint=f"gpt2-tiny-{corpus.fingerprint}",
                      run_fingerprint=f"dvemb-{args.method}-lr{args.lr:g}")
    assert ledger.verify() == len(outs)
    stmt = ledger.statement("2025-04-01:2025-05-01")
    reports = {}
    for ext in ("html", "csv", "json"):  # the JSON (every owner x output, ~2 MB) stays under runs/
        dest = (work if ext == "json" else out) / f"many_statement.{ext}"
        if dest.exists():
            dest.unlink()
        shapley.write_report(stmt, dest)
        reports[ext] = {"path": os.path.relpath(dest, C.ROOT), "bytes": dest.stat().st_size}
    t_ledger = time.perf_counter() - t
    paid = [ol for ol in stmt.owners if ol.amount > 0]
    total_paid = shapley.exact_sum(ol.amount for ol in stmt.owners)
    log(f"statement: {len(paid)} owners paid, total {total_paid} + unallocated {stmt.unallocated_total} "
        f"(reconciles: {stmt.reconciles}), {t_ledger:.1f}s")
    summary = {
        "command": "experiments/copyright_ft/many.py " + " ".join(sys.argv[1:]),
        "method": args.method, "lr": args.lr, "epochs": args.epochs, "steps": len(slots), "works": len(pool),
        "owners": N_OWNERS, "owners_multi": int((works > 1).sum()), "max_works": int(works.max()),
        "times": {"record_s": t_record, "build_s": t_build, "query_s": t_query, "fast_total_s": t_fast,
                  "fast_ms_per_owner": 1000 * t_fast / N_OWNERS, "finetune_s_each": ft_secs / n_ft,
                  "retrain_finetunes": n_ft, "retrain_s": ft_secs, "ledger_and_reports_s": t_ledger,
                  "total_s": time.perf_counter() - T0},
        "mc": mc, "samples_per_owner": args.samples,
        "statement": {"owners_paid": len(paid), "paid_total": str(total_paid),
                      "unallocated": str(stmt.unallocated_total), "reconciles": bool(stmt.reconciles),
                      "top": [(ol.owner, str(ol.amount)) for ol in sorted(stmt.owners, key=lambda x: -x.amount)[:10]],
                      "reports": reports},
        "fast_summary": {"positive_per_output_mean": float((fast > 0).sum(1).mean()),
                         "share_of_top10_owners": float(np.sort(C.srs(fast).sum(0))[::-1][:10].sum() / N_OUT)},
        "outputs": outs,
    }
    (out / "many.json").write_text(json.dumps(summary, indent=1))
    log(f"done -> {out / 'many.json'}")


if __name__ == "__main__":
    sys.exit(main())
