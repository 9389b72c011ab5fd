"""datavalue: training-data attribution and valuation.

Record per-sample gradients during training (:class:`Recorder`), build data value embeddings
(:func:`build_embeddings`), ask which training examples made the model do something
(:class:`Attributor`), and turn contributions into Shapley values and royalties
(:mod:`datavalue.shapley`).

Sign convention everywhere: influence = loss(without occurrence) - loss(with); positive = helpful.

Heavy dependencies load lazily: ``from datavalue import shapley`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ below loads each name on first use
    from datavalue import capture as capture
    from datavalue import embeddings as embeddings
    from datavalue import errors as errors
    from datavalue import query as query
    from datavalue import shapley as shapley
    from datavalue import store as store
    from datavalue import testing as testing
    from datavalue.capture import Recorder as Recorder
    from datavalue.capture import inspect as inspect
    from datavalue.capture import per_sample_gradients as per_sample_gradients
    from datavalue.embeddings import build_embeddings as build_embeddings
    from datavalue.query import Attributor as Attributor
    from datavalue.query import replay_influence as replay_influence
    from datavalue.store import open_run as open_run

__version__ = "0.1.0"

_LAZY = {
    "Recorder": ("datavalue.capture", "Recorder"),
    "inspect": ("datavalue.capture", "inspect"),
    "per_sample_gradients": ("datavalue.capture", "per_sample_gradients"),
    "replay_influence": ("datavalue.query", "replay_influence"),
    "build_embeddings": ("datavalue.embeddings", "build_embeddings"),
    "Attributor": ("datavalue.query", "Attributor"),
    "open_run": ("datavalue.store", "open_run"),
}
_SUBMODULES = {"capture", "store", "embeddings", "shapley", "testing", "errors", "query"}

__all__ = [*sorted(_LAZY), *sorted(_SUBMODULES), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"datavalue.{name}")
    raise AttributeError(f"module 'datavalue' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
