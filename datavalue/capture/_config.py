"""``CaptureConfig``: what a recorder records, validated once, frozen, round-tripped to the manifest.

Example:
    >>> import dataclasses
    >>> from datavalue.capture import CaptureConfig
    >>> cfg = CaptureConfig(proj_dim=4096, seed=7)
    >>> dataclasses.replace(cfg, storage_dtype="float16").storage_dtype
    'float16'
    >>> CaptureConfig.from_manifest({"capture_config": cfg.to_json()}) == cfg
    True
    >>> CaptureConfig(proj_dim=True)
    Traceback (most recent call last):
    ...
    datavalue.errors.RecorderError: proj_dim must be a positive int, a dict {block name: k} or None (exact), got True (bool); pass e.g. proj_dim=1024.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datavalue.capture._pipeline import parse_seed
from datavalue.errors import RecorderError

__all__ = ["CURVATURES", "CaptureConfig"]

LOSS_REDUCTIONS = ("mean", "sum", "token_mean")
CURVATURES = (None, "none", "empirical_fisher", "fisher", "hessian")
STORAGE_DTYPES = ("float32", "float16", "float64")
PRECONDITIONS = ("none", "adam")
#: ``fisher_max_classes=None`` (the default): the exact class expectation (up to
#: :data:`FISHER_EXACT_MAX_CLASSES` classes) for models with at most this many trainable parameters,
#: sampled labels above (docs/capture.md, "Curvature for the embeddings"; measured in docs/results/capture.md,
#: issue 20, second half).
FISHER_EXACT_MAX_PARAMS = 1 << 17
#: The class count up to which the default takes the exact expectation on a small model.
FISHER_EXACT_MAX_CLASSES = 16
#: Fields that must agree between a run on disk and a recorder resuming it.
RESUME_FIELDS = ("proj_dim", "seed", "sketch", "layers", "loss_reduction", "curvature", "storage_dtype",
                 "fisher_max_classes", "fisher_samples", "precondition")


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) or (
        hasattr(value, "__index__") and not isinstance(value, (bool, float)))
    if not ok or int(value) < 1:
        what = "a positive int or None" if allow_none else "a positive int"
        raise RecorderError(f"{name} must be {what}, got {value!r} ({type(value).__name__}).")
    return int(value)


def _parse_proj_dim(value: Any) -> int | dict[str, int] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = {}
        for name, k in value.items():
            if not isinstance(name, str):
                raise RecorderError(f"proj_dim dict keys must be block names (str), got {name!r}.")
            out[name] = _positive_int(f"proj_dim[{name!r}]", k)
        if not out:
            raise RecorderError("proj_dim is an empty dict; give each block's k, or pass an int or None.")
        return out
    # one rule with the dict form (``_positive_int``): a float is refused even when integral (32.0)
    if isinstance(value, (bool, float, np.bool_, np.floating)) or not (
        isinstance(value, int) or hasattr(value, "__index__")
    ) or int(value) < 1:
        raise RecorderError(
            f"proj_dim must be a positive int, a dict {{block name: k}} or None (exact), got {value!r} "
            f"({type(value).__name__}); pass e.g. proj_dim=1024."
        )
    return int(value)


def _parse_curvature(value: Any) -> tuple[str, ...]:
    kinds = (value,) if value is None or isinstance(value, str) else tuple(value)
    if not kinds or any(c not in CURVATURES for c in kinds):
        raise RecorderError(f"curvature must be one of {CURVATURES} or a sequence of them, got {value!r}.")
    return tuple(sorted({c for c in kinds if c not in (None, "none", "empirical_fisher")}))


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise RecorderError(f"{name} must be one of {tuple(allowed)}, got {value!r}.")
    return value


@dataclass(frozen=True)
class CaptureConfig:
    """What a recorder captures and how it stores it (see :class:`datavalue.Recorder` for the long
    form of each field). Frozen and validated on construction; ``dataclasses.replace`` gives a
    validated copy; :meth:`to_json`/:meth:`from_manifest` round-trip it through a run's manifest.
    """

    proj_dim: int | Mapping[str, int] | None = field(default=1024, metadata={
        "help": "total sketch columns split over layers, a dict {block name: k}, or None for exact gradients"})
    seed: int = field(default=0, metadata={"help": "root seed of the sketch matrices"})
    sketch: str | None = field(default=None, metadata={
        "help": "'orthogonal' (default for new runs) or 'gaussian'; None: the run's own kind on resume"})
    layers: tuple[str, ...] | None = field(default=None, metadata={
        "help": "module names to capture (default: every module with trainable parameters)"})
    loss_reduction: str = field(default="mean", metadata={
        "help": "how the stepped loss combines examples: 'mean' (1/|B|), 'sum' (1), 'token_mean' (tokens(z)/tokens(B))"})
    curvature: tuple[str, ...] = field(default=(), metadata={
        "help": "extra curvature recorded: () (empirical Fisher from the rows), ('fisher',), ('hessian',) or both"})
    storage_dtype: str = field(default="float32", metadata={"help": "'float32', 'float16' or 'float64' (oracles)"})
    on_nonfinite: str = field(default="raise", metadata={
        "help": "'raise' (write nothing for the step) or 'skip' (store zeros and flag the rows)"})
    fisher_max_classes: int | None = field(default=None, metadata={
        "help": "true Fisher: exact class expectation up to this many outputs, else sampled labels; None: "
                f"{FISHER_EXACT_MAX_CLASSES} for models of at most {FISHER_EXACT_MAX_PARAMS:,} trainable parameters, "
                "else 1 (sampled labels; on resume: the run's own)"})
    fisher_samples: int = field(default=1, metadata={"help": "true Fisher: sampled labels per example above that"})
    hessian_max_dim: int = field(default=4096, metadata={
        "help": "refuse curvature='hessian' above this many columns (k HVPs and k^2 numbers per step)"})
    record_optimizer_state: bool | None = field(default=None, metadata={
        "help": "store Adam/AdamW moments each step (default: whenever the optimizer is Adam/AdamW)"})
    chunk_rows: int | None = field(default=None, metadata={"help": "rows per Zarr chunk (default: about 4 MiB, a power of two)"})
    commit_every: int = field(default=32, metadata={
        "help": "commit at least every this many steps (plus every 10 s and on each full chunk): a kill -9 "
                "loses at most the last commit_every steps; 1 commits every step"})
    precondition: str = field(default="none", metadata={
        "help": "'none', or 'adam': whiten each per-sample gradient by the step's own Adam preconditioner "
                "per coordinate before the sketch (AdamW runs; materialises per-sample gradients)"})
    checkpoint_every: int | None = field(default=None, metadata={
        "help": "write the weights and the optimizer state into the run every N steps, at step 0 and after the "
                "last step (exact replay, datavalue.replay_influence); None: no checkpoints"})

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("proj_dim", _parse_proj_dim(self.proj_dim))
        put("seed", parse_seed(self.seed))
        put("sketch", _choice("sketch", self.sketch, (None, "orthogonal", "gaussian")))
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers):
                raise RecorderError(f"layers must be a list of module names, got {self.layers!r}.")
            put("layers", tuple(self.layers))
        put("loss_reduction", _choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS))
        put("curvature", _parse_curvature(self.curvature if self.curvature is None or len(self.curvature) else None))
        put("storage_dtype", _choice("storage_dtype", self.storage_dtype, STORAGE_DTYPES))
        put("on_nonfinite", _choice("on_nonfinite", self.on_nonfinite, ("raise", "skip")))
        put("fisher_max_classes", _positive_int("fisher_max_classes", self.fisher_max_classes, allow_none=True))
        put("fisher_samples", _positive_int("fisher_samples", self.fisher_samples))
        put("hessian_max_dim", _positive_int("hessian_max_dim", self.hessian_max_dim))
        put("chunk_rows", _positive_int("chunk_rows", self.chunk_rows, allow_none=True))
        put("commit_every", _positive_int("commit_every", self.commit_every))
        put("precondition", _choice("precondition", self.precondition, PRECONDITIONS))
        put("checkpoint_every", _positive_int("checkpoint_every", self.checkpoint_every, allow_none=True))
        if self.precondition != "none" and self.hessian:
            raise RecorderError("precondition='adam' does not support curvature='hessian'; use curvature='fisher'.")
        if self.record_optimizer_state is not None and not isinstance(self.record_optimizer_state, bool):
            raise RecorderError(f"record_optimizer_state must be True, False or None, got {self.record_optimizer_state!r}.")

    @property
    def fisher(self) -> bool:
        return "fisher" in self.curvature

    @property
    def hessian(self) -> bool:
        return "hessian" in self.curvature

    def resolved_fisher_max_classes(self, n_params: int, recorded: int | None = None) -> int:
        """``fisher_max_classes`` as a recorder applies it: the given value; else the ``recorded`` run's
        (resume); else :data:`FISHER_EXACT_MAX_CLASSES` for a model of at most
        :data:`FISHER_EXACT_MAX_PARAMS` trainable parameters and 1 (sampled labels) above.

        >>> CaptureConfig().resolved_fisher_max_classes(50_890), CaptureConfig().resolved_fisher_max_classes(800_000)
        (16, 1)
        """
        if self.fisher_max_classes is not None:
            return self.fisher_max_classes
        if recorded is not None:
            return int(recorded)
        return FISHER_EXACT_MAX_CLASSES if int(n_params) <= FISHER_EXACT_MAX_PARAMS else 1

    @staticmethod
    def help(name: str | None = None) -> str:
        """One field's help text, or every field's (``name=None``)."""
        fields = {f.name: f for f in dataclasses.fields(CaptureConfig)}
        if name is not None:
            if name not in fields:
                raise KeyError(f"CaptureConfig has no field {name!r}; fields: {sorted(fields)}")
            return fields[name].metadata["help"]
        return "\n".join(f"{n}: {f.metadata['help']} (default {f.default!r})" for n, f in fields.items())

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the manifest's ``capture_config``)."""
        out = dataclasses.asdict(self)
        out["proj_dim"] = dict(self.proj_dim) if isinstance(self.proj_dim, Mapping) else self.proj_dim
        out["layers"] = list(self.layers) if self.layers is not None else None
        out["curvature"] = list(self.curvature)
        return out

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> CaptureConfig:
        """The config a run was recorded with (runs older than ``capture_config`` are read from
        their ``projection``, ``loss_reduction`` and ``curvature`` entries)."""
        stored = manifest.get("capture_config")
        if stored is not None:
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in stored.items() if k in known})
        proj = manifest.get("projection") or {}
        curv = manifest.get("curvature") or {}
        fisher = curv.get("fisher") or {}
        kinds = [k for k in ("fisher", "hessian") if curv.get(k)]
        return cls(
            proj_dim=proj.get("proj_dim"), seed=proj.get("seed", 0), sketch=proj.get("sketch", "gaussian"),
            layers=proj.get("layers"), loss_reduction=manifest.get("loss_reduction", "mean"), curvature=tuple(kinds),
            storage_dtype=manifest.get("storage_dtype", "float32"),
            fisher_max_classes=fisher.get("max_classes", 16), fisher_samples=fisher.get("samples", 1),
        )

    def resume_diff(self, recorded: CaptureConfig) -> list[str]:
        """What differs from the ``recorded`` run's config on the fields a resume must keep."""
        out = []
        for name in RESUME_FIELDS:
            a, b = getattr(recorded, name), getattr(self, name)
            if name in ("sketch", "fisher_max_classes") and b is None:  # None: take the run's own
                continue
            if a != b:
                out.append(f"{name}: recorded {a!r}, now {b!r}")
        return out
