"""Overhead of DataValueCallback against a plain transformers.Trainer run (same process, interleaved).

A small GPT-2 from a config (4 layers, d=256, vocab 4096), 64-token sequences, batch 16, 30 optimizer
steps per run, proj_dim 1024. Prints and writes a markdown table (append it to docs/results/capture.md).
Run: ``python benchmarks/hf_overhead.py [--cpu]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def run_once(cb_path, use_cpu, steps):
    import datasets
    import transformers

    from datavalue.integrations.hf import DataValueCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=4096, n_positions=64, n_embd=256, n_layer=4, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, (16 * steps, 64))
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(),
                                     "sample_id": list(range(len(ids)))})
    with tempfile.TemporaryDirectory() as d:
        args = transformers.TrainingArguments(d, per_device_train_batch_size=16, max_steps=steps, learning_rate=1e-4,
                                              save_strategy="no", report_to=[], logging_steps=1000,
                                              remove_unused_columns=False, use_cpu=use_cpu, disable_tqdm=True)
        cbs = [DataValueCallback(os.path.join(d, "run.zarr"), proj_dim=1024)] if cb_path else []
        trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                       data_collator=transformers.default_data_collator, callbacks=cbs)
        t = time.perf_counter()
        trainer.train()
        if torch.cuda.is_available() and not use_cpu:
            torch.cuda.synchronize()
        return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    run_once(False, args.cpu, 3)  # warm-up
    plain, rec = [], []
    for _ in range(args.reps):
        plain.append(run_once(False, args.cpu, args.steps))
        rec.append(run_once(True, args.cpu, args.steps))
    ratio = statistics.median(r / p for r, p in zip(rec, plain))
    dev = "cpu" if args.cpu or not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"| Trainer + DataValueCallback, GPT-2 4x256, 16x64 tokens, {dev} | "
          f"{statistics.median(plain) / args.steps * 1e3:.1f} | {statistics.median(rec) / args.steps * 1e3:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
