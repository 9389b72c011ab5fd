"""Which weights a run reached: a digest of the trainable weights at every flush, checked on resume.

A run records the steps of one trajectory. Resuming it (``Recorder(..., resume=True)``) with weights
that are not the ones the run reached, a fresh initialisation or a training checkpoint from step
``s`` while the run already holds ``n > s`` steps (steps ``s .. n-1`` would be recorded twice),
would splice another trajectory onto it. So at every ``flush()`` and ``close()`` (with
``optimizer=``, after the update of the last written step) the recorder stores, for the run's
committed step count ``n``, each trainable tensor's float64 sum and sum of squares in the group
``weights_digest`` (its ``zarr.json`` attributes, replaced atomically), keeping the last
:data:`HISTORY` flushes; a resumed recorder compares the model's weights with them before its first
block (docs/store-format.md, docs/capture.md).

Tolerance (:data:`DIGEST_RTOL`): the same weights summed in another order (another device, another
reduction kernel) differ by float64 rounding, at most ``log2(N) * 1.1e-16`` of ``sum |w|`` for a
cascaded sum of ``N`` numbers (``4e-15`` for ``N = 10^9``); one training step moves a tensor's sum by
about ``lr / rms(w)`` of ``sqrt(N * sum w^2)`` (``5e-5`` for Adam at ``lr = 1e-6`` on weights of rms
0.02). ``1e-10`` sits between the two.

The optimizer's state is bound the same way (issue 22, eighth probe's leftover): each flush's entry also
holds :func:`optimizer_state_digest`, the same three numbers of every tensor in the optimizer's state
(momentum buffers, Adam's moments, its step counts), and :func:`check_resume_optimizer` refuses a resumed
optimizer whose state differs from the one recorded at the run's committed step count: moments edited,
or taken from another run's checkpoint with the right step count, would otherwise be accepted (the step
count alone was checked, P8-10). One pass over the state per flush and one per resume.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datavalue.errors import StoreCorruptError, StoreMismatchError

#: The run's member holding the digests (a zarr v3 group; attributes only).
WEIGHTS_DIGEST = "weights_digest"
#: Key of the digests in that group's attributes.
DIGEST_KEY = "datavalue_weights"
#: Flushes kept (the most recent ones).
HISTORY = 100
#: Relative tolerance of a tensor's sum (of ``sqrt(N * sum w^2)``) and sum of squares.
DIGEST_RTOL = 1e-10


def weights_digest(model: nn.Module) -> dict[str, list[float]]:
    """``{name: [numel, sum, sum of squares]}`` of every trainable parameter, in float64."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                w = p.detach()
                out[name] = [float(w.numel()), float(torch.sum(w, dtype=torch.float64)),
                             float(torch.linalg.vector_norm(w, dtype=torch.float64) ** 2)]
    return out


def read_digests(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The run's recorded digests, oldest first (``[]`` for a run written before they existed)."""
    meta = Path(path) / WEIGHTS_DIGEST / "zarr.json"
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise StoreMismatchError(f"{meta} is not readable JSON ({exc}); delete {meta.parent} to resume without the "
                                 "weights check.") from exc
    hist = ((doc.get("attributes") or {}).get(DIGEST_KEY) or {}).get("history") or []
    return [h for h in hist if isinstance(h, dict) and "steps" in h and isinstance(h.get("tensors"), dict)]


def optimizer_state_digest(model: nn.Module, optimizer: Any) -> dict[str, list[float]]:
    """``{"<parameter name>/<state key>": [numel, sum, sum of squares]}`` (float64) of every entry of the
    optimizer's state for the model's parameters: tensors (momentum buffers, ``exp_avg``, ``exp_avg_sq``, Adam's
    ``step``) and plain numbers (a ``step`` kept as a float). ``{}`` when the optimizer holds no state yet."""
    from datavalue.capture._optim import unwrap_optimizer

    state = unwrap_optimizer(optimizer).state
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            st = state.get(p)  # .get: no insert (optimizer.state is a defaultdict)
            for key, v in (st or {}).items():
                if torch.is_tensor(v) and not v.is_complex() and v.numel() > 0:
                    w = v.detach() if v.is_floating_point() else v.detach().to(torch.float64)  # an integer step
                    out[f"{name}/{key}"] = [float(w.numel()), float(torch.sum(w, dtype=torch.float64)),
                                            float(torch.linalg.vector_norm(w, dtype=torch.float64) ** 2)]
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{name}/{key}"] = [1.0, float(v), float(v) ** 2]
    return out


def record_digest(path: str | os.PathLike[str], steps: int, digest: Mapping[str, list[float]], *,
                  optimizer: Mapping[str, list[float]] | None = None) -> None:
    """Add the digest of the weights after ``steps`` committed steps (replacing any entry at or past it), with
    ``optimizer`` (:func:`optimizer_state_digest`) the state the optimizer held then; ``None``: keep the one an
    entry at ``steps`` already holds (a resumed recorder whose optimizer state is not checked yet vouches for
    nothing new)."""
    old = [h for h in read_digests(path) if int(h["steps"]) == int(steps) and isinstance(h.get("optimizer"), dict)]
    if optimizer is None and old:
        optimizer = old[-1]["optimizer"]
    hist = [h for h in read_digests(path) if int(h["steps"]) < int(steps)]
    entry: dict[str, Any] = {"steps": int(steps), "tensors": dict(digest)}
    if optimizer is not None:
        entry["optimizer"] = dict(optimizer)
    hist = (hist + [entry])[-HISTORY:]
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {DIGEST_KEY: {
        "meaning": "per trainable tensor [numel, float64 sum, float64 sum of squares] of the weights after 'steps' "
                   "committed steps, at each flush()/close() (checked by Recorder(..., resume=True)); 'optimizer': "
                   "the same of every entry of the optimizer's state then ('<parameter>/<state key>')",
        "history": hist}}}
    d = Path(path) / WEIGHTS_DIGEST
    d.mkdir(exist_ok=True)
    tmp = d / f".zarr.json.{os.getpid()}.{threading.get_ident()}.partial"
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp, d / "zarr.json")


