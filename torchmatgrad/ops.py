"""The Python face of torchmatgrad's ops: fake kernels, autograd, vmap rules, `linear`.

The C++ ops (schemas in csrc/ops.cpp) are:

* ``torchmatgrad::linear(input, weight, bias=None) -> y``: ``y = input·weightᵀ + bias``.
* ``torchmatgrad::linear_backward(grad_output, input, weight, output_mask)
  -> (grad_input, grad_weight, grad_bias)``: ``G·W``, ``Gᵀ·X``, ``ΣG``; a result whose mask entry
  is False is not computed and comes back as None.
* ``torchmatgrad::linear_backward_accumulate_(grad_output, input, weight, grad_weight,
  output_mask) -> (grad_input, grad_bias)``: adds ``Gᵀ·X`` into ``grad_weight`` in place.

Every derivative of the linear map is again a linear map or an outer product, so the autograd
formulas below call the same ops: double backward, forward-mode AD and vmap never leave
torchmatgrad's kernels (vmap over a batched weight loops over the batch).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _C  # noqa: F401  (registers the ops)
from ._compat import below_autograd, forward_ad_active, functorch_transforms_active
from .accumulate import check_mode, fused_weight_backward, fuses_here

_ops = torch.ops.torchmatgrad
_linear_op = _ops.linear.default
# The same op, called from C++ unboxed (csrc/eager.cpp): what torch.ops costs in boxing the
# arguments (~4 µs a call) is gone. NotImplemented for what only the Python paths handle.
_linear_eager = _C._linear

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---- argument checks: the Python mirror of csrc/ops.h ----------------------------------------
#
# Same checks, same order and byte-identical messages as the C++ ones (tests/test_errors.py runs
# every bad input through the real op and under FakeTensorMode and compares the two): the fake
# kernels call them, and so does torchmatgrad.jacobian for what it shares with the ops.


@functools.cache
def scalar_type_name(dtype: torch.dtype) -> str:
    """The name C++ prints for ``dtype`` (c10's ScalarType: Float, Double, BFloat16, Half,
    Long, ...), so that Python messages read exactly like the ``TORCH_CHECK`` ones."""
    try:
        with warnings.catch_warnings():  # exotic dtypes warn that they are experimental
            warnings.simplefilter("ignore")
            legacy = torch.empty(0, dtype=dtype, device="cpu").type()  # e.g. "torch.FloatTensor"
    except (RuntimeError, TypeError):
        return str(dtype)
    return legacy.removeprefix("torch.").removeprefix("quantized.").removesuffix("Tensor")


def check_float_tensor(t: Tensor, name: str) -> None:
    """``t`` has a dtype the kernels support (``check_float_tensor`` in ops.h)."""
    torch._check(
        t.dtype in _FLOAT_DTYPES,
        lambda: (
            f"{name} must be a floating point tensor (float32, float64, bfloat16 or float16), "
            f"got {scalar_type_name(t.dtype)}"
        ),
    )


def check_same_dtype_as_weight(name: str, t: Tensor, weight: Tensor) -> None:
    torch._check(
        t.dtype == weight.dtype,
        lambda: (
            f"{name} must have the same dtype as weight, got {name} "
            f"{scalar_type_name(t.dtype)} and weight {scalar_type_name(weight.dtype)}"
        ),
    )


def check_same_device_as_weight(name: str, t: Tensor, weight: Tensor) -> None:
    torch._check(
        t.device == weight.device,
        lambda: (
            f"{name} must be on the same device as weight, got {name} on {t.device} "
            f"and weight on {weight.device}"
        ),
    )


def check_like_weight(name: str, t: Tensor, weight: Tensor) -> None:
    """``t`` (bias, grad_output) has weight's dtype and device."""
    check_same_dtype_as_weight(name, t, weight)
    check_same_device_as_weight(name, t, weight)


