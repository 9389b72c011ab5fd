"""Shared pieces of the fine-tuning royalty study: data, the base model, fine-tunes, likelihoods.

* Data: chatterbot-corpus (english) lines by category, whitespace-normalised, 8..62 characters,
  deduplicated across the corpus (first occurrence keeps its category). Char-level tokens with the
  LM study's helpers (``experiments/lm/common.py``: ``vocab_of``, ``make_config``, ``token_ce``).
* Base model: a GPT-2-architecture LM from a config (no download), pretrained once on categories
  no owner holds and cached on disk (``runs/copyright_ft/base.pt``, loaded ``weights_only``).
* Fine-tunes: AdamW, constant lr, ``batch`` lines per step, full fine-tune or LoRA (``peft`` when it
  imports; the LoRA configurations are skipped otherwise). Data-order rule ("slots"): each epoch is
  one seeded permutation of the whole owner pool cut into batches; a coalition keeps only its own
  lines in each batch and steps anyway when a batch is empty (zero gradient: AdamW's moments and
  step count stay aligned with the all-owner run). The loss is the summed token cross-entropy over a
  fixed constant, so a removed line leaves the others' weight unchanged: the counterfactual data
  value embeddings linearise (recorder ``loss_reduction="sum"``).
* Utility of an output ``x`` (prompt ``c``): ``log p_S(x | c) - log p_base(x | c)`` in nats, the
  continuation and its end-of-line token scored exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

def _load_lm_common():
    """The LM study's data/model helpers (``experiments/lm/common.py``), reused as they are."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_common", ROOT / "experiments" / "lm" / "common.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lm_common"] = mod
    spec.loader.exec_module(mod)
    return mod


LM = _load_lm_common()

BOS = LM.BOS
MAX_CHARS, L = 62, 64
OWNERS = ("ai", "emotion", "psychology", "literature", "trivia")
BASE = ("conversations", "greetings", "money", "movies", "politics", "sports", "science", "gossip",
        "computers", "botprofile", "food", "history", "health", "coding", "humor")
MODEL = dict(d=64, n_layer=2, n_head=4)
PRETRAIN = dict(steps=600, batch=32, lr=3e-3, seed=0)
LORA = dict(r=4, alpha=8, targets=("c_attn", "c_proj", "c_fc"), seed=1)


def have_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ data
def raw_lines(cat: str) -> list[str]:
    """Whitespace-normalised lines of one chatterbot-corpus category, in corpus order."""
    import chatterbot_corpus

    d = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    conv = yaml.safe_load((d / f"{cat}.yml").read_text(encoding="utf-8")).get("conversations", []) or []
    return [" ".join(s.split()) for c in conv for s in c if isinstance(s, str) and s.strip()]


def chunks(line: str, max_chars: int = MAX_CHARS) -> list[str]:
    """A long line cut at word boundaries into pieces of at most ``max_chars`` (>= 8) characters."""
    out, cur = [], ""
    for w in line.split():
        w = w[:max_chars]
        if cur and len(cur) + 1 + len(w) > max_chars:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    out.append(cur)
    return [c for c in out if len(c) >= 8]


def load_categories(cats, *, chunked=()) -> dict[str, list[str]]:
    """``{category: lines}`` in corpus order, 8..62 characters, deduplicated across all of ``cats``
    (first wins); categories in ``chunked`` have their long lines cut into pieces instead of dropped."""
    seen, out = set(), {}
    for cat in cats:
        lines = []
        for s in raw_lines(cat):
            for piece in (chunks(s) if cat in chunked else [s]):
                if 8 <= len(piece) <= MAX_CHARS and piece not in seen:
                    seen.add(piece)
                    lines.append(piece)
        out[cat] = lines
    return out


class Corpus:
    """Every category this study uses, one vocabulary, token arrays per line."""

    def __init__(self) -> None:
        self.cats = load_categories((*OWNERS, *BASE))
        # the 1,000-owner study: the owners' categories again, long lines cut into pieces
        self.many = [s for v in load_categories(OWNERS, chunked=OWNERS).values() for s in v]
        self.stoi = LM.vocab_of([s for c in (*OWNERS, *BASE) for s in raw_lines(c)])
        key = json.dumps([BASE, MODEL, PRETRAIN, MAX_CHARS, sorted(self.stoi.items()), torch.__version__])
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:10]
        self.itos = {i: c for c, i in self.stoi.items()}
        self.V = len(self.stoi) + 1

    def encode(self, lines: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        e = LM.encode(lines, self.stoi, L)
        return torch.from_numpy(e["input_ids"]), torch.from_numpy(e["labels"])

    def decode(self, ids) -> str:
        return "".join(self.itos.get(int(i), "") for i in ids if int(i) != BOS)


# ----------------------------------------------------------------------------------------- model
def new_model(corpus: Corpus):
    conf = LM.make_config(corpus.V, L, MODEL["d"], MODEL["n_layer"], MODEL["n_head"])
    return LM.make_factory(conf, seed=0, double=False)()


def base_model(corpus: Corpus, cache: Path, log=print):
    """The pretrained base (non-owner text), trained once and cached as a state dict."""
    f = cache / f"base-{corpus.fingerprint}.pt"
    model = new_model(corpus)
    if f.exists():
        model.load_state_dict(torch.load(f, weights_only=True))
        return model, 0.0
    lines = [s for c in BASE for s in corpus.cats[c]]
    ids, lab = corpus.encode(lines)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, PRETRAIN["steps"])
    rng = np.random.default_rng(PRETRAIN["seed"])
    batches = LM.epoch_batches(np.arange(len(lines)), PRETRAIN["batch"], PRETRAIN["steps"], rng)
    t0 = time.perf_counter()
    for t, b in enumerate(batches):
        tb = torch.from_numpy(b)
        loss = LM.token_ce(model, ids[tb], lab[tb]).sum() / float(LM.n_tokens(lab[tb]).sum())
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if (t + 1) % 300 == 0:
            log(f"  pretrain step {t + 1}/{PRETRAIN['steps']}: loss {loss.item():.3f}")
    secs = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, f)
    return model, secs


