"""Attribution queries: which training occurrences made the model do this, out of core.

:class:`Attributor` pairs a recorded run (``datavalue.Recorder``) and its embeddings
(``datavalue.build_embeddings``) with the model at the weights to explain, and answers

- ``scores(loss_fn)``: ``(m, R)`` influence of every occurrence on every test point,
- ``scores(loss_fn, by="sample" | "owner" | "step")``: the same summed per sample / owner / step,
- ``top_k(loss_fn, k)``: the most helpful and most harmful, streamed,
- ``stage_influence(loss_fn)``: per-step influence over training (phase analysis),

and :class:`ReplayResult` reads the exact scores of ``datavalue.replay_influence`` with the same
groupings, top-k and tables; with ``to_dataset`` / ``save_parquet`` to take the results elsewhere (``load_model`` /
``load_loss`` turn the CLI's ``module:function`` specs into a model and a loss function). Sign convention everywhere:
``loss(without) - loss(with)``; positive = helpful. Embeddings are streamed through dask in row
chunks (threaded scheduler, or a ``dask.distributed.Client``); see ``docs/queries.md``.

The streaming kernels in :mod:`datavalue.query._stream` work on plain arrays (no torch); a new
aggregation is a chunk function plus a combine function handed to its ``stream_reduce``. The
names below load lazily so that dask workers unpickling those kernels never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datavalue.query._attributor import Attributor as Attributor
    from datavalue.query._load import load_loss as load_loss
    from datavalue.query._load import load_model as load_model
    from datavalue.query._load import resolve_callable as resolve_callable
    from datavalue.query._replay import ReplayResult as ReplayResult
    from datavalue.query._replay import replay_influence as replay_influence
    from datavalue.query._replay import replays as replays
    from datavalue.query._results import TopK as TopK
    from datavalue.query._results import check_parquet_name as check_parquet_name
    from datavalue.query._source import KINDS as KINDS
    from datavalue.query._source import built_curvatures as built_curvatures

_LAZY = {
    "Attributor": "datavalue.query._attributor",
    "TopK": "datavalue.query._results",
    "check_parquet_name": "datavalue.query._results",
    "KINDS": "datavalue.query._source",
    "built_curvatures": "datavalue.query._source",
    "load_loss": "datavalue.query._load",
    "load_model": "datavalue.query._load",
    "resolve_callable": "datavalue.query._load",
    "ReplayResult": "datavalue.query._replay",
    "replays": "datavalue.query._replay",
    "replay_influence": "datavalue.query._replay",
}

__all__ = ["KINDS", "Attributor", "ReplayResult", "TopK", "built_curvatures", "check_parquet_name", "load_loss", "load_model",
           "replay_influence", "replays", "resolve_callable"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'datavalue.query' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
