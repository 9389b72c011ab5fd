"""Capture: hooks that record per-sample (projected) gradients from the user's own backward.

Public pieces: :class:`Recorder` (training loop; ``checkpoint_every=`` keeps weight and optimizer
checkpoints, :func:`read_checkpoint`), :func:`replay_scores` (exact trajectory influence by
replaying the run from its checkpoints; ``datavalue.replay_influence`` stores and reads them), :func:`per_sample_gradients` (query/test
gradients in a run's layout), :func:`inspect` (what is captured by which rule), :func:`unwrap_model` (the module inside DDP / DataParallel /
``torch.compile`` wrappers, as recorders and queries see it), and the rule
registry :data:`LAYER_RULES` with :class:`LayerRule` to extend it. :class:`StepSink` is the one
step pipeline (ids, weights, rows -> ``StepBlock`` -> writer) that every recorder and integration
submits through.
"""

from datavalue.capture._checkpoint import Checkpoint as Checkpoint
from datavalue.capture._checkpoint import checkpoint_steps as checkpoint_steps
from datavalue.capture._checkpoint import read_checkpoint as read_checkpoint
from datavalue.capture._config import CaptureConfig as CaptureConfig
from datavalue.capture._final import FinalPass as FinalPass
from datavalue.capture._final import final_path as final_path
from datavalue.capture._gradients import engine_for_run as engine_for_run
from datavalue.capture._gradients import exact_layout as exact_layout
from datavalue.capture._gradients import per_sample_gradients as per_sample_gradients
from datavalue.capture._gradients import weights_mismatch as weights_mismatch
from datavalue.capture._inspect import inspect as inspect
from datavalue.capture._pipeline import DistInfo as DistInfo
from datavalue.capture._pipeline import StepSink as StepSink
from datavalue.capture._pipeline import parse_sample_ids as parse_sample_ids
from datavalue.capture._pipeline import step_weights as step_weights
from datavalue.capture._projection import projection_matrix as projection_matrix
from datavalue.capture._projection import split_budget as split_budget
from datavalue.capture._replay import ReplayError as ReplayError
from datavalue.capture._replay import ReplayMismatchError as ReplayMismatchError
from datavalue.capture._replay import replay_scores as replay_scores
from datavalue.capture._rules import LAYER_RULES as LAYER_RULES
from datavalue.capture._rules import LayerRule as LayerRule
from datavalue.capture._run_setup import unwrap_model as unwrap_model
from datavalue.capture.recorder import Recorder as Recorder

__all__ = [
    "LAYER_RULES",
    "CaptureConfig",
    "Checkpoint",
    "DistInfo",
    "FinalPass",
    "LayerRule",
    "Recorder",
    "ReplayError",
    "ReplayMismatchError",
    "StepSink",
    "checkpoint_steps",
    "engine_for_run",
    "exact_layout",
    "final_path",
    "inspect",
    "parse_sample_ids",
    "per_sample_gradients",
    "projection_matrix",
    "read_checkpoint",
    "replay_scores",
    "split_budget",
    "step_weights",
    "unwrap_model",
    "weights_mismatch",
]
