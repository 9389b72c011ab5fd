"""Array metadata checks: every array's ``zarr.json`` must describe its chunk files the way
datavalue wrote them.

A chunk file holds raw bytes; what they mean is in the array's ``zarr.json``: where the chunk lies
(the chunk key encoding), how its bytes decode (the codec chain, the byte order) and what numbers
they are (the data type). The writer (``datavalue.store._writer``) and :func:`create_array` write
every array with one layout: chunk keys ``default`` with separator ``/`` (``<array>/c/0/0``),
codecs ``bytes`` (little endian) then ``crc32c``, the data type the schema names, fill value 0 (NaN
for the optional per-step arrays). An edited ``zarr.json`` keeps every chunk's checksum valid
while the same bytes read as other numbers: a separator ``.`` makes zarr look for ``c.0.0`` and read
the missing chunk as zeros; ``endian: big`` or ``int32`` for ``float32`` reinterpret the bytes. So
the metadata is checked against that layout when an array is opened (:func:`check_array`, called
by ``open_run`` for the recorded arrays and by ``Run.array`` / ``open_array`` /
``open_array_writable`` for every array, the derived ones included) and a mismatch is a
:class:`~datavalue.errors.StoreCorruptError` naming the array's ``zarr.json``. The check reads
only the metadata zarr already parsed: no file is opened.

To extend: a new derived array with a fixed data type adds its name pattern to
:data:`DERIVED_DTYPES`; a new recorded array adds itself to ``_schema.py``'s tables, which
:func:`expected_dtype` reads.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from datavalue.errors import StoreCorruptError
from datavalue.store._schema import MANIFEST_KEY, OPTIONAL_STEP_ARRAYS, ROW_ARRAYS, STEP_ARRAYS

#: The chunk key encoding of every datavalue array: ``(name, separator)``.
CHUNK_KEY_ENCODING = ("default", "/")
#: The codec chain of every datavalue array (the byte order is little endian for multi-byte types).
CODEC_CHAIN = ("bytes", "crc32c")
#: Recorded arrays with one data type whatever the run (besides :data:`ROW_ARRAYS` and :data:`STEP_ARRAYS`).
_FIXED_DTYPES: dict[str, str] = {**ROW_ARRAYS, **STEP_ARRAYS, "step_ptr": "int64", "fisher_ptr": "int64",
                                 "commit": "int64"}
#: Data types of derived arrays, by name pattern (``None``: any floating type). Embedding values
#: whose attributes record ``storage_dtype`` must have exactly it (:func:`expected_dtype`).
DERIVED_DTYPES: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(r"embeddings/[^/]+/ops/block\d+"), "float64"),
    (re.compile(r"embeddings/.+"), None),
    (re.compile(r"influence/[^/]+/values"), "float32"),
    (re.compile(r"influence/.+"), None),
    (re.compile(r"replay/[^/]+/scores"), "float64"),
    (re.compile(r"precondition/sqrt_d"), "float64"),
    (re.compile(r"checkpoints/\d+/meta"), "int64"),
)
#: The attribute of an embedding build's ``values`` that records its storage dtype.
_EMBEDDINGS_ATTRS = "datavalue_embeddings"
FLOATING = "a floating-point type"


def expected_dtype(name: str, arr: Any, manifest: dict[str, Any] | None) -> str | None:
    """The data type array ``name`` must have (``FLOATING`` for any float; ``None``: not checked,
    e.g. a checkpoint tensor, whose type is the model's)."""
    storage = (manifest or {}).get("storage_dtype")
    if name in ("grads", "fisher"):
        return storage if isinstance(storage, str) else FLOATING
    if name in _FIXED_DTYPES:
        return _FIXED_DTYPES[name]
    kind = OPTIONAL_STEP_ARRAYS.get(name)
    if kind is not None:  # as the writer creates them (RunWriter._optional_step_arrays)
        return "float64" if storage == "float64" or kind in ("scalar", "group") else "float32"
    if name.startswith("embeddings/") and name.endswith("/values"):
        attrs = arr.attrs.get(_EMBEDDINGS_ATTRS)
        recorded = attrs.get("storage_dtype") if isinstance(attrs, dict) else None
        if isinstance(recorded, str):
            return recorded
    for pattern, dtype in DERIVED_DTYPES:
        if pattern.fullmatch(name):
            return dtype or FLOATING
    return None


def _expected_fill(name: str) -> float | None:
    """The fill value the writer gives a recorded array (NaN: the optional per-step arrays, whose
    steps without a value read as NaN; 0: the others); ``None`` for derived arrays (readers require
    each of their chunks, so the fill value is never read)."""
    if name in OPTIONAL_STEP_ARRAYS:
        return float("nan")
    if name in _FIXED_DTYPES or name in ("grads", "fisher"):
        return 0.0
    return None


def _codec_name(codec: Any) -> str:
    """A codec's name as ``zarr.json`` writes it (``"bytes"``, ``"crc32c"``, ``"zstd"``)."""
    try:
        return str(codec.to_dict()["name"])
    except Exception:  # a codec zarr cannot describe: its class name, never a match
        return type(codec).__name__


def array_problems(arr: Any, name: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """What in ``arr``'s metadata differs from how datavalue writes array ``name`` (empty: nothing).
    Each entry says what was expected and what came."""
    meta = arr.metadata
    out: list[str] = []
    if getattr(meta, "zarr_format", None) != 3:
        return [f"zarr_format {getattr(meta, 'zarr_format', None)!r}, expected 3"]
    dtype = np.dtype(arr.dtype)
    enc = meta.chunk_key_encoding
    got_enc = (getattr(enc, "name", type(enc).__name__), getattr(enc, "separator", None))
    if got_enc != CHUNK_KEY_ENCODING:
        out.append(f"chunk_key_encoding {got_enc[0]!r} with separator {got_enc[1]!r}, expected "
                   f"{CHUNK_KEY_ENCODING[0]!r} with separator {CHUNK_KEY_ENCODING[1]!r} (its chunk files are "
                   f"{name}/c/0{'/0' * max(0, len(arr.shape) - 1)}...: with another key, zarr reads each chunk as "
                   "missing, that is as the fill value)")
    codecs = list(meta.codecs)
    if not (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], Crc32cCodec)):
        out.append(f"codecs {[_codec_name(c) for c in codecs]}, expected {list(CODEC_CHAIN)}")
    elif dtype.itemsize > 1:
        endian = getattr(getattr(codecs[0], "endian", None), "value", getattr(codecs[0], "endian", None))
        if endian != "little":
            out.append(f"bytes codec endian {endian!r}, expected 'little' (the chunks hold little-endian numbers: "
                       "read as another byte order they are other numbers)")
    want = expected_dtype(name, arr, manifest)
    if want == FLOATING:
        if dtype.kind != "f":
            out.append(f"data_type {dtype.name!r}, expected {FLOATING}")
    elif want is not None and dtype != np.dtype(want):
        why = (f" (the manifest's storage_dtype is {want!r})" if name in ("grads", "fisher")
               else f" (its build recorded storage_dtype {want!r})" if name.endswith("/values") and name.startswith("embeddings/")
               else "")
        out.append(f"data_type {dtype.name!r}, expected {want!r}{why}")
    fill = _expected_fill(name)
    if fill is not None:
        got = meta.fill_value
        try:
            same = bool(np.isnan(got)) if np.isnan(fill) else (not np.isnan(got) and got == fill)
        except TypeError:
            same = False
        if not same:
            shown = float(got) if isinstance(got, (int, float, np.number)) else got
            out.append(f"fill_value {shown!r}, expected {fill!r}")
    return out


