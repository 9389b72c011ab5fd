"""Ground truth for data value embeddings: exact trajectory-specific leave-one-out (TSLOO).

Use these to validate embeddings on your own model, optimizer and learning rates before trusting
them at scale:

1. :func:`train_reference` runs the training you want to validate (SGD, momentum, dampening,
   Nesterov, coupled weight decay, gradient clipping) in float64 and keeps snapshots of the weights,
   the optimizer state and the RNG before every ``snapshot_every``-th step. Pass
   ``step_context=`` to record the very same run with a ``datavalue.Recorder`` (the estimate and
   the ground truth must share one trajectory).
2. :func:`trajectory_loo` reruns from the snapshot just before a removal, with that occurrence's
   term dropped and **the denominator kept**, and returns
   ``loss(without) - loss(with)`` on every test point: positive = the occurrence helped.
3. :func:`spearman_per_test` scores an estimate the way the literature reports it: Spearman
   across occurrences for each test point, averaged over test points.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> make = lambda: nn.Linear(3, 2).double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    >>> ce = lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb, reduction="none")
    >>> batches = [Batch(np.arange(4), x[:4], y[:4]), Batch(np.arange(4, 8), x[4:], y[4:])]
    >>> ref = train_reference(make, batches, lrs=[0.1, 0.1], loss_fn=ce)
    >>> loo = trajectory_loo(ref, [(0, 1), 5], lambda m: ce(m, x, y))
    >>> loo.shape
    (2, 8)

Randomness inside the training step (dropout) is replayed exactly: the torch RNG state is part of
each snapshot. Data loading is not: the batches are given explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.errors import DataValueError

__all__ = [
    "Batch",
    "Reference",
    "ReplayMismatchError",
    "AdamConfig",
    "SGDConfig",
    "spearman_per_test",
    "train_reference",
    "trajectory_loo",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]
TestLoss = Callable[[nn.Module], torch.Tensor]


class ReplayMismatchError(DataValueError, RuntimeError):
    """A replay with nothing removed does not reproduce the base run bit for bit."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """One step's batch, in the order it was stepped on.

    Attributes:
        sample_ids: ``(b,)`` int ids of the examples (the ids a Recorder stores).
        inputs: whatever ``loss_fn`` takes as inputs (tensor, dict, ...).
        targets: whatever ``loss_fn`` takes as targets.
    """

    sample_ids: np.ndarray
    inputs: Any
    targets: Any

    def __post_init__(self) -> None:
        ids = np.asarray(self.sample_ids, dtype=np.int64).reshape(-1)
        if np.unique(ids).size != ids.size:
            raise ValueError(
                f"sample_ids repeat within a batch: {ids.tolist()}; give each copy its own id."
            )
        object.__setattr__(self, "sample_ids", ids)


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """``torch.optim.SGD`` settings of the reference run, plus the loss reduction and clipping.

    Attributes:
        momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD`` (coupled decay).
        max_grad_norm: clip the total gradient norm like ``torch.nn.utils.clip_grad_norm_``
            (the counterfactual recomputes the coefficient; embeddings treat it as a constant).
        grad_scales: alternatively, fixed per-step multipliers of the gradient (a clipping
            coefficient that does not depend on the data; useful to test the algebra).
        reduction: ``"mean"`` (weight ``1/|B|``, denominator kept on removal) or ``"sum"``.
    """

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    max_grad_norm: float | None = None
    grad_scales: tuple[float, ...] | None = None
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.max_grad_norm is not None and self.grad_scales is not None:
            raise ValueError("give max_grad_norm or grad_scales, not both")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0 (torch.optim.SGD rule)")

    def optimizer(self, params: Iterable[torch.Tensor], lr: float) -> torch.optim.SGD:
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=self.momentum,
            dampening=self.dampening,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )


@dataclasses.dataclass(frozen=True)
class AdamConfig:
    """``torch.optim.Adam`` / ``torch.optim.AdamW`` settings of the reference run.

    Attributes:
        kind: ``"adamw"`` (decoupled weight decay) or ``"adam"`` (coupled: ``wd * theta`` added to
            the gradient).
        betas, eps, weight_decay: as in torch.
        max_grad_norm, grad_scales, reduction: as in :class:`SGDConfig`.

    Snapshots deep-copy the moments and the step count; every replay loads a deep copy, so a
    replay never mutates a snapshot (the aliasing pitfall of ``optimizer.load_state_dict``).
    """

    kind: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float | None = None
    grad_scales: tuple[float, ...] | None = None
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.kind not in ("adam", "adamw"):
            raise ValueError(f"kind must be 'adam' or 'adamw', got {self.kind!r}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.max_grad_norm is not None and self.grad_scales is not None:
            raise ValueError("give max_grad_norm or grad_scales, not both")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def optimizer(self, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW if self.kind == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


def _config_from_optimizer(optimizer: torch.optim.Optimizer) -> SGDConfig | AdamConfig:
    """The config of param group 0 (the other groups' settings travel in the :class:`Reference`'s ``groups``)."""
    g = optimizer.param_groups[0]
    if optimizer.state:
        raise ValueError("optimizer must be fresh (no state)")
    if type(optimizer) is torch.optim.SGD:
        return SGDConfig(
            momentum=float(g["momentum"]),
            dampening=float(g["dampening"]),
            weight_decay=float(g["weight_decay"]),
            nesterov=bool(g["nesterov"]),
        )
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        if g.get("amsgrad") or g.get("maximize"):
            raise ValueError("amsgrad and maximize are not supported by the reference")
        decoupled = type(optimizer) is torch.optim.AdamW or bool(g.get("decoupled_weight_decay"))
        return AdamConfig(
            kind="adamw" if decoupled else "adam",
            betas=tuple(g["betas"]),
            eps=float(g["eps"]),
            weight_decay=float(g["weight_decay"]),
        )
    raise ValueError(
        f"optimizer must be a fresh torch.optim.SGD, Adam or AdamW, got {type(optimizer).__name__}"
    )


_OPT_KEYS = {
    SGDConfig: ("momentum", "dampening", "weight_decay", "nesterov"),
    AdamConfig: ("kind", "betas", "eps", "weight_decay"),
}


#: Param group entries that are not settings (the parameters, and the lr, which is set every step).
_GROUP_SKIP = ("params", "lr", "initial_lr")


def _group_spec(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Each param group as ``(parameter names in the group's order, settings)``: enough to rebuild
    the same groups over a fresh model (the order keeps ``load_state_dict``'s index mapping)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    spec = []
    for g in optimizer.param_groups:
        missing = [i for i, p in enumerate(g["params"]) if id(p) not in name_of]
        if missing:
            raise ValueError("the optimizer holds parameters that are not the model's; build it over model.parameters()")
        spec.append((tuple(name_of[id(p)] for p in g["params"]),
                     {k: copy.deepcopy(v) for k, v in g.items() if k not in _GROUP_SKIP}))
    return spec


@dataclasses.dataclass
class _Snapshot:
    model: dict[str, torch.Tensor]
    optim: dict[str, Any]
    rng: torch.Tensor


@dataclasses.dataclass
class Reference:
    """A finished float64 reference run with its snapshots. Build with :func:`train_reference`.

    Attributes:
        batches: the batches in step order.
        lrs: ``(T,)`` learning rates, or ``(T, G)`` per param group.
        grad_scales: ``(T,)`` gradient multipliers actually applied (clipping coefficients; 1.0
            when unclipped).
        weights: per step, ``(b,)`` weights ``w_t(z)`` of the rows (``1/|B|`` for a mean).
        final_params: the trained parameters, flattened per name.
    """

    model_factory: Callable[[], nn.Module]
    batches: list[Batch]
    lrs: np.ndarray
    loss_fn: LossFn
    config: SGDConfig | AdamConfig
    snapshots: dict[int, _Snapshot]
    final_state: dict[str, torch.Tensor]
    grad_scales: np.ndarray
    weights: list[np.ndarray]
    #: the optimizer's param groups as ``(names, settings)`` (``None``: one group of every trainable
    #: parameter, settings from ``config``); every replay rebuilds them over the fresh model
    groups: list[tuple[tuple[str, ...], dict[str, Any]]] | None = None

    def group_lrs(self, t: int) -> np.ndarray:
        """``(G,)`` the learning rate of every param group at step ``t``."""
        return _group_lrs(self.lrs, t, self.groups)

    @property
    def n_steps(self) -> int:
        return len(self.batches)

    def occurrences(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, sample_ids)``, both ``(R,)``, in the row order of a recorded run."""
        steps = np.concatenate([np.full(len(b.sample_ids), t) for t, b in enumerate(self.batches)])
        ids = np.concatenate([b.sample_ids for b in self.batches])
        return steps, ids

    def final_model(self) -> nn.Module:
        """A fresh model (from ``model_factory``) holding the final weights."""
        model = self.model_factory()
        model.load_state_dict(copy.deepcopy(self.final_state))
        return model

    def model_at(self, step: int) -> nn.Module:
        """A fresh model with the weights *before* ``step`` (``step = T`` gives the final model).

        Steps without a snapshot are replayed from the previous one.
        """
        if step == self.n_steps:
            return self.final_model()
        model, _ = _replay(self, start=self._snapshot_before(step), stop=step, masks={})
        return model

    def _snapshot_before(self, step: int) -> int:
        s = max(t for t in self.snapshots if t <= step)
        return s


