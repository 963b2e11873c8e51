"""The grid: sizes, batch rows and cases; the peers timed at a point; byte and FLOP floors."""

from __future__ import annotations

import functools
import gc
import itertools
import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

import torchmatgrad
from torchmatgrad import policy

from .. import info
from .machine import _cache_bytes, _device_name
from .timing import _error_text, _Peer, _sample, _warm

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
CASES = ("fwd", "fwdbwd", "fwdbwd_acc")
FULL_N = {"cpu": (1024, 4096, 8192), "cuda": (1024, 4096, 8192, 16384)}
FULL_B = (1, 2, 4, 8, 16, 64, 256, 4096)
QUICK_N = (256, 1024)
QUICK_B = (1, 16)
QUICK_DTYPES = ("fp32", "bf16")
MAX_COPIES = 4096  # most weight copies rotated through

ROW_KEYS = (
    "device",
    "device_name",
    "dtype",
    "n",
    "m",
    "B",
    "case",
    "peer",
    "variant",
    "path",
    "unit",
    "w_copies",
    "reps",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "min_ms",
    "gbps",
    "tflops",
    "floor_bytes",
    "floor_ms",
    "floor_frac",
    "speedup_vs_torch",
    "rel_err",
    "error",
)


def _torch_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def _tmg_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, grad_accumulation: str = "unfused"
) -> torch.Tensor:
    return torchmatgrad.linear(x, w, b, grad_accumulation=grad_accumulation)


def floor_bytes(case: str, n: int, m: int, B: int, elem: int) -> int:
    """Bytes that must move: forward reads W, x, b and writes y; the backward reads W again,
    G and x and writes grad_input, grad_W and grad_b; accumulation also reads and writes
    ``.grad`` in place of writing grad_W once (W·4 passes in all)."""
    fwd = n * m + B * m + B * n + n
    if case == "fwd":
        return elem * fwd
    bwd = n * m + B * n + B * m + B * m + n  # read W, G, x; write grad_input, grad_b
    if case == "fwdbwd":
        return elem * (fwd + bwd + n * m)  # write grad_W
    return elem * (fwd + bwd + 2 * n * m + n)  # read and write .grad (W and b)


def flops(case: str, n: int, m: int, B: int) -> int:
    """Multiply-adds ×2: 2·B·n·m forward; backward adds G·W and Gᵀ·X (and n·m adds into
    ``.grad`` when accumulating)."""
    f = 2 * B * n * m
    if case == "fwd":
        return f
    return 3 * f + (n * m if case == "fwdbwd_acc" else 0)


def _copies(w_bytes: int, device: torch.device) -> int:
    return max(1, min(MAX_COPIES, math.ceil(2 * _cache_bytes(device) / max(1, w_bytes))))


def case_path(
    case: str, device_type: str, dtype: torch.dtype, n: int, m: int, B: int, variant: str
) -> str:
    """The paths a torchmatgrad peer's ops take under the current policy (forcing included),
    e.g. "cpu:few-rows" or "cpu:few-rows+cpu:vendor:MKL/oneDNN" (forward, then backward)."""
    ops = ["forward"]
    if case != "fwd":
        ops.append("accumulate" if variant.startswith("fused") else "backward")
    labels = [info.dispatch_path(device_type, B, dtype, n, m, op) for op in ops]
    return "+".join(dict.fromkeys(labels))


