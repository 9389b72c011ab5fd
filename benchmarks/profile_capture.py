"""Where a recorded training step spends its time beyond the plain step (issue 20).

Three views of the same cases as ``benchmarks/capture_overhead.py`` (``--model mlp|gpt2``,
``--optimizer sgd|adamw``, passed to the ``Recorder`` so that AdamW runs store the Adam moments):

- ``--mode breakdown`` (default): wall-clock timers around each piece of the recorder, in ms per
  step, beside a plain step timed in the same process (blocks interleaved, median):
  forward hooks, the gradient hooks (per-layer rules: the sketch GEMMs), ``assemble``, the step's
  commit split into the optimizer's fields (``step_fields``, of which ``adam_moments``: the
  Adam-moment bookkeeping) and the step pipeline (``StepSink.submit``: host copy, finiteness
  checks, queueing), the ``UnrecordedGradients`` hooks (a post-accumulate hook per trainable
  parameter and an optimizer step pre-hook), and the background writer's own time
  (``RunWriter._write``, on its thread: its share of the GIL is what it costs the training thread).
  ``--ab-unrecorded`` adds a third arm per repetition, recorded steps without the
  ``UnrecordedGradients`` hooks, whose difference to the recorded arm is what those hooks cost in
  all (the autograd dispatch to Python included, which no timer inside the hook sees).
- ``--mode memory``: the recorder's host memory per step: what ``StepMemory`` (``Recorder(max_memory=)``)
  bounds, against the Python/numpy allocations traced during recorded steps (``tracemalloc``: the
  writer's queue, buffers and chunk copies; torch's CPU allocator is not traced) and the process's
  resident set before and after.
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
    _optim.adam_moments = _timed("  of which adam_moments", _optim.adam_moments)
    U = _optim.UnrecordedGradients
    U._on_accumulate = _timed("UnrecordedGradients hooks (inside)", U._on_accumulate)
    U._on_step = _timed("UnrecordedGradients step pre-hook", U._on_step)
    _writer.RunWriter._write = _timed("writer._write (background thread)", _writer.RunWriter._write)
    _writer.RunWriter.flush = _timed("flush (wait for the writer)", _writer.RunWriter.flush)
    G = _optim.UnrecordedGradients
    G._on_step = _timed("optimizer pre-hook (update = recorded step)", G._on_step)
    G._check_gradient = _timed("  of which: gradient check (sketch of .grad)", G._check_gradient)
    G.before_block = _timed("block start: weights unchanged since the update", G.before_block)
    G._after_step = _timed("optimizer post-hook (weights fingerprint)", G._after_step)
    R = _recorder.Recorder
    R._on_model_output = _timed('curvature="fisher" pass (pseudo-gradients)', R._on_model_output)


def per_layer() -> None:
    """A timer per captured module around its gradient hook (``--per-layer``)."""
    orig = _engine.Engine._on_grad

    def on_grad(self, entry, args, kwargs, grad, *rest):
        t = CLOCK()
        try:
            return orig(self, entry, args, kwargs, grad, *rest)
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


def _unrecorded_off(rec) -> None:
    """Remove the recorder's ``UnrecordedGradients`` hooks (a plain step would trip its step pre-hook)."""
    if getattr(rec, "_unrecorded", None) is not None:
        rec._unrecorded.remove()
        rec._unrecorded = None


def _unrecorded_on(rec, opt) -> None:
    if hasattr(rec, "_unrecorded") and rec._unrecorded is None:  # as the Recorder makes it
        rec._unrecorded = _optim.UnrecordedGradients(rec.engine, opt, release=lambda _step: rec._sink.release(),
                                                     drop=rec._drop_held, compare_gradients=rec._dist.world == 1)


def rec_kwargs(args) -> dict:
    """The ``Recorder`` options of ``--fisher`` (``none``, ``sampled``: one sampled label per example, ``exact``)."""
    return {"none": {}, "sampled": dict(curvature="fisher", fisher_max_classes=1, fisher_samples=1),
            "exact": dict(curvature="fisher", fisher_max_classes=16)}[args.fisher]