def _group_lrs(lrs: np.ndarray, t: int, groups: list[tuple[tuple[str, ...], dict[str, Any]]] | None) -> np.ndarray:
    G = 1 if groups is None else len(groups)
    row = np.asarray(lrs[t], dtype=np.float64).reshape(-1)
    return np.repeat(row, G) if row.size == 1 else row


def _step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Batch,
    lr: np.ndarray,
    loss_fn: LossFn,
    cfg: SGDConfig | AdamConfig,
    t: int,
    keep: torch.Tensor | None,
    context: AbstractContextManager[Any] | None = None,
) -> float:
    """One training step; the base run and every replay go through this same code. ``lr``: ``(G,)``
    one learning rate per param group."""
    for g, lr_g in zip(opt.param_groups, np.asarray(lr).reshape(-1), strict=True):
        g["lr"] = float(lr_g)
    opt.zero_grad(set_to_none=True)
    c = 1.0
    with context if context is not None else nullcontext() as handle:
        losses = loss_fn(model, batch.inputs, batch.targets)
        if losses.dim() != 1 or losses.shape[0] != len(batch.sample_ids):
            raise ValueError(
                f"loss_fn must return one loss per example ({len(batch.sample_ids)},), got shape {tuple(losses.shape)}"
            )
        if keep is None:
            keep = torch.ones_like(losses)
        denom = float(len(batch.sample_ids)) if cfg.reduction == "mean" else 1.0
        loss = (losses * keep).sum() / denom
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        if cfg.max_grad_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            c = min(1.0, float(cfg.max_grad_norm / (float(total) + 1e-6)))
        elif cfg.grad_scales is not None:
            c = float(cfg.grad_scales[t])
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(c)
        if handle is not None and hasattr(handle, "clip_coef"):
            handle.clip_coef = c  # e.g. a Recorder's StepHandle
    opt.step()
    return c


