"""Reliability trials for issue 22: kills while recording, writers racing, damaged chunks.

Three kinds of trial, ``--trials`` of each, every outcome checked against a reference run recorded
without interruption (the deterministic steps of ``tests/store/_crash_writer.py``: step ``t`` has
4 rows, a pure function of ``t``):

* **kill**: a recording process (``RunWriter``, default ``commit_every=32``, the 10 s timer) is
  killed with SIGKILL at a random moment; the run must open, its committed steps must equal the
  reference's first steps bit for bit, at least ``submitted - commit_every`` of them must be
  committed, and ``resume=True`` (taking over the dead writer's lock) must finish a run equal to
  the reference;
* **race**: two processes open the same run at once with a random pair of modes (create, overwrite,
  resume); exactly one may win, the other must get ``StoreLockedError`` naming the winner, and the
  run must then hold exactly what the winner wrote (plus what was there, unless the winner
  overwrote it): nothing lost;
* **damage**: a finished run gets one random damage inside its committed range (a chunk deleted,
  a byte flipped, a chunk truncated, or a chunk replaced by its older copy from a snapshot taken
  mid-recording); reading every array through the public accessors must raise
  ``StoreCorruptError``: never a silent read of different values.

Run: ``nice -n 10 python benchmarks/reliability_trials.py --trials 20`` (docs/results/reliability.md);
``--only cost`` times recording with several ``commit_every`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "tests" / "store"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from _crash_writer import MANIFEST, K, block  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
N_STEPS = 120

# A recording process that writes its submitted count to a side file after every submit (8 bytes,
# pwrite), so that the parent knows how many steps had been handed over when it killed it.
_RECORDER = """
import os, sys, time
from _crash_writer import MANIFEST, K, block
from datavalue.store import RunWriter
path, n, count = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(count, os.O_RDWR | os.O_CREAT, 0o644)
w = RunWriter(path, MANIFEST, k=K, mode="resume" if os.path.exists(path) else "create", chunk_rows=64)
for t in range(w.steps, n):
    w.submit(block(t))
    os.pwrite(fd, int(t + 1).to_bytes(8, "little"), 0)
    time.sleep(0.002)
w.close()
"""

# A writer that races another: waits for the go file, opens the run, writes its steps, then holds
# the run until the release file exists (so that the race is a race, not a queue).
_RACER = """
import json, os, sys, time
from _crash_writer import MANIFEST, K, block
from datavalue.errors import StoreError, StoreLockedError
from datavalue.store import RunWriter
path, mode, go, out, release, first = sys.argv[1:7]
while not os.path.exists(go):
    pass
try:
    w = RunWriter(path, MANIFEST, k=K, mode=mode, chunk_rows=64)
except StoreLockedError as exc:
    open(out, "w").write(json.dumps({"won": False, "locked": True, "error": str(exc)}))
    sys.exit(0)
except StoreError as exc:  # e.g. create on a run the other racer made first and already released
    open(out, "w").write(json.dumps({"won": False, "locked": False, "error": type(exc).__name__ + ": " + str(exc)}))
    sys.exit(0)
start = w.steps
for t in range(start, start + 10):
    w.submit(block(t))
w.flush()
open(out, "w").write(json.dumps({"won": True, "pid": os.getpid(), "start": start, "end": start + 10}))
while not os.path.exists(release):
    time.sleep(0.005)
