"""``datavalue demo`` / ``make demo``: record, embed and explain on real MNIST, in minutes on a CPU.

1. Trains a small MLP on a subset of real MNIST with the :class:`~datavalue.Recorder`
   (true-Fisher pseudo-gradients on, 1024-dimensional Kronecker sketch).
2. Builds data value embeddings (``datavalue.build_embeddings``).
3. For a few test digits, finds the most helpful and most harmful training images
   (``Attributor.top_k``) and writes a PNG grid and a terminal table under ``out``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def train_recorded(path: Path, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int = 64, lr: float = 0.1,
                   proj_dim: int = 1024, seed: int = 0, progress: bool = True, overwrite: bool = False) -> nn.Module:
    """Plain SGD with the recorder on; returns the trained model (final weights).

    ``overwrite=True`` replaces a datavalue run at ``path`` (the recorder refuses anything else)."""
    import datavalue

    model = make_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    n_steps = epochs * int(np.ceil(len(x) / batch_size))
    with datavalue.Recorder(path, model, proj_dim=proj_dim, seed=seed, optimizer=opt, curvature="fisher",
                            overwrite=overwrite) as rec, tqdm(total=n_steps, desc="train+record", disable=not progress) as bar:
        for epoch in range(epochs):
            order = rng.permutation(len(x))
            for i in range(0, len(x), batch_size):
                ids = order[i : i + batch_size]
                with rec.step(sample_ids=ids, epoch=epoch):
                    loss = F.cross_entropy(model(xt[ids]), yt[ids])
                    loss.backward()
                opt.step()
                opt.zero_grad()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


OUTPUTS = ("run.zarr", "top_k.txt", "demo.png")
"""What the demo writes into ``out``; nothing else there is touched."""


def _check_outputs(out: Path, *, overwrite: bool) -> None:
    """Refuse to start when an output exists (unless ``overwrite``) or is not ours to replace.

    ``run.zarr`` is replaced by the recorder, which deletes only a datavalue run; the two
    files are replaced in place, so a directory or a symlink under their names is refused.
    """
    from datavalue.errors import StoreExistsError

    found = [out / name for name in OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    if found and not overwrite:
        raise StoreExistsError(
            f"the demo's outputs already exist: {', '.join(map(str, found))}. Pass --overwrite "
            "(overwrite=True) to replace them (only them: other files in "
            f"{out} are left alone), or choose another --out."
        )
    for path in found:
        if path.name != "run.zarr" and (path.is_symlink() or not path.is_file()):
            raise StoreExistsError(
                f"{path} is not a file the demo wrote ({'a symbolic link' if path.is_symlink() else 'not a regular file'}); "
                "refusing to replace it. Move it away or choose another --out."
            )


MNIST_TRAIN = 60_000
"""Digits in real MNIST's training split: the most ``n_train`` can take."""


def _int_in(name: str, flag: str, value: object, *, low: int = 1, high: int | None = None, span: str = "") -> int:
    from datavalue.errors import RecorderError

    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or value < low or (high is not None and value > high):
        span = span or (f">= {low}" if high is None else f"in {low}..{high}")
        raise RecorderError(f"{name} ({flag}) must be an int {span}, got {value!r}; nothing was written.")
    return int(value)


def _check_args(out: Path, *, n_train: object, epochs: object, proj_dim: object, seed: object, n_explain: object,
                k: object) -> None:
    """Refuse, before any work, a value the demo cannot run with, and an ``out`` that cannot be a directory
    (a file, a path under a file, a directory without write permission) or that is, or lies inside, a
    datavalue run (the demo would write its files among the run's own); nothing is created."""
    from datavalue.errors import StoreError, StoreExistsError

    _int_in("n_train", "--n-train", n_train, high=MNIST_TRAIN)
    _int_in("epochs", "--epochs", epochs)
    if proj_dim is not None:  # None records exact gradients (API only)
        _int_in("proj_dim", "--proj-dim", proj_dim)
    _int_in("seed", "--seed", seed, low=0, high=2**63 - 1, span=">= 0 (and < 2**63)")
    _int_in("n_explain", "n_explain", n_explain, high=10)
    _int_in("k", "k", k)
    if out.is_symlink() and not out.exists():
        raise StoreError(f"--out {out} is a symbolic link to nothing ({os.readlink(out)}); choose another --out "
                         "(the demo does not follow it).")
    if out.exists() and not out.is_dir():
        raise StoreExistsError(f"--out {out} is a file, not a directory; the demo writes a directory (with "
                               f"{', '.join(OUTPUTS)}). Choose another --out (nothing was written).")
    from datavalue.store import refuse_inside_run

    refuse_inside_run(out, f"the demo's outputs ({', '.join(OUTPUTS)})")  # --out RUN, or a path inside a run
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # a file, or a dangling symbolic link, on the way
        raise StoreError(f"--out {out}: {parent} is not a directory, so no directory can be made under it; choose "
                         "another --out (nothing was written).")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"--out {out}: no permission to write in {parent}; choose a directory you can write to.")


