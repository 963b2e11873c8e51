"""What the tests and the tools check with: one tolerance policy, the input makers, the cells.

**Tolerance policy.** Every comparison of a result with the truth, in the tests, in
``python -m torchmatgrad check`` and ``explain`` and in the GPU scripts, goes through
:func:`assert_close` (or :func:`compare`, which returns the verdict instead of raising):

* the reference is computed in float64 from the very same input values (upcast exactly);
* float32 / float64: ``max|got - ref| ≤ FP_FACTOR · eps · scale · √k``, with ``k`` the number of
  terms summed into one result (the reduction length; use the longest chain for composites)
  and ``scale = max(1, max|ref|)``, or a bound of Σ|terms| given by the caller;
* bfloat16 / float16 with peers (torch's own result in the same dtype, another kernel):
  ``≤ PEER_FACTOR · (largest peer error) + eps · scale``: at most about twice torch's own error
  plus one rounding at the largest value (flash-attention's rule);
* bfloat16 / float16 without peers: ``eps · scale + FP_FACTOR · eps(float32) · scale · √k``:
  one rounding of the result to 16 bits plus float32 accumulation of k terms.

**Inputs.** :func:`rand` makes fresh standard-normal values in float64 and casts them (so a
reference built from ``.double()`` sees exactly the same numbers), never zeros;
:func:`poison_allocator` leaves NaN where the next output is likely to be allocated.

**Cells.** Two tables of check cells, run by tests/test_linear.py, tests/test_transforms.py and
``python -m torchmatgrad check``, so the printed matrix and the test suite cannot disagree:

* the op checks (:data:`OP_CHECKS`): for each device and dtype, the forward, the backward op and
  the Jacobians with respect to W, x and b against ``torch.autograd.functional.jacobian`` of a
  float64 reference, plus ``gradcheck`` in float64;
* the transform conformance matrix (:data:`TRANSFORMS`): rows are PyTorch transforms (double
  backward, forward-mode AD, vmap, jacrev/jacfwd, autocast, torch.compile, ...), columns are
  device × dtype, cells are pass / FAIL / n/a with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _compat
from .ops import linear

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SHORT_NAMES = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}
LOW_PRECISION = (torch.bfloat16, torch.float16)

#: float32/float64: allowed error in units of eps · scale · √k. Measured on the CPU kernels
#: (every shape of tests/test_linear.py): at most 1.0, mostly 0.3-0.6 (rounding of the result
#: and of the k-term sum), so 8 leaves a margin of 8 for other summation orders (CUDA tiles).
FP_FACTOR = 8.0
#: bfloat16/float16 with peers: allowed multiple of the largest peer's error.
PEER_FACTOR = 2.0


def devices() -> list[str]:
    """Devices this process can run on: cpu, plus cuda when a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- tolerance policy ----------------------------------------------------------------------


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in: float32 for 16-bit types, else the dtype itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def max_error(got: Tensor, ref: Tensor) -> float:
    """max |got - ref|, computed in float64 on the CPU (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return (got.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def reference_scale(ref: Tensor) -> float:
    """max(1, max|ref|): the magnitude errors are measured against (absolute below 1)."""
    if ref.numel() == 0:
        return 1.0
    return max(1.0, ref.detach().double().abs().max().item())


def tolerance(
    dtype: torch.dtype, *, k: int = 1, scale: float = 1.0, peer_error: float | None = None
) -> float:
    """The largest error allowed for a result in ``dtype`` (see the module docstring).

    Args:
        dtype: the dtype of the result.
        k: terms summed into one result (reduction length); at least 1.
        scale: max(1, max|ref|), or a bound of the sum of |terms|.
        peer_error: for 16-bit dtypes, the largest error of a peer (torch in the same dtype)
            against the same float64 reference; None: the a-priori bound.
    """
    eps = torch.finfo(dtype).eps
    summing = FP_FACTOR * torch.finfo(accumulate_dtype(dtype)).eps * scale * math.sqrt(max(1, k))
    if dtype not in LOW_PRECISION:
        return summing
    if peer_error is not None:
        return PEER_FACTOR * peer_error + eps * scale
    return eps * scale + summing  # one rounding to 16 bits after the float32 sum


class Comparison(NamedTuple):
    """The verdict of :func:`compare`: ``ok`` when ``error ≤ tolerance``."""

    ok: bool
    error: float
    tolerance: float


def compare(
    got: Tensor,
    ref: Tensor,
    *,
    k: int = 1,
    peers: Sequence[Tensor] = (),
    scale: float | None = None,
) -> Comparison:
    """``got`` against the float64 reference ``ref`` under the tolerance policy, without
    raising. ``peers``: results of other implementations in ``got``'s dtype (16-bit only).
    Shapes must match (ValueError otherwise)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
    scale = reference_scale(ref) if scale is None else max(1.0, scale)
    peer_error = None
    if peers and got.dtype in LOW_PRECISION:
        peer_error = max(max_error(p, ref) for p in peers)
    tol = tolerance(got.dtype, k=k, scale=scale, peer_error=peer_error)
    err = max_error(got, ref)
    return Comparison(err <= tol, err, tol)


