"""torchmatgrad.nn.Linear as a drop-in for torch.nn.Linear."""

from __future__ import annotations

import pytest
import torch

import torchmatgrad
from torchmatgrad.nn import Linear, convert_linear
from torchmatgrad.testing import rand


@pytest.mark.parametrize("bias", [True, False])
def test_same_parameters_and_init(bias):
    torch.manual_seed(3)
    ref = torch.nn.Linear(300, 200, bias=bias)
    torch.manual_seed(3)
    ours = Linear(300, 200, bias=bias)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (_, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    # Initialization statistics: kaiming-uniform(a=√5) gives U(-1/√in, 1/√in).
    bound = 1 / 300**0.5
    w = ours.weight.detach()
    assert w.abs().max() <= bound
    assert abs(w.std().item() - bound / 3**0.5) < 0.02 * bound
    assert ours.extra_repr() == ref.extra_repr()
    assert repr(ours).endswith(repr(ref).removeprefix("Linear"))


def test_factory_kwargs():
    m = Linear(3, 2, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_both_ways(bias):
    ref = torch.nn.Linear(5, 4, bias=bias)
    ours = Linear(5, 4, bias=bias)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = rand(3, 5)
    torch.testing.assert_close(ours(x), ref(x))
    ref2 = torch.nn.Linear(5, 4, bias=bias)
    ref2.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(ref2(x), ours(x))
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_from_linear_shares_parameters():
    ref = torch.nn.Linear(5, 4).eval()
    ours = Linear.from_linear(ref)
    assert ours.weight is ref.weight and ours.bias is ref.bias
    assert not ours.training
    nobias = Linear.from_linear(torch.nn.Linear(5, 4, bias=False))
    assert nobias.bias is None and "bias" in nobias._parameters
    assert list(nobias.state_dict()) == ["weight"]
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        Linear.from_linear(torch.nn.Conv1d(1, 1, 1))


def test_convert_linear_in_place():
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 2))
    )
    params = list(model.parameters())
    x = rand(3, 4)
    before = model(x)
    out = convert_linear(model)
    assert out is model
    assert type(model[0]) is Linear and type(model[2][0]) is Linear
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    torch.testing.assert_close(model(x), before)
    single = convert_linear(torch.nn.Linear(2, 2))
    assert type(single) is Linear


def _mlp(cls, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        cls(10, 32), torch.nn.Tanh(), cls(32, 32), torch.nn.Tanh(), cls(32, 1)
    )


def test_mlp_training_matches_nn_linear():
    """Same init, same data, 20 SGD steps: the same losses."""
    ref, ours = _mlp(torch.nn.Linear, 0), _mlp(Linear, 0)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    losses_r, losses_o = [], []
    x = torch.randn(64, 10, generator=g)
    y = x.sum(1, keepdim=True).sin()
    for _ in range(20):
        for model, opt, losses in ((ref, opt_r, losses_r), (ours, opt_o, losses_o)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    torch.testing.assert_close(losses_o, losses_r, rtol=1e-5, atol=1e-6)
    assert losses_o[-1] < losses_o[0]


def test_functional_is_exported():
    assert torchmatgrad.linear is torchmatgrad.ops.linear
