"""``BuildConfig``: the options of a build, validated once, frozen, stored with the build.

Example:
    >>> import dataclasses
    >>> from datavalue.embeddings import BuildConfig
    >>> cfg = BuildConfig(curvature="fisher", segments=4)
    >>> dataclasses.replace(cfg, blocks="layer").blocks
    'layer'
    >>> BuildConfig.from_json(cfg.to_json()) == cfg
    True
    >>> BuildConfig(segments=2.7)
    Traceback (most recent call last):
    ...
    datavalue.errors.EmbeddingError: segments must be a positive int, got 2.7 (float); pass e.g. segments=4.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datavalue.errors import EmbeddingError

__all__ = ["BuildConfig"]

CURVATURES = (None, "hessian", "fisher", "empirical_fisher", "none")
DTYPES = ("float64", "float32")
STORAGE_DTYPES = ("float32", "float64")
BLOCKS = ("auto", "layer", "full")
CLIPPING = ("direction", "constant")
OPTIMIZERS = (None, "sgd", "adam", "adamw", "sgd-proxy")


def check_fisher_window(value: Any) -> int | str:
    """``fisher_window`` as given: an int ``>= 0`` (never a bool, nothing rounded) or ``"auto"``; which
    curvature it applies to and what ``"auto"`` becomes are decided by the build
    (:func:`datavalue.embeddings._plan.parse_fisher_window`)."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise EmbeddingError(
            f"fisher_window must be an int >= 0 (steps on each side whose recorded Fisher rows are pooled into a "
            f"step's curvature; 0: each step its own) or 'auto', got {value!r} ({type(value).__name__}); "
            "nothing is rounded."
        )
    if int(value) < 0:
        raise EmbeddingError(f"fisher_window must be >= 0 (0: each step's own Fisher) or 'auto', got {int(value)}.")
    return int(value)


def _int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not (isinstance(value, int) or hasattr(value, "__index__")) or int(value) < 1:
        raise EmbeddingError(f"{name} must be a positive int, got {value!r} ({type(value).__name__}); "
                             f"pass e.g. {name}=4.")
    return int(value)


def _dtype_name(value: Any) -> Any:
    try:
        return str(np.dtype(value))
    except TypeError:
        return value


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    if value not in allowed:
        raise EmbeddingError(f"{name} must be one of {allowed}, got {value!r}.")
    return value


@dataclass(frozen=True)
class BuildConfig:
    """How :func:`~datavalue.build_embeddings` builds (see its docstring for each field's long
    form). ``build_embeddings(path, config=cfg)`` or keywords; the validated config is stored in
    the build's metadata (``build_config``) and read back by :meth:`from_json`.
    """

    curvature: str | None = field(default=None, metadata={
        "help": "'hessian', 'fisher', 'empirical_fisher' or 'none'; None: the best the run recorded"})
    blocks: str = field(default="auto", metadata={
        "help": "'auto' (cross-layer operators when they fit, else per layer), 'layer' or 'full'"})
    dtype: str = field(default="float64", metadata={"help": "compute dtype of the recursion"})
    storage_dtype: str = field(default="float32", metadata={"help": "dtype of the stored embeddings"})
    segments: int = field(default=1, metadata={"help": "independent step segments (parallel on a dask client)"})
    chunk_rows: int | None = field(default=None, metadata={"help": "rows per output chunk (default: the run's)"})
    velocity: bool | None = field(default=None, metadata={
        "help": "keep the momentum part (needed to extend momentum runs); None: whenever the run uses momentum"})
    clipping: str = field(default="direction", metadata={
        "help": "'direction' (the clip coefficient's dependence on the batch is linearised) or 'constant'"})
    explode_threshold: float = field(default=1e6, metadata={
        "help": "largest |operator entry| before the build warns that the linearisation exploded"})
    optimizer: str | None = field(default=None, metadata={
        "help": "'sgd', 'adam'/'adamw' (Adam-aware) or 'sgd-proxy'; None: from the run's optimizer"})
    adam_second_moment: bool = field(default=True, metadata={
        "help": "Adam-aware builds: carry the second moment's dependence on the removed gradient"})
    fisher_window: int | str = field(default="auto", metadata={
        "help": "curvature='fisher': step t's Fisher pooled over steps t-W..t+W (an int W >= 0; 0: its own); 'auto': "
                "4 for sampled Fisher labels under one operator over all columns, else 0"})

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("curvature", _choice("curvature", self.curvature, CURVATURES))
        put("blocks", _choice("blocks", self.blocks, BLOCKS))
        put("dtype", _choice("dtype", _dtype_name(self.dtype), DTYPES))
        put("storage_dtype", _choice("storage_dtype", _dtype_name(self.storage_dtype), STORAGE_DTYPES))
        put("segments", _int("segments", self.segments))
        put("chunk_rows", _int("chunk_rows", self.chunk_rows, allow_none=True))
        if self.velocity is not None and not isinstance(self.velocity, bool):
            raise EmbeddingError(f"velocity must be True, False or None, got {self.velocity!r}.")
        put("clipping", _choice("clipping", self.clipping, CLIPPING))
        t = self.explode_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise EmbeddingError(f"explode_threshold must be a finite positive number, got {t!r}; pass e.g. 1e6.")
        put("explode_threshold", float(t))
        put("optimizer", _choice("optimizer", self.optimizer, OPTIMIZERS))
        if not isinstance(self.adam_second_moment, bool):
            raise EmbeddingError(f"adam_second_moment must be True or False, got {self.adam_second_moment!r}.")
        put("fisher_window", check_fisher_window(self.fisher_window))

    @staticmethod
    def help(name: str | None = None) -> str:
        """One field's help text, or every field's (``name=None``)."""
        fields = {f.name: f for f in dataclasses.fields(BuildConfig)}
        if name is not None:
            if name not in fields:
                raise KeyError(f"BuildConfig has no field {name!r}; fields: {sorted(fields)}")
            return fields[name].metadata["help"]
        return "\n".join(f"{n}: {f.metadata['help']} (default {f.default!r})" for n, f in fields.items())

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
