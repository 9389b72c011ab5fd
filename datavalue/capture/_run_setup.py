"""What a torch recorder checks and writes when it opens a run: the capture config's defaults, the
checks that a resumed run was recorded with the same config and optimizer, and the run manifest."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from typing import Any

from torch import nn

from datavalue.capture._config import CaptureConfig
from datavalue.capture._engine import Engine, trainable_fingerprint
from datavalue.capture._optim import optimizer_config
from datavalue.capture._optim_resume import recorded_manifest, refuse_other_optimizer
from datavalue.errors import StoreMismatchError
from datavalue.store import fingerprint_params, package_versions

#: Wrappers that hold the user's module under one attribute and prefix its parameter names with it:
#: type name -> (attribute, how the user makes it). Recorders, FinalPass and queries see the module
#: inside, so that runs never carry ``module.`` / ``_orig_mod.`` and the plain model queries them.
WRAPPERS = {
    "DistributedDataParallel": ("module", "torch.nn.parallel.DistributedDataParallel(model)"),
    "DataParallel": ("module", "torch.nn.DataParallel(model)"),
    "OptimizedModule": ("_orig_mod", "torch.compile(model)"),
}


def unwrap_model(model: Any, *, recorded: Any = None) -> Any:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers.

    ``recorded``: the parameter names a run recorded (its manifest's ``model_fingerprint["params"]``);
    a run recorded by an earlier version with a wrapper's prefix (``module.0.weight``) keeps the
    wrapper that gives those names, so that such a run is still queried with the wrapped model.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(m)) is m
        True
    """
    names = set(recorded or ())
    while type(model).__name__ in WRAPPERS:
        if names and {n for n, _ in model.named_parameters()} == names:
            return model  # the run's names are this wrapper's: query with it
        inner = getattr(model, WRAPPERS[type(model).__name__][0], None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def wrapper_hint(recorded: Any, names: Any) -> str:
    """How to use a run whose parameter names are ``names`` behind a wrapper's prefix, or ''."""
    recorded, names = set(recorded), set(names)
    for prefix, how in (("module.", "torch.nn.DataParallel(model)"), ("_orig_mod.", "torch.compile(model)"),
                        ("_orig_mod.module.", "torch.compile(torch.nn.DataParallel(model))"),
                        ("module._orig_mod.", "torch.nn.DataParallel(torch.compile(model))")):
        if names and {prefix + n for n in names} == recorded:
            return (
                f" Every recorded name is this model's with the prefix {prefix!r}: the run was recorded from a "
                f"wrapped model ({how}) by a datavalue version that did not unwrap it. Query it with the model "
                f"wrapped the same way: Attributor(run, {how}) (CPU is fine; the wrapper is kept because the run's "
                "names carry its prefix). Recording into it (resume, FinalPass) is not possible with that prefix: "
                "datavalue now records the module inside the wrapper, so record the run again."
            )
    return ""


logger = logging.getLogger(__name__)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CaptureConfig)}
_DEFAULTS["curvature"] = None


def _recorded_fisher_max_classes(path: Any, resume: bool) -> int | None:
    """The ``fisher_max_classes`` of the run being resumed (``None``: not resuming, or no readable run)."""
    manifest = recorded_manifest(path) if resume else None
    if manifest is None:
        return None
    try:
        return CaptureConfig.from_manifest(manifest).fisher_max_classes
    except Exception:  # no readable capture config: the writer says what is wrong
        return None


def _check_resume_config(path: Any, cfg: CaptureConfig, optimizer: Any = None) -> None:
    """Refuse to resume a run recorded with another capture config (field by field) or optimizer."""
    manifest = recorded_manifest(path)
    if manifest is None:
        return
    diff = cfg.resume_diff(CaptureConfig.from_manifest(manifest))
    if diff:
        raise StoreMismatchError(
            f"{path}: cannot resume: this capture config (projection, loss reduction, curvature, storage) differs from "
            f"the run's: {'; '.join(diff)}. Re-create the Recorder with the recorded settings "
            "(config=CaptureConfig.from_manifest(datavalue.store.open_run(path).manifest)), or pass overwrite=True to "
            "start over."
        )
    refuse_other_optimizer(path, manifest.get("optimizer"), optimizer_config(optimizer), resume_with=(
        "the optimizer the run was recorded with (same class and settings; its state from your checkpoint)"))


def base_manifest(engine: Engine, model: nn.Module, *, loss_reduction: str, optimizer: Any,
                  fisher: dict[str, Any] | None = None, hessian: dict[str, Any] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """The run manifest every torch recorder writes (see ``docs/store-format.md``); logs a WARNING
    first when a captured block cannot be recorded per example (batch norm in training mode), so
    that it is said at set-up, before the first step fails on it."""
    from datavalue.capture._inspect import block_notes

    for block, note in zip(engine.blocks, block_notes(engine, model), strict=True):
        if note:
            logger.warning("block %s (%s): the first recorded step will fail: %s", block.name, ", ".join(block.modules),
                           note)
    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": package_versions("torch", "numpy", "zarr"),
        "projection": engine.projection_json(),
        "model_fingerprint": fingerprint_params(trainable_fingerprint(model)),
        "model_class": type(model).__qualname__,
        "loss_reduction": loss_reduction,
        "curvature": {"fisher": fisher, **({"hessian": hessian} if hessian else {})},
        "capture_dtype": str(engine.dtype).replace("torch.", ""),
        "optimizer": optimizer_config(optimizer),
        **extra,
    }