def assert_close(
    got: Tensor,
    ref: Tensor,
    *,
    k: int = 1,
    peers: Sequence[Tensor] = (),
    scale: float | None = None,
    what: str = "",
) -> None:
    """Assert ``got`` (our result) is within the policy's tolerance of the float64 reference
    ``ref``; also that it has ref's shape, is finite (NaN: an unwritten output) and has the
    dtype of every peer.

    Args:
        got: our result, in the dtype it was computed in.
        ref: the float64 reference, from the same input values.
        k: terms summed into one result (reduction length).
        peers: torch's (or another kernel's) result in got's dtype: for 16-bit dtypes the
            tolerance is relative to their error.
        scale: a bound of Σ|terms| when max|ref| understates it (cancellation).
        what: names the result in the failure message.
    """
    what = what or "result"
    assert tuple(got.shape) == tuple(ref.shape), (
        f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    )
    for p in peers:
        assert p.dtype == got.dtype, f"{what}: dtype {got.dtype} != peer's {p.dtype}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(got.detach().double()).all(), (
        f"{what}: non-finite values (unwritten output?)"
    )
    c = compare(got, ref, k=k, peers=peers, scale=scale)
    assert c.ok, f"{what}: max abs error {c.error:.3g} > tolerance {c.tolerance:.3g} (k={k})"


# ---- inputs --------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (inputs are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(seed)


_seeded = generator  # rand's `generator` argument hides the function's name


def rand(
    *shape,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    """Fresh standard-normal values made in float64 on the CPU, then cast to ``dtype`` and
    moved to ``device``; never zeros (a zero that rounding produces becomes 1). ``generator``
    or ``seed`` make them reproducible (default: torch's global generator).

    ``rand(3, 5)``, ``rand((3, 5))`` and ``rand(())`` (a 0-D tensor) all work."""
    if seed is not None:
        if generator is not None:
            raise ValueError("rand(): give generator or seed, not both")
        generator = _seeded(seed)
    t = torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)
    t = torch.where(t == 0, torch.ones((), dtype=dtype), t).to(device)
    return t.requires_grad_(requires_grad)


def poison_allocator(shape, dtype: torch.dtype, device: str | torch.device) -> None:
    """Leave a NaN-filled freed block of this size behind, so an output allocated right after
    is likely to start as NaN (certain with CUDA's caching allocator): unwritten elements then
    show up as NaN instead of an innocent-looking zero. On the CPU the block cache that large
    gradients come from (csrc/cpu/block_cache.h) is poisoned too."""
    t = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del t
    if torch.device(device).type == "cpu":
        t = torch.ops.torchmatgrad._cpu_empty_reused(list(shape), dtype).fill_(float("nan"))
        del t


def linear_inputs(
    device: str,
    dtype: torch.dtype,
    seed: int,
    *,
    rows: tuple[int, ...] = (3,),
    n: int = 4,
    m: int = 5,
    requires_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x [*rows, m], W [n, m], b [n]) from one seed."""
    g = generator(seed)
    kw = {"device": device, "dtype": dtype, "requires_grad": requires_grad, "generator": g}
    return rand(*rows, m, **kw), rand(n, m, **kw), rand(n, **kw)


def double_leaves(*tensors: Tensor) -> list[Tensor]:
    """float64 copies of the same values, as new leaves that require grad (for references)."""
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


class OpLog(_compat.dispatch_mode_base()):
    """A dispatch mode that records every op run below autograd (``names``, e.g.
    ``"torchmatgrad.linear"``) and the largest number of elements any of them returned."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(str(func.overloadpacket))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


