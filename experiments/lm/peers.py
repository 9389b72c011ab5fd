"""Score an LM run export with the peer attribution libraries, side by side with datavalue.

Runs in the SEPARATE venv /work/peers-venv (never a datavalue dependency); see peers_README.md.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /work/peers-venv/bin/python experiments/lm/peers.py \
        --export runs/lm/<run>/export [--methods a,b,...] [--out runs/lm/<run>/peers]
    /work/peers-venv/bin/python experiments/lm/peers.py --make-toy DIR   # tiny export in the same format

Every method writes ``<out>/<method>.npz`` with ``sample_id`` (N,), ``scores`` (m_queries, N) and
``seconds``; ``<out>/peers.json`` collects versions, settings, notes and errors.

Sign convention of every ``scores`` matrix: HIGHER = the training sample HELPED the query (its
presence lowers the query loss, the summed token cross-entropy over the query's non -100 labels).
Each method's native sign is mapped to that convention in its ``run_*`` function (see ``SIGN`` notes
and peers_README.md for how each was checked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F

INIT_SEED: int | None = None
METHODS = ["grad_cosine", "kronfluence_ekfac", "bergson_trackstar", "bergson_ekfac",
           "dattri_llm_dvemb", "dattri_llm_adamw_influence"]


# ------------------------------------------------------------------------------------ export io
def _decays(name: str, p: torch.Tensor) -> bool:
    """The toy's (and experiments/lm/common.py's) weight-decay rule: matrices, not embeddings."""
    return p.dim() >= 2 and not any(t in name for t in ("wte", "wpe"))


def make_toy(out: str, seed: int = 0, N: int = 48, m: int = 6, L: int = 16, batch: int = 8, T: int = 24):
    """A tiny export in the run-export format: GPT-2 (V=64, d=32, 2 layers) trained ``T`` AdamW steps on
    random tokens.  Queries 0..m-1 are copies of planted training samples (one each), so the planted
    sample must come out on top with a POSITIVE score: that is the sign check."""
    from transformers import GPT2Config, GPT2LMHeadModel

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    V = 64
    ids = np.zeros((N, L), np.int64)
    lab = np.full((N, L), -100, np.int64)
    for i in range(N):
        n = int(rng.integers(L // 2, L + 1))
        t = rng.integers(1, V, size=n)
        t[0] = 0
        ids[i, :n] = t
        lab[i, :n] = t
    am = (lab != -100).astype(np.int64)
    sample_id = rng.permutation(np.arange(1000, 1000 + N)).astype(np.int64)
    planted_rows = rng.choice(N, size=m, replace=False)
    np.savez(outp / "train.npz", input_ids=ids, labels=lab, attention_mask=am, sample_id=sample_id)
    np.savez(outp / "queries.npz", input_ids=ids[planted_rows], labels=lab[planted_rows],
             attention_mask=am[planted_rows], sample_id=np.arange(m, dtype=np.int64))

    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.train()
    torch.save(model.state_dict(), outp / "initial_model.pt")
    opt = dict(kind="adamw", lr=3e-3, betas=[0.9, 0.999], eps=1e-8, wd=0.01, warmup=4, min_frac=0.1,
               max_grad_norm=1.0)
    named = list(model.named_parameters())
    groups = [[n for n, p in named if _decays(n, p)], [n for n, p in named if not _decays(n, p)]]
    pmap = dict(named)
    optim = torch.optim.AdamW([{"params": [pmap[n] for n in groups[0]], "weight_decay": opt["wd"]},
                               {"params": [pmap[n] for n in groups[1]], "weight_decay": 0.0}],
                              lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"])
    lrs = []
    for t in range(T):
        if t < opt["warmup"]:
            lrs.append(opt["lr"] * (t + 1) / opt["warmup"])
        else:
            p = (t - opt["warmup"]) / max(1, T - opt["warmup"] - 1)
            lo = opt["lr"] * opt["min_frac"]
            lrs.append(lo + 0.5 * (opt["lr"] - lo) * (1 + math.cos(math.pi * p)))
    steps, perm, pos = [], rng.permutation(N), 0
    for t in range(T):
        if pos + batch > N:
            perm, pos = rng.permutation(N), 0
        rows = np.sort(perm[pos:pos + batch])
        pos += batch
        x, y = torch.from_numpy(ids[rows]), torch.from_numpy(lab[rows])
        for g in optim.param_groups:
            g["lr"] = lrs[t]
        optim.zero_grad()
        nb = float((y[:, 1:] != -100).sum())
        loss = token_ce(model, x, y).sum() / nb
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt["max_grad_norm"])
        optim.step()
        steps.append({"step": t, "sample_ids": sample_id[rows].tolist(), "lr": [lrs[t], lrs[t]],
                      "loss": float(loss.detach())})
    torch.save(model.state_dict(), outp / "final_model.pt")
    torch.save(optim.state_dict(), outp / "optimizer_state.pt")
    (outp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    sched = {"optimizer": {"kind": "adamw", "betas": opt["betas"], "eps": opt["eps"],
                           "max_grad_norm": opt["max_grad_norm"],
                           "param_groups": [{"names": groups[0], "weight_decay": opt["wd"]},
                                            {"names": groups[1], "weight_decay": 0.0}],
                           "param_group_rule": "decay: p.dim()>=2 and not wte/wpe"},
             "loss": "sum over the batch of each sample's summed token CE, / the batch's label tokens",
             "steps": steps}
    (outp / "schedule.json").write_text(json.dumps(sched, indent=1))
    meta = {"toy": True, "planted": sample_id[planted_rows].tolist(),
            "planted_by_query": [[int(sample_id[r])] for r in planted_rows],
            "note": "query q is an exact copy of training sample planted_by_query[q]"}
    (outp / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"toy export written to {outp}: N={N} queries={m} steps={T}")


def load_npz(p: Path) -> dict[str, np.ndarray]:
    with np.load(p) as z:
        return {k: z[k] for k in z.files}


def load_schedule(d: Path, names: list[str]) -> dict:
    """Normalise schedule.json: ``steps`` = [{"sample_ids": [...], "lrs": [lr per group]}], ``groups`` =
    [(param names, weight_decay)], ``betas``, ``eps``, ``max_grad_norm``.  Tolerates a few spellings."""
    s = json.loads((d / "schedule.json").read_text())
    opt = s.get("optimizer") or s.get("opt") or {}
    raw = s.get("steps") or s.get("schedule") or s.get("batches")
    if raw is None:
        raise KeyError(f"schedule.json: no steps/schedule/batches key (keys: {list(s)})")
    steps = []
    for r in raw:
        if isinstance(r, dict):
            ids = r.get("sample_ids", r.get("ids", r.get("batch")))
            lr = r.get("lr", r.get("lrs"))
        else:
            ids, lr = r, None
        if lr is None and "lrs" in s:
            lr = s["lrs"][len(steps)]
        lr = [float(v) for v in lr] if isinstance(lr, (list, tuple)) else [float(lr)]
        steps.append({"sample_ids": [int(i) for i in ids], "lrs": lr})
    groups = None
    pg = opt.get("param_groups") or s.get("param_groups")
    if pg:
        groups = []
        for g in pg:
            if isinstance(g, dict):
                groups.append((list(g.get("names") or g.get("params")), float(g.get("weight_decay", 0.0))))
            else:
                groups.append((list(g), None))
    wd = opt.get("weight_decay", opt.get("wd", 0.0))
    if groups is None or any(w is None for _, w in groups):
        dec = [n for n in names if _decays_name(n)]
        groups = [(dec, float(wd)), ([n for n in names if n not in dec], 0.0)]
    kind = str(opt.get("kind") or s.get("torch_class") or "adamw").lower()
    return {"steps": steps, "groups": groups, "kind": "sgd" if "sgd" in kind else "adamw", "betas": tuple(opt.get("betas", (0.9, 0.999))),
            "eps": float(opt.get("eps", 1e-8)),
            "max_grad_norm": s.get("max_grad_norm", opt.get("max_grad_norm", opt.get("clip"))),
            "raw_optimizer": opt}


def _decays_name(n: str) -> bool:
    return n.endswith("weight") and not any(t in n for t in ("wte", "wpe", "ln_"))


class Export:
    def __init__(self, d: str):
        from transformers import GPT2Config

        self.dir = Path(d)
        self.cfg_dict = json.loads((self.dir / "config.json").read_text())
        self.cfg = GPT2Config(**self.cfg_dict)
        self.train = load_npz(self.dir / "train.npz")
        self.queries = load_npz(self.dir / "queries.npz")
        self.meta = json.loads((self.dir / "meta.json").read_text()) if (self.dir / "meta.json").exists() else {}
        self.sample_id = self.train["sample_id"].astype(np.int64)
        self.row_of = {int(s): i for i, s in enumerate(self.sample_id)}
        self.N, self.m = len(self.sample_id), len(self.queries["input_ids"])

    def model(self, which: str = "final_model.pt"):
        from transformers import GPT2LMHeadModel

        m = GPT2LMHeadModel(self.cfg)
        sd = torch.load(self.dir / which, map_location="cpu", weights_only=True)
        missing, unexpected = m.load_state_dict(sd, strict=False)
        bad = [k for k in missing if "lm_head" not in k]  # lm_head is tied to wte
        if bad or unexpected:
            raise RuntimeError(f"state_dict mismatch: missing {bad} unexpected {list(unexpected)}")
        return m.float().eval()

    def schedule(self) -> dict:
        names = [n for n, _ in self.model().named_parameters()]
        return load_schedule(self.dir, names)


def token_ce(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b,) summed shifted token cross-entropy per example (GPT-2's HF loss, summed not averaged)."""
    logits = model(input_ids=ids).logits[:, :-1]
    lab = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab.reshape(-1), ignore_index=-100,
                         reduction="none")
    return ce.view(ids.shape[0], -1).sum(1)


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a)).long()


