"""Per-sample gradients: the ops against float64 references, and torchmatgrad.per_sample's
grad_norms / clipped_backward against torch.func.vmap(grad) per-sample gradients.

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


# ---- grad_norms / clipped_backward against vmap(grad) -------------------------------------


def _mlp(bias: bool, dtype, device, layernorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 9, bias=bias), torch.nn.Tanh()]
    if layernorm:
        layers.append(torch.nn.LayerNorm(9))
    layers += [torch.nn.Linear(9, 9, bias=bias), torch.nn.GELU(), torch.nn.Linear(9, 4, bias=bias)]
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One loss per sample (dim 0), whatever the sample's shape."""
    return (out - target).square().flatten(1).sum(1)


def _reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-sample gradients of every trainable parameter by torch.func.vmap(grad), float64."""
    ref = {k: v.detach().double() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach().double() for k, v in model.named_parameters() if not v.requires_grad}
    model64 = _double_copy(model)

    def loss(params, xi, yi):
        out = torch.func.functional_call(model64, {**params, **frozen}, (xi.unsqueeze(0),))
        return _loss(out, yi.unsqueeze(0)).sum()

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(ref, x.double(), y.double())


def _double_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy without the recording hooks (the model keeps its own)."""
    import copy

    enabled = hasattr(model, "_torchmatgrad_per_sample_hooks")
    per_sample.disable(model)
    m = copy.deepcopy(model).double()
    if enabled:
        per_sample.enable(model)
    return m


def _norms(per: dict, B: int) -> torch.Tensor:
    return torch.sqrt(sum(v.reshape(B, -1).square().sum(1) for v in per.values()))


