"""Measure this machine's path table: ``python -m torchmatgrad tune``.

For each op (forward, backward, accumulate), dtype and a few weight sizes, it times the op on
the hand-written kernel and on the vendor route (ATen mm/addmm) at growing row counts,
interleaved call by call on the same inputs (weights rotated past the last-level cache), and
takes the vendor route only where it was faster (medians of single calls: the typical cost,
allocator and page-fault effects included, which a minimum would hide). Row counts stop early
once the vendor route has won clearly twice in a row from 128 rows on (compute-bound from
there on; below, MKL's speed is not monotonic in the rows: at 512² it won at 4 and 8 rows and
lost at 16 and 32 by 1.5-2.3×). Every
(size bucket, rows bucket) then takes the decision of the nearest measured point, so the
table covers shapes that were not measured (rectangular layers, other widths). The result is
written to the cache the policy reads at import (``torchmatgrad.policy.cache_file()``) and
installed at once; ``info`` prints it with the measured times behind each choice.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import torchmatgrad
from torchmatgrad import policy

from .bench.machine import _cache_bytes, _device_name, _git_commit
from .bench.timing import _sync

#: (sizes n = m, rows, dtypes) by preset and device type.
GRIDS = {
    "full": {
        "cpu": (
            (256, 512, 1024, 2048, 4096),
            (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
            ("float32", "bfloat16"),
        ),
        "cuda": (
            (1024, 4096, 8192),
            (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
            ("float32", "bfloat16"),
        ),
    },
    "quick": {
        "cpu": ((256, 1024), (1, 4, 16, 64), ("float32",)),
        "cuda": ((1024, 4096), (1, 4, 16, 64), ("float32", "bfloat16")),
    },
}
#: After two consecutive rows, of at least STOP_FROM_ROWS, where the vendor route wins by this
#: much, larger rows are not measured (the vendor route is kept for them).
CLEAR_WIN = 0.15
STOP_FROM_ROWS = 128
#: Two times within this fraction of each other are a tie for smoothing (_smoothed).
NOISE = 0.1
MAX_COPIES = 64
_ops = torch.ops.torchmatgrad


def _inputs(op: str, device: torch.device, dtype: torch.dtype, n: int, rows: int, seed: int):
    """Weight copies (rotated past the cache), and the call's other arguments."""
    g = torch.Generator(device=device).manual_seed(seed)
    m = n
    elem = torch.empty((), dtype=dtype).element_size()
    copies = max(1, min(MAX_COPIES, math.ceil(2 * _cache_bytes(device) / (n * m * elem))))
    w0 = (torch.randn(n, m, device=device, generator=g) / math.sqrt(m)).to(dtype)
    ws = [w0.clone() for _ in range(copies)]
    x = torch.randn(rows, m, device=device, generator=g).to(dtype)
    go = torch.randn(rows, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, device=device, generator=g).to(dtype)
    bufs = (
        [torch.zeros(n, m, device=device, dtype=dtype) for _ in range(copies)]
        if op == "accumulate"
        else []
    )

    def call(i: int):
        w = ws[i % copies]
        if op == "forward":
            return _ops.linear(x, w, b)
        if op == "backward":
            return _ops.linear_backward(go, x, w, [True, True, True])
        return _ops.linear_backward_accumulate_(go, x, w, bufs[i % copies], [True, True])

    return call


def time_point(
    op: str, device: torch.device, dtype: torch.dtype, n: int, rows: int, reps: int, max_time: float
) -> tuple[float, float]:
    """(kernel ms, vendor ms): medians of single calls, the two paths interleaved."""
    call = _inputs(op, device, dtype, n, rows, seed=n + rows)
    counter = itertools.count()
    samples: dict[int, list[float]] = {1: [], 2: []}
    cuda = device.type == "cuda"
    try:
        for path in (1, 2):  # warm-up, one call each
            _ops._set_path_override(path)
            call(next(counter))
        _sync(device)
        start = time.perf_counter()
        for r in range(reps):
            for path in (1, 2):
                _ops._set_path_override(path)
                i = next(counter)
                if cuda:
                    e0, e1 = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    e0.record()
                    call(i)
                    e1.record()
                    e1.synchronize()
                    samples[path].append(e0.elapsed_time(e1))
                else:
                    t0 = time.perf_counter()
                    call(i)
                    samples[path].append((time.perf_counter() - t0) * 1e3)
            if r >= 2 and time.perf_counter() - start > max_time:
                break
    finally:
        policy._set_forced(policy.current_path())  # restore the process's override
    return statistics.median(samples[1]), statistics.median(samples[2])


