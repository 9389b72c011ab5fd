"""The update checks of a recorded run: the optimizer applies the step the run records.

:class:`UnrecordedGradients` (with ``optimizer=``) holds each recorded step until the optimizer's
step pre-hook has compared the update about to run with it (the gradient in ``.grad`` against the
captured rows, through a :class:`~datavalue.capture._gradient_probe.GradientProbe`; the param groups'
hyperparameters; the optimizer state) and, between updates, that the weights stay what the last update
left (a fingerprint after each update, compared when the next block starts). The probe, the gradient
tolerances and :class:`BlockGradientCheck` (the gradient check of a recorder without an optimizer) live
in ``capture/_gradient_probe.py``. Split out of ``capture/_optim.py`` (issue 20, house rule on module
size); ``_optim`` re-exports every name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from datavalue.capture._engine import Engine, to_numpy
from datavalue.capture._gradient_probe import GRADIENT_ATOL as GRADIENT_ATOL
from datavalue.capture._gradient_probe import GRADIENT_RTOL as GRADIENT_RTOL
from datavalue.capture._gradient_probe import NOT_PER_EXAMPLE as NOT_PER_EXAMPLE
from datavalue.capture._gradient_probe import BlockGradientCheck as BlockGradientCheck
from datavalue.capture._gradient_probe import GradientProbe as GradientProbe
from datavalue.capture._gradient_probe import _loss_scale, _residual
from datavalue.capture._gradient_probe import gradient_tolerances as gradient_tolerances
from datavalue.capture._optim import group_state, unwrap_optimizer
from datavalue.errors import NonFiniteError, RecorderError, RecorderStateError


@dataclasses.dataclass
class PendingStep:
    """What a recorded step holds of its update, kept until ``optimizer.step()`` applies it."""

    step: int
    #: ``(m,)`` the :class:`GradientProbe` of the captured rows' sum (the gradient of the stepped loss)
    #: or ``None`` (not compared: several ranks, non-finite rows)
    raw: torch.Tensor | None
    #: the summed norms of the captured rows, probed (scale of the rounding slack)
    scale: float
    #: the recorded clip coefficient (1 when none)
    clip: float
    #: every param group's ``lr``, ``momentum``, ``weight_decay`` as recorded
    groups: dict[str, np.ndarray]
    #: an explicit ``lr`` given to the recorder (recorded instead of group 0's), or ``None``
    lr: float | None
    #: some rows were non-finite (flagged): a skipped update (``GradScaler``) is expected
    nonfinite: bool
    applied: bool = False


def _steps(n: int) -> str:
    return f"{n} step{'' if n == 1 else 's'}"


#: Relative change of a block's weights fingerprint (the :class:`GradientProbe` reduction of its weights,
#: in the capture dtype) above which the weights count as moved between two points where nothing may move
#: them; the same tensors reduced twice agree exactly (the rounding of one reduction is ~1e-7 in float32).
WEIGHTS_RTOL = 1e-6


def _another_optimizer(names: list[str], when: str) -> str:
    return (f"the weights of {names[:3]}{' ...' if len(names) > 3 else ''} changed {when}, but their parameters "
            "are in none of the param groups of the optimizer given to the Recorder: another optimizer steps them, "
            "with an update the run does not record")


#: The fix of :func:`_another_optimizer`.
ONE_OPTIMIZER = ("pass one optimizer with param groups (e.g. torch.optim.SGD([{'params': a.parameters()}, "
                 "{'params': b.parameters(), 'lr': 0.5}])), or record only the given optimizer's layers with "
                 "layers=[...]")


class UnrecordedGradients:
    """Refuse an optimizer update that differs from the step the run records.

    A recorded step is held back from the writer (``StepSink.submit(..., hold=True)``) until the
    optimizer's step pre-hook has checked that the update about to run is the recorded one; a
    refusal drops it, so nothing of a refused step is written. The pre-hook refuses:

    * gradient in ``.grad`` from a backward pass outside any recorded block (``rec.step``,
      ``rec.microbatch``) after the last block: each trainable parameter's post-accumulate hook
      counts such passes (``autograd.grad``, as queries and Fisher pseudo-gradients use it, and
      in-place edits such as clipping do not count); a recorded block starting resets the count (a
      backward whose gradient was zeroed before the step is harmless);
    * a gradient that is not the recorded one: ``.grad`` against the sum of the captured rows, both
      reduced by a :class:`GradientProbe` (a forgotten ``zero_grad()`` adds the previous step's gradient; an edit such as
      clipping after the block scales it by a coefficient the step did not record);
    * per-group ``lr``, ``momentum`` or ``weight_decay`` changed since the step was recorded (a
      scheduler stepped before the optimizer, a manual ``param_groups`` edit);
    * an update with no recorded step (``optimizer.step()`` twice for one block);
    * a captured parameter whose optimizer state (momentum buffer, Adam moments) is gone since the previous
      update, or, on resume, an optimizer holding no state where the run's last step left some (fifth probe);
    * a recorded layer in none of the optimizer's param groups that moved since its block started (a second
      optimizer steps it).

    After each verified update a step post-hook takes the weights' fingerprint (the probe's reduction of the
    weights, one pass over them); :meth:`before_block` refuses the next block while the weights differ from it
    (an edit after ``optimizer.step()``: max-norm, clamping, an EMA copied back, or a second optimizer).

    A block starting while the previous step's update never ran (``optimizer.step()`` skipped) is
    refused by :meth:`before_block`, unless that step's rows were non-finite (a ``GradScaler``
    skips such updates).

    Args:
        engine: the capture engine (its blocks' columns are those of the rows compared).
        optimizer: the training optimizer (possibly wrapped).
        release, drop: called with the step's index when its update is verified (write it) or refused
            (forget it).
        compare_gradients: whether the gradient check runs (off under several ranks: ``.grad`` is the
            average over ranks, the rows are this rank's).
        resumed_state, resumed_count: on resume, the optimizer state (in words) and the Adam step count the
            run's last step left, checked at the first update.
        on_resume_refused: called (no arguments) when that first update refuses the resumed state, before the
            error is raised: the recorder closes itself (``ResumeChecks._abandon_resume``).
    """

    def __init__(self, engine: Engine, optimizer: Any, *, release: Any = None, drop: Any = None,
                 compare_gradients: bool = True, resumed_state: str | None = None,
                 resumed_count: int | None = None, on_resume_refused: Any = None) -> None:
        self.engine = engine
        self.optimizer = unwrap_optimizer(optimizer)
        self.unrecorded: set[str] = set()
        self.pending: PendingStep | None = None
        self._release = release or (lambda step: None)
        self._drop = drop or (lambda step: None)
        self.compare_gradients = bool(compare_gradients)
        self.probe = GradientProbe(engine) if self.compare_gradients else None
        named = dict(engine.model.named_parameters())
        self._trainable = [p for p in named.values() if p.requires_grad]
        self._captured = {q: named[q] for b in engine.blocks for q in b.params if q in named}
        self.rtol, self.atol = gradient_tolerances(self._captured.values())
        # the weights' fingerprint (the probe's reduction of the weights themselves, block by block): taken
        # after each verified update and compared when the next block starts (edits after optimizer.step())
        self._weights_probe = self.probe if self.probe is not None else GradientProbe(engine)
        self._block_names = [b.name for b in engine.blocks]
        in_groups = {id(q) for g in self.optimizer.param_groups for q in g["params"]}
        #: blocks whose parameters are all trainable and in none of the optimizer's groups: they must not move
        self._orphans = [i for i, b in enumerate(engine.blocks)
                         if all(q in named and named[q].requires_grad and id(named[q]) not in in_groups for q in b.params)]
        self._after_update: list[torch.Tensor] | None = None
        self._orphans_at_block: list[torch.Tensor] | None = None
        self._segments: dict[tuple[int, ...], np.ndarray] = {}  # fingerprint sizes -> segment starts
        #: the captured parameters holding optimizer state after the last update (state lost: P5-12)
        self._stateful: list[str] = []
        #: on resume, the optimizer state the run's last recorded step left (checked at the first update)
        self._resumed_state = resumed_state
        #: on resume of an Adam run, the step count its last recorded step left (checked at the first update)
        self._resumed_count = resumed_count
        #: called when the first update refuses the resumed state (the recorder closes itself), before the error
        self._on_resume_refused = on_resume_refused
        self._handles = [p.register_post_accumulate_grad_hook(lambda _p, n=name: self._on_accumulate(n))
                         for name, p in named.items() if p.requires_grad]
        self._handles.append(self.optimizer.register_step_pre_hook(self._on_step))
        self._handles.append(self.optimizer.register_step_post_hook(self._after_step))

    def _on_accumulate(self, name: str) -> None:
        if self.engine.sink is None:
            self.unrecorded.add(name)

    def block_started(self) -> None:
        self.unrecorded.clear()

    # ------------------------------------------------------------------ the recorded step
    def expect(self, step: int, rows: torch.Tensor | None, *, clip: float | None, lr: float | None) -> None:
        """A step was recorded (and is held): its update must apply the sum of ``rows`` (``(b, k)``, the
        captured rows with the loss weights inside, before any whitening) scaled by ``clip``."""
        raw, scale, nonfinite = None, 0.0, False
        if rows is not None:
            with torch.no_grad():
                red = self.probe.reduce(rows.detach()) if self.probe is not None else rows.detach().sum(0, keepdim=True)
                raw = red.sum(0)
                nonfinite = not bool(torch.isfinite(raw).all())
                if self.probe is not None and not nonfinite:
                    scale = float(red.to(torch.float64).norm(dim=-1).sum())
                else:
                    raw = None
        self.pending = PendingStep(step=step, raw=raw, scale=scale, clip=1.0 if clip is None else float(clip),
                                   groups=group_state(self.optimizer), lr=lr, nonfinite=nonfinite)

    def waiting(self) -> int | None:
        """The recorded step whose update has not run yet, or ``None``."""
        p = self.pending
        return None if p is None or p.applied else p.step

    def before_block(self) -> None:
        """A new recorded block starts: the previous step's update must have run, and the weights must be the
        ones it left."""
        p = self.pending
        if p is None or p.applied:
            self._check_weights_unchanged(p)
            return
        self.pending = None
        if p.nonfinite:  # an AMP GradScaler skips the update of a step with non-finite gradients
            self._release(p.step)
            return
        self._drop(p.step)
        raise RecorderStateError(
            f"step {p.step} was recorded but optimizer.step() never ran after it, so the update the run records did "
            f"not happen. Step {p.step} was not written (the run keeps the {_steps(p.step)} before it). Call optimizer.step() "
            "once after every recorded block (rec.step or rec.commit_step), before the next one; to record a step "
            "without an update, do not record it at all."
        )

    def finish(self) -> int | None:
        """The recorder closes: a step whose update never ran is dropped (returned), a non-finite one written."""
        p, self.pending = self.pending, None
        if p is None or p.applied:
            return None
        if p.nonfinite:
            self._release(p.step)
            return None
        self._drop(p.step)
        return p.step

    # ------------------------------------------------------------------ the weights between updates
    def _fingerprint(self, only: Any = None) -> list[torch.Tensor]:
        with torch.no_grad():
            return self._weights_probe.of_blocks({n: q.detach() for n, q in self._captured.items()}, only=only)

    def _moved(self, before: list[torch.Tensor], now: list[torch.Tensor]) -> list[int]:
        """Indices of the fingerprints that differ beyond :data:`WEIGHTS_RTOL` of their norm."""
        if not before:
            return []
        key = tuple(t.numel() for t in before)
        starts = self._segments.get(key)
        if starts is None:
            if min(key) < 1:
                raise RecorderError(f"internal: an empty weights fingerprint among {key}.")
            starts = np.concatenate([[0], np.cumsum(key)[:-1]]).astype(np.intp)
            self._segments[key] = starts
        with torch.no_grad():  # one device-to-host copy; the segment norms on the host (a few hundred numbers)
            a, b = to_numpy(torch.stack([torch.cat(before), torch.cat(now)]).to(torch.float64))
        d = np.sqrt(np.add.reduceat(np.square(a - b), starts))
        top = np.sqrt(np.maximum(np.add.reduceat(np.square(a), starts), np.add.reduceat(np.square(b), starts)))
        return [int(i) for i in np.flatnonzero((d > WEIGHTS_RTOL * top) | ~np.isfinite(d))]

    def _check_weights_unchanged(self, p: PendingStep | None) -> None:
        """A block starts after a verified update: refuse it when the weights moved since that update."""
        if self._after_update is None:
            if self._orphans and self._orphans_at_block is None:
                self._orphans_at_block = self._fingerprint(self._orphans)
            return
        now = self._fingerprint()
        moved = self._moved(self._after_update, now)
        if not moved:
            self._after_update = None
            self._orphans_at_block = [now[i] for i in self._orphans] if self._orphans else None
            return
        # kept until the weights are back: a retry from the edited weights is refused too
        names = [self._block_names[i] for i in moved]
        kept = (f"The run keeps its {_steps(p.step + 1)}; this block was not recorded (nor is any other until the "
                "weights are the ones the last update left). ") if p is not None else ""
        self._refuse_nonfinite_weights(kept)
        if all(i in self._orphans for i in moved):
            raise RecorderStateError(f"{_another_optimizer(names, 'after the last optimizer.step()')}. {kept}Fix: "
                                     f"{ONE_OPTIMIZER}.")
        raise RecorderStateError(
            f"the weights of {names[:3]}{' ...' if len(names) > 3 else ''} changed between the last optimizer.step() "
            "and this block (weight clipping or a max-norm constraint, an EMA copied back, an edit through .data, "
            "or another optimizer stepping these parameters?). The run records only the optimizer's updates, so "
            f"every later step would model weights that were never trained. {kept}Fix: leave the weights to the "
            "optimizer while recording (an EMA: evaluate a copy instead of copying it back); to keep such an edit, "
            "record only the layers it does not touch (layers=[...]) or do it before recording starts (a new run)."
        )

    def _refuse_nonfinite_weights(self, kept: str) -> None:
        """Weights that hold NaN or inf (an update that overflowed) are not weights that "changed" (P9-16)."""
        bad = self.nonfinite_weights()
        if not bad:
            return
        dtypes = sorted({str(self._captured[n].dtype).removeprefix("torch.") for n in bad})
        half = any(d in ("float16", "bfloat16") for d in dtypes)
        raise NonFiniteError(
            f"the weights of {bad[:3]}{' ...' if len(bad) > 3 else ''} ({', '.join(dtypes)}) hold NaN or inf after "
            "the last optimizer.step(): the update itself overflowed, nothing edited them, and no later step can be "
            f"recorded from them. {kept}"
            + ("In float16, Adam's default eps=1e-8 rounds to 0 (float16's smallest step is 6e-8), so a zero "
               "second moment divides 0 by 0. Fix: keep float32 master weights (a float32 model under "
               "torch.autocast(dtype=torch.float16 or torch.bfloat16), with torch.amp.GradScaler for float16), "
               "train in bfloat16 or float32, or give Adam eps >= 1e-4 in float16; "
               if half else "Fix: lower the learning rate or clip the gradients (torch.nn.utils.clip_grad_norm_); ")
            + "then record a new run."
        )

    def nonfinite_weights(self) -> list[str]:
        """The recorded parameters whose weights hold NaN or inf (``[]``: none)."""
        with torch.no_grad():
            return [n for n, q in self._captured.items() if not bool(torch.isfinite(q.detach()).all())]

    def moved_since_update(self) -> list[str]:
        """The blocks whose weights moved since the last verified update (``[]``: none, or no update yet)."""
        if self._after_update is None:
            return []
        return [self._block_names[i] for i in self._moved(self._after_update, self._fingerprint())]

    def _after_step(self, opt: Any, args: Any, kwargs: Any) -> None:  # noqa: ARG002
        """Optimizer step post-hook: the weights' fingerprint and which parameters hold state, after the update."""
        p = self.pending
        if p is None or not p.applied:
            return
        self._after_update = self._fingerprint()
        self._orphans_at_block = None
        state = self.optimizer.state
        self._stateful = [n for n, q in self._captured.items() if state.get(q)]  # .get: no insert (defaultdict)

    def _check_state(self, p: PendingStep) -> None:
        """Refuse an update whose optimizer lost the state the previous update left (P5-12)."""
        state = self.optimizer.state
        if self._resumed_state is not None:
            expected, self._resumed_state = self._resumed_state, None
            groups = self.optimizer.param_groups
            if type(self.optimizer).__name__ == "SGD" and not any(g.get("momentum") for g in groups):
                return  # SGD without momentum now: no buffer is read, nothing restarts
            with_grad = [n for n, q in self._captured.items() if q.grad is not None]
            if with_grad and not any(state.get(self._captured[n]) for n in with_grad):
                self._refuse_resume(p, f"the optimizer holds no state for the recorded parameters, but the run was resumed "
                             f"after step {p.step - 1}, whose update left {expected}: the optimizer's state was not "
                             "restored from the checkpoint (a fresh optimizer), so this update would restart it while the "
                             "run models it as carried on",
                             "load the optimizer's state with the weights (optimizer.load_state_dict(checkpoint["
                             "'optimizer']) before the first resumed step); to restart the optimizer on purpose (a warm "
                             "restart), record the rest as a new run (another path)")
                return
            count, self._resumed_count = self._resumed_count, None
            if count is not None:
                held = sorted({_state_count(state.get(self._captured[n])) for n in with_grad} - {None})
                if held and held != [count]:
                    self._refuse_resume(p, f"the optimizer's state holds Adam step count(s) {held}, but the run was resumed "
                                 f"after step {p.step - 1}, whose update left the count {count}: the state was restored "
                                 "from another checkpoint than the weights (an older one?), so this update would use "
                                 "other moments and bias corrections than the run models",
                                 "load the optimizer's state saved with these weights (the checkpoint of the run's last "
                                 "rec.flush()); to go on from other state on purpose, record the rest as a new run "
                                 "(another path)")
            return
        lost = [n for n in self._stateful if not state.get(self._captured[n])]
        if lost:
            self._stateful = []
            self._refuse(p, f"the optimizer's state of {len(lost)} recorded parameter(s) ({lost[:3]}"
                         f"{' ...' if len(lost) > 3 else ''}: momentum buffers, Adam moments and step counts) is gone "
                         "since the previous update (optimizer.state cleared, or the optimizer reset for a warm "
                         "restart), so this update restarts it while the run models it as carried on",
                         "keep the optimizer's state while recording (no opt.state.clear()); to restart the optimizer "
                         "on purpose, close this Recorder and record the rest as a new run (another path)")

    def _on_step(self, opt: Any, args: Any, kwargs: Any) -> None:  # noqa: ARG002
        p = self.pending
        if self.unrecorded:
            names, self.unrecorded = sorted(self.unrecorded), set()
            self._refuse(p, "a backward pass outside any recorded block accumulated gradient into "
                         f"{names[:3]}{' ...' if len(names) > 3 else ''} after the last recorded block, so this update "
                         "holds gradient that the run does not (gradient accumulation with a block around one "
                         "micro-batch?)", "record every micro-batch in `with rec.microbatch(ids):` (then "
                         "rec.commit_step()), or run every backward inside the step's `with rec.step(...)` block; then "
                         "optimizer.zero_grad() and record this step again")
        if p is None or p.applied:
            if all(q.grad is None for q in self._trainable):  # torch optimizers skip parameters without gradient
                return
            said = (f"step {p.step}'s update already ran (optimizer.step() called twice for one block?)" if p is not None
                    else "no step has been recorded since this Recorder started")
            raise RecorderError(
                f"optimizer.step(): this update has no recorded step: {said}. The update was not applied. Call "
                "optimizer.step() once per recorded block (`with rec.step(ids): loss.backward()` or rec.commit_step()), "
                "and optimizer.zero_grad() after it."
            )
        now = group_state(self.optimizer)
        diffs = []
        for key, rec in p.groups.items():
            for gi, (a, b) in enumerate(zip(rec, now[key])):
                if not (a == b or np.isclose(a, b, rtol=1e-12, atol=0.0)):
                    diffs.append(f"param group {gi} {key.removeprefix('group_')}: recorded {float(a)!r}, now {float(b)!r}")
        if p.lr is not None and not np.isclose(p.lr, now["group_lr"][0], rtol=1e-12, atol=0.0) and not diffs:
            self._refuse(p, f"the step recorded lr={p.lr!r} (given to rec.step(lr=...) or rec.commit_step(lr=...)), but "
                         f"the optimizer's param group 0 updates with lr {float(now['group_lr'][0])!r}",
                         "with Recorder(..., optimizer=opt) omit lr= (the recorder reads the optimizer's), or set it on "
                         "opt.param_groups before the block")
        if diffs:
            self._refuse(p, f"the optimizer's hyperparameters changed after the step was recorded ({'; '.join(diffs[:4])}"
                         f"{' ...' if len(diffs) > 4 else ''}), so the run would record values this update does not use",
                         "call scheduler.step() after optimizer.step() (not between the block and it), and set lr, "
                         "momentum or weight decay before the recorded block")
        if p.raw is not None:
            self._check_gradient(p)
        if self._orphans and self._orphans_at_block is not None:
            moved = self._moved(self._orphans_at_block, self._fingerprint(self._orphans))
            if moved:
                self._refuse(p, _another_optimizer([self._block_names[self._orphans[i]] for i in moved],
                                                   "since this step's block started"), ONE_OPTIMIZER)
        self._check_state(p)
        p.applied = True
        self._release(p.step)

    def _check_gradient(self, p: PendingStep) -> None:
        with torch.no_grad():
            grads = {n: q.grad for n, q in self._captured.items()}
            if any(g is None for g in grads.values()):  # a captured parameter without gradient: zeros
                grads = {n: g if g is not None else torch.zeros_like(self._captured[n]) for n, g in grads.items()}
            full = self.probe.of_gradient(grads).to(torch.float64)
            raw = p.raw.to(device=full.device, dtype=torch.float64)
            if not bool(torch.isfinite(full).all()):  # the optimizer (or a GradScaler) meets a non-finite gradient
                return
            coef, resid, nf, rr = _residual(full, raw)
            if nf == 0.0 and rr == 0.0:
                return
        # the rounding of the per-example rows (each off by ~ulp of its own norm) bounds both tolerances
        # under torch.autocast the engine saw a coarser compute precision than the weights' in this step's hooks
        rtol, atol = gradient_tolerances(self._captured.values(), self.engine.compute_eps)
        slack = atol * p.scale / max(rr**0.5, 1e-300)
        if resid > rtol * nf + atol * abs(coef) * p.scale:
            self._refuse(p, f"the gradient this update applies is not the one the step recorded: after removing its "
                         f"multiple {coef:.6g} of the recorded gradient, {resid / max(nf, 1e-300):.3g} of its norm is "
                         f"left (more than rounding). Likely causes, in order: (1) {NOT_PER_EXAMPLE}; (2) if the loss holds only "
                         "per-example terms, optimizer.zero_grad() was probably not called before the block (the "
                         "previous step's gradient is still in .grad); (3) .grad was edited after the block",
                         "keep only per-example losses in the recorded loss (weight decay in the optimizer), call "
                         "optimizer.zero_grad() after every optimizer.step(), and change gradients only inside the "
                         "recorded block")
        if abs(coef - p.clip) > abs(p.clip) * (rtol + slack):
            scaler = _loss_scale(coef / p.clip, rtol + slack, self.engine.compute_eps, self._captured.values())
            if scaler is not None:
                self._refuse(p, f"the gradient is 1/{scaler:g} of the one the step recorded, exactly a power of two: a "
                             "torch.amp.GradScaler unscaled .grad after the block (scaler.step or scaler.unscale_), while "
                             f"the recorded rows are the gradients of the scaled loss ({scaler:g} times each example's). "
                             "Recording a GradScaler's scaled loss is not supported",
                             "train under torch.autocast(device, dtype=torch.bfloat16) without a GradScaler (bfloat16 "
                             "has float32's range and needs no loss scaling; autocast runs are recorded, docs/capture.md), "
                             "or in float32")
            if coef < p.clip:
                what = (f"the gradient was scaled by {coef / p.clip:.6g} after the step recorded clip_coef={p.clip:.6g} "
                        "(gradient clipping, or another scaling of .grad, that the recorder was not told)")
                fix = ("clip inside the block and set h.clip_coef (`with rec.step(ids) as h: loss.backward(); "
                       "norm = clip_grad_norm_(...); h.clip_coef = min(1, max_norm / (norm + 1e-6))`), or record "
                       "with rec.microbatch and call rec.commit_step(clip_coef='auto') after clipping")
            else:
                what = (f"the gradient is {coef / p.clip:.6g} times the one the step recorded (clip_coef={p.clip:.6g}): "
                        "optimizer.zero_grad() was probably not called (the previous gradient is still in .grad), or "
                        ".grad was scaled after the block")
                fix = "call optimizer.zero_grad() after every optimizer.step(), and change gradients only inside the block"
            self._refuse(p, what, fix)

    def _refuse_resume(self, p: PendingStep, what: str, fix: str) -> None:
        """:meth:`_refuse` at a resumed run's first update: the recorder closes itself first (nothing of it stays
        registered, its lock is released; ``ResumeChecks._abandon_resume``), and the error says so."""
        try:
            self._refuse(p, what, fix)
        except RecorderError as exc:
            if self._on_resume_refused is not None:
                self._on_resume_refused()
                exc.args = (f"{exc} This Recorder was closed (its lock released): fix the optimizer's state, then "
                            "create a new Recorder(..., resume=True).",)
            raise

    def _refuse(self, p: PendingStep | None, what: str, fix: str) -> None:
        if p is not None and not p.applied:
            self.pending = None
            self._drop(p.step)
            lost = f"Step {p.step} was not written (the run keeps the {_steps(p.step)} before it). "
        else:
            lost = ""
        raise RecorderError(f"optimizer.step(): {what}. The update was not applied. {lost}Fix: {fix}.")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _state_count(st: Any) -> int | None:
    """The step count an Adam/AdamW parameter state holds (a tensor or a number), or ``None``."""
    if not st or "step" not in st:
        return None
    try:
        return int(float(st["step"]))
    except (TypeError, ValueError, RuntimeError):
        return None
