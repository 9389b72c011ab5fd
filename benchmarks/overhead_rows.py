"""Issue 20's rows of the overhead table that need their own driver: the Hugging Face Trainer with
``DataValueCallback`` and DDP (torch.distributed, gloo, 2 processes on this machine).

Used by ``benchmarks/capture_overhead.py --extra trainer-1024 ddp-1024 ...``; not run on its own.
Both time blocks of plain and recorded optimizer steps, interleaved (plain, recorded, plain, ...)
in one process (the Trainer) or inside each rank (DDP), and report the median per-repetition ratio
of wall-clock time and of process CPU time (all of the process's threads: torch's, the writer's).

The model is the harness's GPT-2 (2 layers, d=128, vocab 2048, 64 tokens, global batch 16) with
AdamW, so these rows compare with the plain-loop rows of the same table.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VOCAB, SEQ, BATCH = 2048, 64, 16


def gpt2_model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=128, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg)


def summarise(plain: list[float], recorded: list[float], cpu: list[tuple[float, float]]) -> dict:
    """Median ms/step of each arm, median per-repetition ratios (wall and process CPU)."""
    return dict(plain_ms=statistics.median(plain) * 1e3, recorded_ms=statistics.median(recorded) * 1e3,
                ratio=statistics.median(r / p for r, p in zip(recorded, plain)),
                cpu_ratio=statistics.median(r / p for p, r in cpu),
                ratios=[r / p for r, p in zip(recorded, plain)])


# ------------------------------------------------------------------------------- Trainer
class _BlockTimer:
    """A TrainerCallback timing the steps after ``warm`` up to the end of ``train()`` (after every
    callback listed before it has run its ``on_train_end``: the recorder's final flush is charged)."""

    def __new__(cls, warm: int):
        import transformers

        class Timer(transformers.TrainerCallback):
            def __init__(self) -> None:
                self.warm, self.n, self.t0, self.c0 = warm, 0, None, None
                self.wall = self.cpu = float("nan")

            def on_step_end(self, args, state, control, **kw):
                self.n += 1
                if self.n == self.warm:
                    self.t0, self.c0 = time.perf_counter(), time.process_time()

            def on_train_end(self, args, state, control, **kw):
                steps = self.n - self.warm
                self.wall = (time.perf_counter() - self.t0) / steps
                self.cpu = (time.process_time() - self.c0) / steps

        return Timer()


def trainer_row(proj_dim: int, *, reps: int, steps: int, warm: int = 2, **cb_kw) -> dict:
    """``transformers.Trainer`` (AdamW, the Trainer's own token-mean loss on ``labels``, its default
    clipping ``max_grad_norm=1.0``) with and without ``DataValueCallback(proj_dim=...)``: each
    block is one ``train()`` of ``warm + steps`` steps on the same model, a fresh run directory per
    recorded block; the first ``warm`` steps of each block are not timed."""
    import datasets
    import transformers

    from datavalue.integrations.hf import DataValueCallback

    transformers.logging.set_verbosity_error()
    model = gpt2_model()
    ids = np.random.default_rng(0).integers(0, VOCAB, (BATCH * (steps + warm), SEQ))
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(),
                                     "sample_id": list(range(len(ids)))})

    def block(recorded: bool) -> tuple[float, float, int]:
        timer = _BlockTimer(warm)
        with tempfile.TemporaryDirectory() as d:
            args = transformers.TrainingArguments(
                d, per_device_train_batch_size=BATCH, max_steps=steps + warm, learning_rate=1e-4, save_strategy="no",
                report_to=[], logging_steps=10**6, remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
            cb = DataValueCallback(os.path.join(d, "run.zarr"), proj_dim=proj_dim, **cb_kw) if recorded else None
            trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                           data_collator=transformers.default_data_collator,
                                           callbacks=([cb] if cb else []) + [timer])
            trainer.train()
            k = cb.recorder.proj_dim if cb else 0
        return timer.wall, timer.cpu, k

    block(False)  # warm-up
    plain, recorded, cpu, k = [], [], [], 0
    for _ in range(reps):
        wp, cp, _ = block(False)
        wr, cr, k = block(True)
        plain.append(wp)
        recorded.append(wr)
        cpu.append((cp, cr))
    return dict(summarise(plain, recorded, cpu), k=k)


# ------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, proj_dim, reps: int, steps: int, threads: int,
                rec_kw: dict, profile: bool = False) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    import datavalue

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(gpt2_model())
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        local = BATCH // world
        ids = torch.randint(0, VOCAB, (local, SEQ), generator=torch.Generator().manual_seed(100 + rank))

        def loss():
            logits = ddp(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

        def block(n: int, rec=None, start: int = 0) -> tuple[float, float]:
            dist.barrier()  # both ranks start together; each times its own steps
            c0, t0 = time.process_time(), time.perf_counter()
            for i in range(n):
                if rec is None:
                    loss().backward()
                else:
                    first = (start + i) * BATCH + rank * local
                    with rec.step(sample_ids=range(first, first + local)):
                        loss().backward()
                opt.step()
                opt.zero_grad()
            if rec is not None:
                rec.flush()
            return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

        block(3)
        prof = None
        if profile:  # the recorded blocks only, cumulative time of datavalue's and torch.distributed's functions
            import cProfile

            prof = cProfile.Profile()
        plain, recorded, cpu, start, k = [], [], [], 0, 0
        for r in range(reps):
            wp, cp = block(steps)
            rec = datavalue.Recorder(os.path.join(out, f"run{r}.zarr"), ddp, proj_dim=proj_dim, optimizer=opt, **rec_kw)
            k = rec.proj_dim
            if prof is not None:
                prof.enable()
            wr, cr = block(steps, rec, start)
            if prof is not None:
                prof.disable()
            rec.close()
            start += steps
            plain.append(wp)
            recorded.append(wr)
            cpu.append((cp, cr))
        if prof is not None:
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats("datavalue|distributed", 30)
            Path(out, f"rank{rank}.prof.txt").write_text(text.getvalue())
        Path(out, f"rank{rank}.json").write_text(json.dumps(dict(plain=plain, recorded=recorded, cpu=cpu, k=k)))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # gloo's C++ teardown can abort a rank after the barrier (tests/capture/_ddp_worker.py)


def ddp_row(proj_dim, *, reps: int, steps: int, world: int = 2, threads: int = 1, profile: bool = False,
            **rec_kw) -> dict:
    """DDP with gloo, ``world`` processes of ``threads`` torch threads, global batch 16 split over the
    ranks; in each rank blocks of plain and recorded steps alternate (a fresh run per recorded block,
    rank 0 writes). Returns each rank's summary (``ranks``) and the worse rank's ratio."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(world, _free_port(), d, proj_dim, reps, steps, threads, rec_kw, profile),
                 nprocs=world, join=True)
        res = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]
        profiles = [Path(d, f"rank{r}.prof.txt").read_text() for r in range(world)] if profile else []
    ranks = [summarise(x["plain"], x["recorded"], [tuple(c) for c in x["cpu"]]) for x in res]
    return dict(ranks=ranks, k=res[0]["k"], profiles=profiles, ratio=max(x["ratio"] for x in ranks),
                cpu_ratio=max(x["cpu_ratio"] for x in ranks),
                plain_ms=statistics.median(x["plain_ms"] for x in ranks),
                recorded_ms=statistics.median(x["recorded_ms"] for x in ranks))
