"""The hook engine: plans blocks, attaches hooks, routes per-sample gradients into a sink.

Lifecycle (Kronfluence's tracker pattern): ``plan -> attach -> (begin -> backward -> collect)* ->
detach``. Forward hooks keep each captured module's inputs; a tensor hook on its output receives
the output gradient during whatever backward runs next (the user's own ``loss.backward()``, or an
``autograd.grad`` issued by the engine for test gradients and Fisher pseudo-gradients) and calls
the module's rule. Nothing is written onto the user's modules or parameters.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.capture import _rules
from datavalue.capture._projection import (
    DEFAULT_SKETCH,
    SIDE_COLS,
    SIDE_DENSE,
    SIDE_ROWS,
    check_sketch,
    projection_matrix,
    split_budget,
)
from datavalue.capture._rules import (
    FALLBACK,
    LAYER_RULES,
    OPAQUE_MODULES,
    BlockDraft,
    LayerRule,
    Sketch,
)
from datavalue.errors import CaptureError, RecorderError, UnsupportedModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockSpec:
    """One block of gradient columns (serialised into the run manifest)."""

    name: str
    index: int
    rule: str
    kind: str
    params: list[str]
    shape: list[int]
    k_rows: int
    k_cols: int
    k: int
    start: int
    stop: int
    has_bias: bool = False
    modules: tuple[str, ...] = ()
    bias_axis: int = 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = list(self.modules)
        return d


@dataclass
class _Entry:
    name: str
    module: nn.Module
    rule: LayerRule
    drafts: list[BlockDraft]


def trainable_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """``{name: shape}`` of the model's trainable parameters (tied ones once)."""
    return {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}


