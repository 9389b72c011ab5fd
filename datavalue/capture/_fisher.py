"""Helpers of the recorder's true-Fisher pseudo-gradients: the logits of a model's output and the
inverse-CDF label draw (``Recorder._on_model_output``)."""

from __future__ import annotations

from typing import Any

import torch


def _logits_of(output: Any) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


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