def _new_optimizer(
    model: nn.Module, cfg: SGDConfig | AdamConfig, lr: np.ndarray,
    groups: list[tuple[tuple[str, ...], dict[str, Any]]] | None = None,
) -> torch.optim.Optimizer:
    """A fresh optimizer over ``model``: one group from ``cfg``, or the recorded ``groups`` (by
    parameter name, each with its own settings) at learning rates ``lr`` ``(G,)``."""
    lr = np.asarray(lr, dtype=np.float64).reshape(-1)
    if groups is None:
        return cfg.optimizer([p for p in model.parameters() if p.requires_grad], float(lr[0]))
    named = dict(model.named_parameters())
    return cfg.optimizer(
        [{"params": [named[n] for n in names], **copy.deepcopy(opts), "lr": float(lr_g)}
         for (names, opts), lr_g in zip(groups, lr, strict=True)],
        float(lr[0]),
    )


def _replay(
    ref: Reference, *, start: int, stop: int, masks: dict[int, np.ndarray]
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Restore the snapshot before ``start`` (deep copies: the snapshot is never aliased) and run
    steps ``start..stop-1`` with per-step keep masks."""
    snap = ref.snapshots[start]
    model = ref.model_factory()
    model.load_state_dict(copy.deepcopy(snap.model))
    model.train()
    opt = _new_optimizer(model, ref.config, ref.group_lrs(min(start, ref.n_steps - 1)), ref.groups)
    # load_state_dict keeps references to the tensors it is given: a deep copy, or the next
    # replay from this snapshot starts from a mutated momentum buffer
    opt.load_state_dict(copy.deepcopy(snap.optim))
    rng = torch.get_rng_state()
    torch.set_rng_state(snap.rng)
    try:
        for t in range(start, stop):
            mask = masks.get(t)
            keep = None
            if mask is not None:
                keep = torch.as_tensor(mask, dtype=next(model.parameters()).dtype)
            _step(model, opt, ref.batches[t], ref.group_lrs(t), ref.loss_fn, ref.config, t, keep)
    finally:
        torch.set_rng_state(rng)
    return model, opt


def train_reference(
    model_factory: Callable[[], nn.Module],
    batches: Sequence[Batch],
    lrs: Sequence[float] | np.ndarray,
    loss_fn: LossFn,
    *,
    config: SGDConfig | AdamConfig | None = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
    snapshot_every: int = 1,
    step_context: Callable[[int, Batch, float], AbstractContextManager[Any]] | None = None,
    verify: bool = True,
) -> Reference:
    """Train once, keeping snapshots, so that every leave-one-out replays only the tail.

    Args:
        model_factory: builds a fresh model of the architecture (its initial values are replaced
            by the snapshots; float64 parameters are strongly advised).
        batches: the exact batches, in step order.
        lrs: ``(T,)`` the learning rate of every step (every param group's), or ``(T, G)`` one per
            param group and step.
        loss_fn: ``loss_fn(model, inputs, targets) -> (b,)`` per-example losses
            (``reduction="none"``); the stepped loss is their mean (or sum, see ``config``).
        config: optimizer, reduction and clipping (:class:`SGDConfig`, or :class:`AdamConfig` for
            ``torch.optim.Adam``/``AdamW``); default plain SGD, mean.
        model: the model to train in place (e.g. one a ``Recorder`` is attached to); default
            ``model_factory()``. Its initial weights are the run's initial weights.
        optimizer: a fresh ``torch.optim.SGD``, ``Adam`` or ``AdamW`` over ``model``'s parameters
            to step with (e.g. the one given to ``Recorder(optimizer=...)``); its settings must
            agree with ``config`` (default config: taken from param group 0). Several param groups
            (each with its own settings, e.g. ``weight_decay=0`` for biases) are replayed as they are:
            every replay rebuilds them by parameter name.
        param_groups: alternatively to ``optimizer``, ``param_groups(model) -> [{"params": [...],
            "weight_decay": ...}, ...]`` builds torch-style param groups over a model; settings a group
            leaves out come from ``config``. With groups, give ``lrs`` as ``(T, G)``.
        snapshot_every: keep a snapshot before every n-th step (memory vs replay time).
        step_context: ``step_context(t, batch, lr)`` (``lr``: param group 0's) returns a context manager that wraps the
            forward and backward of step ``t``, e.g. ``lambda t, b, lr: rec.step(sample_ids=b.sample_ids, lr=lr)``.
            If it yields an object with a ``clip_coef`` attribute, the applied clipping
            coefficient is written to it.
        verify: replay twice from a middle snapshot with nothing removed and check that both
            reproduce the final weights bit for bit (raises :class:`ReplayMismatchError`).

    Returns:
        A :class:`Reference` for :func:`trajectory_loo`.
    """
    if optimizer is not None:
        from_opt = _config_from_optimizer(optimizer)
        if config is None:
            config = from_opt
        elif type(config) is not type(from_opt) or any(
            getattr(config, key) != getattr(from_opt, key) for key in _OPT_KEYS[type(config)]
        ):
            raise ValueError(f"optimizer settings {from_opt} disagree with {config}")
    cfg = config or SGDConfig()
    batches = list(batches)
    lrs = np.asarray(lrs, dtype=np.float64)
    if lrs.ndim != 2:
        lrs = lrs.reshape(-1)
    T = len(batches)
    if lrs.shape[0] != T:
        raise ValueError(f"got {T} batches but {lrs.shape[0]} learning rates")
    if optimizer is not None and param_groups is not None:
        raise ValueError("give optimizer= or param_groups=, not both")
    if cfg.grad_scales is not None and len(cfg.grad_scales) != T:
        raise ValueError(f"grad_scales has {len(cfg.grad_scales)} entries for {T} steps")
    if snapshot_every < 1:
        raise ValueError("snapshot_every must be >= 1")
    model = model if model is not None else model_factory()
    if any(p.dtype != torch.float64 for p in model.parameters()):
        warnings.warn(
            "the reference model is not float64: tiny leave-one-out differences drown in rounding. "
            "Build the model with .double().",
            stacklevel=2,
        )
    model.train()
    lr0 = np.asarray(lrs[0] if T else 0.0).reshape(-1)
    if optimizer is not None:
        opt = optimizer
    elif param_groups is not None:
        opt = cfg.optimizer(param_groups(model), float(lr0[0]))
    else:
        opt = _new_optimizer(model, cfg, lr0)
    groups = _group_spec(model, opt) if len(opt.param_groups) > 1 else None
    if groups is not None:
        G = len(groups)
        if lrs.ndim == 2 and lrs.shape[1] != G:
            raise ValueError(f"lrs has {lrs.shape[1]} columns but the optimizer has {G} param groups")
        if lrs.ndim == 1:
            raise ValueError(
                f"the optimizer has {G} param groups: give lrs as (T, {G}), one learning rate per group and step"
            )
    elif lrs.ndim == 2 and lrs.shape[1] != 1:
        raise ValueError(f"lrs has {lrs.shape[1]} columns but the optimizer has one param group")
    snapshots: dict[int, _Snapshot] = {}
    scales = np.ones(T)
    weights = []
    for t, batch in enumerate(batches):
        if t % snapshot_every == 0:
            snapshots[t] = _Snapshot(
                model=copy.deepcopy(model.state_dict()),
                optim=copy.deepcopy(opt.state_dict()),
                rng=torch.get_rng_state(),
            )
        lr_t = _group_lrs(lrs, t, groups)
        ctx = step_context(t, batch, float(lr_t[0])) if step_context is not None else None
        scales[t] = _step(model, opt, batch, lr_t, loss_fn, cfg, t, None, ctx)
        b = len(batch.sample_ids)
        weights.append(np.full(b, 1.0 / b) if cfg.reduction == "mean" else np.ones(b))
    ref = Reference(
        model_factory=model_factory,
        batches=batches,
        lrs=lrs,
        loss_fn=loss_fn,
        config=cfg,
        snapshots=snapshots,
        final_state=copy.deepcopy(model.state_dict()),
        grad_scales=scales,
        weights=weights,
        groups=groups,
    )
    if verify and T:
        start = ref._snapshot_before(T // 2)
        for attempt in range(2):
            replayed, _ = _replay(ref, start=start, stop=T, masks={})
            _check_identical(ref.final_state, replayed.state_dict(), start, attempt)
    return ref


def _check_identical(
    want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], start: int, attempt: int
) -> None:
    for name, w in want.items():
        g = got[name]
        if not torch.equal(w, g):
            diff = float((w.double() - g.double()).abs().max())
            raise ReplayMismatchError(
                f"replay {attempt + 1} from the step-{start} snapshot with nothing removed differs from the base run in "
                f"{name!r} (max |diff| {diff:.3g}). The ground truth would be wrong. Causes: non-deterministic kernels "
                "(torch.use_deterministic_algorithms(True)), randomness outside the step (pass fixed batches), "
                "a model_factory that builds a different architecture, or state not captured by state_dict()."
            )


def _resolve(ref: Reference, removal: Any, fraction: float = 1.0) -> dict[int, np.ndarray]:
    """Keep masks per step for one removal: ``(step, sample_id)`` or ``sample_id`` (all occurrences)."""
    masks: dict[int, np.ndarray] = {}
    if isinstance(removal, tuple | list) and len(removal) == 2:
        t, sid = int(removal[0]), int(removal[1])
        if not 0 <= t < ref.n_steps:
            raise ValueError(f"removal {removal}: step {t} is outside 0..{ref.n_steps - 1}")
        hit = ref.batches[t].sample_ids == sid
        if not hit.any():
            raise ValueError(f"removal {removal}: sample {sid} is not in the batch of step {t}")
        masks[t] = np.where(hit, 1.0 - fraction, 1.0)
        return masks
    sid = int(removal)
    for t, b in enumerate(ref.batches):
        hit = b.sample_ids == sid
        if hit.any():
            masks[t] = np.where(hit, 1.0 - fraction, 1.0)
    if not masks:
        raise ValueError(f"removal of sample {sid}: it occurs in no batch")
    return masks


def trajectory_loo(
    reference: Reference,
    removals: Sequence[Any],
    test_loss: TestLoss,
    *,
    epsilon: float | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Exact trajectory-specific leave-one-out, in float64.

    For each removal, rerun from the snapshot just before it with the identical batches, order
    and optimizer state, the removed term dropped from the step's loss and every other example
    keeping its weight (the mean's denominator is kept).

    Args:
        reference: from :func:`train_reference`.
        removals: each is ``(step, sample_id)`` (one occurrence) or a bare ``sample_id`` (all its
            occurrences, in every epoch).
        test_loss: ``test_loss(model) -> (m,)`` per-test-point losses, evaluated at the final
            weights (in ``model.eval()`` mode, without gradients).
        epsilon: instead of removing the occurrence, remove only this fraction of its weight and
            return ``(loss(eps removed) - loss(with)) / eps``: the exact first-order linearisation
            of the removal (what a first-order estimate can at best reach; compare it with the
            full removal to see how nonlinear the removal is).
        progress: show a tqdm bar.

    Returns:
        ``(n_removals, m)`` float64: ``loss(without) - loss(with)``. Positive = the occurrence
        helped (removing it raises the test loss).
    """
    base = _evaluate(reference.final_model(), test_loss)
    out = np.empty((len(removals), base.shape[0]), dtype=np.float64)
    it: Iterable[int] = range(len(removals))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="trajectory LOO", total=len(removals))
    fraction = 1.0 if epsilon is None else float(epsilon)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"epsilon must lie in (0, 1], got {epsilon}")
    for i in it:
        masks = _resolve(reference, removals[i], fraction)
        start = reference._snapshot_before(min(masks))
        model, _ = _replay(reference, start=start, stop=reference.n_steps, masks=masks)
        out[i] = (_evaluate(model, test_loss) - base) / fraction
    return out


def _evaluate(model: nn.Module, test_loss: TestLoss) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        losses = test_loss(model)
    return losses.detach().to(torch.float64).cpu().numpy().reshape(-1)


def spearman_per_test(
    est: np.ndarray, truth: np.ndarray, *, return_all: bool = False
) -> float | np.ndarray:
    """Spearman correlation across occurrences, per test point, averaged over test points.

    Args:
        est: ``(n_occurrences, m)`` estimated influences (e.g. ``embeddings @ test_grads.T``).
        truth: ``(n_occurrences, m)`` from :func:`trajectory_loo`.
        return_all: return the ``(m,)`` per-test-point correlations instead of their mean.

    Test points where either column is constant are left out of the mean (``nan`` in
    ``return_all``). Pooled correlations read higher; report this one.

    Example:
        >>> spearman_per_test(np.array([[1.0], [2.0], [3.0]]), np.array([[10.0], [30.0], [20.0]]))
        0.5
    """
    from scipy.stats import rankdata

    est = np.asarray(est, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if est.ndim == 1:
        est, truth = est[:, None], truth.reshape(-1, 1)
    if est.shape != truth.shape:
        raise ValueError(
            f"est {est.shape} and truth {truth.shape} must have the same (n_occurrences, m) shape"
        )
    rho = np.full(est.shape[1], np.nan)
    for j in range(est.shape[1]):
        a, b = rankdata(est[:, j]), rankdata(truth[:, j])
        sa, sb = a.std(), b.std()
        if sa > 0 and sb > 0:
            rho[j] = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
    if return_all:
        return rho
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")
