"""The benchmark of the GPU check: the issue's target shapes, torch eager beside torchmatgrad.

    python -m scripts.gpu_bench --device cuda --out DIR [--quick] [--commit SHA]

Runs ``python -m torchmatgrad bench`` once per group of target shapes, all in one process (one
torch import, one CUDA context), then the step with a float32 ``main_grad`` (which the bench
has no case for), and writes

* ``DIR/bench.json``: every run's full JSON document (rows with peer, variant and path);
* ``DIR/summary.txt``: the short table and the targets with their verdicts
  (scripts/gpu_summary.py, which can rebuild it from bench.json alone).

Per row the bench times torch eager, torchmatgrad on its default path and, where the default is
the vendor route, torchmatgrad forced onto the hand-written kernel (variant "kernel"); the
accumulated step also runs unfused and fused. ``--device cpu`` runs the same code on small
shapes (n = 256) with few repetitions: the numbers mean nothing, the plumbing is what it tries.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import torchmatgrad
from scripts import gpu_summary
from torchmatgrad.cli import bench, info
from torchmatgrad.cli.bench import grid, machine, timing
from torchmatgrad.cli.bench.report import format_table

#: (name, dtype, n, B list, cases) per device type. CUDA: the shapes of the issue's targets
#: (forward fp32 8192² B=1, 16; bf16 8192² B=1; bf16 16384² B=16; fwd+bwd fp32 8192² B=1, 16;
#: bf16 16384² B=1; accumulated steps fp32 8192² B=1, 16; fwd+bwd fp32 1024² B=1), and fp32
#: 8192² B=4096 (the hand-written tiled GEMM against cuBLAS at full size).
GROUPS: dict[str, list[tuple[str, str, int, list[int], list[str]]]] = {
    "cuda": [
        ("a_fp32_8192", "fp32", 8192, [1, 16], ["fwd", "fwdbwd", "fwdbwd_acc"]),
        ("b_bf16_8192", "bf16", 8192, [1], ["fwd"]),
        ("c_bf16_16384", "bf16", 16384, [1, 16], ["fwd", "fwdbwd", "fwdbwd_acc"]),
        ("d_fp32_1024", "fp32", 1024, [1], ["fwdbwd"]),
        ("e_fp32_b4096", "fp32", 8192, [4096], ["fwd"]),
    ],
    "cpu": [
        ("a_fp32_256", "fp32", 256, [1, 16], ["fwd", "fwdbwd", "fwdbwd_acc"]),
        ("b_bf16_256", "bf16", 256, [1, 32], ["fwd"]),
    ],
}
#: (dtype, n, B) of the main_grad step, by device type.
MAIN_GRAD = {"cuda": [("bf16", 16384, 1)], "cpu": [("bf16", 256, 1)]}
#: (reps, warmup, max seconds per peer and point) by device type and preset.
TIMING = {
    ("cuda", "full"): (100, 10, 1.0),
    ("cuda", "quick"): (30, 5, 0.3),
    ("cpu", "full"): (5, 1, 0.05),
    ("cpu", "quick"): (3, 1, 0.02),
}
MAX_COPIES = 64


def main_grad_floor_bytes(n: int, m: int, B: int, elem: int) -> int:
    """The step's bytes with a float32 main_grad: the fwd+bwd bytes of the bench without the
    grad_W write, plus reading and writing main_grad (4 bytes an element)."""
    return grid.floor_bytes("fwdbwd", n, m, B, elem) - elem * n * m + 2 * 4 * n * m


def time_main_grad(
    device: torch.device,
    dtype_name: str,
    n: int,
    B: int,
    *,
    reps: int,
    warmup: int,
    max_time: float,
    copy_bw: float,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One step (forward, backward, weight gradient added into a float32 ``weight.main_grad``)
    for torch eager (bf16 ``.grad`` by autograd, then ``main_grad.add_(grad)``, as a training
    loop without fusion does) and torchmatgrad (``grad_accumulation="main_grad"``: the backward
    kernel adds into main_grad). Rows in the bench's format, variant "main_grad"."""
    dtype = grid.DTYPES[dtype_name]
    m = n
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(seed)
    w0 = (torch.randn(n, m, device=device, generator=gen) / math.sqrt(m)).to(dtype)
    b0 = torch.randn(n, device=device, generator=gen).to(dtype)
    gy = (torch.randn(B, n, device=device, generator=gen) * 0.1).to(dtype)
    x = torch.randn(B, m, device=device, generator=gen).to(dtype).requires_grad_()
    per_copy = n * m * (elem + 4)
    k = max(1, min(MAX_COPIES, math.ceil(2 * machine._cache_bytes(device) / per_copy)))
    ws = [w0.clone().requires_grad_() for _ in range(k)]
    bs = [b0.clone().requires_grad_() for _ in range(k)]
    for w in ws:
        w.main_grad = torch.zeros(n, m, device=device, dtype=torch.float32)

    def torch_step(i: int) -> torch.Tensor:
        w, b = ws[i % k], bs[i % k]
        y = F.linear(x, w, b)
        y.backward(gy)
        w.main_grad.add_(w.grad)
        return y

    def tmg_step(i: int) -> torch.Tensor:
        y = torchmatgrad.linear(x, ws[i % k], bs[i % k], grad_accumulation="main_grad")
        y.backward(gy)
        return y

    def pre(i: int) -> None:
        ws[i % k].grad = None
        bs[i % k].grad = None
        x.grad = None

    path = info.dispatch_path(device.type, B, dtype, n, m, "forward")
    acc_path = info.dispatch_path(device.type, B, dtype, n, m, "accumulate")
    peers = [
        timing._Peer("torch", "main_grad", "aten", pre, torch_step),
        timing._Peer(
            "torchmatgrad", "main_grad", "+".join(dict.fromkeys([path, acc_path])), pre, tmg_step
        ),
    ]
    counter = itertools.count()
    timing._warm(peers, device, warmup, max_time, counter)
    timing._sample(peers, device, reps, max_time, counter)
    fb = main_grad_floor_bytes(n, m, B, elem)
    fl = grid.flops("fwdbwd_acc", n, m, B)
    floor_s = fb / copy_bw
    medians = {p.name: statistics.median(p.samples) if p.samples else None for p in peers}
    rows = []
    for p in peers:
        med = medians[p.name]
        q = statistics.quantiles(p.samples, n=4) if len(p.samples) >= 2 else None
        row = dict.fromkeys(grid.ROW_KEYS)
        row.update(
            device=str(device),
            device_name=machine._device_name(device),
            dtype=dtype_name,
            n=n,
            m=m,
            B=B,
            case="fwdbwd_acc",
            peer=p.name,
            variant=p.variant,
            path=p.path,
            w_copies=k,
            reps=len(p.samples),
            median_ms=med * 1e3 if med else None,
            q1_ms=q[0] * 1e3 if q else None,
            q3_ms=q[2] * 1e3 if q else None,
            min_ms=min(p.samples) * 1e3 if p.samples else None,
            gbps=fb / med / 1e9 if med else None,
            tflops=fl / med / 1e12 if med else None,
            floor_bytes=fb,
            floor_ms=floor_s * 1e3,
            floor_frac=floor_s / med if med else None,
            speedup_vs_torch=medians["torch"] / med if med and medians["torch"] else None,
            rel_err=p.rel_err,
            error=p.error,
        )
        rows.append(row)
    return rows


