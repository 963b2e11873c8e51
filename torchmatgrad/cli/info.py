"""What this torchmatgrad build can do on this machine: ``python -m torchmatgrad info``.

Versions, whether CUDA kernels were compiled, the visible devices, which ops have kernels for
which dispatch keys, the CPU instruction set the kernels use, and which kernel path each batch
size takes (:func:`dispatch_path`, also used by the benchmark to label its rows).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass

import torch

from .. import _C, _compat, policy
from ..curvature import _products

# ---- the dispatch table --------------------------------------------------------------------
#
# The thresholds and the CPU instruction set come from the extension (_C exports them from
# csrc/constants.h); the prose describing each path is kept in step with csrc/ by hand.

#: Rows R up to which W is read once per call (kFewRows in csrc/constants.h), CPU and CUDA.
FEW_ROWS: int = _C.few_rows
#: Rows R up to which the CPU forward uses dot products over k (kCpuDotRows in csrc/constants.h).
CPU_DOT_ROWS: int = _C.cpu_dot_rows


@dataclass(frozen=True)
class KernelPath:
    """One kernel path: taken when rows R ≤ ``max_rows`` (None: any R above the previous)."""

    max_rows: int | None
    name: str
    forward: str
    backward: str


#: Rows R = input.numel() / in_features.
DISPATCH: dict[str, tuple[KernelPath, ...]] = {
    "cpu": (
        KernelPath(
            FEW_ROWS,
            "cpu:few-rows",
            f"one pass over W: R ≤ {CPU_DOT_ROWS} dot products (2-8 W rows streaming side by "
            f"side); {CPU_DOT_ROWS + 1}..{FEW_ROWS} rows of x in the vector lanes, a register "
            "tile of W rows broadcast per step (a 16-bit W widened a cache line ahead); on "
            "AVX-512, AVX2's 8 lanes up to 8 rows and, but for float64, for a W under 2^18 "
            "elements; 16 lanes beyond",
            "one pass over W, grad_W written once (into a block from the block cache); threads "
            "split W by rows (grad_input from per-thread partials, summed in order) or, for a "
            "short, wide W (256·n ≤ R·m), by columns (no partials)",
        ),
        KernelPath(
            None,
            "cpu:tiled",
            f"tiled: blocks of {_C.cpu_lanes_block} rows of x (transposed, in the vector lanes) "
            "× 96 W rows per tile, k in 16 KiB slices of x, register tiles of 6 (AVX2) or 8 "
            "(AVX-512) W rows × 2 vectors; a 16-bit W widened a cache line ahead (with "
            "AVX512-BF16, a bf16 W: x in pairs of k, one vdpbf16ps per two elements)",
            "grad_W: below 128 rows, W rows split over threads, each summing R rows of X; from "
            "128 rows, the tiled kernel as a GEMM (Gᵀ in the lanes, X packed); grad_input: the "
            "tiled kernel reading W transposed in place",
        ),
    ),
    "cuda": (
        KernelPath(
            FEW_ROWS,
            "cuda:few-rows",
            "W read once: 16 W rows per block, 4 per thread, 8 lanes × 16 B per row, bias fused",
            "one pass over W: grad_W written once, grad_input row-chunk partials summed in "
            "order, grad_bias fused",
        ),
        KernelPath(
            None,
            "cuda:tiled",
            "hand-written CUDA-core GEMM (128² or 64² tiles, k-slices of 8, double-buffered)",
            "the same tiled GEMM reading G, X, W in place; column-sum kernel for grad_bias",
        ),
    ),
}

OPS = ("linear", "linear_backward", "linear_backward_accumulate_")
DISPATCH_KEYS = ("CPU", "CUDA", "Autograd")


def _kernel_path(device_type: str, rows: int) -> KernelPath:
    paths = DISPATCH.get(device_type)
    if paths is None:
        raise ValueError(f"no torchmatgrad kernels for device type {device_type!r}")
    for p in paths:
        if p.max_rows is None or rows <= p.max_rows:
            return p
    return paths[-1]


VENDOR = {"cpu": "vendor:MKL/oneDNN", "cuda": "vendor:cuBLAS"}

#: The tensor-core few-rows kernels (csrc/cuda/forward_fewrows_tc.cu, backward_fewrows_tc.cu):
#: bfloat16/float16, rows TC_ROWS[0]..TC_ROWS[1], only with the switch on
#: (policy.cuda_tensor_cores). dispatch_path names the forward's.
TC_PATH = "cuda:few-rows-tc"
TC_ROWS: tuple[int, int] = (_C.tc_few_rows_min, _C.tc_few_rows_max)
TC_DESCRIPTION = (
    "tensor cores (mma.sync m16n8k16, fp32 sums) for bfloat16/float16: blocks of 64 W rows "
    "(16 per warp), W streamed once from global memory straight into the B fragments (16-byte "
    "loads), x through shared memory in 128-column chunks (cp.async, double-buffered), k split "
    "over blocks to fill the machine, partial sums added in a fixed order, bias fused; "
    "in_features not a multiple of 8 or unaligned x/W take the paths above. Backward, "
    "R > few_rows: grad_W = Gᵀ·X with K = R on mma.sync (64 × 128 tiles of grad_W, G and X "
    "staged transposed in shared memory, each grad_W element written once), grad_input on the "
    "tiled GEMM"
)


def tc_status() -> str:
    """Whether the tensor-core few-rows kernels (forward, grad_W) are compiled and switched on,
    and that they have not been run on a GPU yet."""
    compiled = bool(getattr(_C, "with_cuda", 0))
    enabled = policy.cuda_tensor_cores()
    return (
        f"compiled {'yes' if compiled else 'no (CPU-only build)'}, enabled "
        f"{'yes' if enabled else 'no'} (TORCHMATGRAD_CUDA_TC=1 or "
        "torchmatgrad.policy.set_cuda_tensor_cores; off by default); unverified on hardware: "
        "never yet run on a GPU"
    )


def dispatch_path(
    device_type: str,
    rows: int,
    dtype: torch.dtype = torch.float32,
    n: int = 1024,
    m: int | None = None,
    op: str = "forward",
) -> str:
    """The path a call takes now: the vendor route ("cpu:vendor:MKL/oneDNN",
    "cuda:vendor:cuBLAS") or the name of the hand-written kernel path ("cpu:few-rows",
    "cuda:tiled", ...) for ``rows`` rows of input against an (n, m) weight, as the path policy
    (:mod:`torchmatgrad.policy`, forcing included) decides it."""
    device_type = str(device_type).split(":")[0]
    if policy.path(op, dtype, n, n if m is None else m, rows, device_type) == "vendor":
        return f"{device_type}:{VENDOR[device_type]}"
    if device_type == "cpu" and dtype == torch.bfloat16 and uses_tiles(rows, op):
        return "cpu:tiles"
    if device_type == "cuda" and uses_tensor_cores(rows, dtype, n if m is None else m, op):
        return TC_PATH
    return _kernel_path(device_type, rows).name


def uses_tiles(rows: int, op: str = "forward") -> bool:
    """Whether a bf16 call of ``rows`` rows runs on the matrix engine's tiles (the amx unit, or
    amxemu's model of it): the forward above cpu_dot_rows rows, the backward above few_rows."""
    if _C.cpu_isa not in ("amx", "amxemu"):
        return False
    return rows > (_C.cpu_dot_rows if op == "forward" else _C.few_rows)


