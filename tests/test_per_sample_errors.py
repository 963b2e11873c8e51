"""torchmatgrad.per_sample's errors: models, losses and arguments it refuses, each with a
message that names what is wrong."""

from __future__ import annotations

import pytest
import torch
from _per_sample_models import _loss, _mlp

import torchmatgrad
from torchmatgrad import per_sample
from torchmatgrad.testing import rand


def _fresh(bias=True):
    return per_sample.enable(torchmatgrad.nn.convert_linear(_mlp(bias, torch.float32, "cpu")))


def test_error_without_enable():
    model = torchmatgrad.nn.convert_linear(_mlp(True, torch.float32, "cpu"))
    loss = _loss(model(rand(3, 6)), rand(3, 4))
    match = r"parameters '0.weight', '0.bias', .* get a gradient but belong to no recorded layer"
    with pytest.raises(RuntimeError, match=match + r" \(per_sample.enable\(model\) before"):
        per_sample.grad_norms(model, loss)


def test_error_reused_module_of_another_kind():
    norm = torch.nn.LayerNorm(5)
    model = per_sample.enable(torch.nn.Sequential(norm, torch.nn.Tanh(), norm))
    loss = _loss(model(rand(3, 5)), rand(3, 5))
    with pytest.raises(
        RuntimeError, match=r"parameters '0.weight', '0.bias' are used by more than one layer call"
    ):
        per_sample.clipped_backward(model, loss, 1.0)
    assert norm.weight.grad is None


def test_error_parameter_used_outside_its_layer():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torchmatgrad.nn.Linear(5, 5)

        def forward(self, x):
            return self.lin(x) + x @ self.lin.weight

    model = per_sample.enable(Leaky())
    loss = _loss(model(rand(3, 5)), rand(3, 5))
    with pytest.raises(
        RuntimeError, match=r"parameters 'lin.weight' are used outside their own layer"
    ):
        per_sample.grad_norms(model, loss)


def test_error_parameters_of_a_non_leaf_module():
    class WithScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torchmatgrad.nn.Linear(5, 5)
            self.scale = torch.nn.Parameter(torch.ones(5))

        def forward(self, x):
            return self.lin(x) * self.scale

    model = per_sample.enable(WithScale())
    loss = _loss(model(rand(3, 5)), rand(3, 5))
    with pytest.raises(
        RuntimeError, match=r"parameters 'scale' get a gradient but belong to no recorded layer"
    ):
        per_sample.clipped_backward(model, loss, 1.0)
    assert model.lin.weight.grad is None and model.scale.grad is None


def test_error_bad_arguments():
    model = _fresh()
    x, y = rand(3, 6), rand(3, 4)
    with pytest.raises(RuntimeError, match=r"loss_per_sample must be 1-D \(samples,\)"):
        per_sample.grad_norms(model, _loss(model(x), y).sum())
    with pytest.raises(RuntimeError, match=r"loss_per_sample must be 1-D"):
        per_sample.grad_norms(model, (model(x) - y).square())
    with pytest.raises(RuntimeError, match=r"samples must be its dim 0, B = 2"):
        per_sample.grad_norms(model, _loss(model(x), y)[:2])
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        per_sample.grad_norms(model, _loss(model(x), y).detach())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"max_norm must be a positive number"):
            per_sample.clipped_backward(model, _loss(model(x), y), bad)
    with pytest.raises(ValueError, match=r"noise_multiplier must be ≥ 0"):
        per_sample.clipped_backward(model, _loss(model(x), y), 1.0, noise_multiplier=-1.0)
    with pytest.raises(RuntimeError, match=r"method must be 'auto', 'ghost' or 'direct'"):
        per_sample.grad_norms(model, _loss(model(x), y), method="gram")
    assert all(p.grad is None for p in model.parameters())


def test_error_vector_input():
    lin = per_sample.enable(torchmatgrad.nn.Linear(5, 3))
    loss = lin(rand(5)).square().sum().reshape(1)
    with pytest.raises(RuntimeError, match=r"need a batch of samples"):
        per_sample.grad_norms(lin, loss)


def test_error_autocast():
    model = _fresh()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(rand(3, 6))
    with pytest.raises(RuntimeError, match=r"is cast \(autocast\?\)"):
        per_sample.grad_norms(model, _loss(out.float(), rand(3, 4)))