w.close()
"""


def _reference(d: Path) -> tuple[np.ndarray, np.ndarray]:
    from datavalue.store import RunWriter, open_run

    ref = d / "ref.zarr"
    w = RunWriter(ref, MANIFEST, k=K, chunk_rows=64)
    for t in range(N_STEPS):
        w.submit(block(t))
    w.close()
    run = open_run(ref)
    return run.grads.compute(), run.sample_id


def kill_trial(d: Path, i: int, rng: np.random.Generator, ref: tuple[np.ndarray, np.ndarray]) -> dict:
    from datavalue.store import LOCK_FILE, RunWriter, open_run

    path, count = d / f"kill{i}.zarr", d / f"kill{i}.count"
    proc = subprocess.Popen([sys.executable, "-c", _RECORDER, str(path), str(N_STEPS), str(count)], env=ENV)
    early = rng.random() < 0.1  # now and then during start-up (creating the run), else mid-run:
    target = int(rng.integers(1, N_STEPS))  # once a random number of steps was submitted, plus a few ms

    def submitted_now() -> int:
        try:
            return int.from_bytes(count.read_bytes()[:8], "little")
        except OSError:
            return 0

    deadline = time.time() + 120
    while not early and proc.poll() is None and time.time() < deadline and submitted_now() < target:
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.3 if early else 0.01))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    submitted = int.from_bytes(count.read_bytes()[:8], "little") if count.exists() and count.stat().st_size else 0
    res = {"submitted": submitted, "committed": 0, "intact": True, "bound": True, "resumed": False, "stale_lock": False,
           "finished_first": proc.returncode == 0}
    res["stale_lock"] = (path / LOCK_FILE).exists()
    res["partials_after_kill"] = len(list(path.rglob("*.partial"))) if path.exists() else 0
    if not (path / "zarr.json").exists():  # killed while creating the run: a plain create must work
        res["before_start"] = True
        res["left"] = sorted(p.name for p in path.iterdir()) if path.exists() else []
        mode = "create"
    else:
        run = open_run(path)
        n = run.n_steps
        res["committed"] = n
        res["intact"] = bool(np.array_equal(run.grads.compute(), ref[0][: run.n_rows])
                             and np.array_equal(run.sample_id, ref[1][: run.n_rows]))
        res["bound"] = n >= submitted - 32  # the default commit_every
        mode = "resume"
    w = RunWriter(path, MANIFEST, k=K, mode=mode, chunk_rows=64)  # takes the dead writer's lock over
    for t in range(w.steps, N_STEPS):
        w.submit(block(t))
    w.close()
    res["partials_after_resume"] = len(list(path.rglob("*.partial")))
    run = open_run(path)
    res["resumed"] = bool(run.n_steps == N_STEPS and np.array_equal(run.grads.compute(), ref[0])
                          and np.array_equal(run.sample_id, ref[1]))
    return res


def race_trial(d: Path, i: int, rng: np.random.Generator) -> dict:
    from datavalue.store import RunWriter, open_run

    path = d / f"race{i}.zarr"
    existed = bool(rng.random() < 0.5)  # a run there already: resume or overwrite it; none: create or overwrite
    modes = [str(m) for m in rng.choice(["overwrite", "resume"] if existed else ["create", "overwrite"], size=2)]
    if existed:
        w = RunWriter(path, MANIFEST, k=K, chunk_rows=64)
        for t in range(5):
            w.submit(block(t))
        w.close()
    go, release = d / f"go{i}", d / f"release{i}"
    outs = [d / f"race{i}-{j}.json" for j in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(path), m, str(go), str(o), str(release), "x"], env=ENV)
             for m, o in zip(modes, outs, strict=True)]
    try:
        time.sleep(1.0)
        go.touch()
        deadline = time.time() + 120
        while not all(o.exists() and o.stat().st_size for o in outs):
            if time.time() > deadline:
                raise RuntimeError("a racer hung")
            time.sleep(0.01)
        verdicts = [json.loads(o.read_text()) for o in outs]
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=120)
    winners = [v for v in verdicts if v["won"]]
    losers = [v for v in verdicts if not v["won"]]
    res = {"modes": modes, "existed": existed, "one_winner": len(winners) == 1,
           "loser_named_winner": False, "loser_locked": False, "nothing_lost": False}
    if len(winners) == 1 and losers:
        w, lo = winners[0], losers[0]
        res["loser_locked"] = lo["locked"]
        res["loser_named_winner"] = f"pid {w['pid']} " in lo.get("error", "")
        run = open_run(path)
        # the run holds the winner's steps after what it found (5 steps, unless it overwrote or created)
        expect = np.concatenate([block(t).sample_id for t in range(w["end"])])
        res["nothing_lost"] = bool(run.n_steps == w["end"] and np.array_equal(run.sample_id, expect))
    return res


DAMAGES = ("delete", "flip", "truncate", "older")


def _read_everything(path: Path) -> dict[str, np.ndarray]:
    from datavalue.store import fast_rows, open_run

    run = open_run(path)
    out = {n: np.asarray(getattr(run, n)) for n in ("sample_id", "weight", "flags", "step_ptr", "lr", "epoch",
                                                      "grad_scale", "momentum", "weight_decay")}
    out["grads"] = np.asarray(run.read("grads"))
    out["grads_fast"] = fast_rows(run.array("grads"), required_rows=run.n_rows)[: run.n_rows]
    out["grads_dask"] = run.grads.compute()
    return out


def damage_trial(d: Path, i: int, rng: np.random.Generator, base: Path, snap: Path, ref: dict) -> dict:
    from datavalue.errors import StoreCorruptError

    path = d / f"damage{i}.zarr"
    shutil.copytree(base, path)
    kind = str(rng.choice(DAMAGES))
    chunks = [p.relative_to(path) for p in path.rglob("*") if p.is_file()
              and "c" in p.relative_to(path).parts and p.relative_to(path).parts[0] != "commit"]
    if kind == "older":  # chunks whose mid-run copy differs from the finished run's
        chunks = [r for r in chunks if (snap / r).is_file() and (snap / r).read_bytes() != (path / r).read_bytes()]
    cands = sorted(chunks)
    rel = cands[int(rng.integers(len(cands)))]
    target = path / rel
    if kind == "delete":
        target.unlink()
    elif kind == "flip":
        data = bytearray(target.read_bytes())
        j = int(rng.integers(len(data)))
        data[j] ^= 1 << int(rng.integers(8))
        target.write_bytes(bytes(data))
    elif kind == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: int(rng.integers(len(data)))])
    else:
        shutil.copyfile(snap / rel, target)
    res = {"damage": kind, "chunk": rel.as_posix(), "detected": False, "silent": False}
    try:
        got = _read_everything(path)
    except StoreCorruptError:
        res["detected"] = True
        return res
    # not detected: harmless only when every value read equals the reference
    res["silent"] = any(not np.array_equal(got[k], ref[k], equal_nan=True) for k in ref)
    res["harmless"] = not res["silent"]
    return res


def commit_cost(reps: int, steps: int, proj_dim: int, batch: int, everies: list[int]) -> dict:
    """Milliseconds per recorded step for several ``commit_every`` (interleaved, median of ``reps``):
    an MLP 784-256-10 on random data. Rows per chunk are about 4 MiB / (4 proj_dim) (4,096 at
    ``proj_dim=256``): with a small batch a chunk takes many steps to fill, and every commit before
    that rewrites the whole growing tail chunk, the worst case for a small ``commit_every``."""
    import torch
    import torch.nn.functional as F

    import datavalue

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    settings = {str(e): e for e in everies}
    settings["off (10 s / full chunk only)"] = 10**9
    times: dict[str, list[float]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for name, every in settings.items():
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                path = Path(tmp) / f"c{rep}-{every}.zarr"
                with datavalue.Recorder(path, model, proj_dim=proj_dim, optimizer=opt, commit_every=every) as rec:
                    t0 = time.perf_counter()
                    for t in range(steps):
                        with rec.step(sample_ids=range(batch * t, batch * t + batch)):
                            F.cross_entropy(model(x), y).backward()
                        opt.step()
                        opt.zero_grad()
                    rec.flush()
                    times[name].append((time.perf_counter() - t0) / steps)
    med = {k: float(np.median(v)) for k, v in times.items()}
    off = med["off (10 s / full chunk only)"]
    return {k: {"ms_per_step": round(1e3 * v, 3), "vs_off": round(v / off, 3)} for k, v in med.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="trials of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("kill", "race", "damage", "cost"), default=None)
    ap.add_argument("--cost-steps", type=int, default=400, help="steps per timing of --only cost")
    ap.add_argument("--cost-reps", type=int, default=3)
    ap.add_argument("--cost-proj-dim", type=int, default=256)
    ap.add_argument("--cost-batch", type=int, default=32)
    ap.add_argument("--cost-every", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    summary: dict[str, dict] = {}
    if args.only == "cost":  # not part of the default run: it times, the others count
        print(json.dumps(commit_cost(args.cost_reps, args.cost_steps, args.cost_proj_dim, args.cost_batch,
                                     args.cost_every), indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ref = _reference(d)
        if args.only in (None, "kill"):
            t0, rows = time.time(), []
            for i in range(args.trials):
                rows.append(kill_trial(d, i, rng, ref))
                print("kill", i, rows[-1], flush=True)
            started = [r for r in rows if not r.get("before_start")]
            summary["kill"] = {
                "trials": len(rows), "killed_before_or_while_creating_the_run": len(rows) - len(started),
                "of_those_created_again": sum(r["resumed"] for r in rows if r.get("before_start")),
                "finished_before_the_kill": sum(r["finished_first"] for r in rows),
                "mean_submitted": float(np.mean([r["submitted"] for r in started])) if started else 0.0,
                "mean_committed": float(np.mean([r["committed"] for r in started])) if started else 0.0,
                "committed_prefix_bit_identical": sum(r["intact"] for r in started),
                "within_commit_every": sum(r["bound"] for r in started),
                "stale_lock_left_and_taken_over": sum(r["stale_lock"] and r["resumed"] for r in rows),
                "resumed_bit_identical": sum(r["resumed"] for r in started),
                "kills_that_left_partial_files": sum(r["partials_after_kill"] > 0 for r in rows),
                "partial_files_left_after_resume": sum(r["partials_after_resume"] for r in rows),
                "seconds": round(time.time() - t0),
            }
        if args.only in (None, "race"):
            t0, rows = time.time(), []
            for i in range(args.trials):
                rows.append(race_trial(d, i, rng))
                print("race", i, rows[-1], flush=True)
            summary["race"] = {
                "trials": len(rows),
                "mode_pairs": sorted({"+".join(sorted(r["modes"])) for r in rows}),
                "exactly_one_winner": sum(r["one_winner"] for r in rows),
                "loser_got_lock_error_naming_winner": sum(r["loser_locked"] and r["loser_named_winner"] for r in rows),
                "nothing_lost": sum(r["nothing_lost"] for r in rows),
                "seconds": round(time.time() - t0),
            }
        if args.only in (None, "damage"):
            from datavalue.store import RunWriter

            t0, rows = time.time(), []
            base, snap = d / "base.zarr", d / "snap.zarr"
            w = RunWriter(base, MANIFEST, k=K, chunk_rows=64)
            for t in range(N_STEPS):
                w.submit(block(t))
                if t == 69:  # a copy of the live run: 280 rows, chunk 4 of the row arrays partial
                    w.flush()
                    shutil.copytree(base, snap)
            w.close()
            full = _read_everything(base)
            for i in range(args.trials):
                rows.append(damage_trial(d, i, rng, base, snap, full))
                print("damage", i, rows[-1], flush=True)
            summary["damage"] = {
                "trials": len(rows),
                "by_kind": {k: sum(r["damage"] == k for r in rows) for k in DAMAGES},
                "detected": sum(r["detected"] for r in rows),
                "undetected_but_harmless": sum(bool(r.get("harmless")) for r in rows),
                "silently_wrong": sum(r["silent"] for r in rows),
                "seconds": round(time.time() - t0),
            }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