def check_weight_rank(weight: Tensor) -> None:
    torch._check(
        weight.dim() == 2,
        lambda: f"weight must be 2-D (out_features, in_features), got shape {list(weight.shape)}",
    )


def check_linear_args(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """y = input·weightᵀ + bias: weight [n, m], input [..., m], bias [n] or None, one float
    dtype and one device (``check_linear_args`` in ops.h)."""
    check_weight_rank(weight)
    torch._check(
        input.dim() >= 1,
        lambda: "input must have at least 1 dimension (..., in_features), got a 0-D tensor",
    )
    torch._check(
        input.shape[-1] == weight.shape[1],
        lambda: (
            "input.size(-1) must equal weight.size(1) (in_features), got input of shape "
            f"{list(input.shape)} and weight of shape {list(weight.shape)}"
        ),
    )
    check_float_tensor(weight, "weight")
    torch._check(
        input.dtype == weight.dtype,
        lambda: (
            f"input and weight must have the same dtype, got input "
            f"{scalar_type_name(input.dtype)} and weight {scalar_type_name(weight.dtype)}"
        ),
    )
    torch._check(
        input.device == weight.device,
        lambda: (
            f"input and weight must be on the same device, got input on {input.device} "
            f"and weight on {weight.device}"
        ),
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: (
                "bias must be 1-D of length weight.size(0) (out_features) = "
                f"{weight.shape[0]}, got shape {list(bias.shape)}"
            ),
        )
        check_like_weight("bias", bias, weight)


def check_backward_args(grad_output: Tensor, input: Tensor, weight: Tensor) -> None:
    """grad_output [..., n] matches y = linear(input, weight) (``check_backward_args``)."""
    check_linear_args(input, weight, None)
    expected = [*input.shape[:-1], weight.shape[0]]
    torch._check(
        list(grad_output.shape) == expected,
        lambda: (
            f"grad_output must have shape {expected} (input's batch shape, out_features), "
            f"got {list(grad_output.shape)}"
        ),
    )
    check_like_weight("grad_output", grad_output, weight)


def check_grad_weight_buffer(grad_weight: Tensor, weight: Tensor) -> None:
    """The buffer linear_backward_accumulate_ adds into: weight's shape, weight's dtype or
    float32 for a 16-bit weight, weight's device, contiguous (``check_grad_weight_buffer``)."""
    torch._check(
        list(grad_weight.shape) == list(weight.shape),
        lambda: (
            f"grad_weight must have weight's shape {list(weight.shape)}, got "
            f"{list(grad_weight.shape)}"
        ),
    )
    is16 = weight.dtype in (torch.float16, torch.bfloat16)
    torch._check(
        grad_weight.dtype == weight.dtype or (is16 and grad_weight.dtype == torch.float32),
        lambda: (
            f"grad_weight must have weight's dtype ({scalar_type_name(weight.dtype)}, or "
            f"float32 for a 16-bit weight), got {scalar_type_name(grad_weight.dtype)}"
        ),
    )
    check_same_device_as_weight("grad_weight", grad_weight, weight)
    torch._check(
        grad_weight.is_contiguous(),
        lambda: f"grad_weight must be contiguous, got strides {list(grad_weight.stride())}",
    )


# ---- fake (meta) kernels: shapes only, so torch.compile traces without running kernels -----


@torch.library.register_fake("torchmatgrad::linear")
def _linear_fake(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    check_linear_args(input, weight, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("torchmatgrad::linear_backward")
def _linear_backward_fake(
    grad_output: Tensor, input: Tensor, weight: Tensor, output_mask: Sequence[bool]
):
    check_backward_args(grad_output, input, weight)
    gi = input.new_empty(input.shape) if output_mask[0] else None
    gw = None
    if output_mask[1]:
        # A weight stored transposed (csrc/vendor.h, transposed_weight: HF's Conv1D) gets its
        # gradient in its own layout from the CPU (kernels and vendor route alike) and from the
        # CUDA vendor route, where it goes unless the kernel path is forced.
        from . import policy

        n, m = weight.shape
        transposed = n > 1 and m > 1 and weight.stride() == (1, n)
        if transposed and (weight.device.type == "cpu" or policy.current_path() != "kernel"):
            gw = weight.new_empty((m, n)).t()
        else:
            gw = weight.new_empty(weight.shape)
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else None
    return gi, gw, gb


@torch.library.register_fake("torchmatgrad::linear_backward_accumulate_")
def _linear_backward_accumulate_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    grad_weight: Tensor,
    output_mask: Sequence[bool],
):
    check_backward_args(grad_output, input, weight)
    check_grad_weight_buffer(grad_weight, weight)
    gi = input.new_empty(input.shape) if output_mask[0] else None
    gb = weight.new_empty((weight.shape[0],)) if output_mask[1] else None
    return gi, gb


# ---- autograd ------------------------------------------------------------------------------
#
# The formulas are written once and used twice: by the ops' own autograd (register_autograd,
# what torch.compile traces) with the raw ops as building blocks, and by the eager
# autograd.Functions below (which add forward-mode rules and work under torch.func) with the
# Functions as building blocks, so every order of derivative stays differentiable.


def _linear_setup_context(ctx, inputs, output) -> None:
    input, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight)


def _linear_grads(ctx, grad_output: Tensor, backward_fn):
    input, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], ctx.has_bias and needs[2]]
    if not any(mask):
        return None, None, None
    return tuple(backward_fn(grad_output, input, weight, mask))


