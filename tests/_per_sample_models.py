"""The small models and the per-sample loss that the per_sample tests share."""

from __future__ import annotations

import torch


def _mlp(bias: bool, dtype, device, layernorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 9, bias=bias), torch.nn.Tanh()]
    if layernorm:
        layers.append(torch.nn.LayerNorm(9))
    layers += [torch.nn.Linear(9, 9, bias=bias), torch.nn.GELU(), torch.nn.Linear(9, 4, bias=bias)]
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One loss per sample (dim 0), whatever the sample's shape."""
    return (out - target).square().flatten(1).sum(1)