class Engine:
    """Per-sample gradient capture for one model and one projection.

    Args:
        model: the torch module.
        proj_dim: total sketch dimension, a dict per block name, or ``None`` for exact gradients.
        seed: root seed of the sketch matrices.
        layers: optional module names to capture (default: every module with trainable params).
        optimizer: the training optimizer, when known. With several param groups the engine records
            which columns belong to which group (``projection["param_groups"]``), and in a projected
            run a layer whose weight and bias sit in groups with different hyperparameters (the
            Trainer's no-decay group for biases) gets its bias as its own dense block, because a
            sketch column would mix them (``projection["split_bias"]``; rules with
            ``LayerRule.splits_bias``: Linear, Conv1d/2d, HF Conv1D). Exact runs keep ``[W | b]``: their
            columns map to parameters.
        split_bias: bias parameters to record as their own blocks, overriding what ``optimizer``
            decides (an engine that reproduces a recorded projection passes the run's list).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        proj_dim: int | Mapping[str, int] | None,
        seed: int,
        layers: Sequence[str] | None = None,
        sketch: str = DEFAULT_SKETCH,
        optimizer: Any = None,
        split_bias: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.seed = int(seed)
        self.sketch = check_sketch(sketch)
        self.proj_dim = proj_dim
        self.layers = list(layers) if layers is not None else None
        if split_bias is None:
            split_bias = _split_by_groups(model, optimizer) if proj_dim is not None else ()
        self.entries, self.blocks = self._plan(model, proj_dim, layers, frozenset(split_bias))
        # the biases that became their own blocks (candidates whose rule cannot split stay inside)
        split_keys = {d.key for e in self.entries for d in e.drafts if d.kind == "dense"}
        self.split_bias = frozenset(split_bias) & split_keys
        self.param_groups_json: dict[str, Any] | None = None
        if optimizer is not None and len(getattr(_unwrap(optimizer), "param_groups", ())) > 1:
            from datavalue.capture._optim import column_groups

            self.param_groups_json = column_groups(optimizer, self)
        first = next(iter(model.parameters()))
        self.device, self.dtype = first.device, first.dtype
        self.trainable = frozenset(trainable_fingerprint(model))  # compared at every step (check_trainable)
        self.sketches = self._sketches()
        self._handles: list[Any] = []
        self.sink: dict[str, torch.Tensor] | None = None
        self.batch_size: int | None = None
        self.outputs: list[torch.Tensor] = []
        #: ``(module, gradient edge)`` of each output in ``outputs``, taken when it was produced
        self.output_edges: list[tuple[nn.Module, Any]] = []
        self.n_grad_events = 0
        self.n_forward_events = 0
        self._seen_batch = 0
        self._replaying = False
        self._pseudo = False  # inside grad_wrt_outputs (Fisher pseudo-gradients, test gradients)
        #: ``True``: the rules' input-side sketches are computed once per block and reused by every pass over
        #: the same saved inputs (``_rules._side``); a recorder with ``curvature="fisher"`` turns it on
        self.memo_inputs = False
        self._input_memo: dict[Any, Any] = {}
        self._backward_seen = False  # a user backward reached a captured module in this block
        #: the unit roundoff of the least precise floating tensor the hooks saw in this block (activations
        #: and output gradients): above the weights' under ``torch.autocast`` (bfloat16/float16 compute), where
        #: the gradient checks take their tolerance from it (``_optim.gradient_tolerances``)
        self.compute_eps = 0.0
        self._root_hook: Callable[[torch.Tensor], None] | None = None

    # ------------------------------------------------------------------ planning
    @staticmethod
    def _plan(model: nn.Module, proj_dim, layers, split_bias=frozenset()) -> tuple[list[_Entry], list[BlockSpec]]:
        canonical: dict[int, str] = {}
        for n, p in model.named_parameters():
            canonical.setdefault(id(p), n)
        if not any(p.requires_grad for p in model.parameters()):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); nothing to record."
            )
        alias_count: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            alias_count[id(p)] = alias_count.get(id(p), 0) + 1
        tied = {canonical[i] for i, c in alias_count.items() if c > 1}

        wanted = set(layers) if layers is not None else None
        names_of_modules = {n for n, _ in model.named_modules(remove_duplicate=False)}
        if wanted is not None and wanted - names_of_modules:
            raise RecorderError(f"layers= names unknown modules {sorted(wanted - names_of_modules)}; see datavalue.inspect(model).")
        entries: list[_Entry] = []
        drafts_by_key: dict[str, tuple[BlockDraft, str, list[str]]] = {}
        opaque: list[str] = []
        for mname, module in model.named_modules(remove_duplicate=False):
            if any(mname.startswith(o + ".") for o in opaque):
                continue  # inside a module the fallback handles as a whole
            if isinstance(module, OPAQUE_MODULES):
                opaque.append(mname)
                own = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            else:
                own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own or (wanted is not None and mname not in wanted):
                continue
            prefix = f"{mname}." if mname else ""
            rule = LAYER_RULES.lookup(module) or FALLBACK
            drafts = rule.drafts(module, prefix, _tied_local(prefix, own, canonical, tied))
            covered = {q for d in drafts for q in d.params}
            if len(covered) < len(own) and rule is not FALLBACK:
                rule, drafts = FALLBACK, FALLBACK.drafts(module, prefix, set())
            # rename local aliases to canonical names
            drafts = [_canonicalise(d, prefix, module, canonical) for d in drafts]
            if split_bias and rule.splits_bias:
                drafts = [x for d in drafts for x in _split_draft(d, split_bias)]
            entries.append(_Entry(mname, module, rule, drafts))
            for d in drafts:
                if d.key in drafts_by_key:
                    prev, prev_rule, mods = drafts_by_key[d.key]
                    if (prev.kind, prev.shape, prev.params) != (d.kind, d.shape, d.params):
                        raise UnsupportedModelError(
                            f"parameter {d.key} is shared by modules {mods + [mname]} whose layouts differ "
                            f"({prev.kind}{prev.shape} vs {d.kind}{d.shape}); register a LayerRule that matches."
                        )
                    mods.append(mname)
                else:
                    drafts_by_key[d.key] = (d, rule.name, [mname])
        ordered = list(drafts_by_key.values())
        ks = split_budget([d.key for d, _, _ in ordered], [d.kind for d, _, _ in ordered],
                          [d.shape for d, _, _ in ordered], proj_dim)
        blocks, start = [], 0
        for i, ((d, rname, mods), (kr, kc, k)) in enumerate(zip(ordered, ks)):
            blocks.append(BlockSpec(d.key, i, rname, d.kind, list(d.params), list(d.shape), kr, kc, k,
                                    start, start + k, d.has_bias, tuple(mods), d.bias_axis))
            start += k
        return entries, blocks

    def _sketches(self) -> dict[str, Sketch]:
        def mat(index: int, side: int, k: int, dim: int) -> torch.Tensor | None:
            if k >= dim:  # the full side fits: exact, no projection
                return None
            return torch.as_tensor(projection_matrix(self.seed, index, side, k, dim, self.sketch), dtype=self.dtype,
                                   device=self.device)

        out = {}
        for b in self.blocks:
            if b.kind == "kron":
                out[b.name] = Sketch("kron", mat(b.index, SIDE_ROWS, b.k_rows, b.shape[0]),
                                     mat(b.index, SIDE_COLS, b.k_cols, b.shape[1]), b.k)
            else:
                out[b.name] = Sketch("dense", mat(b.index, SIDE_DENSE, b.k, b.shape[0]), None, b.k)
        return out

    @property
    def k(self) -> int:
        return self.blocks[-1].stop if self.blocks else 0

    def projection_json(self) -> dict[str, Any]:
        out = {
            "proj_dim": dict(self.proj_dim) if isinstance(self.proj_dim, Mapping) else self.proj_dim,
            "seed": self.seed,
            "sketch": self.sketch,
            "layers": self.layers,
            "k": self.k,
            "blocks": [b.to_json() for b in self.blocks],
        }
        if self.split_bias:  # only when used: manifests without param groups are unchanged
            out["split_bias"] = sorted(self.split_bias)
        if self.param_groups_json is not None:
            out["param_groups"] = self.param_groups_json
        return out

    def check_trainable(self, step: int) -> None:
        """Refuse a step after a parameter's ``requires_grad`` changed: the run records the parameters
        that were trainable when it started, and a layer unfrozen (or frozen) since would be missing
        from (or wrongly in) every later row."""
        now = frozenset(trainable_fingerprint(self.model))
        if now == self.trainable:
            return
        on, off = sorted(now - self.trainable), sorted(self.trainable - now)
        raise RecorderError(
            f"step {step}: the model's trainable parameters changed since recording started"
            + (f"; now trainable: {on[:5]}{' ...' if len(on) > 5 else ''}" if on else "")
            + (f"; no longer trainable: {off[:5]}{' ...' if len(off) > 5 else ''}" if off else "")
            + ". A run records one fixed set of parameters; nothing was written for this step. Close this Recorder "
            "and record the rest of training as a new run (another path) that starts with the new set, or keep the "
            "set fixed (train those layers from the start, or leave them frozen)."
        )

    # ------------------------------------------------------------------ hooks
    def attach(self, *, root_hook: Callable[[Any], None] | None = None) -> None:
        if self._handles:
            raise CaptureError("hooks are already attached for this engine.")
        for e in self.entries:
            self._handles.append(e.module.register_forward_hook(self._make_forward_hook(e), with_kwargs=True))
        if root_hook is not None:
            self._handles.append(self.model.register_forward_hook(lambda m, a, out: root_hook(out)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_forward_hook(self, entry: _Entry):
        def hook(module, args, kwargs, output):
            if self.sink is None or self._replaying or not torch.is_grad_enabled():
                return
            out = output if torch.is_tensor(output) else next((o for o in _flat(output) if torch.is_tensor(o)), None)
            if out is None or not out.requires_grad:
                return
            self.n_forward_events += 1
            b = self.batch_size or self._seen_batch
            new_output = None
            if torch.is_tensor(output) and output.dim() > 0 and output.shape[0] == 1 and b > 1:
                # Shared across the batch and broadcast later (e.g. GPT-2's position embedding with
                # position_ids of shape (1, T)): expand so that each example gets its own gradient.
                # Values are unchanged; only the graph gains an expand.
                new_output = out = output.expand(b, *output.shape[1:])
                args = tuple(a.expand(b, *a.shape[1:]) if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == 1 else a
                             for a in args)
            elif out.dim() > 0:
                self._seen_batch = max(self._seen_batch, out.shape[0])
            saved = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            saved_kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
            self.outputs.append(out)
            self.output_edges.append((module, torch.autograd.graph.get_gradient_edge(out)))
            # a forward pass that starts after a backward already ran in this block (not a recomputation
            # inside the backward, as gradient checkpointing does): a second micro-batch
            late = self._backward_seen and not _inside_backward()
            out.register_hook(lambda g, e=entry, a=saved, kw=saved_kw, late=late: self._on_grad(e, a, kw, g, late))
            return new_output

        return hook

    def _on_grad(self, entry: _Entry, args, kwargs, grad: torch.Tensor, late: bool = False) -> None:
        sink = self.sink
        if sink is None:
            return
        self.n_grad_events += 1
        if not self._pseudo:
            if late:
                raise RecorderError(
                    f"module {entry.name or '<root>'}: a second forward and backward pass inside one recorded block "
                    f"(gradient accumulation?). The block's sample_ids name {self.batch_size} examples, so each row "
                    "would be the sum of several examples' gradients. Record each micro-batch in `with "
                    "rec.microbatch(ids):` and close the optimizer step with rec.commit_step(); nothing was written "
                    "for this step."
                )
            self._backward_seen = True
        b = self.batch_size
        if b is not None and grad.shape[0] != b:
            raise RecorderError(
                f"module {entry.name or '<root>'} saw a batch of {grad.shape[0]} examples but sample_ids has {b}; "
                "pass exactly one id per example (batch dimension first)."
            )
        # under torch.autocast the activations and output gradients come in bfloat16/float16 while the sketches
        # hold the weights' dtype: the rules compute in the sketches' dtype (the lower-precision tensors cast up,
        # autocast off for the rules' own GEMMs), and the gradient checks widen their tolerance to that precision
        saved = (frozenset(_rules.storage_address(t) for t in (*args, *kwargs.values()) if torch.is_tensor(t)) - {None}
                 if self.memo_inputs else None)  # the saved inputs' storages, before any cast (a cast is new each pass)
        grad, args, kwargs, eps = _to_compute_dtype(grad.detach(), args, kwargs, self.dtype)
        self.compute_eps = max(self.compute_eps, eps)
        self._replaying = True
        _rules._ACTIVE.active = (self._input_memo, saved) if saved else None
        try:
            with torch.no_grad(), _autocast_off(grad.device.type):
                contrib = entry.rule.per_sample(entry.module, args, kwargs, grad, self.sketches, entry.drafts)
        finally:
            _rules._ACTIVE.active = None
            self._replaying = False
        for key, v in contrib.items():
            if key in sink:
                sink[key] = sink[key] + v
            else:
                sink[key] = v

    # ------------------------------------------------------------------ sinks
    def begin(self, batch_size: int | None) -> None:
        self.sink = {}
        self._input_memo = {}
        self.batch_size = batch_size
        self.outputs = []
        self.output_edges = []
        self.n_grad_events = 0
        self.n_forward_events = 0
        self._seen_batch = 0
        self._backward_seen = False
        self.compute_eps = 0.0

    def end(self) -> dict[str, torch.Tensor]:
        sink, self.sink = self.sink or {}, None
        self._input_memo = {}  # the saved inputs it holds are freed with the block
        self.outputs = []
        self.output_edges = []
        return sink

    def assemble(self, sink: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Concatenate a sink's blocks in column order; modules that did not run give zeros."""
        cols = []
        for b in self.blocks:
            v = sink.get(b.name)
            cols.append(v.reshape(n, b.k) if v is not None else torch.zeros(n, b.k, dtype=self.dtype, device=self.device))
        return torch.cat(cols, 1)

    def grad_wrt_outputs(self, scalar_or_tensor: torch.Tensor, grad_outputs: torch.Tensor | None = None) -> None:
        """Backpropagate to the hooked module outputs only (parameters' ``.grad`` untouched).

        The targets are the outputs' gradient edges as the forward hooks recorded them, so autograd
        runs only the input-gradient half of each layer's backward (no weight-gradient GEMM, and the
        lowest hooked layer's backward not at all), and an in-place op on an output afterwards
        (``ReLU(inplace=True)``) does not cut the pass short: the edge is the producing node's, whose
        tensor hook fires when the gradient reaches it. A hooked module that produced no output with a
        graph in this forward (a reentrant gradient-checkpointing segment runs its forward without
        one and recomputes it inside the backward) is reached through its parameters instead, as
        before: those still cost their weight-gradient GEMMs.
        """
        if not self.outputs:
            raise CaptureError("no captured module took part in this forward pass.")
        seen = {id(m) for m, _ in self.output_edges}
        targets: list[Any] = [edge for _, edge in self.output_edges]
        targets += list({id(p): p for e in self.entries if id(e.module) not in seen
                         for p in e.module.parameters() if p.requires_grad}.values())
        self._pseudo = True
        try:
            torch.autograd.grad(scalar_or_tensor, targets, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
        finally:
            self._pseudo = False


#: unit roundoff (``finfo.eps``) per floating dtype, cached (the hooks ask for it at every call)
_EPS: dict[torch.dtype, float] = {}


def _eps(dtype: torch.dtype) -> float:
    e = _EPS.get(dtype)
    if e is None:
        e = _EPS[dtype] = float(torch.finfo(dtype).eps)
    return e


def _to_compute_dtype(grad: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype):
    """``(grad, args, kwargs, eps)`` with every floating tensor less precise than ``dtype`` (the sketches') cast
    to it, and ``eps`` the largest unit roundoff among the floating tensors as they came (the compute precision
    of the layer's forward and backward: bfloat16's or float16's under ``torch.autocast``)."""
    if not dtype.is_floating_point:
        return grad, args, kwargs, 0.0
    tensors = [grad, *(a for a in args if torch.is_tensor(a)), *(v for v in kwargs.values() if torch.is_tensor(v))]
    if all(t.dtype == dtype or not t.dtype.is_floating_point for t in tensors):  # the usual case: nothing to cast
        return grad, args, kwargs, _eps(dtype)
    target = _eps(dtype)
    eps = max(_eps(t.dtype) for t in tensors if t.dtype.is_floating_point)

    def up(t: Any) -> Any:
        if torch.is_tensor(t) and t.dtype.is_floating_point and t.dtype != dtype and _eps(t.dtype) >= target:
            return t.to(dtype)
        return t

    return up(grad), tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}, eps