CASES = [
    pytest.param((5,), True, id="2d-bias"),
    pytest.param((5,), False, id="2d-nobias"),
    pytest.param((5, 3), True, id="3d-bias"),
    pytest.param((4, 2, 3), False, id="4d-nobias"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch,bias", CASES)
def test_grad_norms_and_clipped_backward(device, dtype, batch, bias):
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(bias, dtype, device)))
    x = rand(*batch, 6, device=device, dtype=dtype, seed=30)
    y = rand(*batch, 4, device=device, dtype=dtype, seed=31)
    B = batch[0]
    per = _reference(model, x, y)
    ref_norms = _norms(per, B)
    k = math.prod(batch[1:]) * 81 * 3  # rows per sample × the largest layer × depth
    norms = per_sample.grad_norms(model, _loss(model(x), y))
    assert norms.dtype == dtype
    assert_close(norms, ref_norms, k=k, what="per-sample norms")
    assert all(p.grad is None for p in model.parameters()), "grad_norms left .grad alone"

    C = ref_norms.median().item()  # clips about half of the samples
    clip = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    got = per_sample.clipped_backward(model, _loss(model(x), y), C)
    assert_close(got, ref_norms, k=k, what="returned norms")
    for name, p in model.named_parameters():
        ref = torch.einsum("b,b...->...", clip, per[name])
        assert_close(p.grad, ref, k=k * B, what=f"clipped {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_clipped_backward_accumulates(device):
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float64, device)))
    x, y = rand(4, 6, device=device, dtype=torch.float64, seed=32), rand(4, 4, seed=33).double()
    y = y.to(device)
    before = {}
    for name, p in model.named_parameters():
        p.grad = rand(*p.shape, device=device, dtype=p.dtype, seed=len(before))
        before[name] = p.grad.clone()
    grads = {name: p.grad for name, p in model.named_parameters()}
    per = _reference(model, x, y)
    C = 0.5
    clip = (C / (_norms(per, 4) + 1e-6)).clamp(max=1.0)
    per_sample.clipped_backward(model, _loss(model(x), y), C)
    for name, p in model.named_parameters():
        assert p.grad is grads[name], "accumulated in place, as autograd does"
        ref = before[name].double() + torch.einsum("b,b...->...", clip, per[name])
        assert_close(p.grad, ref, k=200, what=f"accumulated {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_other_leaf_modules_are_exact(device):
    """LayerNorm's parameters (not a linear layer): per-sample gradients through torch.func."""
    model = _mlp(True, torch.float64, device, layernorm=True)
    model = per_sample.enable(torchmatgrad.nn.convert_linear(model))
    x = rand(3, 5, 6, device=device, dtype=torch.float64, seed=34)
    y = rand(3, 5, 4, device=device, dtype=torch.float64, seed=35)
    per = _reference(model, x, y)
    ref_norms = _norms(per, 3)
    C = ref_norms.min().item()
    got = per_sample.clipped_backward(model, _loss(model(x), y), C)
    assert_close(got, ref_norms, k=500, what="norms with LayerNorm")
    clip = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        assert_close(p.grad, torch.einsum("b,b...->...", clip, per[name]), k=500, what=name)


def test_embedding_and_unconverted_linear_are_exact():
    """Other leaf modules with parameters, integer inputs included, through torch.func."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(11, 6),
        torchmatgrad.nn.Linear(6, 7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 4),  # not converted
    ).double()
    per_sample.enable(model)
    idx = torch.randint(0, 11, (5, 3), generator=torch.Generator().manual_seed(44))
    y = rand(5, 3, 4, dtype=torch.float64, seed=45)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_i(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return _loss(out, yi.unsqueeze(0)).sum()

    per_sample.disable(model)
    per = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(params, idx, y)
    per_sample.enable(model)
    ref_norms = _norms(per, 5)
    C = ref_norms.median().item()
    got = per_sample.clipped_backward(model, _loss(model(idx), y), C)
    assert_close(got, ref_norms, k=100, what="norms with Embedding and nn.Linear")
    clip = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        assert_close(p.grad, torch.einsum("b,b...->...", clip, per[name]), k=100, what=name)


def test_frozen_parameters_and_bias_only_layers():
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float64, "cpu")))
    model[0].weight.requires_grad_(False)  # first layer: bias only
    model[2].requires_grad_(False)  # middle layer frozen
    x, y = rand(5, 6, dtype=torch.float64, seed=36), rand(5, 4, dtype=torch.float64, seed=37)
    per = _reference(model, x, y)
    ref_norms = _norms(per, 5)
    assert_close(per_sample.grad_norms(model, _loss(model(x), y)), ref_norms, k=300)
    C = ref_norms.median().item()
    per_sample.clipped_backward(model, _loss(model(x), y), C)
    clip = (C / (ref_norms + 1e-6)).clamp(max=1.0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, torch.einsum("b,b...->...", clip, per[name]), k=300, what=name)
        else:
            assert p.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_noise(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 64))
    model = per_sample.enable(torchmatgrad.nn.convert_linear(model.to(device)))
    x, y = rand(8, 64, device=device, seed=38), rand(8, 64, device=device, seed=39)
    C, sigma = 0.7, 1.3

    def step(noise, seed):
        model.zero_grad(set_to_none=True)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        per_sample.clipped_backward(
            model, _loss(model(x), y), C, noise_multiplier=noise, generator=gen
        )
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    clean = step(0.0, None)
    noisy, again, other = step(sigma, 1), step(sigma, 1), step(sigma, 2)
    assert torch.equal(noisy, again), "same generator state: same noise"
    assert not torch.equal(noisy, other)
    noise = (noisy - clean).double()
    N = noise.numel()  # 12 k entries: the sample std is within 5 of its own std errors
    std = sigma * C
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(N)
    assert abs(noise.std().item() / std - 1) < 5 / math.sqrt(2 * N)
    # Noise also goes into an existing .grad, on top of what is there.
    model.zero_grad(set_to_none=False)
    gen = torch.Generator(device=device).manual_seed(1)
    per_sample.clipped_backward(model, _loss(model(x), y), C, noise_multiplier=sigma, generator=gen)
    assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), noisy.double(), k=16)


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


def test_empty_batch_adds_noise_only():
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float32, "cpu")))
    x, y = rand(0, 6), rand(0, 4)
    norms = per_sample.clipped_backward(model, _loss(model(x), y), 1.0, noise_multiplier=0.0)
    assert norms.shape == (0,)
    assert all(torch.all(p.grad == 0) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    per_sample.clipped_backward(model, _loss(model(x), y), 1.0, noise_multiplier=1.0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.filterwarnings("ignore:torchmatgrad. fused gradient accumulation is off")
def test_inputs_that_are_views_and_fused_layers():
    """A non-contiguous model input, and layers with fused gradient accumulation."""
    model = torchmatgrad.nn.convert_linear(
        _mlp(True, torch.float64, "cpu"), grad_accumulation="fused"
    )
    per_sample.enable(model)
    x = rand(6, 5, dtype=torch.float64, seed=40).t()  # [5, 6], non-contiguous
    y = rand(5, 4, dtype=torch.float64, seed=41)
    per = _reference(model, x.contiguous(), y)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    per_sample.clipped_backward(model, _loss(model(x), y), 1e9)  # no clipping: the plain sum
    for name, p in model.named_parameters():
        assert_close(p.grad, per[name].sum(0), k=300, what=name)


def test_inputs_that_require_grad_get_none():
    """DP-SGD needs the parameters' gradients only: an input that requires grad is left alone
    (as torch.autograd.grad leaves it), the parameters' gradients are unchanged by it."""
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float64, "cpu")))
    x = rand(4, 6, dtype=torch.float64, seed=49)
    y = rand(4, 4, dtype=torch.float64, seed=50)
    per_sample.clipped_backward(model, _loss(model(x), y), 0.5)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    per_sample.clipped_backward(model, _loss(model(xg), y), 0.5)
    assert xg.grad is None
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, e)
    outside = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"'<a parameter of shape \[4\] outside the model>'"):
        per_sample.grad_norms(model, _loss(model(x) * outside, y))


