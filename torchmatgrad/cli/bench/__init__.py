"""Benchmark torchmatgrad.linear against torch on the same inputs: ``python -m torchmatgrad bench``.

For every device, dtype, size n = m (weight n×m) and batch rows B it times three cases:

* ``fwd``: y = x·Wᵀ + b.
* ``fwdbwd``: forward, then backward with ``.grad`` None before (grad_input, grad_W, grad_b).
* ``fwdbwd_acc``: forward, then backward adding into an existing ``.grad`` (gradient
  accumulation); torchmatgrad runs twice: "unfused" (autograd's AccumulateGrad adds a temporary
  grad_W into ``.grad``) and "fused" (``grad_accumulation="fused"``: the backward kernel adds
  into ``.grad`` in place).

``--case dp`` runs on its own: a DP-SGD step of a GPT-2-shaped stack of linear layers, the
non-private step against torchmatgrad's one-backward clipping and Opacus's "hooks" and "ghost"
modes, time and peak memory (see :mod:`.dp`; options --B, --T, --blocks, --d). ``--case
curvature`` runs on its own too: torchmatgrad.curvature against curvlinops and BackPACK (K-FAC,
diagonal GGN, sum of squared per-sample gradients) on an MLP, a sequence model and a
transformer-shaped stack (``--model``), time and peak memory against a plain forward + backward,
results checked to agree (see :mod:`.curvature`).

Peers (same run, same inputs, timings interleaved call by call): torch eager (F.linear and its
autograd) and torchmatgrad; with ``--compile`` also torch.compile of F.linear and of
torchmatgrad.linear. Each row reports the median time, the achieved bandwidth (the byte floor's
bytes over the time), TFLOP/s, the byte floor (the bytes that must move, at the copy bandwidth
measured in the same run) and the speedup over torch eager. Results go to a table on stdout and
to JSON, CSV and (with matplotlib) PNG files under ``--out``.

Timing: warm-up calls, then the median of many single calls (CUDA events on CUDA,
``time.perf_counter`` on CPU); the weight is rotated among enough copies that they do not fit in
the last-level cache (2× its size), so each call reads W from memory. Warm-up and sampling of a
peer stop early after ``--max-time`` seconds (at least 3 samples), and a peer whose call is
predicted to take over ``--max-call-time`` is skipped; even so the full CPU grid takes long
(torch's 16-bit CPU GEMMs are slow at large B): pick subsets with --dtype/--n/--B/--case.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .. import info
from .curvature import MODELS as CURVATURE_MODELS
from .grid import (
    CASES,
    DTYPES,
    FULL_B,
    FULL_N,
    QUICK_B,
    QUICK_DTYPES,
    QUICK_N,
    ROW_KEYS,
    _error_row,
    floor_bytes,
    flops,
    run_point,
)
from .machine import _device_name, _loadavg, machine_info
from .report import _json_value, format_table, now_utc, output_stem, plot, write_csv, write_json
from .timing import DEFAULT_MAX_CALL_TIME, DEFAULT_TIMING, copy_bandwidth

__all__ = ["CASES", "DTYPES", "ROW_KEYS", "build_parser", "floor_bytes", "flops", "main"]

#: The cases that run on their own, with their own options (.dp, .dp_gpt2, .curvature).
ALONE = ("dp", "dp-gpt2", "curvature")
DP_WIDTH = 768  # --case dp's default --d

_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float64": "fp64",
    "double": "fp64",
}


# ---- command line --------------------------------------------------------------------------


def _dtype_name(s: str) -> str:
    s = _DTYPE_ALIASES.get(s.lower(), s.lower())
    if s not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {s!r}; choose from {', '.join(DTYPES)}")
    return s


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m torchmatgrad bench``."""
    p = argparse.ArgumentParser(
        prog="python -m torchmatgrad bench",
        description="Time torchmatgrad.linear against torch (forward, forward+backward, "
        "forward+backward with gradient accumulation).",
    )
    p.add_argument(
        "--device", nargs="+", help="cuda, cuda:1, cpu ... (default: all available, CUDA first)"
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        type=_dtype_name,
        help="fp32 bf16 fp16 fp64 (default: all; --quick: fp32 bf16)",
    )
    p.add_argument(
        "--n",
        nargs="+",
        type=int,
        help="sizes n = m (weight n×m); default 1024 4096 8192 (+16384 on CUDA); --quick: 256 1024",
    )
    p.add_argument(
        "--B",
        nargs="+",
        type=int,
        help="batch rows; default 1 2 4 8 16 64 256 4096; --quick: 1 16",
    )
    p.add_argument(
        "--case",
        nargs="+",
        choices=(*CASES, *ALONE),
        help="default: all but dp; dp (the DP-SGD step, see .dp), dp-gpt2 (the same for a "
        "Hugging Face GPT-2, .dp_gpt2) and curvature (K-FAC and diagonals against curvlinops "
        "and BackPACK, .curvature) run alone",
    )
    p.add_argument(
        "--model",
        nargs="+",
        choices=CURVATURE_MODELS,
        help="curvature: the models (default: all; mlp: 784-d-…-10, seq: per-position MLP, tf: "
        "transformer-shaped blocks)",
    )
    p.add_argument(
        "--T",
        nargs="+",
        type=int,
        help="dp: tokens per sample (default CPU 16 64); curvature: sequence length (seq 16, tf "
        "128)",
    )
    p.add_argument(
        "--blocks",
        type=int,
        help="dp: transformer blocks (default CPU 4, CUDA 12); curvature: hidden layers (2) or tf "
        "blocks (2)",
    )
    p.add_argument(
        "--d",
        type=int,
        help="dp: model width (default 768); curvature: hidden width (mlp 1024, seq 256, tf 768)",
    )
    p.add_argument("--quick", action="store_true", help="small grid, few reps (< 1 min on CPU)")
    p.add_argument("--compile", action="store_true", help="add torch.compile peers")
    p.add_argument(
        "--reps",
        type=int,
        help="timed calls per peer (default CPU/CUDA 30/100; --quick 40/30); dp: rounds of 3 "
        "steps per variant (default CPU/CUDA 5/8)",
    )
    p.add_argument(
        "--warmup", type=int, help="untimed calls per peer first (default 3/10; --quick 2/5)"
    )
    p.add_argument(
        "--max-time",
        type=float,
        help="seconds after which to stop sampling a peer (at least 3 calls; default 2/1; "
        "--quick 0.3/0.2)",
    )
    p.add_argument(
        "--max-call-time",
        type=float,
        help="skip a peer whose call is predicted (from its last row) to take longer "
        "(seconds; default 30 CPU, 10 CUDA; 0: never skip)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    p.add_argument("--out", default="bench_out", help="directory for JSON/CSV/PNG (bench_out)")
    p.add_argument("--name", help="file name stem (default bench-<date>-<time>)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p


def _devices(names: Sequence[str] | None) -> list[torch.device]:
    if not names:
        names = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    devices = []
    for s in names:
        d = torch.device(s)
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("CUDA requested but torch.cuda.is_available() is False")
            if d.index is None:
                d = torch.device("cuda", torch.cuda.current_device())
        elif d.type != "cpu":
            raise ValueError(f"unsupported device {s!r} (cpu or cuda)")
        devices.append(d)
    return devices


def _progress(total: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="pt", dynamic_ncols=True, leave=False)
        except ImportError:
            pass
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and write ``<out>/<name>.json``, ``.csv`` and
    ``-<device>.png``. Returns 0, or 2 on a bad request (e.g. CUDA asked for but absent)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.case and set(ALONE) & set(args.case):
        if len(args.case) > 1:
            parser.error(f"--case {' / '.join(ALONE)} runs on its own")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.case == ["curvature"]:
            from .curvature import main as alone_main
        else:
            from .dp import main as alone_main

            args.d = args.d or DP_WIDTH
        return alone_main(args)
    try:
        devices = _devices(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "full"
    dtypes = args.dtype or (list(QUICK_DTYPES) if args.quick else list(DTYPES))
    Bs = args.B or list(QUICK_B if args.quick else FULL_B)
    cases = args.case or list(CASES)

    grid = []
    for d in devices:
        ns = args.n or list(QUICK_N if args.quick else FULL_N[d.type])
        grid += [(d, dt, n, B) for dt in dtypes for n in ns for B in Bs]

    t_start = time.perf_counter()
    meta = machine_info(devices)
    copy_bw: dict[str, float] = {}
    timing: dict[str, tuple[int, int, float]] = {}
    max_call_time: dict[str, float] = {}
    for d in devices:
        reps, warmup, max_time = DEFAULT_TIMING[preset][d.type]
        reps = args.reps or reps
        warmup = args.warmup if args.warmup is not None else warmup
        max_time = args.max_time if args.max_time is not None else max_time
        timing[str(d)] = (reps, max(1, warmup), max_time)
        mct = (
            args.max_call_time if args.max_call_time is not None else DEFAULT_MAX_CALL_TIME[d.type]
        )
        max_call_time[str(d)] = mct if mct > 0 else math.inf
        copy_bw[str(d)] = copy_bandwidth(d, reps=max(reps, 10), max_time=max(1.0, max_time))
        print(f"{d}: {_device_name(d)}; copy bandwidth {copy_bw[str(d)] / 1e9:.1f} GB/s")
    print(f"load average {meta['loadavg_start']}, {torch.get_num_threads()} torch threads")

    bar = _progress(len(grid), not args.no_progress)
    rows: list[dict[str, Any]] = []
    rates: dict[tuple[str, ...], float] = {}
    try:
        for d, dt, n, B in grid:
            if bar is not None:
                bar.set_description(f"{d} {dt} n={n} B={B}")
            reps, warmup, max_time = timing[str(d)]
            try:
                rows += run_point(
                    d,
                    dt,
                    n,
                    B,
                    cases,
                    reps=reps,
                    warmup=warmup,
                    max_time=max_time,
                    copy_bw=copy_bw[str(d)],
                    compile_peers=args.compile,
                    seed=args.seed,
                    rates=rates,
                    max_call_time=max_call_time[str(d)],
                )
            except Exception as e:  # e.g. out of memory setting the point up
                rows.append(_error_row(d, dt, n, B, e))
                gc.collect()
                if d.type == "cuda":
                    torch.cuda.empty_cache()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    # Again at the end: a drift says the machine's load changed during the run.
    copy_bw_end = {str(d): copy_bandwidth(d, reps=10, max_time=0.5) / 1e9 for d in devices}
    rows = [{k: _json_value(v) for k, v in r.items()} for r in rows]  # CSV, table and plot too

    print(format_table(rows))
    meta["loadavg_end"] = _loadavg()
    print(
        "copy bandwidth at the end: "
        + ", ".join(f"{d} {bw:.1f} GB/s" for d, bw in copy_bw_end.items())
        + f"; load average {meta['loadavg_end']}"
    )
    out, stem = output_stem(args.out, args.name, "bench")
    doc = {
        "schema": "torchmatgrad-bench/1",
        "created": now_utc(),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "elapsed_s": round(elapsed, 2),
        "settings": {
            "preset": preset,
            "dtypes": dtypes,
            "B": Bs,
            "cases": cases,
            "compile": args.compile,
            "max_call_time_s": {
                d: (None if math.isinf(t) else t) for d, t in max_call_time.items()
            },
            "timing": {
                d: dict(zip(("reps", "warmup", "max_time_s"), t, strict=True))
                for d, t in timing.items()
            },
            "timer": {
                str(d): "torch.cuda.Event per call" if d.type == "cuda" else "perf_counter per call"
                for d in devices
            },
            "notes": "median of single calls, peers interleaved; gbps = floor_bytes / median; "
            "floor_ms = floor_bytes / copy bandwidth; speedup = torch eager / this peer",
        },
        "machine": meta,
        "copy_bandwidth_GBps": {d: bw / 1e9 for d, bw in copy_bw.items()},
        "copy_bandwidth_end_GBps": copy_bw_end,
        "dispatch": {
            p.name: {"max_rows": p.max_rows, "forward": p.forward, "backward": p.backward}
            for paths in info.DISPATCH.values()
            for p in paths
        },
        "rows": rows,
    }
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    write_json(doc, json_path)
    write_csv(rows, csv_path)
    written = [json_path, csv_path]
    if not args.no_plot:
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib not installed: skipping plot")
        else:
            for d in devices:
                png = out / f"{stem}-{d.type}{d.index or ''}.png"
                if plot(rows, str(d), png):
                    written.append(png)
    print(f"{len(rows)} rows in {elapsed:.1f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
