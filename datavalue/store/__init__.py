"""Zarr v3 run store: append-only, crash-safe, readable out of core with dask.

The layout is documented in ``docs/store-format.md``. This package knows no hooks and no math.
"""

from datavalue.store._reader import Run as Run
from datavalue.store._reader import archive_run as archive_run
from datavalue.store._reader import create_array as create_array
from datavalue.store._reader import delete_path as delete_path
from datavalue.store._reader import open_array as open_array
from datavalue.store._reader import open_run as open_run
from datavalue.store._schema import SCHEMA_VERSION as SCHEMA_VERSION
from datavalue.store._schema import StepBlock as StepBlock
from datavalue.store._schema import fingerprint_params as fingerprint_params
from datavalue.store._writer import RunWriter as RunWriter

__all__ = [
    "SCHEMA_VERSION",
    "Run",
    "RunWriter",
    "StepBlock",
    "archive_run",
    "create_array",
    "delete_path",
    "fingerprint_params",
    "open_array",
    "open_run",
]
