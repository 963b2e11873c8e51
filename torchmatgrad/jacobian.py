"""Explicit derivatives of f(W, x, b) = W·x + b: the 3rd-order Jacobian, its vec/Kronecker forms
and a lazy operator.

Conventions (see docs/derivative.md for the derivation):

* ``W`` is the ``weight``, shape ``(n, m)``; ``x`` is the ``input``, shape ``(m,)`` or a batch
  ``(B, m)`` of independent samples; ``f = W·x`` has shape ``(n,)`` (``(B, n)``).
* Numerator layout: the output index comes first. The Jacobian with respect to ``W`` is the
  3rd-order tensor ``J[i, k, l] = ∂f_i/∂W_kl = δ_ik·x_l`` of shape ``(n, n, m)``, exactly the
  layout of ``torch.autograd.functional.jacobian(lambda W: W @ x, W)``.
* ``vec``: ``order="col"`` is the mathematical vec (stack W's columns; ``W.t().reshape(-1)``,
  index ``l·n + k``), giving ``∂f/∂vec(W) = xᵀ ⊗ I_n``; ``order="row"`` is torch's flatten
  (``W.reshape(-1)``, index ``k·m + l``), giving ``I_n ⊗ xᵀ``. Both are ``(n, n·m)``.
* With a scalar loss L and upstream gradient ``g = ∂L/∂f``: ``∂L/∂W = g·xᵀ`` (the outer
  product), ``∂L/∂x = Wᵀ·g``, ``∂L/∂b = g``.

Not the Jacobian: "every entry is 1 and the result is (xᵀ·1_m)·1_n" is the directional
derivative ``J·dW = dW·x`` along ``dW = all-ones`` (``JacobianOperator.jvp(ones)``).

Public names: :func:`jacobian`, :func:`dependent_jacobian`, :class:`JacobianOperator`,
:class:`KronFactors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .ops import (
    check_float_tensor,
    check_like_weight,
    check_linear_args,
    check_weight_rank,
)
from .ops import linear as _linear

__all__ = ["jacobian", "dependent_jacobian", "JacobianOperator", "KronFactors"]

_ops = torch.ops.torchmatgrad

_WRTS = ("weight", "input", "bias")
_FORMS = ("tensor", "vec", "operator")
_DENSE_FORMS = ("tensor", "vec")
_ORDERS = ("col", "row")


# ---- argument checks -----------------------------------------------------------------------
#
# What jacobian shares with the ops (ranks, sizes, dtypes and devices of weight, input and the
# tensors that must match weight) is checked by the ops' own checks (torchmatgrad.ops, the
# mirror of csrc/ops.h), re-raised as ValueError prefixed with the function's name; only what
# is jacobian's own (argument types, the 1-D/2-D input, allowed shapes, choices) is here.


@contextlib.contextmanager
def _ops_checks(fn: str) -> Iterator[None]:
    """Run the ops' checks; a failed one becomes ``ValueError("<fn>: <the op's message>")``."""
    try:
        yield
    except RuntimeError as e:
        raise ValueError(f"{fn}: {e}") from None


