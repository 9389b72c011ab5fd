"""Install a freshly written file over an older one atomically, without ext4's flush on replace.

The run writer rewrites each array's partial tail chunk (and the ``commit`` chunk) at every
commit: a temporary is written, then put in the chunk's place, so that the chunk's name always
holds one whole version (a ``kill -9`` at any moment leaves the old one or the new one). With
``os.replace`` that costs far more than the write on ext4: a rename over an existing file starts
writeback of the new file's data (the ``auto_da_alloc`` heuristic), 0.2-3 ms per file even for
8 KiB, and a commit replaces about 14 files (issue 20: most of the writer's time on the MLP).
Linux's ``renameat2(RENAME_EXCHANGE)`` swaps the two names atomically instead (measured 0.01-0.4
ms): the chunk's name then holds the new version, the temporary's name the old one, which is
unlinked. Readers see exactly what a replace shows them: either whole version under the chunk's
name, and a reader that opened the old file keeps reading it unchanged (it is unlinked, never
rewritten).

Where the call is missing (not Linux, an old C library) or the file system refuses it (``EINVAL``,
``ENOSYS``, ``EOPNOTSUPP``), :func:`install` falls back to ``os.replace`` for good; a target that
does not exist yet is a plain rename (no flush either way).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from typing import Any

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: errnos by which a file system says it has no exchange: fall back to os.replace from then on
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _load() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load()


def exchange_available() -> bool:
    """Whether :func:`install` swaps names (``renameat2(RENAME_EXCHANGE)``) rather than replacing."""
    return _renameat2 is not None


def install(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Put the file ``tmp`` in the place of ``path`` atomically (``path`` need not exist); ``tmp`` is gone
    afterwards. Raises ``OSError`` as ``os.replace`` would; ``tmp`` is then left for the caller to remove."""
    global _renameat2
    fn = _renameat2
    if fn is not None:
        a, b = os.fsencode(tmp), os.fsencode(path)
        if fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE) == 0:
            with contextlib.suppress(FileNotFoundError):  # tmp now names the old version
                os.unlink(a)
            return
        err = ctypes.get_errno()
        if err == errno.ENOENT and os.path.lexists(a):  # no file at path yet: a plain rename (no flush)
            os.rename(a, b)
            return
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), os.fsdecode(tmp), None, os.fsdecode(path))
        _renameat2 = None  # this file system (or kernel) has no exchange: os.replace from now on
    os.replace(tmp, path)
