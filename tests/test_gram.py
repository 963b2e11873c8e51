"""torchmatgrad::gram_ (K-FAC's XᵀX on the CPU kernel, one triangle computed and mirrored):
exact against float64, every path of the tiled kernel, accumulation, blocks of larger
matrices, strided inputs, empty inputs and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES

from torchmatgrad.curvature._gram_op import gram_
from torchmatgrad.testing import assert_close, rand

ops = torch.ops.torchmatgrad


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# d: the scalar few-column case (≤ 4), one tile, tiles straddling the diagonal, and enough row
# blocks (> 4 of 16-32 lanes) for the packed-panel path; rows: 1, odd, many.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,d", [(7, 1), (5, 4), (9, 5), (33, 40), (3, 130), (150, 301)])
def test_gram_exact(dtype, rows, d):
    x = rand(rows, d, dtype=dtype, seed=1)
    out = torch.full((d, d), float("nan"), dtype=_acc(dtype))  # every element must be written
    gram_(out, x, alpha=0.75)
    ref = 0.75 * x.double().t() @ x.double()
    assert_close(out, ref, k=rows, peers=[0.75 * (x.t() @ x).to(out.dtype)], what="alpha·XᵀX")
    assert torch.equal(out, out.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gram_accumulates_into_a_block_of_a_larger_matrix(dtype):
    """K-FAC's factor with the bias column: out = A[:d, :d] of A [d+1, d+1] (row stride d+1)."""
    rows, d = 70, 150
    x = rand(2 * d, rows, dtype=dtype, seed=2).t()[:, ::2]  # strided rows and columns
    s = rand(rows, d + 1, dtype=_acc(dtype), seed=3)
    big = s.t() @ s  # symmetric
    start = big.clone()
    gram_(big[:d, :d], x, accumulate=True)
    ref = start.double()
    ref[:d, :d] += x.double().t() @ x.double()
    assert_close(big, ref, k=rows + d, what="accumulated block")
    assert torch.equal(big[d], start[d]) and torch.equal(big[:, d], start[:, d])  # untouched


def test_gram_empty():
    out = rand(3, 3)
    gram_(out, rand(0, 3), accumulate=False)
    torch.testing.assert_close(out, torch.zeros(3, 3), rtol=0, atol=0)
    out = rand(3, 3)
    before = out.clone()
    gram_(out, rand(0, 3), accumulate=True)
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    gram_(torch.empty(0, 0), rand(5, 0))


def test_gram_opcheck():
    torch.library.opcheck(ops.gram_.default, (torch.zeros(37, 37), rand(20, 37), 0.5, True))


@pytest.mark.parametrize(
    "out,x,match",
    [
        (torch.zeros(4, 4), rand(3), "input must be 2-D"),
        (torch.zeros(4, 4), torch.ones(3, 4, dtype=torch.int32), "input must be a floating"),
        (torch.zeros(4, 5), rand(3, 4), r"out must have shape \[4, 4\]"),
        (torch.zeros(4, 4, dtype=torch.float64), rand(3, 4), "out must have dtype Float"),
        (torch.zeros(4, 8)[:, ::2], rand(3, 4), "out's rows must be contiguous"),
    ],
)
def test_gram_errors(out, x, match):
    before = out.clone()
    for fn in (lambda: ops.gram_(out, x), lambda: torch.compile(gram_, fullgraph=True)(out, x)):
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=match):
            fn()
    assert torch.equal(out, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("path", ["auto", "kernel", "vendor"])
def test_kfac_products_on_either_path(dtype, path):
    """curvature._products (K-FAC's factors) gives the same products on the kernel and on the
    vendor route, in the rows' dtype, with and without the column of ones."""
    from torchmatgrad import policy
    from torchmatgrad.curvature._products import gram, gram_with_ones

    rows, d = 45, 70
    x = rand(rows, d, dtype=dtype, seed=7)
    ref = 0.5 * x.double().t() @ x.double()
    with policy.force_path(path):
        fresh = gram(x, alpha=0.5)
        acc = gram(x, fresh.clone(), alpha=0.5)
        ones = gram_with_ones(x, torch.zeros(d + 1, d + 1, dtype=dtype), alpha=0.5)
    assert fresh.dtype == dtype and acc.dtype == dtype
    assert_close(fresh, ref, k=rows, what=f"gram ({path})")
    assert_close(acc, 2 * ref, k=2 * rows, what=f"accumulated gram ({path})")
    X1 = torch.cat([x.double(), torch.ones(rows, 1, dtype=torch.float64)], 1)
    assert_close(ones, 0.5 * X1.t() @ X1, k=rows, what=f"gram with ones ({path})")
