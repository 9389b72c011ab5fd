"""build_embeddings against dattri's DVEmbAttributor (dattri 0.3.0), side by side.

Sections (each measurement of time / peak memory runs in a fresh subprocess, the two systems
interleaved rep by rep; medians reported together with the 1-minute load average):

  A. same scores: a linear softmax classifier (one Linear, bias=False, so our one block == dattri's
     full P x P matrix), float64 model and float64 storage, exact mode (no projection), several
     epochs. Both systems capture their own per-sample gradients on the same training trajectory;
     we compare per-epoch and all-epoch score matrices [n_train, n_test].
  B. exact-mode build: occurrences/s, GFLOP/s against the machine's measured matmul roofline at the
     step shape ((B, P) @ (P, P), 4 B P^2 flops per step), and peak RSS, at two run lengths (T, 10T).
     dattri is fed the gradients of our recorded run (its `cache(gradients=..., learning_rates=...)`
     entry point); only `cache()` is timed, but its peak RSS includes the in-memory gradient cache it
     needs by design.
  C. projected mode, proj_dim 1024 on a small MLP: record+build time and Spearman fidelity against
     the exact scores (dattri full-matrix exact, and our exact block-diagonal), for our
     block-diagonal sketch and dattri's three projected modes (random projection of full gradients,
     "kronecker", "elementwise").

Run: ``python benchmarks/build_vs_dattri.py [--quick] [--reps N] [--threads N]``.
dattri is imported from benchmarks/.deps (``pip install --no-deps --target benchmarks/.deps dattri``);
its rows are skipped with a message if it is not importable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / ".deps"))
sys.path.insert(0, str(ROOT))


def have_dattri() -> bool:
    try:
        from dattri.algorithm.dvemb import DVEmbAttributor  # noqa: F401
        from dattri.task import AttributionTask  # noqa: F401
        return True
    except Exception as exc:  # pragma: no cover
        print(f"[dattri not importable ({exc!r}); dattri rows skipped]", file=sys.stderr)
        return False


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- models / data


def make_data(n, d, c, seed, dtype):
    import torch

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, c, generator=g)
    x = torch.randn(n, d, generator=g)
    y = (x @ W + 0.5 * torch.randn(n, c, generator=g)).argmax(1)
    return x.to(dtype), y


def make_model(kind, d, c, h, dtype):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "linear":
        m = nn.Sequential(nn.Linear(d, c, bias=False))
    else:
        m = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c))
    return m.to(dtype)


def dattri_attributor(model, factorization="none", proj_dim=None):
    import torch
    import torch.nn.functional as F
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask

    if factorization == "none":
        def loss(params, data):
            x, y = data
            out = torch.func.functional_call(model, params, x.unsqueeze(0))
            return F.cross_entropy(out, y.unsqueeze(0))
    else:
        def loss(model_, data, device):  # noqa: ARG001
            x, y = data
            return F.cross_entropy(model_(x), y)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    return DVEmbAttributor(task, proj_dim=proj_dim, factorization_type=factorization)


def our_scores(path, model, xt, yt, epochs_of_rows=False):
    """(n_train, n_test) all-epoch scores, and per-epoch dict, from our run."""
    import numpy as np
    import torch.nn.functional as F

    import datavalue
    from datavalue.store import open_array, open_run

    run = open_run(path)
    G = datavalue.per_sample_gradients(model, lambda m: F.cross_entropy(m(xt), yt, reduction="none"), run)
    V = open_array(path, "embeddings/empirical_fisher/values")[:]
    S = V.astype(np.float64) @ G.astype(np.float64).T
    sid = run.sample_id
    n = int(sid.max()) + 1
    tot = np.zeros((n, S.shape[1]))
    np.add.at(tot, sid, S)
    per = {}
    if epochs_of_rows:
        row_ep = run.epoch[run.row_step]
        for e in np.unique(row_ep):
            m = row_ep == e
            a = np.zeros_like(tot)
            np.add.at(a, sid[m], S[m])
            per[int(e)] = a
    return tot, per


def dattri_scores(att, xt, yt, epochs):
    from torch.utils.data import DataLoader, TensorDataset

    dl = DataLoader(TensorDataset(xt, yt), batch_size=len(xt))
    tot = att.attribute(dl).detach().double().numpy()
    per = {e: att.attribute(dl, epoch=e).detach().double().numpy() for e in range(epochs)}
    return tot, per


# ----------------------------------------------------------------------------- A: same scores


def section_a(quick):
    import numpy as np
    import torch

    import datavalue

    d, c, n, B, E, lr = 64, 4, 256, 32, 3, 0.5
    dt = torch.float64
    x, y = make_data(n + 64, d, c, 0, dt)
    xt, yt, x, y = x[n:], y[n:], x[:n], y[:n]
    model = make_model("linear", d, c, 0, dt)
    att = dattri_attributor(model)
    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "a.zarr")
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        rec = datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, storage_dtype="float64")
        _train_with(model, opt, x, y, B, E, lr, rec=rec, att=att)  # n % B == 0: every sample, every epoch
        datavalue.build_embeddings(path, curvature="empirical_fisher", dtype="float64", storage_dtype="float64",
                                   progress=False)
        ours, ours_ep = our_scores(path, model, xt, yt, epochs_of_rows=True)
        att.cache()
        th, th_ep = dattri_scores(att, xt, yt, E)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    rows = [("all epochs", rel(ours, th), float(np.corrcoef(ours.ravel(), th.ravel())[0, 1]))]
    for e in range(E):
        rows.append((f"epoch {e}", rel(ours_ep[e], th_ep[e]), float(np.corrcoef(ours_ep[e].ravel(), th_ep[e].ravel())[0, 1])))
    print(f"\n### A. Same scores (linear softmax {d}x{c}, bias=False, P={d * c}, n={n}, B={B}, {E} epochs, "
          f"SGD lr {lr}, float64, exact, empirical Fisher)\n")
    print("| scores | max abs diff / max abs | Pearson |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2e} | {r[2]:.12f} |")
    return rows


# ----------------------------------------------------------------------------- B: exact build


def worker_record(args):
    import torch

    import datavalue

    torch.set_num_threads(args.threads)
    n = args.T * args.B
    x, y = make_data(n, args.d, args.c, 0, torch.float32)
    model = make_model("linear", args.d, args.c, 0, torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    import torch.nn.functional as F

    rec = datavalue.Recorder(args.path, model, proj_dim=None, optimizer=opt, storage_dtype="float32")
    for t in range(args.T):
        idx = torch.arange(t * args.B, (t + 1) * args.B)
        with rec.step(sample_ids=idx, epoch=0):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    rec.close()
    return {}


def worker_ours(args):
    import datavalue
    import datavalue.embeddings  # noqa: F401  (imported before the clock, as dattri's modules are)

    t0 = time.perf_counter()
    datavalue.build_embeddings(args.path, curvature="empirical_fisher", dtype=args.dtype, overwrite=True,
                               progress=False)
    return {"seconds": time.perf_counter() - t0}


def worker_dattri(args):
    import numpy as np
    import torch

    from datavalue.store import open_run

    torch.set_num_threads(args.threads)
    run = open_run(args.path)
    G = run.read("grads")
    ptr, lr, sid = run.step_ptr, run.lr, run.sample_id
    model = make_model("linear", args.d, args.c, 0, torch.float32)
    att = dattri_attributor(model)
    grads, lrs, ids = [], [], []
    for t in range(run.n_steps):
        a, b = int(ptr[t]), int(ptr[t + 1])
        grads.append(torch.from_numpy(np.ascontiguousarray(G[a:b], dtype=np.float32)))
        lrs.append(float(lr[t]) / (b - a))
        ids.append(torch.from_numpy(sid[a:b].astype(np.int64)))
    del G
    att.data_indices = {0: ids}
    t0 = time.perf_counter()
    att.cache(gradients={0: grads}, learning_rates={0: lrs})
    return {"seconds": time.perf_counter() - t0}


def worker_roofline(args):
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    out = {}
    B, P = args.B, args.P
    for lib, dt in (("numpy", "float64"), ("numpy", "float32"), ("torch", "float32")):
        rng = np.random.default_rng(0)
        X = rng.standard_normal((B, P)).astype(dt)
        M = rng.standard_normal((P, P)).astype(dt)
        if lib == "torch":
            X, M = torch.from_numpy(X), torch.from_numpy(M)
        f = (lambda X=X, M=M: X @ M.T)
        f()
        ts = []
        for _ in range(max(5, int(0.5 / max(1e-4, _time(f))))):
            ts.append(_time(f))
        out[f"{lib}-{dt}"] = 2 * B * P * P / statistics.median(ts) / 1e9
        # also the rank-B update (M += A.T @ X): same flops
    return out


def _time(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def spawn(mode, **kw):
    cmd = [sys.executable, __file__, "--worker", mode, "--json", json.dumps(kw)]
    load = os.getloadavg()[0]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["load"] = load
    return res


def section_b(quick, reps, threads, dattri_ok):
    if quick:
        d, c, B, T0 = 128, 8, 64, 30
    else:
        d, c, B, T0 = 256, 8, 128, 40
    P = d * c
    roof = spawn("roofline", B=B, P=P, threads=threads)
    rows = []
    for T in (T0, 10 * T0):
        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "b.zarr")
        try:
            spawn("record", path=path, T=T, B=B, d=d, c=c, threads=threads)
            res = {"ours float64": [], "ours float32": [], "dattri exact (float32)": []}
            for r in range(reps):
                order = list(res)
                if r % 2:
                    order.reverse()
                for name in order:
                    if name.startswith("dattri"):
                        if not dattri_ok:
                            continue
                        res[name].append(spawn("dattri", path=path, d=d, c=c, threads=threads))
                    else:
                        res[name].append(spawn("ours", path=path, dtype=name.split()[-1], threads=threads))
            for name, ms in res.items():
                if not ms:
                    continue
                sec = statistics.median(m["seconds"] for m in ms)
                rss = statistics.median(m["maxrss_mb"] for m in ms)
                gf = 4 * B * P * P * T / sec / 1e9
                rf = roof["numpy-float64"] if "float64" in name else (
                    roof["torch-float32"] if name.startswith("dattri") else roof["numpy-float32"])
                rows.append((T, T * B, name, sec, T * B / sec, gf, gf / rf, rss,
                             statistics.median(m["load"] for m in ms)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n### B. Exact-mode build (linear {d}x{c}, one block P={P}, B={B}; {reps} reps, median; "
          f"threads={threads})\n")
    print("Matmul roofline at the step shape (B,P)@(P,P): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in roof.items()
                                                                    if "-float" in k))
    print("\n| steps T | occurrences | system | build s | occurrences/s | GFLOP/s (4BP^2/step) | of roofline | peak RSS MB | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:,.0f} | {r[5]:.1f} | {r[6]:.0%} | {r[7]:.0f} | {r[8]:.1f} |")
    return rows


# ----------------------------------------------------------------------------- C: projected


def worker_projected(args):
    """One system on the small MLP: record (+train) + build, timed; returns scores."""
    import numpy as np
    import torch

    import datavalue

    torch.set_num_threads(args.threads)
    d, h, c, n, B, E, lr = args.d, args.h, args.c, args.n, args.B, args.E, 0.1
    x, y = make_data(n + args.m, d, c, 0, torch.float32)
    xt, yt, x, y = x[n:], y[n:], x[:n], y[:n]
    model = make_model("mlp", d, c, h, torch.float32)
    tmp = tempfile.mkdtemp()
    # Both systems' modules are imported before the clock starts, and both constructors run inside it
    # (until session 4 ours paid its imports, 0.5 s of them dask's, inside the clock and dattri's
    # DVEmbAttributor(...) ran outside it).
    import datavalue.capture  # noqa: F401
    import datavalue.embeddings  # noqa: F401
    if not args.system.startswith("ours"):
        import dattri.algorithm.dvemb  # noqa: F401
        import dattri.task  # noqa: F401
    try:
        if args.system.startswith("ours"):
            path = os.path.join(tmp, "c.zarr")
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            proj = None if args.system == "ours-exact" else args.K
            blocks = "full" if args.system.endswith("-full") else "layer"
            t0 = time.perf_counter()
            rec = datavalue.Recorder(path, model, proj_dim=proj, optimizer=opt, storage_dtype="float32")
            _train_with(model, opt, x, y, B, E, lr, rec=rec)
            t1 = time.perf_counter()
            dtype = "float32" if args.system.endswith("-f32") else "float64"  # dattri computes in float32
            datavalue.build_embeddings(path, curvature="empirical_fisher", dtype=dtype, progress=False,
                                       blocks=blocks)
            t2 = time.perf_counter()
            S, _ = our_scores(path, model, xt, yt)
            k = int(datavalue.store.open_run(path).proj_dim)
        else:
            fact, proj = {"dattri-exact": ("none", None), "dattri-proj": ("none", args.K),
                          "dattri-kronecker": ("kronecker", args.K),
                          "dattri-elementwise": ("elementwise", args.K)}[args.system]
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            t0 = time.perf_counter()
            att = dattri_attributor(model, fact, proj)
            _train_with(model, opt, x, y, B, E, lr, att=att)
            t1 = time.perf_counter()
            att.cache()
            t2 = time.perf_counter()
            S, _ = dattri_scores(att, xt, yt, 0)
            k = int(att.embeddings[0].shape[1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    np.save(args.out, S)
    return {"record": t1 - t0, "build": t2 - t1, "k": k}


def _train_with(model, opt, x, y, B, E, lr, rec=None, att=None):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    n = x.shape[0]
    for ep in range(E):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - B + 1, B):
            idx = perm[s:s + B]
            if att is not None:
                att.cache_gradients(ep, (x[idx], y[idx]), idx, lr)
                opt.zero_grad()  # dattri's factorized modes run loss.backward() and leave .grad set
            if rec is not None:
                with rec.step(sample_ids=idx, epoch=ep):
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
            else:
                F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    if rec is not None:
        rec.close()


def section_c(quick, reps, threads, dattri_ok):
    import numpy as np
    from scipy.stats import spearmanr

    cfg = dict(d=64, h=32, c=10, n=512, B=32, E=4, m=32, K=1024) if quick else \
        dict(d=128, h=64, c=10, n=2048, B=64, E=5, m=64, K=1024)
    P = cfg["d"] * cfg["h"] + cfg["h"] + cfg["h"] * cfg["c"] + cfg["c"]
    # per-layer operators (float64 and float32 recursion), one full operator, exact
    systems = ["ours-proj", "ours-proj-f32", "ours-proj-full", "ours-exact"]
    if dattri_ok:
        systems += ["dattri-exact", "dattri-proj", "dattri-kronecker", "dattri-elementwise"]
    tmp = tempfile.mkdtemp()
    res = {s: [] for s in systems}
    scores = {}
    try:
        for r in range(reps):
            order = systems if r % 2 == 0 else systems[::-1]
            for s in order:
                out = os.path.join(tmp, f"{s}.npy")
                res[s].append(spawn("projected", system=s, out=out, threads=threads, **cfg))
                scores[s] = np.load(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def sp(a, b):
        return float(np.mean([spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])]))

    refs = [r for r in ("dattri-exact", "ours-exact") if r in scores]
    print(f"\n### C. Projected mode, K={cfg['K']} (MLP {cfg['d']}-{cfg['h']}-{cfg['c']}, P={P}, n={cfg['n']}, "
          f"B={cfg['B']}, {cfg['E']} epochs; {reps} reps, median; threads={threads})\n")
    hdr = " | ".join(f"Spearman vs {r}" for r in refs)
    print(f"| system | stored k | record+train s | build s | record+build s | {hdr} | load |")
    print("|---" * (6 + len(refs)) + "|")
    for s in systems:
        ms = res[s]
        rec = statistics.median(m["record"] for m in ms)
        bld = statistics.median(m["build"] for m in ms)
        tot = statistics.median(m["record"] + m["build"] for m in ms)
        sps = " | ".join(f"{sp(scores[s], scores[r]):.3f}" for r in refs)
        print(f"| {s} | {ms[0]['k']} | {rec:.2f} | {bld:.2f} | {tot:.2f} | {sps} | "
              f"{statistics.median(m['load'] for m in ms):.1f} |")


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (numpy follows OMP/MKL env)")
    ap.add_argument("--sections", default="ABC")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.worker:
        args = argparse.Namespace(**json.loads(a.json))
        if getattr(args, "threads", None) is None:
            args.threads = os.cpu_count()
        fn = {"record": worker_record, "ours": worker_ours, "dattri": worker_dattri, "roofline": worker_roofline,
              "projected": worker_projected}[a.worker]
        out = fn(args)
        out["maxrss_mb"] = maxrss_mb()
        print(json.dumps(out))
        return
    reps = a.reps or (3 if a.quick else 5)
    threads = a.threads or os.cpu_count()
    dattri_ok = have_dattri()
    print(f"# build_vs_dattri ({'quick' if a.quick else 'full'}), {os.cpu_count()} CPUs, threads={threads}, "
          f"loadavg at start {os.getloadavg()}")
    if "A" in a.sections and dattri_ok:
        section_a(a.quick)
    if "B" in a.sections:
        section_b(a.quick, reps, threads, dattri_ok)
    if "C" in a.sections:
        section_c(a.quick, reps, threads, dattri_ok)
    print(f"\nloadavg at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
