"""What a query's loss function must be, and the error that says so.

A query ``loss_fn(model) -> (m,)`` is differentiated once, per test point, through the capture
hooks: they see one forward pass of the model whose batch holds all ``m`` test points, and the
losses' backward. A loss function written otherwise (a forward per test point, an empty test batch,
losses computed without autograd) would fail inside the hooks or autograd with errors about
recording (``sample_ids``) or tensor shapes; :func:`query_gradients` watches the model's forward
calls and the losses returned, and raises :class:`~datavalue.errors.QueryError` stating the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from datavalue.errors import CaptureError, QueryError, RecorderError

RULE = ("A query loss_fn(model) must run one forward pass of the model over all m test points, with autograd on, "
        "and return their m losses as a 1-d tensor that requires grad (reduction='none'), m >= 1: e.g. "
        "lambda m: F.cross_entropy(m(x_test), y_test, reduction='none').")


def _batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The leading size of a forward call's first tensor argument (``None``: no tensor, or a scalar)."""
    t = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
    return None if t is None or t.dim() == 0 else int(t.shape[0])


def _forward_problem(sizes: list[int | None]) -> str | None:
    """What the model's forward calls show is wrong with the loss function, or ``None``."""
    if any(s == 0 for s in sizes):
        return "It ran the model on an empty batch (no test points)."
    if not sizes:
        return ("It never ran the model it was given (a loss computed from another model, or from cached outputs, "
                "has no gradient to capture).")
    if len(sizes) > 1:
        shown = ", ".join("?" if s is None else str(s) for s in sizes[:8]) + (", ..." if len(sizes) > 8 else "")
        return (f"It ran the model {len(sizes)} times (batches of {shown}); concatenate the test inputs and run one "
                "forward (several forwards per query are not supported).")
    return None


def query_gradients(model: nn.Module, loss_fn: Callable[[nn.Module], Any],
                    gradients: Callable[[Callable[[nn.Module], Any]], np.ndarray]) -> np.ndarray:
    """``gradients(checked_loss_fn)`` with ``loss_fn`` checked against :data:`RULE`.

    The losses are computed with autograd on (a query made inside ``torch.no_grad()`` works); an
    empty or autograd-free result, and a capture failure explained by the model's forward calls
    (counted by a forward pre-hook on ``model``, removed afterwards), raise :class:`QueryError`.
    """
    sizes: list[int | None] = []

    def seen(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sizes.append(_batch(args, kwargs))

    def checked(m: nn.Module) -> Any:
        losses = loss_fn(m)
        if torch.is_tensor(losses) and losses.dim() == 1:
            if losses.shape[0] == 0:
                raise QueryError(f"loss_fn returned no losses (an empty test batch). {RULE}")
            if not losses.requires_grad:
                raise QueryError(
                    "loss_fn returned losses that do not require grad (computed under torch.no_grad(), .detach()ed, "
                    f"or built from numpy values), so there is no gradient to attribute. {RULE}")
        return losses

    handle = model.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        with torch.enable_grad():  # a query made inside the caller's torch.no_grad() still differentiates
            return gradients(checked)
    except (RecorderError, CaptureError, RuntimeError) as exc:
        problem = _forward_problem(sizes)
        if problem is None:
            raise
        raise QueryError(f"loss_fn cannot be differentiated per test point: {problem} {RULE} "
                         f"(Raised: {type(exc).__name__}: {exc})") from exc
    finally:
        handle.remove()
