"""Per-sample gradient norms and DP-SGD clipping of a model's linear layers, in one backward.

Sample i's gradient of W in y = x·Wᵀ + b is an outer product summed over the sample's T rows,
∇_i W = G_iᵀ·X_i (G_i = ∂L_i/∂y_i [T, n], X_i [T, m]), and of b it is Σ_t g_t. DP-SGD clips each
sample's whole gradient to norm C and adds Gaussian noise. Everything here needs only the
outputs' gradients G and the inputs X of each layer, never a per-sample gradient in memory:

* ‖∇_i W‖² = ⟨G_i·G_iᵀ, X_i·X_iᵀ⟩ (ghost, T²(n + m)) or the squares of G_iᵀ·X_i's tiles summed in
  registers (direct, T·n·m), whichever costs less (``per_sample_method``);
* Σ_i c_i·∇_i W = (diag(c)·G)ᵀ·X: the ordinary weight-gradient product with G's rows scaled;
* grad_input does not depend on c, so one backward pass gives every G; the weight gradients
  are computed once, after the norms, instead of during the backward.

The ops (schemas in csrc/ops.cpp, checks in csrc/per_sample.h, repeated below for the fake
kernels) are ``per_sample_grad_norms``, ``clipped_grad_accumulate_`` and ``per_sample_grads``.
The mathematics, the cost rule and the Opacus recipes are in docs/per_sample.md.

Usage::

    model = torchmatgrad.nn.convert_linear(model)
    per_sample.enable(model)                      # layers record what the backward needs
    loss = F.cross_entropy(model(x), y, reduction="none")      # (B,): one loss per sample
    norms = per_sample.clipped_backward(model, loss, max_norm=1.0, noise_multiplier=1.1)
    optimizer.step()

Samples are dim 0 of every recorded layer's input ((B, m) or (B, ..., m)), and loss_per_sample[i]
must depend on sample i alone (no batch statistics: BatchNorm in training mode breaks this).
Trainable parameters of other leaf modules (LayerNorm, Embedding, an unconverted nn.Linear, ...)
are handled exactly through ``torch.func`` per-sample gradients of that module alone (these are
materialized: B copies of the module's parameters); parameters a module uses outside its own
forward, and weight tying, raise an error naming them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from . import _C  # noqa: F401  (registers the ops)
from .nn import Linear
from .ops import check_float_tensor, scalar_type_name

__all__ = [
    "add_noise_",
    "clipped_backward",
    "disable",
    "enable",
    "grad_norms",
    "per_sample_method",
]

_ops = torch.ops.torchmatgrad
#: Where a recorded layer call keeps its inputs: the metadata dict of its output's autograd node,
#: so that the record lives exactly as long as the graph does.
_KEY = "torchmatgrad.per_sample"
#: The attribute of a model that holds the forward hooks enable() installed.
_HANDLES = "_torchmatgrad_per_sample_hooks"
_METHODS = ("auto", "ghost", "direct")


# ---- argument checks: the Python mirror of csrc/per_sample.h ----------------------------------


def per_sample_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-sample norms and clipping scales: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_per_sample_args(grad_output: Tensor, input: Tensor) -> None:
    """input [B, ..., m] and grad_output [B, ..., n]: one batch shape, dtype and device."""
    torch._check(
        input.dim() >= 2,
        lambda: (
            "input must have at least 2 dimensions (samples, ..., in_features), got shape "
            f"{list(input.shape)}"
        ),
    )
    torch._check(
        grad_output.dim() == input.dim() and grad_output.shape[:-1] == input.shape[:-1],
        lambda: (
            "grad_output must have input's batch shape (samples, ...) with out_features last, "
            f"got grad_output of shape {list(grad_output.shape)} and input of shape "
            f"{list(input.shape)}"
        ),
    )
    check_float_tensor(input, "input")
    torch._check(
        grad_output.dtype == input.dtype,
        lambda: (
            "grad_output and input must have the same dtype, got grad_output "
            f"{scalar_type_name(grad_output.dtype)} and input {scalar_type_name(input.dtype)}"
        ),
    )
    torch._check(
        grad_output.device == input.device,
        lambda: (
            f"grad_output and input must be on the same device, got grad_output on "
            f"{grad_output.device} and input on {input.device}"
        ),
    )


def check_accumulation_buffer(buf: Tensor, name: str, shape: list[int], input: Tensor) -> None:
    torch._check(
        list(buf.shape) == shape,
        lambda: f"{name} must have shape {shape}, got {list(buf.shape)}",
    )
    is16 = input.dtype in (torch.float16, torch.bfloat16)
    torch._check(
        buf.dtype == input.dtype or (is16 and buf.dtype == torch.float32),
        lambda: (
            f"{name} must have input's dtype ({scalar_type_name(input.dtype)}, or float32 for "
            f"16-bit inputs), got {scalar_type_name(buf.dtype)}"
        ),
    )
    torch._check(
        buf.device == input.device,
        lambda: (
            f"{name} must be on the same device as input, got {name} on {buf.device} and "
            f"input on {input.device}"
        ),
    )
    torch._check(
        buf.is_contiguous(),
        lambda: f"{name} must be contiguous, got strides {list(buf.stride())}",
    )


def check_clipped_args(
    grad_output: Tensor,
    input: Tensor,
    scale: Tensor,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
) -> None:
    check_per_sample_args(grad_output, input)
    samples = input.shape[0]
    torch._check(
        scale.dim() == 1 and scale.shape[0] == samples,
        lambda: (
            f"scale must be 1-D of length input.size(0) (samples) = {samples}, got shape "
            f"{list(scale.shape)}"
        ),
    )
    acc = per_sample_acc_dtype(input.dtype)
    torch._check(
        scale.dtype == acc,
        lambda: (
            f"scale must have dtype {scalar_type_name(acc)} for {scalar_type_name(input.dtype)} "
            f"inputs, got {scalar_type_name(scale.dtype)}"
        ),
    )
    torch._check(
        scale.device == input.device,
        lambda: (
            f"scale must be on the same device as input, got scale on {scale.device} and "
            f"input on {input.device}"
        ),
    )
    n, m = grad_output.shape[-1], input.shape[-1]
    if grad_weight is not None:
        check_accumulation_buffer(grad_weight, "grad_weight", [n, m], input)
    if grad_bias is not None:
        check_accumulation_buffer(grad_bias, "grad_bias", [n], input)


def check_noise_args(self: Tensor, std: float) -> None:
    check_float_tensor(self, "self")
    torch._check(
        self.is_contiguous(),
        lambda: f"self must be contiguous, got strides {list(self.stride())}",
    )
    torch._check(std >= 0, lambda: f"std must be >= 0, got {std:g}")  # as C++ prints it


def check_method(method: str) -> None:
    torch._check(
        method in _METHODS,
        lambda: f"method must be 'auto', 'ghost' or 'direct', got '{method}'",
    )


# ---- fake kernels ------------------------------------------------------------------------------


@torch.library.register_fake("torchmatgrad::per_sample_grad_norms")
def _norms_fake(grad_output: Tensor, input: Tensor, bias: bool, method: str = "auto") -> Tensor:
    check_per_sample_args(grad_output, input)
    check_method(method)
    return input.new_empty((input.shape[0],), dtype=per_sample_acc_dtype(input.dtype))


@torch.library.register_fake("torchmatgrad::clipped_grad_accumulate_")
def _clipped_fake(
    grad_output: Tensor,
    input: Tensor,
    scale: Tensor,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
) -> None:
    check_clipped_args(grad_output, input, scale, grad_weight, grad_bias)


@torch.library.register_fake("torchmatgrad::add_gaussian_noise_")
def _noise_fake(self: Tensor, std: float, seed: int, accumulate: bool = True) -> None:
    check_noise_args(self, std)


@torch.library.register_fake("torchmatgrad::per_sample_grads")
def _grads_fake(grad_output: Tensor, input: Tensor) -> Tensor:
    check_per_sample_args(grad_output, input)
    return input.new_empty((input.shape[0], grad_output.shape[-1], input.shape[-1]))


def per_sample_method(rows_per_sample: int, out_features: int, in_features: int) -> str:
    """``"ghost"`` or ``"direct"``: how ``per_sample_grad_norms(method="auto")`` computes the
    norms of a layer with weight [out_features, in_features] and T = ``rows_per_sample`` rows
    per sample. Ghost ((T + 1)·(n + m)/2 multiply-adds per row) unless direct (n·m) is cheaper;
    the rule lives in C++ (csrc/per_sample.h)."""
    return _ops._per_sample_method(rows_per_sample, out_features, in_features)


# ---- recording the forward -----------------------------------------------------------------


@dataclasses.dataclass
class _Record:
    """One call of a recorded module: its tensor inputs (detached) and, for a leaf module other
    than torchmatgrad's Linear, its positional arguments and where its output's gradient goes."""

    module: torch.nn.Module
    inputs: tuple
    output_nr: int = 0
    unsupported: str | None = None
    input_nodes: tuple = ()  # the autograd nodes of the inputs (where the module's region ends)


#: > 0 while torch.func re-runs a module's forward (no recording then).
_suspended = 0


def _recording(output) -> bool:
    return (
        _suspended == 0
        and torch.is_grad_enabled()
        and isinstance(output, Tensor)
        and output.grad_fn is not None
    )


def _record_linear(module: Linear, args: tuple, output: Tensor) -> None:
    if not _recording(output):
        return
    w, b = module.weight, module.bias
    if not (w.requires_grad or (b is not None and b.requires_grad)):
        return
    x = args[0]
    unsupported = None
    if x.dtype != w.dtype or output.dtype != w.dtype:
        unsupported = f"its input ({x.dtype}) or output ({output.dtype}) is cast (autocast?)"
    output.grad_fn.metadata[_KEY] = _Record(module, (x.detach(),), 0, unsupported)


def _record_other(module: torch.nn.Module, args: tuple, output) -> None:
    if not _recording(output):
        return
    inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    nodes = tuple(a.grad_fn for a in args if isinstance(a, Tensor) and a.grad_fn is not None)
    unsupported = None
    if not args or not all(isinstance(a, Tensor) for a in args):
        unsupported = "its forward takes arguments that are not tensors"
    output.grad_fn.metadata[_KEY] = _Record(module, inputs, output.output_nr, unsupported, nodes)


def enable(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s forward record what :func:`grad_norms` and :func:`clipped_backward` need,
    and return ``model``.

    Installs forward hooks on every :class:`torchmatgrad.nn.Linear` and on every other leaf
    module that owns trainable parameters (their per-sample gradients come from ``torch.func``).
    A recorded call keeps its input tensors in the autograd graph of its output (no copy: they are
    the tensors autograd saves anyway), so they live exactly as long as the graph. Calling it
    again re-installs the hooks (modules added since are covered); :func:`disable` removes them.
    """
    disable(model)
    handles = []
    for module in model.modules():
        if isinstance(module, Linear):
            handles.append(module.register_forward_hook(_record_linear))
        elif not any(True for _ in module.children()) and any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            handles.append(module.register_forward_hook(_record_other))
    setattr(model, _HANDLES, handles)
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the hooks :func:`enable` installed (none: nothing happens); returns ``model``."""
    for handle in getattr(model, _HANDLES, ()):
        handle.remove()
    if hasattr(model, _HANDLES):
        delattr(model, _HANDLES)
    return model


# ---- the backward ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
    """A recorded call found in the loss's graph, with the gradient of its output."""

    record: _Record
    node: object  # the autograd node of the call's output
    order: int  # position of the module in model.modules()
    params: list  # its trainable parameters, weight first
    grad: Tensor | None = None


