"""Pure math core of data value embeddings: one block's backward recursion, no I/O.

The core is split by concept; this module keeps the names importable from where they always were:

- :mod:`._sgd`: the SGD recursion (momentum, weight decay, clipping) and its row operators;
- :mod:`._adam`: the Adam/AdamW recursion;
- :mod:`._state`: what both share (the curvature argument, the state's shape);
- :mod:`._gemm`: the in-place GEMMs and the threads a build lends them (:func:`gemm_threads`).

The derivation is in ``docs/math.md``; extend by adding a curvature kind (see :mod:`._sgd`).
"""

from __future__ import annotations

from datavalue.embeddings._adam import AdamBlockState as AdamBlockState
from datavalue.embeddings._adam import AdamStepCoef as AdamStepCoef
from datavalue.embeddings._adam import adam_coefficients as adam_coefficients
from datavalue.embeddings._adam import adam_operator as adam_operator
from datavalue.embeddings._adam import adam_state_from_operator as adam_state_from_operator
from datavalue.embeddings._adam import adam_step_back as adam_step_back
from datavalue.embeddings._adam import init_adam_state as init_adam_state
from datavalue.embeddings._gemm import SPLIT_MIN as SPLIT_MIN
from datavalue.embeddings._gemm import gemm_thread_count as gemm_thread_count
from datavalue.embeddings._gemm import gemm_threads as gemm_threads
from datavalue.embeddings._gemm import run_threads as run_threads
from datavalue.embeddings._sgd import BlockState as BlockState
from datavalue.embeddings._sgd import StepCoef as StepCoef
from datavalue.embeddings._sgd import chain as chain
from datavalue.embeddings._sgd import init_state as init_state
from datavalue.embeddings._sgd import operator as operator
from datavalue.embeddings._sgd import state_from_operator as state_from_operator
from datavalue.embeddings._sgd import step_back as step_back
from datavalue.embeddings._sgd import step_coefficients as step_coefficients
from datavalue.embeddings._state import Curv as Curv
from datavalue.embeddings._state import CurvMatrix as CurvMatrix

__all__ = [
    "BlockState",
    "StepCoef",
    "init_state",
    "step_back",
    "step_coefficients",
    "operator",
    "state_from_operator",
    "chain",
    "AdamBlockState",
    "AdamStepCoef",
    "adam_coefficients",
    "adam_step_back",
    "init_adam_state",
    "adam_operator",
    "adam_state_from_operator",
    "CurvMatrix",
]
