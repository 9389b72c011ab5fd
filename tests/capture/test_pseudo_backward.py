"""The pseudo-gradient backward (``Engine.grad_wrt_outputs``: Fisher rows, test gradients) asks autograd
for the hooked outputs' gradient edges, not the parameters: the same rows bit for bit as the
parameter-targeted pass it replaced (kept here as the reference), without the weight-gradient GEMMs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import datavalue
from datavalue.capture._engine import Engine
from datavalue.store import open_run
from tests.capture.models import CNN, TinyGPT, fallback_model, mlp


def _reference_grad_wrt_outputs(self, scalar_or_tensor, grad_outputs=None):
    """The pass as it was before: differentiate w.r.t. every trainable parameter (returned, discarded)."""
    params = [p for p in self.model.parameters() if p.requires_grad]
    self._pseudo = True
    try:
        torch.autograd.grad(scalar_or_tensor, params, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    finally:
        self._pseudo = False


CASES = {
    "mlp": (mlp, lambda g: torch.randn(8, 6, generator=g, dtype=torch.float64), 4),
    "cnn": (CNN, lambda g: torch.randn(8, 2, 7, 7, generator=g, dtype=torch.float64), 4),
    "tinygpt": (TinyGPT, lambda g: torch.randint(0, 11, (8, 5), generator=g), 11),
    "fallback": (fallback_model, lambda g: torch.randn(8, 6, generator=g, dtype=torch.float64), 4),
}


def _record(path, case, fisher_max_classes):
    make, inputs, C = CASES[case]
    torch.manual_seed(0)
    model = make().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    with datavalue.Recorder(path, model, proj_dim=32, seed=3, optimizer=opt, curvature="fisher", storage_dtype="float64",
                            fisher_max_classes=fisher_max_classes, fisher_samples=2) as rec:
        for t in range(3):
            x = inputs(g)
            y = torch.randint(0, C, x.shape[:1] if case != "tinygpt" else x.shape, generator=g)
            with rec.step(sample_ids=np.arange(8) + 8 * t):
                out = model(x)
                F.cross_entropy(out.reshape(-1, C), y.reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
    run = open_run(path)
    return run.grads.compute(), run.fisher.compute(), run.fisher_ptr[:]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fisher_max_classes", [16, 1], ids=["exact", "sampled"])
def test_fisher_rows_bit_identical_to_parameter_pass(tmp_path, monkeypatch, case, fisher_max_classes):
    if case == "tinygpt" and fisher_max_classes == 16:
        pytest.skip("sequence outputs always take sampled labels")
    new = _record(tmp_path / "new.zarr", case, fisher_max_classes)
    monkeypatch.setattr(Engine, "grad_wrt_outputs", _reference_grad_wrt_outputs)
    ref = _record(tmp_path / "ref.zarr", case, fisher_max_classes)
    for a, b in zip(new, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()
    assert np.abs(new[1]).sum() > 0  # rows were captured (not two empty arrays)


def test_test_gradients_bit_identical_to_parameter_pass(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = mlp().double()
    with datavalue.Recorder(tmp_path / "r.zarr", model, proj_dim=32, seed=3) as rec:
        x = torch.randn(4, 6, dtype=torch.float64)
        with rec.step(sample_ids=np.arange(4), lr=0.1):
            F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    xq, yq = torch.randn(5, 6, dtype=torch.float64), torch.tensor([3, 2, 1, 0, 0])

    def loss_fn(m):
        return F.cross_entropy(m(xq), yq, reduction="none")

    new = datavalue.capture.per_sample_gradients(model, loss_fn, tmp_path / "r.zarr")
    monkeypatch.setattr(Engine, "grad_wrt_outputs", _reference_grad_wrt_outputs)
    ref = datavalue.capture.per_sample_gradients(model, loss_fn, tmp_path / "r.zarr")
    assert new.shape[0] == 5 and np.abs(new).sum() > 0 and new.tobytes() == ref.tobytes()


def test_pseudo_pass_skips_weight_gradient_gemms(tmp_path, monkeypatch):
    """Counted FLOPs of the Fisher passes of a bias-free MLP: the reference pass computes every layer's
    weight gradient (2 b in out each) plus the input gradients above the first layer; the new pass
    computes exactly the input gradients, so the difference is exactly the weight-gradient GEMMs."""
    dims, b, passes = (12, 10, 8, 5), 6, 5  # exact Fisher: one pass per class

    def flops(impl):
        counted = []

        def wrapped(self, *args, **kwargs):
            with FlopCounterMode(display=False) as fc:
                impl(self, *args, **kwargs)
            counted.append(fc.get_total_flops())

        monkeypatch.setattr(Engine, "grad_wrt_outputs", wrapped)
        torch.manual_seed(0)
        layers = [torch.nn.Linear(i, o, bias=False) for i, o in zip(dims, dims[1:])]
        model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), layers[1], torch.nn.Tanh(), layers[2]).double()
        path = tmp_path / f"{impl.__name__}.zarr"
        with datavalue.Recorder(path, model, proj_dim=None, curvature="fisher", fisher_max_classes=16) as rec:
            x = torch.randn(b, dims[0], dtype=torch.float64)
            with rec.step(sample_ids=np.arange(b), lr=0.1):
                F.cross_entropy(model(x), torch.arange(b) % dims[-1]).backward()
        assert len(counted) == passes
        return sum(counted)

    new = flops(Engine.grad_wrt_outputs)
    ref = flops(_reference_grad_wrt_outputs)
    weight_gemms = sum(2 * b * i * o for i, o in zip(dims, dims[1:]))
    assert ref - new == passes * weight_gemms, (ref, new, passes * weight_gemms)
