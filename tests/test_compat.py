"""torchmatgrad._compat: every wrapper of a private torch API reaches the real API on this torch,
and falls back safely when the API is gone (as after a torch upgrade that drops it)."""

from __future__ import annotations

import pytest
import torch

import torchmatgrad
from torchmatgrad import _compat, accumulate
from torchmatgrad.nn import Linear
from torchmatgrad.testing import rand

ops = torch.ops.torchmatgrad


def test_nothing_missing_on_this_torch():
    assert _compat.missing() == []


def test_below_autograd_skips_the_autograd_kernel():
    x, w = rand(2, 3, requires_grad=True), rand(4, 3, requires_grad=True)
    assert ops.linear(x, w).grad_fn is not None
    with _compat.below_autograd():
        y = ops.linear(x, w)
    assert y.grad_fn is None and not y.requires_grad


def test_below_autograd_fallback(monkeypatch):
    monkeypatch.setattr(_compat, "_AUTO_DISPATCH_BELOW_AUTOGRAD", None)
    x, w = rand(2, 3), rand(4, 3)
    with _compat.below_autograd():
        torch.testing.assert_close(torchmatgrad.linear(x, w), x @ w.t())
    assert "torch._C._AutoDispatchBelowAutograd" in _compat.missing()


def test_functorch_transforms_active():
    seen = []

    def f(x):
        seen.append(_compat.functorch_transforms_active())
        return x * 2

    assert not _compat.functorch_transforms_active()
    torch.func.vmap(f)(torch.ones(3, 2))
    torch.func.grad(lambda x: f(x).sum())(torch.ones(2))
    assert seen == [True, True]


def test_functorch_fallback_takes_the_general_path(monkeypatch):
    monkeypatch.setattr(_compat, "_ARE_FUNCTORCH_TRANSFORMS_ACTIVE", None)
    assert _compat.functorch_transforms_active() is True
    x, w = rand(5, 3, dtype=torch.float64), rand(4, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(torchmatgrad.linear, (0, None))(x, w), x @ w.t())
    torch.testing.assert_close(torchmatgrad.linear(x, w), x @ w.t())


def test_forward_ad_active():
    import torch.autograd.forward_ad as fwAD

    assert not _compat.forward_ad_active()
    with fwAD.dual_level():
        assert _compat.forward_ad_active()
    assert not _compat.forward_ad_active()


def test_forward_ad_fallback_takes_the_jvp_path(monkeypatch):
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setattr(_compat, "_FORWARD_AD_MODULE", None)
    assert _compat.forward_ad_active() is True
    assert "torch.autograd.forward_ad._current_level" in _compat.missing()
    x, w, t = rand(2, 3, dtype=torch.float64), rand(4, 3, dtype=torch.float64), rand(2, 3)
    with fwAD.dual_level():
        y = torchmatgrad.linear(fwAD.make_dual(x, t.double()), w)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, t.double() @ w.t())


def test_will_engine_execute_node():
    w1, w2 = rand(3, requires_grad=True), rand(3, requires_grad=True)
    seen = {}

    def probe(g):
        for name, w in (("w1", w1), ("w2", w2)):
            edge = torch.autograd.graph.get_gradient_edge(w)
            seen[name] = _compat.will_engine_execute_node(edge.node)
        return g

    y = (w1 * w2).sum()
    y.register_hook(probe)
    y.backward(inputs=[w1])
    assert seen == {"w1": True, "w2": False}
    with pytest.raises(RuntimeError):  # outside a backward pass
        _compat.will_engine_execute_node(torch.autograd.graph.get_gradient_edge(w1).node)


def test_will_engine_execute_node_fallback_unfuses(monkeypatch):
    monkeypatch.setattr(_compat, "_WILL_ENGINE_EXECUTE_NODE", None)
    accumulate._warned.clear()
    layer = Linear(3, 2, dtype=torch.float64, grad_accumulation="fused")
    ref = torch.nn.Linear(3, 2, dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    layer.weight.grad, ref.weight.grad = (
        torch.zeros_like(layer.weight),
        torch.zeros_like(ref.weight),
    )
    x = rand(4, 3, dtype=torch.float64)
    ref(x).sum().backward()
    with pytest.warns(UserWarning, match=r"torch .* has no torch\._C\._will_engine"):
        layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)