class DictDS(torch.utils.data.Dataset):
    def __init__(self, d: dict, keys=("input_ids", "attention_mask", "labels")):
        self.d = {k: t64(d[k]) for k in keys}
        self.n = len(next(iter(self.d.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.d.items()}


# ------------------------------------------------------------------------------- the methods
def per_sample_grads(model, d: dict, params) -> torch.Tensor:
    ids, lab = t64(d["input_ids"]), t64(d["labels"])
    out = []
    for i in range(len(ids)):
        loss = token_ce(model, ids[i:i + 1], lab[i:i + 1]).sum()
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(gs, params)]))
    return torch.stack(out)


def run_grad_cosine(ex: Export, work: Path, info: dict) -> np.ndarray:
    """cos(grad query loss, grad train loss) at the final model over every parameter (summed token CE on
    both sides).  SIGN: positive cosine = a descent step on the train sample lowers the query loss to
    first order = helpful; kept as is."""
    model = ex.model()
    params = [p for p in model.parameters() if p.requires_grad]
    Gt = per_sample_grads(model, ex.train, params)
    Gq = per_sample_grads(model, ex.queries, params)
    Gt = Gt / Gt.norm(dim=1, keepdim=True).clamp_min(1e-30)
    Gq = Gq / Gq.norm(dim=1, keepdim=True).clamp_min(1e-30)
    info["settings"] = {"params": "all (tied wte/lm_head counted once)", "loss": "summed token CE"}
    return (Gq @ Gt.T).numpy()