#: a build's attributes that readers take as numbers, flags or tables, with what each must be
_BUILD_INTS = ("n_steps", "n_rows", "format_version", "fisher_window", "run_generation", "checkpoint_step")
_BUILD_BOOLS = ("complete", "velocity", "momentum_mode", "ops_stored")
_BUILD_DICTS = ("choice", "build_config", "optimizer_manifest")
_BUILD_SPANS = ("blocks", "segments")


def build_attr_problems(arr: Any) -> list[str]:
    """What in a build's attributes (``datavalue_embeddings`` on ``embeddings/<c>/values``) is not of the
    kind ``build_embeddings`` writes (empty: nothing). Readers take ``n_rows`` as an int, ``choice`` as a
    table, ...: an edited value was a raw ``ValueError``, ``AttributeError`` or ``TypeError`` in every
    query and in ``datavalue info`` (P9-11)."""
    attrs = arr.attrs.get(_EMBEDDINGS_ATTRS)
    if attrs is None:
        return []
    if not isinstance(attrs, dict):
        return [f"'{_EMBEDDINGS_ATTRS}' is a {type(attrs).__name__}, expected an object"]
    out = []

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key in _BUILD_INTS:
        if key in attrs and not is_int(attrs[key]):
            out.append(f"{key} {attrs[key]!r:.60}, expected an int >= 0")
    for key in _BUILD_BOOLS:
        if key in attrs and not isinstance(attrs[key], bool):
            out.append(f"{key} {attrs[key]!r:.60}, expected true or false")
    for key in _BUILD_DICTS:  # "choice" is always written as one; the others may be null
        if key in attrs and not isinstance(attrs[key], dict) and (key == "choice" or attrs[key] is not None):
            out.append(f"{key} {attrs[key]!r:.60}, expected an object")
    for key in _BUILD_SPANS:
        v = attrs.get(key)
        if key in attrs and not (isinstance(v, list) and all(
                isinstance(b, list) and len(b) == 2 and all(is_int(x) for x in b) and b[0] <= b[1] for b in v)):
            out.append(f"{key} {v!r:.60}, expected a list of [start, stop] int pairs")
    return out


