"""cProfile of build_embeddings (exact mode, one block) and of a query (Attributor.scores).

Run: ``python benchmarks/profile_build.py [--quick] [--top 20]``; prints the top functions by
total (own) time and by cumulative time as markdown tables.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("TQDM_DISABLE", "1")


def table(prof, key, top):
    st = pstats.Stats(prof)
    st.sort_stats(key)
    rows = []
    for func in st.fcn_list[:top]:
        cc, nc, tt, ct, _ = st.stats[func]
        rows.append((f"{Path(func[0]).name}:{func[1]}({func[2]})", nc, tt, ct))
    print(f"\n| function (sorted by {key}) | calls | own s | cumulative s |\n|---|---|---|---|")
    for r in rows:
        print(f"| `{r[0]}` | {r[1]} | {r[2]:.3f} | {r[3]:.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    import build_vs_dattri as bv  # noqa: E402

    import datavalue

    d, c, B, T = (128, 8, 64, 60) if a.quick else (256, 8, 128, 200)
    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "p.zarr")
        ns = argparse.Namespace(path=path, T=T, B=B, d=d, c=c, threads=os.cpu_count())
        bv.worker_record(ns)
        for dtype in ("float64", "float32"):
            prof = cProfile.Profile()
            prof.enable()
            datavalue.build_embeddings(path, curvature="empirical_fisher", dtype=dtype, overwrite=True, progress=False)
            prof.disable()
            print(f"\n### build_embeddings exact, P={d * c}, B={B}, T={T}, dtype={dtype}")
            table(prof, "tottime", a.top)
        print("\n### build_embeddings float64, cumulative")
        table(prof, "cumtime", a.top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