def test_dispatch_has_kernel():
    assert _compat.has_kernel_for_dispatch_key("torchmatgrad::linear", "CPU") is True
    assert _compat.has_kernel_for_dispatch_key("torchmatgrad::linear", "Autograd") is True
    assert _compat.has_kernel_for_dispatch_key("torchmatgrad::linear", "XLA") is False
    assert _compat.has_kernel_for_dispatch_key("torchmatgrad::no_such_op", "CPU") is None


def test_dispatch_has_kernel_fallback(monkeypatch):
    monkeypatch.setattr(_compat, "_DISPATCH_HAS_KERNEL_FOR_DISPATCH_KEY", None)
    assert _compat.has_kernel_for_dispatch_key("torchmatgrad::linear", "CPU") is None


def test_hook_attributes():
    w = rand(3, requires_grad=True)
    assert _compat.has_tensor_hooks(w) is False
    assert _compat.has_post_accumulate_grad_hooks(w) is False
    w.register_hook(lambda g: g)
    assert _compat.has_tensor_hooks(w) is True
    w.register_post_accumulate_grad_hook(lambda p: None)
    assert _compat.has_post_accumulate_grad_hooks(w) is True


def test_hook_attribute_fallback_unfuses(monkeypatch):
    monkeypatch.setattr(_compat, "_has_hooks", lambda t, attr: None)
    w = rand(2, 3, requires_grad=True)
    w.grad = torch.zeros_like(w)
    seen = []

    def probe(g):
        seen.append(accumulate.fusion_blocker(w, "fused"))
        return g

    y = (w * 2).sum()
    y.register_hook(probe)
    y.backward()
    assert "tensor hooks unknown" in seen[0]


def test_fake_tensor_mode():
    with _compat.fake_tensor_mode():
        y = ops.linear(torch.empty(2, 3), torch.empty(4, 3))
    assert y.shape == (2, 4)
    assert type(y).__name__ == "FakeTensor"


def test_dispatch_mode_base():
    names = []

    class Log(_compat.dispatch_mode_base()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Log():
        torchmatgrad.linear(rand(2, 3), rand(4, 3))
    assert "torchmatgrad.linear" in names


def test_unavailable_names_the_torch_version():
    assert _compat.unavailable("torch._C._x") == f"torch {torch.__version__} has no torch._C._x"


def test_cpu_allocation_peak():
    """The profiler's allocation events give the peak: 8 MB held, another 8 MB on top, freed."""

    def step():
        a = torch.empty(2_000_000)  # 8 MB
        b = torch.empty(2_000_000)  # 16 MB held
        del a, b
        c = torch.empty(1_000_000)  # 4 MB
        del c

    peak = _compat.cpu_allocation_peak(step)
    assert peak is not None and 16_000_000 <= peak < 16_500_000


def test_cpu_allocation_peak_fallback(monkeypatch):
    import torch.profiler

    class Broken:
        profiler = None  # no kineto_results: an AttributeError inside

        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.profiler, "profile", Broken)
    ran = []
    assert _compat.cpu_allocation_peak(lambda: ran.append(1)) is None
    assert ran == [1]


def test_on_cuda_init_reaches_torch():
    assert _compat._CUDA_LAZY_CALL is torch.cuda._lazy_call


def test_on_cuda_init(monkeypatch):
    calls = []
    monkeypatch.setattr(_compat, "_CUDA_LAZY_CALL", calls.append)

    def fn():
        return None

    assert _compat.on_cuda_init(fn) is True
    assert calls == [fn]


def test_on_cuda_init_fallback(monkeypatch):
    monkeypatch.setattr(_compat, "_CUDA_LAZY_CALL", None)
    assert _compat.on_cuda_init(lambda: None) is False
    assert "torch.cuda._lazy_call" in _compat.missing()
