"""Helpers of the recorder's true-Fisher pseudo-gradients: the logits of a model's output and the
inverse-CDF label draw (``Recorder._on_model_output``)."""

from __future__ import annotations

from typing import Any

import torch


def _logits_of(output: Any) -> torch.Tensor | None:
    """The logits ``(b, ..., C)`` the true Fisher draws labels from (the model's output, its
    ``.logits``, or its first element), None when the output holds none; refuses an output that
    cannot be class logits (:func:`_check_classes`)."""
    logits = None
    if torch.is_tensor(output):
        logits = output
    elif torch.is_tensor(getattr(output, "logits", None)):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        logits = output[0]
    if logits is not None:
        _check_classes(logits)
    return logits


def _check_classes(logits: torch.Tensor) -> None:
    """Refuse ``curvature="fisher"`` on an output with fewer than two classes in its last dimension.

    The pseudo-gradient is ``sqrt(w) (p - onehot(y_hat))`` pulled back through the network, with
    ``p = softmax(logits)``: over one class ``p = 1 = onehot`` and every row is exactly zero, so the
    recorded Fisher would be zero and a ``curvature="fisher"`` build would use no curvature at all
    (a regression model trained with an MSE loss has such an output). A ``(b,)`` output has no class
    dimension at all (its last dimension is the batch).
    """
    from datavalue.errors import RecorderError

    if not logits.requires_grad or (logits.dim() >= 2 and logits.shape[-1] >= 2):
        return  # (an output without grad records no Fisher row: the recorder skips it)
    got = f"shape {tuple(logits.shape)}" + (" (one output per example: no class dimension)" if logits.dim() < 2 else
                                              " (one class)")
    raise RecorderError(
        f"curvature='fisher' draws labels from the softmax of the model's output, which must be class logits "
        f"(b, ..., C) with C >= 2; this model's output has {got}, so every Fisher pseudo-gradient would be exactly "
        "zero (a regression or one-logit model). Record without it (curvature=None: builds use the empirical Fisher "
        "of the recorded gradients) or with curvature='hessian' (small models); for a FinalPass pass "
        "curvature=None. A binary classifier with one logit: return "
        "torch.cat([-z / 2, z / 2], -1) (two-class logits with the same softmax) from the model's forward."
    )


def _inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Labels drawn by inverse CDF: ``(n, C)`` cumulative (unnormalised) probabilities and ``(n, 1)``
    uniforms in ``[0, 1)`` -> ``(n,)`` classes, class ``c`` with probability ``p_c / sum(p)``.

    The label is the first class whose cumulative sum exceeds ``u * total`` (``right=True``), so a class
    of probability zero is never drawn, ``u = 0`` included; a product that rounds up to the total
    falls back to the last class of positive probability.
    """
    total = cdf[:, -1:]
    y = torch.searchsorted(cdf, u * total, right=True).reshape(-1)
    over = y >= cdf.shape[1]
    if bool(over.any()):  # the first class where the cumulative sum reaches the total: the last positive one
        y[over] = torch.argmax((cdf[over] >= total[over]).to(torch.uint8), -1)
    return y