def _named(model: torch.nn.Module) -> dict:
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(p, name)
    return names


def _region(node, stops: set) -> set:
    """Nodes reachable from ``node`` without passing one of ``stops``: the autograd nodes of a
    leaf module's own forward, between its output and its inputs."""
    seen, todo = {node}, [node]
    while todo:
        for nxt, _ in todo.pop().next_functions:
            if nxt is not None and nxt not in seen and nxt not in stops:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _layers(model: torch.nn.Module, loss_per_sample: Tensor) -> list[_Layer]:
    """The recorded calls in ``loss_per_sample``'s graph, in ``model.modules()`` order, after
    checking that every trainable parameter the graph reaches belongs to exactly one of them."""
    root = loss_per_sample.grad_fn
    if root is None:
        raise RuntimeError("loss_per_sample does not require grad: there is nothing to backward")
    order = {m: i for i, m in enumerate(model.modules())}
    names = _named(model)
    seen, todo = {root}, [root]
    found: list[tuple] = []
    parents: dict[Tensor, list] = {}
    while todo:
        node = todo.pop()
        record = node.metadata.get(_KEY) if node.metadata else None
        if record is not None:
            found.append((record, node))
        for slot, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)  # AccumulateGrad of a leaf
            if variable is not None:
                parents.setdefault(variable, []).append((node, slot))
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)

    def name(p):
        return names.get(p, f"<a parameter of shape {list(p.shape)} outside the model>")

    layers, owner, problems = [], {}, []
    tied, unrecorded, outside = [], [], []
    for record, node in found:
        module = record.module
        if module not in order:
            problems.append(f"a recorded {type(module).__name__} is not part of this model")
            continue
        if record.unsupported:
            where = _module_name(model, module)
            problems.append(f"{type(module).__name__} {where}: {record.unsupported}")
            continue
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        layer = _Layer(record, node, order[module], params)
        for p in params:
            if p in owner:
                tied.append(p)
            owner[p] = layer
        layers.append(layer)
    for p, edges in parents.items():
        layer = owner.get(p)
        if layer is None:
            # A leaf that is not a parameter (an input that requires grad): no .grad for it, as
            # with torch.autograd.grad; a parameter outside any recorded layer: an error.
            if p in names or isinstance(p, torch.nn.Parameter):
                unrecorded.append(p)
            continue
        if isinstance(layer.record.module, Linear):
            slot = 1 if p is layer.record.module.weight else 2
            ok = edges == [(layer.node, slot)]
        else:
            region = _region(layer.node, set(layer.record.input_nodes))
            ok = all(node in region for node, _ in edges)
        if not ok:
            outside.append(p)

    def listed(ps) -> str:
        ps = sorted(dict.fromkeys(ps), key=lambda p: rank.get(p, len(rank)))
        return ", ".join(f"'{name(p)}'" for p in ps)

    rank = {p: i for i, p in enumerate(names)}
    if unrecorded:
        problems.append(
            f"parameters {listed(unrecorded)} get a gradient but belong to no recorded layer "
            "(per_sample.enable(model) before the forward records torchmatgrad.nn.Linear and "
            "every leaf module that owns trainable parameters; a module with submodules may not "
            "use parameters of its own)"
        )
    if tied:
        problems.append(
            f"parameters {listed(tied)} are used by more than one layer call in this forward "
            "(weight tying, or a module called twice): per-sample clipping needs each parameter "
            "used by one call"
        )
    if outside:
        problems.append(
            f"parameters {listed(outside)} are used outside their own layer's forward (weight "
            "tying?): per-sample clipping needs each parameter used by one layer call"
        )
    if problems:
        raise RuntimeError("per-sample gradients: " + "; ".join(problems))
    layers.sort(key=lambda layer: layer.order)
    return layers


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"'{name}'"
    return "(unnamed)"