def test_no_state_left_behind():
    model = per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(True, torch.float32, "cpu")))
    x, y = rand(4, 6, seed=42), rand(4, 4, seed=43)
    out = model(x)
    loss = _loss(out, y)
    node = out.grad_fn.next_functions[0][0]  # the last Linear's output node, under the loss
    recorded = [n for n in _nodes(loss.grad_fn) if "torchmatgrad.per_sample" in n.metadata]
    assert len(recorded) == 3
    per_sample.clipped_backward(model, loss, 1.0)
    assert not any("torchmatgrad.per_sample" in n.metadata for n in _nodes(loss.grad_fn))
    del node
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 3
    per_sample.disable(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with torch.no_grad():  # nothing recorded without a graph
        per_sample.enable(model)(x)


def _nodes(root):
    seen, todo = {root}, [root]
    while todo:
        node = todo.pop()
        yield node
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)


# ---- bad inputs ---------------------------------------------------------------------------


def _fresh(bias=True):
    return per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(bias, torch.float32, "cpu")))


def test_error_without_enable():
    model = torchmatgrad.nn.convert_linear(_mlp(True, torch.float32, "cpu"))
    loss = _loss(model(rand(3, 6)), rand(3, 4))
    match = r"parameters '0.weight', '0.bias', .* get a gradient but belong to no recorded layer"
    with pytest.raises(RuntimeError, match=match + r" \(per_sample.enable\(model\) before"):
        per_sample.grad_norms(model, loss)


def loop_reference(model, loss, max_norm):
    """The definition: each sample's gradient by its own backward, its norm over every
    parameter, and Σ_i min(1, C / (‖∇_i‖ + 1e-6))·∇_i, in the parameters' dtype."""
    params = [p for p in model.parameters() if p.requires_grad]
    per = [
        torch.autograd.grad(loss[i], params, retain_graph=True, allow_unused=True)
        for i in range(loss.shape[0])
    ]
    per = [
        [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]
        for gs in per
    ]
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in per])
    clip = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = [sum(c * gs[k] for c, gs in zip(clip, per, strict=True)) for k in range(len(params))]
    return norms, dict(zip(params, summed, strict=True))


