"""Where a recorded training step spends its time beyond the plain step (issue 20).

Three views of the same cases as ``benchmarks/capture_overhead.py`` (``--model mlp|gpt2``,
``--optimizer sgd|adamw``, passed to the ``Recorder`` so that AdamW runs store the Adam moments):

- ``--mode breakdown`` (default): wall-clock timers around each piece of the recorder, in ms per
  step, beside a plain step timed in the same process (blocks interleaved, median):
  forward hooks, the gradient hooks (per-layer rules: the sketch GEMMs), ``assemble``, the step's
  commit split into the optimizer's fields (``step_fields``: the Adam-moment bookkeeping) and the
  step pipeline (``StepSink.submit``: host copy, finiteness checks, queueing), and the background
  writer's own time (``RunWriter._write``, on its thread: its share of the GIL is what it costs the
  training thread).
- ``--mode cprofile``: the top functions of the recorded steps (cProfile; inflates Python costs).
- ``--mode torch``: the torch profiler's operator table of the recorded steps.

Run: ``nice -n 10 .venv/bin/python benchmarks/profile_capture.py --model gpt2 --optimizer adamw --proj 1024``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import cProfile
import functools
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import capture_overhead as co  # noqa: E402

import datavalue  # noqa: E402
from datavalue.capture import _engine, _optim, _pipeline  # noqa: E402
from datavalue.capture import recorder as _recorder  # noqa: E402
from datavalue.store import _writer  # noqa: E402

TIMES: collections.defaultdict[str, float] = collections.defaultdict(float)
#: ``--clock wall`` (default) or ``cpu``: the calling thread's CPU time (``time.thread_time``), which a
#: busy shared machine inflates far less than wall time (use it with ``--threads 1``: torch's other
#: threads' work is not counted; the writer's line is its own thread's CPU time).
CLOCK = time.perf_counter
_DEPTH = threading.local()


def _timed(name: str, fn):
    """Wrap ``fn`` so that its wall time (outermost call only, per thread) adds to ``TIMES[name]``."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        depth = getattr(_DEPTH, name, 0)
        setattr(_DEPTH, name, depth + 1)
        t = CLOCK()
        try:
            return fn(*a, **kw)
        finally:
            setattr(_DEPTH, name, depth)
            if depth == 0:
                TIMES[name] += CLOCK() - t

    return wrapper


def instrument() -> None:
    """Timers around the recorder's pieces (module attributes, looked up at call time)."""
    E = _engine.Engine
    E._on_grad = _timed("grad hooks (rules, sketch GEMMs)", E._on_grad)
    E.assemble = _timed("assemble (cat blocks)", E.assemble)
    orig_make = E._make_forward_hook

    def make(self, entry):
        return _timed("forward hooks", orig_make(self, entry))

    E._make_forward_hook = make
    _recorder.step_fields = _timed("step_fields (lr; Adam moments)", _optim.step_fields)
    _pipeline.StepSink.submit = _timed("StepSink.submit (host copy, checks, queue)", _pipeline.StepSink.submit)
    _writer.RunWriter._write = _timed("writer._write (background thread)", _writer.RunWriter._write)
    _writer.RunWriter.flush = _timed("flush (wait for the writer)", _writer.RunWriter.flush)
    G = _optim.UnrecordedGradients
    G._on_step = _timed("optimizer pre-hook (update = recorded step)", G._on_step)
    G._check_gradient = _timed("  of which: gradient check (sketch of .grad)", G._check_gradient)


def adam_moments_proposed(opt, model, engine):
    """The fix proposed for ``datavalue.capture._optim.adam_moments`` (not this helper's file, issue 20):
    a projected block stores the mean of its moments, which is the sum of each parameter's moment
    summed in float64, over the block's size: no ``block_matrix`` concatenation, no float64 copy
    of every moment, no ``zeros_like`` for parameters without state, one host transfer. Exact
    blocks (``proj_dim=None``) keep the original path. ``--what-if-adam`` swaps it in and checks it
    against the original at every step."""
    opt = _optim.unwrap_optimizer(opt)
    params = dict(model.named_parameters())
    if engine.proj_dim is None:
        return _ORIG_ADAM(opt, model, engine)
    steps = set()
    sums, sizes, zero = [], [], None
    for b in engine.blocks:
        n = 0
        for q in b.params:
            p = params[q]
            st = opt.state.get(p, {})
            n += p.numel()
            if "exp_avg" in st:
                sums.append(torch.stack([st["exp_avg"].sum(dtype=torch.float64), st["exp_avg_sq"].sum(dtype=torch.float64)]))
            else:
                zero = zero if zero is not None else torch.zeros(2, dtype=torch.float64, device=p.device)
                sums.append(zero)
        sizes.append((len(b.params), n, b.k))
    for p in params.values():
        if p.requires_grad:
            s = opt.state.get(p, {}).get("step", 0)
            steps.add(float(s.item() if torch.is_tensor(s) else s))
    per_param = torch.stack(sums).cpu().numpy() if sums else np.zeros((0, 2))
    m_parts, v_parts, i = [], [], 0
    for n_params, n, k in sizes:
        mean = per_param[i : i + n_params].sum(0) / n
        i += n_params
        m_parts.append(np.full(k, mean[0]))
        v_parts.append(np.full(k, mean[1]))
    return {"adam_m": np.concatenate(m_parts), "adam_v": np.concatenate(v_parts),
            "adam_step": (max(steps) if steps else 0.0) + 1.0}


