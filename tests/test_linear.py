"""The ops and `torchmatgrad.linear` against torch, autograd and float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cell_params
from hypothesis import given, settings
from hypothesis import strategies as st

import torchmatgrad
from torchmatgrad.testing import OP_CHECKS, assert_close, poison_allocator, rand

ops = torch.ops.torchmatgrad

SIZES = [(0, 3), (3, 0), (1, 1), (3, 17), (17, 3), (64, 64), (1000, 17), (3, 1000)]
BATCHES = [(), (0,), (1,), (7,), (2, 3, 5)]


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("n,m", SIZES)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward(device, dtype, n, m, batch, bias):
    x = rand(*batch, m, device=device, dtype=dtype)
    w = rand(n, m, device=device, dtype=dtype)
    b = rand(n, device=device, dtype=dtype) if bias else None
    poison_allocator((*batch, n), dtype, device)
    y = torchmatgrad.linear(x, w, b)
    assert_close(y, reference(x, w, b), k=m, peers=[F.linear(x, w, b)], what="forward")


@pytest.mark.parametrize("n,m", SIZES)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
def test_backward_op(device, dtype, n, m, batch):
    x = rand(*batch, m, device=device, dtype=dtype)
    w = rand(n, m, device=device, dtype=dtype)
    g = rand(*batch, n, device=device, dtype=dtype)
    poison_allocator((n, m), dtype, device)
    gi, gw, gb = ops.linear_backward(g, x, w, [True, True, True])
    rows = math.prod(batch)
    G, X, W = g.reshape(rows, n), x.reshape(rows, m), w
    G64, X64 = G.double(), X.double()
    ref_gi = (G64 @ W.double()).reshape(x.shape)
    assert_close(gi, ref_gi, k=n, peers=[(G @ W).reshape(x.shape)], what="grad_input")
    assert_close(gw, G64.t() @ X64, k=rows, peers=[G.t() @ X], what="grad_weight")
    assert_close(gb, G64.sum(0), k=rows, peers=[G.sum(0)], what="grad_bias")


@pytest.mark.parametrize("rows", [3, 40])
def test_backward_large_grad_weight(rows):
    """A grad_W larger than the L2 and the block cache's threshold (8 MB, from the block cache),
    with an odd width that leaves most rows unaligned; written and accumulated, few rows and
    many rows, on the hand-written kernel."""
    from torchmatgrad import policy

    n, m = 2051, 1001
    x, w, g = rand(rows, m), rand(n, m), rand(rows, n)
    poison_allocator((n, m), torch.float32, "cpu")
    with policy.force_path("kernel"):
        gi, gw, _ = ops.linear_backward(g, x, w, [True, True, False])
        acc = rand(n, m)
        expect_acc = acc.double() + g.double().t() @ x.double()
        ops.linear_backward_accumulate_(g, x, w, acc, [False, False])
    ref = g.double().t() @ x.double()
    assert_close(gw, ref, k=rows, peers=[g.t() @ x], what="grad_weight")
    assert_close(gi, g.double() @ w.double(), k=n, peers=[g @ w], what="grad_input")
    assert_close(acc, expect_acc, k=rows + 1, what="accumulated")


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_every_row_tail(device, dtype, rows):
    """Every length of a row's last partial vector (1 to 2 vectors of 64 bytes plus 1: the
    masked ends of the CPU kernels, for 8- to 64-lane vectors), forward, backward and the
    accumulating backward (whose masked ends read and write grad_W), on the hand-written
    kernels; outputs poisoned first. n = 6 covers a group of 4 W rows and a lone one."""
    from torchmatgrad import policy

    n = 6
    for m in range(1, 34):
        x, w, b, g = (
            rand(rows, m, device=device, dtype=dtype),
            rand(n, m, device=device, dtype=dtype),
            rand(n, device=device, dtype=dtype),
            rand(rows, n, device=device, dtype=dtype),
        )
        acc = rand(n, m, device=device, dtype=dtype)
        X, W, G = x.double(), w.double(), g.double()
        expect_acc = acc.double() + G.t() @ X
        with policy.force_path("kernel"):
            poison_allocator((rows, n), dtype, device)
            y = ops.linear(x, w, b)
            poison_allocator((n, m), dtype, device)
            gi, gw, _ = ops.linear_backward(g, x, w, [True, True, False])
            ops.linear_backward_accumulate_(g, x, w, acc, [False, False])
        what = f"m={m}"
        assert_close(
            y, F.linear(X, W, b.double()), k=m, peers=[F.linear(x, w, b)], what=f"forward {what}"
        )
        assert_close(gi, G @ W, k=n, peers=[g @ w], what=f"grad_input {what}")
        assert_close(gw, G.t() @ X, k=rows, peers=[g.t() @ x], what=f"grad_weight {what}")
        assert_close(acc, expect_acc, k=rows + 1, peers=[acc], what=f"accumulated {what}")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    "n,m,rows", [(16, 4099, 8), (5, 16387, 3), (24, 8191, 16), (300, 301, 16)], ids=str
)
def test_few_rows_backward_splits(dtype, threads, n, m, rows):
    """The CPU's few-rows backward splits W among threads by its columns where W is short next
    to the rows (n·256 ≤ rows·m: the first three shapes) and by its rows elsewhere (the last).
    Odd widths put masked ends at chunk and tile boundaries; 5 rows of W leave a lone one in
    both register groups. Written, accumulated, and for a 16-bit weight accumulated into a
    float32 gradient (main_grad); outputs poisoned first."""
    from torchmatgrad import policy

    x, w, g = rand(rows, m, dtype=dtype), rand(n, m, dtype=dtype), rand(rows, n, dtype=dtype)
    acc, acc32 = rand(n, m, dtype=dtype), rand(n, m)
    X, W, G = x.double(), w.double(), g.double()
    expect_acc, expect_acc32 = acc.double() + G.t() @ X, acc32.double() + G.t() @ X
    main_grad = dtype in (torch.bfloat16, torch.float16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with policy.force_path("kernel"):
            poison_allocator((n, m), dtype, "cpu")
            poison_allocator((rows, m), dtype, "cpu")
            gi, gw, _ = ops.linear_backward(g, x, w, [True, True, False])
            ops.linear_backward_accumulate_(g, x, w, acc, [False, False])
            if main_grad:
                ops.linear_backward_accumulate_(g, x, w, acc32, [False, False])
    finally:
        torch.set_num_threads(before)
    assert_close(gi, G @ W, k=n, peers=[g @ w], what="grad_input")
    assert_close(gw, G.t() @ X, k=rows, peers=[g.t() @ x], what="grad_weight")
    assert_close(acc, expect_acc, k=rows + 1, peers=[acc], what="accumulated")
    if main_grad:
        assert_close(acc32, expect_acc32, k=rows + 1, what="accumulated into float32")


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize(
    "mask", [[True, False, False], [False, True, False], [False, False, True], [True, True, False]]
)
def test_backward_mask(device, rows, mask):
    x, w = rand(rows, 9, device=device), rand(6, 9, device=device)
    g = rand(rows, 6, device=device)
    full = ops.linear_backward(g, x, w, [True, True, True])
    part = ops.linear_backward(g, x, w, mask)
    for wanted, got, ref in zip(mask, part, full, strict=True):
        if wanted:
            torch.testing.assert_close(got, ref)
        else:
            assert got is None


def test_jacobians_match_autograd(device, dtype):
    """d(Wx+b)/dW in autograd's exact (n, n, m) layout, and d/dx, d/db."""
    n, m = 4, 3
    x, w, b = (rand(*s, device=device, dtype=dtype) for s in [(m,), (n, m), (n,)])
    ours = torch.autograd.functional.jacobian(torchmatgrad.linear, (x, w, b))
    theirs = torch.autograd.functional.jacobian(F.linear, (x, w, b))
    ref = torch.autograd.functional.jacobian(F.linear, (x.double(), w.double(), b.double()))
    assert ours[1].shape == (n, n, m)
    for a, t, r in zip(ours, theirs, ref, strict=True):  # one-hot rows: one term per entry
        assert_close(a, r, k=1, peers=[t], what="jacobian")
    delta = torch.einsum("ik,l->ikl", torch.eye(n, dtype=torch.float64), x.double().cpu())
    torch.testing.assert_close(ref[1].cpu(), delta)


