"""The Trainer path is the plain Recorder's pipeline: a ``Trainer`` AdamW run recorded by
``DataValueCallback`` and the plain-loop replay of its batches through ``Recorder`` give the same
store and the same embeddings, and the Trainer run builds Adam-aware."""

import warnings

import numpy as np
import pytest
import torch

import datavalue
from datavalue.store import open_array, open_run

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

N, T, VOCAB, MAX_NORM = 32, 10, 32, 0.5


def _dataset():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (N, T))
    lengths = rng.integers(3, T + 1, N)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "labels": labels.tolist(), "sample_id": list(range(500, 500 + N))})


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(
        str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=8,
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.05, max_grad_norm=MAX_NORM,
        logging_steps=100, save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=True, seed=0,
        disable_tqdm=True, **kw,
    )


def _replay(path, trainer_run, ds, args, trainer_shifts):
    """The Trainer's batches, replayed in a plain loop through Recorder's micro-batch API."""
    model = _model().train()
    opt = transformers.Trainer(model=model, args=args).create_optimizer()  # the Trainer's AdamW and param groups
    rows = {sid: i for i, sid in enumerate(ds["sample_id"])}
    cols = {c: torch.tensor(ds[c]) for c in ("input_ids", "attention_mask", "labels")}
    rec = datavalue.Recorder(path, model, proj_dim=256, optimizer=opt, loss_reduction="token_mean")
    coefs = []
    for t in range(trainer_run.n_steps):
        for g in opt.param_groups:
            g["lr"] = float(trainer_run.lr[t])  # the Trainer's schedule, as it stepped
        step_ids = trainer_run.sample_id[trainer_run.step_ptr[t]: trainer_run.step_ptr[t + 1]]
        micro = np.split(step_ids, len(step_ids) // 4)  # the micro-batches of 4 (of every rank, in rank order)
        idx = [[rows[s] for s in m] for m in micro]
        # the Trainer's num_items_in_batch: labels counted as it counts them (unshifted for a GPT-2 built
        # from a config without loss_type, shifted otherwise); the callback reads the value it passes
        shift = 1 if trainer_shifts else 0
        n_items = sum(int(cols["labels"][i][:, shift:].ne(-100).sum()) for i in idx)
        toks = []
        for m, i in zip(micro, idx):
            lab = cols["labels"][i]
            toks.append(lab[:, 1:].ne(-100).sum(1).numpy())
            with rec.microbatch(m, tokens=toks[-1]):
                out = model(input_ids=cols["input_ids"][i], attention_mask=cols["attention_mask"][i], labels=lab,
                            num_items_in_batch=torch.tensor(n_items))
                out.loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        coefs.append(min(1.0, MAX_NORM / (norm + 1e-6)))
        rec.commit_step(clip_coef="auto", weights=np.concatenate(toks) / n_items)  # the loss divides by n_items
        opt.step()
        opt.zero_grad()
    rec.close()
    return model, np.array(coefs)


def test_trainer_run_equals_plain_loop_replay(tmp_path):
    from datavalue.integrations.hf import DataValueCallback

    ds = _dataset()
    args = _args(tmp_path)
    cb = DataValueCallback(tmp_path / "trainer.zarr", proj_dim=256)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=ds,
                                   data_collator=transformers.default_data_collator, callbacks=[cb])
    trainer.train()
    a = open_run(tmp_path / "trainer.zarr")
    assert a.n_steps == 8 and a.has_adam_state  # the Trainer's default AdamW: moments recorded
    # the Trainer's two param groups (decay / no decay for biases and LayerNorm): recorded per group, and the
    # sketched Conv1D biases got blocks of their own so that every projected column has one group's settings
    assert a.has_param_groups and a.param_groups["weight_decay"].shape == (8, 2)
    np.testing.assert_array_equal(a.param_groups["weight_decay"][0], [0.05, 0.0])
    assert a.manifest["projection"].get("split_bias") and not a.column_groups["mixed_blocks"]
    model_b, coefs = _replay(tmp_path / "plain.zarr", a, ds, args, trainer._loss_shifts_labels)
    b = open_run(tmp_path / "plain.zarr")

    # same training: the replay ends on the Trainer's weights
    for (n, p), q in zip(trainer.model.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5, msg=n)
    # same store, to float32 tolerance
    np.testing.assert_array_equal(a.sample_id, b.sample_id)
    np.testing.assert_array_equal(a.step_ptr, b.step_ptr)
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12)
    np.testing.assert_allclose(a.lr, b.lr, rtol=1e-12)
    np.testing.assert_allclose(a.grad_scale, b.grad_scale, rtol=1e-4)
    np.testing.assert_allclose(a.grad_scale, coefs, rtol=2e-3)  # "auto" recovers clip_grad_norm_'s coefficient
    assert a.grad_scale.min() < 0.99  # clipping was active, so the check above can fail
    ga, gb = a.read("grads"), b.read("grads")
    np.testing.assert_allclose(ga, gb, rtol=1e-3, atol=1e-4 * np.abs(ga).max())
    for key in ("adam_m", "adam_v"):
        xa, xb = a.read(key), b.read(key)
        np.testing.assert_allclose(xa, xb, rtol=1e-3, atol=1e-4 * np.abs(xa).max())
    np.testing.assert_array_equal(a.read("adam_step"), b.read("adam_step"))

    # same embeddings; the Trainer run builds Adam-aware (no SGD-proxy warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        info_a = datavalue.build_embeddings(tmp_path / "trainer.zarr", progress=False)
    info_b = datavalue.build_embeddings(tmp_path / "plain.zarr", progress=False)
    assert info_a.optimizer == info_b.optimizer == "adamw"
    ea = np.asarray(open_array(tmp_path / "trainer.zarr", info_a.array)[:])
    eb = np.asarray(open_array(tmp_path / "plain.zarr", info_b.array)[:])
    np.testing.assert_allclose(ea, eb, rtol=1e-2, atol=1e-3 * np.abs(ea).max())


