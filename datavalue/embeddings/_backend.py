"""The array backend of the recursion: numpy (the default) or torch tensors on a CPU or CUDA device.

The math core (:mod:`._sgd`, :mod:`._adam`, :mod:`._state`, :mod:`._gemm`) is written once against a
small namespace in the spirit of the Python array API: ``xp = namespace(state.M)`` gives the
functions the recursion needs (``asarray``, ``zeros``, ``outer``, ``sqrt``, an in-place diagonal
update, ...) for the array type it is handed, so the same code runs on numpy arrays and on torch
tensors. Plain operators (``@``, ``*``, slicing, ``.T``, in-place ``-=``) are common to both and are
used directly. This module is small on purpose instead of a dependency on ``array_api_compat``: the
recursion needs a dozen functions, and numpy's path must stay exactly the code it was (its
in-place BLAS GEMMs live in :mod:`._gemm`).

torch is imported only when a torch device is asked for (``build_embeddings(..., device="cuda")``);
``import datavalue.embeddings`` never imports it. Reads from the store stay numpy; the streaming
scan (:mod:`._stream`) moves each window of rows to the device once and brings each finished output
chunk back once (:meth:`Backend.asarray`, :meth:`Backend.to_numpy`).

Extend by adding a :class:`Backend` subclass (e.g. CuPy) and a branch in :func:`get_backend` and
:func:`namespace`.

Example:
    >>> xp = get_backend(None)
    >>> M = xp.zeros((3, 2), "float64")
    >>> xp.add_diag(M, 1.0)
    >>> M.tolist()
    [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    >>> namespace(M) is xp
    True
"""

from __future__ import annotations

import abc
import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from datavalue.errors import EmbeddingError

__all__ = ["Backend", "NumpyBackend", "TorchBackend", "get_backend", "namespace", "parse_device"]