def check_against_loop(model, forward, tol=1e-9):
    """clipped_backward and grad_norms on ``model`` (float64) against loop_reference, with the
    clipping bound between the samples' norms (some clipped, some not)."""
    per_sample.enable(model)
    ref_norms, _ = loop_reference(model, forward(), 1.0)
    max_norm = ref_norms.median().item() * 1.01
    ref_norms, ref = loop_reference(model, forward(), max_norm)
    got_norms = per_sample.grad_norms(model, forward())
    model.zero_grad(set_to_none=True)
    clipped = per_sample.clipped_backward(model, forward(), max_norm)
    for norms in (got_norms, clipped):
        assert ((norms - ref_norms).abs() <= tol * ref_norms.abs().max()).all(), (norms, ref_norms)
    names = {p: n for n, p in model.named_parameters()}
    for p, want in ref.items():
        err = (p.grad - want).abs().max() / want.abs().max().clamp_min(1e-300)
        assert err <= tol, f"{names[p]}: relative error {err:.3g}"
    return ref_norms


def test_module_called_twice_and_tied_embedding_head():
    torch.manual_seed(0)
    lin = torchmatgrad.nn.Linear(5, 5).double()
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    x, y = rand(3, 5, dtype=torch.float64), rand(3, 5, dtype=torch.float64)
    check_against_loop(model, lambda: _loss(model(x), y))

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 5, padding_idx=0)
            self.pos = torch.nn.Embedding(3, 5)
            self.head = torchmatgrad.nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            pos = self.pos(torch.arange(idx.shape[1]).unsqueeze(0))  # [1, T]: shared
            h = torch.tanh(self.emb(idx) + pos)
            return self.head(h * self.emb(idx[:, :1]))  # the embedding called twice

    torch.manual_seed(1)
    model = Tied().double()
    idx = torch.tensor([[1, 2, 2], [3, 0, 1], [6, 6, 6], [2, 5, 4]])
    y = rand(4, 3, 7, dtype=torch.float64)
    check_against_loop(model, lambda: _loss(model(idx), y))


def test_error_reused_module_of_another_kind():
    norm = torch.nn.LayerNorm(5)
    model = per_sample.enable(torch.nn.Sequential(norm, torch.nn.Tanh(), norm))
    loss = _loss(model(rand(3, 5)), rand(3, 5))
    with pytest.raises(
        RuntimeError, match=r"parameters '0.weight', '0.bias' are used by more than one layer call"
    ):
        per_sample.clipped_backward(model, loss, 1.0)
    assert norm.weight.grad is None


def test_error_parameter_used_outside_its_layer():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torchmatgrad.nn.Linear(5, 5)

        def forward(self, x):
            return self.lin(x) + x @ self.lin.weight

    model = per_sample.enable(Leaky())
    loss = _loss(model(rand(3, 5)), rand(3, 5))
    with pytest.raises(
        RuntimeError, match=r"parameters 'lin.weight' are used outside their own layer"
    ):
        per_sample.grad_norms(model, loss)


def test_error_parameters_of_a_non_leaf_module():
    class WithScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torchmatgrad.nn.Linear(5, 5)
            self.scale = torch.nn.Parameter(torch.ones(5))

        def forward(self, x):
            return self.lin(x) * self.scale

    model = per_sample.enable(WithScale())
    loss = _loss(model(rand(3, 5)), rand(3, 5))
    with pytest.raises(
        RuntimeError, match=r"parameters 'scale' get a gradient but belong to no recorded layer"
    ):
        per_sample.clipped_backward(model, loss, 1.0)
    assert model.lin.weight.grad is None and model.scale.grad is None