def test_callback_records_fisher_and_refuses_a_second_recorder(tmp_path):
    """curvature="fisher" through the Trainer: one pseudo-gradient block per step whose rows carry
    the examples' weights; a second recorder on the same model is refused while the first records."""
    from datavalue.errors import RecorderStateError
    from datavalue.integrations.hf import DataValueCallback

    ds = _dataset()
    args = _args(tmp_path)
    cb = DataValueCallback(tmp_path / "f.zarr", proj_dim=64, curvature="fisher", fisher_samples=2)
    model = _model()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   data_collator=transformers.default_data_collator, callbacks=[cb])

    class Probe(transformers.TrainerCallback):  # runs after cb.on_train_begin: the model is being recorded
        def on_train_begin(self, args, state, control, model=None, **kw):
            with pytest.raises(RecorderStateError, match="already has an open Recorder"):
                datavalue.Recorder(tmp_path / "second.zarr", model, proj_dim=8)
            self.checked = True

    probe = Probe()
    trainer.add_callback(probe)
    trainer.train()
    assert probe.checked
    run = open_run(tmp_path / "f.zarr")
    assert run.n_steps == 8 and run.has_fisher
    # 2 sampled labels x 8 examples per step, each row scaled by sqrt(weight / samples)
    np.testing.assert_array_equal(np.diff(run.fisher_ptr), 16)
    assert np.isfinite(run.fisher.compute()).all() and np.abs(run.fisher.compute()).sum() > 0
    assert cb.recorder.closed
    datavalue.build_embeddings(tmp_path / "f.zarr", "fisher", progress=False)


def test_callback_refuses_hessian():
    from datavalue.errors import RecorderError
    from datavalue.integrations.hf import DataValueCallback

    with pytest.raises(RecorderError, match="hessian"):
        DataValueCallback("unused.zarr", curvature="hessian")