def _peers_for(
    case: str,
    device: torch.device,
    dtype: torch.dtype,
    B: int,
    ws: list[torch.Tensor],
    bs: list[torch.Tensor],
    x: torch.Tensor,
    gy: torch.Tensor | None,
    compile_peers: bool,
) -> list[_Peer]:
    """torch, torchmatgrad on its default (policy) path, and, where the default is not the
    hand-written kernel everywhere, torchmatgrad forced onto the kernel (variant "kernel"), so
    the kernels' own numbers stay visible beside the default's."""
    k = len(ws)
    n, m = ws[0].shape
    default = policy.current_path()  # "auto", unless TORCHMATGRAD_PATH forces one

    def path_for(variant: str, forced: str) -> str:
        with policy.force_path(forced):
            return case_path(case, device.type, dtype, n, m, B, variant)

    # (name, function, variant, forced path)
    impls: list[tuple[str, Callable[..., torch.Tensor], str, str]] = [
        ("torch", _torch_linear, "-", default)
    ]
    variants = ["unfused", "fused"] if case == "fwdbwd_acc" else ["-"]
    for variant in variants:
        fn = _tmg_linear
        if variant == "fused":
            # The backward kernel adds into the existing .grad in place (fused accumulation).
            fn = functools.partial(_tmg_linear, grad_accumulation="fused")
        impls.append(("torchmatgrad", fn, variant, default))
        if path_for(variant, default) != path_for(variant, "kernel"):
            kernel_variant = "kernel" if variant == "-" else f"{variant},kernel"
            impls.append(("torchmatgrad", fn, kernel_variant, "kernel"))
    if compile_peers:
        torch.compiler.reset()
        impls.append(("torch.compile", torch.compile(_torch_linear, dynamic=False), "-", default))
        tmg_compiled = torch.compile(_tmg_linear, dynamic=False)
        impls.append(("torchmatgrad.compile", tmg_compiled, "-", default))

    def clear_grads(i: int) -> None:
        j = i % k
        ws[j].grad = None
        bs[j].grad = None
        x.grad = None

    def clear_input_grad(i: int) -> None:
        x.grad = None

    peers = []
    for name, fn, variant, forced in impls:
        if case == "fwdbwd_acc" and name == "torchmatgrad.compile":
            variant = "unfused"
        if name == "torch":
            path = "aten"
        elif name == "torch.compile":
            path = "inductor"
        else:
            path = path_for(variant, forced)
        if case == "fwd":
            clear = None

            def call(i: int, fn: Callable[..., torch.Tensor] = fn) -> torch.Tensor:
                return fn(x, ws[i % k], bs[i % k])

        else:
            clear = clear_grads if case == "fwdbwd" else clear_input_grad

            def call(i: int, fn: Callable[..., torch.Tensor] = fn) -> torch.Tensor:
                y = fn(x, ws[i % k], bs[i % k])
                y.backward(gy)
                return y

        def pre(i: int, clear=clear, forced: str = forced) -> None:
            # Every peer sets the path it is timed on: the override is process-wide.
            policy._set_forced(forced)
            if clear is not None:
                clear(i)

        peers.append(_Peer(name, variant, path, pre, call))
    return peers