def uses_tensor_cores(rows: int, dtype: torch.dtype, m: int, op: str = "forward") -> bool:
    """Whether a CUDA call on the kernel path runs on the tensor-core few-rows forward: switch on,
    a bfloat16/float16 forward of TC_ROWS rows, in_features a multiple of 8 (and, not seen
    here, 16-byte aligned operands on a device of sm_80 or up)."""
    return (
        op == "forward"
        and dtype in (torch.bfloat16, torch.float16)
        and TC_ROWS[0] <= rows <= TC_ROWS[1]
        and m % 8 == 0
        and policy.cuda_tensor_cores()
    )


def _compact(paths: list[str]) -> list[tuple[str, str]]:
    """(size range, flags) for runs of size buckets with the same flags."""
    out: list[tuple[int, int, str]] = []
    for i, flags in enumerate(paths):
        if out and out[-1][2] == flags:
            out[-1] = (out[-1][0], i, flags)
        else:
            out.append((i, i, flags))
    return [
        (
            policy.size_label(a) if a == b else f"{policy.size_label(a)}..{policy.size_label(b)}",
            flags.replace("v", "V"),
        )
        for a, b, flags in out
    ]


def policy_text(table: policy.PathTable) -> str:
    """The path table of one device kind: where it comes from, the path of every (op, dtype,
    size bucket, rows bucket), and the measured times behind it (if any)."""
    rows = " ".join(policy.rows_label(r) for r in range(policy.N_ROWS))
    lines = [
        f"  {table.device_kind}: {table.source}",
        f"  k = hand-written kernel, V = vendor route; one letter per rows bucket ({rows})",
    ]
    if table.paths:
        for op in policy.OPS:
            for dt in policy.DTYPES:
                runs = "; ".join(
                    f"{size} {flags}" for size, flags in _compact(table.paths[(op, dt)])
                )
                lines.append(f"    {op:10s} {dt:8s} {runs}")
    if table.measurements:
        lines.append("  measured (rows: kernel ms / vendor ms, then the choice):")
        groups: dict[tuple[str, str, int, int], list[str]] = {}
        for p in table.measurements:
            key = (p["op"], p["dtype"], p["n"], p["m"])
            if p.get("inferred"):
                groups.setdefault(key, []).append(f"{p['rows']}: {p['inferred']} (inferred)")
                continue
            k, v = p["kernel_ms"], p["vendor_ms"]
            mark = policy.choice(p).replace("v", "V")
            groups.setdefault(key, []).append(f"{p['rows']}: {k:.3g}/{v:.3g} {mark}")
        for (op, dt, n, m), cells in groups.items():
            lines.append(f"    {op:10s} {dt:8s} {n}×{m}: " + ", ".join(cells))
    return "\n".join(lines)