def _linear_backward_setup_context(ctx, inputs, output) -> None:
    grad_output, input, weight, _ = inputs
    ctx.save_for_backward(grad_output, input, weight)


def _linear_backward_grads(ctx, ggi, ggw, ggb, linear_fn, backward_fn):
    """Backward of (G·W, Gᵀ·X, ΣG) with respect to (G, X, W), again with the linear ops:
    dG = ggi·Wᵀ + X·ggwᵀ + ggb, dX = G·ggw, dW = Gᵀ·ggi."""
    grad_output, input, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    d_go = d_in = d_w = None
    if needs[0]:
        if ggw is not None:
            d_go = linear_fn(input, ggw, ggb)
        elif ggb is not None:
            d_go = ggb.expand(grad_output.shape)
        if ggi is not None:
            t = linear_fn(ggi, weight, None)
            d_go = t if d_go is None else d_go + t
    if needs[1] and ggw is not None:
        d_in = backward_fn(grad_output, input, ggw, [True, False, False])[0]
    if needs[2] and ggi is not None:
        d_w = backward_fn(grad_output, ggi, weight, [False, True, False])[1]
    return d_go, d_in, d_w, None


torch.library.register_autograd(
    "torchmatgrad::linear_backward",
    lambda ctx, ggi, ggw, ggb: _linear_backward_grads(
        ctx, ggi, ggw, ggb, _ops.linear, _ops.linear_backward
    ),
    setup_context=_linear_backward_setup_context,
)


# ---- vmap rules ----------------------------------------------------------------------------


