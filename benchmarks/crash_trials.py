"""200 random SIGKILL trials of a recording process (the suite runs 20: tests/store/test_crash_trials.py).

Every trial kills the writer at a random committed step plus a random delay (up to 3 times), resumes
to completion and checks the run equals an uninterrupted one. Run: ``python benchmarks/crash_trials.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.store.test_crash_trials import HERE, N_STEPS, _env, run_trial  # noqa: E402


def main() -> None:
    import subprocess

    from datavalue.store import open_run

    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as d:
        ref = Path(d) / "ref.zarr"
        subprocess.run([sys.executable, str(HERE / "_crash_writer.py"), str(ref), str(N_STEPS)], env=_env(), check=True)
        want = open_run(ref).grads.compute()
        kills, bad, t0 = 0, 0, time.time()
        for i in range(args.trials):
            path = Path(d) / f"t{i}.zarr"
            kills += run_trial(path, rng, max_kills=int(rng.integers(1, 4)))
            run = open_run(path)
            if run.n_steps != N_STEPS or not np.array_equal(run.grads.compute(), want):
                bad += 1
                print(f"trial {i}: MISMATCH")
    print(f"{args.trials} trials, {kills} kills, {bad} mismatches, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