def _autocast_off(device_type: str):
    """A context that disables ``torch.autocast`` for ``device_type`` when it is on (a backward called inside the
    autocast block), else a no-op."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        on = False
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def _inside_backward() -> bool:
    """Whether autograd is running a backward pass now (a forward recomputed by gradient checkpointing)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() >= 0


def _flat(x: Any):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)
    else:
        yield x


def _tied_local(prefix: str, own, canonical: dict[int, str], tied: set[str]) -> set[str]:
    """Local (prefixed) names of the module's parameters that are tied elsewhere."""
    return {f"{prefix}{n}" for n, p in own if canonical[id(p)] in tied}


def _canonicalise(d: BlockDraft, prefix: str, module: nn.Module, canonical: dict[int, str]) -> BlockDraft:
    def canon(q: str) -> str:
        local = q[len(prefix):] if q.startswith(prefix) else q
        p = module.get_parameter(local) if local else None
        return canonical.get(id(p), q) if p is not None else q

    params = tuple(canon(q) for q in d.params)
    return BlockDraft(canon(d.key), params, d.kind, d.shape, d.has_bias, d.bias_axis)


def _unwrap(opt: Any) -> Any:
    while opt is not None and isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):  # accelerate
        opt = opt.optimizer
    return opt


#: The settings that make two param groups step differently (compared when deciding a bias split).
GROUP_SETTINGS = ("lr", "momentum", "weight_decay", "dampening", "nesterov", "betas", "eps")


