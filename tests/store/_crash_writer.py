"""A recording process for the crash trials: deterministic steps written through RunWriter.

Usage: python _crash_writer.py RUN N_STEPS [resume] [fast]. Step t has 4 rows whose gradients are a
pure function of t, so a run resumed after any number of kills must equal an uninterrupted one.
"""

import sys
import time

import numpy as np

from datavalue.store import RunWriter, StepBlock

K = 24
MANIFEST = {"projection": {"proj_dim": None, "seed": 0, "blocks": [
    {"name": "a", "index": 0, "rule": "linear", "kind": "dense", "params": ["a"], "shape": [12], "k_rows": 12,
     "k_cols": 1, "k": 12, "start": 0, "stop": 12},
    {"name": "b", "index": 1, "rule": "linear", "kind": "dense", "params": ["b"], "shape": [12], "k_rows": 12,
     "k_cols": 1, "k": 12, "start": 12, "stop": 24}]},
    "model_fingerprint": {"digest": "crash-trials"}, "loss_reduction": "mean", "curvature": {"fisher": None},
    "optimizer": {"kind": "sgd", "dampening": 0.0, "nesterov": False}}


def block(t: int) -> StepBlock:
    rng = np.random.default_rng(t)
    return StepBlock(step=t, sample_id=np.arange(4) + 4 * (t % 25), weight=np.full(4, 0.25),
                     grads=rng.standard_normal((4, K)) * 0.3, flags=np.zeros(4, np.uint8), lr=0.05, epoch=t // 25)


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2])
    resume = len(sys.argv) > 3 and sys.argv[3] == "resume"
    pause = 0.0 if "fast" in sys.argv[3:] else 0.004
    w = RunWriter(path, MANIFEST, k=K, mode="resume" if resume else "create", chunk_rows=16, commit_interval=0.01)
    for t in range(w.steps, n):
        w.submit(block(t))
        time.sleep(pause)
    w.close()


if __name__ == "__main__":
    main()
