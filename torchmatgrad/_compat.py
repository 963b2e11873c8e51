"""Every private torch API torchmatgrad uses, in one place.

Each one is looked up once, at import, and wrapped with a fallback that keeps results correct
(slower, or unfused) when a torch release renames or drops it; ``tests/test_compat.py`` checks
that every wrapper still reaches the real API on the installed torch, so an upgrade that breaks
one fails there, by name, instead of silently elsewhere. :func:`missing` lists what this torch
lacks (``python -m torchmatgrad info`` prints it).

``torch._check`` (in the fake kernels) is not wrapped: torch documents it as the way for custom
ops to state shape conditions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

TORCH_VERSION = torch.__version__

# The private names, looked up once (None: this torch lacks it).
_AUTO_DISPATCH_BELOW_AUTOGRAD: Callable[[], Any] | None = getattr(
    torch._C, "_AutoDispatchBelowAutograd", None
)
_ARE_FUNCTORCH_TRANSFORMS_ACTIVE: Callable[[], bool] | None = getattr(
    torch._C, "_are_functorch_transforms_active", None
)
_WILL_ENGINE_EXECUTE_NODE: Callable[[Any], bool] | None = getattr(
    torch._C, "_will_engine_execute_node", None
)
_DISPATCH_HAS_KERNEL_FOR_DISPATCH_KEY: Callable[[str, str], bool] | None = getattr(
    torch._C, "_dispatch_has_kernel_for_dispatch_key", None
)
# Runs a callable when CUDA initialises (at once if it already has): torch seeds its CUDA
# generators this way.
_CUDA_LAZY_CALL: Callable[..., Any] | None = getattr(torch.cuda, "_lazy_call", None)
# The module whose `_current_level` is the innermost active dual level (-1: none).
_FORWARD_AD_MODULE: Any = getattr(torch.autograd, "forward_ad", None)
# Tensor attributes autograd keeps its hooks in (dicts; None or empty when there are none).
_HOOK_ATTRS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def unavailable(name: str) -> str:
    """The message for a private API this torch lacks, naming the torch version."""
    return f"torch {TORCH_VERSION} has no {name}"


def missing() -> list[str]:
    """The private APIs torchmatgrad would use that this torch does not have."""
    names = {
        "torch._C._AutoDispatchBelowAutograd": _AUTO_DISPATCH_BELOW_AUTOGRAD,
        "torch._C._are_functorch_transforms_active": _ARE_FUNCTORCH_TRANSFORMS_ACTIVE,
        "torch._C._will_engine_execute_node": _WILL_ENGINE_EXECUTE_NODE,
        "torch._C._dispatch_has_kernel_for_dispatch_key": _DISPATCH_HAS_KERNEL_FOR_DISPATCH_KEY,
        "torch.cuda._lazy_call": _CUDA_LAZY_CALL,
        "torch.autograd.forward_ad._current_level": getattr(
            _FORWARD_AD_MODULE, "_current_level", None
        ),
    }
    out = [name for name, fn in names.items() if fn is None]
    out += [f"torch.Tensor.{a}" for a in _HOOK_ATTRS if not hasattr(torch.Tensor, a)]
    return out


def below_autograd() -> contextlib.AbstractContextManager:
    """Dispatch below the Autograd key: an op called inside runs its device kernel directly
    (``torch._C._AutoDispatchBelowAutograd``), skipping the Python autograd kernel of an op
    whose inputs need no gradient. Fallback: an ordinary call (same result, tens of µs
    slower)."""
    if _AUTO_DISPATCH_BELOW_AUTOGRAD is None:
        return contextlib.nullcontext()
    return _AUTO_DISPATCH_BELOW_AUTOGRAD()


def on_cuda_init(fn: Callable[[], Any]) -> bool:
    """Run ``fn`` when this process initialises CUDA, or now if it already has (so importing
    torchmatgrad never initialises CUDA: a process that forks workers later must not). Returns
    False when this torch lacks the hook; the caller then does without."""
    if _CUDA_LAZY_CALL is None:
        return False
    _CUDA_LAZY_CALL(fn)
    return True


def functorch_transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is active
    (``torch._C._are_functorch_transforms_active``). Fallback: True, so that callers take the
    path that works under every transform."""
    if _ARE_FUNCTORCH_TRANSFORMS_ACTIVE is None:
        return True
    return bool(_ARE_FUNCTORCH_TRANSFORMS_ACTIVE())


