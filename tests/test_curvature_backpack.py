"""BackPACK on converted models: every BackPACK extension that handles nn.Linear handles
torchmatgrad.nn.Linear identically (registration), and BackPACK's KFAC, KFLR, DiagGGNExact,
SumGradSquared and Variance equal torchmatgrad.curvature's (MLPs and B×T×d sequence models)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import torchmatgrad
from torchmatgrad import curvature

backpack = pytest.importorskip("backpack")
from backpack import extend  # noqa: E402
from backpack import extensions as E  # noqa: E402
from backpack.custom_module.permute import Permute  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
DT = torch.float64

# Every extension BackPACK exports, with its defaults (HBP is the base of KFAC, KFLR, KFRA).
EXTENSIONS = {
    "BatchGrad": E.BatchGrad,
    "BatchL2Grad": E.BatchL2Grad,
    "SumGradSquared": E.SumGradSquared,
    "Variance": E.Variance,
    "DiagGGNExact": E.DiagGGNExact,
    "DiagGGNMC": E.DiagGGNMC,
    "BatchDiagGGNExact": E.BatchDiagGGNExact,
    "BatchDiagGGNMC": E.BatchDiagGGNMC,
    "DiagHessian": E.DiagHessian,
    "BatchDiagHessian": E.BatchDiagHessian,
    "KFAC": E.KFAC,
    "KFLR": E.KFLR,
    "KFRA": E.KFRA,
    "SqrtGGNExact": E.SqrtGGNExact,
    "SqrtGGNMC": E.SqrtGGNMC,
    "GGNMP": E.GGNMP,
    "HMP": E.HMP,
    "PCHMP": E.PCHMP,
}


def _plain_and_converted(seq: bool):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 7), torch.nn.Sigmoid(), torch.nn.Linear(7, 3)]
    if seq:
        layers.append(Permute(0, 2, 1))
    plain = torch.nn.Sequential(*layers).to(DT)
    converted = torchmatgrad.nn.convert_linear(copy.deepcopy(plain))
    assert isinstance(converted[0], torchmatgrad.nn.Linear)
    return plain, converted


def _run(model, lf, X, y, ext, seed=0):
    model, lf = extend(model), extend(lf)
    model.zero_grad()
    torch.manual_seed(seed)  # the MC extensions draw from torch's generator
    with backpack.backpack(ext):
        lf(model(X), y).backward()
    return {n: getattr(p, ext.savefield) for n, p in model.named_parameters()}


def _same(a, b):
    if callable(a):  # curvmatprod: a function that multiplies with the block
        return all(_same(a(V), b(V)) for V in [torch.randn(4, 4, dtype=DT)])
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(EXTENSIONS))
def test_every_linear_extension_handles_torchmatgrad_linear(name):
    ext = EXTENSIONS[name]()
    table = ext._BackpropExtension__module_extensions
    if torch.nn.Linear not in table:
        pytest.fail(f"{name} no longer handles nn.Linear: update EXTENSIONS")
    assert table[torchmatgrad.nn.Linear] is table[torch.nn.Linear]
    plain, converted = _plain_and_converted(seq=False)
    X, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    lf = torch.nn.CrossEntropyLoss()
    if name in ("GGNMP", "HMP", "PCHMP"):  # the matrix-product functions take [.., K] blocks
        got = _run(converted, lf, X, y, EXTENSIONS[name]())
        ref = _run(plain, lf, X, y, EXTENSIONS[name]())
        for n in ref:
            shape = dict(plain.named_parameters())[n].shape
            V = torch.randn(3, *shape, dtype=DT)
            assert torch.allclose(got[n](V), ref[n](V), rtol=1e-12, atol=1e-14)
        return
    got = _run(converted, lf, X, y, EXTENSIONS[name]())
    ref = _run(plain, lf, X, y, EXTENSIONS[name]())
    for n in ref:
        assert _same(got[n], ref[n]), n


def test_extension_made_before_registration_can_be_extended():
    ext = E.KFLR()
    table = ext._BackpropExtension__module_extensions
    del table[torchmatgrad.nn.Linear]
    curvature.backpack_support.extend(ext)
    assert table[torchmatgrad.nn.Linear] is table[torch.nn.Linear]


@pytest.mark.parametrize("seq", [False, True])
def test_backpack_diag_ggn_and_moments_equal_ours(seq):
    _, model = _plain_and_converted(seq)
    shape = (4, 3) if seq else (6,)
    X, y = torch.randn(*shape, 5, dtype=DT), torch.randint(0, 3, shape)
    lf = torch.nn.CrossEntropyLoss()
    diag = curvature.diag_ggn(model, lf, X, y)
    _, sgs, var = curvature.gradient_moments(model, lf, X, y)
    for ext, ours in [(E.DiagGGNExact(), diag), (E.SumGradSquared(), sgs), (E.Variance(), var)]:
        got = _run(model, lf, X, y, ext)
        for n, t in got.items():
            assert torch.allclose(t, ours[n], rtol=1e-10, atol=1e-15), (ext.savefield, n)


def test_backpack_kflr_equals_type2_kfac_and_kfac_its_expectation():
    _, model = _plain_and_converted(seq=False)
    X, y = torch.randn(6, 5, dtype=DT), torch.randint(0, 3, (6,))
    lf = torch.nn.CrossEntropyLoss()
    op = curvature.kfac(model, lf, (X, y), fisher_type="type-2", separate_weight_and_bias=True)
    kflr = _run(model, lf, X, y, E.KFLR())
    for blk, layer in zip(op.blocks, ("0", "2"), strict=True):
        G, A = kflr[f"{layer}.weight"]
        assert torch.allclose(G, blk.G, rtol=1e-10, atol=1e-15)
        assert torch.allclose(A, blk.A, rtol=1e-10, atol=1e-15)
        assert torch.allclose(kflr[f"{layer}.bias"][0], blk.G, rtol=1e-10, atol=1e-15)
    # BackPACK's KFAC samples from torch's generator: its A is exact, its G's mean over R fixed
    # seeds lies within 5 standard errors of the type-2 G (deterministic, cannot flake).
    R = 256
    Gs = []
    for s in range(R):
        kf = _run(model, lf, X, y, E.KFAC(), seed=s)
        Gs.append(torch.stack([kf[f"{layer}.weight"][0].flatten() for layer in ("2",)]))
        if s == 0:
            for blk, layer in zip(op.blocks, ("0", "2"), strict=True):
                assert torch.allclose(kf[f"{layer}.weight"][1], blk.A, rtol=1e-10)
    Gs = torch.stack(Gs)
    mean, se = Gs.mean(0), Gs.std(0) / R**0.5
    assert ((mean - op.blocks[1].G.flatten()).abs() <= 5 * se + 1e-12).all()