def run_demo(out: str | Path = "runs/demo", *, n_train: int = 4000, epochs: int = 2, proj_dim: int = 1024,
             seed: int = 0, n_explain: int = 4, k: int = 6, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the whole demo; returns paths and timings.

    Writes only :data:`OUTPUTS` under ``out`` (created if missing). Existing outputs are refused
    unless ``overwrite=True``, which replaces those outputs and nothing else in ``out``.

    Raises:
        RecorderError: ``n_train`` not in 1..60000, ``epochs``, ``proj_dim``, ``k`` not positive ints,
            ``seed`` negative, ``n_explain`` not in 1..10; checked before anything is written.
        StoreError: ``out`` lies under a file, cannot be written, or is (or lies inside) a datavalue run.
        StoreExistsError: ``out`` is a file, or an output exists and ``overwrite`` is False, or it is not something the
            demo wrote (``run.zarr`` not a datavalue run, a symlink, a directory named ``demo.png``).
    """
    import datavalue
    from datavalue.data import load_mnist
    from datavalue.errors import StoreError

    out = Path(out)
    _check_args(out, n_train=n_train, epochs=epochs, proj_dim=proj_dim, seed=seed, n_explain=n_explain, k=k)
    _check_outputs(out, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only mount, which permission bits do not tell
        raise StoreError(f"cannot create --out {out}: {exc.strerror or exc}; choose a writable --out.") from exc
    t0 = time.perf_counter()
    x, y = load_mnist("train", n=n_train, seed=seed)
    xte, yte = load_mnist("test", n=1000, seed=seed)
    run_path = out / "run.zarr"
    model = train_recorded(run_path, x, y, epochs=epochs, proj_dim=proj_dim, seed=seed, progress=progress,
                           overwrite=overwrite)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    t_train = time.perf_counter() - t0
    print(f"trained on {n_train} real MNIST digits for {epochs} epochs: test accuracy {acc:.3f}")

    t1 = time.perf_counter()
    datavalue.build_embeddings(run_path, progress=progress)
    t_embed = time.perf_counter() - t1

    t2 = time.perf_counter()
    _, first = np.unique(yte, return_index=True)  # one test digit per class, the first n_explain classes
    pick = np.sort(first)[:n_explain]
    xq, yq = torch.from_numpy(xte[pick]), torch.from_numpy(yte[pick])
    attr = datavalue.Attributor(run_path, model, progress=progress)
    top = attr.top_k(lambda m: F.cross_entropy(m(xq), yq, reduction="none"), k=k, by="sample")
    t_query = time.perf_counter() - t2
    helpful, harmful = _as_arrays(top)
    table = _table(helpful, harmful, yq.numpy(), y)
    print(table)
    (out / "top_k.txt").write_text(table + "\n")
    png = out / "demo.png"
    _grid(png, xte[pick], yte[pick], x, y, helpful, harmful)
    print(f"\nwrote {run_path} (the run, with embeddings), {png} (picture) and {out / 'top_k.txt'}")
    print(f"time: train+record {t_train:.1f}s, embeddings {t_embed:.1f}s, query {t_query:.1f}s")
    print(f"inspect the run: datavalue info {run_path}")
    return {"run": str(run_path), "png": str(png), "accuracy": acc, "t_train": t_train, "t_embed": t_embed, "t_query": t_query}


def _as_arrays(top) -> tuple[list[list[tuple[int, float]]], list[list[tuple[int, float]]]]:
    """``[(sample_id, score), ...]`` per test point, for the helpful and the harmful side."""
    helpful = [list(zip(map(int, i), map(float, s))) for i, s in zip(top.helpful_ids, top.helpful_scores)]
    harmful = [list(zip(map(int, i), map(float, s))) for i, s in zip(top.harmful_ids, top.harmful_scores)]
    return helpful, harmful


def _table(helpful, harmful, yq, ytrain) -> str:
    lines = ["test  label | most helpful training ids (label, score)          | most harmful training ids (label, score)"]
    for j in range(len(helpful)):
        h = ", ".join(f"{i}({ytrain[i]},{s:+.2g})" for i, s in helpful[j][:3])
        b = ", ".join(f"{i}({ytrain[i]},{s:+.2g})" for i, s in harmful[j][:3])
        lines.append(f"{j:4d}  {yq[j]:5d} | {h:48s} | {b}")
    return "\n".join(lines)


def _grid(path: Path, xq, yq, x, y, helpful, harmful) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(len(h) for h in helpful)
    n = len(xq)
    fig, axes = plt.subplots(n, 2 * k + 1, figsize=(1.2 * (2 * k + 1), 1.45 * n))
    axes = np.atleast_2d(axes)
    for j in range(n):
        ax = axes[j, 0]
        ax.imshow(xq[j].reshape(28, 28), cmap="gray_r")
        ax.set_title(f"test {yq[j]}", fontsize=8, color="navy")
        for col0, side, color in ((1, helpful[j], "tab:green"), (1 + k, harmful[j], "tab:red")):
            for c, (i, s) in enumerate(side):
                a = axes[j, col0 + c]
                a.imshow(x[i].reshape(28, 28), cmap="gray_r")
                a.set_title(f"#{i} label {y[i]}\n{s:+.1e}", fontsize=6, color=color)
                for sp in a.spines.values():
                    sp.set_color(color)
                    sp.set_linewidth(2.5)
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("test digit | most helpful training images (green) | most harmful (red)   score = loss(without) - loss(with)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
