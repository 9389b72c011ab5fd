"""Weight and optimizer-state checkpoints inside a run, for exact replay (``docs/replay.md``).

``Recorder(..., checkpoint_every=N)`` writes, before the update of every ``N``-th step, at step 0
and after the last step, the model's parameters and buffers and the optimizer's whole state
(torch's ``state_dict`` tensors: Adam's ``exp_avg``/``exp_avg_sq``/``step``, SGD's
``momentum_buffer``) into the run's Zarr store, one array per tensor, no pickle:

    checkpoints/<step>/model/<parameter or buffer name>     the weights *before* step <step>
    checkpoints/<step>/optim/<parameter name>/<state key>   the optimizer state before step <step>
    checkpoints/<step>/meta                                 (1,) marker, written last; its attrs:
        {"step", "optimizer": class name, "groups": [{"params": [names], <settings>}], "tensors": {...}}

Checkpoint ``<step>`` holds ``theta_step``: step ``T`` (the run's length) is the final model.
Tensors round-trip bit for bit: dtypes numpy lacks (``bfloat16``) are stored as same-width
unsigned integers and viewed back. A checkpoint without ``meta`` (a crash while writing) is
ignored by :func:`checkpoint_steps`.

Example:
    >>> import os, tempfile, torch, datavalue
    >>> from datavalue.capture import checkpoint_steps, read_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> model = torch.nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> with datavalue.Recorder(path, model, proj_dim=None, optimizer=opt, checkpoint_every=2) as rec:
    ...     for step in range(3):
    ...         with rec.step(sample_ids=range(8)):
    ...             torch.nn.functional.cross_entropy(model(x), y).backward()
    ...         opt.step(); opt.zero_grad()
    >>> checkpoint_steps(path)
    [0, 2, 3]
    >>> ck = read_checkpoint(path, 3)
    >>> torch.equal(ck.model["weight"], model.weight.detach())
    True
    >>> sorted(ck.state["weight"])
    ['momentum_buffer']
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.errors import (
    RecorderError,
    StoreCorruptError,
    StoreMismatchError,
    StoreNotFoundError,
)

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "Checkpoint", "checkpoint_steps", "read_checkpoint", "write_checkpoint"]

#: Group of a run holding the checkpoints (``checkpoints/<step>/...``).
CHECKPOINTS = "checkpoints"
#: Bytes per chunk of a stored tensor (along its first axis).
_CHUNK_BYTES = 16 << 20
#: torch dtypes numpy has no type for: stored as the unsigned integer of the same width.
_VIEW_AS = {torch.bfloat16: torch.int16}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint read back from a run.

    Attributes:
        step: the weights are those *before* this step's update (``T``: the final model).
        model: ``{name: tensor}`` parameters (shared ones once, under their first name) and buffers.
        state: ``{parameter name: {state key: tensor or number}}`` the optimizer state (torch's
            ``optimizer.state`` keyed by parameter name; empty before the first update).
        groups: the optimizer's param groups as ``{"params": [names], <setting>: value, ...}``.
        optimizer: the optimizer's class name (``"SGD"``, ``"Adam"``, ``"AdamW"``).
    """

    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, dict[str, Any]]
    groups: list[dict[str, Any]]
    optimizer: str

    def load_into(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Copy the weights into ``model`` (and the state into ``optimizer``, built over ``model``'s
        parameters with the same groups), e.g. to resume training from a checkpoint."""
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for name, t in self.model.items():
                own[name].copy_(t)
        if optimizer is None:
            return
        named = dict(model.named_parameters())
        opt = _unwrap(optimizer)
        for p_name, st in self.state.items():
            opt.state[named[p_name]] = {k: _placed(v, named[p_name].device) for k, v in st.items()}


def _placed(v: Any, device: Any) -> Any:
    """A copy of a state entry on the parameter's device (scalars such as Adam's ``step`` stay on the CPU)."""
    if not torch.is_tensor(v):
        return v
    return v.clone() if v.dim() == 0 else v.clone().to(device)


def _unwrap(opt: Any) -> Any:
    from datavalue.capture._optim import unwrap_optimizer

    return unwrap_optimizer(opt)


def _json_value(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, tuple | list):
        return [_json_value(x) for x in v]
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    return repr(v)


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().to("cpu").contiguous()
    dtype = str(t.dtype).replace("torch.", "")
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    return t.numpy(), dtype


def _write_tensor(path: Any, name: str, t: torch.Tensor) -> dict[str, Any]:
    from datavalue.store import create_array

    a, dtype = _to_numpy(t)
    row = max(1, int(np.prod(a.shape[1:])) * a.itemsize)
    chunks = (max(1, min(a.shape[0], _CHUNK_BYTES // row)), *(max(1, s) for s in a.shape[1:])) if a.ndim else ()
    arr = create_array(path, name, shape=a.shape, dtype=str(a.dtype), chunks=chunks, overwrite=True)
    arr[...] = a
    return {"dtype": dtype, "shape": list(a.shape)}


def write_checkpoint(path: str | os.PathLike[str], step: int, model: nn.Module, optimizer: Any) -> None:
    """Write checkpoint ``step`` (weights and optimizer state *now*) into the run at ``path``.

    Called by the recorder before the update of step ``step`` (and after the last step with
    ``step = T``). Overwrites a checkpoint of the same step (a resumed run rewrites its last one).
    """
    from datavalue.store import create_array

    path = os.path.abspath(path)  # once: every array of the checkpoint goes into the same run
    opt = _unwrap(optimizer)
    if opt is None:
        raise RecorderError("checkpoint_every needs Recorder(..., optimizer=...): a checkpoint holds the optimizer state.")
    root = f"{CHECKPOINTS}/{int(step)}"
    name_of = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, Any] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        tensors[f"model/{name}"] = _write_tensor(path, f"{root}/model/{name}", t)
    scalars: dict[str, dict[str, Any]] = {}
    for p, st in opt.state.items():
        pname = name_of.get(id(p))
        if pname is None:
            raise RecorderError("the optimizer holds a parameter that is not the model's; build it over model.parameters().")
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pname}/{key}"] = _write_tensor(path, f"{root}/optim/{pname}/{key}", v)
            elif v is not None:
                scalars.setdefault(pname, {})[key] = _json_value(v)
    groups = []
    for g in opt.param_groups:
        missing = [i for i, p in enumerate(g["params"]) if id(p) not in name_of]
        if missing:
            raise RecorderError("the optimizer holds a parameter that is not the model's; build it over model.parameters().")
        groups.append({"params": [name_of[id(p)] for p in g["params"]],
                       **{k: _json_value(v) for k, v in g.items() if k != "params"}})
    meta = create_array(path, f"{root}/meta", shape=(1,), dtype="int64", chunks=(1,), overwrite=True)
    # "all_chunks": every chunk was written (even all-zero ones), so read_checkpoint refuses a missing one
    meta.attrs.update({"step": int(step), "optimizer": type(opt).__name__, "groups": groups, "tensors": tensors,
                       "scalars": scalars, "all_chunks": True})
    meta[:] = np.array([int(step)])
    logger.debug("checkpoint %d written to %s", step, path)


def _open(run: Any) -> Any:
    from datavalue.store import Run, open_run

    return run if isinstance(run, Run) else open_run(run)


def checkpoint_steps(run: Any) -> list[int]:
    """Steps with a complete checkpoint in the run (a path or an open ``Run``), sorted."""
    run = _open(run)
    steps = []
    for s in run.subgroups(CHECKPOINTS):
        if s.isdigit() and run.has_array(f"{CHECKPOINTS}/{s}/meta"):
            steps.append(int(s))
    return sorted(steps)


def _refuse_foreign(run: Any, step: int, name: str) -> None:
    """Refuse a checkpoint array copied in from another run (it carries another run id)."""
    problem = run.foreign_derived(name, fix=(
        f"Checkpoint {step} holds another run's weights or optimizer state; a replay from it would start from them. "
        "Restore the run's own checkpoints from a whole copy of the run, or record it again with checkpoint_every=."))
    if problem is not None:
        raise StoreMismatchError(problem)


def _read_tensor(run: Any, step: int, name: str, info: dict[str, Any], device: Any = None, *,
                 checked: bool = True) -> torch.Tensor:
    """One checkpoint array, through the store's checks: a missing chunk (zarr would read zeros)
    or one failing its checksum raises :class:`StoreCorruptError` naming the checkpoint and array.
    ``checked=False``: a checkpoint written before every chunk was (all-zero chunks skipped), whose
    missing chunks cannot be told from zeros."""
    arr = run.array(name)
    _refuse_foreign(run, step, name)
    damaged = f"{run.path}: checkpoint {step} is damaged: array {name}"
    if checked:
        try:
            run.require_chunks(name, int(arr.shape[0]) if arr.shape else 1)
        except StoreCorruptError as exc:
            chunk = str(exc).removeprefix(f"{run.path}: ").split(" is missing")[0]
            raise StoreCorruptError(
                f"{damaged}: {chunk} is missing (it would read as zeros, and a replay from this checkpoint would "
                "start from wrong weights). Restore the run from a copy, or record it again with checkpoint_every=."
            ) from exc
    try:
        a = np.asarray(arr[...])
    except Exception as exc:
        raise StoreCorruptError(
            f"{damaged} cannot be read (a chunk failing its checksum, or truncated): {exc}. Restore the run from "
            "a copy, or record again with checkpoint_every=."
        ) from exc
    if list(a.shape) != list(info["shape"]):
        raise StoreNotFoundError(f"{run.path}: checkpoint array {name} has shape {a.shape}, its record says {info['shape']}.")
    t = torch.from_numpy(a.copy())
    dtype = getattr(torch, info["dtype"])
    if dtype in _VIEW_AS:
        t = t.view(dtype)
    return t.to(device) if device is not None else t


def read_checkpoint(run: Any, step: int, *, device: Any = None) -> Checkpoint:
    """Read checkpoint ``step`` of a run (a path or an open ``Run``), bit for bit.

    Raises:
        StoreNotFoundError: the run has no complete checkpoint at ``step`` (the message lists those it has).
        StoreCorruptError: a chunk of one of its arrays is missing or fails its checksum (the
            message names the checkpoint and the array).
    """
    run = _open(run)
    root = f"{CHECKPOINTS}/{int(step)}"
    if not run.has_array(f"{root}/meta"):
        raise StoreNotFoundError(
            f"{run.path} has no checkpoint at step {step} (checkpoints at {checkpoint_steps(run)}). Record the run with "
            "Recorder(..., checkpoint_every=N) to keep them.")
    _refuse_foreign(run, int(step), f"{root}/meta")
    meta = dict(run.array(f"{root}/meta").attrs)
    checked = bool(meta.get("all_chunks"))
    if not checked:
        logger.info("%s: checkpoint %s was written before every chunk was; missing chunks cannot be detected",
                    run.path, step)
    model: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for key, info in meta["tensors"].items():
        t = _read_tensor(run, int(step), f"{root}/{key}", info, device, checked=checked)
        if key.startswith("model/"):
            model[key.removeprefix("model/")] = t
        else:
            pname, _, skey = key.removeprefix("optim/").rpartition("/")
            state.setdefault(pname, {})[skey] = t
    for pname, st in (meta.get("scalars") or {}).items():
        state.setdefault(pname, {}).update(st)
    return Checkpoint(step=int(meta["step"]), model=model, state=state, groups=list(meta["groups"]),
                      optimizer=str(meta["optimizer"]))
