"""``fisher_window`` on an exact Fisher (session 13, issue 19): does pooling over neighbouring steps help or hurt
when the recorded Fisher has no label noise? The digits MLP of ``tests/embeddings/test_fidelity.py`` (its four SGD
settings: plain, momentum, weight decay, clipping; and AdamW lr 1e-2, weight decay 0.01), recorded with
``Recorder(curvature="fisher")`` (10 classes: the exact class expectation), 24 steps, exact trajectory LOO of 200
occurrences x 40 test points (``datavalue.testing``); ``build_embeddings(path, "fisher", fisher_window=W)`` with
the default blocks (one operator over all columns here), Spearman per test point, mean.

    PYTHONPATH=. nice -n 10 python experiments/lm/window_exact_fisher.py   # about 4 min on 2 busy cores

This is the evidence behind ``fisher_window="auto"`` keeping 0 for exact Fisher rows (docs/results/lm.md).
"""

import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from datavalue.embeddings import build_embeddings  # noqa: E402
from tests.embeddings._digits import make_case  # noqa: E402
from tests.embeddings.test_fidelity import SETTINGS  # noqa: E402

torch.set_num_threads(1)
settings = dict(SETTINGS, adamw=dict(lr=1e-2, adam="adamw", weight_decay=0.01))
out = {}
with tempfile.TemporaryDirectory() as work:
    for name, kw in settings.items():
        case = make_case(Path(work) / f"{name}.zarr", **kw)
        row = {}
        for W in (0, 2, 4):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = build_embeddings(case.path, "fisher", progress=False, overwrite=True, fisher_window=W)
            row[f"W={W}"] = round(float(case.spearman("fisher")), 4)
        row["operators"] = len(info.blocks)
        out[name] = row
        print(name, row, flush=True)
print(json.dumps(out, indent=1))