def test_ddp_trainer_run_equals_single_process_replay(tmp_path):
    """Under DDP (2 ranks, gloo) each rank records its micro-batches, rank 0 writes the gathered step;
    the weights are the examples' shares of the global token-mean loss (average_tokens_across_devices)
    and the store equals a single-process replay of the recorded global steps."""
    import socket

    import torch.multiprocessing as mp

    from tests.integrations._ddp_trainer_worker import worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a = open_run(tmp_path / "ddp.zarr")
    assert a.n_steps == 8 and a.has_adam_state
    np.testing.assert_array_equal(np.diff(a.step_ptr), 16)  # 2 ranks x 2 micro-batches x 4
    ds = _dataset()
    probe = transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=ds)
    model_b, coefs = _replay(tmp_path / "plain.zarr", a, ds, _args(tmp_path), probe._loss_shifts_labels)
    b = open_run(tmp_path / "plain.zarr")
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-12)
    np.testing.assert_allclose(a.grad_scale, coefs, rtol=2e-3)
    ga, gb = a.read("grads"), b.read("grads")
    np.testing.assert_allclose(ga, gb, rtol=1e-3, atol=1e-4 * np.abs(ga).max())
    final = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    k_bias = slice(16, 32)  # the attention key bias: its true gradient is 0 (softmax shift invariance), so Adam
    for (n, p), q in zip(final.named_parameters(), model_b.parameters()):  # turns the all-reduce's rounding into
        p, q = p.detach(), q.detach()                                       # lr-sized steps there; compare the rest
        if n.endswith("attn.c_attn.bias"):
            p, q = torch.cat([p[: k_bias.start], p[k_bias.stop:]]), torch.cat([q[: k_bias.start], q[k_bias.stop:]])
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_final_pass_from_a_trainer_matches_per_example_summed_gradients(tmp_path):
    """``final_pass(trainer, run)``: one row per training example, each the sketched gradient of the
    example's summed token loss at the final weights (checked against per-example backward passes through
    ``per_sample_gradients``), share = its shifted label count; then the influence kind queries it."""
    from datavalue.capture import per_sample_gradients
    from datavalue.integrations.hf import DataValueCallback, final_pass

    ds = _dataset()
    run = tmp_path / "t.zarr"
    trainer = transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=ds,
                                   data_collator=transformers.default_data_collator,
                                   callbacks=[DataValueCallback(run, proj_dim=128)])
    trainer.train()
    model = trainer.model
    assert final_pass(trainer, run, progress=False) == N
    fp = open_run(run / "final")
    cols = {c: torch.tensor(ds[c]) for c in ("input_ids", "attention_mask", "labels")}
    np.testing.assert_array_equal(fp.sample_id, ds["sample_id"])
    np.testing.assert_array_equal(fp.weight, cols["labels"][:, 1:].ne(-100).sum(1).numpy())
    assert fp.has_fisher and fp.n_fisher_rows == N

    def summed(m, rows=slice(None)):
        logits = m(input_ids=cols["input_ids"][rows], attention_mask=cols["attention_mask"][rows]).logits[:, :-1]
        lab = cols["labels"][rows, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), lab.reshape(-1), reduction="none",
                                               ignore_index=-100)
        return ce.reshape(lab.shape).sum(1)

    model.eval()
    want = per_sample_gradients(model, summed, open_run(run))
    got = fp.read("grads")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    datavalue.embeddings.build_influence(run, progress=False)
    attr = datavalue.Attributor(run, model, kind="influence", progress=False)
    S = attr.scores(lambda m: summed(m, slice(0, 3)), by="sample")
    assert S.shape == (3, N) and np.isfinite(S).all()
    assert (np.argmax(S, 1) == np.arange(3)).mean() >= 2 / 3  # a training line is most helpful to itself
