"""The eager entry of torchmatgrad.linear (csrc/eager.cpp, ``_C._linear``): plain tensors take it,
it is the same op as ``torch.ops.torchmatgrad.linear`` (values, autograd, errors), and it declines
tensor subclasses, transforms and forward-mode tangents, which go through torch.ops or the
autograd.Function instead (as torch.compile does)."""

from __future__ import annotations

import pytest
import torch

import torchmatgrad
from torchmatgrad import _C, ops
from torchmatgrad.testing import assert_close, rand


@pytest.fixture
def eager_calls(monkeypatch):
    """Counts the calls that the eager entry served (it declines the others with
    NotImplemented)."""
    calls = []

    def counting(*args):
        out = _C._linear(*args)
        if out is not NotImplemented:
            calls.append(args)
        return out

    monkeypatch.setattr(ops, "_linear_eager", counting)
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_plain_tensors_take_the_eager_entry(eager_calls, bias):
    torch.manual_seed(0)
    w = torch.nn.Parameter(rand(7, 5))
    b = torch.nn.Parameter(rand(7)) if bias else None
    x = rand(3, 5).requires_grad_()
    y = torchmatgrad.linear(x, w, b)
    assert len(eager_calls) == 1
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert_close(y.detach(), ref.detach(), k=5)
    assert torch.equal(y, torch.ops.torchmatgrad.linear(x, w, b))
    gy = rand(3, 7)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), gy)
    x64, w64, gy64 = x.double(), w.double(), gy.double()
    assert_close(grads[0], (gy64 @ w64).detach(), k=7)
    assert_close(grads[1], (gy64.t() @ x64).detach(), k=3)
    if bias:
        assert_close(grads[2], gy64.sum(0), k=3)


def test_nn_linear_takes_the_eager_entry(eager_calls):
    layer = torchmatgrad.nn.Linear(6, 4)
    layer(rand(2, 6)).sum().backward()
    assert len(eager_calls) == 1 and layer.weight.grad is not None


def test_eager_entry_errors_match_the_op():
    x, w = rand(2, 5), rand(3, 4)
    with pytest.raises(Exception) as via_ops:
        torch.ops.torchmatgrad.linear(x, w, None)
    with pytest.raises(type(via_ops.value)) as via_eager:
        _C._linear(x, w, None)
    assert str(via_eager.value) == str(via_ops.value)
    assert "weight" in str(via_eager.value)


@pytest.mark.parametrize(
    "args",
    [(rand(2, 3), rand(4, 3)), (rand(2, 3), rand(4, 3), 1.0), ([1.0], rand(4, 3), None)],
    ids=["two-args", "bias-not-tensor", "input-not-tensor"],
)
def test_eager_entry_rejects_bad_arguments(args):
    with pytest.raises(TypeError, match=r"_C._linear\(input, weight, bias\)"):
        _C._linear(*args)


class _Recording(torch.Tensor):
    """A subclass with its own __torch_function__: records the functions it sees."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_subclasses_go_through_torch_ops(eager_calls):
    _Recording.seen = []
    x = rand(2, 5).as_subclass(_Recording)
    w = rand(3, 5)
    y = torchmatgrad.linear(x, w)
    assert eager_calls == []
    assert torch.ops.torchmatgrad.linear.default in _Recording.seen
    ref = x.as_subclass(torch.Tensor).double() @ w.double().t()
    assert_close(y.as_subclass(torch.Tensor), ref, k=5)


def test_vmap_does_not_take_the_eager_entry(eager_calls):
    w = rand(3, 5)
    xs = rand(4, 2, 5)
    y = torch.func.vmap(lambda x: torchmatgrad.linear(x, w))(xs)
    assert eager_calls == []
    assert_close(y, xs.double() @ w.double().t(), k=5)


def test_eager_entry_declines_what_python_handles():
    """NotImplemented, not a result, for a subclass argument (any of the three), under a
    torch.func transform and for an input with a forward-mode tangent; a result otherwise."""
    x, w, b = rand(2, 5), rand(3, 5), rand(3)
    assert isinstance(_C._linear(x, w, b), torch.Tensor)
    assert isinstance(_C._linear(x, torch.nn.Parameter(w), None), torch.Tensor)
    for i in range(3):
        args = [x, w, b]
        args[i] = args[i].as_subclass(_Recording)
        assert _C._linear(*args) is NotImplemented, i
    seen = []
    torch.func.vmap(lambda row: seen.append(_C._linear(row, w, b)) or row)(rand(4, 5))
    assert seen == [NotImplemented]
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert isinstance(_C._linear(x, w, b), torch.Tensor)  # no tangent anywhere
        for i in range(3):
            args = [x, w, b]
            args[i] = fwAD.make_dual(args[i], torch.ones_like(args[i]))
            assert _C._linear(*args) is NotImplemented, i