def measure(
    device: torch.device,
    sizes: tuple[int, ...],
    rows_list: tuple[int, ...],
    dtypes: tuple[str, ...],
    reps: int,
    max_time: float,
    progress=None,
) -> list[dict]:
    out = []
    for dt, op, n in itertools.product(dtypes, policy.OPS, sizes):
        dtype = getattr(torch, dt)
        clear = 0
        for rows in rows_list:
            point = dict(op=op, dtype=dt, n=n, m=n, rows=rows)
            if clear >= 2:
                out.append(dict(point, kernel_ms=None, vendor_ms=None, inferred="vendor"))
                continue
            k, v = time_point(op, device, dtype, n, rows, reps, max_time)
            out.append(dict(point, kernel_ms=round(k, 5), vendor_ms=round(v, 5)))
            clear = clear + 1 if rows >= STOP_FROM_ROWS and v < (1 - CLEAR_WIN) * k else 0
            if progress:
                progress(out[-1])
    return out


def _smoothed(measurements: list[dict]) -> list[str]:
    """The choice at each point, with a lone choice between two opposite ones along the rows of
    the same (op, dtype, size) flipped to its neighbours' (a median of three) when its own two
    times are within NOISE of each other: near a crossover the two paths are within noise of
    each other, and the table should not alternate. A clear loss stays: the AVX-512 kernel at 8
    rows (half-filled 16-lane vectors) lost 0.70× at 512² between wins at 4 and 16 rows."""
    choices = [policy.choice(p) for p in measurements]
    series: dict[tuple, list[int]] = {}
    for i, p in enumerate(measurements):
        series.setdefault((p["op"], p["dtype"], p["n"], p["m"]), []).append(i)
    out = list(choices)
    for idx in series.values():
        idx.sort(key=lambda i: measurements[i]["rows"])
        for a, b, c in zip(idx, idx[1:], idx[2:], strict=False):
            p = measurements[b]
            close = p.get("inferred") is None and (
                abs(p["vendor_ms"] - p["kernel_ms"]) <= NOISE * min(p["vendor_ms"], p["kernel_ms"])
            )
            if close and choices[a] == choices[c] != choices[b]:
                out[b] = choices[a]
    return out


def derive_table(
    device_kind: str, source: str, measurements: list[dict], base: policy.PathTable | None = None
) -> policy.PathTable:
    """The full table from measured points: every (op, dtype, size bucket, rows bucket) takes
    the (smoothed) choice of the nearest measured point of that op and dtype in (size bucket,
    rows bucket) space (ties go to the kernel); above the few-rows regime (compute-bound, where
    a smaller layer favours the vendor GEMM) then the vendor route wherever the size bucket
    below, when it was measured, chose it: a size bucket holds every weight from its lower edge
    (the bucket below's measured size) to its upper one (its own), so the kernel keeps it only
    if it won at both ends. Measured at the upper edge alone, the 1024² bucket took the kernel
    at 64 rows (a tie at 1024²) for 512²-768² layers too, where MKL was 1.1-1.7× faster (Xeon).
    A dtype not measured copies its measured sibling (float64 from float32, float16 from
    bfloat16), else keeps ``base`` (the measured default or generic rule for this kind of
    device)."""
    few = policy.rows_bucket(int(torchmatgrad._C.few_rows))
    by_key: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for p, c in zip(measurements, _smoothed(measurements), strict=True):
        sb, rb = policy.size_bucket(p["n"], p["m"]), policy.rows_bucket(p["rows"])
        by_key.setdefault((p["op"], p["dtype"]), []).append((sb, rb, c))
    measured = {}
    for key, points in by_key.items():
        nearest = [
            [
                min(points, key=lambda q: ((q[0] - s) ** 2 + (q[1] - r) ** 2, q[2] != "k"))[2]
                for r in range(policy.N_ROWS)
            ]
            for s in range(policy.N_SIZES)
        ]
        sizes = {q[0] for q in points}
        # Above the few rows, the vendor route also where the size bucket below chose it.
        measured[key] = [
            "".join(
                "v"
                if nearest[s][r] == "v" or (r > few and s - 1 in sizes and nearest[s - 1][r] == "v")
                else "k"
                for r in range(policy.N_ROWS)
            )
            for s in range(policy.N_SIZES)
        ]
    base = base or policy.DEFAULTS.get(device_kind) or policy.generic_table(device_kind)
    paths = dict(base.paths)
    sibling = {"float64": "float32", "float16": "bfloat16"}
    for op in policy.OPS:
        for dt in policy.DTYPES:
            got = measured.get((op, dt)) or measured.get((op, sibling.get(dt, "")))
            if got is not None:
                paths[(op, dt)] = got
    return policy.PathTable(device_kind, source, paths, measurements).validate()


