"""Writes docs/results/copyright_ft.md and copyright_ft.png from results/copyright_ft.json and
results/many.json (run.py and many.py write them).

Usage: .venv/bin/python experiments/copyright_ft/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOC = ROOT / "docs" / "results"
LABEL = {"empirical_fisher": "embeddings, empirical Fisher (default)", "none": "embeddings, curvature none",
         "loo-retrain": "retrain leave-one-owner-out (additive oracle)"}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.6))
    xl = [f"{r['method']}\nlr {r['lr']:g}\n{r['epochs']} ep" for r in rows]
    x = np.arange(len(rows))
    for j, (key, c) in enumerate((("empirical_fisher", "C0"), ("none", "C1"), ("loo-retrain", "C2"))):
        ax[0].bar(x + (j - 1) * 0.27, [r["metrics"][key]["tau_mean"] for r in rows], 0.27, color=c, label=LABEL[key])
        ax[1].bar(x + (j - 1) * 0.27, [r["metrics"][key]["top_agree"] for r in rows], 0.27, color=c)
    ax[0].axhline(0.7, color="k", ls=":", lw=1)
    ax[1].axhline(0.8, color="k", ls=":", lw=1)
    for a, t in zip(ax[:2], ("mean Kendall tau vs exact Shapley", "top owner agrees with exact"), strict=True):
        a.set_xticks(x, xl, fontsize=7)
        a.set_title(t)
    ax[0].legend(fontsize=7, loc="lower left")
    best = max(rows, key=lambda r: r["metrics"]["empirical_fisher"]["tau_mean"])
    worst = min(rows, key=lambda r: r["metrics"]["empirical_fisher"]["tau_mean"])
    for r, mk, nm in ((best, "o", "best"), (worst, "x", "worst")):
        phi = np.array([o["phi"] for o in r["outputs"]])
        fa = np.array([o["fast"] for o in r["outputs"]])
        ax[2].scatter(phi.ravel() / np.abs(phi).max(), fa.ravel() / max(np.abs(fa).max(), 1e-12), s=12,
                      marker=mk, label=f"{nm}: {r['method']} lr {r['lr']:g} {r['epochs']} ep")
    ax[2].axhline(0, color="k", lw=0.5)
    ax[2].axvline(0, color="k", lw=0.5)
    ax[2].set_xlabel("exact Shapley value / its max |value|")
    ax[2].set_ylabel("fast path owner value / its max |value|")
    ax[2].legend(fontsize=7)
    ax[2].set_title("owner values per output")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    res = json.loads((HERE / "results" / "copyright_ft.json").read_text())
    many_p = HERE / "results" / "many.json"
    many = json.loads(many_p.read_text()) if many_p.exists() else None
    plot(res, DOC / "copyright_ft.png")
    L = ["# Copyright royalties in the fine-tuning regime: coalition fine-tunes vs one recorded fine-tune\n"]
    L.append(f"Command: `PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python {res['command']}`: wall time "
             f"{res['total_s']:.0f} s on {res['platform']['machine']}, torch {res['platform']['torch']}, 1 thread, on a "
             "2-core machine shared with four other jobs (load average 6-10 during the run)"
             f"{'' if res['pretrain_s'] else ' (base model from the on-disk cache)'}. "
             "Report: `.venv/bin/python experiments/copyright_ft/report.py`.\n")
    cmds = [(f"the grid + the splitting attack (incl. pretraining the base once, {res['pretrain_s']:.0f} s)",
             res["command"], res["total_s"])]
    for name, key in (("copyright_ft_diag.json", "total_s"), ("many.json", None), ("scratch_split.json", "total_s")):
        p = HERE / "results" / name
        if p.exists():
            d = json.loads(p.read_text())
            t = d["times"]["total_s"] if key is None else d[key]
            what = {"copyright_ft_diag.json": "fast path at other sketch sizes", "many.json": "1,000 owners",
                    "scratch_split.json": "FGSV vs Owen on the from-scratch attack"}[name]
            cmds.append((what, d["command"].strip(), t))
    L.append("| what | command (`PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python ...`) | wall |")
    L.append("|---|---|---|")
    for what, c, t in cmds:
        L.append(f"| {what} | `{c}` | {t:.0f} s |")
    L.append("")
    L.append("SECTION_READING\n")
    L.append("## Setup\n")
    L.append(f"* Model: GPT-2 architecture from a `transformers` config (no download), d={res['model']['d']}, "
             f"{res['model']['n_layer']} layers, {res['model']['n_head']} heads, char-level, {res['n_params']:,} "
             f"parameters; LoRA (`peft`, r={res['lora']['r']}, alpha={res['lora']['alpha']}, on c_attn/c_proj/c_fc): "
             f"{res['n_lora_params']:,} trainable parameters.")
    L.append(f"* Base: pretrained once ({res['pretrain']['steps']} AdamW steps, batch {res['pretrain']['batch']}, "
             f"lr {res['pretrain']['lr']:g} cosine) on chatterbot-corpus categories no owner holds; cached under "
             "`runs/copyright_ft/`.")
    L.append(f"* Owners: {', '.join(res['owners'])}, {res['cap']} lines each ({res['pool_lines']} lines). "
             f"Fine-tune: AdamW (weight decay 0), constant lr, batch {res['batch']} lines, "
             f"{res['steps_per_epoch']} steps per epoch; data order 'slots' (each epoch one seeded permutation of "
             "the whole pool; a coalition keeps its own lines in each batch, and an empty batch is still a "
             "(zero-gradient) AdamW step); loss = summed token cross-entropy / a fixed constant (recorder "
             "`loss_reduction=\"sum\"`).")
    L.append("* Outputs: 20 samples (temperature 0.8, <= 40 characters) from each grid point's all-owner model, 4 "
             "prompted by the opening words of each owner's lines. `v_x(S) = log p_S(x|c) - log p_base(x|c)` in "
             "nats (continuation and end of line, exact).")
    L.append("* Gold: the 32 coalition fine-tunes of each (method, lr) (the 1-epoch model is the 4-epoch run's "
             "checkpoint: constant lr), `shapley.exact_from_utilities`. Fast path: one recorded all-owner fine-tune "
             f"(`proj_dim` {res['proj_dim']['full']} for the full fine-tune, exact per-sample gradients for LoRA), "
             "`build_embeddings`, `Attributor.scores(-log p, by=\"owner\")`; the additive game "
             "(`shapley.AdditiveGame.from_attributions`) gives the same owner values (asserted).")
    L.append("* Metrics per output, then averaged: Kendall tau of the 5 owner values, top owner agreement, L1 "
             "distance of the SRS shares (max 2), Pearson correlation of all values, RMS(fast) / RMS(exact).\n")
    L.append("## The grid\n")
    L.append("| method | lr | epochs (steps) | weights moved (rel.) | fast path | tau | top owner | share L1 | corr | "
             "RMS ratio | fast wall | gold fine-tuning |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        for key in ("empirical_fisher", "none", "loo-retrain"):
            mm = r["metrics"][key]
            wt = f"{r['times']['fast_total_s'][key]:.1f} s" if key in r["times"]["fast_total_s"] else "(gold)"
            rms = f"{mm['rms_ratio']:.2f}"
            L.append(f"| {r['method']} | {r['lr']:g} | {r['epochs']} ({r['steps']}) | {r['param_move_rel']:.1e} | "
                     f"{LABEL[key]} | {mm['tau_mean']:.2f} | {100 * mm['top_agree']:.0f}% | {mm['l1_mean']:.2f} | "
                     f"{mm['corr']:.2f} | {rms} | {wt} | {r['times']['gold_finetune_s']:.0f} s / 32 models |")
    L.append("")
    L.append("Weights moved = ||theta_all-owners - theta_start|| / ||theta_base|| over the trained parameters (for "
             "LoRA: the adapters' norm, relative to the base model's). Fast wall = recording the one fine-tune + "
             "building embeddings + the owner query. Gold = summed fine-tuning seconds of the 32 coalition models "
             "(the 1- and 4-epoch points share them; evaluation not included).\n")
    L.append("Fast path against retraining leave-one-owner-out (what first-order influence estimates directly), "
             "and how far the exact game is from additive:\n")
    L.append("| method | lr | epochs | tau vs LOO (eFisher) | top vs LOO | corr vs LOO | interaction sum|phi-LOO|/sum|phi| | "
             "recorded == gold model (max abs diff) |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        mv = r["metrics_vs_loo"]["empirical_fisher"]
        L.append(f"| {r['method']} | {r['lr']:g} | {r['epochs']} | {mv['tau_mean']:.2f} | {100 * mv['top_agree']:.0f}% | "
                 f"{mv['corr']:.2f} | {r['interaction']:.2f} | {r['recorded_vs_gold_max_abs_diff']:.1e} |")
    L.append("\n![grid](copyright_ft.png)\n")
    for r in res["rows"]:
        if (r["method"], r["lr"], r["epochs"]) != ("lora", 1e-3, 1):
            continue
        owners = res["owners"]
        mm = r["metrics"]["empirical_fisher"]
        L.append("### Per output: LoRA, lr 0.001, 1 epoch (fast path = embeddings, empirical Fisher)\n")
        L.append("| id | prompt owner | prompt + generated | exact top | fast top | tau | share L1 | phi of exact top |")
        L.append("|---|---|---|---|---|---|---|---|")
        for i, o in enumerate(r["outputs"]):
            phi, fa = np.array(o["phi"]), np.array(o["fast"])
            pe = np.clip(phi, 0, None) / max(np.clip(phi, 0, None).sum(), 1e-300)
            pf = np.clip(fa, 0, None) / max(np.clip(fa, 0, None).sum(), 1e-300)
            txt = (o["prompt"] + "\u2502" + o["text"]).replace("|", "/")
            L.append(f"| {o['id']} | {o['prompt_owner']} | `{txt}` | {owners[int(phi.argmax())]} | "
                     f"{owners[int(fa.argmax())]} | {mm['tau_per_output'][i]:.2f} | {np.abs(pe - pf).sum():.2f} | "
                     f"{phi.max():+.3f} |")
        L.append("\n(`\u2502` separates the prompt from the generated continuation.)\n")
    diag_p = HERE / "results" / "copyright_ft_diag.json"
    if diag_p.exists():
        dg = json.loads(diag_p.read_text())
        L.append("### The sketch and the regime, separated: `experiments/copyright_ft/diag.py`\n")
        L.append(f"Same outputs and exact values as the grid, only the fast path re-run with other sketch sizes "
                 f"(`PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python {dg['command']}`, {dg['total_s']:.0f} s):\n")
        L.append("| method | lr | epochs | trainable params | proj_dim | tau vs exact | top owner | corr | tau vs LOO | "
                 "fast wall |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        grid = {(r["method"], r["lr"], r["epochs"]): r for r in res["rows"]}
        items = [(d["method"], d["lr"], d["epochs"], d["proj_dim"], d["vs_exact"], d["vs_loo"], d["wall_s"])
                 for d in dg["rows"]]
        for (mth, lr, ep), r in grid.items():
            if any((mth, lr, ep) == it[:3] for it in items):
                items.append((mth, lr, ep, res["proj_dim"][mth], r["metrics"]["empirical_fisher"],
                              r["metrics_vs_loo"]["empirical_fisher"], r["times"]["fast_total_s"]["empirical_fisher"]))
        for mth, lr, ep, k, me, ml, w in sorted(items, key=lambda x: (x[0], x[1], x[2], x[3] or 10 ** 9)):
            npar = res["n_params"] if mth == "full" else res["n_lora_params"]
            L.append(f"| {mth} | {lr:g} | {ep} | {npar:,} | {k if k else 'exact'} | {me['tau_mean']:.2f} | "
                     f"{100 * me['top_agree']:.0f}% | {me['corr']:.2f} | {ml['tau_mean']:.2f} | {w:.1f} s |")
        L.append("")
    sp = res.get("split")
    if sp:
        L.append(f"## Splitting attack: {sp['owner']} as {sp['shells']} shells ({sp['method']}, lr {sp['lr']:g}, "
                 f"{sp['epochs']} epoch)\n")
        L.append(f"The exact game's most valuable owner ({sp['owner']}) splits its lines round-robin into "
                 f"{sp['shells']} shells; the 7-player game is retrained ({sp['train_s']:.0f} s of fine-tuning; "
                 "coalitions with all or none of the shells are the cached 5-owner models). Mean SRS share of "
                 f"{sp['owner']} over the 20 outputs:\n")
        L.append("| rule | share of the split owner |")
        L.append("|---|---|")
        for k, v in sp["share"].items():
            L.append(f"| {k} | {v:.3f} |")
        L.append("")
        L.append(f"Mean value (nats) of {sp['owner']}: " + ", ".join(f"{k} {v:+.4f}" for k, v in sp["value_target"].items())
                 + ". Other owners' mean shares (" + ", ".join(sp["others"]) + "): " +
                 "; ".join(f"{k} " + "/".join(f"{x:.3f}" for x in v) for k, v in sp["others_share"].items()) + ".\n")
        sc_p = HERE / "results" / "scratch_split.json"
        if sc_p.exists():
            sc = json.loads(sc_p.read_text())
            L.append(f"The same comparison on the earlier, from-scratch study's attack (its own code and outputs: "
                     f"`PYTHONPATH=. nice -n 10 .venv/bin/python {sc['command']}`, {sc['total_s']:.0f} s, "
                     f"{sc['models_trained_now']} models trained; outputs identical to the study's: "
                     f"{sc['outputs_identical_to_study']}), {sc['owner']} as {sc['shells']} shells:\n")
            L.append("| rule | fine-tuning regime (above) | from scratch (docs/results/copyright.md) |")
            L.append("|---|---|---|")
            for key, v in sp["share"].items():
                L.append(f"| {key} | {v:.3f} | {sc['share'][key]:.3f} |")
            L.append("\nMean value (nats) of the split owner from scratch: " +
                     ", ".join(f"{k} {v:+.3f}" for k, v in sc["value_target"].items()) + ".\n")
        L.append("SECTION_SPLIT\n")
    if many:
        t = many["times"]
        L.append("## 1,000 owners\n")
        L.append(f"Command: `PYTHONPATH=. HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python {many['command'].strip()}`: "
                 f"{t['total_s']:.0f} s wall. {many['works']} works (the five owners' categories, long lines cut into "
                 f"pieces of <= 62 characters) split among {many['owners']} synthetic owners ({many['owners_multi']} "
                 f"hold more than one work, at most {many['max_works']}); {many['method']} fine-tune, lr "
                 f"{many['lr']:g}, {many['epochs']} epoch ({many['steps']} steps); 20 outputs.\n")
        L.append("| path | what it gives | wall | per owner |")
        L.append("|---|---|---|---|")
        L.append(f"| fast: record + `build_embeddings` + `scores(by=\"owner\")` | every owner's additive-game value for "
                 f"every output | {t['fast_total_s']:.1f} s (record {t['record_s']:.1f}, build {t['build_s']:.1f}, "
                 f"query {t['query_s']:.1f}) | {t['fast_ms_per_owner']:.1f} ms |")
        per = 2 * many["samples_per_owner"] + 1
        L.append(f"| retraining Monte Carlo | {many['samples_per_owner']} size-stratified draws for "
                 f"{len(many['mc'])} owners (+ LOO) | {t['retrain_s']:.0f} s ({t['retrain_finetunes']} fine-tunes, "
                 f"{t['finetune_s_each']:.2f} s each) | {per * t['finetune_s_each']:.0f} s |")
        L.append("| exact Shapley | 2^1000 fine-tunes | - | - |\n")
        L.append("Monte Carlo on the retraining game (mean over the 20 outputs of each owner's value, nats; stderr = "
                 "mean per-output standard error):\n")
        L.append("| owner | works | chosen as | MC phi | MC stderr | retrain LOO | fast (additive) | corr(fast, LOO) over "
                 "outputs | corr(fast, MC phi) |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for nm, e in many["mc"].items():
            c1 = np.corrcoef(e["fast"], e["loo"])[0, 1]
            c2 = np.corrcoef(e["fast"], e["phi_mc"])[0, 1]
            L.append(f"| {nm} | {e['works']} | {e['chosen_as']} | {np.mean(e['phi_mc']):+.4f} | {np.mean(e['stderr']):.4f} "
                     f"| {np.mean(e['loo']):+.4f} | {np.mean(e['fast']):+.4f} | {c1:.2f} | {c2:.2f} |")
        fa = np.concatenate([e["fast"] for e in many["mc"].values()])
        lo = np.concatenate([e["loo"] for e in many["mc"].values()])
        L.append(f"\nPooled over these owners and outputs: corr(fast, retrain LOO) = {np.corrcoef(fa, lo)[0, 1]:.3f}, "
                 f"slope (least squares through 0) {float(fa @ lo / (fa @ fa)):.2f}.")
        s = many["statement"]
        L.append("")
        L.append(f"Royalty statement of the period (pool = 30% of $1.00 per output, `srs-v1`, share-then-sum, values "
                 f"from the fast path): {s['owners_paid']} owners paid, total {s['paid_total']} + unallocated "
                 f"{s['unallocated']}, reconciles: {s['reconciles']}. Top owners: " +
                 ", ".join(f"{o} {a}" for o, a in s["top"][:5]) + ". Reports: " +
                 ", ".join((f"[{k.upper()}](../../{v['path']})" if not v["path"].startswith("runs/") else
                            f"{k.upper()} (`{v['path']}`, not committed)") + f" ({v['bytes'] // 1024} KiB)"
                           for k, v in s["reports"].items())
                 + f"; ledger and reports took {t['ledger_and_reports_s']:.1f} s.\n")
        L.append("SECTION_MANY\n")
    text = "\n".join(L) + "\n"
    extra = HERE / "reading.md"
    if extra.exists():
        parts = {}
        cur = None
        for line in extra.read_text().splitlines():
            if line.startswith("<!-- ") and line.endswith(" -->"):
                cur = line[5:-4].strip()
                parts[cur] = []
            elif cur:
                parts[cur].append(line)
        for k, v in parts.items():
            text = text.replace(k + "\n", "\n".join(v).strip() + "\n")
    for k in ("SECTION_READING", "SECTION_SPLIT", "SECTION_MANY"):
        text = text.replace(k + "\n", "")
    (DOC / "copyright_ft.md").write_text(text)
    print(f"wrote {DOC / 'copyright_ft.md'}")


if __name__ == "__main__":
    sys.exit(main())