def _samples(layers: Sequence[_Layer], loss_per_sample: Tensor) -> int:
    if loss_per_sample.dim() != 1:
        raise RuntimeError(
            "loss_per_sample must be 1-D (samples,): one loss per sample, got shape "
            f"{list(loss_per_sample.shape)}"
        )
    B = loss_per_sample.shape[0]
    for layer in layers:
        x = layer.record.inputs[0]
        if isinstance(layer.record.module, Linear) and x.dim() < 2:
            raise RuntimeError(
                f"Linear's input has shape {list(x.shape)}: per-sample gradients need a batch "
                "of samples, (B, in_features) or (B, ..., in_features)"
            )
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != B:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise RuntimeError(
                f"{type(layer.record.module).__name__}'s input has shape {shape}: samples must "
                f"be its dim 0, B = {B} as in loss_per_sample"
            )
    return B


def _backward(model, loss_per_sample, retain_graph):
    layers = _layers(model, loss_per_sample)
    B = _samples(layers, loss_per_sample)
    if not layers:
        return layers, B
    edges = [GradientEdge(layer.node, layer.record.output_nr) for layer in layers]
    grads = torch.autograd.grad(
        loss_per_sample,
        edges,
        grad_outputs=torch.ones_like(loss_per_sample),
        retain_graph=retain_graph,
        allow_unused=True,
    )
    for layer, g in zip(layers, grads, strict=True):
        layer.grad = g
    return layers, B


