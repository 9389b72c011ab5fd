"""Schema of a run store: array names, dtypes, codecs, manifest checks.

The layout is documented for users in ``docs/store-format.md``; this module is its single
source of truth in code. Bump :data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.codecs import Crc32cCodec

SCHEMA_VERSION = 1
MANIFEST_KEY = "datavalue"

#: Per-occurrence arrays (one entry per row).
ROW_ARRAYS: dict[str, str] = {"sample_id": "int64", "weight": "float64", "flags": "uint8"}
#: Per-step arrays (one entry per committed step).
STEP_ARRAYS: dict[str, str] = {
    "lr": "float64",
    "epoch": "int64",
    "grad_scale": "float64",
    "momentum": "float64",
    "weight_decay": "float64",
}
FLAG_NONFINITE = 1

#: Row and step arrays whose rows past a partial chunk's end the writer fills with
#: :func:`unwritten_value` (runs written before that hold zeros there): a committed entry holding it
#: was read from an older copy of its chunk than the commit (``docs/errors_store.md``, notes).
MARKED_ARRAYS = ("grads", "fisher", "sample_id", "weight", "flags", "step_ptr", "fisher_ptr", "epoch", "lr", "grad_scale",
                 "momentum", "weight_decay")


def unwritten_value(dtype: Any) -> Any:
    """What fills the not-yet-written rows of a chunk: NaN for floats (committed rows are finite:
    non-finite gradients are stored as zeros and flagged, weights are checked finite), the minimum
    of a signed and the maximum of an unsigned integer type (a sample id of ``-2**63`` is refused
    on recording for this reason)."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return np.nan
    return np.iinfo(dt).min if dt.kind == "i" else np.iinfo(dt).max
#: Optional per-step *vector* arrays ``(T, k)`` in the gradient columns' layout, created on the first
#: step that carries them (``StepBlock.extra``). ``adam_m``/``adam_v``: the Adam/AdamW moments
#: ``exp_avg``/``exp_avg_sq`` *before* the step's update (exact runs: per parameter; projected runs:
#: each column holds its block's mean). ``adam_step`` ``(T,)``: the bias-correction step count the
#: update of step ``t`` uses (torch's ``state["step"]`` after the update). See docs/math.md, section 10.
#: ``hessian`` ``(T, k, k)``: the exact Hessian of step ``t``'s stepped loss at the weights before
#: the update, sketched on both sides (``S H_t S^T``; ``Recorder(..., curvature="hessian")``).
#: ``group_lr``, ``group_momentum``, ``group_weight_decay`` ``(T, G)`` (kind ``"group"``, float64): the
#: hyperparameters of each of the optimizer's ``G`` param groups at step ``t`` (runs whose optimizer has
#: more than one group); which columns belong to which group is in the manifest's
#: ``projection["param_groups"]`` (docs/store-format.md). The scalar ``lr``/``momentum``/``weight_decay``
#: arrays keep group 0's values for older readers.
OPTIONAL_STEP_ARRAYS: dict[str, str] = {
    "adam_m": "vector", "adam_v": "vector", "adam_step": "scalar", "hessian": "matrix",
    "group_lr": "group", "group_momentum": "group", "group_weight_decay": "group",
}
#: The per-group per-step arrays (kind ``"group"``), in the order :func:`datavalue.store.Run.param_groups` returns.
GROUP_STEP_ARRAYS = ("group_lr", "group_momentum", "group_weight_decay")