def _check_choice(fn: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{fn}: unknown {name}={value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def _check_tensor(fn: str, name: str, t: object, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a {what}, got {type(t)}")


def _check_weight(fn: str, weight: object) -> None:
    _check_tensor(fn, "weight", weight, "Tensor of shape (n, m)")
    with _ops_checks(fn):
        check_weight_rank(weight)
        check_float_tensor(weight, "weight")


def _check_weight_input(fn: str, weight: object, input: object) -> None:
    _check_tensor(fn, "weight", weight, "Tensor of shape (n, m)")
    _check_tensor(fn, "input", input, "Tensor of shape (m,) or (B, m)")
    if input.dim() not in (1, 2):
        raise ValueError(
            f"{fn}: input must be 1-D (m,) or 2-D (B, m), got shape {list(input.shape)}"
        )
    with _ops_checks(fn):
        check_linear_args(input, weight, None)


def _check_arg(fn: str, name: str, t: object, shapes: list[tuple[int, ...]], weight: Tensor):
    """t must be a Tensor of one of `shapes`, with weight's dtype and device."""
    _check_tensor(fn, name, t, "Tensor")
    if tuple(t.shape) not in shapes:
        expected = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{fn}: {name} must have shape {expected}, got {list(t.shape)}")
    with _ops_checks(fn):
        check_like_weight(name, t, weight)


# ---- dense forms -----------------------------------------------------------------------------


def _dense(weight: Tensor, input: Tensor, wrt: str, form: str, order: str) -> Tensor:
    """The dense Jacobian; the batch dimension (if any) of input comes first."""
    n, m = weight.shape
    batch = tuple(input.shape[:-1])
    if wrt == "input":
        # ∂f_i/∂x_j = W_ij; x is a vector, so the tensor and vec forms coincide.
        return weight.expand(*batch, n, m).clone()
    if wrt == "bias":
        # ∂f_i/∂b_k = δ_ik.
        eye = torch.eye(n, dtype=weight.dtype, device=weight.device)
        return eye.expand(*batch, n, n).clone()
    # J[..., i, k, l] = δ_ik·x_l: zeros, and x on the (i, i) diagonal. No arithmetic, so exact
    # in every dtype (and NaN/inf in x stay where they belong).
    J = input.new_zeros(*batch, n, n, m)
    J.diagonal(dim1=-3, dim2=-2).copy_(input.unsqueeze(-1).expand(*batch, m, n))
    if form == "tensor":
        return J
    if order == "row":
        # W.reshape(-1)[k·m + l] = W_kl: plain flatten of the last two dims -> I_n ⊗ xᵀ.
        return J.reshape(*batch, n, n * m)
    # W.t().reshape(-1)[l·n + k] = W_kl: swap (k, l) first -> xᵀ ⊗ I_n.
    return J.transpose(-1, -2).reshape(*batch, n, m * n)


class KronFactors(NamedTuple):
    """The two factors of a Kronecker product: ``torch.kron(left, right)`` is the matrix.

    For a batched input ``left`` (or ``right``) is ``(B, 1, m)`` and ``torch.kron`` broadcasts
    the 2-D factor, giving the per-sample matrices ``(B, n, n·m)``.
    """

    left: Tensor
    right: Tensor

    def to_dense(self) -> Tensor:
        """``torch.kron(left, right)``, the ``(n, n·m)`` (or ``(B, n, n·m)``) matrix."""
        return torch.kron(self.left, self.right)


# ---- the lazy operator -----------------------------------------------------------------------


class JacobianOperator:
    """The Jacobian of ``f = W·x + b`` with respect to one argument, as a lazy linear map.

    Nothing of size ``n·n·m`` is allocated unless :meth:`to_dense` (or ``to_dense()`` of
    :meth:`kron`'s factors) is called: :meth:`jvp` and :meth:`vjp` cost one kernel call
    (``torchmatgrad.linear`` / ``torch.ops.torchmatgrad.linear_backward``) and ``O(n·m)``
    memory, the size of ``W``.

    Args:
        weight (Tensor[n, m]): W.
        input (Tensor[m] or Tensor[B, m]): x, one vector or a batch of independent samples.
        wrt: ``"weight"``, ``"input"`` or ``"bias"``.

    Attributes:
        weight, input, wrt: as given.
        n, m (int): W's shape. batch (int | None): B for a batched input, else None.
    """

    def __init__(self, weight: Tensor, input: Tensor, wrt: str = "weight") -> None:
        _check_choice("JacobianOperator()", "wrt", wrt, _WRTS)
        _check_weight_input("JacobianOperator()", weight, input)
        self.weight = weight
        self.input = input
        self.wrt = wrt
        self.n, self.m = (int(s) for s in weight.shape)
        self.batch: int | None = int(input.shape[0]) if input.dim() == 2 else None

    # -- metadata --

    @property
    def _batch_shape(self) -> tuple[int, ...]:
        return () if self.batch is None else (self.batch,)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense ``form="tensor"`` Jacobian (output dims first, then the
        argument's): weight ``(n, n, m)``, input ``(n, m)``, bias ``(n, n)``; a batched input
        adds a leading ``B`` (per-sample Jacobians)."""
        n, m = self.n, self.m
        tail = {"weight": (n, n, m), "input": (n, m), "bias": (n, n)}[self.wrt]
        return self._batch_shape + tail

    @property
    def numel(self) -> int:
        """Entries the dense tensor form would have (``n·n·m`` per sample for the weight)."""
        out = 1
        for s in self.shape:
            out *= s
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def __repr__(self) -> str:
        batch = "" if self.batch is None else f", batch={self.batch}"
        return (
            f"JacobianOperator(wrt={self.wrt!r}, n={self.n}, m={self.m}{batch}, "
            f"shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )

    # -- products --

    def jvp(self, direction: Tensor) -> Tensor:
        """Jacobian-vector product (forward mode): the change of ``f`` along ``direction``.

        Args:
            direction: a tangent of the argument.
                weight: ``dW`` (Tensor[n, m]), or per-sample (Tensor[B, n, m]) for a batch.
                input: ``dx`` with the input's shape (Tensor[m] or Tensor[B, m]).
                bias: ``db`` (Tensor[n]), or per-sample (Tensor[B, n]) for a batch.

        Returns:
            Tensor[n] (Tensor[B, n] for a batch): weight ``dW·x``, input ``W·dx``, bias ``db``.
            ``jvp(torch.ones(n, m))`` is ``(xᵀ·1_m)·1_n`` — the "all ones" answer is this
            directional derivative, not the Jacobian.
        """
        fn = "JacobianOperator.jvp()"
        n, m, bs = self.n, self.m, self._batch_shape
        if self.wrt == "weight":
            shapes = [(n, m)] + ([(self.batch, n, m)] if self.batch is not None else [])
            _check_arg(fn, "direction", direction, shapes, self.weight)
            if direction.dim() == 2:
                return _linear(self.input, direction)  # x·dWᵀ = dW·x (row by row)
            if self.batch == 0:
                return self.input.new_empty(0, n)
            return torch.stack([_linear(x, d) for x, d in zip(self.input, direction, strict=True)])
        if self.wrt == "input":
            _check_arg(fn, "direction", direction, [tuple(self.input.shape)], self.weight)
            return _linear(direction, self.weight)  # W·dx
        shapes = [(n,)] + ([(self.batch, n)] if self.batch is not None else [])
        _check_arg(fn, "direction", direction, shapes, self.weight)
        return direction.expand(*bs, n).clone()

    def vjp(self, grad_output: Tensor, *, reduce: bool = False) -> Tensor:
        """Vector-Jacobian product (reverse mode): ``∂L/∂arg`` given ``g = ∂L/∂f``.

        Args:
            grad_output: g, Tensor[n] (Tensor[B, n] for a batch).
            reduce: for a batch, sum over the samples as autograd does for a shared W and b
                (weight: ``Gᵀ·X``, bias: ``ΣG``, one kernel call). Per-sample otherwise. No effect
                on ``wrt="input"``, whose gradient is per-sample anyway.

        Returns:
            weight: ``g·xᵀ``, Tensor[n, m] (per-sample Tensor[B, n, m], one outer product per
            sample, or Tensor[n, m] with ``reduce``); input: ``Wᵀ·g``, Tensor[m] (Tensor[B, m]);
            bias: ``g`` (``ΣG``, Tensor[n], with ``reduce``).
        """
        fn = "JacobianOperator.vjp()"
        n, x, w = self.n, self.input, self.weight
        _check_arg(fn, "grad_output", grad_output, [(*self._batch_shape, n)], w)
        if self.wrt == "input":
            return _ops.linear_backward(grad_output, x, w, [True, False, False])[0]
        if self.wrt == "bias":
            if reduce and self.batch is not None:
                return _ops.linear_backward(grad_output, x, w, [False, False, True])[2]
            return grad_output.clone()
        if self.batch is None or reduce:
            return _ops.linear_backward(grad_output, x, w, [False, True, False])[1]
        if self.batch == 0:
            return w.new_empty(0, n, self.m)
        mask = [False, True, False]
        return torch.stack(
            [_ops.linear_backward(g, xb, w, mask)[1] for g, xb in zip(grad_output, x, strict=True)]
        )

    # -- dense views --

    def to_dense(self, form: str = "tensor", order: str = "col") -> Tensor:
        """Materialize the Jacobian (``jacobian(weight, input, wrt, form, order)``).

        Args:
            form: ``"tensor"`` (shape :attr:`shape`) or ``"vec"`` (weight: ``(n, n·m)``).
            order: ``"col"`` (math vec, ``xᵀ ⊗ I_n``) or ``"row"`` (torch flatten, ``I_n ⊗ xᵀ``);
                only matters for ``wrt="weight"`` with ``form="vec"``.

        Returns:
            The dense Jacobian; a batched input adds a leading ``B``.
        """
        _check_choice("JacobianOperator.to_dense()", "form", form, _DENSE_FORMS)
        _check_choice("JacobianOperator.to_dense()", "order", order, _ORDERS)
        return _dense(self.weight, self.input, self.wrt, form, order)

    def kron(self, order: str = "col") -> KronFactors:
        """The Kronecker factors of ``∂f/∂vec(W)``, without forming the product.

        Args:
            order: ``"col"``: ``(xᵀ, I_n)``, since ``∂f/∂vec(W) = xᵀ ⊗ I_n``; ``"row"``:
                ``(I_n, xᵀ)``, since ``∂f/∂W.reshape(-1) = I_n ⊗ xᵀ``.

        Returns:
            KronFactors(left, right): xᵀ is Tensor[1, m] (Tensor[B, 1, m] for a batch), I_n is
            Tensor[n, n]. ``.to_dense()`` equals ``to_dense(form="vec", order=order)``.
        """
        _check_choice("JacobianOperator.kron()", "order", order, _ORDERS)
        if self.wrt != "weight":
            raise ValueError(
                f"JacobianOperator.kron(): only wrt='weight' has a Kronecker form, got "
                f"wrt={self.wrt!r} (use to_dense())"
            )
        xt = self.input.unsqueeze(-2)
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return KronFactors(xt, eye) if order == "col" else KronFactors(eye, xt)


# ---- the functions -------------------------------------------------------------------------


def jacobian(
    weight: Tensor,
    input: Tensor,
    wrt: str = "weight",
    form: str = "tensor",
    order: str = "col",
) -> Tensor | JacobianOperator:
    """The Jacobian of ``f = W·x (+ b)`` with respect to ``weight``, ``input`` or ``bias``.

    Args:
        weight (Tensor[n, m]): W. float32, float64, bfloat16 or float16.
        input (Tensor[m] or Tensor[B, m]): x, or a batch of B independent samples; same dtype
            and device as ``weight``.
        wrt: the argument to differentiate with respect to:
            ``"weight"``: ``∂f_i/∂W_kl = δ_ik·x_l``;
            ``"input"``: ``∂f_i/∂x_j = W_ij``;
            ``"bias"``: ``∂f_i/∂b_k = δ_ik``.
        form:
            ``"tensor"``: numerator layout, output index first, then the argument's indices —
            weight ``(n, n, m)``, input ``(n, m)``, bias ``(n, n)``; equals
            ``torch.autograd.functional.jacobian`` of ``W ↦ W @ x`` (etc.).
            ``"vec"``: the argument flattened to a vector — weight ``(n, n·m)``; for the
            vector arguments input and bias it is the same as ``"tensor"``.
            ``"operator"``: a lazy :class:`JacobianOperator` (``.shape``, ``.jvp``, ``.vjp``,
            ``.to_dense``, ``.kron``) that never allocates the ``n·n·m`` entries.
        order: how ``form="vec"`` flattens W (ignored elsewhere):
            ``"col"``: column-major, the math ``vec(W)`` = ``W.t().reshape(-1)`` (entry
            ``W_kl`` at ``l·n + k``) — gives ``xᵀ ⊗ I_n``;
            ``"row"``: row-major, torch's ``W.reshape(-1)`` (entry ``W_kl`` at ``k·m + l``) —
            gives ``I_n ⊗ xᵀ``.

    Returns:
        The dense Jacobian (a batched input adds a leading ``B``: per-sample Jacobians, e.g.
        ``(B, n, n, m)``), or a :class:`JacobianOperator` for ``form="operator"``.

    Raises:
        ValueError / TypeError: unknown ``wrt``/``form``/``order``, wrong rank, mismatched
            sizes, dtypes or devices; the message names the argument.

    Example:
        >>> W, x = torch.randn(2, 3), torch.randn(3)
        >>> jacobian(W, x).shape
        torch.Size([2, 2, 3])
        >>> jacobian(W, x, form="operator").vjp(torch.randn(2)).shape  # g·xᵀ
        torch.Size([2, 3])
    """
    _check_choice("jacobian()", "wrt", wrt, _WRTS)
    _check_choice("jacobian()", "form", form, _FORMS)
    _check_choice("jacobian()", "order", order, _ORDERS)
    _check_weight_input("jacobian()", weight, input)
    if form == "operator":
        return JacobianOperator(weight, input, wrt)
    return _dense(weight, input, wrt, form, order)


def dependent_jacobian(
    weight: Tensor,
    x0: Tensor,
    F: Callable[[Tensor], Tensor],
    form: str = "tensor",
    order: str = "col",
) -> Tensor:
    """Total derivative of ``f(W) = W·x(W)`` when the input itself depends on W: ``x = F(W)·x0``.

    By the product rule, ``df_i/dW_kl = δ_ik·x_l + Σ_j W_ij·∂x_j/∂W_kl``: the explicit term
    :func:`jacobian` gives (with ``x = F(W)·x0``) plus W applied to the Jacobian of x. ``∂x/∂W``
    (shape ``(m, n, m)``) comes from ``torch.autograd.functional.jacobian`` of ``W ↦ F(W)·x0``.
    For ``F(W) = Wᵀ`` (n == m) it is ``∂x_j/∂W_kl = δ_jl·x0_k`` and the total is
    ``δ_ik·(Wᵀx0)_l + W_il·x0_k``.

    Args:
        weight (Tensor[n, m]): W.
        x0 (Tensor[p]): the fixed vector F(W) multiplies; same dtype and device.
        F: differentiable map ``W ↦ F(W)``, returning Tensor[m, p].
        form: ``"tensor"`` (``(n, n, m)``) or ``"vec"`` (``(n, n·m)``).
        order: ``"col"`` or ``"row"``, the flattening of W for ``form="vec"`` (see
            :func:`jacobian`).

    Returns:
        Tensor[n, n, m] (or Tensor[n, n·m]), equal to
        ``torch.autograd.functional.jacobian(lambda W: W @ (F(W) @ x0), weight)``. Computed
        from ``weight.detach()``: the result carries no autograd history.
    """
    fn = "dependent_jacobian()"
    _check_choice(fn, "form", form, _DENSE_FORMS)
    _check_choice(fn, "order", order, _ORDERS)
    if not callable(F):
        raise TypeError(f"{fn}: F must be a callable W -> F(W) of shape (m, p), got {type(F)}")
    _check_weight(fn, weight)
    _check_tensor(fn, "x0", x0, "1-D Tensor (p,)")
    if x0.dim() != 1:
        raise ValueError(f"{fn}: x0 must be 1-D (p,), got shape {list(x0.shape)}")
    _check_arg(fn, "x0", x0, [tuple(x0.shape)], weight)
    n, m = (int(s) for s in weight.shape)
    FW = F(weight.detach())
    if not isinstance(FW, Tensor) or tuple(FW.shape) != (m, x0.shape[0]):
        shape = list(FW.shape) if isinstance(FW, Tensor) else type(FW)
        raise ValueError(
            f"{fn}: F(weight) must return a Tensor of shape {[m, x0.shape[0]]} (m, p) so that "
            f"x = F(W)·x0 has length m = {m}, got {shape}"
        )
    with torch.no_grad():
        x = FW @ x0
    explicit = _dense(weight, x, "weight", "tensor", order)  # δ_ik·x_l
    dx = torch.autograd.functional.jacobian(lambda w: F(w) @ x0, weight.detach())  # (m, n, m)
    implicit = (weight.detach() @ dx.reshape(m, n * m)).reshape(n, n, m)  # Σ_j W_ij ∂x_j/∂W_kl
    J = explicit + implicit
    if form == "tensor":
        return J
    if order == "row":
        return J.reshape(n, n * m)
    return J.transpose(-1, -2).reshape(n, m * n)