def _linear_parts(layer: _Layer):
    module = layer.record.module
    x, g = layer.record.inputs[0], layer.grad
    w, b = module.weight, module.bias
    return x, g, w.requires_grad, b is not None and b.requires_grad


def rows_sum(g: Tensor) -> Tensor:
    """Σ over the rows of each sample: [B, ..., n] -> [B, n] in the accumulation dtype (the
    per-sample bias gradient)."""
    rows = math.prod(g.shape[1:-1])
    return g.reshape(g.shape[0], rows, g.shape[-1]).sum(1, dtype=per_sample_acc_dtype(g.dtype))


def _other_grads(layer: _Layer) -> list[Tensor]:
    """Per-sample gradients of a leaf module's trainable parameters ([B, *p.shape] each), by
    torch.func on the module alone: vmap over the samples of grad of ⟨module(x_i), g_i⟩."""
    module = layer.record.module
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    inputs = layer.record.inputs

    def inner(params, g, *xs):
        out = torch.func.functional_call(module, params, tuple(x.unsqueeze(0) for x in xs))
        return (out * g.unsqueeze(0)).sum()

    global _suspended
    _suspended += 1
    try:
        per = torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0) + (0,) * len(inputs))(
            params, layer.grad, *inputs
        )
    finally:
        _suspended -= 1
    return [per[n] for n in names]