def differing(recorded: Mapping[str, list[float]], now: Mapping[str, list[float]]) -> list[str]:
    """Names of the tensors whose digests differ beyond :data:`DIGEST_RTOL` (or that only one side has)."""
    out = sorted(set(recorded) ^ set(now))
    for name in sorted(set(recorded) & set(now)):
        (n0, s0, q0), (n1, s1, q1) = recorded[name][:3], now[name][:3]
        scale = math.sqrt(max(n0, 1.0) * max(q0, q1))
        if n0 != n1 or abs(s0 - s1) > DIGEST_RTOL * scale or abs(q0 - q1) > DIGEST_RTOL * max(q0, q1):
            out.append(name)
    return out


def check_resume_weights(path: str | os.PathLike[str], model: nn.Module, steps: int, *, marked: bool = False) -> str:
    """Refuse to resume a run of ``steps`` committed steps with weights it did not reach.

    ``marked``: the run says it wrote its digests (root attribute ``datavalue_weights_digest``, set
    by :meth:`datavalue.store.RunWriter.mark_weights_digest` after the first one): then a missing
    ``weights_digest`` member, or one without its attributes, is damage, not an older run.

    Returns what was checked (``"matched"``, ``"no digest"``: a run from before the digests, or one
    recorded without ``optimizer=``, or ``"unchecked"``: the run was not flushed at ``steps``, e.g.
    killed after its last flush, and the weights match no earlier flush either).

    Raises:
        StoreMismatchError: the model holds other weights than the run reached.
        StoreCorruptError: ``marked`` and the digests are gone (the member deleted or its attributes emptied).
    """
    hist = read_digests(path)
    if not hist and marked and steps > 0:
        member = Path(path) / WEIGHTS_DIGEST
        found = "is missing" if not (member / "zarr.json").exists() else f"holds no '{DIGEST_KEY}' attribute"
        raise StoreCorruptError(
            f"{path}: cannot resume: the run's weights digest ({member}) {found}, although the run wrote it (root "
            f"attribute datavalue_weights_digest), so whether the model holds the weights the run reached after its "
            f"{steps} steps cannot be checked, and other weights would splice another trajectory onto it. Restore "
            f"{WEIGHTS_DIGEST}/ from a whole copy of the run, or record the rest as a new run (another path)."
        )
    if not hist:
        return "no digest"
    now = weights_digest(model)
    at = {int(h["steps"]): h["tensors"] for h in hist}
    if steps in at and not differing(at[steps], now):
        return "matched"
    earlier = [s for s in sorted(at, reverse=True) if s < steps and not differing(at[s], now)]
    if earlier:
        s = earlier[0]
        raise StoreMismatchError(
            f"{path}: cannot resume: the model holds the weights the run had after step {s}, and the run has {steps} "
            f"steps: resuming would record steps {s}..{steps - 1} a second time. Load the weights the run reached after "
            f"its {steps} steps (the checkpoint saved with its last rec.flush()), or record the rest as a new run "
            "(another path)."
        )
    if steps in at:
        diff = differing(at[steps], now)
        raise StoreMismatchError(
            f"{path}: cannot resume: the model's weights are not the ones the run reached after its {steps} steps "
            f"(they differ in {diff[:3]}{' ...' if len(diff) > 3 else ''}; a fresh initialisation, or a checkpoint of "
            "another run?). Load the checkpoint saved with the run's last rec.flush() before creating the Recorder, "
            "or record a new run (another path)."
        )
    return "unchecked"


