"""Cost of an exact replay (``datavalue.replay_influence``) against the training run itself.

Models: an MLP (64-128-128-10, synthetic inputs, batch 32, float32) and a tiny GPT-2 built from a
transformers config (2 layers, n_embd 64, 2 heads, vocab 256, 32 tokens, batch 8, eager attention,
no dropout, float32; no downloads). Both train with AdamW for ``--steps`` steps, recorded with
``Recorder(..., proj_dim=64, checkpoint_every=8)``.

Wall time (same process, interleaved, median of ``--reps``): a plain training run of the same steps
(no recorder), then replays with one query and ``dots="jvp"``, one query and ``dots="reverse"``, and
four queries and ``dots="reverse"`` (after one warm-up replay). Peak memory: each phase once more in
a fresh subprocess, its peak RSS (``VmHWM``) minus that of a subprocess that only builds the model and
data, imports what a replay imports and reads a checkpoint. Writes
docs/results/replay.md. Run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/replay_cost.py [--steps 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import datavalue

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("train", "replay_jvp_m1", "replay_reverse_m1", "replay_reverse_m4")


def make(name: str, steps: int):
    """``(factory, batches(ids), loss_fn(model, batch), query(m) for m test points, data order)``."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        n, b = 512, 32
        X, Y = torch.randn(n + 8, 64, generator=g), torch.randint(0, 10, (n + 8,), generator=g)

        def factory():
            torch.manual_seed(1)
            return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))

        def loss_fn(model, batch):
            return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

        def query(m):
            return lambda model: F.cross_entropy(model(X[n : n + m]), Y[n : n + m], reduction="none")

        def batches(ids):
            ids = torch.as_tensor(ids)
            return X[ids], Y[ids]
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        n, b, L, V = 256, 8, 32, 256
        tokens = torch.randint(0, V, (n + 8, L), generator=g)

        def factory():
            torch.manual_seed(1)
            cfg = GPT2Config(vocab_size=V, n_positions=L, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", bos_token_id=0,
                             eos_token_id=0)
            return GPT2LMHeadModel(cfg)

        def per_example(model, x):
            logits = model(input_ids=x).logits[:, :-1]
            lt = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1), reduction="none")
            return lt.reshape(x.shape[0], -1).mean(1)

        def loss_fn(model, batch):
            return per_example(model, batch)

        def query(m):
            return lambda model: per_example(model, tokens[n : n + m])

        def batches(ids):
            return tokens[torch.as_tensor(ids)]

    order = [np.random.default_rng(s).permutation(n)[:b] for s in range(steps)]
    return factory, batches, loss_fn, query, order


def train(name: str, steps: int, path: str | None) -> float:
    """One training run (recorded when ``path`` is given); returns its wall time."""
    factory, batches, loss_fn, _, order = make(name, steps)
    model = factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rec = datavalue.Recorder(path, model, proj_dim=64, optimizer=opt, checkpoint_every=8) if path else None
    t0 = time.perf_counter()
    for ids in order:
        if rec is not None:
            with rec.step(sample_ids=ids):
                loss_fn(model, batches(ids)).mean().backward()
        else:
            loss_fn(model, batches(ids)).mean().backward()
        opt.step()
        opt.zero_grad()
    if rec is not None:
        rec.close()
    return time.perf_counter() - t0


def replay(name: str, steps: int, path: str, phase: str) -> float:
    factory, batches, loss_fn, query, _ = make(name, steps)
    m = 4 if phase.endswith("m4") else 1
    dots = "jvp" if "jvp" in phase else "reverse"
    t0 = time.perf_counter()
    datavalue.replay_influence(path, factory(), batches, query(m), loss_fn=loss_fn, dots=dots, write=False)
    return time.perf_counter() - t0


def run_phase(name: str, steps: int, path: str, phase: str) -> float:
    if phase == "baseline":  # the model, the data and every library a replay loads, no computation
        make(name, steps)[0]()
        import datavalue.query
        from datavalue.capture import read_checkpoint

        datavalue.query.ReplayResult  # noqa: B018 (loads pandas, the query kernels)
        read_checkpoint(path, 0)
        return 0.0
    if phase == "train":
        return train(name, steps, None)
    return replay(name, steps, path, phase)


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    seconds = run_phase(args.model, args.steps, args.run, args.phase)
    print(json.dumps({"seconds": seconds, "maxrss_mb": _vm_hwm_mb()}))


