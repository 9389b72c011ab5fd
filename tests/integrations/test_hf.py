"""Hugging Face Trainer callback: a tiny random GPT-2, 20 steps, gradient accumulation, embeddings, top-k."""

import numpy as np
import pytest
import torch

import datavalue
from datavalue.store import open_run

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


def _dataset(n=48, t=10, vocab=32):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (n, t))
    lengths = rng.integers(4, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "labels": labels.tolist(), "sample_id": list(range(1000, 1000 + n))})


def _trainer(tmp_path, callback, ds, max_grad_norm=1.0):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                          max_steps=20, learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=3,
                                          logging_steps=100, save_strategy="no", report_to=[], remove_unused_columns=False,
                                          max_grad_norm=max_grad_norm, use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=ds,
                                data_collator=transformers.default_data_collator,
                                callbacks=[callback] if callback else [])


def test_trainer_callback_records_real_steps(tmp_path):
    from datavalue.integrations.hf import DataValueCallback

    ds = _dataset()
    cb = DataValueCallback(tmp_path / "run.zarr", proj_dim=256)
    trainer = _trainer(tmp_path, cb, ds)
    trainer.train()
    run = open_run(tmp_path / "run.zarr")
    assert run.n_steps == 20
    assert np.all(np.diff(run.step_ptr) == 8)  # 2 micro-batches of 4 per optimizer step
    assert set(run.sample_id.tolist()) <= set(range(1000, 1048))
    # weights are tokens(z) (shifted labels: the tokens the loss sums over) / the Trainer's
    # num_items_in_batch (which counts unshifted labels when the config names no loss_type)
    lab = np.array(ds["labels"])
    tok = {sid: float((row[1:] != -100).sum()) for sid, row in zip(ds["sample_id"], lab)}
    shift = 1 if trainer._loss_shifts_labels else 0
    n_items = {sid: float((row[shift:] != -100).sum()) for sid, row in zip(ds["sample_id"], lab)}
    for t in range(3):
        sl = slice(run.step_ptr[t], run.step_ptr[t + 1])
        expect = np.array([tok[s] for s in run.sample_id[sl]])
        np.testing.assert_allclose(run.weight[sl], expect / sum(n_items[s] for s in run.sample_id[sl]))
    # the real lr: linear warmup over 3 steps then decay
    assert run.lr[0] < run.lr[2] and run.lr[-1] < run.lr[3]
    assert 0 < run.grad_scale.min() <= 1.0
    assert run.manifest["optimizer"]["kind"] == "adamw"
    datavalue.build_embeddings(tmp_path / "run.zarr", progress=False)
    model = trainer.model.eval()
    x = torch.tensor(ds["input_ids"][:3])

    def loss_fn(m):
        logits = m(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), x[:, 1:].reshape(-1),
                                                 reduction="none").reshape(3, -1).mean(1)

    attr = datavalue.Attributor(tmp_path / "run.zarr", model, progress=False)
    top = attr.top_k(loss_fn, k=5, by="sample")
    assert np.asarray(top.helpful_ids).shape == (3, 5)
    assert set(np.asarray(top.helpful_ids).ravel().tolist()) <= set(range(1000, 1048))


def test_clipping_coefficient_is_recovered(tmp_path):
    """With a tiny max_grad_norm every step is clipped; the recorded coefficient times the raw
    (captured) gradient norm equals max_grad_norm."""
    from datavalue.integrations.hf import DataValueCallback

    ds = _dataset()
    cb = DataValueCallback(tmp_path / "run.zarr", proj_dim=None, storage_dtype="float64")
    _trainer(tmp_path, cb, ds, max_grad_norm=1e-3).train()
    run = open_run(tmp_path / "run.zarr")
    g = run.grads.compute()
    for t in range(3):
        sl = slice(run.step_ptr[t], run.step_ptr[t + 1])
        raw = run.weight[sl] @ g[sl]
        np.testing.assert_allclose(run.grad_scale[t] * np.linalg.norm(raw), 1e-3, rtol=1e-3)


def test_callback_refuses_dropped_id_column(tmp_path):
    from datavalue.errors import RecorderError
    from datavalue.integrations.hf import DataValueCallback

    trainer = _trainer(tmp_path, DataValueCallback(tmp_path / "run.zarr"), _dataset())
    trainer.args.remove_unused_columns = True
    with pytest.raises(RecorderError, match="remove_unused_columns=False"):
        trainer.train()


def test_each_saved_checkpoint_flushes_the_run_and_its_weights(tmp_path):
    """A checkpoint the Trainer saves is one the run can resume from: every step before it committed and
    the weights' digest recorded at its step count (guards issue 22's resume-with-other-weights check)."""
    from datavalue.capture._resume import read_digests, weights_digest
    from datavalue.integrations.hf import DataValueCallback

    cb = DataValueCallback(tmp_path / "run.zarr", proj_dim=64)
    trainer = _trainer(tmp_path, cb, _dataset())
    trainer.args.save_strategy = transformers.IntervalStrategy.STEPS
    trainer.args.save_steps = 8
    trainer.args.save_only_model = True
    trainer.train()
    steps = [d["steps"] for d in read_digests(tmp_path / "run.zarr")]
    assert steps[:2] == [8, 16] and steps[-1] == 20, steps  # both saves, then close()
    saved = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "checkpoint-16", use_safetensors=True)
    d16 = next(d for d in read_digests(tmp_path / "run.zarr") if d["steps"] == 16)["tensors"]
    now = weights_digest(saved)
    assert set(now) == set(d16)
    for name, v in now.items():
        np.testing.assert_allclose(v, d16[name], rtol=1e-12)