def run_point(
    device: torch.device,
    dtype_name: str,
    n: int,
    B: int,
    cases: Iterable[str],
    *,
    reps: int,
    warmup: int,
    max_time: float,
    copy_bw: float,
    compile_peers: bool,
    seed: int = 0,
    rates: dict[tuple[str, ...], float] | None = None,
    max_call_time: float = math.inf,
) -> list[dict[str, Any]]:
    """Time every case and peer at one (device, dtype, n, B); one row per case and peer.

    ``rates`` maps (device, dtype, case, peer, variant) to the FLOP/s of that peer's last timed
    row and is updated here; a peer predicted from it to take over ``max_call_time`` seconds per
    call is skipped (its row says so), which keeps the slow 16-bit CPU GEMMs at large B
    bounded."""
    dtype = DTYPES[dtype_name]
    m = n
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = 1.0 / math.sqrt(m)
    w0 = (torch.randn(n, m, device=device, generator=gen) * scale).to(dtype)
    b0 = torch.randn(n, device=device, generator=gen).to(dtype)
    x0 = torch.randn(B, m, device=device, generator=gen).to(dtype)
    gy0 = (torch.randn(B, n, device=device, generator=gen) * 0.1).to(dtype)
    k = _copies(n * m * elem, device)
    dev_name = _device_name(device)
    rows: list[dict[str, Any]] = []
    for case in cases:
        grad = case != "fwd"
        ws = [w0.clone().requires_grad_(grad) for _ in range(k)]
        bs = [b0.clone().requires_grad_(grad) for _ in range(k)]
        x = x0.clone().requires_grad_(grad)
        if case == "fwdbwd_acc":
            for w, b in zip(ws, bs, strict=True):
                w.grad = torch.zeros_like(w)
                b.grad = torch.zeros_like(b)
        peers = _peers_for(case, device, dtype, B, ws, bs, x, gy0 if grad else None, compile_peers)
        fb = floor_bytes(case, n, m, B, elem)
        fl = flops(case, n, m, B)
        for p in peers:
            # This variant's last rate, else any variant's of the same peer (a variant may
            # first appear at a larger point, e.g. the kernel row beside a vendor default).
            key = (str(device), dtype_name, case, p.name, p.variant)
            rate = None if rates is None else rates.get(key, rates.get(key[:4]))
            if rate and fl / rate > max_call_time:
                p.error = (
                    f"skipped: ~{fl / rate:.0f} s per call predicted "
                    f"(> --max-call-time {max_call_time:g})"
                )
        counter = itertools.count()
        default = policy.current_path()
        try:
            _warm(peers, device, warmup, max_time, counter)
            _sample(peers, device, reps, max_time, counter)
        finally:
            policy._set_forced(default)  # the peers set the process-wide override in turn
        floor_s = fb / copy_bw
        torch_median = None
        for p in peers:
            med = statistics.median(p.samples) if p.samples else None
            if p.name == "torch":
                torch_median = med
            if med and rates is not None:
                rates[(str(device), dtype_name, case, p.name, p.variant)] = fl / med
                rates[(str(device), dtype_name, case, p.name)] = fl / med
            q = statistics.quantiles(p.samples, n=4) if len(p.samples) >= 2 else None
            rows.append(
                {
                    "device": str(device),
                    "device_name": dev_name,
                    "dtype": dtype_name,
                    "n": n,
                    "m": m,
                    "B": B,
                    "case": case,
                    "peer": p.name,
                    "variant": p.variant,
                    "path": p.path,
                    "unit": _unit(device, p.path),
                    "w_copies": k,
                    "reps": len(p.samples),
                    "median_ms": med * 1e3 if med else None,
                    "q1_ms": q[0] * 1e3 if q else None,
                    "q3_ms": q[2] * 1e3 if q else None,
                    "min_ms": min(p.samples) * 1e3 if p.samples else None,
                    "gbps": fb / med / 1e9 if med else None,
                    "tflops": fl / med / 1e12 if med else None,
                    "floor_bytes": fb,
                    "floor_ms": floor_s * 1e3,
                    "floor_frac": floor_s / med if med else None,
                    "speedup_vs_torch": (torch_median / med) if med and torch_median else None,
                    "rel_err": p.rel_err,
                    "error": p.error,
                }
            )
        del peers, ws, bs, x
        gc.collect()
    return rows


def _unit(device: torch.device, path: str) -> str:
    """The CPU unit of a row whose path runs a hand-written CPU kernel (amx, avx512bf16, ...)."""
    kernels = [p for p in path.split("+") if p.startswith("cpu:") and "vendor" not in p]
    return info.cpu_isa() if device.type == "cpu" and kernels else "-"


def _error_row(device: torch.device, dtype_name: str, n: int, B: int, e: BaseException) -> dict:
    """A row for a grid point that could not be set up at all."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(
        device=str(device),
        device_name=_device_name(device),
        dtype=dtype_name,
        n=n,
        m=n,
        B=B,
        case="-",
        peer="-",
        variant="-",
        path="-",
        unit="-",
        error=_error_text(e),
    )
    return row
