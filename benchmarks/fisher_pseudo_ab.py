"""The Fisher pseudo-gradient backward, A/B in one process: ``Engine.grad_wrt_outputs`` as it is (the hooked
outputs' gradient edges) against the parameter-targeted pass it replaced (every weight gradient computed and
dropped), on the harness's MLP 784-512-512-256-10, batch 128, AdamW, ``curvature="fisher"`` with sampled labels.
Blocks of recorded steps alternate between the two; wall and process CPU ms per recorded step, medians.

    python benchmarks/fisher_pseudo_ab.py [--reps 7] [--steps 10] [--threads 1]
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import datavalue
from datavalue.capture._engine import Engine

NEW = Engine.grad_wrt_outputs


def reference(self, scalar_or_tensor, grad_outputs=None):
    params = [p for p in self.model.parameters() if p.requires_grad]
    self._pseudo = True
    try:
        torch.autograd.grad(scalar_or_tensor, params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    finally:
        self._pseudo = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dims = (784, 512, 512, 256, 10)
    mods = []
    for i, o in zip(dims, dims[1:]):
        mods += [torch.nn.Linear(i, o), torch.nn.ReLU()]
    model = torch.nn.Sequential(*mods[:-1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    print(f"load average at start: {os.getloadavg()}")
    res = {"edges (new)": [], "parameters (old)": []}
    with tempfile.TemporaryDirectory() as d:
        rec = datavalue.Recorder(os.path.join(d, "r.zarr"), model, proj_dim=1024, optimizer=opt, curvature="fisher",
                                 fisher_max_classes=1)
        step = 0
        for rep in range(a.reps + 1):
            for name, impl in (("edges (new)", NEW), ("parameters (old)", reference)):
                Engine.grad_wrt_outputs = impl
                t, c = time.perf_counter(), time.process_time()
                for _ in range(a.steps):
                    with rec.step(sample_ids=np.arange(128) + 128 * step):
                        F.cross_entropy(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
                    step += 1
                rec.flush()
                if rep:  # the first round warms up
                    res[name].append(((time.perf_counter() - t) / a.steps * 1e3, (time.process_time() - c) / a.steps * 1e3))
        Engine.grad_wrt_outputs = NEW
        rec.close()
    for name, v in res.items():
        w, c = np.median(np.array(v), 0)
        print(f"{name}: {w:.1f} ms wall, {c:.1f} ms CPU per recorded step (median of {a.reps} blocks of {a.steps})")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
