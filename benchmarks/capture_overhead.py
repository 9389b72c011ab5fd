"""Time per training step with and without the recorder (same process, interleaved).

Models: a 4-layer MLP (batch 128, 784-512-512-256-10) and a small GPT-2 built from a config
(2 layers, n_embd 128, vocab 2048, 64 tokens, batch 16), with AdamW (passed to the Recorder, so the
Adam moments are stored: issue 20's setting) and SGD; proj_dim 1024, and 4096 for GPT-2. Each
repetition times a block of plain steps and a block of recorded steps, alternating, and reports the
median ratio. Prints a markdown table with the load average (``--out FILE`` also writes it); run it
under ``nice -n 10`` on a shared machine: ``nice -n 10 .venv/bin/python benchmarks/capture_overhead.py``.

``--sweep`` (issue #9) instead times every model in {MLP, CNN, GPT-2} x proj_dim {256, 1024, 4096} x
storage {float32, float16} (12 steps per block, 5 repetitions unless told) and writes a table to
docs/results/capture_sweep.md: ``.venv/bin/python benchmarks/capture_overhead.py --sweep``.
Restrict it with ``--models``, ``--projs`` and ``--storages``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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


def cnn_case():
    """A small conv net on 1x28x28 inputs (batch 128, random data, CE loss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Linear(128, 10)).to(DEVICE)
    x, y = torch.randn(128, 1, 28, 28, device=DEVICE), torch.randint(0, 10, (128,), device=DEVICE)
    return "CNN conv32-conv64-pool-fc128-10, 1x28x28, batch 128", model, (lambda m: F.cross_entropy(m(x), y)), 128


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


#: seconds of process CPU time (all threads: torch's, the writer's) of the last ``time_steps`` block, per step
LAST_CPU = [0.0]


def time_steps(model, opt, loss_fn, n, rec=None, b=0, start=0):
    """Wall seconds per step of ``n`` steps (recorded into ``rec`` when given, flushed inside the timing);
    the same block's process CPU seconds per step go to ``LAST_CPU[0]``."""
    _sync()
    c0 = time.process_time()
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
    wall = (time.perf_counter() - t0) / n
    LAST_CPU[0] = (time.process_time() - c0) / n
    return wall


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    """``"sgd"`` or ``"adamw"`` (passed to the Recorder too, so AdamW runs store the Adam moments)."""
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=1e-3)


def interleaved(case, path: str, *, proj_dim, reps: int, steps: int, curvature: str | None = None,
                storage_dtype: str = "float32", optimizer: str = "sgd", cpu: list | None = None,
                **rec_kw) -> tuple[list[float], list[float], int]:
    """Alternate blocks of plain and recorded steps, recording into ``path``.

    Each recorded block ends with ``rec.flush()`` inside its timing, so the background writer's
    work is charged to the recorded steps. Returns the seconds per step of each plain block and
    each recorded block, and the stored k. ``cpu``: a list that receives ``(plain, recorded)``
    process CPU seconds per step of each repetition. ``rec_kw``: more ``Recorder`` options
    (``fisher_max_classes``, ``precondition``, ...).
    """
    _, model, loss_fn, b = case
    # plain steps train a copy (made before any hook is attached): a resumed recorder refuses weights that
    # trained outside the run (datavalue.capture._resume), and the copy does the same work
    pmodel = copy.deepcopy(model)
    popt = make_optimizer(optimizer, pmodel)
    opt = make_optimizer(optimizer, model)
    kw = dict(proj_dim=proj_dim, optimizer=opt, curvature=curvature, storage_dtype=storage_dtype, **rec_kw)
    rec = datavalue.Recorder(path, model, **kw)
    k = rec.proj_dim
    rec.close()  # hooks off while timing the plain steps; re-opened per block below
    time_steps(pmodel, popt, loss_fn, 3)
    plain, recorded, start = [], [], 0
    for _ in range(reps):
        plain.append(time_steps(pmodel, popt, loss_fn, steps))
        cpu_plain = LAST_CPU[0]
        rec = datavalue.Recorder(path, model, resume=True, **kw)
        recorded.append(time_steps(model, opt, loss_fn, steps, rec, b, start))
        if cpu is not None:
            cpu.append((cpu_plain, LAST_CPU[0]))
        start += steps
        rec.close()
    return plain, recorded, k


def medians(plain: list[float], recorded: list[float]) -> tuple[float, float, float]:
    """Median plain and recorded ms/step, and the median of the per-repetition ratios."""
    ratios = [r / p for r, p in zip(recorded, plain)]
    return statistics.median(plain) * 1e3, statistics.median(recorded) * 1e3, statistics.median(ratios)