def check_resume_optimizer(path: str | os.PathLike[str], model: nn.Module, optimizer: Any, steps: int) -> str:
    """Refuse to resume a run of ``steps`` committed steps with an optimizer state other than the one recorded at
    ``steps`` (:func:`optimizer_state_digest` at the flush that left the run at ``steps``).

    Returns what was checked: ``"matched"``; ``"unchecked"`` (no state recorded at ``steps``: a run from before
    the optimizer digests, one killed after its last flush, or recorded without ``optimizer=``); ``"deferred"``
    (the optimizer holds no state at all, or another Adam step count than the run's last update left: the first
    update refuses those, naming them, P5-12 and P8-10).

    Raises:
        StoreMismatchError: the state's tensors differ from the recorded ones (edited, or another run's).
    """
    recorded = [h["optimizer"] for h in read_digests(path) if int(h["steps"]) == int(steps)
                and isinstance(h.get("optimizer"), dict)]
    if optimizer is None or not recorded or steps <= 0:
        return "unchecked"
    now = optimizer_state_digest(model, optimizer)
    diff = differing(recorded[-1], now)
    if not diff:
        return "matched"
    counts = [n for n in diff if n.endswith("/step")]
    if not now or (counts and resumed_adam_count(path, steps) is not None):
        return "deferred"
    missing = [n for n in diff if n not in now]
    extra = [n for n in diff if n not in recorded[-1]]
    changed = [n for n in diff if n in now and n in recorded[-1]]
    said = "; ".join(f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in (
        ("differ:", changed), ("recorded but missing now:", missing), ("not recorded:", extra)) if names)
    raise StoreMismatchError(
        f"{path}: cannot resume: the optimizer's state is not the one the run's training held after its {steps} "
        f"steps ({len(diff)} of its entries {said}; the moments or momentum buffers were edited, or restored from "
        "another run's checkpoint). The run models the updates its own state makes, so every resumed step would "
        "record an update the training did not make. Load the optimizer's state saved with these weights (the "
        "checkpoint of the run's last rec.flush()) before creating the Recorder, or record the rest as a new run "
        "(another path)."
    )


def resumed_adam_count(path: str | os.PathLike[str], steps: int) -> int | None:
    """The Adam/AdamW step count the run's last committed step (``steps - 1``) left, or ``None`` (another
    optimizer, no step, or a run that did not record it). A resumed recorder refuses a first update whose
    optimizer holds another count: a state restored from another checkpoint than the weights' (P8-10)."""
    if steps <= 0:
        return None
    from datavalue.store import open_run

    run = open_run(path)
    if (run.optimizer or {}).get("kind") not in ("adam", "adamw") or not run.has_adam_state \
            or len(run.adam_step) < steps:
        return None
    return int(run.adam_step[steps - 1])


def resumed_optimizer_state(path: str | os.PathLike[str], steps: int) -> str | None:
    """What the optimizer's state held after the run's last committed step (``steps - 1``), in words, or
    ``None`` when the update kept none: ``"a momentum buffer (momentum 0.9)"`` for SGD with momentum,
    ``"Adam moments and a step count (3)"`` for Adam/AdamW. A resumed recorder refuses a first update whose
    optimizer holds no state at all for the recorded parameters (a fresh optimizer: the checkpoint's state
    was not loaded). Other optimizers are not checked."""
    if steps <= 0:
        return None
    from datavalue.store import open_run

    run = open_run(path)
    kind = (run.optimizer or {}).get("kind")
    if kind in ("adam", "adamw"):
        count = ""
        if run.has_adam_state and len(run.adam_step) >= steps:
            count = f" ({int(run.adam_step[steps - 1])})"
        return f"Adam moments and a step count{count}"
    if kind == "sgd":
        hp = run.param_groups if getattr(run, "has_param_groups", False) else None
        mom = float(run.momentum[steps - 1])
        if hp is not None and math.isfinite(float(hp["momentum"][steps - 1].max())):
            mom = max(mom, float(hp["momentum"][steps - 1].max()))
        return f"a momentum buffer (momentum {mom:g})" if mom != 0 else None
    return None