# ---- check cells ---------------------------------------------------------------------------


@dataclass
class Check:
    """One row of a table: `applies(device, dtype)` returns None or the reason it does not
    apply; `run(device, dtype)` raises AssertionError on a mismatch."""

    name: str
    run: Callable[[str, torch.dtype], None]
    applies: Callable[[str, torch.dtype], str | None] = lambda d, t: None


def _float64_only(device: str, dtype: torch.dtype) -> str | None:
    return None if dtype == torch.float64 else "numerical gradient checks need float64"


# ---- op checks ----------------------------------------------------------------------------

_ops = torch.ops.torchmatgrad


def _check_forward(device, dtype):
    g = generator(1)
    for shape in [(5,), (3, 5), (2, 3, 5)]:
        x, w, b = (rand(*s, device=device, dtype=dtype, generator=g) for s in (shape, (4, 5), (4,)))
        ref = F.linear(x.double(), w.double(), b.double())
        assert_close(
            _ops.linear(x, w, b), ref, k=5, peers=[F.linear(x, w, b)], what=f"forward {shape}"
        )


def _check_backward_op(device, dtype):
    g = generator(2)
    x, w, go = (rand(*s, device=device, dtype=dtype, generator=g) for s in ((3, 5), (4, 5), (3, 4)))
    gi, gw, gb = _ops.linear_backward(go, x, w, [True, True, True])
    G, X, W = go.double(), x.double(), w.double()
    assert_close(gi, G @ W, k=4, peers=[go @ w], what="grad_input = G·W")
    assert_close(gw, G.t() @ X, k=3, peers=[go.t() @ x], what="grad_weight = Gᵀ·X")
    assert_close(gb, G.sum(0), k=3, peers=[go.sum(0)], what="grad_bias = ΣG")


def _jacobians(fn, x, w, b):
    return torch.autograd.functional.jacobian(fn, (x, w, b))


def _check_jacobian(device, dtype):
    x, w, b = linear_inputs(device, dtype, 3, rows=(), n=3, m=4, requires_grad=False)
    ours = _jacobians(linear, x, w, b)
    ref = _jacobians(F.linear, x.double(), w.double(), b.double())
    # Every entry is one product with a one-hot vector: exact up to one rounding (k = 1).
    for name, a, r in zip(("x", "W", "b"), ours, ref, strict=True):
        assert_close(a, r, what=f"d(Wx+b)/d{name}")
    # The 3rd-order tensor itself: J[i, k, l] = δ_ik·x_l, shape (n, n, m).
    expected = torch.einsum("ik,l->ikl", torch.eye(3, dtype=torch.float64), x.double().cpu())
    assert_close(ours[1], expected, what="d(Wx)/dW = δ_ik·x_l")


def _check_gradcheck(device, dtype):
    x, w, b = linear_inputs(device, dtype, 4, rows=(2,), m=3)
    assert torch.autograd.gradcheck(linear, (x, w, b))


OP_CHECKS = [
    Check("forward vs float64", _check_forward),
    Check("backward op vs G·W, Gᵀ·X, ΣG", _check_backward_op),
    Check("Jacobians vs autograd.functional", _check_jacobian),
    Check("gradcheck", _check_gradcheck, _float64_only),
]


# ---- transform conformance ----------------------------------------------------------------
#
# Each cell computes the transform three times: with torchmatgrad in the dtype under test
# (ours), with torch in float64 from the same values (the reference) and with torch in the
# dtype under test (the peer, which sets the 16-bit tolerance). k is the longest chain of sums
# behind a result (m = 5, n = 4, 3 rows; composites add their stages).


def _like(t: Tensor, seed: int) -> Tensor:
    """Fresh values of t's shape, dtype and device (a tangent, a direction)."""
    return rand(*t.shape, device=t.device, dtype=t.dtype, seed=seed)


