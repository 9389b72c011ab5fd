"""Time per training step with and without the recorder (same process, interleaved).

Models: a 4-layer MLP (batch 128, 784-512-512-256-10) and a small GPT-2 built from a config
(2 layers, n_embd 128, vocab 2048, 64 tokens, batch 16); proj_dim 1024. Each repetition times a
block of plain steps and a block of recorded steps, alternating, and reports the median ratio.
Writes docs/results/capture.md. Run: ``.venv/bin/python benchmarks/capture_overhead.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import datavalue

ROOT = Path(__file__).resolve().parents[1]


DEVICE = "cpu"


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 10)).to(DEVICE)
    x, y = torch.randn(128, 784, device=DEVICE), torch.randint(0, 10, (128,), device=DEVICE)
    return "MLP 784-512-512-256-10, batch 128", model, (lambda m: F.cross_entropy(m(x), y)), 128


def gpt2_case():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=2048, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).to(DEVICE)
    ids = torch.randint(0, 2048, (16, 64), device=DEVICE)

    def loss(m):
        logits = m(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 2048), ids[:, 1:].reshape(-1))

    return "GPT-2 (2 layers, d=128, vocab 2048), 16 x 64 tokens", model, loss, 16


def time_steps(model, opt, loss_fn, n, rec=None, b=0, start=0):
    _sync()
    t0 = time.perf_counter()
    for i in range(n):
        if rec is None:
            loss_fn(model).backward()
        else:
            with rec.step(sample_ids=range((start + i) * b, (start + i + 1) * b)):
                loss_fn(model).backward()
        opt.step()
        opt.zero_grad()
    if rec is not None:
        rec.flush()
    _sync()
    return (time.perf_counter() - t0) / n


def measure(case, *, proj_dim, reps, steps, curvature=None):
    name, model, loss_fn, b = case
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=proj_dim, optimizer=opt, curvature=curvature)
        rec.close()  # hooks off while timing the plain steps; re-opened per block below
        time_steps(model, opt, loss_fn, 3)
        plain, recorded, start = [], [], 0
        for _ in range(reps):
            plain.append(time_steps(model, opt, loss_fn, steps))
            rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=proj_dim, optimizer=opt,
                                     curvature=curvature, resume=True)
            recorded.append(time_steps(model, opt, loss_fn, steps, rec, b, start))
            start += steps
            rec.close()
    ratios = [r / p for r, p in zip(recorded, plain)]
    return name, statistics.median(plain) * 1e3, statistics.median(recorded) * 1e3, statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "docs/results/capture.md"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    rows = []
    for case_fn, proj in ((mlp_case, 1024), (gpt2_case, 1024)):
        case = case_fn()
        rows.append(measure(case, proj_dim=proj, reps=args.reps, steps=args.steps))
        print(rows[-1])
    case = mlp_case()
    rows.append(measure(case, proj_dim=1024, reps=args.reps, steps=args.steps, curvature="fisher"))
    rows[-1] = (rows[-1][0] + ', curvature="fisher" (10 extra class backwards)',) + rows[-1][1:]
    print(rows[-1])
    lines = [
        "# Capture overhead",
        "",
        "`benchmarks/capture_overhead.py` (same process, plain and recorded blocks interleaved, "
        f"{args.reps} repetitions of {args.steps} steps, median). proj_dim 1024, float32 storage, background writer.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, device {DEVICE}"
        + (f" ({torch.cuda.get_device_name()})" if DEVICE.startswith("cuda") else "") + ".",
        "",
        "| model | plain ms/step | recorded ms/step | ratio |",
        "|---|---|---|---|",
    ]
    for name, p, r, ratio in rows:
        lines.append(f"| {name} | {p:.1f} | {r:.1f} | {ratio:.2f}x |")
    lines += ["", "Target: at most 1.3x on the MLP (default path, no Fisher pseudo-gradients)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
