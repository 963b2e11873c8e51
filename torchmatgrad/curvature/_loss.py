"""The losses the curvature supports (MSELoss, CrossEntropyLoss), in curvlinops' conventions.

A model's output is flattened to rows [M, C] (M loss terms; CrossEntropy's classes are dim 1,
MSE's the last dim), as curvlinops does. For a loss term ℓ(f, y) with f ∈ R^C:

* MSE: ℓ = c·‖f − y‖² (c = 1 for "sum", 1/C for "mean"), ∇²_f ℓ = 2c·I, S = √(2c)·I;
  the model's distribution is N(f, ½·I), so a sampled target is f + √½·ε.
* CrossEntropy: ∇²_f ℓ = diag(p) − p·pᵀ with p = softmax(f), S = diag(√p) − p·√pᵀ
  (S·Sᵀ = ∇²_f ℓ); a sampled target is a draw from p.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED = (torch.nn.MSELoss, torch.nn.CrossEntropyLoss)


def check_loss(loss_func) -> None:
    if not isinstance(loss_func, SUPPORTED):
        raise ValueError(
            "loss_func must be a torch.nn.MSELoss or torch.nn.CrossEntropyLoss, got "
            f"{type(loss_func).__name__}"
        )
    if loss_func.reduction not in ("mean", "sum"):
        raise ValueError(
            f"loss_func.reduction must be 'mean' or 'sum', got {loss_func.reduction!r}"
        )


def rows(loss_func, output: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """output as [M, C] and y as [M] (CrossEntropy) or [M, C] (MSE)."""
    if isinstance(loss_func, torch.nn.CrossEntropyLoss):
        if output.dim() > 2:  # (B, C, ...) -> (B·..., C)
            output = output.movedim(1, -1)
        return output.reshape(-1, output.shape[-1]), y.reshape(-1)
    return output.reshape(-1, output.shape[-1]), y.reshape(-1, y.shape[-1])


def per_example_terms(loss_func, output_rows: Tensor, batch_size: int) -> int:
    """Loss terms per data point (tokens per sequence; 1 for plain classification)."""
    M = output_rows.shape[0]
    if M % batch_size:
        raise ValueError(
            f"the output's {M} loss terms are not a multiple of the batch size {batch_size}"
        )
    return M // batch_size


def grad_scale(loss_func, output_rows: Tensor) -> float:
    """The factor s with s·(the gradient of loss_func) = the gradient curvlinops uses: √C for
    MSE with "mean" (curvlinops undoes the average over the output dimension), else 1."""
    if isinstance(loss_func, torch.nn.MSELoss) and loss_func.reduction == "mean":
        return math.sqrt(output_rows.shape[1])
    return 1.0


def hessian_sqrt(loss_func, output_rows: Tensor) -> Tensor:
    """S [M, C, C] with S_m·S_mᵀ = ∇²_f ℓ(f_m) for each row (reduction "mean" not applied)."""
    M, C = output_rows.shape
    f = output_rows.detach()
    if isinstance(loss_func, torch.nn.MSELoss):
        c = 1.0 if loss_func.reduction == "sum" else 1.0 / C
        eye = torch.eye(C, dtype=f.dtype, device=f.device).mul_(math.sqrt(2 * c))
        return eye.expand(M, C, C)
    p = f.softmax(dim=1)
    sp = p.sqrt()
    return torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)


def sample_targets(loss_func, output_rows: Tensor, generator: torch.Generator) -> Tensor:
    """Targets drawn from the model's distribution (curvlinops' draws, same generator use)."""
    f = output_rows.detach()
    if isinstance(loss_func, torch.nn.MSELoss):
        noise = torch.randn(f.shape, device=f.device, dtype=f.dtype, generator=generator)
        return f.clone() + math.sqrt(0.5) * noise
    return f.softmax(dim=1).multinomial(num_samples=1, generator=generator).squeeze(-1)