def measure(case, *, proj_dim, reps, steps, curvature=None, optimizer="sgd", **rec_kw):
    with tempfile.TemporaryDirectory() as d:
        plain, recorded, _ = interleaved(case, os.path.join(d, "r.zarr"), proj_dim=proj_dim, reps=reps, steps=steps,
                                         curvature=curvature, optimizer=optimizer, **rec_kw)
    return (case[0], optimizer, proj_dim, *medians(plain, recorded))


def mlp_classes_case(classes: int):
    """The harness's MLP with ``classes`` outputs (the exact Fisher expectation enumerates them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, classes)).to(DEVICE)
    x, y = torch.randn(128, 784, device=DEVICE), torch.randint(0, classes, (128,), device=DEVICE)
    return f"MLP 784-512-512-256-{classes}, batch 128", model, (lambda m: F.cross_entropy(m(x), y)), 128


def tiny_case(classes: int = 10):
    """A tiny MLP (20-64-classes, batch 32): a model where every pass is mostly Python."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, classes)).to(DEVICE)
    x, y = torch.randn(32, 20, device=DEVICE), torch.randint(0, classes, (32,), device=DEVICE)
    return f"MLP 20-64-{classes}, batch 32", model, (lambda m: F.cross_entropy(m(x), y)), 32


