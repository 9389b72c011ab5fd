"""What each upgrade of the build costs next to what it buys: curvature none / empirical_fisher /
fisher / hessian and blocks per layer / "auto", on one small real-data run per optimizer.

For each optimizer (plain SGD at lr 0.15, AdamW at lr 1e-2 with weight decay 0.01) the digits tanh
MLP 64-16-10 (sklearn's 8x8 digits, 1,210 parameters, exact gradients) is trained for 24 steps:

* without a recorder (the plain step), and with ``datavalue.Recorder`` recording the gradients only
  (what ``none`` and ``empirical_fisher`` need), the true-Fisher rows as well
  (``curvature="fisher"``: one more backward per step) and each step's exact Hessian
  (``curvature="hessian"``: ``k`` Hessian-vector products per step). Each is timed end to end
  (first step to ``close()``), the best of ``--repeats``; every recording's final weights are
  checked to equal the reference run's bit for bit (one trajectory);
* the ground truth is exact trajectory LOO of ``--removals`` single occurrences
  (``datavalue.testing.trajectory_loo``), 40 test points;
* every curvature is built per layer (``blocks="layer"``) and with the default (``blocks="auto"``),
  timed, with the peak of traced memory (``tracemalloc``; numpy's buffers are traced) and the
  operator-state estimate that ``"auto"`` compares with its cap; Spearman per test point, averaged.

Public API only. Run from the repo root (about 3 minutes on 2 cores):

    .venv/bin/python benchmarks/defaults_table.py

Writes docs/results/defaults.md (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time
import tracemalloc
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datavalue
from datavalue.embeddings import build_embeddings, build_metadata
from datavalue.store import open_array, open_run
from datavalue.testing import (
    AdamConfig,
    Batch,
    SGDConfig,
    spearman_per_test,
    train_reference,
    trajectory_loo,
)

ROOT = Path(__file__).resolve().parents[1]

#: the recording each curvature needs (``None``: gradients only)
RECORDING = {"none": None, "empirical_fisher": None, "fisher": "fisher", "hessian": "hessian"}
SETTINGS = {
    "SGD lr 0.15": dict(kind="sgd", lr=0.15, weight_decay=0.0),
    "AdamW lr 1e-2": dict(kind="adamw", lr=1e-2, weight_decay=0.01),
}


def digits(n_train: int = 256, n_test: int = 40, seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    X, Y = torch.tensor(x, dtype=torch.float64), torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    return X, Y, perm[:n_train], perm[n_train : n_train + n_test], g


def factory() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()


def ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(m(x), y, reduction="none")


def optimizer(setting: dict, model: nn.Module) -> torch.optim.Optimizer:
    if setting["kind"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=setting["lr"], weight_decay=setting["weight_decay"])
    return torch.optim.AdamW(model.parameters(), lr=setting["lr"], weight_decay=setting["weight_decay"])


def train(setting: dict, batches: list[Batch], path: Path | None, curvature: str | None):
    """The training loop a user writes (the reference's step: batch-mean loss, then opt.step()),
    with or without a Recorder. Returns (wall seconds, CPU seconds of the process, final state dict)."""
    model = factory()
    opt = optimizer(setting, model)
    rec = None
    if path is not None:
        rec = datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, curvature=curvature, overwrite=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        hess = (lambda b=b: ce(model, b.inputs, b.targets).mean()) if curvature == "hessian" else None
        ctx = rec.step(sample_ids=b.sample_ids, hessian_loss=hess) if rec is not None else nullcontext()
        with ctx:
            loss = ce(model, b.inputs, b.targets).sum() / len(b.sample_ids)
            loss.backward()
        opt.step()
    if rec is not None:
        rec.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, {k: v.detach().clone() for k, v in model.state_dict().items()}


def size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, setting: dict, tmp: Path, args) -> dict:
    X, Y, tr, te, g = digits()
    batches = []
    for _ in range(args.epochs):
        p = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(tr), args.batch):
            idx = p[i : i + args.batch]
            batches.append(Batch(idx.numpy(), X[idx], Y[idx]))
    T = len(batches)
    config = (SGDConfig(weight_decay=setting["weight_decay"]) if setting["kind"] == "sgd"
              else AdamConfig(kind="adamw", weight_decay=setting["weight_decay"]))
    t0 = time.perf_counter()
    ref = train_reference(factory, batches, np.full(T, setting["lr"]), ce, config=config)
    steps, ids = ref.occurrences()
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(len(ids), size=min(args.removals, len(ids)), replace=False))
    test_loss = lambda m: ce(m, X[te], Y[te])  # noqa: E731
    truth = trajectory_loo(ref, list(zip(steps[rows].tolist(), ids[rows].tolist(), strict=True)), test_loss)
    final = ref.final_model()
    with torch.no_grad():
        acc = float((final(X[te]).argmax(1) == Y[te]).double().mean())
    t_truth = time.perf_counter() - t0

    # recording cost: best of --repeats, interleaved so that load on the machine hits every variant alike
    kinds = {"plain": None, "gradients": None, "fisher": "fisher", "hessian": "hessian"}
    best = {k: np.inf for k in kinds}  # CPU seconds (all threads): steadier than wall time on a shared machine
    best_wall = {k: np.inf for k in kinds}
    paths = {k: tmp / f"{name.split()[0]}_{k}.zarr" for k in kinds if k != "plain"}
    for attempt in range(args.repeats):
        for kind, curv in kinds.items():
            if kind == "hessian" and attempt >= args.hessian_repeats:
                continue  # seconds per recording, where the cheap kinds take a fraction of one
            wall, cpu, state = train(setting, batches, paths.get(kind), curv)
            best[kind], best_wall[kind] = min(best[kind], cpu), min(best_wall[kind], wall)
            for key, v in state.items():
                if not torch.equal(v, ref.final_state[key]):
                    raise RuntimeError(f"{name}: the {kind} run left the reference trajectory at {key}")
    test_grads = datavalue.per_sample_gradients(final, test_loss, open_run(paths["gradients"]))
    disk = {k: size_on_disk(p) for k, p in paths.items()}  # the recordings alone, before any build

    builds = []
    for curv, rec_kind in RECORDING.items():
        path = paths["gradients" if rec_kind is None else rec_kind]
        for blocks in ("layer", "auto"):
            kw = {} if blocks == "auto" else {"blocks": blocks}  # "auto" is the default
            sec = np.inf
            for attempt in range(args.build_repeats):  # the first traces memory, the best time counts
                if attempt == 0:
                    tracemalloc.start()
                t1 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    info = build_embeddings(path, curv, progress=False, overwrite=True, **kw)
                sec = min(sec, time.perf_counter() - t1)
                if attempt == 0:
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
            E = np.asarray(open_array(path, info.array)[:])[rows]
            builds.append({
                "curvature": curv, "blocks": blocks, "spans": [b - a for a, b in info.blocks], "seconds": sec,
                "peak": peak, "estimate": build_metadata(path, curv)["choice"]["operator_bytes"],
                "spearman": spearman_per_test(E @ test_grads.T, truth), "choice": info.choice,
                "optimizer": info.optimizer,
            })
            print(f"{name}: {curv:16s} {blocks:5s} {builds[-1]['spearman']:.3f} {sec:6.2f}s", flush=True)
    return {
        "name": name, "setting": setting, "steps": T, "occurrences": len(ids), "accuracy": acc,
        "k": int(open_run(paths["gradients"]).proj_dim), "t_truth": t_truth, "record": best, "record_wall": best_wall,
        "disk": disk, "builds": builds,
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 1024:.0f} KiB"


def write_md(results: list[dict], args, seconds: float) -> str:
    lines = [
        "# Defaults: what each upgrade costs and what it buys",
        "",
        "Generated by `benchmarks/defaults_table.py`; do not edit by hand.",
        "",
        "Each row is one build of data value embeddings on one small real-data run; Spearman is against exact "
        "trajectory leave-one-out of single occurrences (`datavalue.testing.trajectory_loo`), per test point, "
        "averaged. *Record* is the whole recorded training (first step to `close()`) over the same loop without a "
        "recorder, in CPU time of the process (all threads; the best of several recordings; wall times in the Setup); "
        "*run on disk* is the recorded store; *build* is `build_embeddings` wall time; *operator state* "
        "is the estimate that `blocks=\"auto\"` compares with its 256 MiB cap; *peak traced* is the build's peak of "
        "`tracemalloc`-traced memory (numpy buffers included, the interpreter and libraries not).",
        "",
    ]
    for r in results:
        plain = r["record"]["plain"]
        lines += [
            f"## {r['name']}" + (f", weight decay {r['setting']['weight_decay']:g}" if r["setting"]["weight_decay"] else ""),
            "",
            f"{r['steps']} steps, {r['occurrences']} occurrences, k = {r['k']:,} (exact gradients), test accuracy "
            f"{r['accuracy']:.2f}; plain training {1e3 * plain / r['steps']:.2f} CPU ms/step. Builds model the optimizer as "
            f"`{r['builds'][0]['optimizer']}`.",
            "",
            "| curvature | blocks | record (CPU ms/step, x plain) | run on disk | build (s) | operators | operator state "
            "| peak traced | Spearman vs exact LOO |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for b in r["builds"]:
            kind = RECORDING[b["curvature"]] or "gradients"
            rec = r["record"][kind]
            blocks = "auto (default)" if b["blocks"] == "auto" else "per layer"
            spans = " / ".join(f"{w:,}" for w in b["spans"])
            vs = f"{rec / plain:.1f}x plain" + (
                f", {rec / r['record']['gradients']:.1f}x gradients only" if kind != "gradients" else "")
            lines.append(
                f"| {b['curvature']} | {blocks} | {1e3 * rec / r['steps']:.1f} ({vs}) | "
                f"{mib(r['disk'][kind])} | {b['seconds']:.2f} | {spans} | {mib(b['estimate'])} | {mib(b['peak'])} | "
                f"{b['spearman']:.3f} |"
            )
        lines.append("")
    lines += reading(results)
    walls = "; ".join(
        f"{r['name']}: " + ", ".join(f"{k} {1e3 * v / r['steps']:.1f}" for k, v in r["record_wall"].items())
        for r in results
    )
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    truth_times = ", ".join(f"{r['name']}: {r['t_truth']:.0f} s" for r in results)
    lines += [
        "## Setup",
        "",
        f"- Command: `{' '.join(['.venv/bin/python', 'benchmarks/defaults_table.py', *map(shlex.quote, sys.argv[1:])])}`",
        f"- Wall time: {seconds:.0f} s on {platform.machine()} ({os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}), torch {torch.__version__}, numpy {np.__version__}, "
        f"{datetime.date.today().isoformat()}.",
        "- Data: sklearn's 8x8 digits, pixels standardised; 256 training samples, 40 test points (seed 0); batch "
        f"{args.batch}, {args.epochs} epochs, batch-mean cross-entropy.",
        "- Model: tanh MLP 64-16-10 in float64 (blocks of 1,040 and 170 columns), the digits run of "
        "`tests/embeddings/_digits.py`.",
        f"- Ground truth: {args.removals} random single occurrences (seed {args.seed}), float64 replay from per-step "
        f"snapshots, denominator kept ({truth_times} with the reference training).",
        f"- Recording: `datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, curvature=..., "
        f"default float32 storage)`, best of {args.repeats} recordings per kind ({args.hessian_repeats} with the "
        "Hessian), interleaved with the plain loop. This model's step takes well under a millisecond, so the "
        "recorder's fixed per-step work (hooks, the store writer) weighs far more than on a real model "
        "(docs/results/capture.md: 1.1-1.6x on larger models); compare the kinds with each other. The true Fisher "
        "takes the exact expectation over the 10 classes (`fisher_max_classes`): 10 pseudo-gradient rows per "
        f"example, stored like gradients. Load average on the machine when the table was made: {load} (2 cores "
        "shared): CPU times are steadier than wall times there, and the recording ratios still moved by up to 2x "
        f"between runs of this script. Best wall ms/step: {walls}.",
        "- Builds: `build_embeddings(path, curvature, progress=False, overwrite=True)` with `blocks=\"layer\"` or "
        f"without `blocks=` (the default, `\"auto\"`), float64 compute, float32 storage; best of {args.build_repeats} "
        "builds, memory traced in the first.",
        "",
    ]
    return "\n".join(lines)


def reading(results: list[dict]) -> list[str]:
    out = ["## Reading", ""]
    for r in results:
        rho = {(b["curvature"], b["blocks"]): b["spearman"] for b in r["builds"]}
        sec = {(b["curvature"], b["blocks"]): b["seconds"] for b in r["builds"]}
        rec = r["record"]
        out.append(
            f"- **{r['name']}**: per layer, none {rho['none', 'layer']:.3f} -> empirical Fisher "
            f"{rho['empirical_fisher', 'layer']:.3f} (free: same recording) -> true Fisher "
            f"{rho['fisher', 'layer']:.3f} (recording {rec['fisher'] / rec['gradients']:.1f}x the gradients-only "
            f"recording, 10 pseudo-gradient rows per example) -> exact Hessian {rho['hessian', 'layer']:.3f} (recording "
            f"{rec['hessian'] / rec['gradients']:.1f}x). The default blocks (`\"auto\"`, one operator over all "
            f"{r['k']:,} columns for the true Fisher and the Hessian) move the true Fisher to "
            f"{rho['fisher', 'auto']:.3f} and the Hessian to {rho['hessian', 'auto']:.3f}, at "
            f"{sec['fisher', 'auto'] / sec['fisher', 'layer']:.1f}x and "
            f"{sec['hessian', 'auto'] / sec['hessian', 'layer']:.1f}x the per-layer build time."
        )
    out += [
        "- `\"auto\"` changes nothing for `none` and `empirical_fisher` (it keeps them per layer: the empirical Fisher "
        "measured better per layer, docs/results/loo_fidelity.md), so their two rows agree.",
        "- The operator-state estimate is what `\"auto\"` caps at 256 MiB (one operator over at most 5,792 columns in "
        "float64 for SGD, half with momentum, a third for Adam); above the cap, or when a sketch keeps under a quarter "
        "of the parameters' dimensions, `\"auto\"` falls back to per-layer operators and says so in its INFO log line "
        "and in `datavalue info`.",
        "",
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs/results/defaults.md"))
    ap.add_argument("--removals", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7, help="recordings per kind (the best counts)")
    ap.add_argument("--hessian-repeats", type=int, default=2, help="recordings with curvature='hessian'")
    ap.add_argument("--build-repeats", type=int, default=2, help="builds per row (the best counts)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (the builds' BLAS keeps its own)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(n, SETTINGS[n], Path(tmp), args) for n in args.settings]
    text = write_md(results, args, time.perf_counter() - t0)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
