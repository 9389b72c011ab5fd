"""The sketch GEMM's orientation (``_rules.NARROW``, issue 20) changes only the speed, never the numbers.

``X @ P^T`` is taken as ``P @ X^T`` whenever ``P``'s row count is not a multiple of 16: both must equal
the float64 product for every row count around the switch, for 2-d and 3-d inputs and the affine
(bias) form, and the kron rule's per-sample rows must equal the explicit per-sample gradients
projected in float64.
"""

from __future__ import annotations

import pytest
import torch

from datavalue.capture import _rules as R


@pytest.mark.parametrize("k", [1, 8, 15, 16, 17, 24, 32, 33, 48])
@pytest.mark.parametrize("lead", [(37,), (3, 11)])
def test_project_equals_float64_product(k, lead):
    g = torch.Generator().manual_seed(k)
    dim = 40
    x = torch.randn(*lead, dim, generator=g)
    P = torch.randn(k, dim + 1, generator=g)
    ref = x.double() @ P[:, :-1].T.double()
    y = R._project(x, P[:, :-1].contiguous(), P[:, :-1].T.contiguous())
    assert y.shape == (*lead, k)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    ref_aff = torch.cat([x, x.new_ones(*lead, 1)], -1).double() @ P.T.double()
    y_aff = R._project_affine(x, P, P.T.contiguous())
    assert y_aff.shape == (*lead, k)
    torch.testing.assert_close(y_aff.double(), ref_aff, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k_rows,k_cols", [(8, 8), (16, 17), (17, 16), (32, 33)])
def test_linear_rule_rows_equal_projected_per_sample_gradients(k_rows, k_cols):
    g = torch.Generator().manual_seed(k_rows * 100 + k_cols)
    b, L, n_in, n_out = 3, 5, 20, 24
    lin = torch.nn.Linear(n_in, n_out)
    a = torch.randn(b, L, n_in, generator=g)
    d = torch.randn(b, L, n_out, generator=g)
    rows = torch.randn(k_rows, n_out, generator=g)
    cols = torch.randn(k_cols, n_in + 1, generator=g)
    sk = R.Sketch("kron", rows, cols, k_rows * k_cols)
    draft = R.BlockDraft("weight", ("weight", "bias"), "kron", (n_out, n_in + 1), True)
    out = R.LinearRule().per_sample(lin, (a,), {}, d, {"weight": sk}, [draft])["weight"]
    # explicit per-sample gradient [dW | db] of sum_t d_t . (W a_t + b), projected in float64
    full = torch.einsum("blo,bli->boi", d.double(), torch.cat([a, a.new_ones(b, L, 1)], -1).double())
    ref = torch.einsum("ro,boi,ci->brc", rows.double(), full, cols.double()).reshape(b, -1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
