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


# ----------------------------------------------------------------------------------- the LOO study's set-up
class Study:
    """One LOO run of ``run.py`` (``FULL["loo"]``, e.g. ``"small-adamw"``) set up as ``run.loo_study`` does: data,
    model factory (float64), batches, schedule, ``train_reference`` config and the query loss. The one place the
    side studies (``clip_direction``, ``sketch_decomposition``, ``adjoint_decomposition``, ``replay_check``) take
    it from.

    ``eager``: the eager attention (double backward on CPU); ``n_query``: the first held-out lines only."""

    def __init__(self, name: str = "small-adamw", *, n_query: int | None = None, eager: bool = False,
                 quick: bool = False):
        import run as R  # the study's driver (imports this module: imported here, not at the top)

        from datavalue.testing import AdamConfig, Batch, SGDConfig

        self.cfg = R.QUICK if quick else R.FULL
        spec = {s[0]: s for s in self.cfg["loo"]}[name]
        self.name, self.arch, self.opt_cfg, self.n_train, self.B, self.T, self.ks = spec
        self.data = R.Data(self.cfg["L"])
        self.test_lines = self.data.lines[: self.cfg["n_test"]][:n_query]
        self.train_lines = self.data.lines[100: 100 + self.n_train]
        tr, te = self.data.enc(self.train_lines), self.data.enc(self.test_lines)
        self.X, self.Y = tr["input_ids"], tr["labels"]
        self.Xte, self.Yte = te["input_ids"], te["labels"]
        self.conf = make_config(self.data.V, self.data.L, **self.arch)
        if eager:
            self.conf._attn_implementation = "eager"  # double backward on CPU
        self.factory = make_factory(self.conf, seed=0, double=True)
        self.P = n_params(self.factory())
        self.batch_ids = epoch_batches(np.arange(self.n_train), self.B, self.T, np.random.default_rng(1))
        self.batches = [Batch(b, self.X[b], (self.Y[b], float(n_tokens(self.Y[b]).sum()))) for b in self.batch_ids]
        self.lrs = lr_schedule(self.T, self.opt_cfg)
        o = self.opt_cfg
        self.adam = o["kind"] == "adamw"
        self.lrs2 = np.stack([self.lrs, self.lrs], 1) if self.adam else self.lrs
        self.rcfg = (AdamConfig(kind="adamw", betas=o["betas"], eps=o["eps"], weight_decay=o["wd"],
                                max_grad_norm=o["clip"], reduction="sum") if self.adam
                     else SGDConfig(max_grad_norm=o["clip"], reduction="sum"))

    def test_loss(self, model) -> torch.Tensor:
        """``(m,)`` the query losses: each held-out line's summed token CE."""
        return token_ce(model, self.Xte, self.Yte)

    def train(self, rec=None, **kw):
        """``train_reference`` of the run (a fresh model and optimizer, or ``model=``/``optimizer=`` in ``kw``),
        stepping ``rec`` (a ``Recorder``) when given."""
        from datavalue.testing import train_reference

        if "model" not in kw:
            kw["model"] = self.factory()
            kw["optimizer"] = make_optimizer(kw["model"], self.opt_cfg)
        if rec is not None:
            kw["step_context"] = lambda t, b, lr: rec.step(
                sample_ids=b.sample_ids, tokens=n_tokens(b.targets[0]),
                fisher_mask=label_mask(b.targets[0]) if rec.fisher else None)
        return train_reference(self.factory, self.batches, self.lrs2, step_loss_fn, config=self.rcfg, **kw)

    def record(self, path, k: int | None, *, curvature: str | None = "fisher", fisher_draw: int = 0, **rec_kw):
        """A ``Recorder(path, model, proj_dim=k, optimizer=opt, loss_reduction="token_mean")`` recording of the run;
        returns ``(ref, model, proj_dim)``. ``fisher_draw`` > 0: other sampled Fisher labels, same sketch (reseeds the
        recorder's label generator, a private attribute: there is no public option for it)."""
        import datavalue

        model = self.factory()
        opt = make_optimizer(model, self.opt_cfg)
        verify = rec_kw.pop("verify", True)
        with datavalue.Recorder(path, model, proj_dim=k, seed=0, optimizer=opt, loss_reduction="token_mean",
                                curvature=curvature, overwrite=True, **rec_kw) as rec:
            if fisher_draw:
                rec._fisher_gen.manual_seed(1000 + int(fisher_draw))
            ref = self.train(rec, model=model, optimizer=opt, verify=verify)
        return ref, model, int(rec.proj_dim)

    def rows(self, ref, removals: list[tuple[int, int]]) -> np.ndarray:
        """The occurrence index (``ref.occurrences()`` order, the scores' columns) of each removal."""
        steps, sids = ref.occurrences()
        where = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(steps, sids))}
        return np.array([where[r] for r in removals])

    def ctx(self, path, model):
        """``methods.Ctx`` of a recording of this run (``model`` at its final weights)."""
        import methods

        X, Y = self.X, self.Y
        return methods.Ctx(str(path), model.eval(), self.test_loss, lambda m, ids: token_ce(m, X[ids], Y[ids]),
                           lambda ids: n_tokens(Y[ids]), by=None, final_batches=self.batch_ids,
                           train_mask=lambda ids: label_mask(Y[ids]))

    def removals(self, ref) -> list[tuple[int, int]]:
        """The study's removals: half early (first third of the steps), half late (last third), seed 2."""
        steps, sids = ref.occurrences()
        rng = np.random.default_rng(2)
        T = self.T
        early = np.flatnonzero(steps < T // 3)
        late = np.flatnonzero(steps >= T - T // 3)
        rows = np.concatenate([np.sort(rng.choice(early, self.cfg["n_early"], replace=False)),
                               np.sort(rng.choice(late, self.cfg["n_late"], replace=False))])
        return [(int(steps[r]), int(sids[r])) for r in rows]

    def truth(self, ref, export: str | Path | None) -> tuple[list[tuple[int, int]], np.ndarray]:
        """``(removals, truth)``, ``truth`` the exact trajectory LOO ``(n_removals, n_query)``: read from the study's
        export (``<export>/meta.json``, written by ``run.py``) when it is there, else computed with
        ``datavalue.testing.trajectory_loo`` on ``ref`` (about 75 s for small-adamw) and, with ``export``, saved there
        (``meta.json`` with ``loo_removals`` and ``loo_truth`` only) for the next run."""
        import json

        from datavalue.testing import trajectory_loo

        rem = self.removals(ref)
        meta = Path(export) / "meta.json" if export else None
        if meta is not None and meta.exists():
            m = json.loads(meta.read_text())
            if [tuple(r) for r in m["loo_removals"]] != rem:
                raise ValueError(f"{meta}: not this study's removals")
            return rem, np.asarray(m["loo_truth"], np.float64).T[:, : len(self.test_lines)]
        truth = trajectory_loo(ref, rem, self.test_loss)
        if meta is not None:
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"study": "loo", "loo_removals": rem, "loo_truth": truth.T.tolist()}))
        return rem, truth

    def replay_inputs(self, order=None):
        """What the adjoint passes (``adjoint_decomposition``, ``sketch_decomposition``) read from the float64 reference
        run (a snapshot before every step), flat over the coordinates: per step ``t`` AdamW's moments after it
        (``Mm``, ``Vv``, ``(T, P)``), the per-sample gradients of the stepped loss at its weights (``per[t]``,
        ``(B, P)``), the clipped batch gradient the optimizer used (``G``), and the held-out lines' gradients at the
        final weights (``gte``). Coordinates in the optimizer's order, or permuted by ``order(work, names, sizes) ->
        perm``. Returns a namespace with those and ``ref``, ``model``, ``opt``, ``final_opt``, ``names``, ``sizes``,
        ``tp`` (the parameters of ``work``, the model the gradients are taken on), ``wd`` (per coordinate), ``P``,
        ``flat``/``unflat`` (tensors <-> flat vectors) and ``grad_of`` (loss -> flat gradient)."""
        import types

        model = self.factory()
        opt = make_optimizer(model, self.opt_cfg)
        ref = self.train(model=model, optimizer=opt, snapshot_every=1, verify=False)
        final_opt = opt.state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]
        name_of = {id(p): n for n, p in model.named_parameters()}
        names = [name_of[id(p)] for p in params]
        wd = np.concatenate([np.full(p.numel(), g["weight_decay"]) for g in opt.param_groups for p in g["params"]])
        P = wd.size
        work = self.factory()
        wp = dict(work.named_parameters())
        tp = [wp[n] for n in names]
        sizes = [p.numel() for p in tp]
        perm = np.arange(P) if order is None else np.asarray(order(work, names, sizes))
        inv = np.empty_like(perm)
        inv[perm] = np.arange(P)

        def flat(gs):
            return np.concatenate([g.reshape(-1).numpy() for g in gs])[perm]

        def unflat(v):
            v = v[inv]
            return [torch.as_tensor(x).view(p.shape) for x, p in zip(np.split(v, np.cumsum(sizes)[:-1]), tp)]

        def grad_of(loss):
            return flat(torch.autograd.grad(loss, tp))

        def flat_state(sd, key):
            return np.concatenate([sd["state"][i][key].reshape(-1).numpy() for i in range(len(params))])[perm]

        T, X, Y = self.T, torch.as_tensor(self.X), torch.as_tensor(self.Y)
        Mm, Vv, G, per = np.zeros((T, P)), np.zeros((T, P)), np.zeros((T, P)), {}
        for t in range(T):
            sd = ref.snapshots[t + 1].optim if t + 1 < T else final_opt
            Mm[t], Vv[t] = flat_state(sd, "exp_avg"), flat_state(sd, "exp_avg_sq")
            work.load_state_dict(ref.snapshots[t].model)
            b = self.batches[t]
            per[t] = np.stack([grad_of(step_loss_fn(work, X[[s]], (Y[[s]], b.targets[1]))[0]) for s in b.sample_ids])
            G[t] = ref.grad_scales[t] * per[t].sum(0)
        work.load_state_dict(ref.final_state)
        Xte, Yte = torch.as_tensor(self.Xte), torch.as_tensor(self.Yte)
        gte = np.stack([grad_of(token_ce(work, Xte[[j]], Yte[[j]])[0]) for j in range(len(self.test_lines))])
        return types.SimpleNamespace(ref=ref, model=model, opt=opt, final_opt=final_opt, names=names, sizes=sizes,
                                     work=work, tp=tp, wd=wd[perm], P=P, perm=perm, flat=flat, unflat=unflat,
                                     grad_of=grad_of, Mm=Mm, Vv=Vv, G=G, per=per, gte=gte)