@pytest.mark.parametrize("check,device,dtype", cell_params(OP_CHECKS))
def test_check_command_cells(check, device, dtype):
    """The cells `python -m torchmatgrad check` prints."""
    check.run(device, dtype)


def test_check_command_exits_zero(capsys):
    from torchmatgrad.cli.check import main

    assert main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gradcheck" in out and "all checks passed" in out


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(device, batch, bias):
    x = rand(*batch, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = rand(3, 5, device=device, dtype=torch.float64, requires_grad=True)
    b = rand(3, device=device, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(torchmatgrad.linear, (x, w, b))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, dtype, requires_grad):
    x = rand(3, 5, device=device, dtype=dtype, requires_grad=requires_grad)
    w = rand(4, 5, device=device, dtype=dtype, requires_grad=requires_grad)
    b = rand(4, device=device, dtype=dtype, requires_grad=requires_grad)
    g = rand(3, 4, device=device, dtype=dtype, requires_grad=requires_grad)
    torch.library.opcheck(ops.linear.default, (x, w, b))
    torch.library.opcheck(ops.linear.default, (x, w, None))
    torch.library.opcheck(ops.linear_backward.default, (g, x, w, [True, True, True]))
    torch.library.opcheck(ops.linear_backward.default, (g, x, w, [True, False, True]))
    if not requires_grad:  # a mutating op has no autograd formula
        buf = rand(4, 5, device=device, dtype=dtype)
        torch.library.opcheck(ops.linear_backward_accumulate_.default, (g, x, w, buf, [True, True]))


def test_compile_fullgraph_matches_eager(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchmatgrad.nn.Linear(7, 16, device=device),
        torch.nn.GELU(),
        torchmatgrad.nn.Linear(16, 3, device=device),
    )
    x = rand(5, 7, device=device)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize(
    "layout", ["transposed_weight", "sliced_weight", "transposed_input", "strided_input"]
)
def test_non_contiguous(device, layout):
    n, m = 6, 9
    x, w, b = rand(4, m, device=device), rand(n, m, device=device), rand(n, device=device)
    if layout == "transposed_weight":
        w = rand(m, n, device=device).t()
    elif layout == "sliced_weight":
        w = rand(n, 2 * m, device=device)[:, ::2]
    elif layout == "transposed_input":
        x = rand(m, 4, device=device).t()
    else:
        x = rand(4, 3 * m, device=device)[:, 1::3]
    assert not (x.is_contiguous() and w.is_contiguous())
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    xo, wo, bo = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = torchmatgrad.linear(xo, wo, bo)
    ref = F.linear(xr, wr, br)
    torch.testing.assert_close(y, ref)
    g = rand(4, n, device=device)
    y.backward(g)
    ref.backward(g)
    for a, r in [(xo, xr), (wo, wr), (bo, br)]:
        torch.testing.assert_close(a.grad, r.grad)


def test_non_contiguous_grad_output(device):
    x, w = rand(5, 4, device=device, requires_grad=True), rand(3, 4, device=device)
    g = rand(3, 5, device=device).t()
    gi = ops.linear_backward(g, x, w, [True, False, False])[0]
    torch.testing.assert_close(gi, g @ w)


def test_dependent_input(device):
    """x = F(W)·x0 depends on W: the total gradient has both paths."""
    w = rand(4, 4, device=device, dtype=torch.float64, requires_grad=True)
    x0 = rand(4, device=device, dtype=torch.float64)

    def f(lin, w):
        x = w.t() @ x0  # x depends on W
        return lin(x, w).square().sum()

    (ours,) = torch.autograd.grad(f(torchmatgrad.linear, w), w)
    (ref,) = torch.autograd.grad(f(F.linear, w), w)
    torch.testing.assert_close(ours, ref)
    assert torch.autograd.gradcheck(lambda w: f(torchmatgrad.linear, w), (w,))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 40),
    m=st.integers(0, 40),
    batch=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
