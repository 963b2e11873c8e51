"""torchmatgrad.curvature: K-FAC against curvlinops (every fisher type, both approximations,
MLPs and B×T×d sequence models), the cases where K-FAC is exact, the MC estimators'
expectations, the Kronecker operator's algebra, the diagonal GGN and the gradient moments."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from _curvature_models import DT, dense, make_case, numel

import torchmatgrad
from torchmatgrad import curvature
from torchmatgrad.curvature._products import gram, gram_with_ones

curvlinops = pytest.importorskip("curvlinops")
warnings.filterwarnings("ignore", category=FutureWarning)

TOL = 1e-10  # float64, exact quantities: relative to the largest entry


def rel_err(got, ref) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


# ---- products ---------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 17, 300])
def test_gram_matches_full_product(d):
    x = torch.randn(37, 2 * d, dtype=DT)[:, ::2]  # non-contiguous columns
    ref = x.t() @ x
    assert rel_err(gram(x), ref) < 1e-14
    out = torch.randn(d + 1, d + 1, dtype=DT)
    xa = torch.cat([x, torch.ones(37, 1, dtype=DT)], 1)
    want = out + 0.5 * xa.t() @ xa
    assert rel_err(gram_with_ones(x, out, alpha=0.5), want) < 1e-14


def test_gram_empty_rows_is_zero():
    assert gram(torch.randn(0, 300, dtype=DT)).abs().max() == 0


# ---- K-FAC against curvlinops -----------------------------------------------------------------

# 2-D inputs have no weight-sharing dim: "reduce" is "expand" there, so only sequences take both
CASES = [
    (kind, loss, red, ft, approx)
    for kind, loss, red, ft in itertools.product(
        ["mlp", "seq"], ["mse", "ce"], ["mean", "sum"], ["empirical", "mc", "type-2"]
    )
    for approx in (["expand"] if kind == "mlp" else ["expand", "reduce"])
]


@pytest.mark.parametrize(("kind", "loss", "reduction", "fisher_type", "kfac_approx"), CASES)
def test_kfac_matches_curvlinops(kind, loss, reduction, fisher_type, kfac_approx):
    model, lf, data = make_case(kind, loss, reduction)
    params = list(model.parameters())
    for separate in (False, True):
        kw = dict(fisher_type=fisher_type, kfac_approx=kfac_approx)
        ref = curvlinops.KFACLinearOperator(
            model, lf, params, data, separate_weight_and_bias=separate,
            check_deterministic=False, mc_samples=2 if fisher_type == "mc" else 1, **kw,
        )  # fmt: skip
        op = curvature.kfac(
            model, lf, data, separate_weight_and_bias=separate,
            mc_samples=2 if fisher_type == "mc" else 1, **kw,
        )  # fmt: skip
        K = dense(ref, numel(model))
        assert rel_err(op.to_dense(), K) < TOL
        assert abs(op.trace() - ref.trace) / ref.trace < TOL
        # damped: CrossEntropy's G is singular (Σ_c g_c = 0), its undamped logdet is rounding
        ref_logdet = torch.logdet(K + 0.1 * torch.eye(K.shape[0], dtype=DT))
        assert abs(op.logdet(0.1) - ref_logdet) / abs(ref_logdet) < TOL


def test_kfac_empirical_step_fills_grad_in_the_same_backward():
    model, lf, data = make_case("seq", "ce", "mean")
    X, y = data[0]
    kf = curvature.KFAC(model, lf, fisher_type="empirical")
    loss = kf.step(X, y, accumulate_grad=True)
    ref = torch.autograd.grad(lf(model(X), y), list(model.parameters()))
    for p, r in zip(model.parameters(), ref, strict=True):
        assert rel_err(p.grad, r) < 1e-13
    assert torch.isclose(loss, lf(model(X), y))
    ref_op = curvature.kfac(model, lf, (X, y), fisher_type="empirical")
    assert rel_err(kf.operator().to_dense(), ref_op.to_dense()) < 1e-14


@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_kfac_accumulate_grad_other_fisher_types(fisher_type):
    model, lf, data = make_case("mlp", "mse", "mean")
    X, y = data[0]
    kf = curvature.KFAC(model, lf, fisher_type=fisher_type)
    kf.step(X, y, accumulate_grad=True)
    ref = torch.autograd.grad(lf(model(X), y), list(model.parameters()))
    for p, r in zip(model.parameters(), ref, strict=True):
        assert rel_err(p.grad, r) < 1e-13
    want = curvature.kfac(model, lf, (X, y), fisher_type=fisher_type).to_dense()
    assert rel_err(kf.operator().to_dense(), want) < 1e-14


# ---- where K-FAC is exact ---------------------------------------------------------------------


def _ggn_blocks(model, lf, data):
    """The exact GGN (curvlinops) and each layer's diagonal block's index range."""
    params = list(model.parameters())
    ggn = dense(
        curvlinops.GGNLinearOperator(model, lf, params, data, check_deterministic=False),
        numel(model),
    )
    ranges, off = [], 0
    for m in model:
        k = sum(p.numel() for p in m.parameters())
        if k:
            ranges.append(slice(off, off + k))
            off += k
    return ggn, ranges


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_kfac_exact_for_deep_linear_network_with_mse(kind):
    torch.manual_seed(1)
    model = torchmatgrad.nn.convert_linear(
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    ).to(DT)
    shape = (7,) if kind == "mlp" else (3, 5)
    data = [(torch.randn(*shape, 4, dtype=DT), torch.randn(*shape, 3, dtype=DT))]
    lf = torch.nn.MSELoss()
    ggn, ranges = _ggn_blocks(model, lf, data)
    op = curvature.kfac(model, lf, data, fisher_type="type-2")
    K = op.to_dense()
    for r in ranges:
        assert rel_err(K[r, r], ggn[r, r]) < TOL


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_kfac_exact_for_batch_size_one(loss):
    model, lf, data = make_case("mlp", loss, "mean")
    X, y = data[0]
    data = [(X[:1], y[:1])]
    ggn, ranges = _ggn_blocks(model, lf, data)
    K = curvature.kfac(model, lf, data, fisher_type="type-2").to_dense()
    for r in ranges:
        assert rel_err(K[r, r], ggn[r, r]) < TOL


# ---- Monte Carlo: expectations ----------------------------------------------------------------
# The test: R = 256 independent one-draw estimates (seeds 0..R-1, fixed, so the test is
# deterministic and cannot flake); their mean must lie within 5 standard errors (the spread of
# the R estimates / √R, + 1e-12) of the exact value in every entry. A wrong scale (a factor of
# C or M) or a biased sampler misses this bound by far.

R = 256


def _within_k_se(samples: torch.Tensor, exact: torch.Tensor, k: float = 5.0) -> None:
    mean, se = samples.mean(0), samples.std(0) / R**0.5
    assert ((mean - exact).abs() <= k * se + 1e-12).all(), ((mean - exact).abs() / se).max()


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_kfac_mc_expectation_is_type2(loss):
    model, lf, data = make_case("mlp", loss, "mean")
    exact = curvature.kfac(model, lf, data, fisher_type="type-2").to_dense()
    samples = torch.stack(
        [curvature.kfac(model, lf, data, fisher_type="mc", seed=s).to_dense() for s in range(R)]
    )
    _within_k_se(samples, exact)


@pytest.mark.parametrize(("kind", "loss"), [("mlp", "ce"), ("seq", "mse"), ("seq", "ce")])
def test_diag_ggn_mc_expectation_is_exact(kind, loss):
    model, lf, data = make_case(kind, loss, "mean")
    X, y = data[0]
    exact = torch.cat([t.reshape(-1) for t in curvature.diag_ggn(model, lf, X, y).values()])
    samples = torch.stack(
        [
            torch.cat(
                [
                    t.reshape(-1)
                    for t in curvature.diag_ggn(model, lf, X, y, mc_samples=1, seed=s).values()
                ]
            )
            for s in range(R)
        ]
    )
    _within_k_se(samples, exact)


# ---- the operator -----------------------------------------------------------------------------


@pytest.mark.parametrize("separate", [False, True])
def test_operator_inverse_eigh_logdet_trace(separate):
    model, lf, data = make_case("seq", "ce", "mean")
    op = curvature.kfac(model, lf, data, fisher_type="type-2", separate_weight_and_bias=separate)
    K = op.to_dense()
    P, delta = K.shape[0], 0.3
    v = torch.randn(P, dtype=DT)
    V = torch.randn(P, 4, dtype=DT)
    assert rel_err(op @ v, K @ v) < 1e-13
    assert rel_err(op @ V, K @ V) < 1e-13
    Kd = K + delta * torch.eye(P, dtype=DT)
    assert rel_err(op.inverse(delta) @ V, torch.linalg.solve(Kd, V)) < 1e-10
    assert abs(op.logdet(delta) - torch.logdet(Kd)) < 1e-10
    assert abs(op.inverse(delta).logdet() + torch.logdet(Kd)) < 1e-10
    assert abs(op.trace() - K.trace()) < 1e-12
    ev = torch.sort(op.eigenvalues()).values
    assert rel_err(ev, torch.linalg.eigvalsh(K)) < 1e-10
    # list form: shaped like the parameters
    parts = [torch.randn_like(p) for p in op.params]
    flat = torch.cat([t.reshape(-1) for t in parts])
    got = torch.cat([t.reshape(-1) for t in op.matvec(parts)])
    assert rel_err(got, K @ flat) < 1e-13


def test_operator_bad_vector_names_the_shape():
    model, lf, data = make_case("mlp", "ce", "mean")
    op = curvature.kfac(model, lf, data, fisher_type="empirical")
    with pytest.raises(ValueError, match=r"v must have shape \["):
        op @ torch.randn(3, dtype=DT)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        op.inverse_matvec(torch.randn(op.numel, dtype=DT), -1.0)


# ---- diagonal GGN and moments -----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "loss", "reduction"), list(itertools.product(
    ["mlp", "seq"], ["mse", "ce"], ["mean", "sum"])))  # fmt: skip
def test_diag_ggn_exact_matches_curvlinops_ggn(kind, loss, reduction):
    model, lf, data = make_case(kind, loss, reduction)
    X, y = data[0]
    ggn = dense(
        curvlinops.GGNLinearOperator(
            model, lf, list(model.parameters()), [(X, y)], check_deterministic=False
        ),
        numel(model),
    )
    d = curvature.diag_ggn(model, lf, X, y)
    got = torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])
    assert rel_err(got, torch.diag(ggn)) < TOL


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_gradient_moments_match_per_sample_gradients(kind):
    model, lf, data = make_case(kind, "ce", "mean")
    X, y = data[0]
    params = dict(model.named_parameters())

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        # the sample's share of the batch's mean loss
        return lf(out, yi.unsqueeze(0)) * yi.numel() / y.numel()

    per = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    grad, sgs, var = curvature.gradient_moments(model, lf, X, y)
    N = X.shape[0]
    for n, p in per.items():
        assert rel_err(grad[n], p.sum(0)) < 1e-13
        assert rel_err(sgs[n], p.square().sum(0)) < 1e-13
        assert rel_err(var[n], p.square().mean(0) - p.mean(0).square()) < 1e-10
        assert p.shape[0] == N


@pytest.mark.parametrize("kind", ["mlp", "seq"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sum_grad_squared_matches_per_sample_gradients(kind, reduction):
    model, lf, data = make_case(kind, "ce", reduction)
    X, y = data[0]
    params = dict(model.named_parameters())
    share = 1 / y.numel() if reduction == "mean" else 1.0

    def loss_one(p, xi, yi):  # the sample's share of the batch's loss
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return lf(out, yi.unsqueeze(0)) * (yi.numel() * share if reduction == "mean" else 1)

    per = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    sgs = curvature.sum_grad_squared(model, lf, X, y)
    assert list(sgs) == list(params)  # keyed and ordered as model.named_parameters()
    for n, p in per.items():
        assert rel_err(sgs[n], p.square().sum(0)) < 1e-13
    assert all(p.grad is None for p in model.parameters())
    first = [model[0].weight]
    assert list(curvature.sum_grad_squared(model, lf, X, y, params=first)) == ["0.weight", "0.bias"]


@pytest.mark.parametrize(("T", "K"), [(1, 1), (1, 4), (3, 1), (3, 5), (6, 2)])
@pytest.mark.parametrize("chunk_bytes", [1, None])
def test_gram_route_equals_per_sample_route(T, K, chunk_bytes, monkeypatch):
    """Σ_k Σ_n (G_nkᵀ·X_n)² over K backwards: Γ accumulated (stacked g flushed after every
    backward, or once), then one GEMM, against the per-sample gradients squared (and a float64
    einsum reference)."""
    from torchmatgrad.curvature import _hooks

    if chunk_bytes is not None:
        monkeypatch.setattr(_hooks, "CHUNK_BYTES", chunk_bytes)

    B, n, m = 5, 7, 3
    x = torch.randn(B, T, m, dtype=DT)
    gs = torch.randn(K, B, T, n, dtype=DT)
    acc = _hooks.GramSquares(x)
    for g in gs:
        acc.add(g, 0.5, backwards=max(1, K - 1))  # a buffer one short: it flushes in between
    got = 2 * acc.result()
    per = sum(_hooks.sum_sq_per_sample(g, x) for g in gs)
    ref = torch.einsum("kbti,btj->kbij", gs, x).square().sum((0, 1))
    assert rel_err(got, ref) < 1e-13
    assert rel_err(per, ref) < 1e-13


def _linear_backward_masks(fn) -> list[list[bool]]:
    """The output masks of every torchmatgrad::linear_backward that ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    masks = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().startswith("torchmatgrad::linear_backward"):
                masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return masks


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_curvature_backwards_form_no_weight_gradient(kind):
    """The backwards that only feed the hooks stop at the layer outputs: no grad_W or grad_b
    product is dispatched, only grad_input (the second layer's; the first layer's backward is
    not run), and no .grad is filled."""
    model, lf, data = make_case(kind, "ce", "mean")
    X, y = data[0]
    runs = {
        "diag exact": lambda: curvature.diag_ggn(model, lf, X, y),
        "diag mc": lambda: curvature.diag_ggn(model, lf, X, y, mc_samples=2),
        "sum_grad_squared": lambda: curvature.sum_grad_squared(model, lf, X, y),
        **{
            f"kfac {ft}": lambda ft=ft: curvature.kfac(model, lf, (X, y), fisher_type=ft)
            for ft in ("empirical", "mc", "type-2")
        },
    }
    for what, fn in runs.items():
        masks = _linear_backward_masks(fn)
        assert masks, what  # the spy sees the op
        assert all(mk == [True, False, False] for mk in masks), (what, masks)
        assert all(p.grad is None for p in model.parameters()), what
    masks = _linear_backward_masks(lambda: curvature.gradient_moments(model, lf, X, y))
    assert any(mk[1] for mk in masks)  # the gradient it returns does need grad_W


