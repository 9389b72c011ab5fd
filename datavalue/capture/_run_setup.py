"""What a torch recorder checks and writes when it opens a run: the capture config's defaults, the
checks that a resumed run was recorded with the same config and optimizer, and the run manifest."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from typing import Any

from torch import nn

from datavalue.capture._config import CaptureConfig
from datavalue.capture._engine import Engine, trainable_fingerprint
from datavalue.capture._optim import optimizer_config, optimizer_resume_diff
from datavalue.errors import StoreMismatchError
from datavalue.store import fingerprint_params, package_versions

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CaptureConfig)}
_DEFAULTS["curvature"] = None


def _recorded_fisher_max_classes(path: Any, resume: bool) -> int | None:
    """The ``fisher_max_classes`` of the run being resumed (``None``: not resuming, or no readable run)."""
    if not resume:
        return None
    if not os.path.isdir(path):  # an archive (read-only) or no run: the writer says what is wrong
        return None
    from datavalue.store import open_run

    try:
        return CaptureConfig.from_manifest(open_run(path).manifest).fisher_max_classes
    except Exception:  # no readable run: the writer says what is wrong
        return None


def _check_resume_config(path: Any, cfg: CaptureConfig, optimizer: Any = None) -> None:
    """Refuse to resume a run recorded with another capture config (field by field) or optimizer."""
    if not os.path.isdir(path):  # an archive (read-only) or no run: the writer says what is wrong
        return
    from datavalue.store import open_run

    try:
        manifest = open_run(path).manifest
    except Exception:  # no readable run: the writer says what is wrong
        return
    diff = cfg.resume_diff(CaptureConfig.from_manifest(manifest))
    if diff:
        raise StoreMismatchError(
            f"{path}: cannot resume: this capture config (projection, loss reduction, curvature, storage) differs from "
            f"the run's: {'; '.join(diff)}. Re-create the Recorder with the recorded settings "
            "(config=CaptureConfig.from_manifest(datavalue.store.open_run(path).manifest)), or pass overwrite=True to "
            "start over."
        )
    diff = optimizer_resume_diff(manifest.get("optimizer"), optimizer_config(optimizer))
    if diff:
        raise StoreMismatchError(
            f"{path}: cannot resume with another optimizer: {'; '.join(diff)}. A build models one optimizer over the "
            "whole run, so these settings are the run's. Resume with the optimizer the run was recorded with (same "
            "class and settings; its state from your checkpoint), or record the rest as a new run (another path)."
        )


def base_manifest(engine: Engine, model: nn.Module, *, loss_reduction: str, optimizer: Any,
                  fisher: dict[str, Any] | None = None, hessian: dict[str, Any] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """The run manifest every torch recorder writes (see ``docs/store-format.md``)."""
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