#: Root attribute holding :func:`manifest_digest` of the manifest the run was created with.
MANIFEST_DIGEST_KEY = "datavalue_manifest_digest"
#: Attribute holding a random id drawn when a run is created, on its root and on every array the
#: recorder writes: an array whose id differs from the root's was copied in from another run (runs
#: written before it have none and are not checked).
RUN_ID_KEY = "datavalue_run_id"
#: Root attribute saying the run binds every recorded chunk to its run id (value: the format version
#: of its record :data:`CHUNK_DIGEST_FILES`, ``datavalue.store._digest``); runs written before it have
#: none and read with a logged note.
CHUNK_DIGESTS_KEY = "datavalue_chunk_digests"
#: Root attribute: the run's resume history, ``[[first_step, session_id], ...]``, one entry appended
#: (before any data) each time a recorder resumes the run (``session_id``: a fresh random id). Two
#: copies of a run (``cp -r``) resumed separately get different entries: their histories fork.
#: Runs created before it have none (an empty history).
LINEAGE_KEY = "datavalue_lineage"
#: Attribute on every derived array (:func:`datavalue.store.create_array`): ``[n, sha256]`` of the
#: first ``n`` entries of the run's :data:`LINEAGE_KEY` when it was written. The run's history must
#: still start with those entries (it may have grown: resumed and extended since); otherwise the
#: array was built on another fork of the run (``datavalue.store.Run.foreign_derived``).
LINEAGE_STAMP_KEY = "datavalue_lineage_stamp"
#: Root attribute set (to 1) once the recorder has written the run's ``weights_digest`` member (the
#: weights after its committed steps, checked by ``Recorder(..., resume=True)``): a run that has it and
#: lacks the member (or its attributes) was damaged, and its weights can no longer be checked. Runs
#: written before it, or recorded without ``optimizer=`` (no digest), have none.
WEIGHTS_DIGEST_KEY = "datavalue_weights_digest"


def lineage_stamp(lineage: Any, n: int | None = None) -> list[Any]:
    """``[n, sha256]`` of the first ``n`` entries (default all) of a run's :data:`LINEAGE_KEY`."""
    entries = [[int(a), str(b)] for a, b in list(lineage or [])]
    n = len(entries) if n is None else int(n)
    text = json.dumps(entries[:n], separators=(",", ":"))
    return [n, hashlib.sha256(text.encode("ascii")).hexdigest()]
#: The run's chunk digest record (``datavalue.store._digest``): per recorded array and chunk,
#: ``crc32c(run_id || the chunk's crc32c trailer)``, written before the chunks of each commit, into
#: the two files in turn (in place: the newest whole one counts). In the ``commit`` array's folder:
#: it belongs to the commit, and zarr sees nothing new at the run's root.
CHUNK_DIGEST_FILES = ("commit/digests.0", "commit/digests.1")
#: Child run holding the no-update pass at the final weights (``datavalue.capture.FinalPass``).
FINAL_RUN = "final"
#: The top-level entries datavalue writes in a run directory: the run's arrays, the groups built
#: beside them (embeddings, influence, checkpoints, replays, the Adam preconditioner, the final
#: pass's child run) and the root ``zarr.json``; besides these only the writer's lock and
#: temporaries (``datavalue.store._runlock``, ``datavalue._files``). ``overwrite=True`` replaces a
#: run only while it holds nothing else: a file a user put in the run directory is never deleted.
RUN_MEMBERS = frozenset({
    "zarr.json", "grads", "fisher", "commit", "step_ptr", "fisher_ptr", *ROW_ARRAYS, *STEP_ARRAYS,
    *OPTIONAL_STEP_ARRAYS, FINAL_RUN, "embeddings", "influence", "checkpoints", "replay", "precondition",
    "weights_digest",
})
#: The manifest's ``integration["name"]`` of a final pass (its ``integration["run_steps"]``: the training
#: run's committed steps when the pass was recorded).
FINAL_PASS_INTEGRATION = "datavalue.FinalPass"
#: The manifest entries that define what the recorded numbers mean (bound by the digest).
CAPTURE_KEYS = ("projection", "loss_reduction", "capture_config")
LOSS_REDUCTIONS = ("mean", "sum", "token_mean")
SKETCHES = ("orthogonal", "gaussian")

#: Manifest keys that must match between a run on disk and a recorder resuming it.
RESUME_KEYS = ("schema_version", "projection", "model_fingerprint", "loss_reduction", "curvature", "storage_dtype")