def _t_backward(device, dtype):
    x, w, b = linear_inputs(device, dtype, 10)
    go = rand(3, 4, device=device, dtype=dtype, seed=11)
    ours = torch.autograd.grad(linear(x, w, b), (x, w, b), go)
    theirs = torch.autograd.grad(F.linear(x, w, b), (x, w, b), go)
    x64, w64, b64 = double_leaves(x, w, b)
    ref = torch.autograd.grad(F.linear(x64, w64, b64), (x64, w64, b64), go.double())
    for name, a, t, r, k in zip("xWb", ours, theirs, ref, (4, 3, 3), strict=True):
        assert_close(a, r, k=k, peers=[t], what=f"backward d/d{name}")


def _t_gradgradcheck(device, dtype):
    x, w, b = linear_inputs(device, dtype, 12)
    assert torch.autograd.gradgradcheck(linear, (x, w, b))


def _t_hvp(device, dtype):
    # Hessian-vector product through a 2-layer model, against the same model in torch.
    x, w1, b1 = linear_inputs(device, dtype, 13)
    w2 = rand(2, 4, device=device, dtype=dtype, requires_grad=True, seed=14)
    v = [_like(t, 30 + i) for i, t in enumerate((w1, b1, w2))]

    def hvp(lin, x, w1, b1, w2, v):
        loss = lin(torch.tanh(lin(x, w1, b1)), w2).pow(2).sum()
        grads = torch.autograd.grad(loss, (w1, b1, w2), create_graph=True)
        dot = sum((g * vi).sum() for g, vi in zip(grads, v, strict=True))
        return torch.autograd.grad(dot, (w1, b1, w2))

    ours = hvp(linear, x, w1, b1, w2, v)
    theirs = hvp(F.linear, x, w1, b1, w2, v)
    ref = hvp(F.linear, *double_leaves(x, w1, b1, w2), [t.double() for t in v])
    for a, t, r in zip(ours, theirs, ref, strict=True):
        assert_close(a, r, k=16, peers=[t], what="Hessian-vector product")


def _t_forward_ad(device, dtype):
    x, w, b = linear_inputs(device, dtype, 15, requires_grad=False)
    tx, tw, tb = (_like(t, 40 + i) for i, t in enumerate((x, w, b)))
    _, ours = torch.func.jvp(linear, (x, w, b), (tx, tw, tb))
    _, theirs = torch.func.jvp(F.linear, (x, w, b), (tx, tw, tb))
    primals64, tangents64 = [t.double() for t in (x, w, b)], [t.double() for t in (tx, tw, tb)]
    _, ref = torch.func.jvp(F.linear, tuple(primals64), tuple(tangents64))
    assert_close(ours, ref, k=11, peers=[theirs], what="torch.func.jvp")  # dx·Wᵀ + x·dWᵀ + db
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = linear(fwAD.make_dual(x, tx), w, fwAD.make_dual(b, tb))
        tangent = fwAD.unpack_dual(out).tangent
    ref = F.linear(tx.double(), w.double()) + tb.double()
    assert_close(tangent, ref, k=6, peers=[F.linear(tx, w) + tb], what="forward_ad")


def _t_gradcheck_all(device, dtype):
    x, w, b = linear_inputs(device, dtype, 16)
    assert torch.autograd.gradcheck(
        linear,
        (x, w, b),
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )


def _t_vmap(device, dtype):
    x, w, b = linear_inputs(device, dtype, 17, requires_grad=False, rows=(6, 3))
    x64, w64, b64 = x.double(), w.double(), b.double()
    ours = torch.func.vmap(linear, (0, None, None))(x, w, b)
    assert_close(ours, F.linear(x64, w64, b64), k=5, peers=[F.linear(x, w, b)], what="vmap x")
    ws = rand(6, 4, 5, device=device, dtype=dtype, seed=18)
    ours = torch.func.vmap(linear, (None, 0, None))(x[0], ws, b)
    ref = torch.stack([F.linear(x64[0], wi, b64) for wi in ws.double()])
    theirs = torch.stack([F.linear(x[0], wi, b) for wi in ws])
    assert_close(ours, ref, k=5, peers=[theirs], what="vmap W")
    ours = torch.func.vmap(linear, (0, 0, None))(x, ws, b)
    ref = torch.stack([F.linear(xi, wi, b64) for xi, wi in zip(x64, ws.double(), strict=True)])
    theirs = torch.stack([F.linear(xi, wi, b) for xi, wi in zip(x, ws, strict=True)])
    assert_close(ours, ref, k=5, peers=[theirs], what="vmap x and W")


