"""The CUDA kernels: agreement with the CPU kernels and float64 references on every path
(few rows / tiled GEMM, vector / scalar loads), layouts, streams, devices, determinism,
CUDA graphs, memory use, empty and very large tensors. The hand-written kernels are forced for
the whole module (hand_written_kernels); the other files' CUDA cells run the default policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_MARKS

import torchmatgrad
from torchmatgrad import policy
from torchmatgrad.testing import assert_close, poison_allocator, rand

pytestmark = CUDA_MARKS


@pytest.fixture(autouse=True, scope="module")
def hand_written_kernels():
    """These tests are about the hand-written kernels, and the default path policy sends calls
    with more than 16 rows to cuBLAS: the module runs with the kernel path forced (unless the
    process was started with TORCHMATGRAD_PATH=kernel or vendor, which is kept)."""
    forced = policy.current_path()
    with policy.force_path("kernel" if forced == "auto" else forced):
        yield


ops = torch.ops.torchmatgrad
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f64", "f32", "bf16", "f16"]
# R ≤ 16: the few-rows kernels (RMAX 1, 4, 16); R > 16: the tiled GEMM.
ROWS = [1, 3, 16, 17, 100]
# m = 64: 16-byte loads; m = 67: scalar loads (rows not 16-byte aligned).
SHAPES = [(33, 64), (45, 67)]


def assert_agrees(ours, ref, *peers, k: int, what: str = "") -> None:
    """ours (CUDA kernel) against the float64 reference `ref` under the tolerance policy of
    torchmatgrad.testing: float32/64 within a rounding bound for a k-term sum; 16-bit at most
    about twice the error of the peers (the CPU kernel, torch) in the same dtype, plus one unit
    of rounding at the largest value."""
    assert_close(ours, ref, k=k, peers=peers, what=what)


def references(g, x, w, b):
    """float64 forward and backward results for G [R, n], X [R, m], W [n, m]."""
    g64, x64, w64 = g.double(), x.double(), w.double()
    y = F.linear(x64, w64, None if b is None else b.double())
    return y, g64 @ w64, g64.t() @ x64, g64.sum(0)


def all_references(g, x, w, b, gw0):
    """(name, float64 reference, terms summed) for each result of run_all, in its order."""
    rows, n, m = x.shape[0], w.shape[0], w.shape[1]
    y, gi, gw, gb = references(g, x, w, b)
    return [
        ("forward", y, m),
        ("grad_input", gi, n),
        ("grad_weight", gw, rows),
        ("grad_bias", gb, rows),
        ("accumulated grad_weight", gw0.double() + gw, rows + 1),
        ("accumulate's grad_input", gi, n),
        ("accumulate's grad_bias", gb, rows),
    ]


def run_all(g, x, w, b, gw0):
    """All three ops on (g, x, w, b); accumulate into a copy of gw0."""
    y = ops.linear(x, w, b)
    gi, gw, gb = ops.linear_backward(g, x, w, [True, True, True])
    acc = gw0.clone()
    agi, agb = ops.linear_backward_accumulate_(g, x, w, acc, [True, True])
    return y, gi, gw, gb, acc, agi, agb


# ---- CPU and CUDA agree -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,m", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_cpu(dtype, rows, n, m, bias):
    x, w, g = rand(rows, m, dtype=dtype), rand(n, m, dtype=dtype), rand(rows, n, dtype=dtype)
    b = rand(n, dtype=dtype) if bias else None
    gw0 = rand(n, m, dtype=dtype)
    cpu = run_all(g, x, w, b, gw0)
    poison_allocator((n, m), dtype, "cuda")
    cuda = run_all(*(t.cuda() if t is not None else None for t in (g, x, w, b, gw0)))
    torch_y = F.linear(x.cuda(), w.cuda(), None if b is None else b.cuda())
    refs = all_references(g, x, w, b, gw0)
    for (name, ref, k), ours, peer in zip(refs, cuda, cpu, strict=True):
        assert ours.device.type == "cuda" and ours.dtype == dtype
        assert_agrees(ours, ref, peer, *([torch_y] if name == "forward" else []), k=k, what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,m", SHAPES, ids=str)
def test_fp32_master_grad(dtype, rows, n, m):
    x, w, g = rand(rows, m, dtype=dtype), rand(n, m, dtype=dtype), rand(rows, n, dtype=dtype)
    gw0 = rand(n, m, dtype=torch.float32)
    acc_cpu = gw0.clone()
    ops.linear_backward_accumulate_(g, x, w, acc_cpu, [False, False])
    acc = gw0.to("cuda", copy=True)
    gi, gb = ops.linear_backward_accumulate_(g.cuda(), x.cuda(), w.cuda(), acc, [False, False])
    assert gi is None and gb is None and acc.dtype == torch.float32
    ref = gw0.double() + g.double().t() @ x.double()
    # float32 accumulation of 16-bit products: a float32 rounding bound.
    assert_agrees(acc, ref, acc_cpu, k=rows + 1, what="fp32 master grad")


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize(
    "mask",
    [
        [True, False, False],
        [False, True, False],
        [False, False, True],
        [True, False, True],
        [False, True, True],
        [True, True, False],
    ],
    ids=str,
)
def test_backward_mask(rows, mask):
    x, w, g = (
        rand(rows, 70, device="cuda"),
        rand(37, 70, device="cuda"),
        rand(rows, 37, device="cuda"),
    )
    out = ops.linear_backward(g, x, w, mask)
    _, gi, gw, gb = references(g, x, w, None)
    for want, got, ref, k in zip(mask, out, (gi, gw, gb), (37, rows, rows), strict=True):
        if want:
            assert_agrees(got, ref, k=k)
        else:
            assert got is None
    acc = rand(37, 70, device="cuda")
    before = acc.clone()
    agi, agb = ops.linear_backward_accumulate_(g, x, w, acc, [mask[0], mask[2]])
    assert (agi is None) != mask[0] and (agb is None) != mask[2]
    assert_agrees(acc, before.double() + gw, k=rows + 1)


# Shapes large enough for the 128² GEMM tiles (at least 2 tiles per multiprocessor) on the
# forward / grad_input (first) and grad_weight (second); m = 2050 takes the scalar loads.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows,n,m", [(4096, 1152, 2048), (300, 2304, 2050)], ids=str)
def test_large_gemm_tiles(dtype, rows, n, m):
    dev = "cuda"
    x, w, g = (
        rand(rows, m, device=dev, dtype=dtype),
        rand(n, m, device=dev, dtype=dtype),
        rand(rows, n, device=dev, dtype=dtype),
    )
    b = rand(n, device=dev, dtype=dtype)
    y = ops.linear(x, w, b)
    gi, gw, gb = ops.linear_backward(g, x, w, [True, True, True])
    ry, rgi, rgw, rgb = references(g, x, w, b)
    assert_agrees(y, ry, F.linear(x, w, b), k=m, what="forward")
    assert_agrees(gi, rgi, g @ w, k=n, what="grad_input")
    assert_agrees(gw, rgw, g.t() @ x, k=rows, what="grad_weight")
    assert_agrees(gb, rgb, g.sum(0), k=rows, what="grad_bias")


# ---- layouts ------------------------------------------------------------------------------


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose storage starts one element past an aligned address."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1 : 1 + t.numel()].view(t.shape)
    v.copy_(t)
    return v


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_unaligned_pointers(dtype, rows):
    n, m = 24, 64  # rows 16-byte multiples: only the base pointers are misaligned
    x, w, g = (rand(*s, device="cuda", dtype=dtype) for s in ((rows, m), (n, m), (rows, n)))
    b = rand(n, device="cuda", dtype=dtype)
    gw0 = rand(n, m, device="cuda", dtype=dtype)
    xs, ws, gs, bs, gw0s = (_misaligned(t) for t in (x, w, g, b, gw0))
    assert ws.data_ptr() % 16 != 0 and ws.is_contiguous()
    aligned = run_all(g, x, w, b, gw0)  # 16-byte loads
    shifted = run_all(gs, xs, ws, bs, gw0s)  # the scalar-load fallback
    refs = all_references(g, x, w, b, gw0)
    for (name, ref, k), got, peer in zip(refs, shifted, aligned, strict=True):
        assert_agrees(got, ref, peer, k=k, what=name)


@pytest.mark.parametrize("rows", [1, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_non_contiguous(rows, dtype):
    n, m = 40, 72
    dev = "cuda"
    w = rand(m, n, device=dev, dtype=dtype).t()  # transposed
    x = rand(rows, 2 * m, device=dev, dtype=dtype)[:, ::2]  # strided columns
    g = rand(rows, 2 * n, device=dev, dtype=dtype)[:, ::2]
    b = rand(2 * n, device=dev, dtype=dtype)[::2]
    assert not (w.is_contiguous() or x.is_contiguous() or g.is_contiguous() or b.is_contiguous())
    y = ops.linear(x, w, b)
    gi, gw, gb = ops.linear_backward(g, x, w, [True, True, True])
    acc = torch.zeros(n, m, device=dev, dtype=dtype)
    ops.linear_backward_accumulate_(g, x, w, acc, [False, False])
    ry, rgi, rgw, rgb = references(g, x, w, b)
    assert_agrees(y, ry, F.linear(x, w, b), k=m, what="forward")
    assert_agrees(gi, rgi, g @ w, k=n, what="grad_input")
    assert_agrees(gw, rgw, g.t() @ x, k=rows, what="grad_weight")
    assert_agrees(gb, rgb, g.sum(0), k=rows, what="grad_bias")
    assert_agrees(acc, rgw, g.t() @ x, k=rows, what="accumulated grad_weight")


def test_batched_input_shapes():
    x = rand(2, 3, 5, 40, device="cuda")
    w, b = rand(24, 40, device="cuda"), rand(24, device="cuda")
    y = torchmatgrad.linear(x, w, b)
    assert y.shape == (2, 3, 5, 24)
    assert_agrees(y, F.linear(x.double(), w.double(), b.double()), k=40)
    g = rand(2, 3, 5, 24, device="cuda")
    gi, gw, gb = ops.linear_backward(g, x, w, [True, True, True])
    assert gi.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape


# ---- streams, devices, determinism, graphs ------------------------------------------------


#: GPU clock cycles of torch.cuda._sleep queued before the side stream's inputs: tens of
#: milliseconds at Hopper clocks, far longer than queuing the ops takes.
SLEEP_CYCLES = 100_000_000


@pytest.mark.parametrize("rows", [1, 16, 100])
def test_side_stream(rows):
    """Every op runs on the current stream. On a side stream, a long sleep is queued, then the
    inputs are written (copied over NaN-filled buffers) and the ops run: a kernel launched on
    any other stream would read the NaNs, since the side stream is still asleep when it runs."""
    n, m = 256, 512
    dev = [rand(*s, device="cuda") for s in ((rows, n), (rows, m), (n, m), (n, m))]  # g x w gw0
    expected = run_all(dev[0], dev[1], dev[2], None, dev[3])  # default stream
    bufs = [torch.full_like(t, float("nan")) for t in dev]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        for buf, t in zip(bufs, dev, strict=True):
            buf.copy_(t)  # the inputs exist only once the sleep is over
        got = run_all(bufs[0], bufs[1], bufs[2], None, bufs[3])
        still_asleep = not side.query()
    side.synchronize()
    assert still_asleep, "the sleep ended before the ops were queued: nothing was tested"
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=0, atol=0)  # same kernels: bitwise equal


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("rows", [1, 100])
def test_second_device(rows):
    n, m = 48, 80
    x, w, g, b = rand(rows, m), rand(n, m), rand(rows, n), rand(n)
    gw0 = rand(n, m)
    cpu = run_all(g, x, w, b, gw0)
    assert torch.cuda.current_device() == 0
    on1 = run_all(*(t.to("cuda:1") for t in (g, x, w, b, gw0)))
    refs = all_references(g, x, w, b, gw0)
    for (name, ref, k), c, o in zip(refs, cpu, on1, strict=True):
        assert o.device == torch.device("cuda:1")
        assert_agrees(o, ref, c, k=k, what=name)


@pytest.mark.parametrize("rows", [1, 16, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bitwise_deterministic(rows, dtype):
    n, m = 768, 1024
    x, w, g, b = (
        rand(*s, device="cuda", dtype=dtype) for s in ((rows, m), (n, m), (rows, n), (n,))
    )
    gw0 = rand(n, m, device="cuda", dtype=dtype)
    first = run_all(g, x, w, b, gw0)
    for _ in range(20):
        again = run_all(g, x, w, b, gw0)
        for a, f in zip(again, first, strict=True):
            assert torch.equal(a, f)


def _float64_copy(model: torch.nn.Sequential) -> torch.nn.Sequential:
    """The same layers as torch modules in float64, with the same values: the reference."""
    layers = [
        torch.nn.Linear(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else m
        for m in model
    ]
    ref = torch.nn.Sequential(*layers).to("cuda", torch.float64)
    ref.load_state_dict(model.state_dict())
    return ref


def test_compile_reduce_overhead_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchmatgrad.nn.Linear(64, 128), torch.nn.ReLU(), torchmatgrad.nn.Linear(128, 32)
    ).cuda()
    ref = _float64_copy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    for rows in (4, 4, 4, 40, 40, 40):  # repeated shapes replay the captured CUDA graph
        x = rand(rows, 64, device="cuda")
        with torch.no_grad():
            eager = model(x)
            got = compiled(x).clone()
            expected = ref(x.double())
        assert_agrees(eager, expected, k=64 + 128, what="eager")
        assert_agrees(got, expected, k=64 + 128, what="compiled (CUDA graph)")


def test_compile_reduce_overhead_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchmatgrad.nn.Linear(64, 96), torch.nn.Tanh(), torchmatgrad.nn.Linear(96, 8)
    ).cuda()
    eager = torch.nn.Sequential(
        torchmatgrad.nn.Linear(64, 96), torch.nn.Tanh(), torchmatgrad.nn.Linear(96, 8)
    ).cuda()
    eager.load_state_dict(model.state_dict())
    ref = _float64_copy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(3):
        x = rand(8, 64, device="cuda")
        for m in (model, eager, ref):
            m.zero_grad(set_to_none=True)
        compiled(x).square().sum().backward()
        eager(x).square().sum().backward()
        ref(x.double()).square().sum().backward()
        # forward sums 64 then 96 terms; the weight gradients add the 8 rows
        for p, q, r in zip(model.parameters(), eager.parameters(), ref.parameters(), strict=True):
            assert_agrees(q.grad, r.grad, k=64 + 96 + 8, what="eager grad")
            assert_agrees(p.grad, r.grad, k=64 + 96 + 8, what="compiled grad")


# ---- memory, empty, large -----------------------------------------------------------------


def test_backward_allocates_only_grad_weight():
    n = m = 4096
    w = rand(n, m, device="cuda", requires_grad=True)
    x = rand(1, m, device="cuda", requires_grad=True)
    y = torchmatgrad.linear(x, w)
    g = rand(1, n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y.backward(g)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    w_bytes = w.numel() * w.element_size()
    assert extra < 1.5 * w_bytes, (
        f"backward allocated {extra / 2**20:.1f} MiB; W is {w_bytes / 2**20:.1f} MiB"
    )
    assert_agrees(w.grad, g.double().t() @ x.double(), k=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "rows,n,m", [(0, 5, 7), (3, 0, 7), (3, 5, 0), (0, 0, 0), (20, 5, 0)], ids=str
)
def test_empty(dtype, rows, n, m):
    x, w, g, b = (
        rand(rows, m, dtype=dtype),
        rand(n, m, dtype=dtype),
        rand(rows, n, dtype=dtype),
        rand(n, dtype=dtype),
    )
    cuda_args = [t.cuda() for t in (x, w, g, b)]
    xc, wc, gc, bc = cuda_args
    y = ops.linear(xc, wc, bc)
    assert y.shape == (rows, n) and y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), ops.linear(x, w, b))
    gi, gw, gb = ops.linear_backward(gc, xc, wc, [True, True, True])
    for c, ref in zip((gi, gw, gb), ops.linear_backward(g, x, w, [True, True, True]), strict=True):
        assert c.shape == ref.shape
        torch.testing.assert_close(c.cpu(), ref)  # zeros where the sum is empty
    acc = rand(n, m, device="cuda", dtype=dtype)
    before = acc.clone()
    ops.linear_backward_accumulate_(gc, xc, wc, acc, [True, True])
    if rows == 0:
        assert torch.equal(acc, before)  # nothing to add: untouched


def test_empty_batch_autograd():
    lin = torchmatgrad.nn.Linear(16, 8).cuda()
    x = rand(0, 16, device="cuda", requires_grad=True)
    lin(x).sum().backward()
    assert torch.equal(lin.weight.grad, torch.zeros_like(lin.weight))
    assert torch.equal(lin.bias.grad, torch.zeros_like(lin.bias))
    assert x.grad.shape == (0, 16)


def _big_enough(gb: float) -> bool:
    return torch.cuda.get_device_properties(0).total_memory >= gb * 2**30


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.cuda.is_available() or not _big_enough(24), reason="needs a GPU with 24 GB of memory"
)
@pytest.mark.parametrize("m", [32769, 32776], ids=["scalar", "vector"])
@pytest.mark.parametrize("rows", [1, 17])
def test_over_2_31_elements(m, rows):
    n, dtype, dev = 65536, torch.bfloat16, "cuda"
    torch.cuda.empty_cache()
    w = torch.randn(n, m, device=dev, dtype=dtype)
    assert w.numel() > 2**31
    x, g = rand(rows, m, device=dev, dtype=dtype), rand(rows, n, device=dev, dtype=dtype)
    y = ops.linear(x, w)
    gi, gw, _ = ops.linear_backward(g, x, w, [True, True, False])
    x64, g64 = x.double(), g.double()
    for lo, hi in ((0, 64), (n - 64, n)):  # offsets below and far above 2^31
        w64 = w[lo:hi].double()
        assert_agrees(y[:, lo:hi], x64 @ w64.t(), x @ w[lo:hi].t(), k=m, what=f"y[:, {lo}:{hi}]")
        assert_agrees(
            gw[lo:hi],
            g64[:, lo:hi].t() @ x64,
            g[:, lo:hi].t() @ x,
            k=rows,
            what=f"grad_weight[{lo}:{hi}]",
        )
    ref_gi = torch.zeros(rows, m, device=dev, dtype=torch.float64)
    for lo in range(0, n, 4096):
        ref_gi += g64[:, lo : lo + 4096] @ w[lo : lo + 4096].double()
    assert_agrees(gi, ref_gi, g @ w, k=n, what="grad_input")
    del w, gw
    torch.cuda.empty_cache()


# ---- the tensor-core few-rows forward (forward_fewrows_tc.cu; off by default) ---------------

TC_DTYPES = [torch.bfloat16, torch.float16]
TC_IDS = ["bf16", "f16"]
TC_ROWS = [16, 17, 31, 32, 48, 63, 64]
TC_KERNEL = "linear_forward_kernel_fewrows_tc"


@pytest.fixture
def tensor_cores():
    """The tensor-core few-rows forward switched on for one test (the kernel path is forced for
    the module by hand_written_kernels)."""
    with policy.cuda_tensor_cores_enabled(True):
        yield


def _cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels that fn() launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _tc_forward_agrees(x, w, b, what: str) -> torch.Tensor:
    """The forward with the switch on, its output poisoned first, against the float64 reference,
    the CUDA-core kernels (switch off) and torch in the same dtype; returns it."""
    rows, n, m = x.numel() // x.shape[-1], w.shape[0], w.shape[1]
    with policy.cuda_tensor_cores_enabled(False):
        cores = ops.linear(x, w, b)
    poison_allocator((rows, n), x.dtype, "cuda")
    with policy.cuda_tensor_cores_enabled(True):
        y = ops.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert not y.isnan().any(), f"{what}: an output element was never written"
    assert_agrees(y, ref, cores, F.linear(x, w, b), k=m, what=what)
    return y


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=TC_IDS)
@pytest.mark.parametrize("rows", TC_ROWS)
# n: one partial n8 tile, a partial 64-row block, several blocks; m: one 32-column group, a
# partial 128-column chunk (m % 16 == 8), several chunks with a tail.
@pytest.mark.parametrize("n,m", [(37, 64), (40, 200), (129, 1032)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_tc_forward(dtype, rows, n, m, bias):
    x, w = rand(rows, m, device="cuda", dtype=dtype), rand(n, m, device="cuda", dtype=dtype)
    b = rand(n, device="cuda", dtype=dtype) if bias else None
    _tc_forward_agrees(x, w, b, f"tc forward {rows}x{m} @ {n}x{m}")


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=TC_IDS)
@pytest.mark.parametrize("rows", [16, 33, 64])
# Few W rows and long rows: k split over many blocks (partial sums reduced in order).
@pytest.mark.parametrize("n,m", [(300, 2056), (1000, 4096)], ids=str)
def test_tc_forward_split_k(dtype, rows, n, m):
    x, w = rand(rows, m, device="cuda", dtype=dtype), rand(n, m, device="cuda", dtype=dtype)
    b = rand(n, device="cuda", dtype=dtype)
    _tc_forward_agrees(x, w, b, "tc forward, split k")
    names = _cuda_kernels(lambda: ops.linear(x, w, b))
    assert not any(TC_KERNEL in s for s in names), "switch off: the tc kernel must not run"
    with policy.cuda_tensor_cores_enabled(True):
        names = _cuda_kernels(lambda: ops.linear(x, w, b))
    assert any(TC_KERNEL in s for s in names), names
    assert any("tc_reduce" in s for s in names), names


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=TC_IDS)
@pytest.mark.parametrize("rows", [16, 40, 64])
def test_tc_non_contiguous(dtype, rows):
    n, m = 72, 136
    w = rand(m, n, device="cuda", dtype=dtype).t()  # transposed
    x = rand(rows, 2 * m, device="cuda", dtype=dtype)[:, ::2]  # strided columns
    b = rand(2 * n, device="cuda", dtype=dtype)[::2]
    assert not (w.is_contiguous() or x.is_contiguous() or b.is_contiguous())
    _tc_forward_agrees(x, w, b, "tc forward, non-contiguous")


def test_tc_batched_input():
    x = rand(2, 3, 8, 64, device="cuda", dtype=torch.bfloat16)  # 48 rows
    w, b = rand(24, 64, device="cuda", dtype=torch.bfloat16), rand(24, device="cuda")
    y = _tc_forward_agrees(x, w, b.bfloat16(), "tc forward, batched")
    assert y.shape == (2, 3, 8, 24)


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=TC_IDS)
def test_tc_kernel_runs_only_where_it_fits(dtype, tensor_cores):
    """Switch on: the tc kernel runs for 16..64 rows of an aligned, m % 8 == 0 call, and the
    CUDA-core paths (still correct) take m % 8 != 0, unaligned pointers, 15 and 65 rows, and
    float32."""
    n = 50

    def launched(rows, m, dt=dtype, shift=False):
        x, w = rand(rows, m, device="cuda", dtype=dt), rand(n, m, device="cuda", dtype=dt)
        if shift:
            x, w = _misaligned(x), _misaligned(w)
        names = _cuda_kernels(lambda: ops.linear(x, w))
        assert_agrees(ops.linear(x, w), F.linear(x.double(), w.double()), F.linear(x, w), k=m)
        return any(TC_KERNEL in s for s in names)

    assert launched(16, 64) and launched(64, 64) and launched(40, 72)
    assert not launched(40, 67)  # rows of x and W not 16-byte aligned
    assert not launched(40, 64, shift=True)
    assert not launched(15, 64) and not launched(65, 64)
    assert not launched(40, 64, dt=torch.float32)


@pytest.mark.parametrize("rows", [17, 64])
def test_tc_bitwise_deterministic(rows, tensor_cores):
    n, m = 768, 4096  # k split over blocks: partial sums added in a fixed order
    x, w, b = (rand(*s, device="cuda", dtype=torch.bfloat16) for s in ((rows, m), (n, m), (n,)))
    first = ops.linear(x, w, b)
    for _ in range(20):
        assert torch.equal(ops.linear(x, w, b), first)


# ---- the tensor-core grad_weight of 17..64 rows (backward_fewrows_tc.cu; off by default) ----

TC_GW_KERNEL = "linear_backward_kernel_grad_weight_tc"


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=TC_IDS)
@pytest.mark.parametrize("rows", [r for r in TC_ROWS if r > 16])
# n: a partial 64-row tile, several; m: one 128-column tile (pairs of columns), odd (single
# columns at the edge), several tiles.
@pytest.mark.parametrize("n,m", [(37, 64), (129, 201), (70, 1000)], ids=str)
def test_tc_grad_weight(dtype, rows, n, m, tensor_cores):
    x, w, g = (rand(*s, device="cuda", dtype=dtype) for s in ((rows, m), (n, m), (rows, n)))
    ref = g.double().t() @ x.double()
    peer = g.t() @ x
    poison_allocator((n, m), dtype, "cuda")
    gi, gw, gb = ops.linear_backward(g, x, w, [False, True, False])
    assert gi is None and gb is None and not gw.isnan().any()
    assert_agrees(gw, ref, peer, k=rows, what="tc grad_weight")
    for acc_dtype in (dtype, torch.float32):  # in place, in the dtype and as fp32 master
        gw0 = rand(n, m, device="cuda", dtype=acc_dtype)
        acc = gw0.clone()
        ops.linear_backward_accumulate_(g, x, w, acc, [False, False])
        assert_agrees(acc, gw0.double() + ref, k=rows + 1, what=f"tc grad_weight += ({acc_dtype})")


@pytest.mark.parametrize("rows", [17, 64])
def test_tc_grad_weight_full_backward(rows, tensor_cores):
    """All three results with grad_W on the tensor cores, grad_input on the tiled GEMM; a
    misaligned grad_W buffer takes the single-column stores."""
    n, m, dtype = 200, 136, torch.bfloat16
    x, w, g = (rand(*s, device="cuda", dtype=dtype) for s in ((rows, m), (n, m), (rows, n)))
    _, rgi, rgw, rgb = references(g, x, w, None)
    gi, gw, gb = ops.linear_backward(g, x, w, [True, True, True])
    assert_agrees(gi, rgi, g @ w, k=n, what="grad_input")
    assert_agrees(gw, rgw, g.t() @ x, k=rows, what="grad_weight")
    assert_agrees(gb, rgb, g.sum(0), k=rows, what="grad_bias")
    gw0 = rand(n, m, device="cuda", dtype=dtype)
    acc = _misaligned(gw0)
    assert acc.data_ptr() % 4 != 0
    ops.linear_backward_accumulate_(g, x, w, acc, [False, False])
    assert_agrees(acc, gw0.double() + rgw, k=rows + 1, what="misaligned accumulation")
    names = _cuda_kernels(lambda: ops.linear_backward(g, x, w, [False, True, False]))
    assert any(TC_GW_KERNEL in s for s in names), names
    with policy.cuda_tensor_cores_enabled(False):
        names = _cuda_kernels(lambda: ops.linear_backward(g, x, w, [False, True, False]))
    assert not any(TC_GW_KERNEL in s for s in names), names
