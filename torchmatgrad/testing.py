"""The checks every op must pass, shared by the test suite and ``python -m torchmatgrad check``.

Two tables of check cells:

* the op checks (:data:`OP_CHECKS`): for each device and dtype, the forward, the backward op and
  the Jacobians with respect to W, x and b against ``torch.autograd.functional.jacobian`` of a
  float64 reference, plus ``gradcheck`` in float64;
* the transform conformance matrix (:data:`TRANSFORMS`): rows are PyTorch transforms (double
  backward, forward-mode AD, vmap, jacrev/jacfwd, autocast, torch.compile, ...), columns are
  device × dtype, cells are pass / FAIL / n/a with the reason.

tests/test_linear.py and tests/test_transforms.py run the same cells that ``check`` prints, so
the printed matrix and the test suite cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops import linear

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Error bound relative to max|reference|, per dtype (16-bit: a few units of the last place).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def devices() -> list[str]:
    """Devices this process can run on: cpu, plus cuda when a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rand(*shape, device, dtype, requires_grad=False, seed_gen=None):
    t = torch.randn(*shape, dtype=torch.float64, generator=seed_gen).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= RTOL[dtype] * scale, f"{what}: max abs error {err:.3g} (scale {scale:.3g})"


@dataclass
class Check:
    """One row of a table: `applies(device, dtype)` returns None or the reason it does not
    apply; `run(device, dtype)` raises AssertionError on a mismatch."""

    name: str
    run: Callable[[str, torch.dtype], None]
    applies: Callable[[str, torch.dtype], str | None] = lambda d, t: None


def _float64_only(device: str, dtype: torch.dtype) -> str | None:
    return None if dtype == torch.float64 else "numerical gradient checks need float64"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- op checks ----------------------------------------------------------------------------


def _check_forward(device, dtype):
    g = _gen(1)
    for shape in [(5,), (3, 5), (2, 3, 5)]:
        x = _rand(*shape, device=device, dtype=dtype, seed_gen=g)
        w = _rand(4, 5, device=device, dtype=dtype, seed_gen=g)
        b = _rand(4, device=device, dtype=dtype, seed_gen=g)
        ref = F.linear(x.double(), w.double(), b.double())
        _close(torch.ops.torchmatgrad.linear(x, w, b), ref, dtype, f"forward {shape}")


def _check_backward_op(device, dtype):
    g = _gen(2)
    x = _rand(3, 5, device=device, dtype=dtype, seed_gen=g)
    w = _rand(4, 5, device=device, dtype=dtype, seed_gen=g)
    go = _rand(3, 4, device=device, dtype=dtype, seed_gen=g)
    gi, gw, gb = torch.ops.torchmatgrad.linear_backward(go, x, w, [True, True, True])
    G, X, W = go.double(), x.double(), w.double()
    _close(gi, G @ W, dtype, "grad_input = G·W")
    _close(gw, G.t() @ X, dtype, "grad_weight = Gᵀ·X")
    _close(gb, G.sum(0), dtype, "grad_bias = ΣG")


def _jacobians(fn, x, w, b):
    return torch.autograd.functional.jacobian(fn, (x, w, b))


def _check_jacobian(device, dtype):
    g = _gen(3)
    n, m = 3, 4
    x = _rand(m, device=device, dtype=dtype, seed_gen=g)
    w = _rand(n, m, device=device, dtype=dtype, seed_gen=g)
    b = _rand(n, device=device, dtype=dtype, seed_gen=g)
    ours = _jacobians(linear, x, w, b)
    ref = _jacobians(F.linear, x.double(), w.double(), b.double())
    for name, a, r in zip(("x", "W", "b"), ours, ref, strict=True):
        _close(a, r, dtype, f"d(Wx+b)/d{name}")
    # The 3rd-order tensor itself: J[i, k, l] = δ_ik·x_l, shape (n, n, m).
    expected = torch.einsum("ik,l->ikl", torch.eye(n, dtype=torch.float64), x.double().cpu())
    _close(ours[1], expected, dtype, "d(Wx)/dW = δ_ik·x_l")