def _vm_hwm_mb() -> float:
    """This process's peak RSS (``VmHWM``; unlike ``ru_maxrss`` it is not inherited across ``exec``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mb(name: str, steps: int, path: str, phase: str, threads: int) -> float:
    cmd = [sys.executable, __file__, "--child", "--model", name, "--steps", str(steps), "--run", path,
           "--phase", phase, "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return float(res["maxrss_mb"])


def validate(steps: int) -> list[str]:
    """The GPT-2's sketched embeddings (empirical Fisher, Adam-aware, block-mean moments) scored
    against the replay as ground truth: Spearman per test point over occurrences (4 test points)."""
    import warnings

    from datavalue.testing import spearman_per_test

    factory, batches, loss_fn, query, order = make("gpt2", steps)
    out = []
    for proj in (256, 2048):
        path = os.path.join(tempfile.mkdtemp(), "v.zarr")
        model = factory()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        with datavalue.Recorder(path, model, proj_dim=proj, optimizer=opt, checkpoint_every=8) as rec:
            for ids in order:
                with rec.step(sample_ids=ids):
                    loss_fn(model, batches(ids)).mean().backward()
                opt.step()
                opt.zero_grad()
        truth = datavalue.replay_influence(path, factory(), batches, query(4), loss_fn=loss_fn, write=False).scores()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            datavalue.build_embeddings(path, "empirical_fisher", progress=False)
        est = datavalue.Attributor(path, model, progress=False).scores(query(4))
        rho = spearman_per_test(np.asarray(est, np.float64).T, truth.T)
        out.append(f"| {proj} | {rho:.3f} |")
        print(proj, rho)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="mlp,gpt2")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "replay.md"))
    ap.add_argument("--validate", action="store_true",
                    help="instead: score the GPT-2's sketched embeddings against the replay (prints a table)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    if args.validate:
        print("\n".join(["| proj_dim | Spearman vs replay |", "|---:|---:|", *validate(args.steps)]))
        return None
    rows = []
    tmp = tempfile.mkdtemp()
    for name in args.models.split(","):
        path = os.path.join(tmp, f"{name}.zarr")
        record_s = train(name, args.steps, path)
        times = {p: [] for p in PHASES}
        train(name, args.steps, None)  # warm-up: lazy imports and first-call costs
        replay(name, args.steps, path, "replay_jvp_m1")
        for _ in range(args.reps):  # interleaved
            for p in PHASES:
                times[p].append(run_phase(name, args.steps, path, p))
        base = peak_mb(name, args.steps, path, "baseline", args.threads)
        mem = {p: peak_mb(name, args.steps, path, p, args.threads) - base for p in PHASES}
        n_params = sum(p.numel() for p in make(name, args.steps)[0]().parameters())
        med = {p: statistics.median(v) for p, v in times.items()}
        rows.append((name, n_params, record_s, med, mem))
        print(name, n_params, {p: round(v, 3) for p, v in med.items()}, {p: round(v, 1) for p, v in mem.items()})
    write_report(args, rows)


def write_report(args: argparse.Namespace, rows) -> None:
    lines = [
        "# Replay cost against the training run",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.processor() or platform.machine()} (CPU, "
        f"{args.threads} torch thread(s), a machine shared with other jobs), torch {torch.__version__}, "
        f"{args.steps} AdamW steps, checkpoints every 8 steps, float32. Command: "
        f"`HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/replay_cost.py {shlex.join(sys.argv[1:])}`.",
        "",
        "Wall time: median of the interleaved repetitions; ratio = replay / plain training of the same steps. "
        "Memory: peak RSS of a fresh process running the phase, minus that of one that only builds the model and "
        "data and opens the run and a checkpoint (MB; allocator noise of tens of MB).",
        "",
        "| model | parameters | phase | seconds | x training | peak MB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, n_params, record_s, med, mem in rows:
        train_s = med["train"]
        lines.append(f"| {name} | {n_params:,} | recorded run (proj_dim 64, checkpoints) | {record_s:.2f} | "
                     f"{record_s / train_s:.1f} | |")
        for p in PHASES:
            lines.append(f"| {name} | {n_params:,} | {p} | {med[p]:.2f} | {med[p] / train_s:.1f} | {mem[p]:.0f} |")
    lines += [
        "",
        "Reading: a replay step is one forward and backward (the forward replay from the checkpoint), one double "
        "backward per query (the adjoint and its Hessian-vector product), and with `dots=\"jvp\"` one forward-mode "
        "pass per query; `dots=\"reverse\"` gets the per-example dot products from the same double backward. "
        "Memory holds one checkpoint interval of weights and optimizer states plus one step's double-backward graph.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