def run_main_grad(device: torch.device, preset: str, commit: str | None) -> dict[str, Any]:
    """The main_grad rows as one document in the bench's JSON schema."""
    reps, warmup, max_time = TIMING[(device.type, preset)]
    copy_bw = timing.copy_bandwidth(device, reps=max(reps, 10), max_time=max(1.0, max_time))
    t0 = time.perf_counter()
    rows = []
    for dtype_name, n, B in MAIN_GRAD[device.type]:
        try:
            rows += time_main_grad(
                device,
                dtype_name,
                n,
                B,
                reps=reps,
                warmup=warmup,
                max_time=max_time,
                copy_bw=copy_bw,
            )
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: a row says so
            rows.append(grid._error_row(device, dtype_name, n, B, e))
    meta = machine.machine_info([device])
    if commit and not meta.get("git_commit"):
        meta["git_commit"] = commit
    print(format_table(rows), flush=True)
    return {
        "schema": "torchmatgrad-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": ["scripts/gpu_bench.py main_grad"],
        "elapsed_s": round(time.perf_counter() - t0, 2),
        "settings": {"timing": {str(device): {"reps": reps, "warmup": warmup}}},
        "machine": meta,
        "copy_bandwidth_GBps": {str(device): copy_bw / 1e9},
        "rows": rows,
    }


def run(device: torch.device, out: Path, preset: str, commit: str | None) -> int:
    reps, warmup, max_time = TIMING[(device.type, preset)]
    docs = []
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype, n, Bs, cases in GROUPS[device.type]:
            print(f"== bench {name}: {dtype} n={n} B={Bs} {' '.join(cases)}", flush=True)
            argv = ["--device", str(device), "--dtype", dtype, "--n", str(n)]
            argv += ["--B", *map(str, Bs), "--case", *cases]
            argv += ["--reps", str(reps), "--warmup", str(warmup), "--max-time", str(max_time)]
            argv += ["--out", tmp, "--name", name, "--no-plot", "--no-progress"]
            rc = bench.main(argv)
            path = Path(tmp) / f"{name}.json"
            if rc != 0 or not path.exists():
                print(f"bench {name} failed (exit {rc})", flush=True)
                failed += 1
                continue
            docs.append(json.loads(path.read_text(encoding="utf-8")))
    print("== main_grad step", flush=True)
    docs.append(run_main_grad(device, preset, commit))
    for d in docs:
        if commit and not d["machine"].get("git_commit"):
            d["machine"]["git_commit"] = commit
    out.mkdir(parents=True, exist_ok=True)
    merged = {"schema": "torchmatgrad-gpu-bench/1", "runs": docs}
    (out / "bench.json").write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    text = gpu_summary.summarize(docs)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--out", required=True, help="folder for bench.json and summary.txt")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--commit", help="the commit measured (the device machine has no .git)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        print(f"gpu_bench: unsupported device {args.device!r}", file=sys.stderr)
        return 2
    preset = "quick" if args.quick else "full"
    return run(device, Path(args.out), preset, args.commit)


if __name__ == "__main__":
    raise SystemExit(main())