def conv1d_to_linear(model):
    """Replace every transformers Conv1D (y = x W + b, W (in,out)) by an equivalent nn.Linear (weight =
    W^T): kronfluence only tracks nn.Linear / nn.Conv2d (TrackedModule.SUPPORTED_MODULES)."""
    from transformers.pytorch_utils import Conv1D

    for _name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, Conv1D):
                w = child.weight  # (in, out)
                lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(w.T)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(mod, cname, lin)
    return model


def block_module_names(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if n.startswith("transformer.h.") and n.split(".")[-1] in ("c_attn", "c_proj", "c_fc")]


def run_kronfluence_ekfac(ex: Export, work: Path, info: dict, batch: int = 16) -> np.ndarray:
    """kronfluence EK-FAC on the attention (c_attn, c_proj) and MLP (c_fc, c_proj) modules of every block.
    SIGN: kronfluence's pairwise score is g_query^T (G + lambda I)^-1 g_train; up-weighting a train sample
    by eps moves the query measurement by -eps * score, so positive = helpful: kept as is (checked on
    the toy export, where the copy of each query ranks first with a positive score)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    ref = ex.model()
    model = conv1d_to_linear(ex.model())
    x = t64(ex.queries["input_ids"][:4])
    with torch.no_grad():  # the swap is exact
        err = (ref(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    assert err < 1e-4, f"Conv1D->Linear changed the logits by {err}"
    names = block_module_names(model)

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
            lab = batch["labels"][:, 1:]
            flat = logits.reshape(-1, logits.shape[-1])
            if sample:  # true Fisher: labels sampled from the model's predictive distribution
                with torch.no_grad():
                    s = torch.multinomial(torch.softmax(flat.detach(), -1), 1).view(-1)
                    s = torch.where(lab.reshape(-1) == -100, torch.full_like(s, -100), s)
                return F.cross_entropy(flat, s, ignore_index=-100, reduction="sum")
            return F.cross_entropy(flat, lab.reshape(-1), ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = LMTask()
    model = prepare_model(model, task)
    an = Analyzer(analysis_name="peers", model=model, task=task, cpu=True, disable_tqdm=True,
                  output_dir=str(work / "kronfluence"))
    fargs = FactorArguments(strategy="ekfac", use_empirical_fisher=False,
                            amp_dtype=None, activation_covariance_dtype=torch.float32,
                            gradient_covariance_dtype=torch.float32, eigendecomposition_dtype=torch.float64,
                            lambda_dtype=torch.float32)
    sargs = ScoreArguments(damping_factor=None, score_dtype=torch.float32,
                           per_sample_gradient_dtype=torch.float32, precondition_dtype=torch.float32)
    train_ds, q_ds = DictDS(ex.train), DictDS(ex.queries)
    an.fit_all_factors("ekfac", dataset=train_ds, per_device_batch_size=batch, factor_args=fargs,
                       overwrite_output_dir=True)
    an.compute_pairwise_scores("pairwise", "ekfac", query_dataset=q_ds, train_dataset=train_ds,
                               per_device_query_batch_size=min(batch, ex.m), per_device_train_batch_size=batch,
                               score_args=sargs, overwrite_output_dir=True)
    sc = an.load_pairwise_scores("pairwise")["all_modules"]
    info["settings"] = {"modules": names, "strategy": "ekfac", "fisher": "true (sampled labels), fitted on "
                        "the training set", "damping": "kronfluence default (0.1 x mean eigenvalue)",
                        "conv1d": "GPT-2 Conv1D replaced by equal nn.Linear (weight transposed): kronfluence "
                        "wraps only nn.Linear/nn.Conv2d", "loss": "summed token CE (train and measurement)"}
    return sc.float().numpy()


# ----------------------------------------------------------------------------------- dattri-llm
def _dattri_common(ex: Export, work: Path):
    """Re-run the exported training trajectory under dattri-llm's capture: from initial_model.pt, the
    exported batches in order, the exported per-step lrs, AdamW(betas, eps) with the exported param
    groups, clipping at max_grad_norm, stepped loss = sum of the batch's summed token CE / its label
    tokens.  GradientStreamer shuffles its own loader and builds its own optimizer/scheduler from
    ``AttributionArguments``, so both are patched here to replay the export exactly."""
    from dattri_llm import AttributionArguments, AttributionTask, HookManagerConfig
    from dattri_llm.gradient import streaming

    sch = ex.schedule()
    if (ex.dir / "initial_model.pt").exists():
        model = ex.model("initial_model.pt").train()
    elif INIT_SEED is not None:  # torch.manual_seed(s); GPT2LMHeadModel(cfg), as experiments/lm/common.py
        from transformers import GPT2LMHeadModel

        torch.manual_seed(INIT_SEED)
        model = GPT2LMHeadModel(ex.cfg).float().train()
    else:
        raise FileNotFoundError("the export has no initial_model.pt: dattri-llm's DVEmb / AdamW influence "
                                "re-train the trajectory under capture and need the initial weights "
                                "(or pass --init-seed S to rebuild them, checked by the replay)")
    rows = [[ex.row_of[s] for s in st["sample_ids"]] for st in sch["steps"]]
    flat = [r for b in rows for r in b]
    # The streamer's dataset is the concatenation of the batches in step order; the batch sampler
    # hands it back one exported batch per step.
    tr = {k: ex.train[k][flat] for k in ("input_ids", "attention_mask", "labels")}
    bounds, pos = [], 0
    for b in rows:
        bounds.append(list(range(pos, pos + len(b))))
        pos += len(b)
    lrs = [st["lrs"] for st in sch["steps"]]
    pmap = dict(model.named_parameters())

    def make_opt_sched(self):
        groups = [{"params": [pmap[n] for n in names], "weight_decay": wd} for names, wd in sch["groups"]]
        if sch["kind"] == "sgd":  # plain SGD (momentum 0), as experiments/lm/common.py
            opt = torch.optim.SGD(groups, lr=lrs[0][0], momentum=0.0)
        else:
            opt = torch.optim.AdamW(groups, lr=lrs[0][0], betas=sch["betas"], eps=sch["eps"])

        class Sched:
            t = 0

            def __init__(self):
                self._set(0)

            def _set(self, t):
                if t < len(lrs):
                    for g, lr in zip(opt.param_groups, lrs[t] * len(opt.param_groups)):
                        g["lr"] = lr

            def step(self):
                Sched.t += 1
                self._set(Sched.t)

        return opt, Sched()

    orig_build = streaming.GradientStreamer._build_loader

    def build_loader(self):
        if not self.enable_update:
            return orig_build(self)
        return torch.utils.data.DataLoader(self._dataset, batch_sampler=bounds, num_workers=0)

    streaming.GradientStreamer._build_loader = build_loader
    streaming.GradientStreamer._create_optimizer_and_scheduler = make_opt_sched

    def train_loss(model, batch):
        ce = token_ce(model, batch["input_ids"], batch["labels"])
        nb = (batch["labels"][:, 1:] != -100).sum().clamp_min(1)
        return ce.sum() / nb

    def query_loss(model, batch):
        return token_ce(model, batch["input_ids"], batch["labels"]).sum()

    mg = sch["max_grad_norm"]
    args = AttributionArguments(output_dir=str(work), per_device_train_batch_size=max(len(b) for b in rows),
                                per_device_eval_batch_size=min(16, ex.m), use_cpu=True,
                                optim="sgd" if sch["kind"] == "sgd" else "adamw_torch",
                                learning_rate=lrs[0][0], adam_beta1=sch["betas"][0], adam_beta2=sch["betas"][1],
                                adam_epsilon=sch["eps"], max_grad_norm=(float(mg) if mg else None),
                                lr_scheduler_type="constant", seed=0)
    task = AttributionTask(train_loss, model, target_func=query_loss)
    # capture: the attention + MLP Conv1D modules of every block (untied; lm_head is tied to wte, whose
    # optimizer moments mix the embedding gradient, so it is left out, as are embeddings and LayerNorms)
    hook = HookManagerConfig(linear_io=[r"^transformer\.h\.\d+\.(attn|mlp)\.(c_attn|c_proj|c_fc)$"])
    step_lr = {t: float(row[0]) for t, row in enumerate(lrs)}
    restore = (orig_build,)
    return args, task, hook, DictDS(tr), DictDS(ex.queries), step_lr, sch, restore


def _replay_check(ex: Export, task, info: dict) -> None:
    """How far the replayed trajectory's theta_T is from the exported final_model.pt (float32 replay)."""
    ref = ex.model()
    got = dict(task.model.named_parameters())
    diff = max((got[n].detach().float() - p.detach()).abs().max().item() for n, p in ref.named_parameters())
    scale = max(p.detach().abs().max().item() for p in ref.parameters())
    info["replay_max_abs_diff_vs_final_model"] = diff
    info["final_model_max_abs_param"] = scale