def committed_length(name: str, *, steps: int, rows: int, fisher_rows: int) -> int:
    """How many entries of array ``name`` a commit of ``(steps, rows, fisher_rows)`` covers."""
    if name in ("grads", *ROW_ARRAYS):
        return rows
    if name == "fisher":
        return fisher_rows
    if name in ("step_ptr", "fisher_ptr"):
        return steps + 1
    return steps  # per-step arrays (STEP_ARRAYS, adam_*)


def package_versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``datavalue-engine`` and ``packages`` for a manifest (``"unknown"`` if absent)."""
    import importlib.metadata

    out = {}
    for pkg in ("datavalue-engine", *packages):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def float_codecs() -> list[Any]:
    """Codecs of the large float arrays: a crc32c checksum of each chunk, no compression.

    Sketched gradients are noise-like: zstd saved about 6% on a real MNIST run while costing the
    background writer CPU time (and the GIL) on every chunk, so it is off.
    """
    return [Crc32cCodec()]


def small_codecs() -> list[Any]:
    """Compressors of small arrays: only the checksum."""
    return [Crc32cCodec()]


def fingerprint_params(named_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Fingerprint of a model from its trainable parameter names and shapes.

    Example:
        >>> fingerprint_params({"w": [2, 3]})["digest"][:8]
        '5e3a3fbb'
    """
    canon = json.dumps(sorted((k, list(v)) for k, v in named_shapes.items()))
    return {"params": {k: list(v) for k, v in named_shapes.items()}, "digest": hashlib.sha256(canon.encode()).hexdigest()}


def diff_manifests(on_disk: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...] = RESUME_KEYS) -> list[str]:
    """Human-readable differences between two manifests on ``keys`` (empty when they agree)."""
    out = []
    for key in keys:
        a, b = _normalise(key, on_disk.get(key)), _normalise(key, new.get(key))
        if _canon(a) != _canon(b):
            out.append(f"{key}: recorded {_short(a)}, now {_short(b)}")
    return out


def _normalise(key: str, value: Any) -> Any:
    """Fill manifest defaults that older versions did not write (the projection's sketch kind was
    always Gaussian before it was recorded)."""
    if key == "projection" and isinstance(value, dict) and "sketch" not in value:
        return dict(value, sketch="gaussian")
    return value


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


def _short(x: Any, n: int = 160) -> str:
    s = _canon(x)
    return s if len(s) <= n else s[: n - 3] + "..."