class Backend(abc.ABC):
    """The array functions the recursion uses beyond the operators numpy and torch share."""

    #: ``None`` for numpy; a torch device string (``"cpu"``, ``"cuda:0"``) for torch.
    device: str | None = None
    is_numpy: bool = False

    @abc.abstractmethod
    def dtype(self, name: Any) -> Any:
        """The backend's dtype for ``"float32"``/``"float64"`` (or a dtype of either library)."""

    @abc.abstractmethod
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` (numpy array, scalar or backend array) as a backend array on this device, copied only
        where a move or a cast needs it."""

    @abc.abstractmethod
    def to_numpy(self, x: Any) -> np.ndarray:
        """``x`` as a host numpy array (one device-to-host copy for a device tensor)."""

    @abc.abstractmethod
    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any: ...

    @abc.abstractmethod
    def copy(self, x: Any) -> Any: ...

    @abc.abstractmethod
    def outer(self, a: Any, b: Any) -> Any: ...

    @abc.abstractmethod
    def sqrt(self, x: Any) -> Any: ...

    @abc.abstractmethod
    def concat(self, parts: list[Any], axis: int) -> Any: ...

    @abc.abstractmethod
    def add_diag(self, X: Any, v: Any) -> None:
        """``X[i, i] += v`` (``v`` scalar or ``(k,)``) for ``i < k = X.shape[1] <= X.shape[0]``, in place."""

    @abc.abstractmethod
    def any(self, x: Any) -> bool: ...

    @abc.abstractmethod
    def all_finite(self, x: Any) -> bool: ...

    def max_abs(self, a: Any) -> float:
        """``max |a|`` in two reductions without an ``abs()`` temporary (0 for ``None`` or empty)."""
        if a is None or not self.size(a):
            return 0.0
        return max(float(a.max()), -float(a.min()))

    @abc.abstractmethod
    def size(self, a: Any) -> int: ...

    @property
    def splits(self) -> bool:
        """Whether the scan splits its GEMMs over its own thread pool (:func:`._gemm.gemm_threads`): on a CPU."""
        return True

    def scan_threads(self) -> contextlib.AbstractContextManager[None]:
        """Context held by the thread that runs a scan: the library's own threads held to one there
        (numpy's BLAS is held by the builder's ``one_blas_thread``; nothing to do here)."""
        return contextlib.nullcontext()


class NumpyBackend(Backend):
    """numpy: the default, and the code the recursion always ran."""

    device = None
    is_numpy = True

    def dtype(self, name: Any) -> np.dtype:
        return np.dtype(str(name).replace("torch.", ""))

    def asarray(self, x: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(x, dtype=None if dtype is None else self.dtype(dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=self.dtype(dtype))

    def copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def outer(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.outer(a, b)

    def sqrt(self, x: np.ndarray) -> np.ndarray:
        return np.sqrt(x)

    def concat(self, parts: list[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(parts, axis=axis)

    def add_diag(self, X: np.ndarray, v: Any) -> None:
        k = X.shape[1]
        X[np.arange(k), np.arange(k)] += v

    def any(self, x: np.ndarray) -> bool:
        return bool(np.any(x))

    def all_finite(self, x: np.ndarray) -> bool:
        # the sum is finite only if every entry is; a non-finite sum from finite entries (overflow) falls back
        return bool(np.isfinite(np.sum(x))) or bool(np.isfinite(x).all())

    def size(self, a: np.ndarray) -> int:
        return int(a.size)


class TorchBackend(Backend):
    """torch tensors on one device (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device
        self._dev = torch.device(device)

    def __repr__(self) -> str:
        return f"TorchBackend({self.device!r})"

    def dtype(self, name: Any) -> Any:
        if isinstance(name, self.torch.dtype):
            return name
        return {"float32": self.torch.float32, "float64": self.torch.float64}[str(np.dtype(name))]

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        dt = None if dtype is None else self.dtype(dtype)
        if isinstance(x, self.torch.Tensor):
            return x.to(device=self._dev, dtype=dt)
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            x = np.array(x)  # torch refuses read-only memory (store windows, broadcast views)
        return self.torch.as_tensor(x, dtype=dt, device=self._dev)

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, self.torch.Tensor):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.torch.zeros(shape, dtype=self.dtype(dtype), device=self._dev)

    def copy(self, x: Any) -> Any:
        return x.clone()

    def outer(self, a: Any, b: Any) -> Any:
        return self.torch.outer(a, b)

    def sqrt(self, x: Any) -> Any:
        return self.torch.sqrt(x)

    def concat(self, parts: list[Any], axis: int) -> Any:
        return self.torch.cat(parts, dim=axis)

    def add_diag(self, X: Any, v: Any) -> None:
        d = X.diagonal()  # a view of the leading k x k block's diagonal
        if isinstance(v, self.torch.Tensor):
            d.add_(v)
        else:
            d.add_(self.asarray(v, X.dtype) if np.ndim(v) else float(v))

    def any(self, x: Any) -> bool:
        return bool(self.torch.any(x != 0))

    def all_finite(self, x: Any) -> bool:
        return bool(self.torch.isfinite(x.sum())) or bool(self.torch.isfinite(x).all())

    def size(self, a: Any) -> int:
        return int(a.numel())

    @property
    def splits(self) -> bool:
        return self._dev.type == "cpu"

    @contextlib.contextmanager
    def scan_threads(self) -> Iterator[None]:
        """On a CPU, torch's intra-op threads held to one for the scan (they spin between calls like
        BLAS's; the scan splits its GEMMs over its own pool instead, see ``_gemm``). A no-op on CUDA.

        ``torch.set_num_threads`` is part per thread, part process-wide, and segments run scans on
        several threads at once: the first scan to enter records the setting, every scan sets one
        thread for its own thread, and the last to leave puts the recorded setting back (all under one
        lock, so the restore comes after every other scan's change)."""
        if self._dev.type != "cpu":
            yield
            return
        torch = self.torch
        me = threading.get_ident()
        with _THREADS_LOCK:
            # a thread a scan already held to one thread reports 1 (the setting is per thread under OpenMP),
            # not the process's: only a thread no scan touched tells the setting to put back
            if _THREADS["depth"] == 0 and me not in _TOUCHED:
                _THREADS["old"] = torch.get_num_threads()
            _THREADS["depth"] += 1
            _TOUCHED.add(me)
            torch.set_num_threads(1)
        try:
            yield
        finally:
            with _THREADS_LOCK:
                _THREADS["depth"] -= 1
                if _THREADS["depth"] == 0:
                    torch.set_num_threads(_THREADS["old"])
                    _TOUCHED.discard(me)  # this thread holds the process's setting again


_NUMPY = NumpyBackend()
# scans holding torch's CPU threads at one (TorchBackend.scan_threads): how many, and the setting before the first
_THREADS_LOCK = threading.Lock()
_THREADS: dict[str, int] = {"depth": 0, "old": 1}
# threads whose own torch setting a scan left at one (pool threads of segmented builds)
_TOUCHED: set[int] = set()


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def namespace(*arrays: Any) -> Backend:
    """The backend of the first torch tensor among ``arrays`` (on its device), else numpy.

    Never imports torch: a tensor can only come from a program that already did.
    """
    for a in arrays:
        if a is not None and _is_torch(a):
            return _torch_backend(str(a.device))
    return _NUMPY


@functools.lru_cache(maxsize=8)
def _torch_backend(device: str) -> TorchBackend:
    return TorchBackend(device)


def parse_device(device: Any) -> str | None:
    """Validate a build's ``device=``: ``None`` or ``"numpy"`` (numpy, the default), else a torch device
    (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``), returned as its string. Raises
    :class:`~datavalue.errors.EmbeddingError` saying what is missing and how to fix it."""
    if device is None or device == "numpy":
        return None
    name = str(device)
    try:
        import torch
    except ImportError as e:
        raise EmbeddingError(
            f"device={name!r} runs the build on torch, but torch cannot be imported ({e}). Install torch "
            "(pip install torch; a CUDA build for a GPU), or leave device=None for numpy."
        ) from e
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise EmbeddingError(
            f"device={name!r} is not a torch device ({e}); use None (numpy), 'cpu', 'cuda' or 'cuda:<index>'."
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EmbeddingError(
                f"device={name!r} asks for a CUDA GPU, but torch {torch.__version__} sees none "
                f"(torch.cuda.is_available() is False; CUDA build: {torch.version.cuda or 'no, a CPU-only wheel'}). "
                "Install a CUDA build of torch on a machine with an NVIDIA GPU, or build with device='cpu' "
                "(torch on the CPU) or device=None (numpy)."
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise EmbeddingError(
                f"device={name!r}: this machine has {n} CUDA device(s) (cuda:0 .. cuda:{n - 1}); pick one of those."
            )
    elif dev.type != "cpu":
        raise EmbeddingError(f"device={name!r}: the build runs on 'cpu' or 'cuda' torch devices, got {dev.type!r}.")
    return str(dev)


def get_backend(device: str | None) -> Backend:
    """The backend of a parsed ``device`` (:func:`parse_device`): numpy for ``None``."""
    if device is None:
        return _NUMPY
    return _torch_backend(str(device))
