"""Small float64 models and data for the curvature tests (MLP and B×T×d sequence models)."""

from __future__ import annotations

import torch

import torchmatgrad

DT = torch.float64


class Transpose12(torch.nn.Module):
    """(B, T, C) -> (B, C, T): CrossEntropy's class dim for sequence outputs."""

    def forward(self, x):
        return x.transpose(1, 2)


def make_case(kind: str, loss: str, reduction: str, *, seed: int = 0, bias: bool = True):
    """(model, loss_func, batches) with odd sizes: 5 -> 7 -> 3, two batches (6 + 4 points, or
    3 + 2 sequences of T = 4)."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 7, bias=bias), torch.nn.Tanh(), torch.nn.Linear(7, 3)]
    model = torchmatgrad.nn.convert_linear(torch.nn.Sequential(*layers)).to(DT)
    sizes = [(6,), (4,)] if kind == "mlp" else [(3, 4), (2, 4)]
    if loss == "mse":
        lf = torch.nn.MSELoss(reduction=reduction)
        data = [(torch.randn(*s, 5, dtype=DT), torch.randn(*s, 3, dtype=DT)) for s in sizes]
    else:
        lf = torch.nn.CrossEntropyLoss(reduction=reduction)
        if kind == "seq":
            model.append(Transpose12())
        data = [(torch.randn(*s, 5, dtype=DT), torch.randint(0, 3, s)) for s in sizes]
    return model, lf, data


def dense(op, numel: int) -> torch.Tensor:
    return op @ torch.eye(numel, dtype=DT)


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())
