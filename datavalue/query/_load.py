"""Loading user code named on a command line: ``module:function`` or ``path/to/file.py:function``.

Also turns what a ``--data`` function returns into a loss function, and checks a ``--model``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datavalue.errors import QueryError


def resolve_callable(spec: str, option: str = "function") -> Callable[..., Any]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` to the function.

    The current directory is importable (as with ``python -m``); a file's own directory is put on
    ``sys.path`` so that it can import its neighbours.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise QueryError(f"{option} must be module:function or path/to/file.py:function, got {spec!r}.")
    if target.endswith(".py") or os.sep in target or "/" in target:
        file = Path(target).expanduser().resolve()
        if not file.is_file():
            raise QueryError(f"{option}: no such file {file}.")
        if str(file.parent) not in sys.path:
            sys.path.insert(0, str(file.parent))
        mod_name = f"_datavalue_user_{file.stem}_{zlib.crc32(str(file).encode()):08x}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, file)
        if spec_obj is None or spec_obj.loader is None:
            raise QueryError(f"{option}: cannot import {file}.")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        spec_obj.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise QueryError(f"{option}: cannot import module {target!r}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise QueryError(f"{option}: {target} has no function {name!r}.")
    return fn


def as_loss_fn(data: Any, spec: str = "--data") -> Callable[[Any], Any]:
    """A loss function as is, or ``(x, y)`` turned into per-example cross-entropy. A model, or a
    callable that cannot take the model as its one argument, is refused (P6-12)."""
    if isinstance(data, nn.Module):
        raise QueryError(
            f"--data {spec} returned a torch.nn.Module ({type(data).__name__}), not the query: it must return "
            "loss_fn(model) -> (m,) per-example losses, or a tuple (x, y) of test inputs and labels (the model "
            "comes from --model)."
        )
    if callable(data):
        try:
            inspect.signature(data).bind(None)
        except TypeError:
            raise QueryError(
                f"--data {spec} returned {getattr(data, '__qualname__', type(data).__name__)}, which cannot be called "
                "with one argument: it must return loss_fn(model) -> (m,) per-example losses (one argument, the "
                "model), or a tuple (x, y)."
            ) from None
        except ValueError:  # no signature to read (a builtin): called as is
            pass
        return data
    if isinstance(data, Sequence) and len(data) == 2:
        x, y = (torch.as_tensor(v) for v in data)
        return lambda model: F.cross_entropy(model(x), y, reduction="none")
    raise QueryError(f"--data {spec} must return loss_fn(model) -> (m,) losses or a tuple (x, y); "
                     f"got {type(data).__name__}.")




def load_model(spec: str) -> nn.Module:
    """Call the function ``spec`` names and check that it returned a ``torch.nn.Module``."""
    model = resolve_callable(spec, "--model")()
    if not isinstance(model, nn.Module):
        raise QueryError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def load_loss(spec: str) -> Callable[[nn.Module], torch.Tensor]:
    """Call the function ``spec`` names; a returned ``(x, y)`` becomes per-example cross-entropy."""
    return as_loss_fn(resolve_callable(spec, "--data")(), spec)
