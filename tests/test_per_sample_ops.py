"""Per-sample gradients: the ops (per_sample_grad_norms, clipped_grad_accumulate_,
per_sample_grads, add_gaussian_noise_) against float64 references, on every CPU instruction set.

References are float64 from the same input values; tolerances are the policy's
(torchmatgrad.testing), with k the longest chain of sums behind a result. The CUDA cases carry
the cuda marker (conftest.DEVICES) and run in the GPU check.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, DTYPES

import torchmatgrad
from torchmatgrad import per_sample, policy
from torchmatgrad.testing import LOW_PRECISION, assert_close, poison_allocator, rand

ops = torch.ops.torchmatgrad


def _per_sample_ref(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients G_iᵀ·X_i [B, n, m] in float64."""
    B, T = x.shape[0], math.prod(x.shape[1:-1])
    G = g.double().reshape(B, T, g.shape[-1])
    X = x.double().reshape(B, T, x.shape[-1])
    return torch.einsum("bti,btj->bij", G, X)


def _bias_ref(g: torch.Tensor) -> torch.Tensor:
    return g.double().reshape(g.shape[0], math.prod(g.shape[1:-1]), g.shape[-1]).sum(1)


# ---- the ops --------------------------------------------------------------------------------

# (batch shape, n, m): T = 1 (2-D input), a few rows, 4-D, odd sizes, a wide and a tall layer.
SHAPES = [
    ((5,), 3, 7),
    ((3, 4), 17, 5),
    ((2, 3, 2), 6, 9),
    ((4, 1), 1, 1),
    ((3, 9), 40, 33),
    ((2, 70), 12, 10),  # T = 70 > n·m/(n + m): "auto" takes direct
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,m", SHAPES)
@pytest.mark.parametrize("method", ["ghost", "direct", "auto"])
def test_norms_op(device, dtype, batch, n, m, method):
    x = rand(*batch, m, device=device, dtype=dtype, seed=1)
    g = rand(*batch, n, device=device, dtype=dtype, seed=2)
    per = _per_sample_ref(g, x)
    ref_w = per.square().sum((1, 2))
    ref_b = ref_w + _bias_ref(g).square().sum(1)
    T = x[0].numel() // m
    poison_allocator((batch[0],), per_sample.per_sample_acc_dtype(dtype), device)
    got_w = ops.per_sample_grad_norms(g, x, False, method)
    got_b = ops.per_sample_grad_norms(g, x, True, method)
    assert got_w.dtype == per_sample.per_sample_acc_dtype(dtype)
    # The longest chain: T·max(n, m) products (a Gram entry times a Gram entry, or a tile entry
    # squared), then sums of squares in double.
    k = T * max(n, m)
    assert_close(got_w, ref_w, k=k, what=f"‖G_iᵀX_i‖² ({method})")
    assert_close(got_b, ref_b, k=k, what=f"‖G_iᵀX_i‖² + ‖Σg‖² ({method})")


def test_auto_method_follows_the_cost_rule():
    for T, n, m in [(1, 768, 3072), (64, 768, 3072), (1227, 768, 3072), (1228, 768, 3072)]:
        ghost = (T + 1) * (n + m) <= 2 * n * m
        assert per_sample.per_sample_method(T, n, m) == ("ghost" if ghost else "direct")
    assert per_sample.per_sample_method(1227, 768, 3072) == "ghost"
    assert per_sample.per_sample_method(1228, 768, 3072) == "direct"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,m", SHAPES)
@pytest.mark.parametrize("path", ["kernel", "vendor"])
def test_clipped_op(device, dtype, batch, n, m, path):
    x = rand(*batch, m, device=device, dtype=dtype, seed=3)
    g = rand(*batch, n, device=device, dtype=dtype, seed=4)
    acc = per_sample.per_sample_acc_dtype(dtype)
    scale = rand(batch[0], device=device, dtype=acc, seed=5).abs()
    gw0 = rand(n, m, device=device, dtype=dtype, seed=6)
    gb0 = rand(n, device=device, dtype=dtype, seed=7)
    gw, gb = gw0.clone(), gb0.clone()
    with policy.force_path(path):
        ops.clipped_grad_accumulate_(g, x, scale, gw, gb)
    s = scale.double()
    ref_w = gw0.double() + torch.einsum("b,bij->ij", s, _per_sample_ref(g, x))
    ref_b = gb0.double() + torch.einsum("b,bj->j", s, _bias_ref(g))
    R = x.numel() // m
    scale_w = 1 + (s.abs() @ _per_sample_ref(g.abs(), x.abs()).amax((1, 2))).item()
    assert_close(gw, ref_w, k=R + 1, scale=scale_w, what="grad_weight += Σ s_i G_iᵀX_i")
    assert_close(gb, ref_b, k=R + 1, what="grad_bias += Σ s_i Σ_t g_t")
    if dtype in LOW_PRECISION:  # a float32 master buffer for 16-bit inputs
        gw32, gb32 = gw0.float(), gb0.float()
        with policy.force_path(path):
            ops.clipped_grad_accumulate_(g, x, scale, gw32, gb32)
        assert_close(gw32, ref_w, k=R + 1, scale=scale_w, what="float32 grad_weight")
        assert_close(gb32, ref_b, k=R + 1, what="float32 grad_bias")


@pytest.mark.parametrize("device", DEVICES)
def test_clipped_op_optional_buffers(device):
    x, g = rand(4, 3, 6, device=device, seed=8), rand(4, 3, 5, device=device, seed=9)
    scale = rand(4, device=device, seed=10).abs()
    gw, gb = rand(5, 6, device=device, seed=11), rand(5, device=device, seed=12)
    w_only, b_only = gw.clone(), gb.clone()
    ops.clipped_grad_accumulate_(g, x, scale, w_only, None)
    ops.clipped_grad_accumulate_(g, x, scale, None, b_only)
    both_w, both_b = gw.clone(), gb.clone()
    ops.clipped_grad_accumulate_(g, x, scale, both_w, both_b)
    assert torch.equal(w_only, both_w) and torch.equal(b_only, both_b)
    ops.clipped_grad_accumulate_(g, x, scale, None, None)  # nothing asked: nothing happens


@pytest.mark.parametrize("device", DEVICES)
def test_clipped_op_many_rows(device):
    """More rows than one pass of the CPU kernel (128) and than one split of the CUDA one."""
    x, g = rand(3, 700, 21, device=device, seed=13), rand(3, 700, 19, device=device, seed=14)
    scale = rand(3, device=device, seed=15).abs()
    gw = torch.zeros(19, 21, device=device)
    with policy.force_path("kernel"):
        ops.clipped_grad_accumulate_(g, x, scale, gw, None)
    ref = torch.einsum("b,bij->ij", scale.double(), _per_sample_ref(g, x))
    assert_close(gw, ref, k=2100, what="Σ s_i G_iᵀX_i over 2100 rows")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,n,m", SHAPES)
def test_per_sample_grads_op(device, dtype, batch, n, m):
    x = rand(*batch, m, device=device, dtype=dtype, seed=16)
    g = rand(*batch, n, device=device, dtype=dtype, seed=17)
    poison_allocator((batch[0], n, m), dtype, device)
    got = ops.per_sample_grads(g, x)
    ref = _per_sample_ref(g, x)
    peers = [torch.einsum("bti,btj->bij", g.reshape(batch[0], -1, n), x.reshape(batch[0], -1, m))]
    assert_close(got, ref, k=x[0].numel() // m, peers=peers, what="G_iᵀX_i")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_operands(device):
    x = rand(7, 4, 3, device=device, dtype=torch.float64, seed=18).transpose(0, 1)  # [4, 7, 3]
    g = rand(5, 4, 7, device=device, dtype=torch.float64, seed=19).permute(1, 2, 0)  # [4, 7, 5]
    assert not x.is_contiguous() and not g.is_contiguous()
    per = _per_sample_ref(g, x)
    for method in ("ghost", "direct"):
        got = ops.per_sample_grad_norms(g, x, True, method)
        ref = per.square().sum((1, 2)) + _bias_ref(g).square().sum(1)
        assert_close(got, ref, k=35, what=f"non-contiguous {method}")
    assert_close(ops.per_sample_grads(g, x), per, k=7, what="non-contiguous per-sample grads")
    scale = torch.rand(4, device=device, dtype=torch.float64)
    gw = torch.zeros(5, 3, device=device, dtype=torch.float64)
    ops.clipped_grad_accumulate_(g, x, scale, gw, None)
    assert_close(gw, torch.einsum("b,bij->ij", scale, per), k=28, what="non-contiguous clipped")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5), (0, 3, 5), (3, 0, 5), (3, 4, 0)], ids=str)
