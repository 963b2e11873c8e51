"""Small float64 models and data for the curvature tests (MLP and B×T×d sequence models)."""

from __future__ import annotations

import torch

import torchmatgrad

DT = torch.float64


class Transpose12(torch.nn.Module):
    """(B, T, C) -> (B, C, T): CrossEntropy's class dim for sequence outputs."""

    def forward(self, x):
        return x.transpose(1, 2)


class MeanOverT(torch.nn.Module):
    """(B, T, d) -> (B, d): a sequence model with one output per sequence."""

    def forward(self, x):
        return x.mean(1)


def make_case(
    kind: str, loss: str, reduction: str, *, seed: int = 0, bias: bool = True, batches=(6, 4)
):
    """(model, loss_func, batches) with odd sizes: 5 -> 7 -> 3, two batches (6 + 4 points, or
    3 + 2 sequences of T = 4). kind "pooled": sequences in, one output per sequence (the first
    layer shares its weight over T, the second sees the mean over T)."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 7, bias=bias), torch.nn.Tanh(), torch.nn.Linear(7, 3)]
    if kind == "pooled":
        layers.insert(2, MeanOverT())
    model = torchmatgrad.nn.convert_linear(torch.nn.Sequential(*layers)).to(DT)
    sizes = [(b,) for b in batches] if kind == "mlp" else [(b // 2, 4) for b in batches]
    out = [s[:1] if kind == "pooled" else s for s in sizes]
    if loss == "mse":
        lf = torch.nn.MSELoss(reduction=reduction)
        data = [
            (torch.randn(*s, 5, dtype=DT), torch.randn(*o, 3, dtype=DT))
            for s, o in zip(sizes, out, strict=True)
        ]
    else:
        lf = torch.nn.CrossEntropyLoss(reduction=reduction)
        if kind == "seq":
            model.append(Transpose12())
        data = [
            (torch.randn(*s, 5, dtype=DT), torch.randint(0, 3, o))
            for s, o in zip(sizes, out, strict=True)
        ]
    return model, lf, data


def dense(op, numel: int) -> torch.Tensor:
    return op @ torch.eye(numel, dtype=DT)


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())