def test_property_random_shapes(n, m, batch, bias, dtype):
    x = rand(*batch, m, dtype=dtype, requires_grad=True)
    w = rand(n, m, dtype=dtype, requires_grad=True)
    b = rand(n, dtype=dtype, requires_grad=True) if bias else None
    y = torchmatgrad.linear(x, w, b)
    ref = reference(x, w, b)
    assert_close(y, ref, k=m, peers=[F.linear(x, w, b)], what="forward")
    g = rand(*y.shape, dtype=dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    ref_grads = torch.autograd.grad(F.linear(x, w, b), [t for t in (x, w, b) if t is not None], g)
    ins = [t.detach().double().requires_grad_() for t in (x, w, b) if t is not None]
    ref64 = torch.autograd.grad(F.linear(*ins, *([None] if not bias else [])), ins, g.double())
    rows = math.prod(batch)
    ks = [n, rows, rows][: len(grads)]  # grad_input sums n terms, grad_W and grad_b the rows
    for a, t, r, k in zip(grads, ref_grads, ref64, ks, strict=True):
        assert_close(a, r, k=k, peers=[t], what="grad")


@pytest.mark.parametrize("rows", [5, 16, 17, 96])
def test_lanes_forward_k(dtype, rows):
    """The forward with the rows of x in the vector lanes (5 to 96 rows: the 8-lane kernel of
    ≤ 16 rows and 1 to 3 blocks of 32 with AVX-512, no panels), k of either parity and longer
    than one slice of x in cache (1100), and a partial micro-tile of W (101 rows). A 16-bit W
    is widened a cache line (32 elements) ahead of its steps: no whole line (2, 3), two lines
    (64), lines and single steps at the end (333, 1100). With AVX512-BF16, a bf16 W runs the
    kernel of x in pairs of k, whose odd k ends in a float step. Outputs poisoned first."""
    from torchmatgrad import policy

    n = 101
    for m in (2, 3, 64, 333, 1100):
        x, w, b = rand(rows, m, dtype=dtype), rand(n, m, dtype=dtype), rand(n, dtype=dtype)
        with policy.force_path("kernel"):
            poison_allocator((rows, n), dtype, "cpu")
            y = ops.linear(x, w, b)
        ref = F.linear(x.double(), w.double(), b.double())
        assert_close(y, ref, k=m, peers=[F.linear(x, w, b)], what=f"forward, k={m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_packed_weight_panels(dtype):
    """Many blocks of rows, where the CPU kernel packs W into panels: 200 rows (7 blocks of 32
    with AVX-512, the last of 8 rows; 13 of 16 with AVX2), widths that leave a partial panel
    and a partial tile (101 rows of W; 1100 columns for grad_input and grad_W), k longer than
    one packed stretch (1100 > 1024 float, > 512 double), W read in place and transposed
    (grad_input), grad_W as a GEMM (≥ 128 rows; X read transposed), fresh and accumulated (into
    a float32 main_grad too for 16-bit W), with and without bias; an empty k. Outputs poisoned
    first."""
    from torchmatgrad import policy

    rows, n, m = 200, 101, 1100
    x, w, b = rand(rows, m, dtype=dtype), rand(n, m, dtype=dtype), rand(n, dtype=dtype)
    g = rand(rows, n, dtype=dtype)
    X, W, G = x.double(), w.double(), g.double()
    accs = [rand(n, m, dtype=dtype)] + ([rand(n, m)] if dtype.itemsize == 2 else [])
    expect_accs = [a.double() + G.t() @ X for a in accs]
    # torch's own accumulation in each buffer's dtype: the 16-bit tolerance is relative to it
    peer_accs = [a.clone().addmm_(g.t().to(a.dtype), x.to(a.dtype)) for a in accs]
    with policy.force_path("kernel"):
        poison_allocator((rows, n), dtype, "cpu")
        y = ops.linear(x, w, b)
        poison_allocator((rows, n), dtype, "cpu")
        y0 = ops.linear(x, w, None)
        poison_allocator((rows, m), dtype, "cpu")
        gi, _, _ = ops.linear_backward(g, x, w, [True, False, False])
        poison_allocator((n, m), dtype, "cpu")
        _, gw, _ = ops.linear_backward(g, x, w, [False, True, False])
        for acc in accs:
            ops.linear_backward_accumulate_(g, x, w, acc, [False, False])
        empty = ops.linear(x[:, :0], w[:, :0], b)
    assert_close(y, F.linear(X, W, b.double()), k=m, peers=[F.linear(x, w, b)], what="forward")
    assert_close(y0, X @ W.t(), k=m, peers=[x @ w.t()], what="forward, no bias")
    assert_close(gi, G @ W, k=n, peers=[g @ w], what="grad_input")
    assert_close(gw, G.t() @ X, k=rows, peers=[g.t() @ x], what="grad_weight")
    for acc, expect, peer in zip(accs, expect_accs, peer_accs, strict=True):
        assert_close(acc, expect, k=rows + 1, peers=[peer], what=f"accumulated {acc.dtype}")
    torch.testing.assert_close(empty, b.expand(rows, n), rtol=0, atol=0)


@pytest.mark.parametrize("forced", ["auto", "kernel", "vendor"])
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 17, 140], ids=lambda r: f"rows{r}")
def test_transposed_weight_stays_in_place(device, dtype, forced, rows):
    """A weight stored as [in, out] and used as its .t() (HF's Conv1D) is read in place, by the
    CPU kernels (few rows unless a path is forced: csrc/vendor.h, use_vendor; every row count
    with the kernel path forced: the few-rows kernels up to 16 rows, the GEMMs above) and by the
    vendor route; the stored tensor's gradient comes out
    in its own layout (contiguous: AccumulateGrad keeps it, no copy) but from the CUDA kernels
    (forced), which return [out, in]. The values, and the fake kernel's strides, match either
    way."""
    from torchmatgrad import policy

    stored = rand(33, 20, device=device, dtype=dtype, requires_grad=True)  # [in, out]
    x = rand(rows, 66, device=device, dtype=dtype)[:, 1::2]  # strided
    b = rand(20, device=device, dtype=dtype)
    with policy.force_path(forced):
        y = torchmatgrad.linear(x, stored.t(), b)
        y0 = torchmatgrad.linear(x, stored.t())
        g = rand(rows, 20, device=device, dtype=dtype)
        y.backward(g)
        gi, gw, gb = ops.linear_backward(g, x, stored.t(), [True, True, True])
        torch.library.opcheck(ops.linear_backward.default, (g, x, stored.t(), [True, True, True]))
        torch.library.opcheck(ops.linear.default, (x, stored.t(), b))
    x64, s64, b64, g64 = (t.detach().double() for t in (x, stored, b, g))
    assert_close(y, F.linear(x64, s64.t(), b64), k=34, peers=[F.linear(x, stored.t(), b)])
    assert_close(y0, x64 @ s64, k=33, peers=[x @ stored], what="forward, no bias")
    assert_close(stored.grad, x64.t() @ g64, k=rows, what="stored weight's grad")
    assert stored.grad.is_contiguous()
    in_own_layout = device == "cpu" or forced != "kernel"
    assert gw.shape == (20, 33) and gw.t().is_contiguous() == in_own_layout
    assert_close(gw, g64.t() @ x64, k=rows, what="grad_weight")
    assert_close(gi, g64 @ s64.t(), k=20, what="grad_input")
    assert_close(gb, g64.sum(0), k=rows, what="grad_bias")


