"""Gradient accumulation fused into the backward kernel (grad_accumulation="fused"/"main_grad")."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import torchmatgrad
from torchmatgrad import accumulate
from torchmatgrad.nn import Linear, set_grad_accumulation
from torchmatgrad.testing import OpLog, assert_close, rand


def pair(dtype, bias=True, device="cpu", mode="fused", n=29, m=37):
    torch.manual_seed(0)
    ref = torch.nn.Linear(m, n, bias=bias, device=device, dtype=dtype)
    ours = Linear(m, n, bias=bias, device=device, dtype=dtype, grad_accumulation=mode)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def micro_batches(ref, ours, k, rows, dtype, device="cpu", m=37, ref64=None):
    """k backward passes of the same inputs through ref (torch), ours and, if given, ref64
    (torch in float64 on the very same values)."""
    for _ in range(k):
        x = rand(*rows, m, device=device, dtype=dtype)
        ref(x).square().sum().backward()
        ours(x).square().sum().backward()
        if ref64 is not None:
            ref64(x.double()).square().sum().backward()


@pytest.mark.parametrize("rows", [(1,), (5,), (2, 3, 4), (40,)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_unfused(device, dtype, rows, bias):
    ref, ours = pair(dtype, bias, device)
    ref64 = torch.nn.Linear(37, 29, bias=bias, device=device, dtype=torch.float64)
    ref64.load_state_dict(ref.state_dict())
    k = 4
    micro_batches(ref, ours, k, rows, dtype, device, ref64=ref64)
    # Each gradient sums 2·y·x over k micro-batches of rows; y itself sums m = 37 terms.
    terms = 37 + k * math.prod(rows)
    for a, b, r in zip(ours.parameters(), ref.parameters(), ref64.parameters(), strict=True):
        assert_close(a.grad, r.grad, k=terms, peers=[b.grad], what="accumulated gradient")


def test_fused_kernel_is_used_and_grad_buffer_kept():
    ref, ours = pair(torch.float32, bias=False)
    micro_batches(ref, ours, 1, (3,), torch.float32)  # creates .grad (unfused, silently)
    buf = ours.weight.grad
    x = rand(3, 37)
    y = ours(x).square().sum()
    with OpLog() as log:
        y.backward()
    assert "torchmatgrad.linear_backward_accumulate_" in log.names
    assert "torchmatgrad.linear_backward" not in log.names
    assert "aten.add_" not in log.names and "aten.add" not in log.names
    assert ours.weight.grad is buf


def test_zero_grad_modes():
    ref, ours = pair(torch.float64)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    micro_batches(ref, ours, 2, (3,), torch.float64)
    opt.zero_grad(set_to_none=False)
    ref.zero_grad(set_to_none=False)
    buf = ours.weight.grad
    with OpLog() as log:
        micro_batches(ref, ours, 2, (3,), torch.float64)
    assert "torchmatgrad.linear_backward_accumulate_" in log.names
    assert ours.weight.grad is buf
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    opt.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    micro_batches(ref, ours, 3, (3,), torch.float64)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_tensor_hook_falls_back_with_warning():
    ref, ours = pair(torch.float64)
    micro_batches(ref, ours, 1, (3,), torch.float64)
    seen = []
    ours.weight.register_hook(lambda g: seen.append(g.clone()))
    ref.weight.register_hook(lambda g: None)
    accumulate._warned.clear()
    with pytest.warns(UserWarning, match="tensor hooks"):
        micro_batches(ref, ours, 1, (3,), torch.float64)
    assert len(seen) == 1 and seen[0].shape == ours.weight.shape
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_post_accumulate_hook_falls_back():
    ref, ours = pair(torch.float64)
    micro_batches(ref, ours, 1, (3,), torch.float64)
    calls = []
    ours.weight.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad.clone()))
    accumulate._warned.clear()
    with pytest.warns(UserWarning, match="post-accumulate-grad"):
        micro_batches(ref, ours, 2, (3,), torch.float64)
    assert len(calls) == 2
    torch.testing.assert_close(calls[-1], ref.weight.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_create_graph_falls_back_and_stays_differentiable():
    ref, ours = pair(torch.float64)
    micro_batches(ref, ours, 1, (3,), torch.float64)
    x = rand(3, 37, dtype=torch.float64)
    accumulate._warned.clear()
    with pytest.warns(UserWarning, match="create_graph"):
        (g_ours,) = torch.autograd.grad(ours(x).square().sum(), ours.weight, create_graph=True)
    (g_ref,) = torch.autograd.grad(ref(x).square().sum(), ref.weight, create_graph=True)
    torch.testing.assert_close(g_ours, g_ref)
    (h_ours,) = torch.autograd.grad(g_ours.sum(), ours.weight)
    (h_ref,) = torch.autograd.grad(g_ref.sum(), ref.weight)
    torch.testing.assert_close(h_ours, h_ref)


def test_retain_graph_and_no_grad():
    ref, ours = pair(torch.float64)
    micro_batches(ref, ours, 1, (3,), torch.float64)
    x = rand(3, 37, dtype=torch.float64)
    lo, lr = ours(x).square().sum(), ref(x).square().sum()
    for _ in range(2):
        lo.backward(retain_graph=True)
        lr.backward(retain_graph=True)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    before = ours.weight.grad.clone()
    with torch.no_grad():
        ours(x)
    torch.testing.assert_close(ours.weight.grad, before)


def test_shared_weight_used_twice():
    ref, ours = pair(torch.float64, n=37)
    micro_batches(ref, ours, 1, (3,), torch.float64)
    x = rand(3, 37, dtype=torch.float64)
    ours(ours(x)).sum().backward()
    ref(ref(x)).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("dtype16", [torch.bfloat16, torch.float16])
def test_main_grad_keeps_precision(dtype16):
    """Many micro-batches: a 16-bit .grad drifts from the exact sum, an fp32 main_grad does not."""
    torch.manual_seed(0)
    k = 200
    ref64 = torch.nn.Linear(16, 8, dtype=torch.float64)
    low = Linear(16, 8, dtype=dtype16)
    low.load_state_dict(ref64.state_dict())
    master = Linear(16, 8, dtype=dtype16, grad_accumulation="main_grad")
    master.load_state_dict(ref64.state_dict())
    for _ in range(k):
        x = rand(2, 16, dtype=torch.float64)
        ref64(x).sum().backward()
        low(x.to(dtype16)).sum().backward()
        master(x.to(dtype16)).sum().backward()
    exact = ref64.weight.grad
    assert master.weight.grad is None and master.weight.main_grad.dtype == torch.float32
    err_low = (low.weight.grad.double() - exact).abs().max().item()
    err_master = (master.weight.main_grad.double() - exact).abs().max().item()
    assert err_master * 8 < err_low, (err_master, err_low)


def test_set_grad_accumulation_and_bad_mode():
    model = torch.nn.Sequential(Linear(3, 4), torch.nn.ReLU(), Linear(4, 2))
    set_grad_accumulation(model, "fused")
    assert all(m.grad_accumulation == "fused" for m in model if isinstance(m, Linear))
    assert "grad_accumulation=fused" in repr(model)
    with pytest.raises(ValueError, match="grad_accumulation must be one of"):
        Linear(3, 4, grad_accumulation="sometimes")
    with pytest.raises(ValueError, match="grad_accumulation must be one of"):
        torchmatgrad.linear(rand(3), rand(2, 3), grad_accumulation="yes")


def test_no_warning_on_plain_first_step():
    ref, ours = pair(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        micro_batches(ref, ours, 2, (3,), torch.float32)


def test_autograd_grad_and_inputs_leave_grad_alone():
    """autograd.grad returns the gradient; backward(inputs=[x]) skips W: .grad must not move."""
    ref, ours = pair(torch.float64)
    micro_batches(ref, ours, 1, (3,), torch.float64)
    before = ours.weight.grad.clone()
    x = rand(3, 37, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad(ours(x).square().sum(), ours.weight)
    (gw_ref,) = torch.autograd.grad(ref(x).square().sum(), ref.weight)
    torch.testing.assert_close(gw, gw_ref)
    ours(x).square().sum().backward(inputs=[x])
    torch.testing.assert_close(ours.weight.grad, before)


@pytest.mark.parametrize("n,m,fuses", [(29, 37, False), (1024, 1024, True), (1, 1 << 20, True)])
def test_small_cpu_weights_run_unfused(monkeypatch, n, m, fuses):
    """Below FUSE_MIN_ELEMENTS_CPU a "fused" CPU call takes the op's C++ autograd (the Python
    autograd.Function costs more than the passes fusion saves); same gradient, same buffer."""
    monkeypatch.setattr(accumulate, "FUSE_MIN_ELEMENTS_CPU", 1 << 20)
    torch.manual_seed(0)
    ref = torch.nn.Linear(m, n, bias=False)
    ours = Linear(m, n, bias=False, grad_accumulation="fused")
    ours.load_state_dict(ref.state_dict())
    micro_batches(ref, ours, 1, (2,), torch.float32, m=m)  # creates .grad
    buf = ours.weight.grad
    x = rand(2, m)
    y = ours(x)
    assert ("LinearFunction" in type(y.grad_fn).__name__) is fuses, type(y.grad_fn).__name__
    with OpLog() as log:
        y.square().sum().backward()
    fused_op = "torchmatgrad.linear_backward_accumulate_" in log.names
    assert fused_op is fuses
    ref(x).square().sum().backward()
    assert ours.weight.grad is buf
    assert_close(ours.weight.grad, ref.weight.grad, k=m + 4, what="accumulated gradient")


def test_small_weight_threshold_keeps_main_grad():
    """main_grad changes where the gradient goes, so it never falls back for size."""
    assert accumulate.FUSE_MIN_ELEMENTS_CPU == 0  # conftest's fixture
    w = torch.nn.Parameter(rand(3, 4))
    assert accumulate.fuses_here(w, "main_grad")
    assert not accumulate.fuses_here(w, "unfused")


def test_fuse_threshold_default(monkeypatch):
    monkeypatch.undo()
    assert accumulate.FUSE_MIN_ELEMENTS_CPU == 1 << 20
    small = torch.nn.Parameter(rand(3, 4))
    big = torch.nn.Parameter(torch.empty(1024, 1024))
    assert not accumulate.fuses_here(small, "fused") and accumulate.fuses_here(big, "fused")
    assert accumulate.fuses_here(small, "main_grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_vendor_accumulate_is_torchs_composition(dtype):
    """On the vendor route, accumulating into a 16-bit `.grad` is torch's own mm then add_ (one
    16-bit rounding of the product, then one of the sum), bit for bit: oneDNN's fused 16-bit
    addmm_ was slower than that composition (csrc/vendor.cpp). float32 keeps the fused addmm_."""
    from torchmatgrad import policy

    torch.manual_seed(0)
    rows, n, m = 67, 45, 83
    g, x, w = rand(rows, n, dtype=dtype), rand(rows, m, dtype=dtype), rand(n, m, dtype=dtype)
    gw0 = rand(n, m, dtype=dtype)
    gw = gw0.clone()
    with policy.force_path("vendor"):
        torch.ops.torchmatgrad.linear_backward_accumulate_(g, x, w, gw, [False, False])
    if dtype == torch.float32:
        expected = gw0.clone().addmm_(g.t(), x)
    else:
        expected = gw0 + torch.mm(g.t(), x)
    assert torch.equal(gw, expected), (gw - expected).abs().max()