_ORIG_ADAM = _optim.adam_moments


def what_if_adam() -> None:
    """Swap in :func:`adam_moments_proposed`, checking it against the original (check not timed)."""

    def checked(opt, model, engine):
        t = CLOCK()
        new = adam_moments_proposed(opt, model, engine)
        TIMES["adam_moments (proposed)"] += CLOCK() - t
        old = _ORIG_ADAM(opt, model, engine)
        for key in ("adam_m", "adam_v"):
            np.testing.assert_allclose(new[key], old[key], rtol=1e-12, atol=1e-300)
        assert new["adam_step"] == old["adam_step"]
        return new

    _optim.adam_moments = checked


def per_layer() -> None:
    """A timer per captured module around its gradient hook (``--per-layer``)."""
    orig = _engine.Engine._on_grad

    def on_grad(self, entry, args, kwargs, grad):
        t = CLOCK()
        try:
            return orig(self, entry, args, kwargs, grad)
        finally:
            TIMES[f"  {entry.name} ({entry.rule.name})"] += CLOCK() - t

    _engine.Engine._on_grad = on_grad


def make_case(model: str, optimizer: str):
    case = co.gpt2_case() if model == "gpt2" else co.mlp_case()
    params = case[1].parameters()
    opt = torch.optim.AdamW(params, lr=1e-3) if optimizer == "adamw" else torch.optim.SGD(params, lr=1e-3)
    return case, opt


def run_steps(model, opt, loss_fn, b, n, start, rec=None):
    t0 = CLOCK()
    for s in range(start, start + n):
        if rec is None:
            loss_fn(model).backward()
        else:
            with rec.step(sample_ids=range(s * b, (s + 1) * b)):
                loss_fn(model).backward()
        opt.step()
        opt.zero_grad()
    if rec is not None:
        rec.flush()
    co._sync()
    return (CLOCK() - t0) / n


def breakdown(args) -> None:
    instrument()
    (name, model, loss_fn, b), opt = make_case(args.model, args.optimizer)
    # plain steps train a copy made before any hook is attached (the recorder's optimizer pre-hook refuses
    # updates it did not record, so the recorded model cannot take plain steps in between)
    pmodel = copy.deepcopy(model)
    popt = type(opt)(pmodel.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=args.proj, optimizer=opt)
        print(f"{name}, {args.optimizer}, proj_dim {args.proj}: k={rec.proj_dim} in {len(rec.blocks)} blocks, "
              f"Adam moments stored: {rec.record_optimizer_state}")
        run_steps(model, opt, loss_fn, b, 5, 0, rec)
        run_steps(pmodel, popt, loss_fn, b, 5, 0)
        plain, recorded, start = [], [], 5
        TIMES.clear()
        for _ in range(args.reps):
            plain.append(run_steps(pmodel, popt, loss_fn, b, args.steps, start))
            recorded.append(run_steps(model, opt, loss_fn, b, args.steps, start, rec))
            start += args.steps
        rec.close()
    n = args.reps * args.steps
    p, r = statistics.median(plain) * 1e3, statistics.median(recorded) * 1e3
    ratio = statistics.median(x / y for x, y in zip(recorded, plain))
    print(f"load average {os.getloadavg()[0]:.2f}; {args.reps} x {args.steps} steps, {torch.get_num_threads()} threads, "
          f"{args.clock} clock")
    print(f"plain {p:.2f} ms/step, recorded {r:.2f} ms/step, ratio {ratio:.3f}x, overhead {r - p:.2f} ms/step")
    for key, v in TIMES.items():
        print(f"  {key:48s} {v / n * 1e3:7.3f} ms/step")


def profiled(args) -> None:
    (name, model, loss_fn, b), opt = make_case(args.model, args.optimizer)
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=args.proj, optimizer=opt)
        run_steps(model, opt, loss_fn, b, 5, 0, rec)
        n = args.steps * args.reps
        if args.mode == "cprofile":
            prof = cProfile.Profile()
            prof.enable()
            run_steps(model, opt, loss_fn, b, n, 5, rec)
            prof.disable()
            rec.close()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if co.DEVICE.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            run_steps(model, opt, loss_fn, b, n, 5, rec)
        rec.close()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=("mlp", "gpt2"), default="gpt2")
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw")
    ap.add_argument("--proj", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--reps", type=int, default=5, help="interleaved plain/recorded blocks")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument("--mode", choices=("breakdown", "cprofile", "torch"), default="breakdown")
    ap.add_argument("--what-if-adam", action="store_true",
                    help="time the proposed adam_moments (checked against the original, which then runs untimed "
                         "inside step_fields: read its line, not step_fields')")
    ap.add_argument("--per-layer", action="store_true", help="also time each captured module's gradient hook")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="see CLOCK")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.what_if_adam:
        what_if_adam()
    if args.per_layer:
        per_layer()
    co.DEVICE = args.device
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    (breakdown if args.mode == "breakdown" else profiled)(args)


if __name__ == "__main__":
    main()