def adapt(model, method: str):
    """``"full"``: the model itself; ``"lora"``: a peft LoRA wrapper (same init for every coalition)."""
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(LORA["seed"])
    return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                            target_modules=list(LORA["targets"]), fan_in_fan_out=True))


def trainable_state(model) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    missing = set(state) - set(model.state_dict())
    if missing:
        raise KeyError(f"state has keys the model lacks: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)


# -------------------------------------------------------------------------------------- fine-tune
def epoch_slots(n_pool: int, epochs: int, batch: int, seed: int = 1234) -> list[np.ndarray]:
    """The fine-tuning schedule of the whole pool: ``epochs * ceil(n_pool / batch)`` batches."""
    out = []
    for e in range(epochs):
        perm = np.random.default_rng([seed, e]).permutation(n_pool)
        out += [perm[i: i + batch] for i in range(0, n_pool, batch)]
    return out


def finetune(model, ids, lab, slots, member: np.ndarray, *, lr: float, norm: float, checkpoints=(),
             recorder=None):
    """AdamW over ``slots`` keeping the ``member`` lines (pool indices) of each; returns the
    trainable states at the step counts in ``checkpoints`` and the seconds spent."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if recorder is not None:
        recorder = recorder(opt)
    states, t0 = {}, time.perf_counter()
    for t, slot in enumerate(slots):
        b = slot[member[slot]]
        if b.size == 0:
            for p in params:
                p.grad = torch.zeros_like(p)
        else:
            tb = torch.from_numpy(b)
            if recorder is None:
                (LM.token_ce(model, ids[tb], lab[tb]).sum() / norm).backward()
            else:
                with recorder.step(sample_ids=tb):
                    (LM.token_ce(model, ids[tb], lab[tb]).sum() / norm).backward()
        opt.step()
        opt.zero_grad()
        if t + 1 in checkpoints:
            states[t + 1] = trainable_state(model)
    if recorder is not None:
        recorder.close()
    return states, time.perf_counter() - t0


# ------------------------------------------------------------------------------------- likelihoods
def output_tensors(corpus: Corpus, outputs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``prompt + text`` and labels on the continuation (+ end of line) only."""
    ids, lab = corpus.encode([o["prompt"] + o["text"] for o in outputs])
    for i, o in enumerate(outputs):
        lab[i, : 1 + len(o["prompt"])] = -100  # BOS and the prompt are given
    return ids, lab


def neg_log_lik(model, ids, lab) -> torch.Tensor:
    """``(m,)`` -log p(continuation + end of line | prompt) in nats."""
    return LM.token_ce(model, ids, lab)


@torch.no_grad()
def generate(model, corpus: Corpus, prompt: str, n: int, temperature: float, gen: torch.Generator) -> str:
    seq = [BOS] + [corpus.stoi[c] for c in prompt]
    out = []
    for _ in range(n):
        x = torch.tensor([seq + out])[:, -L:]
        p = torch.softmax(model(input_ids=x).logits[0, -1].float() / temperature, -1)
        c = int(torch.multinomial(p, 1, generator=gen))
        if c == BOS:
            break
        out.append(c)
    return corpus.decode(out)


def prompt_of(line: str) -> str:
    k = line.find(" ", 8)
    k = k if 0 < k < len(line) - 1 else min(len(line) - 1, 8)
    return line[:k]


# ----------------------------------------------------------------------------------------- metrics
def srs(values: np.ndarray) -> np.ndarray:
    """SRS shares row by row (an all-zero row where nobody has a positive value)."""
    pos = np.clip(values, 0, None)
    tot = pos.sum(-1, keepdims=True)
    return np.divide(pos, tot, out=np.zeros_like(pos), where=tot > 0)


def compare(exact_phi: np.ndarray, est: np.ndarray) -> dict:
    from scipy.stats import kendalltau

    taus = np.array([kendalltau(a, b).statistic for a, b in zip(exact_phi, est, strict=True)])
    return {
        "tau_per_output": np.nan_to_num(taus).tolist(),
        "tau_mean": float(np.nanmean(taus)),
        "top_agree": float((exact_phi.argmax(1) == est.argmax(1)).mean()),
        "l1_mean": float(np.abs(srs(exact_phi) - srs(est)).sum(1).mean()),
        "corr": float(np.corrcoef(exact_phi.ravel(), est.ravel())[0, 1]),
        "rms_ratio": float(np.sqrt((est ** 2).mean() / (exact_phi ** 2).mean())),
    }
