"""The benchmark of the tensor-core few-rows forward (csrc/cuda/forward_fewrows_tc.cu) against
cuBLAS and the CUDA-core kernels, all in one run so that the ratios compare like with like.

    python -m scripts.gpu_tc_bench --device cuda --out DIR [--quick]

Per (dtype, n = m, rows): torch eager ``F.linear`` (cuBLAS), torchmatgrad on the kernel path with
the tensor-core switch off (the CUDA-core kernels: few-rows up to 16 rows, the tiled GEMM above)
and on (the tensor-core kernel), interleaved, single calls timed with CUDA events, each call on
the next of several weight copies (together at least twice the L2) so that W comes from memory.
Prints a table (ms, W's bytes per second of the tensor-core kernel, speedup against cuBLAS and
the CUDA cores, largest relative difference from cuBLAS) and writes ``DIR/tc-bench.json``.
``--device cpu`` runs the same plumbing on tiny shapes on the CPU kernels (where the switch
changes nothing): the numbers mean nothing there.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import torchmatgrad
from torchmatgrad import policy
from torchmatgrad.cli.bench import machine, timing
from torchmatgrad.cli.bench.report import now_utc, write_json

#: (dtypes, sizes n = m, rows) by device type: the issue's shapes on CUDA.
SHAPES: dict[str, tuple[list[str], list[int], list[int]]] = {
    "cuda": (["bf16", "fp16"], [4096, 8192], [16, 32, 64]),
    "cpu": (["bf16", "fp16"], [256], [16, 32, 64]),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_COPIES = 8
#: (reps, warmup, max seconds per peer and point) by preset.
TIMING = {"full": (100, 10, 1.0), "quick": (20, 3, 0.2)}


def time_point(
    device: torch.device, dtype_name: str, n: int, rows: int, preset: str
) -> dict[str, Any]:
    """One (dtype, n, rows) point: the three peers' median times and the derived ratios."""
    dtype = DTYPES[dtype_name]
    m = n
    gen = torch.Generator(device=device).manual_seed(n + rows)
    w0 = (torch.randn(n, m, device=device, generator=gen) / math.sqrt(m)).to(dtype)
    b = torch.randn(n, device=device, generator=gen).to(dtype)
    x = torch.randn(rows, m, device=device, generator=gen).to(dtype)
    w_bytes = n * m * w0.element_size()
    k = max(1, min(MAX_COPIES, math.ceil(2 * machine._cache_bytes(device) / w_bytes)))
    ws = [w0.clone() for _ in range(k)]
    ops = torch.ops.torchmatgrad

    def mode(path: str, tc: bool):
        def pre(_i: int) -> None:
            policy._set_forced(path)
            policy.set_cuda_tensor_cores(tc)

        return pre

    peers = [
        timing._Peer(
            "torch", "cublas", "aten", mode("auto", False), lambda i: F.linear(x, ws[i % k], b)
        ),
        timing._Peer(
            "torchmatgrad",
            "cuda-cores",
            "kernel",
            mode("kernel", False),
            lambda i: ops.linear(x, ws[i % k], b),
        ),
        timing._Peer(
            "torchmatgrad",
            "tensor-cores",
            "kernel",
            mode("kernel", True),
            lambda i: ops.linear(x, ws[i % k], b),
        ),
    ]
    reps, warmup, max_time = TIMING[preset]
    counter = itertools.count()
    forced, tc = policy.current_path(), policy.cuda_tensor_cores()
    try:
        timing._warm(peers, device, warmup, max_time, counter)
        timing._sample(peers, device, reps, max_time, counter)
    finally:
        policy._set_forced(forced)
        policy.set_cuda_tensor_cores(tc)
    ms = {p.variant: (statistics.median(p.samples) * 1e3 if p.samples else None) for p in peers}
    row: dict[str, Any] = {
        "dtype": dtype_name,
        "n": n,
        "m": m,
        "rows": rows,
        "weight_copies": k,
        "ms": ms,
        "errors": {p.variant: p.error for p in peers if p.error},
        "rel_err_vs_cublas": {p.variant: p.rel_err for p in peers[1:]},
    }
    t_tc, t_blas, t_cores = ms["tensor-cores"], ms["cublas"], ms["cuda-cores"]
    row["tc_weight_GBps"] = w_bytes / (t_tc * 1e-3) / 1e9 if t_tc else None
    row["speedup_vs_cublas"] = t_blas / t_tc if t_tc and t_blas else None
    row["speedup_vs_cuda_cores"] = t_cores / t_tc if t_tc and t_cores else None
    return row


def format_rows(rows: list[dict[str, Any]], copy_gbps: float) -> str:
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [
        f"tensor-core few-rows forward vs cuBLAS (copy bandwidth {copy_gbps:.0f} GB/s; "
        "speedup = other ms / tensor-core ms)",
        f"{'dtype':5} {'n=m':>5} {'rows':>4} {'cuBLAS ms':>9} {'cores ms':>9} {'tc ms':>9} "
        f"{'tc W GB/s':>9} {'vs cuBLAS':>9} {'vs cores':>8} {'tc rel err':>10}",
    ]
    for r in rows:
        ms = r["ms"]
        err = r["rel_err_vs_cublas"].get("tensor-cores")
        lines.append(
            f"{r['dtype']:5} {r['n']:>5} {r['rows']:>4} {f(ms['cublas'], '9.4f')} "
            f"{f(ms['cuda-cores'], '9.4f')} {f(ms['tensor-cores'], '9.4f')} "
            f"{f(r['tc_weight_GBps'], '9.0f')} {f(r['speedup_vs_cublas'], '8.2f')}x "
            f"{f(r['speedup_vs_cuda_cores'], '7.2f')}x {f(err, '10.2e')}"
        )
        for variant, e in r["errors"].items():
            lines.append(f"      {variant}: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu_tc_bench", description=__doc__)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, required=True, help="results folder")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA GPU visible")
        return 77
    device = torch.device(args.device)
    preset = "quick" if args.quick or args.device == "cpu" else "full"
    dtypes, sizes, rows_list = SHAPES[args.device]
    copy_bw = timing.copy_bandwidth(device, reps=10, max_time=1.0)
    rows = [
        time_point(device, dt, n, r, preset)
        for dt, n, r in itertools.product(dtypes, sizes, rows_list)
    ]
    table = format_rows(rows, copy_bw / 1e9)
    print(table)
    doc = {
        "when": now_utc(),
        "device": machine._device_name(device),
        "torchmatgrad": torchmatgrad.__version__,
        "torch": torch.__version__,
        "preset": preset,
        "copy_GBps": copy_bw / 1e9,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(doc, args.out / "tc-bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