def _group_signature(group: Mapping[str, Any]) -> tuple[Any, ...]:
    def val(x: Any) -> Any:
        x = x.item() if torch.is_tensor(x) else x
        return tuple(val(y) for y in x) if isinstance(x, tuple | list) else x

    return tuple(val(group.get(key)) for key in GROUP_SETTINGS)


def _split_by_groups(model: nn.Module, optimizer: Any) -> tuple[str, ...]:
    """Bias parameters whose param group's settings differ from their weight's (now): those a
    projected run must record as their own blocks. Candidates are every ``<prefix>bias`` with a
    ``<prefix>weight``; the plan splits only drafts of rules that support it."""
    opt = _unwrap(optimizer)
    if opt is None or len(getattr(opt, "param_groups", ())) <= 1:
        return ()
    sig = {id(p): _group_signature(g) for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    out = []
    for name, p in named.items():
        if not name.endswith("bias"):
            continue
        w = named.get(name[: -len("bias")] + "weight")
        if w is not None and sig.get(id(p)) != sig.get(id(w)):
            out.append(name)
    return tuple(out)


def _split_draft(d: BlockDraft, split_bias: frozenset[str]) -> list[BlockDraft]:
    """A Kronecker ``[W | b]`` draft (``[W; b]`` for ``bias_axis=0``) whose bias is in ``split_bias``
    as the weight's draft without the bias and a dense draft for ``b``."""
    if d.kind != "kron" or not d.has_bias or len(d.params) != 2 or d.params[1] not in split_bias:
        return [d]
    rows, cols = d.shape
    if d.bias_axis == 0:
        return [BlockDraft(d.key, (d.params[0],), "kron", (rows - 1, cols), False, bias_axis=0),
                BlockDraft(d.params[1], (d.params[1],), "dense", (cols,))]
    return [BlockDraft(d.key, (d.params[0],), "kron", (rows, cols - 1), False),
            BlockDraft(d.params[1], (d.params[1],), "dense", (rows,))]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu")
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