def _moved(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """t with its batch dimension first (broadcast to `size` when it has none)."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(dim, 0)


@torch.library.register_vmap("torchmatgrad::linear")
def _linear_vmap(info, in_dims, input, weight, bias=None):
    di, dw, db = (*in_dims, None)[:3]  # bias may be left out of the call
    size = info.batch_size
    if dw is None and db is None:
        # Only the input is batched: the batch is just more rows.
        return _ops.linear(input.movedim(di, 0), weight, bias), 0
    if di is None:
        # Only weight/bias are batched: stack the weights into one [size·n, m] weight.
        w = _moved(weight, dw, size)
        n = w.shape[1]
        b = _moved(bias, db, size)
        y = _ops.linear(input, w.reshape(size * n, -1), None if b is None else b.reshape(-1))
        return y.unflatten(-1, (size, n)), input.dim() - 1
    x, w, b = _moved(input, di, size), _moved(weight, dw, size), _moved(bias, db, size)
    out = [_ops.linear(x[i], w[i], None if b is None else b[i]) for i in range(size)]
    return torch.stack(out), 0


@torch.library.register_vmap("torchmatgrad::linear_backward")
def _linear_backward_vmap(info, in_dims, grad_output, input, weight, output_mask):
    dg, dx, dw, _ = in_dims
    size = info.batch_size
    if dw is None and not output_mask[1] and not output_mask[2] and dg is not None:
        # grad_input = G·W row by row: fold the vmap batch into the rows.
        g = grad_output.movedim(dg, 0)
        x = _moved(input, dx, size)
        gi = _ops.linear_backward(g, x, weight, [True, False, False])[0]
        return (gi, None, None), (0, None, None)
    # Per-sample grad_weight (Σ over that sample's rows of g·xᵀ) and the general case: one
    # call per sample.
    g, x, w = _moved(grad_output, dg, size), _moved(input, dx, size), _moved(weight, dw, size)
    outs = [_ops.linear_backward(g[i], x[i], w[i], output_mask) for i in range(size)]
    results = tuple(torch.stack([o[k] for o in outs]) if output_mask[k] else None for k in range(3))
    return results, tuple(0 if output_mask[k] else None for k in range(3))


# ---- the public function -------------------------------------------------------------------


def _autocast(input: Tensor, weight: Tensor, bias: Tensor | None):
    """Cast like F.linear does under torch.autocast: every floating input to the autocast
    dtype of input's device type."""
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    return cast(input), cast(weight), cast(bias)


class _LinearFunction(torch.autograd.Function):
    """Eager autograd for `linear`: the op's backward plus a forward-mode rule (jvp), which
    `torch.library.register_autograd` cannot express. vmap comes from the ops' vmap rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, grad_accumulation="unfused"):
        return _ops.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _linear_setup_context(ctx, inputs[:3], output)
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.grad_accumulation = inputs[3] if len(inputs) > 3 else "unfused"

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grad_accumulation != "unfused" and ctx.needs_input_grad[1]:
            input, weight = ctx.saved_tensors
            fused = fused_weight_backward(ctx, grad_output, input, weight, ctx.grad_accumulation)
            if fused is not None:
                return (*fused, None)
        return (*_linear_grads(ctx, grad_output, _linear_backward_eager), None)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, _=None):
        # d(x·Wᵀ + b) = dx·Wᵀ + x·dWᵀ + db.
        input, weight = ctx.saved_tensors
        out = None
        if d_weight is not None:
            out = _LinearFunction.apply(input, d_weight, d_bias)
        elif d_bias is not None:
            out = d_bias.expand(*input.shape[:-1], weight.shape[0])
        if d_input is not None:
            t = _LinearFunction.apply(d_input, weight, None)
            out = t if out is None else out + t
        return out


class _LinearBackwardFunction(torch.autograd.Function):
    """Eager autograd for the backward op (double backward, and forward-over-reverse)."""

    generate_vmap_rule = True

    # The output mask travels as an int (bit k: result k wanted): torch.func treats a list
    # argument as a pytree of inputs, which would not line up with the tangents.
    @staticmethod
    def forward(grad_output, input, weight, mask_bits):
        return _ops.linear_backward(grad_output, input, weight, _mask_list(mask_bits))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _linear_backward_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])
        ctx.output_mask = _mask_list(inputs[3])

    @staticmethod
    def backward(ctx, ggi, ggw, ggb):
        return _linear_backward_grads(
            ctx, ggi, ggw, ggb, _LinearFunction.apply, _linear_backward_eager
        )

    @staticmethod
    def jvp(ctx, d_go, d_in, d_w, _):
        # Each result is bilinear: d(G·W) = dG·W + G·dW, d(Gᵀ·X) = dGᵀ·X + Gᵀ·dX, d(ΣG) = ΣdG.
        grad_output, input, weight = ctx.saved_tensors
        mask = ctx.output_mask
        out = [None, None, None]

        def add(k, t):
            out[k] = t if out[k] is None else out[k] + t

        if d_go is not None:
            for k, t in enumerate(_linear_backward_eager(d_go, input, weight, mask)):
                if t is not None:
                    add(k, t)
        if d_in is not None and mask[1]:
            add(1, _linear_backward_eager(grad_output, d_in, weight, [False, True, False])[1])
        if d_w is not None and mask[0]:
            add(0, _linear_backward_eager(grad_output, input, d_w, [True, False, False])[0])
        return tuple(
            (t if t is not None else torch.zeros_like(ref)) if m else None
            for t, m, ref in zip(out, mask, (input, weight, weight[:, 0]), strict=True)
        )


# autograd.Function.apply binds its arguments with inspect.signature(forward) on every call
# (~50 µs, most of the call); a precomputed __signature__ is what inspect returns at once.
for _fn in (_LinearFunction, _LinearBackwardFunction):
    _fn.forward.__signature__ = inspect.signature(_fn.forward)


def _mask_list(bits: int) -> list[bool]:
    return [bool(bits & 1), bool(bits & 2), bool(bits & 4)]


def _linear_backward_eager(grad_output, input, weight, output_mask):
    if not _tracks_derivatives(grad_output, input, weight):
        # The usual backward (no create_graph): straight to the device kernel.
        with below_autograd():
            return _ops.linear_backward(grad_output, input, weight, output_mask)
    bits = sum(1 << k for k, wanted in enumerate(output_mask) if wanted)
    return _LinearBackwardFunction.apply(grad_output, input, weight, bits)


def _tracks_derivatives(*tensors: Tensor | None) -> bool:
    """Whether any derivative of this call can be asked for: reverse mode (grad enabled and an
    input requires grad), forward mode (a dual tensor) or a torch.func transform."""
    if functorch_transforms_active():  # first: unpack_dual fails under vmap
        return True
    ts = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return True
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    grad_accumulation: str = "unfused",
) -> Tensor:
    """y = input·weightᵀ + bias, a drop-in for :func:`torch.nn.functional.linear`.

    Args:
        input (Tensor[..., in_features]): any number of batch dimensions, or a vector.
        weight (Tensor[out_features, in_features]): same dtype and device as ``input``.
        bias (Tensor[out_features], optional): same dtype and device.
        grad_accumulation: "unfused" (default: autograd accumulates ``weight.grad`` as usual),
            "fused" (the backward kernel adds into an existing ``weight.grad`` in place) or
            "main_grad" (adds into a float32 ``weight.main_grad``). Eager mode only; see
            :mod:`torchmatgrad.accumulate` for exactly when fusing applies.

    Returns:
        Tensor[..., out_features].

    Supports autograd (double backward included), forward-mode AD, vmap, autocast and
    ``torch.compile(fullgraph=True)``. float32, float64, bfloat16 and float16; 16-bit types
    accumulate in float32. As in F.linear, a bias of another shape that broadcasts to the
    output ([1, out_features], a 0-d tensor, ...) is added after the product (its gradient is
    reduced to its shape); sparse, quantized and nested tensors are refused with an error that
    names the argument.
    """
    if torch.compiler.is_compiling():
        if bias is not None and _broadcast_bias(input, weight, bias):
            return _linear_op(input, weight, None) + bias
        return _linear_op(input, weight, bias)
    try:
        return _linear(input, weight, bias, grad_accumulation)
    except (RuntimeError, NotImplementedError):
        # The failure path only, so the common call pays nothing for F.linear's rarer forms
        # (measured, 64x64 CPU: 2.4 us a call before and after; checking bias.ndim first
        # cost 0.25 us a call). A broadcast bias pays the exception: 45 us, F.linear's 7.8.
        _check_dense(input=input, weight=weight, bias=bias)
        if bias is not None and _broadcast_bias(input, weight, bias):
            return _linear(input, weight, None, grad_accumulation) + bias
        raise


def _broadcast_bias(input: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether ``bias`` is not [out_features] but broadcasts to the output's shape, as F.linear
    adds it (F.linear refuses a bias that would make the output larger: so does this)."""
    n = weight.shape[0] if weight.dim() == 2 else None
    if n is None or input.dim() == 0 or (bias.dim() == 1 and bias.shape[0] == n):
        return False
    if bias.dtype != weight.dtype or bias.device != weight.device:
        return False
    out = torch.Size((*input.shape[:-1], n))
    try:
        return torch.broadcast_shapes(out, bias.shape) == out
    except RuntimeError:
        return False


def _check_dense(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None or not isinstance(t, Tensor):
            continue
        kind = (
            "nested"
            if t.is_nested
            else "quantized"
            if t.is_quantized
            else f"sparse ({t.layout})"
            if t.layout != torch.strided
            else None
        )
        if kind is not None:
            raise RuntimeError(
                f"torchmatgrad.linear: {name} must be a dense (strided) tensor, got a {kind} "
                "tensor; convert it (.to_dense(), .dequantize()) or use "
                "torch.nn.functional.linear"
            )


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None, grad_accumulation: str) -> Tensor:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace an autograd.Function with a custom jvp; the op carries the same
        # backward (its C++ autograd) and its fake kernel.
        return _linear_op(input, weight, bias)
    if grad_accumulation != "unfused" and not fuses_here(weight, check_mode(grad_accumulation)):
        grad_accumulation = "unfused"  # a small CPU weight: see accumulate.FUSE_MIN_ELEMENTS_CPU
    if grad_accumulation == "unfused":
        # The common case: the op's C++ autograd and autocast kernels (csrc/autograd.cpp) do
        # what F.linear's do, with no Python between the call and the kernel, forward or
        # backward. The entry declines (NotImplemented) tensor subclasses (DTensor, FakeTensor,
        # ...: torch.ops honours __torch_function__), torch.func transforms and inputs with a
        # forward-mode tangent, which take the paths below.
        out = _linear_eager(input, weight, bias)
        if out is not NotImplemented:
            return out
        if not functorch_transforms_active() and not forward_ad_active():
            return _linear_op(input, weight, bias)
    check_mode(grad_accumulation)
    # The Python autograd.Function: forward-mode AD (jvp), torch.func transforms, fused
    # gradient accumulation. It sees the inputs already cast as autocast would cast them.
    input, weight, bias = _autocast(input, weight, bias)
    if not _tracks_derivatives(input, weight, bias):
        with below_autograd():
            return _linear_op(input, weight, bias)
    if grad_accumulation == "unfused":
        return _LinearFunction.apply(input, weight, bias)
    return _LinearFunction.apply(input, weight, bias, grad_accumulation)


# ---- the CPU block cache (csrc/cpu/block_cache.h) ------------------------------------------


def cpu_cached_bytes() -> int:
    """Bytes of freed CPU gradient blocks that torchmatgrad keeps for reuse.

    A fresh grad_W or grad_input of at least 1 MiB comes from these blocks (and goes back to
    them when the tensor dies), so the next backward finds its pages already mapped instead of
    faulting them in again, as CUDA's caching allocator does. At most
    ``TORCHMATGRAD_CPU_CACHE_MB`` MiB (default 1024; 0: no cache) are kept; :func:`empty_cache`
    gives them back."""
    return int(_ops._cpu_cached_bytes())


def empty_cache() -> None:
    """Give every free block of the CPU block cache back to the system (see
    :func:`cpu_cached_bytes`); blocks in use go back when their tensors die."""
    _ops._cpu_empty_cache()
