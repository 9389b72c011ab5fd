"""Query results: the top-k table, and score matrices as data frames / Parquet files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datavalue._files import atomic_write
from datavalue.errors import DataValueError, QueryError, StoreExistsError

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


#: the names a Parquet result may have (what every writer of one and the CLI's ``--out`` accept)
PARQUET_SUFFIXES = (".parquet", ".pq")


def check_parquet_name(path: str | os.PathLike[str], *, flag: str | None = None) -> None:
    """Raise :class:`QueryError` unless ``path`` ends in ``.parquet`` or ``.pq`` (any case): the
    file written is Parquet, and a name that says another format (``results.csv``) would be opened
    as that format by whoever finds it. ``flag`` (``"--out"``) names the CLI option in the message.
    The one rule of :func:`write_parquet` and of the ``query`` and ``replay`` subcommands."""
    p = Path(path)
    if p.suffix.lower() in PARQUET_SUFFIXES:
        return
    given = f"{flag} {p}" if flag else str(p)
    fix = f"{flag} {p.with_suffix('.parquet')}" if flag else repr(str(p.with_suffix(".parquet")))
    raise QueryError(f"{given}: the results are written as Parquet, so the name must end in .parquet (or .pq), "
                     f"got {p.suffix or 'no suffix'!r}; e.g. {fix}. Nothing was written.")


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``frame`` to ``path`` (Parquet, no index); object columns of mixed types become strings.

    The file is written to a temporary beside ``path`` and moved into place, so a failed write
    leaves no partial file and, with ``overwrite=True``, the previous file as it was.

    Raises:
        StoreError: ``path`` lies inside a datavalue run (:func:`datavalue.store.refuse_inside_run`).
        QueryError: ``path`` does not end in ``.parquet``/``.pq`` (:func:`check_parquet_name`), lies
            under a regular file, or cannot be written (the OS's reason is given).
        StoreExistsError: ``path`` exists and ``overwrite`` is false, or ``path`` is a directory
            (as :func:`datavalue.store.archive_run`).
        Nothing is written in any of these cases.
    """
    from datavalue.store import refuse_inside_run

    refuse_inside_run(path, "a report")  # before the overwrite check: a run's own file is never replaced
    check_parquet_name(path)
    path = Path(path)
    if path.is_dir():
        raise StoreExistsError(f"{path} is a directory; give the path of a Parquet file to write (e.g. "
                               f"{path / 'results.parquet'}). Nothing was written.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QueryError(f"{path}: {parent} is a file, not a directory, so nothing can be written under it; "
                         "choose another path. Nothing was written.")
    if path.exists() and not overwrite:
        raise StoreExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == object and len({type(v) for v in frame[col]}) > 1:
            frame[col] = frame[col].map(lambda v: None if v is None else str(v))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            frame.to_parquet(tmp, index=False)
    except OSError as exc:
        if isinstance(exc, DataValueError):
            raise
        raise QueryError(f"cannot write {path}: {exc.strerror or exc}; choose a writable path. "
                         f"{'The previous file is unchanged.' if path.exists() else 'Nothing was written.'}") from exc
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
