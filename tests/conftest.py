"""Fixtures shared by the tests: devices, dtypes, tolerances, references."""

from __future__ import annotations

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
    ),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    return request.param


def rand(*shape, device="cpu", dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    """Fresh standard-normal values (never zeros), made in float64 then cast."""
    t = torch.randn(*shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def assert_matches_reference(ours, theirs, ref, *, what="") -> None:
    """ours (our kernel) and theirs (torch in the same dtype) against a float64 reference.

    float64/float32: within a small relative bound. 16-bit: our error at most about twice
    torch's own error in that dtype (plus one unit of rounding of the largest value).
    """
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
    if ref.numel() == 0:
        return
    ours64, theirs64, ref = ours.double().cpu(), theirs.double().cpu(), ref.double().cpu()
    assert torch.isfinite(ours64).all(), f"{what}: non-finite values (unwritten output?)"
    scale = max(1.0, ref.abs().max().item())
    err = (ours64 - ref).abs().max().item()
    if ours.dtype in (torch.float64, torch.float32):
        eps = torch.finfo(ours.dtype).eps
        bound = 64 * eps * scale * max(1.0, ref.shape[-1] ** 0.5)
    else:
        torch_err = (theirs64 - ref).abs().max().item()
        bound = 2 * torch_err + torch.finfo(ours.dtype).eps * scale
    assert err <= bound, f"{what}: max abs error {err:.3g} > bound {bound:.3g}"


def poison_allocator(shape, dtype, device) -> None:
    """Leave a NaN-filled freed block of this size behind, so an output allocated right after
    is likely to start as NaN (certain with CUDA's caching allocator): unwritten elements then
    show up as NaN instead of an innocent-looking zero."""
    t = torch.full(shape, float("nan"), dtype=dtype, device=device)
    del t