def _dattri_to_matrix(ex: Export, score) -> np.ndarray:
    """AttributionScore rows are training-sample content hashes (summed over the steps each sample was
    used at, ``agnostic_matrix``), columns the query hashes: map both back to rows / query order."""
    from dattri_llm import hash_sample

    hashes, mat = score.agnostic_matrix()
    mat = mat.float().cpu().numpy()  # (n_train_rows, n_test)
    test_ids = list(score.test_ids) if hasattr(score, "test_ids") else None
    tr_hash = [hash_sample({"input_ids": t64(r)}) for r in ex.train["input_ids"]]
    q_hash = [hash_sample({"input_ids": t64(r)}) for r in ex.queries["input_ids"]]
    out = np.zeros((ex.m, ex.N), np.float64)
    pos = {h: i for i, h in enumerate(hashes)}
    cols = test_ids if test_ids is not None else None
    if cols is None:
        raise RuntimeError("AttributionScore has no test_ids")
    cpos = {h: j for j, h in enumerate(cols)}
    missing_q = [q for q, h in enumerate(q_hash) if h not in cpos]
    if missing_q:
        raise RuntimeError(f"queries {missing_q} not found among the score's test hashes")
    for i, h in enumerate(tr_hash):
        if h in pos:  # a sample never used in the schedule has no row: score 0
            out[:, i] = mat[pos[h], [cpos[h2] for h2 in q_hash]]
    return out