def small_case(classes: int = 10):
    """The poison study's MLP (784-64-10, batch 32; experiments/poison): a small model with 10 classes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, classes)).to(DEVICE)
    x, y = torch.randn(32, 784, device=DEVICE), torch.randint(0, classes, (32,), device=DEVICE)
    return f"MLP 784-64-{classes}, batch 32", model, (lambda m: F.cross_entropy(m(x), y)), 32


def per_layer_budget(model: nn.Module, k: int = 64 * 64) -> dict[str, int]:
    """LoGra-like budgets: every block gets ``k`` columns (64 x 64 per weight matrix; capped at its size)."""
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=None, background=False)
        names = [b["name"] for b in rec.blocks]
        rec.close()
    return {n: k for n in names}


#: Issue 20's extra rows: name -> (what, how). ``how`` is a dict: ``case`` (a case function and its
#: arguments), ``proj_dim``, ``optimizer``, ``rec`` (more Recorder options); or ``driver``
#: ("trainer"/"ddp", benchmarks/overhead_rows.py). Rows are GPT-2 with AdamW passed unless they say.
EXTRA_ROWS: dict[str, dict] = {
    "fisher-sampled": dict(case=(mlp_case,), proj_dim=1024, optimizer="adamw",
                           rec=dict(curvature="fisher", fisher_max_classes=1, fisher_samples=1),
                           what='curvature="fisher", sampled labels (1 per example)'),
    "fisher-exact": dict(case=(mlp_case,), proj_dim=1024, optimizer="adamw",
                         rec=dict(curvature="fisher", fisher_max_classes=16),
                         what='curvature="fisher", exact expectation over the 10 classes'),
    "fisher-exact-c2": dict(case=(mlp_classes_case, 2), proj_dim=1024, optimizer="adamw",
                            rec=dict(curvature="fisher", fisher_max_classes=16),
                            what='curvature="fisher", exact expectation over 2 classes'),
    "fisher-exact-c4": dict(case=(mlp_classes_case, 4), proj_dim=1024, optimizer="adamw",
                            rec=dict(curvature="fisher", fisher_max_classes=16),
                            what='curvature="fisher", exact expectation over 4 classes'),
    "fisher-default": dict(case=(mlp_case,), proj_dim=1024, optimizer="adamw", rec=dict(curvature="fisher"),
                           what='curvature="fisher", default fisher_max_classes'),
    "fisher-tiny-none": dict(case=(tiny_case,), proj_dim=1024, optimizer="adamw", rec=dict(),
                             what="no curvature (the tiny model's baseline)"),
    "fisher-tiny-sampled": dict(case=(tiny_case,), proj_dim=1024, optimizer="adamw",
                                rec=dict(curvature="fisher", fisher_max_classes=1),
                                what='curvature="fisher", sampled labels'),
    "fisher-tiny-exact": dict(case=(tiny_case,), proj_dim=1024, optimizer="adamw",
                              rec=dict(curvature="fisher", fisher_max_classes=16),
                              what='curvature="fisher", exact expectation over the 10 classes'),
    "fisher-small-none": dict(case=(small_case,), proj_dim=1024, optimizer="adamw", rec=dict(),
                              what="no curvature (the small model's baseline)"),
    "fisher-small-sampled": dict(case=(small_case,), proj_dim=1024, optimizer="adamw",
                                 rec=dict(curvature="fisher", fisher_max_classes=1),
                                 what='curvature="fisher", sampled labels'),
    "fisher-small-exact": dict(case=(small_case,), proj_dim=1024, optimizer="adamw",
                               rec=dict(curvature="fisher", fisher_max_classes=16),
                               what='curvature="fisher", exact expectation over the 10 classes'),
    "mlp-none": dict(case=(mlp_case,), proj_dim=1024, optimizer="adamw", rec=dict(),
                     what="no curvature (the MLP's baseline)"),
    "gpt2-1024": dict(case=(gpt2_case,), proj_dim=1024, optimizer="adamw", rec=dict(),
                      what="plain loop, default recorder (baseline)"),
    "gpt2-4096": dict(case=(gpt2_case,), proj_dim=4096, optimizer="adamw", rec=dict(),
                      what="plain loop, default recorder (baseline)"),
    "fisher-gpt2": dict(case=(gpt2_case,), proj_dim=1024, optimizer="adamw", rec=dict(curvature="fisher"),
                        what='curvature="fisher" (sequence output: one sampled label per position)'),
    "fisher-gpt2-icdf": dict(case=(gpt2_case,), proj_dim=1024, optimizer="adamw", rec=dict(curvature="fisher"),
                             what_if="icdf", what='curvature="fisher" (sequence output), what-if: labels drawn by '
                             "inverse CDF instead of torch.multinomial"),
    "whiten-1024": dict(case=(gpt2_case,), proj_dim=1024, optimizer="adamw", rec=dict(precondition="adam"),
                        what='precondition="adam" (per-sample gradients whitened, then sketched)'),
    "whiten-4096": dict(case=(gpt2_case,), proj_dim=4096, optimizer="adamw", rec=dict(precondition="adam"),
                        what='precondition="adam" (per-sample gradients whitened, then sketched)'),
    "logra": dict(case=(gpt2_case,), proj_dim="per-layer", optimizer="adamw", rec=dict(),
                  what="per-layer budgets, 64 x 64 = 4,096 per block (LoGra's)"),
    "k16384": dict(case=(gpt2_case,), proj_dim=16384, optimizer="adamw", rec=dict(),
                   what="proj_dim 16,384 total"),
    "trainer-1024": dict(driver="trainer", proj_dim=1024, what="transformers.Trainer + DataValueCallback"),
    "trainer-4096": dict(driver="trainer", proj_dim=4096, what="transformers.Trainer + DataValueCallback"),
    "ddp-1024": dict(driver="ddp", proj_dim=1024, what="DDP, gloo, 2 ranks x 1 thread, 8 examples per rank"),
    "ddp-4096": dict(driver="ddp", proj_dim=4096, what="DDP, gloo, 2 ranks x 1 thread, 8 examples per rank"),
}


def icdf_multinomial(probs, num_samples, replacement=False, *, generator=None, out=None):
    """What-if for the Fisher sampler: one label per row by inverse CDF (a cumsum, one uniform per row
    and a binary search: O(C) per row) instead of ``torch.multinomial``'s exponential draw per class.
    Same distribution; another random stream, so other labels than the recorder draws today."""
    if num_samples != 1 or out is not None:
        return _MULTINOMIAL(probs, num_samples, replacement, generator=generator)
    c = probs.cumsum(-1)
    u = torch.rand(c.shape[:-1] + (1,), generator=generator, dtype=c.dtype) * c[..., -1:]
    return torch.searchsorted(c, u).clamp_max(probs.shape[-1] - 1)


_MULTINOMIAL = torch.multinomial


def extra_row(name: str, *, reps: int, steps: int) -> dict:
    """Measure one of :data:`EXTRA_ROWS`; returns a dict with the medians, ratios and load averages."""
    spec = EXTRA_ROWS[name]
    if spec.get("what_if") == "icdf":
        torch.multinomial = icdf_multinomial
        try:
            return extra_row(name.replace("-icdf", ""), reps=reps, steps=steps) | dict(name=name, what=spec["what"])
        finally:
            torch.multinomial = _MULTINOMIAL
    load0 = os.getloadavg()[0]
    if spec.get("driver"):
        import overhead_rows

        if spec["driver"] == "trainer":
            res = overhead_rows.trainer_row(spec["proj_dim"], reps=reps, steps=steps)
            model = "GPT-2 (2 layers, d=128, vocab 2048), 16 x 64 tokens"
        else:
            res = overhead_rows.ddp_row(spec["proj_dim"], reps=reps, steps=steps)
            model = "GPT-2 (2 layers, d=128, vocab 2048), 2 x 8 x 64 tokens"
        opt = "adamw"
    else:
        fn, *a = spec["case"]
        case = fn(*a)
        model, opt = case[0], spec["optimizer"]
        proj = per_layer_budget(case[1]) if spec["proj_dim"] == "per-layer" else spec["proj_dim"]
        cpu: list = []
        with tempfile.TemporaryDirectory() as d:
            plain, recorded, k = interleaved(case, os.path.join(d, "r.zarr"), proj_dim=proj, reps=reps, steps=steps,
                                             optimizer=opt, cpu=cpu, **spec["rec"])
        import overhead_rows

        res = dict(overhead_rows.summarise(plain, recorded, cpu), k=k)
    return dict(res, name=name, model=model, what=spec["what"], optimizer=opt, proj_dim=spec["proj_dim"],
                load=(load0, os.getloadavg()[0]))


def profile_row(name: str, *, steps: int, top: int = 25) -> str:
    """``steps`` recorded steps of a plain-loop row of :data:`EXTRA_ROWS` under ``torch.profiler``
    (after 3 recorded warm-up steps): the operators and ``record_function`` ranges by self CPU time,
    and the ``datavalue`` Python functions by total time (cProfile). A DDP row: cProfile inside each
    rank over 2 recorded blocks of ``steps`` steps (``datavalue`` and ``torch.distributed`` functions)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    spec = EXTRA_ROWS[name]
    if spec.get("driver") == "ddp":  # cProfile inside each rank, over its recorded blocks
        import overhead_rows

        res = overhead_rows.ddp_row(spec["proj_dim"], reps=2, steps=steps, profile=True)
        return "\n".join(f"### rank {r}\n{text}" for r, text in enumerate(res["profiles"]))
    fn, *a = spec["case"]
    _, model, loss_fn, b = fn(*a)
    opt = make_optimizer(spec["optimizer"], model)
    proj = per_layer_budget(model) if spec["proj_dim"] == "per-layer" else spec["proj_dim"]
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=proj, optimizer=opt, **spec["rec"])
        time_steps(model, opt, loss_fn, 3, rec, b, 0)
        pr = cProfile.Profile()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pr.enable()
            time_steps(model, opt, loss_fn, steps, rec, b, 3)
            pr.disable()
        rec.close()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("cumulative").print_stats("datavalue", top)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top) + "\n" + out.getvalue()


