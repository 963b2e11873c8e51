"""The transform conformance cells (:data:`TRANSFORMS`; see :mod:`torchmatgrad.testing`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import linear
from .cells import Check, _float64_only
from .inputs import double_leaves, linear_inputs, rand
from .tolerance import accumulate_dtype, assert_close

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
    from ..nn import Linear

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