def test_errors_name_the_argument():
    model, lf, _ = make_case("mlp", "ce", "mean")
    with pytest.raises(ValueError, match="fisher_type must be one of"):
        curvature.KFAC(model, lf, fisher_type="type-3")
    with pytest.raises(ValueError, match="kfac_approx must be one of"):
        curvature.KFAC(model, lf, kfac_approx="both")
    with pytest.raises(ValueError, match="mc_samples must be 1 for fisher_type='empirical'"):
        curvature.KFAC(model, lf, fisher_type="empirical", mc_samples=3)
    with pytest.raises(ValueError, match="loss_func must be a torch.nn.MSELoss"):
        curvature.KFAC(model, torch.nn.L1Loss())
    with pytest.raises(ValueError, match="convert it with torchmatgrad.nn.convert_linear"):
        curvature.KFAC(torch.nn.Sequential(torch.nn.Linear(2, 2)), lf)
    with pytest.raises(ValueError, match="no data yet"):
        curvature.KFAC(model, lf).operator()


# ---- EK-FAC -----------------------------------------------------------------------------------
# Enough data that no factor is rank-deficient: with a repeated eigenvalue the eigenbasis, and so
# EK-FAC's corrected eigenvalues, are not unique (curvlinops' and ours would differ by basis).
# curvlinops' EK-FAC takes 2-D outputs only, so the sequence model pools over T before its
# last layer ("pooled": the first layer still shares its weight over T).