def points_from_bench(docs: list[dict]) -> list[dict]:
    """Measured points from recorded `bench` runs: the hand-written kernel's time (a
    torchmatgrad row on a kernel path) against the vendor route's (torch's own row, the same
    mm/addmm). Forward rows give "forward" points; a whole step's rows stand in for the backward
    ("fwdbwd": "backward"; "fwdbwd_acc", fused: "accumulate")."""
    dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
    ops = {"fwd": "forward", "fwdbwd": "backward", "fwdbwd_acc": "accumulate"}
    torch_ms, kernel_ms = {}, {}
    for doc in docs:
        for r in doc["rows"]:
            if not r.get("median_ms") or r["case"] not in ops:
                continue
            key = (r["dtype"], r["n"], r["m"], r["B"], r["case"])
            if r["peer"] == "torch":
                torch_ms[key] = r["median_ms"]
            elif r["peer"] == "torchmatgrad" and "vendor" not in r["path"]:
                fused = r["variant"].startswith("fused")
                if r["case"] != "fwdbwd_acc" or fused:
                    kernel_ms[key] = r["median_ms"]
    points = []
    for key, k in sorted(kernel_ms.items()):
        if key in torch_ms:
            dt, n, m, rows, case = key
            points.append(
                dict(
                    op=ops[case],
                    dtype=dtypes[dt],
                    n=n,
                    m=m,
                    rows=rows,
                    kernel_ms=k,
                    vendor_ms=torch_ms[key],
                )
            )
    return points


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchmatgrad tune",
        description="Measure which path (hand-written kernel or vendor mm/addmm) is faster on "
        "this machine, write the policy cache and install it.",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="a few points only (seconds)")
    p.add_argument("--sizes", nargs="+", type=int, help="weight sizes n = m to measure")
    p.add_argument("--rows", nargs="+", type=int, help="row counts to measure")
    p.add_argument("--dtype", nargs="+", choices=policy.DTYPES, help="dtypes to measure")
    p.add_argument("--reps", type=int, default=7, help="timed calls per path and point (7)")
    p.add_argument("--max-time", type=float, default=0.5, help="seconds per point, at most")
    p.add_argument("--out", help="write the table here instead of the policy cache")
    p.add_argument("--no-install", action="store_true", help="do not install the result")
    p.add_argument(
        "--from-bench",
        nargs="+",
        metavar="JSON",
        help="derive the table from recorded bench runs instead of measuring "
        "(with --kind and --source; writes --out)",
    )
    p.add_argument("--kind", help="with --from-bench: the device kind the runs were made on")
    p.add_argument("--source", help="with --from-bench: where and when the runs were made")
    return p


def _from_bench(args) -> int:
    if not (args.kind and args.source and args.out):
        print("error: --from-bench needs --kind, --source and --out", file=sys.stderr)
        return 2
    docs = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.from_bench]
    points = points_from_bench(docs)
    if not points:
        print("error: no (torchmatgrad kernel, torch) row pairs in those runs", file=sys.stderr)
        return 2
    table = derive_table(args.kind, args.source, points, base=policy.generic_table(args.kind))
    Path(args.out).write_text(json.dumps(table.to_json(), indent=1) + "\n", encoding="utf-8")
    from .info import policy_text

    print(policy_text(table))
    print(f"{len(points)} points; wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_bench:
        return _from_bench(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"error: unsupported device {args.device!r} (cpu or cuda)", file=sys.stderr)
        return 2
    sizes, rows, dtypes = GRIDS["quick" if args.quick else "full"][device.type]
    sizes, rows, dtypes = args.sizes or sizes, args.rows or rows, tuple(args.dtype or dtypes)
    kind = policy.device_kind(device)
    print(
        f"tuning {kind} ({_device_name(device)}, {torch.get_num_threads()} threads): "
        f"sizes {list(sizes)}, rows {list(rows)}, {', '.join(dtypes)}"
    )
    t0 = time.perf_counter()

    def progress(p: dict) -> None:
        ratio = p["vendor_ms"] / p["kernel_ms"]
        print(
            f"  {p['op']:10s} {p['dtype']:8s} n={p['n']:<5d} rows={p['rows']:<5d} "
            f"kernel {p['kernel_ms']:9.4f} ms  vendor {p['vendor_ms']:9.4f} ms  "
            f"-> {'vendor' if policy.choice(p) == 'v' else 'kernel'} "
            f"(kernel/vendor speed {ratio:.2f})",
            flush=True,
        )

    points = measure(device, tuple(sizes), tuple(rows), dtypes, args.reps, args.max_time, progress)
    commit, dirty = _git_commit()
    build = f" ({commit}{'+' if dirty else ''})" if commit else ""
    source = (
        f"tune on {_device_name(device)}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, torchmatgrad {torchmatgrad.__version__}{build}, "
        f"{datetime.date.today().isoformat()}"
    )
    table = derive_table(kind, source, points)
    path = Path(args.out) if args.out else policy.cache_file(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table.to_json(), indent=1) + "\n", encoding="utf-8")
    if not args.no_install and not args.out:
        policy.install(table, device.type)
    print(f"{len(points)} points in {time.perf_counter() - t0:.1f} s; wrote {path}")
    from .info import policy_text

    print(policy_text(table))
    return 0
