"""Part of ``bench --case dp``: ``per_sample_grad_norms`` on each kind of layer of the DP stack,
the hand-written norm kernels against the vendor route (batched GEMMs through ATen's bmm,
csrc/vendor.cpp), both forced, and which one the default path takes. The crossover that
csrc/constants.h (kNormsVendorRowsCpu / kNormsVendorRowsCuda) encodes is read off these rows;
on CUDA it is a prediction until such a run confirms it (issue 28)."""

from __future__ import annotations

import time
from typing import Any

import torch

from torchmatgrad import _C, policy

from .timing import _sync

_ops = torch.ops.torchmatgrad


def _layer_shapes(d: int) -> list[tuple[str, int, int]]:
    """(name, n = out_features, m = in_features) of the stack's Block (dp.Block)."""
    return [("qkv", 3 * d, d), ("out", d, d), ("fc", 4 * d, d), ("proj", d, 4 * d)]


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def norm_routes(device: torch.device, d: int, B: int, T: int, reps: int) -> list[dict[str, Any]]:
    """One row per layer kind: ms of the kernel and of the vendor route (median of ``reps``),
    the route the default path takes, and the two results' largest relative difference."""
    threshold = _C.norms_vendor_rows_cuda if device.type == "cuda" else _C.norms_vendor_rows_cpu
    auto = "vendor" if T >= threshold else "kernel"
    rows = []
    for name, n, m in _layer_shapes(d):
        g = torch.randn(B, T, n, device=device)
        x = torch.randn(B, T, m, device=device)
        ms, out = {}, {}

        def norms(g=g, x=x):
            return _ops.per_sample_grad_norms(g, x, True, "auto")

        for path in ("kernel", "vendor"):
            with policy.force_path(path):
                out[path] = norms()
                ms[path] = _time(norms, device, reps)
        diff = ((out["kernel"] - out["vendor"]).abs() / out["vendor"].abs()).max().item()
        rows.append(
            {
                "layer": name,
                "n": n,
                "m": m,
                "B": B,
                "T": T,
                "method": _ops._per_sample_method(T, n, m),
                "kernel_ms": round(ms["kernel"], 4),
                "vendor_ms": round(ms["vendor"], 4),
                "default": auto,
                "faster": "kernel" if ms["kernel"] <= ms["vendor"] else "vendor",
                "rel_diff": diff,
            }
        )
    return rows


def format_norm_routes(rows: list[dict[str, Any]]) -> str:
    lines = [
        "per_sample_grad_norms by route (ms, median): layer n×m B T method | kernel vendor | "
        "default faster"
    ]
    for r in rows:
        mark = "" if r["default"] == r["faster"] else "  <- default is the slower route"
        lines.append(
            f"  {r['layer']:5s} {r['n']}×{r['m']} B={r['B']} T={r['T']} {r['method']:6s} | "
            f"{r['kernel_ms']:.3f} {r['vendor_ms']:.3f} | {r['default']} {r['faster']}{mark}"
        )
    return "\n".join(lines)
