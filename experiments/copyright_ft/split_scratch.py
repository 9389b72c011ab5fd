"""FGSV vs Owen on the splitting attack of the earlier, from-scratch study (docs/results/copyright.md).

Re-creates that study's game with its own code (``experiments/copyright/run.py``: the character
MLP trained from scratch, SGD lr 1.0, 8 epochs, data order "slots", the same 20 outputs sampled from
the full model with the same seeds), retrains the 5-owner game and the 7-player game where the most
valuable owner is cut round-robin into 3 shells (128 models, cached under
``runs/copyright_ft/scratch_cache``), and compares the split owner's mean SRS share under plain
Shapley, Owen over an ``OwnerRegistry`` that merges the shells, and the faithful group Shapley
value (``shapley.fgsv_from_utilities``) grouped by owner and per shell. Writes
``results/scratch_split.json``.

Usage: PYTHONPATH=. nice -n 10 .venv/bin/python experiments/copyright_ft/split_scratch.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from datavalue import shapley

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _load_scratch():
    spec = importlib.util.spec_from_file_location("copyright_scratch", ROOT / "experiments" / "copyright" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["copyright_scratch"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    S = _load_scratch()
    torch.set_num_threads(1)
    T0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)

    cfg = dict(S.FULL, order="slots")
    lines, owner_of, vocab = S.load_corpus(cfg)
    codec = S.Codec(vocab, cfg["ctx"])
    data = [codec.windows(codec.encode(s), 0) for s in lines]
    cfg["norm"] = float(cfg["batch"] * np.mean([len(y) for _, y in data]))
    owners = list(cfg["owners"])
    n = len(owners)
    owner_arr = np.array([o if o is not None else "" for o in owner_of])
    base_ids = np.flatnonzero(owner_arr == "")
    parts = [np.flatnonzero(owner_arr == o) for o in owners]
    orders = S.epoch_orders(len(data), cfg["epochs"])
    cache = S.ModelCache(ROOT / "runs" / "copyright_ft" / "scratch_cache", cfg, codec, data, orders)
    full_model, _ = cache.get(np.concatenate([base_ids, *parts]))
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    outputs = []
    for o, p in zip(owners, parts, strict=True):  # the study's own sampling loop, same seeds
        for j in rng.choice(p, cfg["outputs_per_owner"], replace=False):
            s = lines[j]
            k = min(len(s) - 1, max(6, s.find(" ", 8) if s.find(" ", 8) > 0 else 8))
            prompt = s[:k]
            outputs.append({"prompt_owner": o, "prompt": prompt,
                            "text": S.generate(full_model, codec, prompt, cfg["gen_len"], cfg["temperature"], gen)})
    ref = json.loads((ROOT / "experiments" / "copyright" / "results" / "copyright.json").read_text())["outputs"]
    same_outputs = [o["text"] for o in outputs] == [o["text"] for o in ref]
    log(f"outputs identical to the study's: {same_outputs}")
    X, Y = S.output_batch(codec, outputs)
    U, secs5 = S.coalition_utilities(cache, parts, base_ids, X, Y, log)
    phi = shapley.exact_from_utilities(U)
    target = int(np.argmax(S.srs(phi).mean(0)))
    k = cfg["shells"]
    shells = [parts[target][j::k] for j in range(k)]
    parts7 = [p for i, p in enumerate(parts) if i != target] + shells
    names7 = [o for i, o in enumerate(owners) if i != target] + [f"{owners[target]}-shell{j + 1}" for j in range(k)]
    U7, secs7 = S.coalition_utilities(cache, parts7, base_ids, X, Y, log)
    phi7 = shapley.exact_from_utilities(U7)
    reg = shapley.OwnerRegistry({w: w for w in names7})
    reg.add_owner(owners[target])
    for s_ in names7[n - 1:]:
        reg.merge(s_, into=owners[target])
    reg_owners, unions = reg.partition(names7)
    back = [list(reg_owners).index(o) for o in owners]
    owen = shapley.owen_from_utilities(U7, unions)
    owen_tot = np.stack([owen[:, list(u)].sum(1) for u in unions], 1)[:, back]
    np.testing.assert_allclose(owen_tot, phi, atol=1e-4)
    fg = shapley.fgsv_from_utilities(U7, unions)[:, back]
    fg_sh = shapley.fgsv_from_utilities(U7, [[i] for i in range(len(names7))])
    np.testing.assert_allclose(fg_sh[:, n - 1:].sum(1), fg[:, target], atol=1e-9)
    srs = S.srs
    out = {
        "command": "experiments/copyright_ft/split_scratch.py", "outputs_identical_to_study": same_outputs,
        "owner": owners[target], "shells": k, "train_s_5": secs5, "train_s_7": secs7,
        "models_trained_now": cache.trained, "total_s": time.perf_counter() - T0,
        "share": {
            "unsplit Shapley": float(srs(phi)[:, target].mean()),
            "split, plain Shapley (shells summed)": float(srs(phi7)[:, n - 1:].sum(1).mean()),
            "split, Owen over the registry (shells merged)": float(srs(owen_tot)[:, target].mean()),
            "split, FGSV (owners' works summed)": float(srs(fg)[:, target].mean()),
            "split, FGSV per shell (no registry), shells summed": float(srs(fg_sh)[:, n - 1:].sum(1).mean()),
        },
        "value_target": {"unsplit": float(phi[:, target].mean()), "split plain": float(phi7[:, n - 1:].sum(1).mean()),
                         "owen": float(owen_tot[:, target].mean()), "fgsv": float(fg[:, target].mean())},
    }
    (HERE / "results" / "scratch_split.json").write_text(json.dumps(out, indent=1))
    log(json.dumps(out["share"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