def breakdown(args) -> None:
    instrument()
    (name, model, loss_fn, b), opt = make_case(args.model, args.optimizer)
    # plain steps train a copy made before any hook is attached (the recorder's optimizer pre-hook refuses
    # updates it did not record, so the recorded model cannot take plain steps in between)
    pmodel = copy.deepcopy(model)
    popt = type(opt)(pmodel.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=args.proj, optimizer=opt, **rec_kwargs(args))
        print(f"{name}, {args.optimizer}, proj_dim {args.proj}: k={rec.proj_dim} in {len(rec.blocks)} blocks, "
              f"Adam moments stored: {rec.record_optimizer_state}, "
              f"{sum(p.requires_grad for p in model.parameters())} trainable parameters")
        run_steps(model, opt, loss_fn, b, 5, 0, rec)
        run_steps(pmodel, popt, loss_fn, b, 5, 0)
        plain, recorded, bare, start = [], [], [], 5
        load = [os.getloadavg()[0]]
        TIMES.clear()
        for _ in range(args.reps):
            plain.append(run_steps(pmodel, popt, loss_fn, b, args.steps, start))
            if args.ab_unrecorded:  # recorded, without the UnrecordedGradients hooks (not in TIMES)
                saved = dict(TIMES)
                _unrecorded_off(rec)
                bare.append(run_steps(model, opt, loss_fn, b, args.steps, start, rec))
                _unrecorded_on(rec, opt)
                TIMES.clear()
                TIMES.update(saved)
                start += args.steps
            recorded.append(run_steps(model, opt, loss_fn, b, args.steps, start, rec))
            start += args.steps
        load.append(os.getloadavg()[0])
        rec.close()
    n = args.reps * args.steps
    p, r = statistics.median(plain) * 1e3, statistics.median(recorded) * 1e3
    ratio = statistics.median(x / y for x, y in zip(recorded, plain))
    print(f"load average {load[0]:.2f} -> {load[1]:.2f}; {args.reps} x {args.steps} steps, {torch.get_num_threads()} "
          f"threads, {args.clock} clock")
    print(f"plain {p:.2f} ms/step, recorded {r:.2f} ms/step, ratio {ratio:.3f}x, overhead {r - p:.2f} ms/step")
    if bare:
        q = statistics.median(bare) * 1e3
        print(f"recorded without UnrecordedGradients {q:.2f} ms/step: those hooks cost "
              f"{statistics.median(x - y for x, y in zip(recorded, bare)) * 1e3:.2f} ms/step (median of paired blocks)")
    for key, v in TIMES.items():
        print(f"  {key:48s} {v / n * 1e3:7.3f} ms/step")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(args) -> None:
    """The recorder's host memory per step: ``StepMemory``'s bound against what is measured."""
    import tracemalloc

    (name, model, loss_fn, b), opt = make_case(args.model, args.optimizer)
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=args.proj, optimizer=opt)
        _unrecorded_off(rec)
        rec.engine.detach()
        run_steps(model, opt, loss_fn, b, 5, 0)
        rss_plain = _rss()
        rec.engine.attach()
        _unrecorded_on(rec, opt)
        n = args.reps * args.steps
        tracemalloc.start()
        run_steps(model, opt, loss_fn, b, n, 5, rec)  # flushes at the end
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_rec = _rss()
        parts = rec._memory.parts(b)
        k, chunk = rec.proj_dim, rec._sink.chunk_rows
        rec.close()
    MiB = 1 << 20
    print(f"{name}, {args.optimizer}, proj_dim {args.proj}: k={k}, batch {b}, chunk_rows {chunk}, {n} recorded steps; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"StepMemory bound (Recorder(max_memory=) checks it): {sum(parts.values()) / MiB:.2f} MiB")
    for key, v in parts.items():
        print(f"  {key:40s} {v / MiB:8.2f} MiB")
    print(f"traced Python/numpy allocations during the recorded steps: peak {peak / MiB:.2f} MiB, "
          f"left after the flush {current / MiB:.2f} MiB")
    print(f"resident set: {rss_plain / MiB:.1f} MiB after plain steps, {rss_rec / MiB:.1f} MiB after the recorded ones "
          f"(+{(rss_rec - rss_plain) / MiB:.1f} MiB)")


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
    ap.add_argument("--mode", choices=("breakdown", "memory", "cprofile", "torch"), default="breakdown")
    ap.add_argument("--ab-unrecorded", action="store_true",
                    help="add an arm of recorded steps without the UnrecordedGradients hooks (see the docstring)")
    ap.add_argument("--per-layer", action="store_true", help="also time each captured module's gradient hook")
    ap.add_argument("--fisher", choices=("none", "sampled", "exact"), default="none",
                    help='record curvature="fisher" rows: sampled labels or the exact class expectation')
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="see CLOCK")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.per_layer:
        per_layer()
    co.DEVICE = args.device
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    {"breakdown": breakdown, "memory": memory}.get(args.mode, profiled)(args)


if __name__ == "__main__":
    main()