def _check_gradcheck(device, dtype):
    g = _gen(4)
    x = _rand(2, 3, device=device, dtype=dtype, requires_grad=True, seed_gen=g)
    w = _rand(4, 3, device=device, dtype=dtype, requires_grad=True, seed_gen=g)
    b = _rand(4, device=device, dtype=dtype, requires_grad=True, seed_gen=g)
    assert torch.autograd.gradcheck(linear, (x, w, b))


OP_CHECKS = [
    Check("forward vs float64", _check_forward),
    Check("backward op vs G·W, Gᵀ·X, ΣG", _check_backward_op),
    Check("Jacobians vs autograd.functional", _check_jacobian),
    Check("gradcheck", _check_gradcheck, _float64_only),
]


# ---- transform conformance ----------------------------------------------------------------


def _inputs(device, dtype, seed, requires_grad=True, rows=(3,)):
    g = _gen(seed)
    x = _rand(*rows, 5, device=device, dtype=dtype, requires_grad=requires_grad, seed_gen=g)
    w = _rand(4, 5, device=device, dtype=dtype, requires_grad=requires_grad, seed_gen=g)
    b = _rand(4, device=device, dtype=dtype, requires_grad=requires_grad, seed_gen=g)
    return x, w, b


def _t_backward(device, dtype):
    x, w, b = _inputs(device, dtype, 10)
    go = torch.randn(3, 4, dtype=torch.float64, generator=_gen(11)).to(device, dtype)
    ours = torch.autograd.grad(linear(x, w, b), (x, w, b), go)
    ref = torch.autograd.grad(F.linear(x.double(), w.double(), b.double()), (x, w, b), go)
    for a, r in zip(ours, ref, strict=True):
        _close(a, r, dtype, "backward")


def _t_gradgradcheck(device, dtype):
    x, w, b = _inputs(device, dtype, 12)
    assert torch.autograd.gradgradcheck(linear, (x, w, b))


def _t_hvp(device, dtype):
    # Hessian-vector product through a 2-layer model, against the same model in torch.
    x, w1, b1 = _inputs(device, dtype, 13)
    w2 = _rand(2, 4, device=device, dtype=dtype, requires_grad=True, seed_gen=_gen(14))
    v = [torch.randn_like(t) for t in (w1, b1, w2)]

    def hvp(lin):
        loss = lin(torch.tanh(lin(x, w1, b1)), w2).pow(2).sum()
        grads = torch.autograd.grad(loss, (w1, b1, w2), create_graph=True)
        dot = sum((g * vi).sum() for g, vi in zip(grads, v, strict=True))
        return torch.autograd.grad(dot, (w1, b1, w2))

    for a, r in zip(hvp(linear), hvp(F.linear), strict=True):
        _close(a, r, dtype, "Hessian-vector product")


def _t_forward_ad(device, dtype):
    x, w, b = _inputs(device, dtype, 15, requires_grad=False)
    tx, tw, tb = (torch.randn_like(t) for t in (x, w, b))
    _, ours = torch.func.jvp(linear, (x, w, b), (tx, tw, tb))
    _, ref = torch.func.jvp(F.linear, (x, w, b), (tx, tw, tb))
    _close(ours, ref, dtype, "torch.func.jvp")
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = linear(fwAD.make_dual(x, tx), w, fwAD.make_dual(b, tb))
        _close(fwAD.unpack_dual(out).tangent, F.linear(tx, w) + tb, dtype, "forward_ad")


def _t_gradcheck_all(device, dtype):
    x, w, b = _inputs(device, dtype, 16)
    assert torch.autograd.gradcheck(
        linear,
        (x, w, b),
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
    )


def _t_vmap(device, dtype):
    x, w, b = _inputs(device, dtype, 17, requires_grad=False, rows=(6, 3))
    _close(torch.func.vmap(linear, (0, None, None))(x, w, b), F.linear(x, w, b), dtype, "vmap x")
    ws = _rand(6, 4, 5, device=device, dtype=dtype, seed_gen=_gen(18))
    ours = torch.func.vmap(linear, (None, 0, None))(x[0], ws, b)
    ref = torch.stack([F.linear(x[0], wi, b) for wi in ws])
    _close(ours, ref, dtype, "vmap W")
    ours = torch.func.vmap(linear, (0, 0, None))(x, ws, b)
    ref = torch.stack([F.linear(xi, wi, b) for xi, wi in zip(x, ws, strict=True)])
    _close(ours, ref, dtype, "vmap x and W")


