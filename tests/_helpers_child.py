"""Run a test's child script in a fresh interpreter (exit-hook tests: a script that ends without ``close()``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(tmp_path: Path, source: str, mode: str, **env: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Write ``source`` to ``tmp_path/child.py`` and run it as ``child.py RUN MODE`` (``RUN`` =
    ``tmp_path/<mode>.zarr``) with the repository on ``PYTHONPATH``, offline, plus ``env``; the run's path and the
    finished process (output captured as text, 300 s limit)."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(source))
    run = tmp_path / f"{mode}.zarr"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **env}
    r = subprocess.run([sys.executable, str(script), str(run), mode], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    return run, r
