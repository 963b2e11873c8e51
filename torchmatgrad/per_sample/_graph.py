"""Recording the forward and finding the recorded calls in the loss's graph: which layer calls
the loss reaches, the gradients of their outputs (one backward), and the checks that every
trainable parameter is accounted for."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ..nn import Linear

#: Where a recorded layer call keeps its inputs: the metadata dict of its output's autograd node,
#: so that the record lives exactly as long as the graph does.
_KEY = "torchmatgrad.per_sample"
#: The attribute of a model that holds the forward hooks enable() installed.
_HANDLES = "_torchmatgrad_per_sample_hooks"

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


def kind(module: torch.nn.Module) -> str:
    """How a recorded module's per-sample gradients are computed: "linear" (y = x·Wᵀ + b, W
    [n, m]: torchmatgrad.nn.Linear), "conv1d" (y = x·W + b, W [m, n]: Hugging Face's Conv1D
    after convert_linear), "embedding" (a plain nn.Embedding: rows picked by indices) or "other"
    (torch.func, materialized)."""
    if isinstance(module, Linear):
        return "linear"
    hf = sys.modules.get("torchmatgrad.integrations.transformers")
    if hf is not None and isinstance(module, hf.Conv1D):
        return "conv1d"
    if (
        type(module) is torch.nn.Embedding
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return "embedding"
    return "other"


def _record_linear(module: torch.nn.Module, args: tuple, output: Tensor) -> None:
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

    Installs forward hooks on every :class:`torchmatgrad.nn.Linear` (and converted Hugging Face
    ``Conv1D``), and on every other leaf module that owns trainable parameters (a plain
    ``nn.Embedding`` by its indices; any other module by ``torch.func``).
    A recorded call keeps its input tensors in the autograd graph of its output (no copy: they are
    the tensors autograd saves anyway), so they live exactly as long as the graph. Calling it
    again re-installs the hooks (modules added since are covered); :func:`disable` removes them.
    """
    disable(model)
    handles = []
    for module in model.modules():
        if kind(module) in ("linear", "conv1d"):
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
    kind: str  # see kind()
    grad: Tensor | None = None
    #: For a call shared by all samples (an Embedding looked up with indices [1, ...] whose
    #: output is broadcast over the batch): the nodes of the additions that broadcast it, whose
    #: outputs' gradients are the samples' shares of this call's gradient.
    shares: list = dataclasses.field(default_factory=list)


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


def _own_edges(layer: _Layer) -> set:
    """The (node, slot) edges through which a recorded call's own parameters get gradients."""
    node = layer.node
    if layer.kind == "linear":
        return {(node, 1), (node, 2)}
    if layer.kind == "conv1d":  # the weight enters as W.t(): through that transpose's node
        t_node = node.next_functions[1][0]
        return {(node, 2), (t_node, 0)} if t_node is not None else {(node, 2)}
    region = _region(node, set(layer.record.input_nodes))
    return {(n, k) for n in region for k in range(len(n.next_functions))}


def _layers(model: torch.nn.Module, loss_per_sample: Tensor) -> tuple[list[_Layer], dict]:
    """The recorded calls in ``loss_per_sample``'s graph, in ``model.modules()`` order, after
    checking that every trainable parameter the graph reaches belongs to one of them, and the
    consumers of every node ({node: [(parent, slot)]})."""
    root = loss_per_sample.grad_fn
    if root is None:
        raise RuntimeError("loss_per_sample does not require grad: there is nothing to backward")
    order = {m: i for i, m in enumerate(model.modules())}
    names = _named(model)
    seen, todo = {root}, [root]
    found: list[tuple] = []
    parents: dict[Tensor, list] = {}
    consumers: dict = {}
    while todo:
        node = todo.pop()
        record = node.metadata.get(_KEY) if node.metadata else None
        if record is not None:
            found.append((record, node))
        for slot, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            consumers.setdefault(nxt, []).append((node, slot))
            variable = getattr(nxt, "variable", None)  # AccumulateGrad of a leaf
            if variable is not None:
                parents.setdefault(variable, []).append((node, slot))
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)

    def name(p):
        return names.get(p, f"<a parameter of shape {list(p.shape)} outside the model>")

    layers, owners, problems = [], {}, []
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
        layer = _Layer(record, node, order[module], params, kind(module))
        for p in params:
            owners.setdefault(p, []).append(layer)
        layers.append(layer)
    for p, uses in owners.items():
        # A parameter used by several calls (weight tying, a module called twice): its
        # per-sample gradient is the sum of the calls' ones; the cross terms of its norm are
        # computed for calls of the kinds below, whose per-sample gradients are never stored.
        if len(uses) > 1 and not (
            all(u.kind in ("linear", "embedding") for u in uses)
            or all(u.kind == "conv1d" for u in uses)
        ):
            tied.append(p)
    for p, edges in parents.items():
        uses = owners.get(p)
        if uses is None:
            # A leaf that is not a parameter (an input that requires grad): no .grad for it, as
            # with torch.autograd.grad; a parameter outside any recorded layer: an error.
            if p in names or isinstance(p, torch.nn.Parameter):
                unrecorded.append(p)
            continue
        allowed = set().union(*(_own_edges(u) for u in uses))
        if not all(e in allowed for e in edges):
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
            "(weight tying, or a module called twice) of a kind whose per-sample gradients are "
            "not summed across calls: weights shared by torchmatgrad Linear and nn.Embedding "
            "calls are supported, other modules must use each parameter in one call"
        )
    if outside:
        problems.append(
            f"parameters {listed(outside)} are used outside their own layer's forward (weight "
            "tying?): per-sample clipping needs each parameter used by its layers' calls"
        )
    if problems:
        raise RuntimeError("per-sample gradients: " + "; ".join(problems))
    layers.sort(key=lambda layer: layer.order)
    return layers, consumers


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return f"'{name}'"
    return "(unnamed)"


