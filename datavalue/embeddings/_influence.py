"""Final-model influence in the run's sketch: curvature-preconditioned rows from a FinalPass.

``build_influence(run)`` reads the no-update pass at the final weights (``<run>/final``, recorded by
:class:`datavalue.capture.FinalPass`) and writes, for every example ``z`` of the pass,

    v_z = (C + lambda I)^{-1} g_z / S        (``<run>/final/influence/<curvature>/values``)

where ``g_z`` is the sketched gradient of the example's summed loss ``L_z``, ``S = sum_z s_z`` the
objective's normaliser (label tokens under ``token_mean``, examples otherwise) and ``C`` the final
model's curvature of ``J = sum_z L_z / S`` in the sketch, block-diagonal over the run's blocks
(LoGra's construction: the curvature of the projected gradients is the projection of the
curvature). Then ``q . v_z`` is the influence function of Koh & Liang (2017) in the run's sign
convention, ``loss(without z) - loss(with z)``: removing ``z`` moves the optimum by
``H^{-1} g_z / S``.

Curvature (``C`` per block, from the pass's rows ``x``):

* ``"fisher"``: ``sum f f^T / S`` over the true-Fisher pseudo-gradients (labels drawn from the
  model; the Gauss-Newton matrix in expectation), as kronfluence's default;
* ``"empirical_fisher"``: ``sum g g^T / S`` over the examples' own gradients;
* ``"none"``: ``C = 0`` and ``lambda = 1``: the plain final-model gradient dot in the summed-loss
  convention (``q . g_z / S``).

Structure per block: ``"dense"`` keeps the block's full ``k_b x k_b`` matrix (exact within the
sketch); ``"ekfac"`` (Kronecker blocks) keeps the eigenbases ``Q_L, Q_R`` of ``sum X X^T`` and
``sum X^T X`` over the rows reshaped to ``(k_rows, k_cols)`` and the per-entry second moments of
the rotated rows, ``Lambda = sum (Q_L^T X Q_R)^2 / S`` (George et al. 2018's eigenvalue
correction, here of the sketched rows); ``"auto"`` is dense up to ``max_dense`` columns.

Damping: ``lambda_b = damping * mean eigenvalue of block b + damping_abs`` (kronfluence's
heuristic with ``damping=0.1``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from datavalue.errors import EmbeddingError, StoreNotFoundError
from datavalue.store import refuse_foreign_below, writes_run

logger = logging.getLogger(__name__)

CURVATURES = ("fisher", "empirical_fisher", "none")
STRUCTURES = ("auto", "dense", "ekfac")
ATTRS_KEY = "datavalue_influence"
#: Default largest block kept as a full ``k_b x k_b`` matrix by ``structure="auto"``.
MAX_DENSE = 4096


@dataclasses.dataclass(frozen=True)
class InfluenceInfo:
    """What :func:`build_influence` wrote.

    Attributes:
        path: the child run holding the pass (``<run>/final``).
        array: the array inside it (``influence/<curvature>/values``).
        curvature, damping, damping_abs: as built.
        n_rows: examples of the pass.
        normaliser: ``S`` (label tokens or examples).
        blocks: per block ``(name, structure, k, lambda)``.
    """

    path: str
    array: str
    curvature: str
    damping: float
    damping_abs: float
    n_rows: int
    normaliser: float
    blocks: tuple[tuple[str, str, int, float], ...]


def _final_run(path: str | os.PathLike[str]):
    from datavalue.store import FINAL_RUN, open_run, run_location

    target = Path(run_location(path)) / FINAL_RUN  # absolute; a file:// URL is the local path it names
    try:
        return open_run(target)
    except StoreNotFoundError as exc:
        raise EmbeddingError(
            f"{path} has no final-weights pass ({target} is missing). Record one first: "
            "`with datavalue.capture.FinalPass(run, model) as fp:` and, for every training batch, "
            "`with fp.batch(ids, tokens=...): loss.backward()` at the final weights."
        ) from exc


def unfinished_final_pass(final: Any) -> str | None:
    """Why the final-weights pass ``final`` (a :class:`~datavalue.store.Run`) is not a whole pass, or None.

    :class:`~datavalue.capture.FinalPass` writes ``integration["complete"] = False`` when it starts
    and sets it True on a clean ``close()`` only, so a pass cut short by an exception (recorded as
    ``integration["aborted"]``) or by ``kill -9`` says so. Passes written before the flag existed
    carry no ``complete`` key and are taken as whole.
    """
    integration = final.manifest.get("integration") or {}
    if not final.is_final_pass or integration.get("complete", True) is not False:
        return None
    parent = Path(str(final.path)).parent
    why = f"it was cut short by {integration['aborted']}" if integration.get("aborted") else (
        "it was never closed (the process stopped or was killed during the pass)")
    return (
        f"{final.path} is an unfinished final-weights pass: {why}, so it holds only the {final.n_rows} examples "
        f"recorded before that, and an influence built from it would leave the others out and estimate the final "
        f"model's curvature from a part of the data. Record the pass again over the whole training set "
        f"(`with FinalPass({str(parent)!r}, model, overwrite=True) as fp:` ...) and rebuild with "
        f"build_influence({str(parent)!r}, overwrite=True)."
    )


def _coverage(parent: Any, final: Any) -> None:
    """Log (WARNING) how many of the samples the run trained on the pass leaves out: a subset is
    allowed (an influence over part of the data), but it is usually a loop that stopped early."""
    trained = np.unique(np.asarray(parent.sample_id[: parent.n_rows]))
    seen = np.unique(np.asarray(final.sample_id[: final.n_rows]))
    missing = np.setdiff1d(trained, seen, assume_unique=True)
    if missing.size:
        logger.warning(
            "%s covers %d of the %d distinct samples %s trained on (%d missing, e.g. %s): the influence scores "
            "only the pass's examples; run the pass over the whole training set for an answer about all of them",
            final.path, trained.size - missing.size, trained.size, parent.path, missing.size, missing[:5].tolist())


def _read_rows(run: Any, name: str, n: int, cols: slice, chunk: int = 8192) -> np.ndarray:
    return np.concatenate([run.read(name, a, min(a + chunk, n))[:, cols].astype(np.float64) for a in range(0, n, chunk)]
                          or [np.zeros((0, cols.stop - cols.start))])


class _Dense:
    def __init__(self, X: np.ndarray, S: float, damping: float, damping_abs: float) -> None:
        evals, self.Q = np.linalg.eigh((X.T @ X) / S)
        evals = np.clip(evals, 0.0, None)
        self.lam = float(damping * evals.mean() + damping_abs)
        if not self.lam > 0:
            raise EmbeddingError(_zero_damping(evals.mean()))
        self.inv = 1.0 / (evals + self.lam)

    def apply(self, G: np.ndarray) -> np.ndarray:
        return ((G @ self.Q) * self.inv) @ self.Q.T


class _EKFAC:
    def __init__(self, X: np.ndarray, shape: tuple[int, int], S: float, damping: float, damping_abs: float) -> None:
        r, c = shape
        Xm = X.reshape(-1, r, c)
        flat_r = Xm.reshape(-1, c)  # rows of every example's matrix: R = sum_n X_n^T X_n
        flat_l = Xm.transpose(0, 2, 1).reshape(-1, r)  # its columns: L = sum_n X_n X_n^T
        L = flat_l.T @ flat_l / S
        R = flat_r.T @ flat_r / S
        _, self.QL = np.linalg.eigh(L)
        _, self.QR = np.linalg.eigh(R)
        lam_ij = np.zeros((r, c))
        for a in range(0, Xm.shape[0], 256):  # batched GEMMs (a three-operand einsum would loop in Python)
            lam_ij += ((self.QL.T @ Xm[a : a + 256] @ self.QR) ** 2).sum(0)
        lam_ij /= S
        self.lam = float(damping * lam_ij.mean() + damping_abs)
        if not self.lam > 0:
            raise EmbeddingError(_zero_damping(lam_ij.mean()))
        self.inv = 1.0 / (lam_ij + self.lam)
        self.shape = shape

    def apply(self, G: np.ndarray) -> np.ndarray:
        r, c = self.shape
        Gm = G.reshape(-1, r, c)
        rot = (self.QL.T @ Gm @ self.QR) * self.inv
        return (self.QL @ rot @ self.QR.T).reshape(G.shape[0], r * c)


def _zero_damping(mean: float) -> str:
    return (f"the block's curvature is zero (mean eigenvalue {mean:.3g}) and damping_abs is 0: nothing to invert. "
            "Pass damping_abs > 0 or curvature='none'.")


@writes_run("build_influence")  # one writer per run (datavalue.store.lock_run)
def build_influence(
    path: str | os.PathLike[str],
    *,
    curvature: str | None = None,
    damping: float = 0.1,
    damping_abs: float = 0.0,
    structure: str = "auto",
    max_dense: int = MAX_DENSE,
    overwrite: bool = False,
    progress: bool = True,
    max_memory: int | str | None = None,
) -> InfluenceInfo:
    """Precondition the final-weights pass of a run by the final model's sketched curvature.

    Args:
        path: the training run; its final pass (``<run>/final``) must be recorded.
        curvature: ``"fisher"`` (default when the pass recorded Fisher pseudo-gradients),
            ``"empirical_fisher"`` (default otherwise) or ``"none"``.
        damping: per block, ``lambda = damping * mean eigenvalue + damping_abs``.
        damping_abs: absolute damping added to every block (e.g. an L2 coefficient the training
            objective carried, for an exact Newton step on a convex model).
        structure: ``"auto"`` (dense blocks up to ``max_dense`` columns, EK-FAC above), ``"dense"``
            or ``"ekfac"`` (Kronecker blocks; dense blocks such as biases stay dense).
        max_dense: the largest block ``"auto"`` keeps dense.
        overwrite: replace an earlier build of the same curvature.
        progress: a progress bar over blocks.
        max_memory: bytes (or ``"8 GiB"``) the build may hold; default 90% of the available memory.
            The build holds the pass's rows (and Fisher rows) in float64 and the result; it is
            refused before anything is read or written when that does not fit.

    Raises:
        EmbeddingError: no final pass; the pass is stale (the run was trained further after it was
            recorded: ``integration["run_steps"]`` differs from the run's steps); the pass is
            unfinished (cut short by an exception or a kill: :func:`unfinished_final_pass`); the estimate
            exceeds ``max_memory`` (or the available memory); bad arguments.

    Returns:
        :class:`InfluenceInfo`. Query with ``Attributor(run, model, kind="influence")``.
    """
    from datavalue._memory import check_memory, parse_max_memory
    from datavalue.store import create_array, delete_path, open_run, stale_final_pass

    limit = parse_max_memory(max_memory, EmbeddingError)
    run = _final_run(path)
    parent = open_run(path)
    stale = stale_final_pass(parent, run) or unfinished_final_pass(run)
    if stale is not None:
        raise EmbeddingError(stale)
    if curvature is None:
        curvature = "fisher" if run.has_fisher else "empirical_fisher"
    if curvature not in CURVATURES:
        raise EmbeddingError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
    if structure not in STRUCTURES:
        raise EmbeddingError(f"structure must be one of {STRUCTURES}, got {structure!r}.")
    if curvature == "fisher" and not run.has_fisher:
        raise EmbeddingError(f"{run.path} holds no Fisher pseudo-gradients: record the pass with "
                             "FinalPass(..., curvature='fisher') or build curvature='empirical_fisher'.")
    for key, v in (("damping", damping), ("damping_abs", damping_abs)):  # True is not 1.0: say the number
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise EmbeddingError(f"{key} must be a finite number >= 0 (e.g. {key}={0.1 if key == 'damping' else 0.0}), "
                                 f"got {v!r} ({type(v).__name__}); a bool is not a damping.")
    if not (np.isfinite(damping) and damping >= 0 and np.isfinite(damping_abs) and damping_abs >= 0):
        raise EmbeddingError(f"damping and damping_abs must be finite and >= 0, got {damping!r}, {damping_abs!r}.")
    n, k = run.n_rows, run.proj_dim
    if n == 0:
        raise EmbeddingError(f"{run.path} holds no examples: run the pass over the training data first.")
    shares = np.asarray(run.weight, dtype=np.float64)[:n]
    S = float(shares.sum())
    if not S > 0:
        raise EmbeddingError(f"{run.path}: the examples' shares sum to {S} (no counted token?); nothing to normalise by.")
    widest = max((int(b["stop"]) - int(b["start"]) for b in run.blocks), default=k)
    rows = 8 * k * (2 * n + (run.n_fisher_rows if curvature == "fisher" else 0)) + 4 * n * k
    check_memory(rows + 3 * 8 * min(widest, max_dense) ** 2, what=f"{run.path}: this influence build",
                 parts={"rows": rows}, error=EmbeddingError, max_memory=limit,
                 fixes="record the pass with a smaller proj_dim, or lower max_dense= (larger blocks use EK-FAC)")
    name = f"influence/{curvature}/values"
    base = f"influence/{curvature}"
    if run.has_array(name) and not overwrite:
        raise EmbeddingError(f"{run.path} already has {name}; pass overwrite=True to rebuild it.")
    if overwrite and run.has_array(name):
        refuse_foreign_below(run.path, base)  # a user's file inside the build is never deleted with it
        delete_path(run.path, base)
    meta: dict[str, Any] = {"curvature": curvature, "damping": float(damping), "damping_abs": float(damping_abs),
                            "structure": structure, "n_rows": int(n), "normaliser": S, "run_steps": run.final_pass_steps,
                            "created": _dt.datetime.now(_dt.UTC).isoformat(), "complete": False}
    out = create_array(run.path, name, shape=(n, k), dtype="float32", chunks=(min(n, max(1, (4 << 20) // (4 * k))), k),
                       attrs={ATTRS_KEY: meta})
    blocks = run.blocks
    it: Any = blocks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(blocks, desc=f"influence ({curvature})")
    # read once: every block's columns come from the same rows
    G_all = _read_rows(run, "grads", n, slice(0, k))
    X_all = _read_rows(run, "fisher", run.n_fisher_rows, slice(0, k)) if curvature == "fisher" else G_all
    result = G_all / S  # curvature "none": the plain final-model gradient dot
    info = []
    for b in it:
        cols = slice(int(b["start"]), int(b["stop"]))
        kb = cols.stop - cols.start
        if curvature == "none":
            info.append((str(b["name"]), "identity", kb, 1.0))
            continue
        kron = b.get("kind") == "kron" and int(b["k_rows"]) * int(b["k_cols"]) == kb
        use_ekfac = kron and (structure == "ekfac" or (structure == "auto" and kb > max_dense))
        if not use_ekfac and structure != "dense" and kb > max_dense:
            raise EmbeddingError(f"block {b['name']!r} has {kb} columns, above max_dense={max_dense}, and is not a "
                                 "Kronecker block: raise max_dense or record with a smaller proj_dim for it.")
        X = X_all[:, cols]
        if use_ekfac:
            pre, kind = _EKFAC(X, (int(b["k_rows"]), int(b["k_cols"])), S, damping, damping_abs), "ekfac"
        else:
            pre, kind = _Dense(X, S, damping, damping_abs), "dense"
        result[:, cols] = pre.apply(G_all[:, cols]) / S
        info.append((str(b["name"]), kind, kb, float(pre.lam)))
    out[:] = result.astype(np.float32)
    _coverage(parent, run)
    meta.update(complete=True, blocks=[list(x) for x in info])
    out.attrs[ATTRS_KEY] = meta
    return InfluenceInfo(path=str(run.path), array=name, curvature=curvature, damping=float(damping),
                         damping_abs=float(damping_abs), n_rows=int(n), normaliser=S, blocks=tuple(info))
