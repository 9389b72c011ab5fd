"""Which optimizer settings a resumed run must share with the recorded one, and how a recorder reads the
run it resumes (torch-free, so that the PyTorch and JAX recorders refuse the same resumes with the same words)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from datavalue.errors import StoreMismatchError

#: Per-group settings recorded once in the manifest (``optimizer["groups"]``; ``lr``, ``momentum`` and
#: ``weight_decay`` there are the values when recording starts); the per-step ones go to the
#: ``group_*`` arrays through ``datavalue.capture._optim.step_fields``.
_GROUP_STATIC = ("lr", "momentum", "weight_decay", "dampening", "nesterov", "betas", "eps", "amsgrad", "maximize",
                 "decoupled_weight_decay")


#: The manifest's ``optimizer`` entries a resumed run must share with the recorded one: its class and
#: the settings that define its update, which builds read once for the whole run (the per-step lr,
#: momentum and weight decay are recorded every step and may change).
RESUME_KEYS = ("kind", "n_groups", "dampening", "nesterov", "betas", "eps", "amsgrad", "maximize",
               "decoupled_weight_decay")


def optimizer_resume_diff(recorded: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """What differs between a run's recorded ``optimizer`` entry and :func:`optimizer_config` of the
    optimizer resuming it (``[]``: the same optimizer; a run recorded before this entry existed is not checked)."""
    if not recorded:
        return []
    if recorded.get("kind") != now.get("kind"):  # another optimizer: its settings differ by definition
        return [f"optimizer kind: recorded {recorded.get('kind')!r}, now {now.get('kind')!r}"]
    out = [f"optimizer {key}: recorded {recorded.get(key)!r}, now {now.get(key)!r}" for key in RESUME_KEYS
           if (key in recorded or key in now) and _norm(recorded.get(key)) != _norm(now.get(key))]
    for g, (a, b) in enumerate(zip(recorded.get("groups") or [], now.get("groups") or [])):
        out += [f"param group {g} {key}: recorded {a.get(key)!r}, now {b.get(key)!r}" for key in _GROUP_STATIC
                if key not in ("lr", "momentum", "weight_decay") and _norm(a.get(key)) != _norm(b.get(key))]
    return out


def _norm(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def recorded_manifest(path: Any) -> dict[str, Any] | None:
    """The manifest of the run a recorder resumes at ``path``, or ``None`` when there is nothing to check
    it against: an archive (read-only) or no readable run, of which the writer says what is wrong."""
    if not os.path.isdir(path):
        return None
    from datavalue.store import open_run

    try:
        return open_run(path).manifest
    except Exception:
        return None


def refuse_other_optimizer(path: Any, recorded: Mapping[str, Any] | None, now: Mapping[str, Any], *,
                           resume_with: str) -> None:
    """Refuse to resume the run at ``path`` (its manifest's ``optimizer`` entry ``recorded``) with the
    optimizer described by ``now``: a build models one optimizer over the whole run. ``resume_with`` names
    what to resume with instead.

    Raises:
        StoreMismatchError: naming every setting that differs (:func:`optimizer_resume_diff`).
    """
    diff = optimizer_resume_diff(recorded, now)
    if diff:
        raise StoreMismatchError(
            f"{path}: cannot resume with another optimizer: {'; '.join(diff)}. A build models one optimizer over the "
            f"whole run, so these settings are the run's. Resume with {resume_with}, or record the rest as a new run "
            "(another path).")