def _broadcast_shares(layer: _Layer, consumers: dict) -> list | None:
    """The additions that broadcast a shared call's output over the batch, or None when its
    output is not only added (then the samples' shares cannot be told apart)."""
    uses = consumers.get(layer.node, [])
    shares = []
    for node, _slot in uses:
        if node.name() not in ("AddBackward0", "AddBackward1"):
            return None
        alpha = getattr(node, "_saved_alpha", 1)
        if alpha != 1:
            return None
        shares.append(node)
    return shares or None


def _samples(layers: Sequence[_Layer], loss_per_sample: Tensor, consumers: dict) -> int:
    if loss_per_sample.dim() != 1:
        raise RuntimeError(
            "loss_per_sample must be 1-D (samples,): one loss per sample, got shape "
            f"{list(loss_per_sample.shape)}"
        )
    B = loss_per_sample.shape[0]
    for layer in layers:
        x = layer.record.inputs[0]
        if layer.kind in ("linear", "conv1d") and x.dim() < 2:
            raise RuntimeError(
                f"Linear's input has shape {list(x.shape)}: per-sample gradients need a batch "
                "of samples, (B, in_features) or (B, ..., in_features)"
            )
        if layer.kind == "embedding" and x.dim() >= 2 and x.shape[0] == 1 and B != 1:
            # Indices shared by all samples (GPT-2's position ids [1, T]).
            shares = _broadcast_shares(layer, consumers)
            if shares is not None:
                layer.shares = shares
                continue
            raise RuntimeError(
                f"Embedding's input has shape {list(x.shape)}, shared by all B = {B} samples, "
                "and its output is used otherwise than added to a [B, ...] tensor: per-sample "
                "gradients need samples as dim 0, or a shared lookup that is broadcast by an "
                "addition"
            )
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != B:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise RuntimeError(
                f"{type(layer.record.module).__name__}'s input has shape {shape}: samples must "
                f"be its dim 0, B = {B} as in loss_per_sample"
            )
    return B


def backward(model, loss_per_sample, retain_graph):
    """The recorded layers (each with ``grad``, its output's gradient, samples on dim 0) and B,
    from one backward pass that stops at the layers' outputs."""
    layers, consumers = _layers(model, loss_per_sample)
    B = _samples(layers, loss_per_sample, consumers)
    if not layers:
        return layers, B
    edges, spans = [], []
    for layer in layers:
        start = len(edges)
        if layer.shares:
            edges += [GradientEdge(node, 0) for node in layer.shares]
        else:
            edges.append(GradientEdge(layer.node, layer.record.output_nr))
        spans.append((start, len(edges)))
    grads = torch.autograd.grad(
        loss_per_sample,
        edges,
        grad_outputs=torch.ones_like(loss_per_sample),
        retain_graph=retain_graph,
        allow_unused=True,
    )
    for layer, (a, b) in zip(layers, spans, strict=True):
        parts = [g for g in grads[a:b] if g is not None]
        layer.grad = None if not parts else parts[0] if len(parts) == 1 else sum(parts)
        if layer.shares and layer.grad is not None:
            idx = layer.record.inputs[0]
            layer.record.inputs = (idx.expand(B, *idx.shape[1:]),)
            layer.grad = layer.grad.reshape(B, *idx.shape[1:], -1)
    return layers, B
