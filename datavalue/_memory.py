"""Memory a piece of work may take: read once here, used by builds, queries and recordings.

Every heavy entry point estimates its peak before it starts and refuses, with the estimate and the
cheaper options, when it would not fit: ``build_embeddings`` (the recursion state),
``Attributor`` queries (the result plus the streamed chunks) and ``Recorder`` steps (the per-step
host buffers). The limit is ``max_memory=`` where the caller gives one, else 90% of what the kernel
reports as available (``MemAvailable``). Setting ``DATAVALUE_MEMORY_CHECK=0`` turns the automatic
check off (an explicit ``max_memory=`` still applies: the caller asked for it).

Example:
    >>> from datavalue._memory import check_memory, parse_max_memory
    >>> parse_max_memory("2 GiB")
    2147483648
    >>> check_memory(1000, what="this toy", fixes="ask for less", max_memory=4096)   # fits: nothing happens
    >>> check_memory(8192, what="this toy", fixes="ask for less", max_memory=4096)
    Traceback (most recent call last):
    ...
    MemoryError: this toy would hold about 8.0 KiB, above max_memory=4.0 KiB. Ask for less, or raise max_memory=.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MEMORY_CHECK_ENV", "available_memory", "check_memory", "fmt_bytes", "parse_max_memory"]

#: Set to ``"0"`` to run even when the estimate exceeds the available memory.
MEMORY_CHECK_ENV = "DATAVALUE_MEMORY_CHECK"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def available_memory() -> int | None:
    """Bytes the kernel reports as available (``MemAvailable``), or None where it cannot tell."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def fmt_bytes(n: float) -> str:
    """``n`` bytes for people: ``"200 B"``, ``"11.2 MiB"``, ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_max_memory(value: Any, error: type[Exception] = ValueError) -> int | None:
    """``max_memory=``: None, a positive number of bytes, or a string such as ``"8 GiB"`` / ``"512MB"``.

    Anything below 1 byte (``0``, ``"0"``, ``"0.4 B"``, ``0.5``) is refused alike: it would
    otherwise become a limit of 0 bytes that no work fits."""
    if value is None:
        return None
    n: float | None = None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", value, re.I)
        if m:
            n = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    if n is not None and math.isfinite(n) and n >= 1:
        return value if isinstance(value, int) else int(n)  # an int stays exact
    raise error(f"max_memory must be None, a positive number of bytes or a string such as '8 GiB', got {value!r} "
                f"({type(value).__name__}).")


def check_memory(
    need: int,
    *,
    what: str,
    fixes: str,
    error: type[Exception] = MemoryError,
    max_memory: int | None = None,
    parts: Mapping[str, int] | None = None,
) -> None:
    """Raise ``error`` when ``need`` bytes exceed ``max_memory`` (when given) or 90% of the available memory.

    ``what`` names the work ("this query"); ``parts`` its largest pieces (shown with their sizes);
    ``fixes`` the cheaper options, as a sentence fragment.
    """
    detail = f" ({', '.join(f'{k} {fmt_bytes(v)}' for k, v in parts.items())})" if parts else ""
    fix = fixes[:1].upper() + fixes[1:]
    if max_memory is not None:
        if need > max_memory:
            raise error(f"{what} would hold about {fmt_bytes(need)}{detail}, above max_memory={fmt_bytes(max_memory)}. "
                        f"{fix}, or raise max_memory=.")
        return
    if os.environ.get(MEMORY_CHECK_ENV, "1") == "0":
        return
    have = available_memory()
    if have is None or need <= 0.9 * have:
        return
    raise error(f"{what} would hold about {fmt_bytes(need)}{detail}, but the machine has {fmt_bytes(have)} available. "
                f"{fix}, or set {MEMORY_CHECK_ENV}=0 to try anyway.")
