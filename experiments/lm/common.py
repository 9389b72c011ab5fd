"""Shared pieces of the LM study: data (chatterbot-corpus lines, char-level), GPT-2 models from a
config, the token losses, the optimizer as LMs use it, and batch schedules.

Convention (what ``transformers.Trainer`` steps on): the stepped loss of a batch is the token mean
over the batch, ``sum_z CE_sum(z) / N_B`` with ``CE_sum(z)`` the summed shifted token cross-entropy
of example ``z`` and ``N_B`` the batch's label tokens (``num_items_in_batch``). On a removal the
denominator ``N_B`` is kept.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BOS = 0  # id 0: begin / end of line and padding (padding carries label -100)


# ----------------------------------------------------------------------------------------- data
def load_lines() -> list[str]:
    """Every line of the chatterbot-corpus English conversations, in file order."""
    import chatterbot_corpus
    import yaml

    base = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    lines = []
    for f in sorted(glob.glob(str(base / "*.yml"))):
        with open(f, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        for conv in doc.get("conversations", []) or []:
            lines += [str(s).strip() for s in conv if s is not None]
    return lines


def vocab_of(lines: list[str], extra: str = "") -> dict[str, int]:
    chars = sorted(set("".join(lines)) | set(extra))
    return {c: i + 1 for i, c in enumerate(chars)}


def encode(lines: list[str], stoi: dict[str, int], L: int) -> dict[str, np.ndarray]:
    """``[BOS] + chars + [BOS]`` right-padded to ``L``; labels = ids, -100 on padding."""
    N = len(lines)
    ids = np.zeros((N, L), np.int64)
    lab = np.full((N, L), -100, np.int64)
    for i, s in enumerate(lines):
        t = [BOS] + [stoi[c] for c in s] + [BOS]
        t = t[:L]
        ids[i, : len(t)] = t
        lab[i, : len(t)] = t
    return {"input_ids": ids, "labels": lab, "attention_mask": (lab != -100).astype(np.int64)}


def clean_lines(max_chars: int, min_chars: int = 8) -> list[str]:
    """Unique lines of ``min_chars..max_chars`` characters (order of the corpus)."""
    seen, out = set(), []
    for s in load_lines():
        if min_chars <= len(s) <= max_chars and s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------- model
def make_config(V: int, L: int, d: int, n_layer: int, n_head: int):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=V, n_positions=L, n_embd=d, n_layer=n_layer, n_head=n_head, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=BOS)


def make_factory(conf, seed: int = 0, double: bool = True):
    from transformers import GPT2LMHeadModel

    def factory():
        torch.manual_seed(seed)
        m = GPT2LMHeadModel(conf)
        if double:
            m = m.double()
        m.train()
        return m

    return factory


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- losses
def token_ce(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(b,)`` summed shifted token cross-entropy of each example (HF GPT-2's loss, not averaged)."""
    logits = model(input_ids=ids).logits[:, :-1]
    lab = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="none")
    return ce.view(ids.shape[0], -1).sum(1)


def n_tokens(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Label tokens per example, counted as the Trainer does (shifted labels != -100)."""
    lab = labels[:, 1:]
    lab = lab.numpy() if torch.is_tensor(lab) else lab
    return (lab != -100).sum(1).astype(np.float64)


def label_mask(labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(b, L)`` bool: the logits positions whose prediction enters the loss (HF causal-LM shift), for the
    Fisher pseudo-gradients (``fisher_mask`` / ``label_mask``)."""
    lab = torch.as_tensor(labels)[:, 1:] != -100
    return F.pad(lab, (0, 1))


def step_loss_fn(model, inputs, targets) -> torch.Tensor:
    """``train_reference`` loss (reduction ``"sum"``): each example's summed token CE over the batch's
    label tokens; ``targets = (labels, N_B)`` with ``N_B`` fixed for the step (kept on removal)."""
    labels, denom = targets
    return token_ce(model, inputs, labels) / denom


# ------------------------------------------------------------------------------------- optimizer
NO_DECAY = ("bias", "ln_", "ln_f", "wte", "wpe")


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay on matrices only (not biases, LayerNorm, embeddings)."""
    return p.dim() >= 2 and not any(t in name for t in ("wte", "wpe"))


def param_groups(model, wd: float) -> list[dict]:
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": wd},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


def group_names(model) -> list[list[str]]:
    named = list(model.named_parameters())
    return [[n for n, p in named if decays(n, p)], [n for n, p in named if not decays(n, p)]]


def make_optimizer(model, opt: dict) -> torch.optim.Optimizer:
    if opt["kind"] == "adamw":
        return torch.optim.AdamW(param_groups(model, opt["wd"]), lr=opt["lr"], betas=tuple(opt["betas"]),
                                 eps=opt["eps"])
    return torch.optim.SGD(model.parameters(), lr=opt["lr"], momentum=0.0)


def lr_schedule(T: int, opt: dict) -> np.ndarray:
    """Linear warm-up then cosine decay to ``min_frac`` x peak (LM practice)."""
    peak, wu, lo = opt["lr"], opt["warmup"], opt["lr"] * opt["min_frac"]
    out = np.empty(T)
    for t in range(T):
        if t < wu:
            out[t] = peak * (t + 1) / wu
        else:
            p = (t - wu) / max(1, T - wu - 1)
            out[t] = lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * p))
    return out


# ---------------------------------------------------------------------------------------- batches
def epoch_batches(ids: np.ndarray, batch: int, T: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``T`` batches drawn epoch by epoch (a fresh permutation of ``ids`` each epoch)."""
    out, perm, pos = [], rng.permutation(ids), 0
    while len(out) < T:
        if pos + batch > len(perm):
            perm, pos = rng.permutation(ids), 0
        out.append(np.sort(perm[pos: pos + batch]))
        pos += batch
    return out
