"""Copyright royalties end to end: the retraining game (gold standard) versus data value embeddings.

A character-level autoregressive model (an MLP on the previous ``CTX`` characters: exact
log-likelihood, ~25k parameters) is trained on chatterbot-corpus lines. A few categories are
*owners*, the rest is *base* data owned by nobody. Outputs are sampled from the full model, each
prompted by the opening characters of a line of one owner's category.

* Gold standard: one model per coalition S of owners (2**n models, trained on base + owners in S
  with the same initialisation and the same data-order rule), ``v_x(S) = log p_S(x | prompt)``,
  exact Shapley values (``shapley.exact_from_utilities``), SRS shares. Models are cached on disk.
* Fast path: one recorded training run of the full model, data value embeddings
  (``build_embeddings``), ``Attributor.scores(-log p(x|c), by="owner")`` = first-order
  ``v(N) - v(N minus owner)`` = the owner's value in the additive game; SRS shares.
* Splitting attack: the gold standard's most valuable owner is cut into shell owners; the new game
  is retrained (the coalitions it shares with the original game are reused from the cache), and
  plain-Shapley SRS is compared with Owen values over an ``OwnerRegistry`` that merges the shells.
* Both paths record every generation into a ``RoyaltyLedger``; the fast path's report is made by
  the CLI ``datavalue royalties`` as a user would.

Data-order rule: every epoch draws one global random permutation of *all* example ids (seeded by
the epoch); a coalition trains on its own examples in that order, in consecutive batches of
``BATCH`` lines, for the same number of epochs (so larger coalitions take more steps). The
initialisation is the same seed for every coalition. Plain SGD, momentum 0, constant lr.

Usage:
    .venv/bin/python experiments/copyright/run.py            # full (writes docs/results/copyright.md + PNGs)
    .venv/bin/python experiments/copyright/run.py --quick    # smoke test (< 4 min), writes under experiments/copyright/out-quick

Sign: influence = loss(without) - loss(with) with loss = -log p(x|c): the estimated drop of
log p(x|c) when the owner is removed, the same sign as the Shapley utility differences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import kendalltau
from torch import nn

import datavalue
from datavalue import shapley
from datavalue.embeddings import build_embeddings
from datavalue.query import Attributor

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

FULL = dict(
    owners=("ai", "emotion", "psychology", "literature", "humor"),
    base=("conversations", "greetings", "money", "movies", "politics", "sports", "science", "gossip",
          "computers", "botprofile", "food", "history"),
    epochs=8, lr=1.0, batch=16, ctx=8, emb=12, hidden=128, proj_dim=2048, outputs_per_owner=4,
    shells=3, max_len=100, gen_len=48, temperature=0.8,
)
QUICK = dict(FULL, owners=("ai", "emotion", "literature"), base=("conversations", "greetings", "money", "movies"),
             epochs=3, outputs_per_owner=2, shells=2, proj_dim=1024)
PAD, EOS = 0, 1  # context padding / beginning of line, end of line


# ----------------------------------------------------------------------------- data
def load_corpus(cfg: dict) -> tuple[list[str], list[str | None], list[str]]:
    """Lines, the owner of each line (None = base) and the vocabulary."""
    import chatterbot_corpus

    d = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    lines, owner = [], []
    for cat in (*cfg["owners"], *cfg["base"]):
        conv = yaml.safe_load((d / f"{cat}.yml").read_text()).get("conversations", [])
        seen = set()
        for c in conv:
            for s in c:
                if not isinstance(s, str):
                    continue
                s = " ".join(s.split())[: cfg["max_len"]]
                if s and s not in seen:
                    seen.add(s)
                    lines.append(s)
                    owner.append(cat if cat in cfg["owners"] else None)
    vocab = sorted(set("".join(lines)))
    return lines, owner, vocab


class Codec:
    def __init__(self, vocab: list[str], ctx: int) -> None:
        self.vocab, self.ctx = vocab, ctx
        self.idx = {c: i + 2 for i, c in enumerate(vocab)}
        self.V = len(vocab) + 2

    def encode(self, s: str) -> list[int]:
        return [self.idx[c] for c in s]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i - 2] for i in ids if i >= 2)

    def windows(self, seq: list[int], start: int) -> tuple[np.ndarray, np.ndarray]:
        """Contexts (L, ctx) and targets (L,) for predicting seq[start:] + EOS (seq begins after BOS)."""
        full = [PAD] * self.ctx + seq + [EOS]
        tg = list(range(self.ctx + start, len(full)))
        X = np.array([full[t - self.ctx : t] for t in tg], dtype=np.int64)
        return X, np.array([full[t] for t in tg], dtype=np.int64)


def pad_batch(items: list[tuple[np.ndarray, np.ndarray]], ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(y) for _, y in items)
    X = np.zeros((len(items), T, ctx), dtype=np.int64)
    Y = np.full((len(items), T), -100, dtype=np.int64)
    for i, (x, y) in enumerate(items):
        X[i, : len(y)], Y[i, : len(y)] = x, y
    return torch.from_numpy(X), torch.from_numpy(Y)


# ----------------------------------------------------------------------------- model
class CharMLP(nn.Module):
    """p(next char | previous ctx chars): embedding -> tanh MLP -> logits (B, T, V)."""

    def __init__(self, V: int, ctx: int, emb: int, hidden: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, emb)
        self.fc1 = nn.Linear(ctx * emb, hidden)
        self.fc2 = nn.Linear(hidden, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, ctx)
        e = self.emb(x).flatten(-2)
        return self.fc2(torch.tanh(self.fc1(e)))


def make_model(cfg: dict, V: int) -> CharMLP:
    torch.manual_seed(0)
    return CharMLP(V, cfg["ctx"], cfg["emb"], cfg["hidden"])


def epoch_orders(n_examples: int, epochs: int) -> list[np.ndarray]:
    return [np.random.default_rng([1234, e]).permutation(n_examples) for e in range(epochs)]


def iter_batches(cfg, orders, member: np.ndarray):
    """(epoch, ids) of a coalition's batches under the data-order rule ``cfg["order"]``.

    ``"slots"``: the global batches (consecutive chunks of the epoch's permutation of all examples)
    restricted to the coalition; same steps for every coalition, a removed example leaves its slot empty.
    ``"shuffle"``: the coalition's own examples in the epoch's permutation order, re-chunked into full
    batches (bigger coalitions take more steps).
    """
    B = cfg["batch"]
    for e, order in enumerate(orders):
        if cfg["order"] == "slots":
            for i in range(0, len(order), B):
                ids = order[i : i + B]
                ids = ids[member[ids]]
                if ids.size:
                    yield e, ids
        else:
            seq = order[member[order]]
            for i in range(0, len(seq), B):
                yield e, seq[i : i + B]


def batch_loss(cfg, codec, model, X, Y, counts) -> torch.Tensor:
    """``"slots"``: summed token CE / a fixed constant (so other examples keep their weight when one is
    removed: the recorder's ``loss_reduction="sum"``); ``"shuffle"``: token mean (``"token_mean"``)."""
    tot = F.cross_entropy(model(X).reshape(-1, codec.V), Y.reshape(-1), ignore_index=-100, reduction="sum")
    return tot / (cfg["norm"] if cfg["order"] == "slots" else counts.sum())


def train(cfg, codec, data, example_ids: np.ndarray, orders, model=None, opt=None, recorder=None):
    """Train on ``example_ids`` (base + coalition) under the fixed data-order rule; optionally recorded."""
    t0 = time.perf_counter()
    if model is None:
        model = make_model(cfg, codec.V)
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.0)
    member = np.zeros(len(data), dtype=bool)
    member[example_ids] = True
    for e, ids in iter_batches(cfg, orders, member):
        X, Y = pad_batch([data[j] for j in ids], codec.ctx)
        counts = (Y != -100).sum(1)
        if recorder is None:
            batch_loss(cfg, codec, model, X, Y, counts).backward()
        else:
            kw = {"tokens": counts} if cfg["order"] == "shuffle" else {}
            with recorder.step(sample_ids=torch.from_numpy(ids), epoch=e, **kw):
                batch_loss(cfg, codec, model, X, Y, counts).backward()
        opt.step()
        opt.zero_grad()
    return model, time.perf_counter() - t0


def output_batch(codec, outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts/targets of every generated output: targets are the continuation (and EOS) only."""
    items = [codec.windows(codec.encode(o["prompt"] + o["text"]), len(o["prompt"])) for o in outputs]
    return pad_batch(items, codec.ctx)


def neg_log_lik(model, X, Y) -> torch.Tensor:
    """(m,) -log p(x | prompt), summed over the characters of each output (+ EOS)."""
    logits = model(X)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1), ignore_index=-100, reduction="none")
    return nll.view(Y.shape).sum(1)


@torch.no_grad()
def generate(model, codec, prompt: str, n: int, temperature: float, gen: torch.Generator) -> str:
    seq = codec.encode(prompt)
    out = []
    for _ in range(n):
        ctx = ([PAD] * codec.ctx + seq + out)[-codec.ctx :]
        p = torch.softmax(model(torch.tensor([[ctx]]))[0, 0] / temperature, -1)
        p[PAD] = 0
        c = int(torch.multinomial(p, 1, generator=gen))
        if c == EOS:
            break
        out.append(c)
    return codec.decode(out)


# ----------------------------------------------------------------------------- coalition models
class ModelCache:
    """Coalition models keyed by their exact training set, on disk (state dicts + training seconds)."""

    def __init__(self, root: Path, cfg: dict, codec, data, orders) -> None:
        self.root, self.cfg, self.codec, self.data, self.orders = root, cfg, codec, data, orders
        root.mkdir(parents=True, exist_ok=True)
        keys = {k: cfg[k] for k in ("owners", "base", "epochs", "lr", "batch", "ctx", "emb", "hidden", "max_len",
                                         "order")}
        self.fp = hashlib.sha256(json.dumps([keys, codec.vocab, torch.__version__]).encode()).hexdigest()[:12]
        self.trained = 0
        self.cached_s = 0.0  # training seconds of models loaded from the cache (not spent by this process)
        self._seen: set[str] = set()

    def get(self, example_ids: np.ndarray) -> tuple[CharMLP, float]:
        ids = np.sort(np.asarray(example_ids))
        key = hashlib.sha256(self.fp.encode() + ids.astype(np.int64).tobytes()).hexdigest()[:20]
        f = self.root / f"{key}.pt"
        if f.exists():
            blob = torch.load(f, weights_only=True)
            model = make_model(self.cfg, self.codec.V)
            model.load_state_dict(blob["state"])
            if key not in self._seen:
                self.cached_s += float(blob["seconds"])
            self._seen.add(key)
            return model, float(blob["seconds"])
        model, secs = train(self.cfg, self.codec, self.data, ids, self.orders)
        tmp = f.with_suffix(".tmp")
        torch.save({"state": model.state_dict(), "seconds": secs}, tmp)
        os.replace(tmp, f)
        self.trained += 1
        self._seen.add(key)
        return model, secs


def coalition_utilities(cache, parts: list[np.ndarray], base_ids, X, Y, log=None) -> tuple[np.ndarray, float]:
    """(m, 2**n) log p_S(x) for every coalition of ``parts`` (bit i = part i), and the training seconds."""
    n = len(parts)
    U = np.empty((X.shape[0], 1 << n))
    secs = 0.0
    for mask in range(1 << n):
        ids = np.concatenate([base_ids] + [parts[i] for i in range(n) if mask >> i & 1])
        model, s = cache.get(ids)
        secs += s
        with torch.no_grad():
            U[:, mask] = -neg_log_lik(model, X, Y).double().numpy()
        if log and (mask + 1) % 8 == 0:
            log(f"  coalitions {mask + 1}/{1 << n}")
    return U, secs


# ----------------------------------------------------------------------------- metrics
def srs(values: np.ndarray) -> np.ndarray:
    """SRS shares row by row (all-zero row where nobody has a positive value)."""
    pos = np.clip(values, 0, None)
    tot = pos.sum(-1, keepdims=True)
    return np.divide(pos, tot, out=np.zeros_like(pos), where=tot > 0)


def compare(exact_phi: np.ndarray, fast: np.ndarray) -> dict:
    taus = np.array([kendalltau(a, b).statistic for a, b in zip(exact_phi, fast, strict=True)])
    top = (exact_phi.argmax(1) == fast.argmax(1))
    l1 = np.abs(srs(exact_phi) - srs(fast)).sum(1)
    return {"tau": taus, "top": top, "l1": l1}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", default=None, help="coalition-model cache (default experiments/copyright/cache[-quick])")
    ap.add_argument("--order", choices=("slots", "shuffle"), default="slots",
                    help="data-order rule of every training run (see iter_batches)")
    ap.add_argument("--out", default=None, help="result directory (default docs/results for the full run)")
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else FULL, order=args.order)
    torch.set_num_threads(1)
    tag = ("quick" if args.quick else "full") + ("-shuffle" if args.order == "shuffle" else "")
    sfx = ("_quick" if args.quick else "") + ("_shuffle" if args.order == "shuffle" else "")
    cache_dir = Path(args.cache) if args.cache else HERE / ("cache-quick" if args.quick else "cache")
    out_dir = Path(args.out) if args.out else (HERE / "out-quick" if args.quick else
                                               HERE / "results" if args.order == "shuffle" else ROOT / "docs" / "results")
    work = HERE / f"work-{tag}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # docs/results gets only the markdown and the PNG; the JSON and the CLI reports go next to the code
    art_dir = out_dir if (args.quick or args.out) else HERE / "results"
    art_dir.mkdir(parents=True, exist_ok=True)
    T0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)

    lines, owner_of, vocab = load_corpus(cfg)
    codec = Codec(vocab, cfg["ctx"])
    data = [codec.windows(codec.encode(s), 0) for s in lines]
    cfg["norm"] = float(cfg["batch"] * np.mean([len(y) for _, y in data]))  # fixed loss normaliser ("slots")
    owners = list(cfg["owners"])
    n = len(owners)
    owner_arr = np.array([o if o is not None else "" for o in owner_of])
    base_ids = np.flatnonzero(owner_arr == "")
    parts = [np.flatnonzero(owner_arr == o) for o in owners]
    orders = epoch_orders(len(data), cfg["epochs"])
    log(f"{len(lines)} lines ({len(base_ids)} base; " + ", ".join(f"{o}={len(p)}" for o, p in zip(owners, parts, strict=True))
        + f"), vocab {codec.V}")

    # ------------------------------------------------------------- fast path: one recorded run
    run_path = work / "full.zarr"
    t = time.perf_counter()
    model_rec = make_model(cfg, codec.V)
    n_params = sum(p.numel() for p in model_rec.parameters())
    opt = torch.optim.SGD(model_rec.parameters(), lr=cfg["lr"], momentum=0.0)
    member_all = np.arange(len(data))
    with datavalue.Recorder(run_path, model_rec, proj_dim=cfg["proj_dim"], seed=0, optimizer=opt,
                            loss_reduction="sum" if cfg["order"] == "slots" else "token_mean",
                            overwrite=True) as rec:
        train(cfg, codec, data, member_all, orders, model=model_rec, opt=opt, recorder=rec)
    t_record = time.perf_counter() - t
    log(f"recorded full run ({n_params} params, proj_dim {cfg['proj_dim']}) in {t_record:.1f}s")

    # ------------------------------------------------------------- outputs from the full model
    cache = ModelCache(cache_dir, cfg, codec, data, orders)
    full_model, _ = cache.get(np.concatenate([base_ids, *parts]))
    same = all(torch.equal(a, b) for a, b in zip(full_model.state_dict().values(), model_rec.state_dict().values(), strict=True))
    max_dev = max(float((a - b).abs().max()) for a, b in zip(full_model.state_dict().values(),
                                                             model_rec.state_dict().values(), strict=True))
    log(f"recorded model == cached full coalition model: {same} (max |diff| {max_dev:.2e})")
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    outputs = []
    for o, p in zip(owners, parts, strict=True):
        for j in rng.choice(p, cfg["outputs_per_owner"], replace=False):
            s = lines[j]
            k = min(len(s) - 1, max(6, s.find(" ", 8) if s.find(" ", 8) > 0 else 8))
            prompt = s[:k]
            text = generate(model_rec, codec, prompt, cfg["gen_len"], cfg["temperature"], gen)
            outputs.append({"id": f"gen-{len(outputs):03d}", "prompt_owner": o, "prompt": prompt, "text": text})
    # control set: near-verbatim copies (an owner's own training line, prompted with its opening words)
    copies = []
    for o, p in zip(owners, parts, strict=True):
        for j in rng.choice(p, cfg["outputs_per_owner"], replace=False):
            s = lines[j]
            k = min(len(s) - 1, max(6, s.find(" ", 8) if s.find(" ", 8) > 0 else 8))
            copies.append({"id": f"copy-{len(copies):03d}", "prompt_owner": o, "prompt": s[:k], "text": s[k:]})
    X, Y = output_batch(codec, outputs)
    Xall, Yall = output_batch(codec, outputs + copies)
    m = len(outputs)
    log(f"sampled {m} outputs (+{len(copies)} verbatim copies as a control)")

    # ------------------------------------------------------------- fast path: embeddings + query
    t = time.perf_counter()
    fast, fast_all = {}, {}
    build_s = {}
    sample_owner = {int(i): owner_of[i] for i in range(len(data)) if owner_of[i] is not None}
    for curv in ("none", "empirical_fisher"):
        tb = time.perf_counter()
        build_embeddings(run_path, curvature=curv, progress=False)
        attr = Attributor(run_path, model_rec, curvature=curv, progress=False)
        S = attr.scores(lambda mdl: neg_log_lik(mdl, Xall, Yall), by="owner", owners=sample_owner, unowned="drop")
        labels = [str(x) for x in attr.labels(by="owner", owners=sample_owner, unowned="drop")]
        fast_all[curv] = S[:, [labels.index(o) for o in owners]]
        fast[curv] = fast_all[curv][:m]
        build_s[curv] = time.perf_counter() - tb
        log(f"fast path ({curv}): embeddings + owner query in {build_s[curv]:.1f}s")
    # shells of every owner for the fast-path splitting attack (additive: shells sum to the owner)
    t_fast = {c: t_record + build_s[c] for c in build_s}

    # ------------------------------------------------------------- gold standard: 2**n retrained models
    t = time.perf_counter()
    U_all, train_secs = coalition_utilities(cache, parts, base_ids, Xall, Yall, log)
    U = U_all[:m]
    t_gold_wall = time.perf_counter() - t
    phi = shapley.exact_from_utilities(U)
    np.testing.assert_allclose(phi.sum(1), U[:, -1] - U[:, 0], atol=1e-6)
    loo = U[:, [(1 << n) - 1] * n] - U[:, [((1 << n) - 1) ^ (1 << i) for i in range(n)]]
    log(f"gold standard: {1 << n} coalition models, {train_secs:.1f}s of training ({cache.trained} trained now)")

    # ------------------------------------------------------------- comparison
    res = {c: compare(phi, fast[c]) for c in fast}
    res["loo-retrain"] = compare(phi, loo)
    res_loo = {c: compare(loo, fast[c]) for c in fast}
    phi_c = shapley.exact_from_utilities(U_all[m:])
    loo_c = (U_all[m:][:, [(1 << n) - 1] * n] - U_all[m:][:, [((1 << n) - 1) ^ (1 << i) for i in range(n)]])
    res_copy = {c: compare(phi_c, fast_all[c][m:]) for c in fast}
    res_copy["loo-retrain"] = compare(phi_c, loo_c)
    corr_copy = {c: float(np.corrcoef(fast_all[c][m:].ravel(), phi_c.ravel())[0, 1]) for c in fast}
    corr_copy["loo-retrain"] = float(np.corrcoef(loo_c.ravel(), phi_c.ravel())[0, 1])
    copy_top_is_owner = {c: float(np.mean([owners[i] == o["prompt_owner"] for i, o in
                                           zip(fast_all[c][m:].argmax(1), copies, strict=True)])) for c in fast}
    copy_top_is_owner["exact"] = float(np.mean([owners[i] == o["prompt_owner"] for i, o in zip(phi_c.argmax(1), copies, strict=True)]))
    # scale of the fast path: regression slope of fast on exact phi through 0
    slope = {c: float(np.sqrt((fast[c] ** 2).mean() / (phi ** 2).mean())) for c in fast}  # RMS scale ratio
    corr = {c: float(np.corrcoef(fast[c].ravel(), phi.ravel())[0, 1]) for c in fast}
    corr["loo-retrain"] = float(np.corrcoef(loo.ravel(), phi.ravel())[0, 1])
    prompted_top = {"exact": float(np.mean([owners[i] == o["prompt_owner"] for i, o in zip(phi.argmax(1), outputs, strict=True)]))}
    for c in fast:
        prompted_top[c] = float(np.mean([owners[i] == o["prompt_owner"] for i, o in zip(fast[c].argmax(1), outputs, strict=True)]))
    # interaction size: how far the exact game is from additive (phi vs LOO)
    inter = float(np.abs(phi - loo).sum() / np.abs(phi).sum())

    # ------------------------------------------------------------- ledgers + CLI report
    led_dir = art_dir / f"ledgers{sfx}"
    shutil.rmtree(led_dir, ignore_errors=True)
    led_dir.mkdir(parents=True)
    ledgers = {"exact": shapley.RoyaltyLedger(led_dir / "exact.jsonl"),
               "fast": shapley.RoyaltyLedger(led_dir / "fast.jsonl")}
    best = "empirical_fisher"
    for i, o in enumerate(outputs):
        common = dict(output_id=o["id"], prompt=o["prompt"], content=o["prompt"] + o["text"], revenue=Decimal("1.00"),
                      royalty_rate=Decimal("0.30"), owners=owners, timestamp=f"2025-03-{1 + i % 28:02d}T12:00:00",
                      model_fingerprint=f"charmlp-{cache.fp}")
        ledgers["exact"].record(utilities=U[i], run_fingerprint=f"retrain-2^{n}", **common)
        ledgers["fast"].record(result=fast[best][i], run_fingerprint=f"dvemb-{best}", **common)
    verified = {k: v.verify() for k, v in ledgers.items()}
    cli = [str(ROOT / ".venv" / "bin" / "datavalue"), "royalties", str(led_dir / "fast.jsonl"),
           "--period", "2025-03-01:2025-04-01", "--overwrite"]
    reports = {}
    for ext in ("html", "csv"):
        dest = art_dir / f"copyright{sfx}_fast_report.{ext}"
        proc = subprocess.run(cli + ["--out", str(dest)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"datavalue royalties failed ({proc.returncode}): {proc.stderr}")
        reports[ext] = dest
    st = {k: v.statement("2025-03-01:2025-04-01") for k, v in ledgers.items()}
    amounts = {k: {ol.owner: ol.amount for ol in s.owners} for k, s in st.items()}
    log(f"ledgers verified {verified}; CLI report -> {reports['html']}")

    # ------------------------------------------------------------- splitting attack
    target = int(np.argmax(srs(phi).mean(0)))
    k = cfg["shells"]
    shells = [parts[target][j::k] for j in range(k)]
    split_parts = [p for i, p in enumerate(parts) if i != target] + shells
    split_names = [o for i, o in enumerate(owners) if i != target] + [f"{owners[target]}-shell{j + 1}" for j in range(k)]
    t = time.perf_counter()
    U_split, split_secs = coalition_utilities(cache, split_parts, base_ids, Xall, Yall, log)
    U_split = U_split[:m]
    t_split = time.perf_counter() - t
    phi_split = shapley.exact_from_utilities(U_split)
    reg = shapley.OwnerRegistry({w: w for w in split_names})
    reg.add_owner(owners[target])
    for s in split_names[n - 1 :]:
        reg.merge(s, into=owners[target])
    reg_owners, unions = reg.partition(split_names)
    owen = shapley.owen_from_utilities(U_split, unions)
    owen_tot = np.stack([owen[:, list(u)].sum(1) for u in unions], 1)
    order_back = [list(reg_owners).index(o) for o in owners]
    owen_owner = owen_tot[:, order_back]
    np.testing.assert_allclose(owen_owner, phi, atol=1e-4)  # quotient property: Owen totals == original Shapley
    share_orig = srs(phi)[:, target]
    share_split = srs(phi_split)[:, n - 1 :].sum(1)
    share_owen = srs(owen_owner)[:, target]
    # fast path split: the additive game's values of the shells are the shells' own sums
    shell_owner = {int(j): split_names[n - 1 + s] for s in range(k) for j in shells[s]}
    shell_owner.update({int(j): o for j, o in sample_owner.items() if int(j) not in shell_owner})
    attr = Attributor(run_path, model_rec, curvature=best, progress=False)
    S = attr.scores(lambda mdl: neg_log_lik(mdl, X, Y), by="owner", owners=shell_owner, unowned="drop")
    lab = [str(x) for x in attr.labels(by="owner", owners=shell_owner, unowned="drop")]
    fast_split = S[:, [lab.index(o) for o in split_names]]
    fshare_orig = srs(fast[best])[:, target]
    fshare_split = srs(fast_split)[:, n - 1 :].sum(1)
    # ledger view: the exact split game recorded with shell owners, statement with and without the registry
    reg_path = work / "registry.json"
    reg.save(reg_path, overwrite=True)
    led_split = shapley.RoyaltyLedger(led_dir / "split.jsonl")
    for i, o in enumerate(outputs):
        led_split.record(output_id=o["id"], prompt=o["prompt"], content=o["prompt"] + o["text"],
                         revenue=Decimal("1.00"), royalty_rate=Decimal("0.30"), owners=split_names,
                         utilities=U_split[i], timestamp=f"2025-03-{1 + i % 28:02d}T12:00:00")
    st_reg = led_split.statement("2025-03-01:2025-04-01", registry=reg)
    split_amount_reg = {ol.owner: ol.amount for ol in st_reg.owners}.get(owners[target], Decimal(0))
    log(f"splitting attack on {owners[target]} into {k} shells: {1 << (n - 1 + k)} coalitions, "
        f"{split_secs:.1f}s training ({t_split:.1f}s wall)")

    # ------------------------------------------------------------- write results
    total = time.perf_counter() - T0
    summary = {
        "config": {k2: (list(v) if isinstance(v, tuple) else v) for k2, v in cfg.items()},
        "n_params": n_params, "n_lines": len(lines), "n_outputs": m, "recorded_equals_cached": bool(same),
        "times": {"record_s": t_record, "fast_total_s": t_fast, "gold_train_s": train_secs,
                  "gold_wall_s": t_gold_wall, "split_train_s": split_secs, "total_s": total,
                  "cold_total_s_estimate": total + cache.cached_s, "models_from_cache": len(cache._seen) - cache.trained},
        "metrics": {c: {"tau_mean": float(np.nanmean(r["tau"])), "top_agree": float(r["top"].mean()),
                        "l1_mean": float(r["l1"].mean())} for c, r in res.items()},
        "metrics_vs_loo": {c: {"tau_mean": float(np.nanmean(r["tau"])), "top_agree": float(r["top"].mean()),
                               "l1_mean": float(r["l1"].mean())} for c, r in res_loo.items()},
        "metrics_copies": {c: {"tau_mean": float(np.nanmean(r["tau"])), "top_agree": float(r["top"].mean()),
                               "l1_mean": float(r["l1"].mean()), "corr": corr_copy[c]} for c, r in res_copy.items()},
        "copy_top_is_owner": copy_top_is_owner,
        "rms_ratio": slope, "corr": corr, "prompted_top": prompted_top, "interaction": inter,
        "split": {"owner": owners[target], "shells": k, "share_orig": float(share_orig.mean()),
                  "share_split_srs": float(share_split.mean()), "share_owen": float(share_owen.mean()),
                  "fast_share_orig": float(fshare_orig.mean()), "fast_share_split": float(fshare_split.mean()),
                  "ledger_amount_with_registry": str(split_amount_reg)},
        "outputs": [dict(o, phi=phi[i].tolist(), fast=fast[best][i].tolist(), loo=loo[i].tolist(),
                         tau=float(res[best]["tau"][i]), v_full=float(U[i, -1]), v_base=float(U[i, 0]))
                    for i, o in enumerate(outputs)],
        "amounts": {k2: {o: str(a) for o, a in v.items()} for k2, v in amounts.items()},
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
    }
    stem = "copyright" + sfx
    (art_dir / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    plot(out_dir / f"{stem}.png", owners, outputs, phi, fast, loo, share_orig, share_split, share_owen,
         fshare_orig, fshare_split, owners[target], k, copy_xy=(phi_c, fast_all[best][m:]))
    write_md(out_dir / f"{stem}.md", summary, res, owners, outputs, phi, fast[best], best, amounts, stem,
             {k2: os.path.relpath(v, out_dir) for k2, v in reports.items()}, cmd=" ".join(["experiments/copyright/run.py"] + (["--quick"] if args.quick else [])
                                                                  + (["--order", args.order] if args.order != "slots" else [])),
             other=art_dir / "copyright_shuffle.json" if args.order == "slots" and not args.quick else None)
    log(f"done in {total:.1f}s -> {out_dir / (stem + '.md')}")


# ----------------------------------------------------------------------------- outputs
def plot(path, owners, outputs, phi, fast, loo, share_orig, share_split, share_owen, fshare_orig, fshare_split,
         target, k, copy_xy=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(21, 4.8))
    cols = plt.cm.tab10(np.arange(len(owners)))
    for j, o in enumerate(owners):
        ax[0].scatter(phi[:, j], fast["empirical_fisher"][:, j], s=18, color=cols[j], label=o)
        ax[0].scatter(phi[:, j], loo[:, j], s=18, color=cols[j], marker="x", alpha=0.6)
    lim = np.abs(np.concatenate([phi.ravel(), fast["empirical_fisher"].ravel(), loo.ravel()])).max() * 1.05
    ax[0].plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
    ax[0].set_xlabel("exact Shapley value phi (retraining, nats)")
    ax[0].set_ylabel("fast path (dots, emb. eFisher) / retrain LOO (x)")
    ax[0].set_title("owner values per output")
    ax[0].legend(fontsize=7)
    srs_e, srs_f = srs(phi), srs(fast["empirical_fisher"])
    idx = np.arange(len(outputs))
    bottom_e = np.zeros(len(outputs))
    bottom_f = np.zeros(len(outputs))
    for j in range(len(owners)):
        ax[1].bar(idx - 0.2, srs_e[:, j], 0.38, bottom=bottom_e, color=cols[j])
        ax[1].bar(idx + 0.2, srs_f[:, j], 0.38, bottom=bottom_f, color=cols[j], hatch="//", edgecolor="white", lw=0)
        bottom_e += srs_e[:, j]
        bottom_f += srs_f[:, j]
    ax[1].set_xticks(idx, [f"{i}:{o['prompt_owner'][:3]}" for i, o in enumerate(outputs)], rotation=90, fontsize=7)
    ax[1].set_ylabel("SRS share")
    ax[1].set_title("shares per output: exact (left, plain) vs fast (right, hatched)")
    names = ["exact\nunsplit", f"exact SRS\n{k} shells", f"Owen\n{k} shells", "fast\nunsplit", f"fast\n{k} shells"]
    vals = [share_orig.mean(), share_split.mean(), share_owen.mean(), fshare_orig.mean(), fshare_split.mean()]
    ax[2].bar(names, vals, color=["C0", "C3", "C2", "C1", "C4"])
    for i, v in enumerate(vals):
        ax[2].text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax[2].set_ylabel(f"mean SRS share of {target} (all outputs)")
    ax[2].set_title(f"splitting attack: {target} as {k} shell owners")
    pc, fc = copy_xy
    for j, o in enumerate(owners):
        ax[3].scatter(pc[:, j], fc[:, j], s=18, color=cols[j], label=o)
    lim = np.abs(np.concatenate([pc.ravel(), fc.ravel()])).max() * 1.05
    ax[3].plot([-lim, lim], [-lim, lim], "k:", lw=0.8)
    ax[3].set_xlabel("exact Shapley value phi (nats)")
    ax[3].set_ylabel("fast path (emb. eFisher)")
    ax[3].set_title("control: verbatim copies of owners' lines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_md(path, s, res, owners, outputs, phi, fastv, best, amounts, stem, reports, cmd, other=None) -> None:
    t = s["times"]
    c = s["config"]
    L = []
    L.append("# Copyright royalties end to end: retraining game vs data value embeddings\n")
    L.append(f"Command: `.venv/bin/python {cmd}`: wall time {t['total_s']:.0f} s on "
             f"{s['platform']['machine']}, torch {s['platform']['torch']}, 1 thread, shared 2-core machine "
             f"({t['models_from_cache']} coalition models came from the on-disk cache; a cold run takes about "
             f"{t['cold_total_s_estimate']:.0f} s).\n")
    L.append("## Setup\n")
    L.append(f"* Model: character-level MLP on the previous {c['ctx']} characters (embedding {c['emb']}, tanh hidden "
             f"{c['hidden']}), {s['n_params']} parameters, exact log-likelihood. Plain SGD, lr {c['lr']}, momentum 0, "
             f"batch {c['batch']} lines, {c['epochs']} epochs, recorder `loss_reduction="
             + ('"sum"` (summed token CE / a fixed constant).' if c["order"] == "slots" else '"token_mean"`.'))
    L.append(f"* Data: chatterbot-corpus (english), {s['n_lines']} distinct lines (cut to {c['max_len']} chars). "
             f"Owners: {', '.join(owners)}. Base (nobody's): {', '.join(c['base'])}.")
    if c["order"] == "slots":
        L.append("* Same initialisation (seed 0) for every model. Data order (`--order slots`): each epoch one global "
                 "permutation of all example ids (seed per epoch) cut into batches; a coalition keeps only its own "
                 "examples in each batch (same steps for every coalition; a removed example leaves its slot empty and "
                 "the others keep their weight). This is the counterfactual the embeddings linearise.")
    else:
        L.append("* Same initialisation (seed 0) for every model. Data order (`--order shuffle`): each epoch one "
                 "global permutation of all example ids (seed per epoch); a coalition trains on its own examples in "
                 "that order, re-chunked into full batches, same number of epochs (bigger coalitions take more steps).")
    L.append(f"* Outputs: {s['n_outputs']} samples from the full model (temperature {c['temperature']}, <= "
             f"{c['gen_len']} chars), {c['outputs_per_owner']} per owner, each prompted with the opening words of a "
             "line of that owner. `v_x(S) = log p_S(continuation + end-of-line | prompt)` in nats.")
    L.append(f"* Gold standard: {2 ** len(owners)} coalition models, exact Shapley (`shapley.exact_from_utilities`). "
             f"Fast path: one recorded run (`proj_dim={c['proj_dim']}`), `build_embeddings`, "
             "`Attributor.scores(-log p, by=\"owner\")`; the additive game's value of an owner is its summed influence.")
    L.append(f"* The recorded run reproduces the cached full coalition model bit for bit: {s['recorded_equals_cached']}.\n")
    mg, mc, ml = s["metrics"][best], s["metrics_copies"][best], s["metrics"]["loo-retrain"]
    L.append("## How far can the fast path be trusted?\n")
    L.append(f"* **Generated outputs: not for payments.** Owner rankings from the embeddings are unrelated to exact "
             f"Shapley (mean Kendall tau {mg['tau_mean']:.2f}, top owner {100 * mg['top_agree']:.0f}%, share L1 "
             f"{mg['l1_mean']:.2f} out of a maximum of 2), and its values are {s['rms_ratio'][best]:.0f}x too large "
             "(RMS). Owner interactions are not the main reason: retraining "
             f"leave-one-owner-out, the additive game first-order influence tries to estimate, reaches tau "
             f"{ml['tau_mean']:.2f} / top {100 * ml['top_agree']:.0f}%. The fast path misses even that, because "
             f"removing a whole owner (every epoch) from an lr-{c['lr']}, {c['epochs']}-epoch run is far "
             "outside the first-order regime, and a sampled output's log-likelihood moves by a few nats, in "
             "many directions, when an owner goes.")
    L.append(f"* **Near-verbatim copies: a triage signal.** When the output is an owner's own line, the fast path "
             f"names the exact top owner {100 * mc['top_agree']:.0f}% of the time (tau {mc['tau_mean']:.2f}, "
             f"value correlation {mc['corr']:.2f}); use it to flag outputs for the retraining game, not to pay.")
    L.append("* **In the first-order regime it is right.** Side check `experiments/copyright/diag_lr.py` (quick "
             "config, owners' own lines as test points, same rule): at lr 0.1 and 1 epoch the embeddings' "
             "owner values correlate 0.97 with retraining leave-one-owner-out (slope 0.56: the first-order sum "
             "underestimates removing a whole owner); at lr 1.0 and 8 epochs the correlation is 0.73-0.74 and the "
             "scale is off by 4-6x. Curvature (empirical Fisher vs none) barely matters here; curvature none "
             "equals TracIn at the final test gradient.")
    L.append("* **Data-order rule matters for the gold standard itself.** With `--order slots` (a removed example "
             "leaves its slot empty, what the embeddings linearise) the exact game is closer to additive than with "
             "`--order shuffle` (coalitions re-chunk their data, so every later batch changes): see the LOO row in "
             "both tables below. State the rule with any retraining-based royalty.")
    L.append("* **Splitting attack.** Plain-Shapley SRS rewards the split owner; Owen values over an owner registry "
             "that merges the shells give back exactly the unsplit values. The additive fast path is "
             "split-proof in value (shell values sum to the owner's) but not in SRS share, because clipping "
             "negative values per shell pays the positive shells.\n")
    L.append("## Fast path vs exact Shapley (per output, then averaged)\n")
    L.append("| estimate of phi | mean Kendall tau | top owner agrees | mean L1 of SRS shares | corr(values) | "
             "RMS(value) / RMS(phi) | wall time |")
    L.append("|---|---|---|---|---|---|---|")
    label = {"none": "embeddings, curvature none", "empirical_fisher": "embeddings, empirical Fisher",
             "loo-retrain": "retrain leave-one-owner-out (additive oracle)"}
    for key in ("none", "empirical_fisher", "loo-retrain"):
        mm = s["metrics"][key]
        wt = f"{t['fast_total_s'][key]:.0f} s" if key in t["fast_total_s"] else "(part of gold)"
        sl = f"{s['rms_ratio'][key]:.1f}" if key in s["rms_ratio"] else "-"
        L.append(f"| {label[key]} | {mm['tau_mean']:.2f} | {100 * mm['top_agree']:.0f}% | {mm['l1_mean']:.2f} | "
                 f"{s['corr'][key]:.2f} | {sl} | {wt} |")
    L.append(f"| exact Shapley (gold standard) | 1 | 100% | 0 | 1 | 1 | {t['gold_train_s']:.0f} s training of "
             f"{2 ** len(owners)} models |\n")
    L.append("Fast-path wall time = recording the one training run + building embeddings + the owner query "
             f"(recording: {t['record_s']:.0f} s). Gold wall time = the summed training time of the coalition models "
             "(cached on disk; a resumed run does not retrain but still reports the original cost).\n")
    L.append("Against the additive oracle (retrain leave-one-owner-out, what first-order influence estimates "
             "directly):\n")
    L.append("| fast path | mean Kendall tau vs LOO | top owner agrees | mean L1 of shares |")
    L.append("|---|---|---|---|")
    for key, mm in s["metrics_vs_loo"].items():
        L.append(f"| {label[key]} | {mm['tau_mean']:.2f} | {100 * mm['top_agree']:.0f}% | {mm['l1_mean']:.2f} |")
    L.append("")
    L.append("Control: verbatim copies (one of an owner's own training lines, prompted with its opening words), "
             "same models, same metrics against exact Shapley:\n")
    L.append("| estimate of phi | mean Kendall tau | top owner agrees | mean L1 of SRS shares | corr(values) |")
    L.append("|---|---|---|---|---|")
    for key, mm in s["metrics_copies"].items():
        L.append(f"| {label[key]} | {mm['tau_mean']:.2f} | {100 * mm['top_agree']:.0f}% | {mm['l1_mean']:.2f} | "
                 f"{mm['corr']:.2f} |")
    L.append("\nTop owner = the copied line's owner: " + ", ".join(f"{k2} {100 * v:.0f}%" for k2, v in
                                                              s["copy_top_is_owner"].items()) + ".\n")
    L.append(f"Interaction size: sum|phi - LOO| / sum|phi| = {s['interaction']:.2f} (0 for an additive game). "
             "Top owner = the prompted owner: " + ", ".join(f"{k2} {100 * v:.0f}%" for k2, v in s["prompted_top"].items())
             + ".\n")
    if other is not None and Path(other).exists():
        o = json.loads(Path(other).read_text())
        L.append("### The other data-order rule (`--order shuffle`, token-mean loss)\n")
        L.append("Same experiment, but each coalition re-chunks its own examples into full batches (removing an owner "
                 "changes every later batch). Results of that run (`experiments/copyright/results/copyright_shuffle.json`):\n")
        L.append("| estimate of phi | mean Kendall tau | top owner agrees | mean L1 of SRS shares | corr(values) |")
        L.append("|---|---|---|---|---|")
        for key in ("none", "empirical_fisher", "loo-retrain"):
            mm = o["metrics"][key]
            L.append(f"| {label[key]} | {mm['tau_mean']:.2f} | {100 * mm['top_agree']:.0f}% | {mm['l1_mean']:.2f} | "
                     f"{o['corr'][key]:.2f} |")
        L.append(f"\nInteraction size there: {o['interaction']:.2f}.\n")
    L.append(f"![values, shares and the splitting attack]({stem}.png)\n")
    L.append(f"## Per output (fast path = embeddings, {best})\n")
    L.append("| id | prompt owner | prompt + generated | log p full | log p base | exact top | fast top | tau |")
    L.append("|---|---|---|---|---|---|---|---|")
    for o in s["outputs"]:
        txt = (o["prompt"] + "|" + o["text"]).replace("|", "\u2502", 1).replace("|", "/")
        L.append(f"| {o['id']} | {o['prompt_owner']} | `{txt}` | {o['v_full']:.1f} | {o['v_base']:.1f} | "
                 f"{owners[int(np.argmax(o['phi']))]} | {owners[int(np.argmax(o['fast']))]} | {o['tau']:.2f} |")
    L.append("\n(`\u2502` separates the prompt from the generated continuation.)\n")
    L.append("## Royalties for the batch (pool = 30% of $1.00 per output, share-then-sum, `srs-v1`)\n")
    L.append("| owner | exact (retraining) | fast (embeddings) |")
    L.append("|---|---|---|")
    for o in owners:
        L.append(f"| {o} | {amounts['exact'].get(o, Decimal(0))} | {amounts['fast'].get(o, Decimal(0))} |")
    L.append("")
    L.append("The fast path's report was written by the CLI, as a user would: `datavalue royalties "
             "ledgers/fast.jsonl --period 2025-03-01:2025-04-01 --out copyright_fast_report.html`: "
             f"[HTML]({reports['html']}), [CSV]({reports['csv']}); the ledgers (`ledgers/`) and all numbers (JSON) "
             "are next to them.\n")
    sp = s["split"]
    L.append(f"## Splitting attack: {sp['owner']} as {sp['shells']} shell owners\n")
    L.append(f"The most valuable owner of the exact game ({sp['owner']}) splits its lines round-robin into "
             f"{sp['shells']} shells. The new {len(owners) - 1 + sp['shells']}-player game is retrained (coalitions "
             "with all or no shells are the original models, reused from the cache). Mean SRS share over all outputs:\n")
    L.append("| | unsplit | split, plain Shapley SRS | split, Owen (registry merges shells) |")
    L.append("|---|---|---|---|")
    L.append(f"| exact (retraining) | {sp['share_orig']:.3f} | {sp['share_split_srs']:.3f} | {sp['share_owen']:.3f} |")
    L.append(f"| fast (additive) | {sp['fast_share_orig']:.3f} | {sp['fast_share_split']:.3f} | "
             f"{sp['fast_share_orig']:.3f} |\n")
    L.append("Owen owner totals equal the unsplit Shapley values exactly (quotient property, asserted). "
             "The additive fast path cannot see the attack in the values (shell values sum to the owner's), so "
             "any change there comes only from clipping negative shells. Ledger statement of the split game with "
             f"the registry: {sp['owner']} receives {sp['ledger_amount_with_registry']} (regrouped plain-Shapley "
             "amounts: the registry only regroups what was paid).\n")
    Path(path).write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
