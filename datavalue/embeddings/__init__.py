"""Data value embeddings: the trajectory-specific influence of every recorded occurrence.

``build_embeddings(run_path)`` streams a run recorded by ``datavalue.Recorder`` backward through
the recursion of Wang et al. (ICLR 2025), generalised to true-Fisher curvature, coupled weight
decay, SGD momentum (exact ``2k`` state), clipping and segment-parallel builds; see
``docs/math.md``. The pure per-block core (:func:`init_state`, :func:`step_back`) works on plain
numpy arrays.

Sign convention everywhere: influence = ``loss(without occurrence) - loss(with)`` ~=
``embedding @ test_grad``; positive = the occurrence helped.

This package imports neither torch nor ``datavalue.capture``.
"""

from datavalue.embeddings._build import CURVATURES as CURVATURES
from datavalue.embeddings._build import BuildInfo as BuildInfo
from datavalue.embeddings._build import build_embeddings as build_embeddings
from datavalue.embeddings._check import check_build as check_build
from datavalue.embeddings._check import refuse_foreign as refuse_foreign
from datavalue.embeddings._check import require_build_chunks as require_build_chunks
from datavalue.embeddings._config import BuildConfig as BuildConfig
from datavalue.embeddings._core import BlockState as BlockState
from datavalue.embeddings._core import StepCoef as StepCoef
from datavalue.embeddings._core import chain as chain
from datavalue.embeddings._core import init_state as init_state
from datavalue.embeddings._core import operator as operator
from datavalue.embeddings._core import step_back as step_back
from datavalue.embeddings._core import step_coefficients as step_coefficients
from datavalue.embeddings._extend import embeddings_at as embeddings_at
from datavalue.embeddings._extend import extend_embeddings as extend_embeddings
from datavalue.embeddings._influence import InfluenceInfo as InfluenceInfo
from datavalue.embeddings._influence import build_influence as build_influence
from datavalue.embeddings._influence import unfinished_final_pass as unfinished_final_pass
from datavalue.embeddings._metadata import build_metadata as build_metadata
from datavalue.embeddings._metadata import stored_config as stored_config

__all__ = [
    "CURVATURES",
    "BlockState",
    "BuildConfig",
    "BuildInfo",
    "InfluenceInfo",
    "StepCoef",
    "build_embeddings",
    "build_influence",
    "build_metadata",
    "chain",
    "check_build",
    "embeddings_at",
    "extend_embeddings",
    "init_state",
    "operator",
    "refuse_foreign",
    "require_build_chunks",
    "step_back",
    "step_coefficients",
    "stored_config",
    "unfinished_final_pass",
]
