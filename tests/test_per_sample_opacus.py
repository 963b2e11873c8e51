"""Opacus and torchmatgrad: the samplers Opacus uses for torchmatgrad.nn.Linear, the same clipped
step as Opacus's "hooks" and "ghost" modes (noise 0), the one-backward recipe with Opacus's
accounting, and a core that imports without Opacus.

Opacus is optional for the library; the README's test command installs it so these run in CI.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICES

import torchmatgrad
from torchmatgrad import opacus_support, per_sample
from torchmatgrad.testing import assert_close, rand

opacus = pytest.importorskip("opacus")
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing",  # Opacus's hooks on a first layer: expected
    "ignore:Secure RNG turned off",
    "ignore:divide by zero encountered in log",  # inside Opacus's PRV accountant
)
from opacus import PrivacyEngine  # noqa: E402
from opacus.grad_sample import GradSampleModule  # noqa: E402
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (  # noqa: E402
    GradSampleModuleFastGradientClipping,
)


class PerSampleMSE(torch.nn.Module):
    """A criterion with Opacus's ``reduction`` switch: one loss per sample for "none"."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, out, target):
        loss = (out - target).square().reshape(out.shape[0], -1).sum(1)
        return loss if self.reduction == "none" else loss.sum()


class Block(torch.nn.Module):
    """A small pre-norm transformer block: LayerNorm, single-head causal attention (q, k, v, o),
    LayerNorm, MLP with GELU."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.o(att @ v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def _mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )


def _model(kind: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _mlp() if kind == "mlp" else Block()
    return torchmatgrad.nn.convert_linear(model.to(device=device, dtype=torch.float64))


def _data(kind: str, device: str):
    shape = (6, 6) if kind == "mlp" else (5, 7, 8)
    out = (6, 3) if kind == "mlp" else (5, 7, 8)
    return rand(*shape, device=device, dtype=torch.float64, seed=1), rand(
        *out, device=device, dtype=torch.float64, seed=2
    )


def _opacus_grads(model, mode: str, x, y, C: float) -> list[torch.Tensor]:
    """The clipped gradient sum Opacus computes (noise 0, loss_reduction "sum")."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0]
    )
    engine = PrivacyEngine()
    common = dict(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=C,
        loss_reduction="sum",
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        gsm, opt, criterion, _ = engine.make_private(criterion=PerSampleMSE(), **common)
        assert isinstance(gsm, GradSampleModuleFastGradientClipping)
        criterion(gsm(x), y).backward()
    else:
        gsm, opt, _ = engine.make_private(**common)
        assert isinstance(gsm, GradSampleModule)
        PerSampleMSE()(gsm(x), y).backward()
    opt.step()  # clip (hooks), add zero noise, divide by nothing ("sum"), SGD with lr 0
    return [p.grad.detach().clone() for p in model.parameters()]


def test_samplers_are_registered():
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleHooksFastGradientClipping as Ghost,
    )

    Linear = torchmatgrad.nn.Linear
    assert GradSampleHooks.GRAD_SAMPLERS[Linear] is opacus_support.compute_linear_grad_sample
    assert Ghost.NORM_SAMPLERS[Linear] is opacus_support.compute_linear_norm_sample
    assert opacus_support.register()


@pytest.mark.parametrize("order", ["torchmatgrad-first", "opacus-first"])
def test_registration_in_a_fresh_process(order):
    imports = ["import torchmatgrad", "import opacus"]
    if order == "opacus-first":
        imports.reverse()
    code = "\n".join(
        [
            *imports,
            "from opacus.grad_sample.grad_sample_module import GradSampleHooks as H",
            "from torchmatgrad import opacus_support as s",
            "assert H.GRAD_SAMPLERS[torchmatgrad.nn.Linear] is s.compute_linear_grad_sample",
        ]
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_core_imports_without_opacus():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["opacus"] = None  # as if it were not installed
        import torch, torchmatgrad
        from torchmatgrad import opacus_support, per_sample
        assert not opacus_support.register()
        model = per_sample.enable(torchmatgrad.nn.Linear(4, 3))
        loss = model(torch.randn(5, 4)).square().sum(1)
        norms = per_sample.clipped_backward(model, loss, 1.0)
        assert norms.shape == (5,) and model.weight.grad is not None
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "block"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_same_clipped_step_as_opacus(device, kind, mode):
    model = _model(kind, device)
    x, y = _data(kind, device)
    ours = per_sample.enable(copy.deepcopy(model))
    norms = per_sample.grad_norms(ours, PerSampleMSE("none")(ours(x), y))
    C = norms.median().item()  # about half the samples clipped
    theirs = _opacus_grads(model, mode, x, y, C)
    per_sample.clipped_backward(ours, PerSampleMSE("none")(ours(x), y), C)
    for (name, p), ref in zip(ours.named_parameters(), theirs, strict=True):
        assert_close(p.grad, ref.double(), k=2000, what=f"{kind} {mode} {name}")


def test_opacus_with_torch_linear_agrees_with_our_samplers():
    """Opacus's own nn.Linear samplers and ours (on the converted copy) give the same step."""
    torch.manual_seed(0)
    plain = Block().double()
    converted = torchmatgrad.nn.convert_linear(copy.deepcopy(plain))
    x, y = _data("block", "cpu")
    for mode in ("hooks", "ghost"):
        a = _opacus_grads(copy.deepcopy(plain), mode, x, y, 0.5)
        b = _opacus_grads(copy.deepcopy(converted), mode, x, y, 0.5)
        for ga, gb in zip(a, b, strict=True):
            assert_close(gb, ga, k=2000, what=f"{mode}: torchmatgrad's samplers vs Opacus's")


def test_one_backward_recipe_with_opacus_accounting():
    torch.manual_seed(0)
    x, y = _data("block", "cpu")
    dataset = torch.utils.data.TensorDataset(x, y)
    C, sigma, steps = 0.5, 1.0, 2

    def run(recipe: str):
        model = _model("block", "cpu")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = torch.utils.data.DataLoader(dataset, batch_size=x.shape[0])
        engine = PrivacyEngine()
        kw = dict(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=C,
            poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(3),
        )
        if recipe == "ours":
            model, optimizer, loader = opacus_support.make_private(engine, **kw)
        else:
            model, optimizer, criterion, loader = engine.make_private(
                criterion=PerSampleMSE("mean"), grad_sample_mode="ghost", **kw
            )
        for _ in range(steps):
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                if recipe == "ours":
                    per_sample.clipped_backward(model, PerSampleMSE("none")(model(xb), yb), C)
                else:
                    criterion(model(xb), yb).backward()
                optimizer.step()
        params = [p.detach().clone() for p in model.parameters()]
        steps_seen = sum(h[-1] for h in engine.accountant.history)  # (σ, q, steps) entries
        return params, engine.get_epsilon(1e-5), steps_seen

    ours, eps_ours, n_ours = run("ours")
    theirs, eps_theirs, n_theirs = run("opacus")
    assert n_ours == n_theirs == steps
    assert eps_ours == pytest.approx(eps_theirs) and 0 < eps_ours < float("inf")
    for a, b in zip(ours, theirs, strict=True):  # same noise stream, same clipped sum
        assert_close(a, b.double(), k=4000, what="parameters after the steps")
