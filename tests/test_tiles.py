"""bf16 products through the matrix-engine drivers (csrc/cpu/tile_gemm.h) against float64.

Every test here runs in the default unit too (where bf16 takes the lanes kernels); tests/test_isa.py
runs this file again under TORCHMATGRAD_CPU_ISA=amx (where the CPU has AMX) and amxemu (the same
drivers on a software model of the tiles, on any AVX-512 CPU), where the sizes below hit every
tail: rows not a multiple of 16 or 32, K not a multiple of 32 (and odd, and below 32), N not a
multiple of 16, one or two tiles of each operand, several column panels.
"""

from __future__ import annotations

import pytest
import torch

import torchmatgrad
from torchmatgrad import policy
from torchmatgrad.testing import assert_close, poison_allocator, rand

ops = torch.ops.torchmatgrad
BF16 = torch.bfloat16
# (rows, n = out_features, m = in_features)
SHAPES = [
    (5, 7, 3),
    (16, 16, 32),
    (17, 33, 65),
    (31, 48, 31),
    (33, 17, 64),
    (64, 100, 333),
    (100, 260, 96),
    (40, 9, 1),
    (300, 129, 47),
]
if torchmatgrad._C.cpu_isa != "amxemu":  # the model of the tiles is slow: no large panel there
    SHAPES.append((130, 600, 2100))


@pytest.fixture(autouse=True)
def _kernel_path():
    with policy.force_path("kernel"):
        yield


def _ref(t):
    return t.detach().double()


@pytest.mark.parametrize("R,n,m", SHAPES)
def test_forward(R, n, m):
    x, W, b = rand(R, m, dtype=BF16, seed=1), rand(n, m, dtype=BF16, seed=2), rand(n, dtype=BF16)
    poison_allocator((R, n), BF16, "cpu")
    y = ops.linear(x, W, b)
    ref = _ref(x) @ _ref(W).t() + _ref(b)
    assert_close(y, ref, k=m, peers=[torch.nn.functional.linear(x, W, b)], what="y")
    assert_close(ops.linear(x, W, None), ref - _ref(b), k=m, what="y without bias")


@pytest.mark.parametrize("R,n,m", SHAPES)
def test_backward(R, n, m):
    x, W, g = rand(R, m, dtype=BF16, seed=3), rand(n, m, dtype=BF16, seed=4), rand(R, n, dtype=BF16)
    poison_allocator((n, m), BF16, "cpu")
    gi, gw, gb = ops.linear_backward(g, x, W, [True, True, True])
    assert_close(gi, _ref(g) @ _ref(W), k=n, peers=[g @ W], what="grad_input")
    assert_close(gw, _ref(g).t() @ _ref(x), k=R, peers=[g.t() @ x], what="grad_weight")
    assert_close(gb, _ref(g).sum(0), k=R, what="grad_bias")


@pytest.mark.parametrize("R,n,m", SHAPES[2:6])
@pytest.mark.parametrize("master", [False, True], ids=["bf16-grad", "fp32-main-grad"])
def test_accumulate(R, n, m, master):
    x, W, g = rand(R, m, dtype=BF16, seed=5), rand(n, m, dtype=BF16, seed=6), rand(R, n, dtype=BF16)
    old = rand(n, m, dtype=torch.float32 if master else BF16, seed=7)
    buf = old.clone()
    gi, gb = ops.linear_backward_accumulate_(g, x, W, buf, [True, True])
    ref = _ref(old) + _ref(g).t() @ _ref(x)
    assert_close(buf, ref, k=R + 1, peers=[] if master else [old + g.t() @ x], what="grad_weight")
    assert_close(gi, _ref(g) @ _ref(W), k=n, what="grad_input")


def test_strided_and_offset_operands():
    """x a transposed, offset view; 3-D input; a weight that is a column slice (copied once)."""
    base = rand(70, 90, dtype=BF16, seed=8)
    x = base[3:68, 5:].t()  # [85, 65], strides (1, 90), offset
    Wbase = rand(40, 80, dtype=BF16, seed=9)
    W = Wbase[:, 7:72]  # [40, 65], row stride 80
    b = rand(40, dtype=BF16, seed=10)
    y = ops.linear(x, W, b)
    assert_close(y, _ref(x) @ _ref(W).t() + _ref(b), k=65, what="y")
    x3 = rand(3, 11, 65, dtype=BF16, seed=11)[:, ::2]  # [3, 6, 65], non-contiguous
    y3 = ops.linear(x3, W, b)
    assert_close(y3, _ref(x3) @ _ref(W).t() + _ref(b), k=65, what="y (3-D)")
    g3 = rand(3, 6, 40, dtype=BF16, seed=12)
    gi, gw, _ = ops.linear_backward(g3, x3, W, [True, True, False])
    g2, x2 = _ref(g3).reshape(-1, 40), _ref(x3).reshape(-1, 65)
    assert_close(gi, (g2 @ _ref(W)).reshape(3, 6, 65), k=40, what="grad_input")
    assert_close(gw, g2.t() @ x2, k=18, what="grad_weight")


def test_empty_and_zero_width():
    W = rand(20, 0, dtype=BF16, seed=13)
    b = rand(20, dtype=BF16, seed=14)
    y = ops.linear(rand(9, 0, dtype=BF16, seed=15), W, b)
    assert torch.equal(y, b.expand(9, 20))
    assert ops.linear(rand(0, 8, dtype=BF16), rand(5, 8, dtype=BF16), None).shape == (0, 5)
    assert ops.linear(rand(9, 8, dtype=BF16), rand(0, 8, dtype=BF16), None).shape == (9, 0)


def test_module_step_matches_torch():
    torch.manual_seed(0)
    ref = torch.nn.Linear(65, 37, dtype=BF16)
    ours = torchmatgrad.nn.Linear.from_linear(torch.nn.Linear(65, 37, dtype=BF16))
    ours.load_state_dict(ref.state_dict())
    x = rand(4, 9, 65, dtype=BF16, seed=16)
    ours(x).square().sum().backward()
    wd, bd = _ref(ref.weight).requires_grad_(), _ref(ref.bias).requires_grad_()
    torch.nn.functional.linear(_ref(x), wd, bd).square().sum().backward()
    assert_close(ours.weight.grad, wd.grad, k=40, scale=float(wd.grad.abs().max()) * 2)
    assert_close(ours.bias.grad, bd.grad, k=40, scale=float(bd.grad.abs().max()) * 2)


def test_info_names_the_tiles():
    from torchmatgrad.cli import info

    tiles = torchmatgrad._C.cpu_isa in ("amx", "amxemu")
    assert (info.dispatch_path("cpu", 17, BF16, 256, 256) == "cpu:tiles") == tiles
    assert (info.dispatch_path("cpu", 17, BF16, 256, 256, "backward") == "cpu:tiles") == tiles
    assert info.dispatch_path("cpu", 16, BF16, 256, 256, "backward") != "cpu:tiles"
    assert info.dispatch_path("cpu", 17, torch.float32, 256, 256) != "cpu:tiles"
    assert torchmatgrad._C.cpu_amx in info.info_text()