@dataclass(frozen=True)
class StepBlock:
    """Everything recorded for one optimizer step; the unit the writer commits.

    Attributes:
        step: global step index t.
        sample_id: ``(b,)`` int64 ids of the examples in the batch.
        weight: ``(b,)`` float64 weights ``w_t(z)`` in the stepped loss.
        grads: ``(b, k)`` unweighted per-sample gradients (projected).
        flags: ``(b,)`` uint8 row flags (bit 0: non-finite, stored as zeros).
        lr, epoch, grad_scale, momentum, weight_decay: per-step scalars.
        fisher: ``(f, k)`` pseudo-gradient rows (weight included) or ``None``.
        extra: optional per-step entries named in :data:`OPTIONAL_STEP_ARRAYS` (``(k,)`` vectors or
            scalars), e.g. the Adam moments; steps without them are stored as NaN.
    """

    step: int
    sample_id: np.ndarray
    weight: np.ndarray
    grads: np.ndarray
    flags: np.ndarray
    lr: float
    epoch: int = -1
    grad_scale: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    fisher: np.ndarray | None = None
    extra: dict[str, Any] | None = None

    @property
    def n_rows(self) -> int:
        return int(self.sample_id.shape[0])


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's capture-defining part (:data:`CAPTURE_KEYS`; ``capture_config`` only
    when present, a projection without ``sketch`` read as Gaussian). The writer stores it beside the
    manifest at creation; an edited ``projection.seed`` or ``loss_reduction`` no longer matches it.

    Example:
        >>> manifest_digest({"projection": {"blocks": []}}) == manifest_digest({"projection": {"blocks": []}})
        True
    """
    part = {key: _normalise(key, manifest[key]) for key in CAPTURE_KEYS if key in manifest}
    return hashlib.sha256(_canon(part).encode()).hexdigest()


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def manifest_problems(manifest: Any) -> list[str]:
    """What is malformed in a run's manifest (empty when it is well formed).

    Required: ``projection`` (a dict); a projected run (``proj_dim`` not None) also needs an int
    ``seed``. Checked when present (hand-made runs, e.g. ``StepSink``'s doctest, may omit them;
    readers then use the documented defaults): ``projection.blocks`` (a list of dicts whose
    ``start``/``stop``, when given, are ints with ``0 <= start <= stop``; absent: no blocks), ``proj_dim`` (int > 0, a dict of them, or None), ``seed`` (int), ``sketch``
    (:data:`SKETCHES`), ``loss_reduction`` (:data:`LOSS_REDUCTIONS`), ``model_fingerprint`` (a dict
    with a str ``digest``), ``optimizer`` / ``curvature`` / ``capture_config`` (dicts),
    ``storage_dtype`` (``float16``/``float32``/``float64``).
    """
    if not isinstance(manifest, dict):
        return [f"the manifest is a {type(manifest).__name__}, not a JSON object"]
    out: list[str] = []
    proj = manifest.get("projection")
    if "projection" not in manifest:
        out.append("'projection' is missing")
    elif not isinstance(proj, dict):
        out.append(f"'projection' is a {type(proj).__name__}, not an object")
    else:
        blocks = proj.get("blocks", [])
        if not isinstance(blocks, list):
            out.append(f"'projection.blocks' is a {type(blocks).__name__}, not a list")
        else:
            for i, b in enumerate(blocks):
                if not isinstance(b, dict):
                    out.append(f"'projection.blocks[{i}]' is not an object")
                elif "start" in b or "stop" in b:
                    a, z = b.get("start"), b.get("stop")
                    if not (_is_int(a) and _is_int(z) and 0 <= a <= z):
                        out.append(f"'projection.blocks[{i}]' has start={a!r}, stop={z!r} (ints, 0 <= start <= stop)")
        pd = proj.get("proj_dim")
        dims = list(pd.values()) if isinstance(pd, dict) else [pd]
        if not all(d is None or (_is_int(d) and d > 0) for d in dims) or (isinstance(pd, dict) and None in dims):
            out.append(f"'projection.proj_dim' is {pd!r} (a positive int, a dict of them, or null)")
        if "seed" in proj and not _is_int(proj["seed"]):
            out.append(f"'projection.seed' is {proj['seed']!r} (an int)")
        if pd is not None and "seed" not in proj:
            out.append("'projection.seed' is missing (a projected run needs the seed of its sketch)")
        if "sketch" in proj and proj["sketch"] not in SKETCHES:
            out.append(f"'projection.sketch' is {proj['sketch']!r} (one of {SKETCHES})")
    if "loss_reduction" in manifest and manifest["loss_reduction"] not in LOSS_REDUCTIONS:
        out.append(f"'loss_reduction' is {manifest['loss_reduction']!r} (one of {LOSS_REDUCTIONS})")
    fp = manifest.get("model_fingerprint")
    # {} : no model recorded (runs written by hand or by other tools); otherwise it must carry its digest
    if "model_fingerprint" in manifest and not (isinstance(fp, dict) and (not fp or isinstance(fp.get("digest"), str))):
        out.append("'model_fingerprint' is not an object with a str 'digest' (or {} when no model was recorded)")
    for key in ("optimizer", "curvature", "capture_config"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            out.append(f"'{key}' is a {type(manifest[key]).__name__}, not an object")
    if "storage_dtype" in manifest and manifest["storage_dtype"] not in ("float16", "float32", "float64"):
        out.append(f"'storage_dtype' is {manifest['storage_dtype']!r} (float16, float32 or float64)")
    return out
