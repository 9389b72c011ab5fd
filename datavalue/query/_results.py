"""Query results: the top-k table, and score matrices as data frames / Parquet files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datavalue.errors import StoreExistsError

ID_COLUMN = {None: "row", "sample": "sample_id", "owner": "owner", "step": "step"}


@dataclasses.dataclass(frozen=True)
class TopK:
    """The ``k`` most helpful and most harmful columns for every test point.

    Helpful = the ``k`` largest scores (in decreasing order), harmful = the ``k`` smallest (in
    increasing order, so the most harmful first). Scores follow the package's sign convention,
    ``loss(without) - loss(with)``: positive = helpful, negative = harmful. With fewer than ``2k``
    columns the two lists overlap; a "harmful" entry may then have a positive score.

    Attributes:
        by: ``None`` (occurrences), ``"sample"``, ``"owner"`` or ``"step"``.
        helpful_ids, harmful_ids: ``(m, k)`` labels (row index for occurrences, sample id, owner, step).
        helpful_scores, harmful_scores: ``(m, k)`` float64.
        details: for occurrences, a frame indexed by row with ``step, epoch, sample_id, weight, lr``
            of the rows that appear (``None`` otherwise).
    """

    by: str | None
    helpful_ids: np.ndarray
    helpful_scores: np.ndarray
    harmful_ids: np.ndarray
    harmful_scores: np.ndarray
    details: pd.DataFrame | None = None

    @property
    def k(self) -> int:
        return int(self.helpful_ids.shape[1])

    @property
    def n_test(self) -> int:
        return int(self.helpful_ids.shape[0])

    def to_frame(self) -> pd.DataFrame:
        """Long table: ``test, kind ("helpful"/"harmful"), rank (0 = strongest), <id>, score`` (+ details)."""
        m, k = self.helpful_ids.shape
        idc = ID_COLUMN[self.by]
        frames = []
        for kind, ids, scores in (("helpful", self.helpful_ids, self.helpful_scores),
                                  ("harmful", self.harmful_ids, self.harmful_scores)):
            frames.append(pd.DataFrame({
                "test": np.repeat(np.arange(m), k),
                "kind": kind,
                "rank": np.tile(np.arange(k), m),
                idc: ids.reshape(-1),
                "score": scores.reshape(-1),
            }))
        out = pd.concat(frames, ignore_index=True).sort_values(["test", "kind", "rank"], ascending=[True, False, True],
                                                               kind="stable", ignore_index=True)
        if self.details is not None:
            out = out.join(self.details.drop(columns=[c for c in self.details.columns if c in out.columns]), on=idc)
        return out

    def to_parquet(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write :meth:`to_frame` as Parquet; refuses to replace a file unless ``overwrite``."""
        return write_parquet(self.to_frame(), path, overwrite=overwrite)


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``frame`` to ``path`` (Parquet, no index); object columns of mixed types become strings."""
    from datavalue.store import refuse_inside_run

    refuse_inside_run(path, "a report")  # before the overwrite check: a run's own file is never replaced
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == object and len({type(v) for v in frame[col]}) > 1:
            frame[col] = frame[col].map(lambda v: None if v is None else str(v))
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def score_frame(scores: np.ndarray, labels: np.ndarray, by: str | None, details: pd.DataFrame | None = None,
                *, prefix: str = "test_") -> pd.DataFrame:
    """Wide table: one row per column of ``scores`` (its label, details), one column per test point."""
    idc = ID_COLUMN[by]
    out = pd.DataFrame({idc: labels})
    if details is not None:
        out = pd.concat([out, details.reset_index(drop=True).drop(columns=[idc], errors="ignore")], axis=1)
    values = pd.DataFrame(np.asarray(scores).T, columns=[f"{prefix}{i}" for i in range(scores.shape[0])])
    return pd.concat([out, values], axis=1)


def dataset_values(scores: np.ndarray, labels: np.ndarray, ids: np.ndarray, fill_value: float) -> np.ndarray:
    """``(n_ids, m)`` score of each id (``fill_value`` where the id is not among ``labels``, sorted)."""
    pos = np.searchsorted(labels, ids)
    pos_c = np.minimum(pos, max(labels.size - 1, 0))
    hit = (labels.size > 0) & (labels[pos_c] == ids) if labels.size else np.zeros(ids.shape, bool)
    out = np.full((ids.shape[0], scores.shape[0]), fill_value, dtype=np.float64)
    out[hit] = np.asarray(scores, np.float64).T[pos_c[hit]]
    return out


def describe(values: Any) -> str:
    return f"{type(values).__name__} of shape {getattr(values, 'shape', None)}"


def occurrence_details(run: Any, rows: np.ndarray) -> pd.DataFrame:
    """The recorded details of global rows ``rows`` of ``run``: ``step, epoch, sample_id, weight, lr,
    grad_scale``, indexed by row (what query and replay tables show beside the scores)."""
    steps = run.row_step[rows]
    return pd.DataFrame(
        {"step": steps, "epoch": run.epoch[steps], "sample_id": run.sample_id[rows], "weight": run.weight[rows],
         "lr": run.lr[steps], "grad_scale": run.grad_scale[steps]},
        index=pd.Index(rows, name="row"),
    )