def _t_per_sample(device, dtype):
    # Per-sample gradients of L_b = Σ (W x_b + b)·c_b  are the outer products c_b·x_bᵀ.
    x, w, b = linear_inputs(device, dtype, 19, requires_grad=False, rows=(7,))
    c = rand(7, 4, device=device, dtype=dtype, seed=20)

    def loss(w, b, xb, cb):
        return (linear(xb, w, b) * cb).sum()

    gw, gb = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), (None, None, 0, 0))(w, b, x, c)
    assert_close(gw, torch.einsum("bi,bj->bij", c.double(), x.double()), what="per-sample g·xᵀ")
    assert_close(gb, c.double(), what="per-sample grad_bias")


def _t_jacrev_jacfwd(device, dtype):
    x, w, b = linear_inputs(device, dtype, 21, requires_grad=False, rows=())
    x64, w64, b64 = x.double(), w.double(), b.double()
    ref = torch.autograd.functional.jacobian(lambda w_: F.linear(x64, w_, b64), w64)
    # Entries are copies of x and W (one-hot tangents and cotangents): k = 1.
    for name, jac in (("jacrev", torch.func.jacrev), ("jacfwd", torch.func.jacfwd)):
        assert_close(jac(linear, argnums=1)(x, w, b), ref, what=f"{name} d/dW (n, n, m)")
        assert_close(jac(linear, argnums=0)(x, w, b), w64, what=f"{name} d/dx = W")


def _t_hessian(device, dtype):
    # Forward-over-reverse: the Hessian of a scalar loss with respect to W.
    x, w, b = linear_inputs(device, dtype, 28, requires_grad=False, rows=(3,))

    def hessian(lin, x, w, b):
        return torch.func.jacfwd(torch.func.jacrev(lambda w_: torch.tanh(lin(x, w_, b)).sum()))(w)

    ours, theirs = hessian(linear, x, w, b), hessian(F.linear, x, w, b)
    ref = hessian(F.linear, x.double(), w.double(), b.double())
    assert_close(ours, ref, k=16, peers=[theirs], what="Hessian d²L/dW²")


def _autocast_applies(device, dtype):
    if dtype != torch.float32:
        return "autocast casts float32 inputs; run once per device"
    return None


def _t_autocast(device, dtype):
    x, w, b = linear_inputs(device, dtype, 22)
    low = [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]
    for ld in low:
        with torch.autocast(device_type=device, dtype=ld):
            ours, theirs = linear(x, w, b), F.linear(x, w, b)
        assert ours.dtype == theirs.dtype == ld, f"autocast dtype {ours.dtype} != {theirs.dtype}"
        ref = F.linear(*(t.detach().to(ld).double() for t in (x, w, b)))
        assert_close(ours, ref, k=5, peers=[theirs], what=f"autocast {ld}")
        ours.float().sum().backward()
        assert w.grad is not None and w.grad.dtype == torch.float32
        w.grad = None


def _compile_model(device, dtype, mode=None):
    from .nn import Linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Linear(5, 8, device=device, dtype=dtype),
        torch.nn.Tanh(),
        Linear(8, 3, device=device, dtype=dtype),
    )
    reference = torch.nn.Sequential(
        torch.nn.Linear(5, 8, device=device, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3, device=device, dtype=torch.float64),
    )
    reference.load_state_dict(model.state_dict())  # the same values, upcast
    x = rand(4, 5, device=device, dtype=dtype, seed=23)
    ref_out = reference(x.double())
    ref_out.square().sum().backward()
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3 if mode else 1):  # CUDA graphs record after warm-up runs
        model.zero_grad(set_to_none=True)
        out = compiled(x)
        out.square().sum().backward()
    # Forward: two layers (5 + 8 terms); gradients add the 4 rows and the backward sums.
    for name, got in (("eager", eager_out), ("compiled", out)):
        assert_close(got, ref_out, k=13, what=f"{name} output")
    for p, eager_grad, r in zip(
        model.parameters(), eager_grads, reference.parameters(), strict=True
    ):
        assert_close(eager_grad, r.grad, k=32, what="eager grad")
        assert_close(p.grad, r.grad, k=32, what="compiled grad")