# ---- machine facts -------------------------------------------------------------------------


def cpu_isa() -> str:
    """The instruction set torchmatgrad's CPU kernels run with on this machine ("amx",
    "avx512bf16", "avx512", "avx2" or "baseline"), as the extension picked it from the running
    CPU."""
    return str(_C.cpu_isa)


def has_kernel(op: str, key: str) -> bool | None:
    """Whether ``torchmatgrad::<op>`` has a kernel registered for dispatch key ``key``
    (None if torch cannot say)."""
    return _compat.has_kernel_for_dispatch_key(f"torchmatgrad::{op}", key)


def info_text() -> str:
    """A human-readable report of the build, the devices and the kernel dispatch."""
    import torchmatgrad

    c = torchmatgrad._C
    with_cuda = int(getattr(c, "with_cuda", 0))
    archs = str(getattr(c, "cuda_arch_list", ""))
    cuda_line = f"yes (archs {archs or '?'})" if with_cuda else "no (CPU-only build)"
    if with_cuda and has_kernel("linear", "CUDA") is False:
        cuda_line += ", but no CUDA kernel is registered for linear"
    missing = _compat.missing()
    compat = ", ".join(missing) + " missing, fallbacks in use" if missing else "all found"
    lines = [
        f"torchmatgrad {torchmatgrad.__version__} ({os.path.dirname(torchmatgrad.__file__)})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"Python {platform.python_version()} on {sys.platform}",
        f"CUDA kernels compiled: {cuda_line}",
        f"CUDA tensor-core few-rows kernels ({TC_PATH}): {tc_status()}",
        f"Private torch APIs (torchmatgrad._compat): {compat}",
        "",
        "Devices:",
        f"  cpu: {policy.cpu_model()}, {os.cpu_count()} logical CPUs, torch threads "
        f"{torch.get_num_threads()}, kernels use {cpu_isa()}",
        f"  cpu AMX tiles (bf16 GEMMs): {_C.cpu_amx}",
        f"  cpu block cache (fresh grad_W and grad_input of 1 MiB or more): "
        f"{torchmatgrad.cpu_cached_bytes() / 2**20:.0f} MiB free, at most "
        f"{_C.cpu_cache_limit_bytes / 2**20:.0f} MiB kept (TORCHMATGRAD_CPU_CACHE_MB)",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"  cuda:{i}: {p.name}, capability {p.major}.{p.minor}, "
                f"{p.total_memory / 2**30:.0f} GiB"
            )
    else:
        lines.append("  cuda: none visible")

    lines += ["", "Kernels registered (op: " + ", ".join(DISPATCH_KEYS) + "):"]
    width = max(len(op) for op in OPS)
    for op in OPS:
        marks = []
        for key in DISPATCH_KEYS:
            h = has_kernel(op, key)
            marks.append(f"{key} {'yes' if h else '?' if h is None else 'no'}")
        lines.append(f"  {op:<{width}}  " + ", ".join(marks))

    lines += ["", "Path policy (torchmatgrad.policy; forced: " + policy.current_path() + "):"]
    for table in policy.installed().values():
        lines.append(policy_text(table))

    lines += ["", "Hand-written kernel paths (R = rows of input):"]
    for paths in DISPATCH.values():
        lo = 0
        for p in paths:
            cond = f"R ≤ {p.max_rows}" if p.max_rows is not None else f"R > {lo}"
            lines.append(f"  {p.name:<13} {cond:<8} forward:  {p.forward}")
            lines.append(f"  {'':<13} {'':<8} backward: {p.backward}")
            lo = p.max_rows if p.max_rows is not None else lo
    lines.append(
        f"  {TC_PATH}: {TC_ROWS[0]} ≤ R ≤ {TC_ROWS[1]}, forward and grad_W, with the switch on "
        f"(above: {'on' if policy.cuda_tensor_cores() else 'off'}) and the kernel path "
        f"taken: {TC_DESCRIPTION}"
    )
    lines.append(
        "  a weight stored transposed ([in, out] used as .t(), HF's Conv1D): read in place by "
        f"the CPU kernels up to {_C.transposed_forward_rows32} rows forward "
        f"({_C.transposed_kernel_rows} for 16-bit) and {_C.transposed_kernel_rows} backward, "
        "by the vendor route above them, on CUDA and for fused accumulation (unless a path is "
        "forced); its gradient comes out in its own layout"
    )
    lines.append(
        "  per-sample norms (per_sample_grad_norms): the hand-written norm kernels below "
        f"{_C.norms_vendor_rows_cpu} rows per sample on the CPU and {_C.norms_vendor_rows_cuda} "
        "on CUDA (a prediction there, not yet measured on a card), from there batched GEMMs "
        "(ATen bmm: the vendor route), unless a path is forced"
    )
    lines.append(
        "  K-FAC's Grams XᵀX (torchmatgrad::gram_, CPU): the tiled kernel on the upper "
        "triangle's tiles for 16-bit rows, and for float32/float64 from "
        f"d ≥ {_products.KERNEL_MIN_D} and {_products.KERNEL_MIN_ROWS} rows; ATen's mm (the "
        "vendor route) below that and on CUDA, unless a path is forced"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The (empty) options of ``python -m torchmatgrad info``."""
    return argparse.ArgumentParser(
        prog="python -m torchmatgrad info", description=__doc__.splitlines()[0]
    )


def main(argv: list[str] | None = None) -> int:
    """Print :func:`info_text` (``python -m torchmatgrad info``). Takes no options."""
    build_parser().parse_args(argv)
    print(info_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
