"""Zarr v3 run store: append-only, crash-safe, readable out of core with dask.

The layout is documented in ``docs/store-format.md``. This package knows no hooks and no math.

Other packages talk to a run only through the names below (never ``datavalue.store._*`` nor a
run's private attributes), so that the format has one place to change:

- opening and reading: :func:`open_run` -> :class:`Run` (``run.read``, ``run.array``,
  ``run.chunk_rows``, ``run.subgroups``, ``run.has_array``), :func:`open_array`;
- recording: :class:`RunWriter` commits :class:`StepBlock` s; :data:`FLAG_NONFINITE`,
  :func:`package_versions` and :func:`fingerprint_params` fill the blocks and the manifest;
- derived arrays (embeddings): :func:`create_array`, :func:`open_array_writable` (an existing one,
  to extend it), :func:`delete_path`; these and :func:`archive_run` refuse a path that a symbolic
  link leads outside the run; :func:`open_run` refuses a run holding a link that leads outside it;
  :func:`refuse_inside_run` refuses a report path inside a run (every API writer of reports);
  :func:`is_local` says whether a location is a writable local run directory (not an archive, not a URL);
- the final-weights pass (``<run>/final``, :data:`FINAL_RUN`): ``Run.is_final_pass``, its manifest's
  ``integration["name"]`` :data:`FINAL_PASS_INTEGRATION`; :func:`stale_final_pass` says why a pass
  no longer describes the run (the run trained further after it was recorded);
- a run's identity read now (root attributes, commit, an array's attributes), for stamping scores:
  :func:`read_run_attrs`;
- one writer per run: :class:`RunWriter` holds ``<run>/writer.lock`` (:data:`LOCK_FILE`) while
  it is open; other writers into a run hold it with :func:`lock_run` (or the :func:`writes_run`
  decorator); a second writer gets :class:`~datavalue.errors.StoreLockedError` naming the holder;
- the direct chunk-file fast path: :func:`fast_rows` gives a :class:`ChunkFileRows` reader for a
  local array with the run's plain layout; :func:`write_chunk` / :func:`write_all` write chunk
  files with the store writer's encoder (:func:`chunk_dir` says whether an array qualifies);
- checked reads of any array (a missing chunk inside what is required, or a damaged one, is a
  ``StoreCorruptError`` naming it): :class:`CheckedArray`, :func:`read_checked`, :func:`checked_rows`
  (the reader behind ``Run.grads`` / ``Run.fisher``);
- schema names: :data:`SCHEMA_VERSION`; :data:`MANIFEST_KEY` (the root attribute holding the
  manifest); :data:`MANIFEST_DIGEST_KEY` (the root attribute holding :func:`manifest_digest` of the
  manifest's capture settings, written at creation and checked by :func:`open_run`); :data:`ROW_ARRAYS`, :data:`STEP_ARRAYS` and :data:`OPTIONAL_STEP_ARRAYS` (array name
  -> dtype or kind); :data:`FLAG_NONFINITE` (bit of a row's ``flags``: its gradient was not finite
  and is stored as zeros).

Example:
    >>> from datavalue.store import fast_rows, open_run
    >>> run = open_run("runs/x.zarr")                            # doctest: +SKIP
    >>> rows = fast_rows(run.array("grads"))[0 : run.row_chunk]  # doctest: +SKIP
"""

from datavalue.store._archive import archive_run as archive_run
from datavalue.store._checked import CheckedArray as CheckedArray
from datavalue.store._checked import checked_rows as checked_rows
from datavalue.store._checked import read_checked as read_checked
from datavalue.store._chunkfiles import ChunkFileRows as ChunkFileRows
from datavalue.store._chunkfiles import chunk_dir as chunk_dir
from datavalue.store._chunkfiles import fast_rows as fast_rows
from datavalue.store._chunkfiles import write_all as write_all
from datavalue.store._paths import check_workers_see_run as check_workers_see_run
from datavalue.store._paths import is_local as is_local
from datavalue.store._paths import refuse_inside_run as refuse_inside_run
from datavalue.store._reader import Run as Run
from datavalue.store._reader import create_array as create_array
from datavalue.store._reader import delete_path as delete_path
from datavalue.store._reader import open_array as open_array
from datavalue.store._reader import open_array_writable as open_array_writable
from datavalue.store._reader import open_run as open_run
from datavalue.store._reader import rebind_array as rebind_array
from datavalue.store._reader import stale_final_pass as stale_final_pass
from datavalue.store._runattrs import read_run_attrs as read_run_attrs
from datavalue.store._runlock import LOCK_FILE as LOCK_FILE
from datavalue.store._runlock import lock_run as lock_run
from datavalue.store._runlock import writes_run as writes_run
from datavalue.store._runpath import RunPathError as RunPathError
from datavalue.store._runpath import run_dir_path as run_dir_path
from datavalue.store._runpath import run_location as run_location
from datavalue.store._schema import FINAL_PASS_INTEGRATION as FINAL_PASS_INTEGRATION
from datavalue.store._schema import FINAL_RUN as FINAL_RUN
from datavalue.store._schema import FLAG_NONFINITE as FLAG_NONFINITE
from datavalue.store._schema import MANIFEST_DIGEST_KEY as MANIFEST_DIGEST_KEY
from datavalue.store._schema import MANIFEST_KEY as MANIFEST_KEY
from datavalue.store._schema import OPTIONAL_STEP_ARRAYS as OPTIONAL_STEP_ARRAYS
from datavalue.store._schema import ROW_ARRAYS as ROW_ARRAYS
from datavalue.store._schema import SCHEMA_VERSION as SCHEMA_VERSION
from datavalue.store._schema import STEP_ARRAYS as STEP_ARRAYS
from datavalue.store._schema import StepBlock as StepBlock
from datavalue.store._schema import fingerprint_params as fingerprint_params
from datavalue.store._schema import manifest_digest as manifest_digest
from datavalue.store._schema import package_versions as package_versions
from datavalue.store._values import RowCheck as RowCheck
from datavalue.store._values import check_step_values as check_step_values
from datavalue.store._values import refuse_nonfinite_scores as refuse_nonfinite_scores
from datavalue.store._writer import RunWriter as RunWriter
from datavalue.store._writer import _what_is as what_is
from datavalue.store._writer import refuse_foreign_below as refuse_foreign_below
from datavalue.store._writer import write_chunk as write_chunk

__all__ = [
    "FINAL_PASS_INTEGRATION",
    "FINAL_RUN",
    "FLAG_NONFINITE",
    "LOCK_FILE",
    "MANIFEST_DIGEST_KEY",
    "MANIFEST_KEY",
    "OPTIONAL_STEP_ARRAYS",
    "ROW_ARRAYS",
    "SCHEMA_VERSION",
    "STEP_ARRAYS",
    "CheckedArray",
    "ChunkFileRows",
    "RowCheck",
    "Run",
    "RunWriter",
    "StepBlock",
    "archive_run",
    "check_step_values",
    "checked_rows",
    "chunk_dir",
    "create_array",
    "delete_path",
    "fast_rows",
    "is_local",
    "fingerprint_params",
    "lock_run",
    "manifest_digest",
    "open_array",
    "open_array_writable",
    "open_run",
    "package_versions",
    "read_checked",
    "read_run_attrs",
    "rebind_array",
    "refuse_foreign_below",
    "refuse_nonfinite_scores",
    "refuse_inside_run",
    "stale_final_pass",
    "what_is",
    "write_all",
    "write_chunk",
    "writes_run",
]