def forward_ad_active() -> bool:
    """Whether a forward-mode AD dual level is open (``torch.autograd.forward_ad.dual_level``,
    read from ``forward_ad._current_level``), i.e. whether a tensor may carry a tangent.
    Fallback: True, so that callers take the path with the forward-mode rule."""
    level = getattr(_FORWARD_AD_MODULE, "_current_level", None)
    return True if level is None else level >= 0


def will_engine_execute_node(node: Any) -> bool | None:
    """During a backward pass: whether the autograd engine will run ``node`` (e.g. a weight's
    AccumulateGrad: False inside ``torch.autograd.grad`` or ``backward(inputs=...)`` without
    it), from ``torch._C._will_engine_execute_node``. None: this torch cannot say. Raises
    RuntimeError when called outside a backward pass (or inside ``torch.autograd.grad`` on
    some versions)."""
    if _WILL_ENGINE_EXECUTE_NODE is None:
        return None
    return bool(_WILL_ENGINE_EXECUTE_NODE(node))


def has_kernel_for_dispatch_key(op: str, key: str) -> bool | None:
    """Whether the op ``op`` (``"namespace::name"``) has a kernel for dispatch key ``key``
    (``torch._C._dispatch_has_kernel_for_dispatch_key``). None: torch cannot say (no such
    function, or no such op)."""
    if _DISPATCH_HAS_KERNEL_FOR_DISPATCH_KEY is None:
        return None
    try:
        return bool(_DISPATCH_HAS_KERNEL_FOR_DISPATCH_KEY(op, key))
    except RuntimeError:
        return None


def has_tensor_hooks(t: Tensor) -> bool | None:
    """Whether ``t`` has hooks registered with ``register_hook`` (``t._backward_hooks``).
    None: this torch keeps them elsewhere, so it cannot be told."""
    return _has_hooks(t, "_backward_hooks")


def has_post_accumulate_grad_hooks(t: Tensor) -> bool | None:
    """Whether ``t`` has ``register_post_accumulate_grad_hook`` hooks
    (``t._post_accumulate_grad_hooks``). None: cannot be told on this torch."""
    return _has_hooks(t, "_post_accumulate_grad_hooks")


def _has_hooks(t: Tensor, attr: str) -> bool | None:
    if not hasattr(torch.Tensor, attr):
        return None
    return bool(getattr(t, attr))


def fake_tensor_mode() -> Any:
    """A new ``FakeTensorMode`` (``torch._subclasses.fake_tensor``): tensors with shapes, dtypes
    and devices but no data, running the ops' fake kernels. Raises RuntimeError naming the torch
    version when this torch has none."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError as e:
        raise RuntimeError(unavailable("torch._subclasses.fake_tensor.FakeTensorMode")) from e
    return FakeTensorMode()


def cpu_allocation_peak(fn: Callable[[], Any]) -> int | None:
    """The most bytes torch's CPU allocator held at once while ``fn()`` ran, above what it held
    before: the running sum of the profiler's allocation events (``torch.profiler`` with
    ``profile_memory=True``, read through ``prof.profiler.kineto_results.events()``, whose
    ``[memory]`` events carry signed ``nbytes()``). None: this torch cannot say (``fn`` still
    runs, once)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        results = prof.profiler.kineto_results
        events = [e for e in results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        peak = total = 0
        for e in events:
            total += e.nbytes()
            peak = max(peak, total)
        return peak
    except AttributeError:  # the profiler's results changed shape
        return None


def dispatch_mode_base() -> type:
    """The base class of a Python dispatch mode (``torch.utils._python_dispatch
    .TorchDispatchMode``: ``__torch_dispatch__`` sees every op below autograd). Raises
    RuntimeError naming the torch version when this torch has none."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError as e:
        raise RuntimeError(unavailable("torch.utils._python_dispatch.TorchDispatchMode")) from e
    return TorchDispatchMode
