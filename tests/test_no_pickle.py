"""No pickle in stores, ledgers or reports; torch.load only with weights_only=True."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_pickle_in_package_code():
    bad = []
    for path in (ROOT / "datavalue").rglob("*.py"):
        text = path.read_text()
        for pat in (r"^\s*import (c?pickle|dill|joblib)\b", r"^\s*from (c?pickle|dill|joblib) import", r"np\.load\(.*allow_pickle=True"):
            if re.search(pat, text, re.M):
                bad.append(f"{path.relative_to(ROOT)}: {pat}")
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not bad, bad
