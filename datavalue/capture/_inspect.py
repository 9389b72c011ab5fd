"""``datavalue.inspect(model)``: what would be captured, by which rule, at what size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from datavalue.capture._engine import Engine


class CapturePlan(list):
    """A list of dicts (one per block) that prints as a table."""

    def __str__(self) -> str:
        head = f"{'block':32s} {'rule':22s} {'kind':6s} {'shape':>14s} {'k':>7s}  modules"
        rows = [head, "-" * len(head)]
        for b in self:
            shape = "x".join(str(s) for s in b["shape"])
            rows.append(f"{b['name']:32s} {b['rule']:22s} {b['kind']:6s} {shape:>14s} {b['k']:>7d}  {','.join(b['modules'])}")
        rows.append(f"total k = {sum(b['k'] for b in self)}")
        rows += [f"note: {b['name']}: {b['note']}" for b in self if b.get("note")]
        return "\n".join(rows)

    __repr__ = __str__


def inspect(model: nn.Module, *, proj_dim: int | Mapping[str, int] | None = 1024, layers: Sequence[str] | None = None) -> CapturePlan:
    """List the blocks a :class:`Recorder` would capture for ``model``: rule, layout and sketch size.

    Example:
        >>> import torch
        >>> print(inspect(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)), proj_dim=None))  # doctest: +NORMALIZE_WHITESPACE
        block                            rule                   kind            shape       k  modules
        ------------------------------------------------------------------------------------------------
        0.weight                         linear                 kron              8x5      40  0
        2.weight                         linear                 kron              2x9      18  2
        total k = 58
    """
    from datavalue.capture._run_setup import unwrap_model

    model = unwrap_model(model)
    eng = Engine(model, proj_dim=proj_dim, seed=0, layers=layers)  # the names a Recorder records
    plan = CapturePlan(b.to_json() for b in eng.blocks)
    for b, note in zip(plan, block_notes(eng, model), strict=True):
        if note:
            b["note"] = note
    return plan


def block_notes(engine: Engine, model: nn.Module) -> list[str | None]:
    """Per block of ``engine``, why recording it will fail before it does (a batch norm layer in
    training mode: :data:`~datavalue.capture._rules.BATCH_COUPLED`), or None."""
    from datavalue.capture._rules import BATCH_COUPLED, batch_coupled

    modules = dict(model.named_modules(remove_duplicate=False))
    return [BATCH_COUPLED if any(m in modules and batch_coupled(modules[m]) for m in b.modules) else None
            for b in engine.blocks]