def run_dattri_llm_dvemb(ex: Export, work: Path, info: dict) -> np.ndarray:
    """dattri-llm DVEmb (basic estimator, exact Fisher-product propagation), propagated on the test side
    (matrix-free).  SIGN: DVEmb(z) = eta_t g_query(theta_T)^T prod(I - eta H) g_train(theta_t) is the
    first-order DROP of the query loss the step on z causes: positive = helpful, kept as is (toy check)."""
    from dattri_llm import DVEmbAttributor

    args, task, hook, tr, q, step_lr, sch, _ = _dattri_common(ex, work)
    att = DVEmbAttributor(args, task=task)
    score = att.attribute(tr, q, hook_config=hook, gradient_cache_residency="memory", propagation="test",
                          hessian_mode="full", loss_reduction="mean", learning_rate=step_lr)
    info["settings"] = {"propagation": "test", "hessian_mode": "full", "loss_reduction": "mean",
                        "learning_rate": "per-step lr of group 0 from schedule.json",
                        "captured": "attention + MLP Conv1D of every block", "steps": len(step_lr)}
    _replay_check(ex, task, info)
    return _dattri_to_matrix(ex, score)


def run_dattri_llm_adamw_influence(ex: Export, work: Path, info: dict) -> np.ndarray:
    """dattri-llm AdamW influence (Z_push of down-weighting z at its step, carried through the per-step
    AdamW Jacobians to theta_T), propagated on the test side.  SIGN: the library's score is the paper's
    ``-grad(z')^T W Z_push(z)`` with Z_push the state response to REMOVING z, i.e. minus the query-loss
    change on removal = the change on up-weighting: NEGATIVE = helpful.  Negated here (toy check: the
    library's raw score gives every query's own copy the lowest score, AUC 0; negated, AUC 1)."""
    from dattri_llm import AdamWInfluenceAttributor

    if ex.schedule()["kind"] != "adamw":
        raise ValueError("the run was not trained with AdamW: AdamW influence does not apply")
    args, task, hook, tr, q, step_lr, sch, _ = _dattri_common(ex, work)
    att = AdamWInfluenceAttributor(args, task=task)
    score = att.attribute(tr, q, hook_config=hook, loss_reduction="mean", propagation="test")
    info["settings"] = {"propagation": "test", "loss_reduction": "mean",
                        "captured": "attention + MLP Conv1D of every block", "steps": len(step_lr),
                        "sign": "library score negated"}
    _replay_check(ex, task, info)
    return -_dattri_to_matrix(ex, score)