def _compile_applies(device, dtype):
    if dtype not in (torch.float32, torch.float64):
        return "one compile per device is enough; checked in float32/float64"
    return None


def _t_compile(device, dtype):
    _compile_model(device, dtype)


def _cuda_graph_applies(device, dtype):
    if device != "cuda":
        return "CUDA graphs need a GPU"
    return _compile_applies(device, dtype)


def _t_cuda_graphs(device, dtype):
    _compile_model(device, dtype, mode="reduce-overhead")


def _t_opcheck(device, dtype):
    for rg in (False, True):
        x, w, b = linear_inputs(device, dtype, 24, requires_grad=rg)
        go = rand(3, 4, device=device, dtype=dtype, requires_grad=rg, seed=25)
        ops = torch.ops.torchmatgrad
        torch.library.opcheck(ops.linear.default, (x, w, b))
        torch.library.opcheck(ops.linear.default, (x, w, None))
        torch.library.opcheck(ops.linear_backward.default, (go, x, w, [True, True, True]))
        torch.library.opcheck(ops.linear_backward.default, (go, x, w, [False, True, False]))
    x, w, _ = linear_inputs(device, dtype, 26, requires_grad=False)
    go = rand(3, 4, device=device, dtype=dtype, seed=27)
    buf = _like(w, 28)
    torch.library.opcheck(
        torch.ops.torchmatgrad.linear_backward_accumulate_.default, (go, x, w, buf, [True, True])
    )
    # The per-sample ops (torchmatgrad.per_sample; no autograd: they run inside a backward).
    xs = rand(2, 3, 5, device=device, dtype=dtype, seed=29)
    gs = rand(2, 3, 4, device=device, dtype=dtype, seed=30)
    scale = rand(2, device=device, dtype=accumulate_dtype(dtype), seed=31).abs()
    ops = torch.ops.torchmatgrad
    torch.library.opcheck(ops.per_sample_grad_norms.default, (gs, xs, True, "auto"))
    torch.library.opcheck(ops.per_sample_grads.default, (gs, xs))
    torch.library.opcheck(ops.clipped_grad_accumulate_.default, (gs, xs, scale, _like(w, 32), None))


TRANSFORMS = [
    Check("backward", _t_backward),
    Check("opcheck (all ops, ±requires_grad)", _t_opcheck),
    Check("double backward (gradgradcheck)", _t_gradgradcheck, _float64_only),
    Check("Hessian-vector product vs nn.Linear", _t_hvp),
    Check("forward-mode AD (func.jvp, forward_ad)", _t_forward_ad),
    Check("gradcheck fwd-AD + batched grads", _t_gradcheck_all, _float64_only),
    Check("vmap (x, W, both batched)", _t_vmap),
    Check("per-sample grads vmap(grad)", _t_per_sample),
    Check("jacrev / jacfwd", _t_jacrev_jacfwd),
    Check("Hessian jacfwd(jacrev) vs nn.Linear", _t_hessian),
    Check("autocast", _t_autocast, _autocast_applies),
    Check("torch.compile fullgraph fwd+bwd", _t_compile, _compile_applies),
    Check("torch.compile reduce-overhead (CUDA graphs)", _t_cuda_graphs, _cuda_graph_applies),
]


def run_table(checks: list[Check], devs: list[str], dtypes: list[torch.dtype]):
    """Run every applicable cell; returns (rows, failures) where rows[i] is the list of cell
    strings for checks[i]."""
    rows, failures, notes = [], [], {}
    for check in checks:
        cells = []
        for dev in devs:
            for dt in dtypes:
                reason = check.applies(dev, dt)
                if reason is not None:
                    cells.append("n/a")
                    notes.setdefault(check.name, reason)
                    continue
                try:
                    check.run(dev, dt)
                    cells.append("pass")
                except Exception as exc:  # noqa: BLE001 - every failure is reported
                    cells.append("FAIL")
                    failures.append(f"{check.name} [{dev}, {dt}]: {type(exc).__name__}: {exc}")
        rows.append(cells)
    return rows, failures, notes