def _t_per_sample(device, dtype):
    # Per-sample gradients of L_b = Σ (W x_b + b)·c_b  are the outer products c_b·x_bᵀ.
    x, w, b = _inputs(device, dtype, 19, requires_grad=False, rows=(7,))
    c = _rand(7, 4, device=device, dtype=dtype, seed_gen=_gen(20))

    def loss(w, b, xb, cb):
        return (linear(xb, w, b) * cb).sum()

    gw, gb = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), (None, None, 0, 0))(w, b, x, c)
    _close(gw, torch.einsum("bi,bj->bij", c.double(), x.double()), dtype, "per-sample g·xᵀ")
    _close(gb, c, dtype, "per-sample grad_bias")


def _t_jacrev_jacfwd(device, dtype):
    x, w, b = _inputs(device, dtype, 21, requires_grad=False, rows=())
    ref = torch.autograd.functional.jacobian(lambda w_: F.linear(x, w_, b), w)
    for name, jac in (("jacrev", torch.func.jacrev), ("jacfwd", torch.func.jacfwd)):
        _close(jac(linear, argnums=1)(x, w, b), ref, dtype, f"{name} d/dW (n, n, m)")
        _close(jac(linear, argnums=0)(x, w, b), w, dtype, f"{name} d/dx = W")


def _t_hessian(device, dtype):
    # Forward-over-reverse: the Hessian of a scalar loss with respect to W.
    x, w, b = _inputs(device, dtype, 28, requires_grad=False, rows=(3,))

    def loss(lin):
        return lambda w_: torch.tanh(lin(x, w_, b)).sum()

    ours = torch.func.jacfwd(torch.func.jacrev(loss(linear)))(w)
    ref = torch.func.jacfwd(torch.func.jacrev(loss(F.linear)))(w)
    _close(ours, ref, dtype, "Hessian d²L/dW²")


def _autocast_applies(device, dtype):
    if dtype != torch.float32:
        return "autocast casts float32 inputs; run once per device"
    return None


def _t_autocast(device, dtype):
    x, w, b = _inputs(device, dtype, 22)
    low = [torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16]
    for ld in low:
        with torch.autocast(device_type=device, dtype=ld):
            ours, ref = linear(x, w, b), F.linear(x, w, b)
        assert ours.dtype == ref.dtype == ld, f"autocast dtype {ours.dtype} != {ref.dtype}"
        _close(ours, F.linear(x.to(ld), w.to(ld), b.to(ld)), ld, f"autocast {ld}")
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
    x = _rand(4, 5, device=device, dtype=dtype, seed_gen=_gen(23))
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
    _close(out, eager_out, dtype, "compiled output")
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        _close(p.grad, g, dtype, "compiled grad")


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
        x, w, b = _inputs(device, dtype, 24, requires_grad=rg)
        go = _rand(3, 4, device=device, dtype=dtype, requires_grad=rg, seed_gen=_gen(25))
        ops = torch.ops.torchmatgrad
        torch.library.opcheck(ops.linear.default, (x, w, b))
        torch.library.opcheck(ops.linear.default, (x, w, None))
        torch.library.opcheck(ops.linear_backward.default, (go, x, w, [True, True, True]))
        torch.library.opcheck(ops.linear_backward.default, (go, x, w, [False, True, False]))
    x, w, _ = _inputs(device, dtype, 26, requires_grad=False)
    go = _rand(3, 4, device=device, dtype=dtype, seed_gen=_gen(27))
    buf = torch.randn_like(w)
    torch.library.opcheck(
        torch.ops.torchmatgrad.linear_backward_accumulate_.default, (go, x, w, buf, [True, True])
    )


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
