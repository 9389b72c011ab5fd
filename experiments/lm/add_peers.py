"""Add the peers' scores (``runs/lm/<run>/peers/*.npz``, from ``peers.py``) to ``results.json`` and rewrite
the report, without rerunning the studies (peers run in their own venv, after the study exported the runs).

    .venv/bin/python experiments/lm/add_peers.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from run import EXPORT_ROOT, peer_scores, ranking_metrics  # noqa: E402


def main() -> None:
    path = HERE / "results.json"
    res = json.loads(path.read_text())
    for name, r in res.get("backdoor", {}).get("runs", {}).items():
        meta = json.loads((EXPORT_ROOT / name / "export" / "meta.json").read_text())
        kind = np.asarray(meta["kind"])
        for pname, (pid, ps) in peer_scores(name).items():
            r["methods"][pname] = ranking_metrics(ps.sum(0), kind[pid])
            print(name, pname, r["methods"][pname])
    path.write_text(json.dumps(res))
    report.write(res, ROOT / "docs" / "results")


if __name__ == "__main__":
    main()
