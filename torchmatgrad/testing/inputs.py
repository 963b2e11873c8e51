"""Input makers (see :mod:`torchmatgrad.testing`): fresh random values, never zeros."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _compat


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (inputs are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(seed)


_seeded = generator  # rand's `generator` argument hides the function's name


def rand(
    *shape,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Tensor:
    """Fresh standard-normal values made in float64 on the CPU, then cast to ``dtype`` and
    moved to ``device``; never zeros (a zero that rounding produces becomes 1). ``generator``
    or ``seed`` make them reproducible (default: torch's global generator).

    ``rand(3, 5)``, ``rand((3, 5))`` and ``rand(())`` (a 0-D tensor) all work."""
    if seed is not None:
        if generator is not None:
            raise ValueError("rand(): give generator or seed, not both")
        generator = _seeded(seed)
    t = torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)
    t = torch.where(t == 0, torch.ones((), dtype=dtype), t).to(device)
    return t.requires_grad_(requires_grad)


def poison_allocator(shape, dtype: torch.dtype, device: str | torch.device) -> None:
    """Leave a NaN-filled freed block of this size behind, so an output allocated right after
    is likely to start as NaN (certain with CUDA's caching allocator): unwritten elements then
    show up as NaN instead of an innocent-looking zero. On the CPU the block cache that large
    gradients come from (csrc/cpu/block_cache.h) is poisoned too."""
    t = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del t
    if torch.device(device).type == "cpu":
        t = torch.ops.torchmatgrad._cpu_empty_reused(list(shape), dtype).fill_(float("nan"))
        del t


def linear_inputs(
    device: str,
    dtype: torch.dtype,
    seed: int,
    *,
    rows: tuple[int, ...] = (3,),
    n: int = 4,
    m: int = 5,
    requires_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x [*rows, m], W [n, m], b [n]) from one seed."""
    g = generator(seed)
    kw = {"device": device, "dtype": dtype, "requires_grad": requires_grad, "generator": g}
    return rand(*rows, m, **kw), rand(n, m, **kw), rand(n, **kw)


def double_leaves(*tensors: Tensor) -> list[Tensor]:
    """float64 copies of the same values, as new leaves that require grad (for references)."""
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


class OpLog(_compat.dispatch_mode_base()):
    """A dispatch mode that records every op run below autograd (``names``, e.g.
    ``"torchmatgrad.linear"``) and the largest number of elements any of them returned."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(str(func.overloadpacket))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out