def extra_table(rows: list[dict], *, reps: int, steps: int) -> list[str]:
    lines = [
        f"Command: `{command_line()}`",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, device {DEVICE}.",
        f"{reps} repetitions of {steps} steps, plain and recorded blocks interleaved; ms/step: medians; ratios: medians "
        "of the per-repetition ratios, of wall-clock time and of process CPU time (every thread of the process; "
        "DDP: each rank's process).",
        "",
        "| row | model | mode | proj_dim (stored k) | plain ms/step | recorded ms/step | ratio (wall) "
        "| ratio (CPU) | load 1-min start -> end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        proj = "64 x 64 per block" if x["proj_dim"] == "per-layer" else x["proj_dim"]
        lines.append(f"| {x['name']} | {x['model']} | {x['what']} | {proj} ({x['k']}) | {x['plain_ms']:.1f} "
                     f"| {x['recorded_ms']:.1f} | {x['ratio']:.2f}x | {x['cpu_ratio']:.2f}x "
                     f"| {x['load'][0]:.2f} -> {x['load'][1]:.2f} |")
        for r, y in enumerate(x.get("ranks", [])):
            lines.append(f"| {x['name']} rank {r} | | | | {y['plain_ms']:.1f} | {y['recorded_ms']:.1f} "
                         f"| {y['ratio']:.2f}x | {y['cpu_ratio']:.2f}x | |")
    return lines


#: The main table: (case, proj_dim, optimizer), issue 20's goals first.
MAIN_ROWS = ((gpt2_case, 1024, "adamw"), (gpt2_case, 4096, "adamw"), (mlp_case, 1024, "adamw"),
             (gpt2_case, 1024, "sgd"), (mlp_case, 1024, "sgd"))


# ---------------------------------------------------------------------------------------- sweep
SWEEP_CASES: dict[str, Callable[[], tuple]] = {"mlp": mlp_case, "cnn": cnn_case, "gpt2": gpt2_case}
SWEEP_PROJS = (256, 1024, 4096)
SWEEP_STORAGES = ("float32", "float16")
#: bytes per stored row besides the gradient (sample_id int64, weight float64, flags uint8) and per
#: step (lr, epoch, grad_scale, momentum, weight_decay, step_ptr: 8 bytes each); see docs/store-format.md
ROW_EXTRA_BYTES, STEP_EXTRA_BYTES = 8 + 8 + 1, 6 * 8


def dir_bytes(path: str | Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def sweep_row(model: str, proj_dim: int, storage: str, *, reps: int, steps: int) -> dict:
    """Time one (model, proj_dim, storage) configuration on a fresh model in a temporary run."""
    case = SWEEP_CASES[model]()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.zarr")
        plain, recorded, k = interleaved(case, path, proj_dim=proj_dim, reps=reps, steps=steps, storage_dtype=storage)
        disk = dir_bytes(path) / (reps * steps)
    p, r, ratio = medians(plain, recorded)
    payload = case[3] * (k * torch.finfo(getattr(torch, storage)).bits // 8 + ROW_EXTRA_BYTES) + STEP_EXTRA_BYTES
    return dict(model=model, name=case[0], proj_dim=proj_dim, storage=storage, plain=p, recorded=r, ratio=ratio, k=k,
                payload=payload, disk=disk)


def command_line() -> str:
    """The command this process was started with, the interpreter relative to the repo when inside it."""
    exe = os.path.relpath(sys.executable, ROOT)
    return shlex.join([sys.executable if exe.startswith("..") else exe, *sys.argv])


def sweep_table(rows: list[dict], *, reps: int, steps: int) -> list[str]:
    """The markdown report of a sweep: header (command, date, machine), table, notes."""
    lines = [
        "# Capture overhead sweep (issue #9)",
        "",
        f"Command: `{command_line()}`",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, device {DEVICE}"
        + (f" ({torch.cuda.get_device_name()})" if DEVICE.startswith("cuda") else "") + ".",
        "",
        f"Same process, plain and recorded blocks interleaved, {reps} repetitions of {steps} steps, median; "
        "SGD, background writer, no curvature. Ratio: median of the per-repetition ratios.",
        "",
        "| model | proj_dim | storage | plain ms/step | recorded ms/step | ratio | stored k "
        "| payload KiB/step | on disk KiB/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(f"| {x['model']} | {x['proj_dim']} | {x['storage']} | {x['plain']:.1f} | {x['recorded']:.1f} "
                     f"| {x['ratio']:.2f}x | {x['k']} | {x['payload'] / 1024:.1f} | {x['disk'] / 1024:.1f} |")
    lines += ["", "Models:"]
    lines += [f"- {m}: {n}" for m, n in dict((x["model"], x["name"]) for x in rows).items()]
    lines += [
        "",
        "Stored k: gradient columns actually stored per row (proj_dim split over the layers). Payload: rows per step x "
        f"(k x itemsize + {ROW_EXTRA_BYTES} B) + {STEP_EXTRA_BYTES} B per step. On disk: run directory size / steps "
        "recorded; it includes metadata and the zero-padded last chunk (max(64, 4 MiB / (4 k)) rows per chunk, "
        "so about 4 MiB in float32, 2 MiB in float16), so it exceeds the payload on short runs.",
    ]
    return lines


def sweep(args: argparse.Namespace) -> None:
    """Run the model x proj_dim x storage grid and write the table to ``args.sweep_out``."""
    rows = []
    for model in args.models:
        for proj in args.projs:
            for storage in args.storages:
                rows.append(sweep_row(model, proj, storage, reps=args.reps, steps=args.steps))
                x = rows[-1]
                print(f"{model} proj_dim={proj} {storage}: plain {x['plain']:.1f} ms, recorded {x['recorded']:.1f} ms, "
                      f"ratio {x['ratio']:.2f}x, k={x['k']}", flush=True)
    lines = sweep_table(rows, reps=args.reps, steps=args.steps)
    Path(args.sweep_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.sweep_out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 7; 5 with --sweep)")
    ap.add_argument("--steps", type=int, default=None, help="steps per block (default 20; 12 with --sweep)")
    ap.add_argument("--out", default="", help="also write the table to this file (docs/results/capture.md is "
                    "edited by hand: it holds the GPU and Trainer tables too)")
    ap.add_argument("--rows", nargs="+", type=int, default=None,
                    help="indices into MAIN_ROWS to run (default all): 0 GPT-2 AdamW 1024, 1 GPT-2 AdamW 4096, "
                         "2 MLP AdamW, 3 GPT-2 SGD, 4 MLP SGD")
    ap.add_argument("--no-fisher", dest="fisher", action="store_false", help='skip the curvature="fisher" row')
    ap.add_argument("--extra", nargs="+", choices=list(EXTRA_ROWS), default=None,
                    help="issue 20's other rows instead of the main table (fisher, whitening, per-layer budgets, "
                         "Trainer, DDP; see EXTRA_ROWS)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="with --extra: profile STEPS recorded steps of each (plain-loop) row instead of timing it")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--sweep", action="store_true", help="model x proj_dim x storage grid (issue #9)")
    ap.add_argument("--models", nargs="+", choices=list(SWEEP_CASES), default=list(SWEEP_CASES))
    ap.add_argument("--projs", nargs="+", type=int, default=list(SWEEP_PROJS))
    ap.add_argument("--storages", nargs="+", choices=list(SWEEP_STORAGES), default=list(SWEEP_STORAGES))
    ap.add_argument("--sweep-out", default=str(ROOT / "docs/results/capture_sweep.md"))
    args = ap.parse_args()
    args.reps = args.reps if args.reps is not None else (5 if args.sweep else 7)
    args.steps = args.steps if args.steps is not None else (12 if args.sweep else 20)
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    if args.sweep:
        sweep(args)
        return
    if args.extra and args.profile:
        for name in args.extra:
            print(f"## {name}: {args.profile} recorded steps under torch.profiler\n{profile_row(name, steps=args.profile)}")
        return
    if args.extra:
        rows = []
        for name in args.extra:
            rows.append(extra_row(name, reps=args.reps, steps=args.steps))
            x = rows[-1]
            print(f"{name}: plain {x['plain_ms']:.1f} ms, recorded {x['recorded_ms']:.1f} ms, ratio {x['ratio']:.2f}x "
                  f"(CPU {x['cpu_ratio']:.2f}x), k={x['k']}, load {x['load'][0]:.2f} -> {x['load'][1]:.2f}, "
                  f"per-rep {' '.join(f'{r:.2f}' for r in x.get('ratios', []))}", flush=True)
        lines = extra_table(rows, reps=args.reps, steps=args.steps)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    load0 = os.getloadavg()
    rows = []
    for i, (case_fn, proj, optimizer) in enumerate(MAIN_ROWS):
        if args.rows and i not in args.rows:
            continue
        case = case_fn()
        rows.append(measure(case, proj_dim=proj, reps=args.reps, steps=args.steps, optimizer=optimizer))
        print(rows[-1], flush=True)
    if args.fisher:
        case = mlp_case()
        # the exact expectation, as this row always measured (the default samples above 131,072 parameters)
        rows.append(measure(case, proj_dim=1024, reps=args.reps, steps=args.steps, curvature="fisher",
                            fisher_max_classes=16))
        rows[-1] = (rows[-1][0] + ', curvature="fisher" (10 extra class backwards)',) + rows[-1][1:]
        print(rows[-1], flush=True)
    load1 = os.getloadavg()
    lines = [
        f"Command: `{command_line()}`",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; load average (1, 5, 15 min) "
        f"{' '.join(f'{x:.2f}' for x in load0)} at the start, {' '.join(f'{x:.2f}' for x in load1)} at the end.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
        f"torch {torch.__version__}, device {DEVICE}"
        + (f" ({torch.cuda.get_device_name()})" if DEVICE.startswith("cuda") else "") + ".",
        f"Same process, plain and recorded blocks interleaved, {args.reps} repetitions of {args.steps} steps; "
        "ms/step: medians; ratio: median of the per-repetition ratios. Float32 storage, background writer "
        "(flushed at the end of every recorded block, inside its timing); the optimizer is passed to the "
        "Recorder (AdamW: the Adam moments are stored every step).",
        "",
        "| model | optimizer | proj_dim | plain ms/step | recorded ms/step | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, optimizer, proj, p, r, ratio in rows:
        lines.append(f"| {name} | {optimizer} | {proj} | {p:.1f} | {r:.1f} | {ratio:.2f}x |")
    lines += ["", "Goals (issue 20): GPT-2 at most 1.15x on CPU (AdamW, optimizer passed, proj_dim 1024 and 4096); "
              "MLP at most 1.5x."]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
