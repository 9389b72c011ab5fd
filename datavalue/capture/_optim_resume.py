"""Which optimizer settings a resumed run must share with the recorded one (torch-free, so that the
PyTorch and JAX recorders refuse the same resumes with the same words)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