# --------------------------------------------------------------------------------------- bergson
def _bergson_inputs(ex: Export, work: Path) -> tuple[str, str, str]:
    """bergson runs from a model directory and HF datasets on disk: write the final model with
    save_pretrained, a WordLevel tokenizer over the token ids (bergson loads one; the data are already
    tokenised, so it is only consulted for the model's max length), and train / query sets as
    DatasetDicts with pre-tokenised ``input_ids`` + ``labels`` (padding stripped via attention_mask)."""
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    mdir = work / "model"
    model = ex.model()
    model.save_pretrained(mdir)
    V = ex.cfg.vocab_size
    tk = Tokenizer(WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0",
                            model_max_length=ex.cfg.n_positions).save_pretrained(mdir)

    def dsave(d: dict, name: str) -> str:
        rows = {"input_ids": [], "labels": []}
        for ids, lab, am in zip(d["input_ids"], d["labels"], d["attention_mask"]):
            n = int(am.sum()) if am.sum() > 0 else len(ids)
            rows["input_ids"].append(ids[:n].tolist())
            rows["labels"].append(lab[:n].tolist())
        path = str(work / name)
        DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(path)
        return path

    return str(mdir), dsave(ex.train, "train_ds"), dsave(ex.queries, "query_ds")


def _bergson_scores(path: str, ex: Export) -> np.ndarray:
    from bergson.data import load_scores

    sc = load_scores(Path(path))
    arr = np.asarray(sc[:], dtype=np.float64)  # (N train rows, num_scores = queries)
    assert arr.shape == (ex.N, ex.m), (arr.shape, ex.N, ex.m)
    return arr.T


def _block_modules(ex: Export) -> list[str]:
    # bergson hooks modules of model.base_model (the GPT2Model): names without "transformer."
    return [n[len("transformer."):] for n in block_module_names(ex.model())]


def run_bergson_trackstar(ex: Export, work: Path, info: dict, proj: int = 16) -> np.ndarray:
    """bergson's TrackStar pipeline (cli/trackstar.py): autocorrelation (second-moment) Hessians of the
    projected per-example gradients on the training set and on the queries, mixed; the preconditioned
    gradients unit-normalised (cosine) on both sides; per-query scores ("individual").
    SIGN: bergson writes higher_is_better=True for TrackStar (a positive score is a proponent: the
    gradients are aligned, a step on the sample lowers the query loss): kept as is (toy check)."""
    from bergson.cli.trackstar import trackstar
    from bergson.config.config import (
        DataConfig,
        PreprocessConfig,
        QuerySetConfig,
        ScoreConfig,
        TrackstarConfig,
        TrackstarIndexConfig,
    )

    mdir, tr, qd = _bergson_inputs(ex, work)
    mods = _block_modules(ex)
    icfg = TrackstarIndexConfig(run_path=str(work / "run"), model=mdir, tokenizer=mdir, precision="fp32",
                                data=DataConfig(dataset=tr, split="train"), projection_dim=proj,
                                loss_reduction="sum", modules=mods, token_batch_size=ex.cfg.n_positions)
    tcfg = TrackstarConfig(query=QuerySetConfig(dataset=qd, split="train", aggregation="none"),
                           preprocess_cfg=PreprocessConfig(unit_normalize=True),
                           score_cfg=ScoreConfig(score="individual", precision="fp32"),
                           stats_sample_size=None)
    trackstar(icfg, tcfg)
    info["settings"] = {"projection_dim_per_module": proj, "modules": mods, "unit_normalize": True,
                        "mix_hessians": True, "target_downweight_components": tcfg.target_downweight_components,
                        "loss": "summed token CE (loss_reduction=sum)", "score": "individual (per query)"}
    return _bergson_scores(str(work / "run" / "scores"), ex)