def _squared_norms(layers: Sequence[_Layer], B: int, method: str) -> tuple[Tensor, list]:
    """Σ over the layers of each sample's squared gradient norm [B] (float64), and the
    materialized per-sample gradients of the non-Linear layers."""
    device = None
    total = None
    others = []
    for layer in layers:
        g = layer.grad
        if g is None:  # the loss does not depend on this call after all
            others.append(None)
            continue
        device = g.device
        if isinstance(layer.record.module, Linear):
            x, g, want_w, want_b = _linear_parts(layer)
            if want_w:
                sq = _ops.per_sample_grad_norms(g, x, want_b, method)
            else:
                sq = rows_sum(g).square().sum(1)
            others.append(None)
        else:
            per = _other_grads(layer)
            sq = sum(p.reshape(B, -1).double().square().sum(1) for p in per)
            others.append(per)
        sq = sq.double()
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros(B, dtype=torch.float64, device=device)
    return total, others


def _norm_dtype(layers: Sequence[_Layer]) -> torch.dtype:
    wide = any(p.dtype == torch.float64 for layer in layers for p in layer.params)
    return torch.float64 if wide else torch.float32


def grad_norms(
    model: torch.nn.Module,
    loss_per_sample: Tensor,
    *,
    method: str = "auto",
    retain_graph: bool = False,
) -> Tensor:
    """Each sample's gradient norm over every trainable parameter of ``model`` that
    ``loss_per_sample`` reaches, from one backward pass; ``.grad`` is left untouched.

    Args:
        model: the model whose forward produced ``loss_per_sample``, after :func:`enable`.
        loss_per_sample (Tensor[B]): loss_per_sample[i] depends on sample i alone.
        method: "auto" (per layer, the cheaper of the two), "ghost" or "direct": how the
            linear layers' norms are computed (docs/per_sample.md).
        retain_graph: keep the graph (and the recorded inputs) for another backward.

    Returns:
        Tensor[B]: ‖∇_θ loss_per_sample[i]‖₂, float32 (float64 when a parameter is float64).
    """
    check_method(method)
    layers, B = _backward(model, loss_per_sample, retain_graph)
    total, _ = _squared_norms(layers, B, method)
    if not retain_graph:
        _drop_records(layers)
    return total.sqrt().to(_norm_dtype(layers))


def _drop_records(layers: Sequence[_Layer]) -> None:
    for layer in layers:
        layer.node.metadata.pop(_KEY, None)
        layer.record = layer.grad = None