def test_error_bad_arguments():
    model = _fresh()
    x, y = rand(3, 6), rand(3, 4)
    with pytest.raises(RuntimeError, match=r"loss_per_sample must be 1-D \(samples,\)"):
        per_sample.grad_norms(model, _loss(model(x), y).sum())
    with pytest.raises(RuntimeError, match=r"loss_per_sample must be 1-D"):
        per_sample.grad_norms(model, (model(x) - y).square())
    with pytest.raises(RuntimeError, match=r"samples must be its dim 0, B = 2"):
        per_sample.grad_norms(model, _loss(model(x), y)[:2])
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        per_sample.grad_norms(model, _loss(model(x), y).detach())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"max_norm must be a positive number"):
            per_sample.clipped_backward(model, _loss(model(x), y), bad)
    with pytest.raises(ValueError, match=r"noise_multiplier must be ≥ 0"):
        per_sample.clipped_backward(model, _loss(model(x), y), 1.0, noise_multiplier=-1.0)
    with pytest.raises(RuntimeError, match=r"method must be 'auto', 'ghost' or 'direct'"):
        per_sample.grad_norms(model, _loss(model(x), y), method="gram")
    assert all(p.grad is None for p in model.parameters())


def test_error_vector_input():
    lin = per_sample.enable(torchmatgrad.nn.Linear(5, 3))
    loss = lin(rand(5)).square().sum().reshape(1)
    with pytest.raises(RuntimeError, match=r"need a batch of samples"):
        per_sample.grad_norms(lin, loss)


def test_error_autocast():
    model = _fresh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(rand(3, 6))
    with pytest.raises(RuntimeError, match=r"is cast \(autocast\?\)"):
        per_sample.grad_norms(model, _loss(out.float(), rand(3, 4)))


# ---- the tools --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--dtype", "float32", "--n", "5", "--m", "7", "--B", "4", "--T", "3", "--seed", "1"],
        ["--T", "1"],
    ],
    ids=["default", "float32", "T=1"],
)
def test_explain_per_sample(argv, capsys):
    from torchmatgrad.cli import explain

    assert explain.main(["--per-sample", *argv]) == 0
    out = capsys.readouterr().out
    assert "⟨G_i·G_iᵀ, X_i·X_iᵀ⟩_F" in out and "MISMATCH" not in out


def test_bench_dp_runs(tmp_path, capsys):
    import json

    from torchmatgrad.cli import bench

    argv = ["--case", "dp", "--device", "cpu", "--d", "32", "--blocks", "1", "--B", "3"]
    argv += ["--T", "5", "--reps", "2", "--warmup", "1", "--out", str(tmp_path), "--name", "dp"]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "dp.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) <= set(bench.dp.VARIANTS) and {"non-private", "torchmatgrad"} <= set(rows)
    for r in rows.values():
        assert r["error"] is None, r
        assert r["median_ms"] > 0 and r["peak_mb"] > 0
    for name in ("opacus-hooks", "opacus-ghost"):
        if name in rows:  # the three DP steps agree (noise 0)
            assert rows[name]["grad_rel_diff_vs_torchmatgrad"] < 1e-5
    assert "torchmatgrad" in capsys.readouterr().out


def test_bench_peak_counts_the_block_cache():
    """A step's peak covers what it leaves alive: the gradients, 1 MiB and more of them from
    the CPU block cache, which torch's profiler does not see."""
    from torchmatgrad.cli.bench import dp, memory

    model = torch.nn.Sequential(torchmatgrad.nn.Linear(600, 700), torchmatgrad.nn.Linear(700, 500))
    x = rand(3, 600)

    def step():
        model(x).square().sum().backward()

    step()
    model.zero_grad(set_to_none=True)
    peak = memory.cpu_peak(step)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert grads >= 2**20 and peak >= grads
    assert peak < grads + 2**20  # activations are small here
    assert dp.cpu_peak is memory.cpu_peak


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
    done = _run([*args, str(TESTS / "test_per_sample.py")], isa, 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
