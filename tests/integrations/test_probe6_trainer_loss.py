"""P6-08: a Trainer with ``compute_loss_func=`` or ``label_smoothing_factor`` pops ``labels`` before the
forward; the callback must still weight each example by its label tokens over the step's ``num_items_in_batch``
(it recorded ``1/num_items`` for every example before the fix: a step's weights summed to 0.14, not 0.86)."""

import logging

import numpy as np
import pytest
import torch

import datavalue

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

V, N, T = 32, 16, 10


def _dataset():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (N, T))
    lengths = rng.integers(4, T + 1, N)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "labels": labels.tolist(), "sample_id": list(range(100, 100 + N))})


def _token_sum_loss(outputs, labels, num_items_in_batch=None):
    """The model's own loss, written out: token sum over the shifted labels / num_items_in_batch."""
    logits, lab = outputs["logits"][:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), lab.reshape(-1), ignore_index=-100, reduction="sum")
    return loss / num_items_in_batch


def _train(tmp_path, name, **kw):
    from datavalue.integrations.hf import DataValueCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    extra = {k: kw.pop(k) for k in ("compute_loss_func",) if k in kw}
    args = transformers.TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=2, learning_rate=0.05, optim="sgd",
                                          lr_scheduler_type="constant", logging_strategy="no", save_strategy="no",
                                          report_to=[], remove_unused_columns=False, max_grad_norm=0.0, use_cpu=True,
                                          seed=0, disable_tqdm=True, **kw)
    cb = DataValueCallback(tmp_path / f"{name}.zarr", proj_dim=None, storage_dtype="float64")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(),
                                   data_collator=transformers.default_data_collator, callbacks=[cb], **extra)
    trainer.train()
    return datavalue.open_run(tmp_path / f"{name}.zarr")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("plain"), "plain")


def test_compute_loss_func_records_the_plain_runs_weights_and_rows(tmp_path, plain, caplog):
    with caplog.at_level(logging.WARNING, logger="datavalue.integrations.hf"):
        run = _train(tmp_path, "clf", compute_loss_func=_token_sum_loss)
    assert np.array_equal(run.sample_id, plain.sample_id)
    # before the fix: every weight 1/num_items (the step's weights summed to ~0.14)
    np.testing.assert_allclose(run.weight, plain.weight, rtol=1e-12)
    assert np.ptp(run.weight[: run.step_ptr[1]]) > 0  # the examples' token counts differ
    # the same loss: the same stored rows (float64 storage, exact rows; the same forward, so equal to rounding)
    np.testing.assert_allclose(np.asarray(run.grads[:]), np.asarray(plain.grads[:]), rtol=0, atol=1e-10)
    # the assumption behind the weights is said once
    said = [r for r in caplog.records if "compute_loss_func" in r.getMessage()]
    assert len(said) == 1


def test_label_smoothing_records_token_weights(tmp_path, plain):
    run = _train(tmp_path, "ls", label_smoothing_factor=0.1)
    # the smoothed loss is still a token sum over num_items_in_batch: each example's share is its tokens
    np.testing.assert_allclose(run.weight, plain.weight, rtol=1e-12)
    for t in range(run.n_steps):
        sl = slice(run.step_ptr[t], run.step_ptr[t + 1])
        assert run.weight[sl].sum() == pytest.approx(plain.weight[sl].sum(), rel=1e-12)
        assert run.weight[sl].sum() > 0.5  # before the fix: ~0.14
