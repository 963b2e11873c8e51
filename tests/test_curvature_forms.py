"""torchmatgrad.curvature's explicit second-order forms (against
torch.autograd.functional.hessian), ``explain --curvature``, and the laplace-torch backend
(against laplace-torch's own curvlinops backend)."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchmatgrad
from torchmatgrad.cli import explain
from torchmatgrad.curvature.second_order import layer_hessian

DT = torch.float64
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("order", ["row", "col"])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_hessian_matches_autograd(T, order, bias):
    torch.manual_seed(T)
    n, m = 3, 5
    X, W, b = torch.randn(T, m, dtype=DT), torch.randn(n, m, dtype=DT), torch.randn(n, dtype=DT)
    M = torch.randn(T * n, T * n, dtype=DT)

    def ell(Y):
        z = torch.tanh(Y.reshape(-1))
        return z @ M @ z + Y.exp().sum()

    def L(theta):
        w = theta[: n * m]
        Wt = w.reshape(n, m) if order == "row" else w.reshape(m, n).t()
        return ell(X @ Wt.t() + (theta[n * m :] if bias else b))

    w0 = W.reshape(-1) if order == "row" else W.t().reshape(-1)
    ref = torch.autograd.functional.hessian(L, torch.cat([w0, b]) if bias else w0)
    H = torch.autograd.functional.hessian(ell, X @ W.t() + b)
    got = layer_hessian(X if T > 1 else X[0], H if T > 1 else H[0, :, 0], order=order, bias=bias)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if T == 1 and not bias:  # the one-sample forms are single Kronecker products
        x, h = X[0], H[0, :, 0]
        want = (
            torch.kron(torch.outer(x, x), h) if order == "col" else torch.kron(h, torch.outer(x, x))
        )
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_layer_hessian_bad_shapes():
    with pytest.raises(ValueError, match=r"H must be \[T, n, T, n\]"):
        layer_hessian(torch.randn(3, 2), torch.randn(4, 4))
    with pytest.raises(ValueError, match="order must be 'row' or 'col'"):
        layer_hessian(torch.randn(2), torch.randn(3, 3), order="diag")


@pytest.mark.parametrize("argv", [[], ["--n", "3", "--m", "4", "--T", "5", "--B", "4"]])
def test_explain_curvature_checks_pass(argv, capsys):
    assert explain.main(["--curvature", *argv]) == 0
    out = capsys.readouterr().out
    for section in ("[1] One sample", "[2] A sequence", "[3] The bias", "[4] K-FAC"):
        assert section in out
    assert "All 6 checks match torch.autograd.functional.hessian." in out


def test_explain_curvature_reports_a_wrong_form(monkeypatch, capsys):
    from torchmatgrad.cli import explain_curvature

    def wrong(x, H, **kw):
        return layer_hessian(x, H, **kw) * 1.01

    monkeypatch.setattr(explain_curvature, "layer_hessian", wrong)
    assert explain.main(["--curvature"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


# ---- laplace-torch ----------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", ["kron", "diag"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_laplace_backend_matches_curvlinops_backend(likelihood, structure, subset):
    laplace = pytest.importorskip("laplace")
    from laplace.curvature import CurvlinopsGGN

    torch.manual_seed(0)
    X = torch.randn(20, 5, dtype=DT)
    y = (
        torch.randint(0, 3, (20,))
        if likelihood == "classification"
        else torch.randn(20, 3, dtype=DT)
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    results = []
    for backend in (CurvlinopsGGN, torchmatgrad.curvature.LaplaceBackend):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        model = torchmatgrad.nn.convert_linear(model).to(DT)
        la = laplace.Laplace(
            model, likelihood, subset_of_weights=subset, hessian_structure=structure,
            backend=backend,
        )  # fmt: skip
        la.fit(loader)
        sigma = torch.tensor(1.3, dtype=DT) if likelihood == "regression" else None
        lml = la.log_marginal_likelihood(torch.tensor(0.7, dtype=DT), sigma)
        if likelihood == "classification":
            pred = la(X[:4], pred_type="glm", link_approx="probit")
        else:
            mean, var = la(X[:4], pred_type="glm")
            pred = torch.cat([mean.flatten(), var.flatten()])
        results.append((lml, pred))
    (lml_ref, pred_ref), (lml, pred) = results
    torch.testing.assert_close(lml, lml_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(pred, pred_ref, rtol=1e-10, atol=1e-12)