EKFAC_CASES = [c for c in CASES if c[0] == "mlp"] + [
    ("pooled", *c[1:]) for c in CASES if c[0] == "seq"
]


@pytest.mark.parametrize(("kind", "loss", "reduction", "fisher_type", "kfac_approx"), EKFAC_CASES)
def test_ekfac_matches_curvlinops(kind, loss, reduction, fisher_type, kfac_approx):
    model, lf, data = make_case(kind, loss, reduction, batches=(18, 14))
    for separate in (False, True):
        kw = dict(fisher_type=fisher_type, kfac_approx=kfac_approx)
        ref = curvlinops.EKFACLinearOperator(
            model, lf, list(model.parameters()), data, separate_weight_and_bias=separate,
            check_deterministic=False, **kw,
        )  # fmt: skip
        op = curvature.ekfac(model, lf, data, separate_weight_and_bias=separate, **kw)
        K = dense(ref, numel(model))
        assert rel_err(op.to_dense(), K) < TOL
        assert abs(op.trace() - K.trace()) / K.trace() < TOL
        Kd = K + 0.1 * torch.eye(K.shape[0], dtype=DT)
        V = torch.randn(K.shape[0], 3, dtype=DT)
        assert rel_err(op.inverse(0.1) @ V, torch.linalg.solve(Kd, V)) < 1e-9
