"""K-FAC factors of every torchmatgrad.nn.Linear of a model, from the passes that compute them.

For a layer y = x·Wᵀ + b, K-FAC approximates its block of the GGN / Fisher by G ⊗ A (row-major
vec(W)), A from the layer's inputs x (read in the forward, by a forward hook) and G from its
outputs' gradients g (read in the backward, by a tensor hook on the output): the products xᵀx and
gᵀg are formed from what the passes read, not by another pass over the data
(:func:`._products.gram`). With fisher_type="empirical" the g are the loss's own
gradients, so the backward that fills ``.grad`` also yields the factors.

Scaling: curvlinops' (KFACLinearOperator, v3), so the two agree to rounding. N data points,
each with R loss terms (R = tokens for a sequence loss) and, for inputs with weight-sharing dims
[B, T, m], T positions per point:

* A = (1/N) Σ_n (1/T) Σ_t x_nt x_ntᵀ ("expand"), or (1/N) Σ_n x̄_n x̄_nᵀ with x̄_n the mean over
  t ("reduce"); the bias appends a 1 to x (joint) unless ``separate_weight_and_bias``.
* G = c · Σ g gᵀ over the rows (B·T of them for "expand"; for "reduce" g summed over t first),
  with g the output gradient of the loss as reduced, c = 1/mc_samples for reduction "sum" and
  c = (B·R)²/(N·R·mc_samples) for "mean" (B this batch's size: it undoes the 1/(B·R) in g and
  averages over the data instead). For MSE with "mean" the gradient is taken of √C·loss
  (curvlinops undoes the average over the C outputs).
* The g: "empirical": of the loss at the data's targets. "mc": of the loss at targets drawn
  from the model (``mc_samples`` draws; CrossEntropy from softmax, MSE from N(f, ½I)).
  "type-2": the columns of the loss Hessian's square root S (S·Sᵀ = ∇²_f ℓ), one backward
  per column, C of them (S scaled by 1/(B·R) for "mean").
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _loss
from ._hooks import backward_to, linear_layers, record
from ._products import gram, gram_with_ones
from .operator import KroneckerBlock, KroneckerOperator

__all__ = ["KFAC", "kfac"]

FISHER_TYPES = ("empirical", "mc", "type-2")
KFAC_APPROX = ("expand", "reduce")
DEFAULT_SEED = 2147483647  # curvlinops' default, so that "mc" draws the same targets


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def layer_rows(x: Tensor, approx: str) -> tuple[Tensor, float]:
    """A layer input [B, ..., m] as rows [·, m] and the scale 1/T of its products."""
    if x.dim() == 2:
        return x, 1.0
    if approx == "expand":
        T = x.shape[1:-1].numel()
        return x.reshape(-1, x.shape[-1]), 1.0 / T
    return x.flatten(1, -2).mean(1), 1.0


def grad_rows(g: Tensor, approx: str) -> Tensor:
    if g.dim() == 2:
        return g
    if approx == "expand":
        return g.reshape(-1, g.shape[-1])
    return g.flatten(1, -2).sum(1)


class KFAC:
    """Accumulates K-FAC factors batch by batch; :meth:`operator` gives the curvature.

    Args:
        model: a model whose linear layers are torchmatgrad.nn.Linear (others are ignored).
        loss_func: ``torch.nn.MSELoss`` or ``torch.nn.CrossEntropyLoss`` ("mean" or "sum").
        fisher_type: "empirical", "mc" or "type-2" (module docstring).
        mc_samples: draws per data point for "mc" (must be 1 otherwise).
        kfac_approx: "expand" or "reduce" for inputs with weight-sharing dims [B, T, m].
        separate_weight_and_bias: give the bias its own block G (curvlinops' default) instead
            of appending 1 to x (the default here: the bias is the last column of [W | b]).
        seed: seed of the generator the "mc" targets are drawn with (curvlinops' default).
        params: only the layers with a parameter in this list (default: every layer).

    Usage::

        kf = KFAC(model, torch.nn.CrossEntropyLoss(), fisher_type="empirical")
        loss = kf.step(X, y, accumulate_grad=True)   # one forward + backward: .grad and factors
        op = kf.operator()                           # KroneckerOperator
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_func,
        *,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_weight_and_bias: bool = False,
        seed: int = DEFAULT_SEED,
        params: list[Tensor] | None = None,
    ) -> None:
        _loss.check_loss(loss_func)
        _check_choice("fisher_type", fisher_type, FISHER_TYPES)
        _check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if fisher_type != "mc" and mc_samples != 1:
            raise ValueError(
                f"mc_samples must be 1 for fisher_type={fisher_type!r}, got {mc_samples}"
            )
        self.model, self.loss_func = model, loss_func
        self.fisher_type, self.mc_samples, self.kfac_approx = fisher_type, mc_samples, kfac_approx
        self.separate = separate_weight_and_bias
        self.seed = seed
        self.layers = linear_layers(model, params)
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated factors and restart the target draws."""
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, Tensor] = {}
        self.num_data = 0
        self._generator: torch.Generator | None = None
        self._g_scale = 0.0  # the c of the module docstring for the backward in flight

    def _joint(self, layer) -> bool:
        return layer.bias is not None and not self.separate

    # ---- hooks ------------------------------------------------------------------------------

    def _on_input(self, name, layer, x):
        rows, alpha = layer_rows(x, self.kfac_approx)
        m = rows.shape[-1]
        if self._joint(layer):
            if name not in self.A:
                self.A[name] = rows.new_zeros(m + 1, m + 1)
            gram_with_ones(rows, self.A[name], alpha=alpha)
        elif name in self.A:
            gram(rows, self.A[name], alpha=alpha)
        else:
            self.A[name] = gram(rows, alpha=alpha)
        return None

    def _on_grad(self, name, layer, ctx, g):
        if self._g_scale == 0.0:  # a backward not for the factors (accumulate_grad's)
            return
        rows = grad_rows(g, self.kfac_approx)
        if name in self.G:
            gram(rows, self.G[name], alpha=self._g_scale)
        else:
            self.G[name] = gram(rows, alpha=self._g_scale)

    # ---- one batch --------------------------------------------------------------------------

    def _weights(self) -> list[Tensor]:
        ws = [m.weight for _, m in self.layers if m.weight.requires_grad]
        if not ws:
            raise ValueError("the model's torchmatgrad.nn.Linear weights do not require grad")
        return ws

    def step(self, X: Tensor, y: Tensor, *, accumulate_grad: bool = False) -> Tensor:
        """Forward X, backward(s) for the factors; returns the loss (detached).

        Args:
            X (Tensor[B, ...]): inputs (data points along dim 0).
            y: targets as ``loss_func`` takes them for ``model(X)``.
            accumulate_grad: also add the loss's gradient into ``.grad``. With "empirical"
                this is the same backward that yields the factors.
        """
        if self._generator is None or self._generator.device != X.device:
            self._generator = torch.Generator(device=X.device)
            self._generator.manual_seed(self.seed)
        B = X.shape[0]
        on_grad = self._on_grad
        with record(self.layers, self._on_input, on_grad) as edges:
            output = self.model(X)
            out, yr = _loss.rows(self.loss_func, output, y)
            R = _loss.per_example_terms(self.loss_func, out, B)
            mean = self.loss_func.reduction == "mean"
            c = ((B * R) ** 2 / R if mean else 1.0) / self.mc_samples
            loss = self.loss_func(out, yr)
            try:
                self._backwards(edges, out, loss, c, accumulate_grad)
            finally:
                self._g_scale = 0.0
        self.num_data += B
        return loss.detach()

    def _backwards(self, edges, out, loss, c, accumulate_grad) -> None:
        """The factors' backwards stop at the layer outputs (``edges``, no grad_W); only
        ``accumulate_grad`` runs a full backward (with "empirical", the factors' own)."""
        self._weights()  # the error when there is nothing to differentiate
        s2 = _loss.grad_scale(self.loss_func, out) ** 2
        if self.fisher_type == "empirical":
            self._g_scale = c * s2
            if accumulate_grad:
                loss.backward()
            else:
                backward_to(edges, loss)
            return
        if self.fisher_type == "mc":
            self._g_scale = c * s2
            for k in range(self.mc_samples):
                sampled = _loss.sample_targets(self.loss_func, out, self._generator)
                last = k == self.mc_samples - 1 and not accumulate_grad
                backward_to(edges, self.loss_func(out, sampled), retain_graph=not last)
        else:  # type-2: one backward per column of S
            S = _loss.hessian_sqrt(self.loss_func, out)
            if self.loss_func.reduction == "mean":
                S = S / out.shape[0]
            self._g_scale = c
            C = S.shape[-1]
            for k in range(C):
                last = k == C - 1 and not accumulate_grad
                backward_to(edges, out, S[:, :, k], retain_graph=not last)
        if accumulate_grad:
            self._g_scale = 0.0
            loss.backward()

    # ---- the result -------------------------------------------------------------------------

    def blocks(self) -> list[KroneckerBlock]:
        if self.num_data == 0:
            raise ValueError("no data yet: call step(X, y) first")
        mean = self.loss_func.reduction == "mean"
        out = []
        for name, layer in self.layers:
            if name not in self.A or name not in self.G:
                continue  # not reached by this model's forward / backward
            G = self.G[name] / self.num_data if mean else self.G[name].clone()
            out.append(
                KroneckerBlock(
                    name=name,
                    weight=layer.weight,
                    bias=layer.bias,
                    G=G,
                    A=self.A[name] / self.num_data,
                    joint=self._joint(layer),
                )
            )
        return out

    def operator(self) -> KroneckerOperator:
        """The accumulated curvature as a :class:`KroneckerOperator`."""
        return KroneckerOperator(self.blocks())


def kfac(model: torch.nn.Module, loss_func, data, **kwargs) -> KroneckerOperator:
    """K-FAC of ``model`` over ``data`` (an iterable of (X, y) batches, or one (X, y) pair);
    keyword arguments as for :class:`KFAC`."""
    kf = KFAC(model, loss_func, **kwargs)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [data]
    for X, y in data:
        kf.step(X, y)
    return kf.operator()