def test_empty(device, shape):
    x = rand(*shape, device=device, seed=20)
    g = rand(*shape[:-1], 4, device=device, seed=21)
    B = shape[0]
    for method in ("ghost", "direct"):
        norms = ops.per_sample_grad_norms(g, x, True, method)
        expected = _bias_ref(g).square().sum(1) if shape[-1] == 0 else torch.zeros(B)
        assert norms.shape == (B,)
        assert_close(norms, expected.reshape(B), what=f"empty {shape} {method}")
    per = ops.per_sample_grads(g, x)
    assert per.shape == (B, 4, shape[-1]) and torch.all(per == 0)
    gw, gb = rand(4, shape[-1], device=device, seed=22), rand(4, device=device, seed=23)
    before = gw.clone(), gb.clone()
    ops.clipped_grad_accumulate_(g, x, torch.ones(B, device=device), gw, gb)
    assert torch.equal(gw, before[0])
    assert_close(gb, before[1].double() + _bias_ref(g).sum(0), k=max(1, g.numel()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    x = rand(3, 2, 5, device=device, dtype=dtype, seed=24)
    g = rand(3, 2, 4, device=device, dtype=dtype, seed=25)
    scale = torch.rand(3, device=device, dtype=per_sample.per_sample_acc_dtype(dtype))
    for bias, method in [(False, "ghost"), (True, "direct"), (True, "auto")]:
        torch.library.opcheck(ops.per_sample_grad_norms.default, (g, x, bias, method))
    torch.library.opcheck(ops.per_sample_grads.default, (g, x))
    gw, gb = rand(4, 5, device=device, dtype=dtype), rand(4, device=device, dtype=dtype)
    torch.library.opcheck(ops.clipped_grad_accumulate_.default, (g, x, scale, gw, gb))
    torch.library.opcheck(ops.clipped_grad_accumulate_.default, (g, x, scale, None, gb))


def test_norms_do_not_depend_on_the_thread_count():
    x, g = rand(3, 50, 40, seed=26), rand(3, 50, 30, seed=27)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append([ops.per_sample_grad_norms(g, x, True, m) for m in ("ghost", "direct")])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ---- the noise op ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noise_op_statistics(dtype):
    """add_gaussian_noise_ draws N(0, std²): moments, tails, the normal CDF (Kolmogorov-
    Smirnov), no correlation between a pair's cosine and sine or between neighbours."""
    n, std = 1 << 20, 1.7
    base = rand(n, dtype=dtype, seed=46)
    t = base.clone()
    ops.add_gaussian_noise_(t, std, 2024)
    z = (t.double() - base.double()) / std
    if dtype in LOW_PRECISION:  # the sum is rounded to 16 bits: check the moments only
        assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
        return
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    kurtosis = (z**4).mean().item() / z.var().item() ** 2
    assert abs(kurtosis - 3) < 5 * math.sqrt(24) * se
    tail = (z.abs() > 3).double().mean().item()
    expected = math.erfc(3 / math.sqrt(2))
    assert abs(tail - expected) < 5 * math.sqrt(expected / n)
    assert z.abs().max().item() < 6.0  # float Box-Muller: |z| ≤ 5.9
    s, _ = z.sort()
    cdf = 0.5 * torch.erfc(-s / math.sqrt(2))
    ranks = torch.arange(n + 1, dtype=torch.float64) / n
    ks = torch.maximum((ranks[1:] - cdf).abs().max(), (cdf - ranks[:-1]).abs().max()).item()
    assert ks < 1.95 / math.sqrt(n)  # 0.1 % level
    blocks = z.view(-1, 16)
    pairs = torch.corrcoef(torch.stack([blocks[:, :8].flatten(), blocks[:, 8:].flatten()]))
    neighbours = torch.corrcoef(torch.stack([z[:-1], z[1:]]))
    assert abs(pairs[0, 1].item()) < 5 / math.sqrt(n / 2)
    assert abs(neighbours[0, 1].item()) < 5 * se


def test_noise_op_is_a_function_of_seed_and_index():
    a, b, c = torch.zeros(1000), torch.zeros(1000), torch.zeros(1000)
    ops.add_gaussian_noise_(a, 1.0, 5)
    ops.add_gaussian_noise_(b, 1.0, 5)
    ops.add_gaussian_noise_(c, 1.0, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    fresh = torch.full((1000,), float("nan"))  # not accumulating: the buffer is only written
    ops.add_gaussian_noise_(fresh, 1.0, 5, False)
    assert torch.equal(fresh, a)
    part = torch.zeros(37)  # a prefix draws the same values, whatever the length
    ops.add_gaussian_noise_(part, 1.0, 5)
    assert torch.equal(part, a[:37])
    threads = torch.get_num_threads()
    big = [torch.zeros(1 << 18), torch.zeros(1 << 18)]
    try:
        for t, k in zip(big, (1, 2), strict=True):
            torch.set_num_threads(k)
            ops.add_gaussian_noise_(t, 0.5, 11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*big)
    empty = torch.zeros(0)
    ops.add_gaussian_noise_(empty, 1.0, 1)
    unchanged = rand(5, seed=47)
    before = unchanged.clone()
    ops.add_gaussian_noise_(unchanged, 0.0, 1)
    assert torch.equal(unchanged, before)
    torch.library.opcheck(ops.add_gaussian_noise_.default, (rand(9, seed=48), 0.3, 4))


@pytest.mark.parametrize(
    "make,std,match",
    [
        (lambda: torch.ones(4, dtype=torch.long), 1.0, r"self must be a floating point tensor"),
        (lambda: rand(4, 5).t(), 1.0, r"self must be contiguous, got strides \[1, 5\]"),
        (lambda: rand(4), -1.0, r"std must be >= 0, got -1"),
    ],
)
def test_noise_op_errors(make, std, match):
    from torchmatgrad import _compat

    t = make()
    with pytest.raises(RuntimeError, match=match) as real:
        ops.add_gaussian_noise_(t, std, 0)
    mode = _compat.fake_tensor_mode()
    fake_t = mode.from_tensor(t)
    with mode, pytest.raises(RuntimeError) as fake:
        ops.add_gaussian_noise_(fake_t, std, 0)
    assert str(fake.value) == str(real.value)


# ---- every CPU instruction set --------------------------------------------------------------


@pytest.mark.parametrize(
    "isa", [isa for isa in ("baseline", "avx2", "avx512") if isa != torchmatgrad._C.cpu_isa]
)
def test_kernels_under_isa(isa):
    """The per-sample kernels of the ISA units this CPU does not pick by default (tests/test_isa.py
    does the same for the linear kernels)."""
    from test_isa import TESTS, _run, _usable

    why = _usable(isa)
    if why is not None:
        pytest.skip(f"this CPU cannot run the {isa} kernels: {why}")
    pick = "norms_op or clipped_op or per_sample_grads_op or noise_op or empty or thread_count"
    args = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not cuda", "-k", pick]
    # test_per_sample.py: test_empty_batch_adds_noise_only (the noise op on an empty batch)
    files = [str(TESTS / f) for f in ("test_per_sample_ops.py", "test_per_sample.py")]
    done = _run([*args, *files], isa, 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