def check_array(arr: Any, name: str, location: Any, root_attrs: Any = None) -> Any:
    """Return ``arr`` when its metadata is datavalue's layout for array ``name`` of the run at
    ``location``; ``root_attrs``: the run's root attributes (for the manifest's ``storage_dtype``).

    Raises:
        StoreCorruptError: naming ``<name>/zarr.json``, what it says and what datavalue wrote.
    """
    if not isinstance(arr, zarr.Array):  # a group: nothing to decode
        return arr
    manifest = root_attrs.get(MANIFEST_KEY) if root_attrs is not None else None
    problems = array_problems(arr, name, manifest if isinstance(manifest, dict) else None)
    if problems:
        recorded = name.split("/")[0] not in ("embeddings", "influence", "replay", "checkpoints", "precondition")
        fix = ("Restore the run (or this file) from a copy; a recorded array cannot be rebuilt, only re-recorded."
               if recorded else
               "Restore the run (or this file) from a copy, or rebuild the array with overwrite=True (embeddings, "
               "influence, replays; checkpoints: record again with checkpoint_every=).")
        raise StoreCorruptError(
            f"{location}: {name}/zarr.json does not describe the array as datavalue wrote it: "
            + "; ".join(problems)
            + ". The file was edited or replaced, and its chunks would read as other numbers (or as zeros) with "
            f"no error. {fix}"
        )
    if name.startswith("embeddings/") and name.endswith("/values"):
        problems = build_attr_problems(arr)
        if problems:
            curvature = name.split("/")[1]
            raise StoreCorruptError(
                f"{location}: the build attributes ('{_EMBEDDINGS_ATTRS}' in {name}/zarr.json) are not as "
                f"build_embeddings writes them: {'; '.join(problems)}. The file was edited or damaged, so what the build "
                f"says it is cannot be trusted. Rebuild it: datavalue.build_embeddings({str(location)!r}, "
                f"curvature={curvature!r}, overwrite=True) (CLI: datavalue build RUN --overwrite).")
    return arr