@pytest.mark.parametrize(
    "in_shape,bias_shape",
    [((3, 5), (1, 4)), ((3, 5), ()), ((3, 5), (1,)), ((2, 3, 5), (2, 1, 4)), ((2, 3, 5), (3, 4))],
    ids=str,
)
def test_broadcast_bias_like_f_linear(in_shape, bias_shape):
    """F.linear adds any bias that broadcasts to the output; so does torchmatgrad.linear, and the
    bias's gradient is reduced to its shape (float64 against F.linear, values and gradients)."""
    x = rand(*in_shape, dtype=torch.float64, requires_grad=True)
    w = rand(4, 5, dtype=torch.float64, requires_grad=True)
    b = rand(bias_shape, dtype=torch.float64, requires_grad=True)
    y, ref = torchmatgrad.linear(x, w, b), F.linear(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = rand(*ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(got, want, strict=True):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(torchmatgrad.linear, (x, w, b))
    torch._dynamo.reset()
    compiled = torch.compile(torchmatgrad.linear, fullgraph=True)(x, w, b)
    torch.testing.assert_close(compiled, ref)


@pytest.mark.parametrize(
    "in_shape,bias_shape",
    [((3, 5), (3,)), ((3, 5), (2, 3, 4)), ((5,), (3, 4)), ((2, 3, 5), (5, 2, 3, 4))],
    ids=str,
)
def test_bias_that_does_not_broadcast_is_the_ops_error(in_shape, bias_shape):
    """A bias that does not broadcast to the output, or only to a larger shape than the
    output's (F.linear refuses both), is refused with the op's error."""
    x, w, b = rand(*in_shape), rand(4, 5), rand(*bias_shape)
    with pytest.raises(RuntimeError):
        F.linear(x, w, b)
    with pytest.raises(RuntimeError, match=r"bias must be 1-D of length weight.size\(0\)"):
        torchmatgrad.linear(x, w, b)


@pytest.mark.parametrize(
    "arg,kind",
    [(arg, kind) for arg in ("input", "weight", "bias") for kind in ("sparse", "quantized")]
    + [("input", "nested")],  # a nested weight or bias is no tensor F.linear takes either
)
def test_non_dense_inputs_are_named(arg, kind):
    x, w, b = rand(3, 5), rand(4, 5), rand(4)
    t = {"input": x, "weight": w, "bias": b}[arg]
    if kind == "sparse":
        t = t.to_sparse()
    elif kind == "quantized":
        t = torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)
    else:
        t = torch.nested.nested_tensor([rand(2, 5), rand(3, 5)])
    args = {"input": (t, w), "weight": (x, t), "bias": (x, w, t)}[arg]
    with pytest.raises(
        RuntimeError, match=rf"{arg} must be a dense \(strided\) tensor, got a {kind}"
    ):
        torchmatgrad.linear(*args)