def _grad_buffer(p: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """``p.grad`` with N(0, std²) noise added, created when None, as autograd would create it."""
    if p.grad is None:
        if std > 0:  # a fresh buffer holding just the noise: no zero fill first
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            return add_noise_(p.grad, std, generator, accumulate=False)
        p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
    elif std > 0:
        add_noise_(p.grad, std, generator)
    return p.grad


def add_noise_(
    t: Tensor, std: float, generator: torch.Generator | None = None, *, accumulate: bool = True
) -> Tensor:
    """``t += N(0, std²)`` per entry in place (``t = ...`` when not ``accumulate``). On CPU by
    ``torchmatgrad::add_gaussian_noise_`` (a counter-based generator on all cores; torch's CPU
    ``normal_`` is one sequential generator, slower than the clipping itself) seeded by one
    64-bit draw from ``generator``; elsewhere by ``normal_`` with ``generator``."""
    if t.device.type == "cpu" and t.is_contiguous():
        where = generator.device if generator is not None else "cpu"
        seed = torch.randint(-(2**63), 2**63 - 1, (), generator=generator, device=where).item()
        _ops.add_gaussian_noise_(t, float(std), int(seed), accumulate)
    elif accumulate:
        t.add_(torch.empty_like(t).normal_(0.0, std, generator=generator))
    else:
        t.normal_(0.0, std, generator=generator)
    return t


def clipped_backward(
    model: torch.nn.Module,
    loss_per_sample: Tensor,
    max_norm: float,
    *,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    method: str = "auto",
) -> Tensor:
    """DP-SGD's gradient in one backward: add Σ_i c_i·∇_θ loss_per_sample[i] (+ noise) into
    ``.grad`` of every trainable parameter that ``loss_per_sample`` reaches, as autograd would
    (creating ``.grad`` or accumulating into it), with c_i = min(1, max_norm / (‖∇_i‖ + 1e-6))
    and ‖∇_i‖ the sample's gradient norm over all those parameters (flat clipping).

    Args:
        model: the model whose forward produced ``loss_per_sample``, after :func:`enable`.
        loss_per_sample (Tensor[B]): loss_per_sample[i] depends on sample i alone.
        max_norm: the clipping bound C (> 0).
        noise_multiplier: σ ≥ 0; each entry of each gradient gets N(0, (σ·C)²) noise, drawn
            parameter by parameter in ``model.parameters()`` order (:func:`add_noise_`: on CPU
            torchmatgrad's parallel generator, seeded by one draw from ``generator`` per
            parameter; on CUDA ``normal_``).
        generator: the source of the noise (on the parameters' device); default: torch's.
        method: how the linear layers' norms are computed ("auto", "ghost", "direct").

    Returns:
        Tensor[B]: the per-sample gradient norms before clipping (float32, or float64 when a
        parameter is float64).

    The weight gradients are computed once, after all norms are known, by
    ``torchmatgrad::clipped_grad_accumulate_`` (G's rows scaled by c as they are loaded); the
    graph is freed as by ``backward()``.
    """
    check_method(method)
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be ≥ 0, got {noise_multiplier!r}")
    layers, B = _backward(model, loss_per_sample, retain_graph=False)
    total, others = _squared_norms(layers, B, method)
    norms = total.sqrt()
    clip = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    std = float(noise_multiplier) * float(max_norm)
    try:
        with torch.no_grad():
            for layer, per in zip(layers, others, strict=True):
                if isinstance(layer.record.module, Linear):
                    _clipped_linear(layer, clip, std, generator)
                else:
                    _clipped_other(layer, per, clip, std, generator)
                # The layer's X and G may go now (the rest of the step needs less memory).
                layer.node.metadata.pop(_KEY, None)
                layer.record = layer.grad = None
    finally:
        _drop_records(layers)
    return norms.to(_norm_dtype(layers))


def _clipped_linear(layer: _Layer, clip: Tensor, std: float, generator) -> None:
    module = layer.record.module
    x, g, want_w, want_b = _linear_parts(layer)
    gw = _grad_buffer(module.weight, std, generator) if want_w else None
    gb = _grad_buffer(module.bias, std, generator) if want_b else None
    if g is None:
        return
    scale = clip.to(device=x.device, dtype=per_sample_acc_dtype(x.dtype))
    _ops.clipped_grad_accumulate_(g, x, scale, gw, gb)


def _clipped_other(layer: _Layer, per, clip: Tensor, std: float, generator) -> None:
    for p, ps in zip(layer.params, per or [None] * len(layer.params), strict=True):
        buf = _grad_buffer(p, std, generator)
        if ps is not None:
            c = clip.to(device=ps.device, dtype=per_sample_acc_dtype(ps.dtype))
            buf.add_(torch.einsum("b,b...->...", c, ps.to(c.dtype)).to(buf.dtype))
