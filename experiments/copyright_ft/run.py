"""Copyright royalties in the fine-tuning regime: exact Shapley over coalition fine-tunes vs one
recorded fine-tune and data value embeddings (issue 21, part 1).

A GPT-2-architecture char-level LM (~0.1M parameters, from a config) is pretrained once on
chatterbot-corpus categories no owner holds; five owners (ai, emotion, psychology, literature,
humor; ``--cap`` lines each) fine-tune it. For each grid point (method x lr x length):

* outputs: 20 samples from the all-owner fine-tune, 4 prompted by each owner's opening words;
* gold standard: the 32 coalition fine-tunes (cached on disk under ``runs/copyright_ft/``),
  ``v_x(S) = log p_S(x|c) - log p_base(x|c)``, ``shapley.exact_from_utilities``;
* fast path: one recorded all-owner fine-tune (``datavalue.Recorder``, AdamW), ``build_embeddings``
  (empirical Fisher, the default, and curvature ``"none"``), ``Attributor.scores(-log p, by="owner")``,
  each owner's value in the additive game (``shapley.AdditiveGame``, values = summed influence);
* the splitting attack on one grid point (``--split``): the most valuable owner cut into 3 shells,
  the 7-player game retrained; plain Shapley vs Owen over a registry vs the faithful group Shapley
  value (``shapley.fgsv_from_utilities``).

Usage (from the repository root):
    PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python experiments/copyright_ft/run.py
    ... run.py --quick      # full fine-tune at lr 1e-4 only, both lengths (smoke test; ~1 min from the cache)

Sign: influence = loss(without) - loss(with), loss = -log p(x|c): the estimated drop of
log p(x|c) when the owner is removed, the sign of the Shapley utility differences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

import datavalue  # noqa: E402
from datavalue import shapley  # noqa: E402
from datavalue.embeddings import build_embeddings  # noqa: E402
from datavalue.query import Attributor  # noqa: E402

GRID = dict(methods=("full", "lora"), lrs=(1e-4, 1e-3), epochs=(1, 4))
BATCH, PER_OWNER_OUTPUTS, GEN_LEN, TEMP = 16, 4, 40, 0.8
PROJ = {"full": 2048, "lora": None}  # LoRA: ~8k trainable parameters, exact per-sample gradients
SPLIT = dict(method="lora", lr=1e-4, epochs=1, shells=3)


class Study:
    def __init__(self, args, log) -> None:
        self.args, self.log = args, log
        self.cache = C.ROOT / "runs" / "copyright_ft"
        self.corpus = C.Corpus()
        self.base, self.pretrain_s = C.base_model(self.corpus, self.cache, log)
        self.base_state = {k: v.clone() for k, v in self.base.state_dict().items()}
        rng = np.random.default_rng(0)
        self.pool, self.owner_of = [], []
        for o in C.OWNERS:
            lines = self.corpus.cats[o]
            pick = sorted(rng.choice(len(lines), min(args.cap, len(lines)), replace=False))
            self.pool += [lines[j] for j in pick]
            self.owner_of += [o] * len(pick)
        self.owner_of = np.array(self.owner_of)
        self.parts = [np.flatnonzero(self.owner_of == o) for o in C.OWNERS]
        self.ids, self.lab = self.corpus.encode(self.pool)
        self.norm = float(BATCH * C.LM.n_tokens(self.lab).mean())
        self.steps_per_epoch = -(-len(self.pool) // BATCH)
        self.prompts = []
        prng = np.random.default_rng(7)
        for o, p in zip(C.OWNERS, self.parts, strict=True):
            for j in prng.choice(p, PER_OWNER_OUTPUTS, replace=False):
                self.prompts.append((o, C.prompt_of(self.pool[j])))
        log(f"pool {len(self.pool)} lines (" + ", ".join(f"{o}={len(p)}" for o, p in zip(C.OWNERS, self.parts,
            strict=True)) + f"), vocab {self.corpus.V}, base pretrain {self.pretrain_s:.1f}s (0 = cached)")

    def fresh(self, method: str):
        m = C.new_model(self.corpus)
        m.load_state_dict(self.base_state)
        return C.adapt(m, method)

    def member(self, parts_in) -> np.ndarray:
        mem = np.zeros(len(self.pool), dtype=bool)
        for p in parts_in:
            mem[p] = True
        return mem

    def coalition(self, method, lr, parts, mask, epochs_all, tag) -> tuple[dict, float, bool]:
        """Trainable states of the fine-tune on the parts in ``mask`` at each length (cached)."""
        f = self.cache / "ft" / f"{self.corpus.fingerprint}_{tag}_{method}_lr{lr:g}_cap{self.args.cap}" / f"{mask}.pt"
        if f.exists():
            blob = torch.load(f, weights_only=True)
            return blob["states"], float(blob["seconds"]), True
        model = self.fresh(method)
        ck = [e * self.steps_per_epoch for e in epochs_all]
        slots = C.epoch_slots(len(self.pool), max(epochs_all), BATCH)
        states, secs = C.finetune(model, self.ids, self.lab, slots,
                                  self.member([parts[i] for i in range(len(parts)) if mask >> i & 1]),
                                  lr=lr, norm=self.norm, checkpoints=set(ck))
        states = {f"ep{e}": states[e * self.steps_per_epoch] for e in epochs_all}
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"states": states, "seconds": secs}, f.with_suffix(".tmp"))
        os.replace(f.with_suffix(".tmp"), f)
        return states, secs, False

    def model_with(self, method, state):
        m = self.fresh(method)
        C.load_trainable(m, state)
        m.eval()
        return m

    @torch.no_grad()
    def loglik(self, model, X, Y) -> np.ndarray:
        return -C.neg_log_lik(model, X, Y).double().numpy()


def run_point(st: Study, method: str, lr: float, epochs_all, work: Path) -> list[dict]:
    log, n = st.log, len(C.OWNERS)
    full_mask = (1 << n) - 1
    t0 = time.perf_counter()
    states_full, _, _ = st.coalition(method, lr, st.parts, full_mask, epochs_all, "owners")
    base_m = st.fresh(method).eval()
    outs = {}
    for e in epochs_all:
        m = st.model_with(method, states_full[f"ep{e}"])
        gen = torch.Generator().manual_seed(11)
        outs[e] = [{"id": f"gen-{i:03d}", "prompt_owner": o, "prompt": p,
                    "text": C.generate(m, st.corpus, p, GEN_LEN, TEMP, gen)} for i, (o, p) in enumerate(st.prompts)]
    XY = {e: C.output_tensors(st.corpus, outs[e]) for e in epochs_all}
    v_base = {e: st.loglik(base_m, *XY[e]) for e in epochs_all}
    U = {e: np.empty((len(st.prompts), 1 << n)) for e in epochs_all}
    gold_s, n_cached = 0.0, 0
    for mask in range(1 << n):
        states, secs, cached = st.coalition(method, lr, st.parts, mask, epochs_all, "owners")
        gold_s += secs
        n_cached += cached
        for e in epochs_all:
            U[e][:, mask] = st.loglik(st.model_with(method, states[f"ep{e}"]), *XY[e]) - v_base[e]
    log(f"[{method} lr={lr:g}] gold: 32 coalition fine-tunes, {gold_s:.1f}s of fine-tuning ({n_cached} from cache), "
        f"{time.perf_counter() - t0:.1f}s wall incl. evaluation")
    rows = []
    for e in epochs_all:
        steps = e * st.steps_per_epoch
        phi = shapley.exact_from_utilities(U[e])
        np.testing.assert_allclose(phi.sum(1), U[e][:, -1] - U[e][:, 0], atol=1e-8)
        loo = U[e][:, [full_mask] * n] - U[e][:, [full_mask ^ (1 << i) for i in range(n)]]
        # ---- fast path: one recorded fine-tune, embeddings, owner query
        path = work / f"{method}_lr{lr:g}_ep{e}.zarr"
        model = st.fresh(method)
        tr = time.perf_counter()
        rec = (lambda opt, model=model, path=path: datavalue.Recorder(
            path, model, proj_dim=PROJ[method], seed=0, optimizer=opt, loss_reduction="sum", overwrite=True))
        C.finetune(model, st.ids, st.lab, C.epoch_slots(len(st.pool), e, BATCH), np.ones(len(st.pool), bool),
                   lr=lr, norm=st.norm, recorder=rec)
        t_record = time.perf_counter() - tr
        ref = states_full[f"ep{e}"]
        now = C.trainable_state(model)
        max_dev = max(float((now[k] - ref[k]).abs().max()) for k in ref)
        base_tr = C.trainable_state(st.fresh(method))
        moved = float(np.sqrt(sum(float(((ref[k] - base_tr[k]) ** 2).sum()) for k in ref)))
        base_norm = float(np.sqrt(sum(float((v.double() ** 2).sum()) for v in st.base_state.values())))
        model.eval()
        X, Y = XY[e]
        owners_map = {int(i): str(st.owner_of[i]) for i in range(len(st.pool))}
        fast, t_fast = {}, {}
        for curv in ("empirical_fisher", "none"):
            tb = time.perf_counter()
            build_embeddings(path, curvature=curv, progress=False, overwrite=True)
            attr = Attributor(path, model, curvature=curv, progress=False)
            S = np.asarray(attr.scores(lambda mm, X=X, Y=Y: C.neg_log_lik(mm, X, Y), by="owner",
                                       owners=owners_map), np.float64)
            labels = [str(x) for x in attr.labels(by="owner", owners=owners_map)]
            S = S[:, [labels.index(o) for o in C.OWNERS]]
            # the project's owner-value path: the additive game's Shapley values are the owner sums
            rows_scores = np.asarray(attr.scores(lambda mm, X=X, Y=Y: C.neg_log_lik(mm, X, Y), by="sample"))
            lab_s = np.asarray(attr.labels(by="sample")).astype(int)
            game = shapley.AdditiveGame.from_attributions(rows_scores[0], [owners_map[int(j)] for j in lab_s])
            np.testing.assert_allclose(game.shapley_values()[[list(game.names).index(o) for o in C.OWNERS]],
                                       S[0], rtol=1e-5, atol=1e-6)
            fast[curv] = S
            t_fast[curv] = t_record + time.perf_counter() - tb
        row = {
            "method": method, "lr": lr, "epochs": e, "steps": steps, "n_outputs": len(outs[e]),
            "param_move_rel": moved / base_norm, "recorded_vs_gold_max_abs_diff": max_dev,
            "times": {"gold_finetune_s": gold_s, "gold_models": 1 << n, "record_s": t_record,
                      "fast_total_s": t_fast},
            "metrics": {c: C.compare(phi, fast[c]) for c in fast} | {"loo-retrain": C.compare(phi, loo)},
            "metrics_vs_loo": {c: C.compare(loo, fast[c]) for c in fast},
            "interaction": float(np.abs(phi - loo).sum() / np.abs(phi).sum()),
            "prompted_top": {"exact": float(np.mean([C.OWNERS[i] == o["prompt_owner"]
                                                     for i, o in zip(phi.argmax(1), outs[e], strict=True)]))},
            "outputs": [dict(o, phi=phi[i].tolist(), fast=fast["empirical_fisher"][i].tolist(), loo=loo[i].tolist(),
                             v_full=float(U[e][i, -1])) for i, o in enumerate(outs[e])],
            "U": U[e].tolist(),
        }
        mm = row["metrics"]["empirical_fisher"]
        log(f"[{method} lr={lr:g} ep={e}] tau {mm['tau_mean']:.2f} top {mm['top_agree']:.0%} L1 {mm['l1_mean']:.2f} "
            f"corr {mm['corr']:.2f} | LOO tau {row['metrics']['loo-retrain']['tau_mean']:.2f} | "
            f"move {row['param_move_rel']:.2e} | fast {t_fast['empirical_fisher']:.1f}s | dev {max_dev:.1e}")
        rows.append(row)
    return rows


def split_attack(st: Study, point: dict) -> dict:
    """The most valuable owner (mean SRS share, exact game) cut round-robin into shells."""
    method, lr, e, k = SPLIT["method"], SPLIT["lr"], SPLIT["epochs"], SPLIT["shells"]
    if method == "lora" and not C.have_peft():
        method = "full"
    n = len(C.OWNERS)
    U0 = np.array(point["U"])
    phi = shapley.exact_from_utilities(U0)
    target = int(np.argmax(C.srs(phi).mean(0)))
    shells = [st.parts[target][j::k] for j in range(k)]
    parts7 = [p for i, p in enumerate(st.parts) if i != target] + shells
    names7 = [o for i, o in enumerate(C.OWNERS) if i != target] + [f"{C.OWNERS[target]}-shell{j + 1}" for j in range(k)]
    outs = point["outputs"]
    X, Y = C.output_tensors(st.corpus, outs)
    v_base = st.loglik(st.fresh(method).eval(), X, Y)
    n7 = len(parts7)
    U7 = np.empty((len(outs), 1 << n7))
    secs, t0 = 0.0, time.perf_counter()
    shell_bits = (1 << n7) - (1 << (n - 1))
    for mask in range(1 << n7):
        sb = mask & shell_bits
        if sb in (0, shell_bits):  # all or no shells: an original coalition (cached)
            orig = 0
            for j in range(n - 1):
                if mask >> j & 1:
                    orig |= 1 << [i for i in range(n) if i != target][j]
            if sb:
                orig |= 1 << target
            states, s, _ = st.coalition(method, lr, st.parts, orig, GRID["epochs"], "owners")
        else:
            states, s, _ = st.coalition(method, lr, parts7, mask, (e,), f"split{target}")
        secs += s
        U7[:, mask] = st.loglik(st.model_with(method, states[f"ep{e}"]), X, Y) - v_base
    st.log(f"split attack: {1 << n7} coalitions, {secs:.1f}s of fine-tuning, {time.perf_counter() - t0:.1f}s wall")
    np.testing.assert_allclose(U7[:, -1], U0[:, -1], atol=1e-9)
    phi7 = shapley.exact_from_utilities(U7)
    reg = shapley.OwnerRegistry({w: w for w in names7})
    reg.add_owner(C.OWNERS[target])
    for s_ in names7[n - 1:]:
        reg.merge(s_, into=C.OWNERS[target])
    reg_owners, unions = reg.partition(names7)
    owen = shapley.owen_from_utilities(U7, unions)
    owen_tot = np.stack([owen[:, list(u)].sum(1) for u in unions], 1)[:, [list(reg_owners).index(o) for o in C.OWNERS]]
    np.testing.assert_allclose(owen_tot, phi, atol=1e-6)  # quotient property
    fg = shapley.fgsv_from_utilities(U7, unions)[:, [list(reg_owners).index(o) for o in C.OWNERS]]
    fg_shells = shapley.fgsv_from_utilities(U7, [[i] for i in range(n7)])
    np.testing.assert_allclose(fg_shells[:, n - 1:].sum(1), fg[:, target], atol=1e-9)  # faithful: grouping free
    others = [i for i in range(n) if i != target]
    split_srs = C.srs(phi7)
    out = {
        "method": method, "lr": lr, "epochs": e, "owner": C.OWNERS[target], "shells": k, "train_s": secs,
        "share": {
            "unsplit Shapley": float(C.srs(phi)[:, target].mean()),
            "split, plain Shapley (shells summed)": float(split_srs[:, n - 1:].sum(1).mean()),
            "split, Owen over the registry (shells merged)": float(C.srs(owen_tot)[:, target].mean()),
            "split, FGSV (owners' works summed)": float(C.srs(fg)[:, target].mean()),
            "split, FGSV per shell (no registry), shells summed": float(C.srs(fg_shells)[:, n - 1:].sum(1).mean()),
        },
        "others_share": {
            "unsplit Shapley": C.srs(phi)[:, others].mean(0).tolist(),
            "split, plain Shapley": split_srs[:, : n - 1].mean(0).tolist(),
            "split, Owen over the registry": C.srs(owen_tot)[:, others].mean(0).tolist(),
            "split, FGSV": C.srs(fg)[:, others].mean(0).tolist(),
        },
        "others": [C.OWNERS[i] for i in others],
        "value_target": {"unsplit": float(phi[:, target].mean()), "split plain": float(phi7[:, n - 1:].sum(1).mean()),
                         "owen": float(owen_tot[:, target].mean()), "fgsv": float(fg[:, target].mean())},
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="full fine-tune at lr 1e-4 only (both lengths), no splitting attack")
    ap.add_argument("--cap", type=int, default=48, help="lines per owner")
    ap.add_argument("--no-split", action="store_true")
    ap.add_argument("--out", default=str(C.HERE / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    T0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)

    st = Study(args, log)
    methods = [m for m in GRID["methods"] if m != "lora" or C.have_peft()]
    if "lora" not in methods:
        log("peft does not import: LoRA grid points are skipped")
    lrs, epochs = GRID["lrs"], GRID["epochs"]
    if args.quick:
        methods, lrs = ["full"], (1e-4,)
    work = C.ROOT / "runs" / "copyright_ft" / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for method in methods:
        for lr in lrs:
            rows += run_point(st, method, lr, epochs, work)
    split = None
    if not args.no_split and not args.quick:
        point = next(r for r in rows if (r["method"], r["lr"], r["epochs"]) ==
                     ((SPLIT["method"] if C.have_peft() else "full"), SPLIT["lr"], SPLIT["epochs"]))
        split = split_attack(st, point)
    total = time.perf_counter() - T0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in st.base.parameters())
    n_lora = sum(p.numel() for p in st.fresh("lora").parameters() if p.requires_grad) if C.have_peft() else None
    summary = {
        "command": "experiments/copyright_ft/run.py" + (" --quick" if args.quick else ""),
        "total_s": total, "pretrain_s": st.pretrain_s, "n_params": n_params, "n_lora_params": n_lora,
        "pool_lines": len(st.pool), "steps_per_epoch": st.steps_per_epoch, "batch": BATCH, "cap": args.cap,
        "owners": list(C.OWNERS), "model": C.MODEL, "pretrain": C.PRETRAIN, "lora": C.LORA,
        "proj_dim": PROJ, "peft": C.have_peft(), "rows": rows, "split": split,
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
    }
    name = "copyright_ft_quick.json" if args.quick else "copyright_ft.json"
    (out / name).write_text(json.dumps(summary, indent=1))
    log(f"done in {total:.1f}s -> {out / name}")


if __name__ == "__main__":
    sys.exit(main())
