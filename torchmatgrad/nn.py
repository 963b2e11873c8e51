"""`torchmatgrad.nn.Linear`, a drop-in for `torch.nn.Linear`, and `convert_linear`."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .accumulate import check_mode
from .integrations import convert_module as _convert_other
from .mha import MultiheadAttention
from .ops import linear

__all__ = [
    "ConversionReport",
    "Linear",
    "MultiheadAttention",
    "convert_linear",
    "set_grad_accumulation",
]


class Linear(torch.nn.Linear):
    """y = x·Wᵀ + b computed by torchmatgrad's kernels; otherwise exactly :class:`torch.nn.Linear`.

    Same constructor, parameter names (``weight`` [out_features, in_features], ``bias``
    [out_features]), initialization, ``state_dict`` and ``extra_repr``; it subclasses
    ``torch.nn.Linear`` so code that checks ``isinstance(m, nn.Linear)`` keeps working.

    Args:
        in_features: size of each input sample (m).
        out_features: size of each output sample (n).
        bias: learn an additive bias. Default: True.
        device, dtype: factory arguments for the parameters.
        grad_accumulation: "unfused" (default), "fused" (the backward adds into an existing
            ``weight.grad`` in place) or "main_grad" (into a float32 ``weight.main_grad``);
            see :mod:`torchmatgrad.accumulate`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        grad_accumulation: str = "unfused",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.grad_accumulation = check_mode(grad_accumulation)

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias, grad_accumulation=self.grad_accumulation)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self.grad_accumulation == "unfused":
            return base
        return f"{base}, grad_accumulation={self.grad_accumulation}"

    @classmethod
    def from_linear(cls, module: torch.nn.Linear, *, grad_accumulation: str = "unfused") -> Linear:
        """A torchmatgrad Linear that shares ``module``'s parameter tensors (no copy, no
        re-initialization) and training mode."""
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(f"from_linear expects a torch.nn.Linear, got {type(module).__name__}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features = module.in_features
        new.out_features = module.out_features
        new.register_parameter("weight", module.weight)
        new.register_parameter("bias", module.bias)
        new.grad_accumulation = check_mode(grad_accumulation)
        new.train(module.training)
        return new


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_linear` converted and which linear-like modules it left, and why.

    ``converted``: (qualified name, original type) of every module replaced; ``left``:
    (qualified name, type, reason) of every linear-like module that was not. ``str(report)``
    is a printable summary."""

    converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} module(s), left {len(self.left)}"]
        lines += [f"  converted  {name or '(model)'}: {kind}" for name, kind in self.converted]
        lines += [
            f"  left       {name or '(model)'}: {kind}: {why}" for name, kind, why in self.left
        ]
        return "\n".join(lines)


def _keeps_forward(module: torch.nn.Module, base: type, ours: type) -> bool:
    """``module`` is a ``base`` (or a subclass that keeps ``base``'s own forward, e.g. MHA's
    NonDynamicallyQuantizableLinear), not already ``ours``, with materialized parameters."""
    return (
        isinstance(module, base)
        and not isinstance(module, ours)
        and type(module).forward is base.forward
        and not isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
    )


def _why_left(module: torch.nn.Module) -> str | None:
    """Why a linear-like module is not converted (None: not linear-like, or already ours)."""
    if isinstance(module, (Linear, MultiheadAttention)):
        return None
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and isinstance(
        module, torch.nn.Linear
    ):
        return "lazy: its parameters do not exist yet; convert after the first forward"
    if isinstance(module, (torch.nn.Linear, torch.nn.MultiheadAttention)):
        return "a subclass that overrides forward"
    if isinstance(module, torch.nn.Bilinear):
        return "a bilinear map, not x·Wᵀ + b"
    return None


def _convert_module(
    module: torch.nn.Module, *, grad_accumulation: str
) -> tuple[torch.nn.Module | None, str | None]:
    """One module's conversion: (its replacement, None), or (None, why a linear-like module is
    left), or (None, None) for a module that is not linear-like (or already converted). The
    replacement shares ``module``'s parameters; its children are converted separately."""
    if _keeps_forward(module, torch.nn.Linear, Linear):
        return Linear.from_linear(module, grad_accumulation=grad_accumulation), None
    if _keeps_forward(module, torch.nn.MultiheadAttention, MultiheadAttention):
        return MultiheadAttention.from_mha(module), None
    new = _convert_other(module, grad_accumulation=grad_accumulation)
    if new is not None:
        return new, None
    return None, _why_left(module)


def convert_linear(
    model: torch.nn.Module,
    *,
    grad_accumulation: str = "unfused",
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
    report: bool = False,
) -> torch.nn.Module | tuple[torch.nn.Module, ConversionReport]:
    """Replace every ``torch.nn.Linear`` inside ``model`` (in place) by
    :class:`torchmatgrad.nn.Linear` sharing the same parameters, and return ``model``.

    Subclasses of ``nn.Linear`` are replaced when they keep ``nn.Linear``'s own ``forward``
    (MultiheadAttention's ``out_proj``); those that override it, and lazy ones, are left.
    ``nn.MultiheadAttention`` (exactly, or a subclass keeping its forward) becomes
    :class:`torchmatgrad.nn.MultiheadAttention`, whose in- and out-projections run on the op
    (``nn.TransformerEncoderLayer`` / ``DecoderLayer`` hold one). If
    ``model`` itself is converted it cannot be replaced in place, so the converted module is
    returned instead. Linear maps of outside libraries are converted too
    (:mod:`torchmatgrad.integrations`: Hugging Face's ``Conv1D``), again sharing their
    parameters.

    Args:
        model: the module to convert in place.
        grad_accumulation: the converted layers' mode (see :class:`Linear`).
        filter_fn: ``filter_fn(module, fqn) -> bool`` (as torchao's ``quantize_``): convert
            only the modules for which it is True; fqn is the qualified name ("" for model).
        report: also return a :class:`ConversionReport`.

    Returns:
        ``model`` (or its replacement), and the report when ``report=True``. A warning is
        issued when nothing was converted.
    """
    rep = ConversionReport()

    def convert_one(module: torch.nn.Module, fqn: str) -> torch.nn.Module | None:
        new, why = _convert_module(module, grad_accumulation=grad_accumulation)
        if new is None:
            if why is not None:
                rep.left.append((fqn, type(module).__qualname__, why))
            return None
        if filter_fn is not None and not filter_fn(module, fqn):
            rep.left.append((fqn, type(module).__qualname__, "excluded by filter_fn"))
            return None
        rep.converted.append((fqn, type(module).__qualname__))
        return new

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            new = convert_one(child, fqn)
            if new is not None:
                setattr(module, name, new)
            walk(new if new is not None else child, fqn)

    top = convert_one(model, "")
    model = top if top is not None else model
    walk(model, "")
    if not rep.converted:
        warnings.warn(
            "convert_linear converted nothing"
            + (f"; left: {', '.join(f'{n} ({w})' for n, _, w in rep.left)}" if rep.left else ""),
            stacklevel=2,
        )
    return (model, rep) if report else model


def set_grad_accumulation(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Set ``grad_accumulation`` ("unfused", "fused", "main_grad") on every
    :class:`torchmatgrad.nn.Linear` in ``model``; returns ``model``."""
    check_mode(mode)
    for module in model.modules():
        if isinstance(module, Linear):
            module.grad_accumulation = mode
    return model