def run_bergson_ekfac(ex: Export, work: Path, info: dict) -> np.ndarray:
    """bergson's EK-FAC pipeline (hessians/pipeline.py): K-FAC factors with eigenvalue correction fitted
    on the training set, applied to the (unprojected) query gradients, scored per query.
    SIGN: higher_is_better=True (g_query^T H^-1 g_train, positive = proponent): kept (toy check)."""
    from bergson.config.config import (
        DataConfig,
        HessianConfig,
        HessianPipelineConfig,
        IndexConfig,
        PreprocessConfig,
        QuerySetConfig,
        ScoreConfig,
    )
    from bergson.hessians.pipeline import hessian_pipeline

    mdir, tr, qd = _bergson_inputs(ex, work)
    mods = _block_modules(ex)
    icfg = IndexConfig(run_path=str(work / "run"), model=mdir, tokenizer=mdir, precision="fp32",
                       data=DataConfig(dataset=tr, split="train"), projection_dim=0, loss_reduction="sum",
                       modules=mods, token_batch_size=ex.cfg.n_positions)
    hcfg = HessianConfig(method="kfac", ev_correction=True, hessian_dtype="fp32")
    pcfg = HessianPipelineConfig(query=QuerySetConfig(dataset=qd, split="train", aggregation="none"))
    hessian_pipeline(icfg, hcfg, ScoreConfig(score="individual", precision="fp32"), PreprocessConfig(), pcfg)
    info["settings"] = {"method": "kfac + ev_correction (EK-FAC)", "modules": mods, "projection_dim": 0,
                        "loss": "summed token CE", "query aggregation": "none (per query)"}
    return _bergson_scores(str(work / "run" / "scores"), ex)


RUNNERS = {"grad_cosine": run_grad_cosine, "kronfluence_ekfac": run_kronfluence_ekfac,
           "dattri_llm_dvemb": run_dattri_llm_dvemb,
           "bergson_trackstar": run_bergson_trackstar, "bergson_ekfac": run_bergson_ekfac, "dattri_llm_adamw_influence": run_dattri_llm_adamw_influence}


# ------------------------------------------------------------------------------------ evaluation
def planted_sets(ex: Export) -> list[set[int]] | None:
    """Per-query positive sample ids from meta.json: ``planted_by_query`` (list per query) or ``planted``
    (a dict query -> ids, a list of lists, or a flat list that counts for every query)."""
    meta = ex.meta
    p = meta.get("planted_by_query", meta.get("planted"))
    if p is None:
        return None
    if isinstance(p, dict):
        return [set(int(v) for v in (p.get(str(q)) or p.get(q) or [])) for q in range(ex.m)]
    if len(p) and isinstance(p[0], (list, tuple)):
        return [set(int(v) for v in s) for s in p]
    return [set(int(v) for v in p)] * ex.m


def auc(scores: np.ndarray, pos: np.ndarray) -> float:
    from scipy.stats import rankdata

    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def evaluate_loo(ex: Export, S: np.ndarray) -> dict | None:
    """meta ``loo_removals`` [(step, sample_id)] and ``loo_truth`` (m, n) = loss(without) - loss(with)
    (positive = helped, the same convention as the scores): mean over queries of the Spearman
    correlation between a sample's score and the truth of removing one of its occurrences (all / the
    first half of the removals = early steps / the second half = late)."""
    from scipy.stats import spearmanr

    rem, truth = ex.meta.get("loo_removals"), ex.meta.get("loo_truth")
    if not rem or truth is None:
        return None
    truth = np.asarray(truth, np.float64)
    cols = np.array([ex.row_of[int(sid)] for _, sid in rem])
    est = S[:, cols]
    half = len(rem) // 2

    def rho(sl):
        v = [spearmanr(est[q, sl], truth[q, sl])[0] for q in range(truth.shape[0])]
        return float(np.nanmean(v))

    return {"loo_spearman": rho(slice(None)), "loo_spearman_early": rho(slice(0, half)),
            "loo_spearman_late": rho(slice(half, None))}


