"""per_sample_grad_norms' vendor route: the norms as batched GEMMs (csrc/vendor.cpp,
per_sample_norms_vendor), taken from _C.norms_vendor_rows_cpu / _cuda rows per sample or where
the vendor path is forced; exact against float64 like the hand-written kernels."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, DTYPES
from torch.profiler import ProfilerActivity, profile

from torchmatgrad import _C, per_sample, policy
from torchmatgrad.testing import assert_close, poison_allocator, rand

ops = torch.ops.torchmatgrad


def _ref(g: torch.Tensor, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """‖G_iᵀ·X_i‖² (+ ‖Σ_t g_t‖²) per sample, in float64."""
    B, T = x.shape[0], math.prod(x.shape[1:-1])
    G = g.double().reshape(B, T, g.shape[-1])
    X = x.double().reshape(B, T, x.shape[-1])
    sq = torch.einsum("bti,btj->bij", G, X).square().sum((1, 2))
    return sq + G.sum(1).square().sum(1) if bias else sq


# (batch shape, n, m): T = 1, odd sizes, 4-D, a zero-width layer, a one-row sample.
SHAPES = [((5,), 3, 7), ((3, 4), 17, 5), ((2, 3, 2), 6, 9), ((3, 9), 40, 33), ((2, 5), 4, 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,m", SHAPES)
@pytest.mark.parametrize("method", ["ghost", "direct"])
@pytest.mark.parametrize("bias", [False, True])
def test_vendor_norms_exact(device, dtype, batch, n, m, method, bias):
    x = rand(*batch, m, device=device, dtype=dtype, seed=1)
    g = rand(*batch, n, device=device, dtype=dtype, seed=2)
    acc = per_sample.per_sample_acc_dtype(dtype)
    poison_allocator((batch[0],), acc, device)
    with policy.force_path("vendor"):
        got = ops.per_sample_grad_norms(g, x, bias, method)
    with policy.force_path("kernel"):
        kernel = ops.per_sample_grad_norms(g, x, bias, method)
    assert got.dtype == acc and got.shape == (batch[0],)
    T = x[0].numel() // max(m, 1)
    k = max(T, 1) * max(n, m, 1)
    assert_close(got, _ref(g, x, bias), k=k, peers=[kernel], what=f"vendor norms ({method})")


@pytest.mark.parametrize("device", DEVICES)
def test_vendor_norms_in_chunks_and_non_contiguous(device):
    """More samples than one chunk holds (64 MiB of per-sample products: 20 of 1024 × 1024
    float32 direct products are 80 MiB, so two chunks), inputs that are views."""
    B, T, n, m = 20, 2, 1024, 1024
    x = rand(B, T, 2 * m, device=device, seed=3)[..., ::2]
    g = rand(T, B, n, device=device, seed=4).transpose(0, 1)
    with policy.force_path("vendor"):
        got = ops.per_sample_grad_norms(g, x, True, "direct")
        ghost = ops.per_sample_grad_norms(g, x, True, "ghost")
    ref = _ref(g, x, True)
    assert_close(got, ref, k=T * m, what="direct, chunked")
    assert_close(ghost, ref, k=T * m, what="ghost")


def test_vendor_norms_empty():
    with policy.force_path("vendor"):
        assert ops.per_sample_grad_norms(rand(0, 3, 4), rand(0, 3, 5), True, "ghost").shape == (0,)
        zero = ops.per_sample_grad_norms(rand(2, 0, 4), rand(2, 0, 5), True, "direct")
    torch.testing.assert_close(zero, torch.zeros(2), rtol=0, atol=0)


@pytest.mark.parametrize(
    "rows,expect_bmm",
    [(_C.norms_vendor_rows_cpu - 1, False), (_C.norms_vendor_rows_cpu, True)],
    ids=["below", "from"],
)
def test_cpu_route_by_rows_per_sample(rows, expect_bmm):
    """Auto path on the CPU: the hand-written kernels below norms_vendor_rows_cpu rows per sample,
    ATen's bmm from there (the profiler lists the ATen ops the launcher calls)."""
    x, g = rand(2, rows, 8, seed=5), rand(2, rows, 6, seed=6)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = ops.per_sample_grad_norms(g, x, True, "auto")
    names = {e.key for e in prof.key_averages()}
    assert ("aten::bmm" in names) == expect_bmm, sorted(names)
    assert_close(got, _ref(g, x, True), k=rows * 8, what="auto route")


def test_bench_dp_reports_the_norm_routes(tmp_path):
    """``bench --case dp`` times per_sample_grad_norms on each layer kind on both routes (the
    rows that confirm or move the crossover of csrc/constants.h), and the two agree."""
    import json

    from torchmatgrad.cli import bench

    argv = ["--case", "dp", "--device", "cpu", "--d", "24", "--blocks", "1", "--B", "2"]
    argv += ["--T", "3", "--reps", "2", "--warmup", "1", "--out", str(tmp_path), "--name", "dp"]
    assert bench.main(argv) == 0
    routes = json.loads((tmp_path / "dp.json").read_text())["norm_routes"]
    assert [r["layer"] for r in routes] == ["qkv", "out", "fc", "proj"]
    for r in routes:
        assert r["kernel_ms"] > 0 and r["vendor_ms"] > 0 and r["rel_diff"] < 1e-5, r
        assert r["default"] == ("vendor" if r["T"] >= _C.norms_vendor_rows_cpu else "kernel")
        assert r["method"] == ops._per_sample_method(r["T"], r["n"], r["m"])
