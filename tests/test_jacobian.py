"""Tests for torchmatgrad.jacobian (explicit derivatives of W·x) and `explain`.

Every form is compared with torch.autograd (functional.jacobian, autograd.grad, func.jvp) run in
float64 on the very same values (low-precision inputs are upcast exactly).
"""

from __future__ import annotations

import resource
import types

import pytest
import torch
from conftest import DEVICES, DTYPES, NO_GPU
from torch import Tensor

import torchmatgrad
from torchmatgrad.cli import explain
from torchmatgrad.jacobian import JacobianOperator, KronFactors, dependent_jacobian, jacobian
from torchmatgrad.testing import OpLog, assert_close, rand

AJ = torch.autograd.functional.jacobian

SHAPES = [(1, 1), (1, 4), (4, 1), (3, 5), (6, 2)]  # (n, m)


def close(got: Tensor, ref: Tensor, dtype: torch.dtype, k: int = 1) -> None:
    """A product computed in `dtype` against its float64 reference (k: terms summed), under
    the tolerance policy of torchmatgrad.testing; the dense forms are copies, checked exactly."""
    assert got.dtype == dtype
    assert_close(got, ref, k=k)


def exact(got: Tensor, ref: Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=0)


# ---- dense forms -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", SHAPES)
def test_weight_dense_forms_match_autograd(device, dtype, n, m):
    W = rand(n, m, dtype=dtype, device=device, seed=n * 10 + m)
    x = rand(m, dtype=dtype, device=device, seed=n * 10 + m + 1)
    W64, x64 = W.double(), x.double()

    J = jacobian(W, x)
    assert J.shape == (n, n, m) and J.device == W.device
    exact(J, AJ(lambda w: w @ x64, W64), dtype)
    # Same dtype too: autograd's own answer in bfloat16/float32 is the same copy of x.
    exact(J, AJ(lambda w: w @ x, W), dtype)

    # col: math vec(W) = W.t().reshape(-1) -> xᵀ ⊗ I_n
    V = jacobian(W, x, form="vec", order="col")
    assert V.shape == (n, n * m)
    exact(V, AJ(lambda v: v.reshape(m, n).t() @ x64, W64.t().reshape(-1)), dtype)
    exact(V, torch.kron(x64[None, :], torch.eye(n, dtype=torch.float64, device=device)), dtype)
    # row: torch's W.reshape(-1) -> I_n ⊗ xᵀ
    V = jacobian(W, x, form="vec", order="row")
    exact(V, AJ(lambda v: v.reshape(n, m) @ x64, W64.reshape(-1)), dtype)
    exact(V, torch.kron(torch.eye(n, dtype=torch.float64, device=device), x64[None, :]), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", [(1, 1), (3, 5), (4, 1)])
def test_input_and_bias_dense_forms_match_autograd(device, dtype, n, m):
    W = rand(n, m, dtype=dtype, device=device, seed=1)
    x = rand(m, dtype=dtype, device=device, seed=2)
    b = rand(n, dtype=dtype, device=device, seed=3)
    W64, x64, b64 = W.double(), x.double(), b.double()
    ref_x = AJ(lambda v: W64 @ v + b64, x64)  # = W
    ref_b = AJ(lambda v: W64 @ x64 + v, b64)  # = I_n
    for form in ("tensor", "vec"):
        for order in ("col", "row"):
            exact(jacobian(W, x, wrt="input", form=form, order=order), ref_x, dtype)
            exact(jacobian(W, x, wrt="bias", form=form, order=order), ref_b, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,n,m", [(1, 1, 1), (3, 2, 5), (4, 3, 1)])
def test_batched_dense_forms_are_per_sample_jacobians(device, dtype, B, n, m):
    W = rand(n, m, dtype=dtype, device=device, seed=4)
    X = rand(B, m, dtype=dtype, device=device, seed=5)
    W64, X64 = W.double(), X.double()
    # W is shared, so autograd's (B, n, n, m) Jacobian of X·Wᵀ is exactly the per-sample stack.
    exact(jacobian(W, X), AJ(lambda w: X64 @ w.t(), W64), dtype)
    exact(
        jacobian(W, X, form="vec", order="col"),
        AJ(lambda v: X64 @ v.reshape(m, n), W64.t().reshape(-1)),
        dtype,
    )
    exact(
        jacobian(W, X, form="vec", order="row"),
        AJ(lambda v: X64 @ v.reshape(n, m).t(), W64.reshape(-1)),
        dtype,
    )
    # input: autograd gives (B, n, B, m), block diagonal; the per-sample Jacobians are the blocks.
    full = AJ(lambda v: v @ W64.t(), X64)
    blocks = torch.stack([full[i, :, i, :] for i in range(B)])
    exact(jacobian(W, X, wrt="input"), blocks, dtype)
    # bias: ∂f_b/∂b = I_n for every sample.
    exact(
        jacobian(W, X, wrt="bias"),
        AJ(lambda v: X64 @ W64.t() + v, torch.zeros_like(W64[:, 0])),
        dtype,
    )


# ---- the operator ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", SHAPES)
def test_operator_products_match_autograd(device, dtype, n, m):
    W = rand(n, m, dtype=dtype, device=device, seed=6)
    x = rand(m, dtype=dtype, device=device, seed=7)
    g = rand(n, dtype=dtype, device=device, seed=8)
    dW = rand(n, m, dtype=dtype, device=device, seed=9)
    dx = rand(m, dtype=dtype, device=device, seed=10)
    db = rand(n, dtype=dtype, device=device, seed=11)
    W64, x64, g64, dW64, dx64 = (t.double() for t in (W, x, g, dW, dx))

    op = jacobian(W, x, form="operator")
    assert isinstance(op, JacobianOperator)
    assert op.shape == (n, n, m) and op.numel == n * n * m

    # vjp = g·xᵀ = ∂(g·f)/∂W
    w = W64.clone().requires_grad_()
    (ref,) = torch.autograd.grad((g64 * (w @ x64)).sum(), w)
    close(op.vjp(g), ref, dtype, k=1)
    # jvp = dW·x
    _, ref = torch.func.jvp(lambda w: w @ x64, (W64,), (dW64,))
    close(op.jvp(dW), ref, dtype, k=m)
    # the all-ones direction: (xᵀ·1_m)·1_n, not the Jacobian
    ones = torch.ones(n, m, dtype=dtype, device=device)
    close(op.jvp(ones), x64.sum() * torch.ones(n, dtype=torch.float64, device=device), dtype, k=m)

    # dense views
    exact(op.to_dense(), jacobian(W, x), dtype)
    for order in ("col", "row"):
        factors = op.kron(order=order)
        assert isinstance(factors, KronFactors)
        exact(factors.to_dense(), jacobian(W, x, form="vec", order=order), dtype)
        exact(op.to_dense(form="vec", order=order), jacobian(W, x, form="vec", order=order), dtype)

    # wrt input: jvp = W·dx, vjp = Wᵀ·g
    opx = jacobian(W, x, wrt="input", form="operator")
    assert opx.shape == (n, m)
    xr = x64.clone().requires_grad_()
    (ref,) = torch.autograd.grad((g64 * (W64 @ xr)).sum(), xr)
    close(opx.vjp(g), ref, dtype, k=n)
    _, ref = torch.func.jvp(lambda v: W64 @ v, (x64,), (dx64,))
    close(opx.jvp(dx), ref, dtype, k=m)
    exact(opx.to_dense(), W64, dtype)

    # wrt bias: identity
    opb = jacobian(W, x, wrt="bias", form="operator")
    assert opb.shape == (n, n)
    exact(opb.vjp(g), g64, dtype)
    exact(opb.jvp(db), db.double(), dtype)
    exact(opb.to_dense(), torch.eye(n, dtype=torch.float64, device=device), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,n,m", [(1, 1, 1), (3, 4, 2), (5, 1, 3)])
def test_batched_operator_products_match_autograd(device, dtype, B, n, m):
    W = rand(n, m, dtype=dtype, device=device, seed=12)
    X = rand(B, m, dtype=dtype, device=device, seed=13)
    G = rand(B, n, dtype=dtype, device=device, seed=14)
    dW = rand(n, m, dtype=dtype, device=device, seed=15)
    dWs = rand(B, n, m, dtype=dtype, device=device, seed=16)
    W64, X64, G64, dW64, dWs64 = (t.double() for t in (W, X, G, dW, dWs))

    op = jacobian(W, X, form="operator")
    assert op.shape == (B, n, n, m) and op.batch == B

    # per-sample vjp: one outer product g_b·x_bᵀ per sample = per-sample autograd gradients
    def loss(w, x, g):
        return (g * (w @ x)).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(W64, X64, G64)
    got = op.vjp(G)
    assert got.shape == (B, n, m)
    close(got, per_sample, dtype, k=1)
    # reduce=True: the gradient of the summed loss, Gᵀ·X
    w = W64.clone().requires_grad_()
    (ref,) = torch.autograd.grad((G64 * (X64 @ w.t())).sum(), w)
    close(op.vjp(G, reduce=True), ref, dtype, k=B)

    # jvp, shared and per-sample directions
    _, ref = torch.func.jvp(lambda w: X64 @ w.t(), (W64,), (dW64,))
    close(op.jvp(dW), ref, dtype, k=m)
    ref = torch.einsum("bij,bj->bi", dWs64, X64)
    close(op.jvp(dWs), ref, dtype, k=m)

    exact(op.to_dense(), jacobian(W, X), dtype)
    for order in ("col", "row"):
        exact(op.kron(order).to_dense(), jacobian(W, X, form="vec", order=order), dtype)

    # input and bias
    opx = jacobian(W, X, wrt="input", form="operator")
    Xr = X64.clone().requires_grad_()
    (ref,) = torch.autograd.grad((G64 * (Xr @ W64.t())).sum(), Xr)
    close(opx.vjp(G), ref, dtype, k=n)
    close(opx.jvp(X), X64 @ W64.t(), dtype, k=m)
    opb = jacobian(W, X, wrt="bias", form="operator")
    exact(opb.vjp(G), G64, dtype)
    close(opb.vjp(G, reduce=True), G64.sum(0), dtype, k=B)
    exact(opb.jvp(G[0]), G64[0].expand(B, n), dtype)


def test_operator_products_run_on_torchmatgrad_kernels():
    W = rand(3, 4, dtype=torch.float32, device="cpu", seed=17)
    x = rand(4, dtype=torch.float32, device="cpu", seed=18)
    g = rand(3, dtype=torch.float32, device="cpu", seed=19)
    op = jacobian(W, x, form="operator")
    with OpLog() as log:
        op.vjp(g)
    assert "torchmatgrad.linear_backward" in log.names, log.names
    assert not any(name.startswith("aten.") for name in log.names), log.names
    with OpLog() as log:
        op.jvp(W)
    assert "torchmatgrad.linear" in log.names, log.names
    assert not any(
        name in ("aten.mm", "aten.mv", "aten.outer", "aten.matmul") for name in log.names
    )


def test_operator_does_not_materialize_4096():
    n = m = 4096
    W = rand(n, m, dtype=torch.float32, device="cpu", seed=20)
    dW = rand(n, m, dtype=torch.float32, device="cpu", seed=21)
    x = rand(m, dtype=torch.float32, device="cpu", seed=22)
    g = rand(n, dtype=torch.float32, device="cpu", seed=23)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with OpLog() as log:
        op = jacobian(W, x, form="operator")
        assert op.shape == (n, n, m) and op.numel == 2**36
        v = op.vjp(g)
        j = op.jvp(dW)
        factors = op.kron()
    # Nothing bigger than W itself was produced by any op (2^36 would be 256 GiB in float32).
    assert log.max_numel <= n * m, log.max_numel
    assert factors.left.shape == (1, m) and factors.right.shape == (n, n)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    assert rss_growth < 2 * 2**30, rss_growth
    # and the results are right (spot checks against plain torch)
    assert_close(v[:8], torch.outer(g[:8].double(), x.double()), what="g·xᵀ")
    assert_close(j, dW.double() @ x.double(), k=m, what="dW·x")


def test_materialization_monitor_can_fail():
    # The monitor above does see a dense n·n·m tensor when one is built.
    W = rand(3, 4, dtype=torch.float32, device="cpu", seed=24)
    x = rand(4, dtype=torch.float32, device="cpu", seed=25)
    with OpLog() as log:
        jacobian(W, x, form="operator").to_dense()
    assert log.max_numel == 3 * 3 * 4


@pytest.mark.cuda
@pytest.mark.skipif(NO_GPU, reason="no CUDA GPU visible")
def test_operator_does_not_materialize_4096_cuda():
    n = m = 4096
    W = rand(n, m, dtype=torch.float32, device="cuda", seed=26)
    dW = rand(n, m, dtype=torch.float32, device="cuda", seed=27)
    x = rand(m, dtype=torch.float32, device="cuda", seed=28)
    g = rand(n, dtype=torch.float32, device="cuda", seed=29)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    op = jacobian(W, x, form="operator")
    v, j = op.vjp(g), op.jvp(dW)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 4 * n * m * 4, peak  # a few W-sized buffers, never 2^36 entries
    assert_close(v[:8], torch.outer(g[:8].double(), x.double()), what="g·xᵀ")
    assert_close(j, dW.double() @ x.double(), k=m, what="dW·x")


# ---- the dependent case x = F(W)·x0 -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n", [1, 3, 4])
def test_dependent_jacobian_transpose(dtype, n):
    W = rand(n, n, dtype=dtype, device="cpu", seed=30 + n)
    x0 = rand(n, dtype=dtype, device="cpu", seed=40 + n)
    W64, x064 = W.double(), x0.double()
    ref = AJ(lambda w: w @ (w.t() @ x064), W64)
    J = dependent_jacobian(W, x0, lambda w: w.t())
    close(J, ref, dtype, k=n + 1)
    # closed form: δ_ik·(Wᵀx0)_l + W_il·x0_k
    eye = torch.eye(n, dtype=torch.float64)
    closed = torch.einsum("ik,l->ikl", eye, W64.t() @ x064) + torch.einsum("il,k->ikl", W64, x064)
    close(J, closed, dtype, k=n + 1)
    close(
        dependent_jacobian(W, x0, lambda w: w.t(), form="vec", order="col"),
        AJ(lambda v: v.reshape(n, n).t() @ (v.reshape(n, n) @ x064), W64.t().reshape(-1)),
        dtype,
        k=n + 1,
    )
    close(
        dependent_jacobian(W, x0, lambda w: w.t(), form="vec", order="row"),
        AJ(lambda v: v.reshape(n, n) @ (v.reshape(n, n).t() @ x064), W64.reshape(-1)),
        dtype,
        k=n + 1,
    )


def test_dependent_jacobian_general_F():
    # Non-square W, F(W) = WᵀW (m×m): f = W·WᵀW·x0.
    W = rand(2, 3, dtype=torch.float64, device="cpu", seed=50)
    x0 = rand(3, dtype=torch.float64, device="cpu", seed=51)
    J = dependent_jacobian(W, x0, lambda w: w.t() @ w)
    close(J, AJ(lambda w: w @ (w.t() @ w @ x0), W), torch.float64, k=8)


# ---- argument checks -----------------------------------------------------------------------


def _bad_cases():
    W = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64)
    op = jacobian(W, x, form="operator")
    opx = jacobian(W, x, wrt="input", form="operator")
    return [
        (lambda: jacobian(W[0], x), "weight must be 2-D"),
        (lambda: jacobian(W, torch.randn(2, 3, 4, dtype=torch.float64)), "input must be 1-D"),
        (lambda: jacobian(W, torch.randn(5, dtype=torch.float64)), r"input.size\(-1\)"),
        (lambda: jacobian(W, x.float()), "input and weight must have the same dtype"),
        (lambda: jacobian(W.int(), x.int()), "weight must be a floating point tensor"),
        (lambda: jacobian(W, x, wrt="output"), "unknown wrt='output'"),
        (lambda: jacobian(W, x, form="dense"), "unknown form='dense'"),
        (lambda: jacobian(W, x, order="F"), "unknown order='F'"),
        (lambda: op.vjp(torch.randn(4, dtype=torch.float64)), "grad_output must have shape"),
        (lambda: op.vjp(torch.randn(3)), "grad_output must have the same dtype as weight"),
        (lambda: op.jvp(torch.randn(4, 3, dtype=torch.float64)), "direction must have shape"),
        (lambda: opx.jvp(torch.randn(3, dtype=torch.float64)), "direction must have shape"),
        (lambda: opx.kron(), "only wrt='weight'"),
        (lambda: op.to_dense(form="operator"), "unknown form='operator'"),
        (lambda: op.kron(order="diag"), "unknown order='diag'"),
        (lambda: dependent_jacobian(W, x, lambda w: w), r"F\(weight\) must return"),
        (lambda: dependent_jacobian(W, x[None], lambda w: w.t()), "x0 must be 1-D"),
        (lambda: dependent_jacobian(W, x, lambda w: w.t(), form="operator"), "unknown form"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments_raise_clear_errors(case):
    fn, match = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError), match=match):
        fn()


def test_non_tensor_arguments():
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        jacobian([[1.0]], torch.randn(1))
    with pytest.raises(TypeError, match="input must be a Tensor"):
        jacobian(torch.randn(1, 1), [1.0])


def test_package_export():
    assert not isinstance(torchmatgrad.jacobian, types.ModuleType)
    assert torchmatgrad.jacobian is jacobian


# ---- explain ---------------------------------------------------------------------------------

SECTIONS = [
    "[1] Index form: ∂f_i/∂W_kl = δ_ik·x_l",
    "J[0, :, :]",
    "J[1, :, :]",
    "[2] vec form, column-major",
    "xᵀ ⊗ I_2",
    "[3] vec form, row-major",
    "I_2 ⊗ xᵀ",
    "[4] Backprop",
    "∂L/∂W = g·xᵀ",
    "[5] JVP along a random direction",
    "[6] JVP along dW = all-ones",
    "(xᵀ·1_m)·1_n",
    "NOT the",
    "All 7 checks match torch.autograd.functional.jacobian.",
]


def test_explain_prints_every_section(capsys):
    assert explain.main(["--n", "2", "--m", "3", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    for section in SECTIONS:
        assert section in out, section
    assert out.count("matches (max abs error") == 7
    assert "MISMATCH" not in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--n", "1", "--m", "1", "--dtype", "float32"],
        ["--n", "3", "--m", "4", "--seed", "7", "--dtype", "bfloat16"],
        ["--n", "2", "--m", "5", "--dtype", "float16"],
    ],
)
def test_explain_other_arguments_exit_0(argv, capsys):
    assert explain.main(argv) == 0
    assert "checks match" in capsys.readouterr().out


def test_explain_reports_a_wrong_jacobian(monkeypatch, capsys):
    # The circulating wrong answer: "every entry is 1".
    def wrong(weight, input, wrt="weight", form="tensor", order="col"):
        out = jacobian(weight, input, wrt, form, order)
        return torch.ones_like(out) if form == "tensor" else out

    monkeypatch.setattr(explain, "jacobian", wrong)
    assert explain.main(["--n", "2", "--m", "3"]) == 1
    out = capsys.readouterr().out
    assert "tensor J vs autograd: MISMATCH" in out
    assert "MISMATCH in 1 of 7 checks" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--n", "0"], "--n"),
        (["--m", "-2"], "--m"),
        (["--n", "two"], "--n"),
        (["--dtype", "int8"], "--dtype"),
        (["--seed", "x"], "--seed"),
        (["--device", "nodevice"], "--device"),
        (["--bogus"], "--bogus"),
    ],
)
def test_explain_bad_arguments(argv, needle, capsys):
    assert explain.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err, err
    assert err.startswith("python -m torchmatgrad explain: error:"), err
    assert needle in err, err


def test_explain_help(capsys):
    assert explain.main(["--help"]) == 0
    assert "usage: python -m torchmatgrad explain" in capsys.readouterr().out