def evaluate(ex: Export, S: np.ndarray, ks=(1, 5, 10, 20)) -> dict | None:
    sets = planted_sets(ex)
    if not sets or not any(sets):
        return evaluate_loo(ex, S)
    out = {f"recall@{k}": [] for k in ks}
    out["auc"], out["mean_planted_score_sign"] = [], []
    for q, pset in enumerate(sets):
        if not pset:
            continue
        pos = np.isin(ex.sample_id, list(pset))
        order = np.argsort(-S[q], kind="stable")
        for k in ks:
            out[f"recall@{k}"].append(float(pos[order[:k]].sum() / pos.sum()))
        out["auc"].append(auc(S[q], pos))
        out["mean_planted_score_sign"].append(float(np.sign(S[q][pos]).mean()))
    res = {k: float(np.nanmean(v)) if v else float("nan") for k, v in out.items()}
    res.update(evaluate_loo(ex, S) or {})
    # decoys (meta["decoys"] = {group: ids}): AUC of planted vs that group, and its share of the top-|planted|
    for g, ids in (ex.meta.get("decoys") or {}).items():
        dec = np.isin(ex.sample_id, [int(i) for i in ids])
        a, top = [], []
        for q, pset in enumerate(sets):
            pos = np.isin(ex.sample_id, list(pset))
            if pos.any() and dec.any():
                keep = pos | dec
                a.append(auc(S[q][keep], pos[keep]))
                top.append(float(dec[np.argsort(-S[q], kind="stable")[:pos.sum()]].mean()))
        if a:
            res[f"auc_planted_vs_{g}"] = float(np.mean(a))
            res[f"{g}_share_of_top{int(pos.sum())}"] = float(np.mean(top))
    return res


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for p in ("torch", "transformers", "kronfluence", "bergson", "dattri-llm", "dattri", "datasets", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", help="run export dir (runs/lm/<run>/export)")
    ap.add_argument("--out", help="output dir (default: <export>/../peers)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--make-toy", metavar="DIR", help="write a tiny export to DIR and exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-seed", type=int, default=None,
                    help="no initial_model.pt: rebuild the initial weights as torch.manual_seed(S); "
                         "GPT2LMHeadModel(cfg) (dattri-llm methods; peers.json records how far the replay "
                         "lands from final_model.pt)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    global INIT_SEED
    INIT_SEED = a.init_seed
    if a.make_toy:
        make_toy(a.make_toy)
        return
    if not a.export:
        ap.error("--export or --make-toy")
    ex = Export(a.export)
    out = Path(a.out) if a.out else Path(a.export).resolve().parent / "peers"
    out.mkdir(parents=True, exist_ok=True)
    pj = out / "peers.json"
    summary = json.loads(pj.read_text()) if pj.exists() else {}
    summary.update({"export": str(Path(a.export).resolve()), "versions": versions(), "N": ex.N, "m": ex.m,
                    "dtype": "float32", "device": "cpu",
                    "sign_convention": "higher = the training sample helped the query (lowered its summed "
                                       "token cross-entropy)"})
    summary.setdefault("methods", {})
    for name in a.methods.split(","):
        name = name.strip()
        info: dict = {}
        work = Path(tempfile.mkdtemp(prefix=f"peers_{name}_"))
        t0 = time.time()
        try:
            S = np.asarray(RUNNERS[name](ex, work, info), np.float64)
            secs = time.time() - t0
            assert S.shape == (ex.m, ex.N), S.shape
            np.savez(out / f"{name}.npz", sample_id=ex.sample_id, scores=S, seconds=np.float64(secs))
            info.update({"ok": True, "seconds": secs, "finite": bool(np.isfinite(S).all())})
            ev = evaluate(ex, S)
            if ev is not None:
                info["planted"] = ev
            print(f"[{name}] {secs:.1f}s " + (" ".join(f"{k}={v:.3f}" for k, v in ev.items()) if ev else ""),
                  flush=True)
        except Exception as e:  # recorded, not fatal: the other peers still run
            info.update({"ok": False, "seconds": time.time() - t0, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()[-4000:]})
            print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        summary["methods"][name] = info
        pj.write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
