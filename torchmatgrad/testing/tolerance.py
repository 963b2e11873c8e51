"""The tolerance policy (see :mod:`torchmatgrad.testing`): dtypes, factors, assert_close."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SHORT_NAMES = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}
LOW_PRECISION = (torch.bfloat16, torch.float16)

#: float32/float64: allowed error in units of eps · scale · √k. Measured on the CPU kernels
#: (every shape of tests/test_linear.py): at most 1.0, mostly 0.3-0.6 (rounding of the result
#: and of the k-term sum), so 8 leaves a margin of 8 for other summation orders (CUDA tiles).
FP_FACTOR = 8.0
#: bfloat16/float16 with peers: allowed multiple of the largest peer's error.
PEER_FACTOR = 2.0


def devices() -> list[str]:
    """Devices this process can run on: cpu, plus cuda when a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- tolerance policy ----------------------------------------------------------------------


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in: float32 for 16-bit types, else the dtype itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def max_error(got: Tensor, ref: Tensor) -> float:
    """max |got - ref|, computed in float64 on the CPU (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return (got.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def reference_scale(ref: Tensor) -> float:
    """max(1, max|ref|): the magnitude errors are measured against (absolute below 1)."""
    if ref.numel() == 0:
        return 1.0
    return max(1.0, ref.detach().double().abs().max().item())


def tolerance(
    dtype: torch.dtype, *, k: int = 1, scale: float = 1.0, peer_error: float | None = None
) -> float:
    """The largest error allowed for a result in ``dtype`` (see the module docstring).

    Args:
        dtype: the dtype of the result.
        k: terms summed into one result (reduction length); at least 1.
        scale: max(1, max|ref|), or a bound of the sum of |terms|.
        peer_error: for 16-bit dtypes, the largest error of a peer (torch in the same dtype)
            against the same float64 reference; None: the a-priori bound.
    """
    eps = torch.finfo(dtype).eps
    summing = FP_FACTOR * torch.finfo(accumulate_dtype(dtype)).eps * scale * math.sqrt(max(1, k))
    if dtype not in LOW_PRECISION:
        return summing
    if peer_error is not None:
        return PEER_FACTOR * peer_error + eps * scale
    return eps * scale + summing  # one rounding to 16 bits after the float32 sum


class Comparison(NamedTuple):
    """The verdict of :func:`compare`: ``ok`` when ``error ≤ tolerance``."""

    ok: bool
    error: float
    tolerance: float


def compare(
    got: Tensor,
    ref: Tensor,
    *,
    k: int = 1,
    peers: Sequence[Tensor] = (),
    scale: float | None = None,
) -> Comparison:
    """``got`` against the float64 reference ``ref`` under the tolerance policy, without
    raising. ``peers``: results of other implementations in ``got``'s dtype (16-bit only).
    Shapes must match (ValueError otherwise)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
    scale = reference_scale(ref) if scale is None else max(1.0, scale)
    peer_error = None
    if peers and got.dtype in LOW_PRECISION:
        peer_error = max(max_error(p, ref) for p in peers)
    tol = tolerance(got.dtype, k=k, scale=scale, peer_error=peer_error)
    err = max_error(got, ref)
    return Comparison(err <= tol, err, tol)


def assert_close(
    got: Tensor,
    ref: Tensor,
    *,
    k: int = 1,
    peers: Sequence[Tensor] = (),
    scale: float | None = None,
    what: str = "",
) -> None:
    """Assert ``got`` (our result) is within the policy's tolerance of the float64 reference
    ``ref``; also that it has ref's shape, is finite (NaN: an unwritten output) and has the
    dtype of every peer.

    Args:
        got: our result, in the dtype it was computed in.
        ref: the float64 reference, from the same input values.
        k: terms summed into one result (reduction length).
        peers: torch's (or another kernel's) result in got's dtype: for 16-bit dtypes the
            tolerance is relative to their error.
        scale: a bound of Σ|terms| when max|ref| understates it (cancellation).
        what: names the result in the failure message.
    """
    what = what or "result"
    assert tuple(got.shape) == tuple(ref.shape), (
        f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    )
    for p in peers:
        assert p.dtype == got.dtype, f"{what}: dtype {got.dtype} != peer's {p.dtype}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(got.detach().double()).all(), (
        f"{what}: non-finite values (unwritten output?)"
    )
    c = compare(got, ref, k=k, peers=peers, scale=scale)
    assert c.ok, f"{what}: max abs error {c.error:.3g} > tolerance {c.tolerance:.3g} (k={k})"
