#!/usr/bin/env python
"""Layers of real models, off the square grid of ``bench``: torch.nn.Linear against
torchmatgrad.nn.Linear (same parameters, same input) on the default path, forward under no_grad
and forward + backward (``.grad`` None each call), rows of a vector up to a training batch.
Timed interleaved in one process: rounds alternate the two peers, the median round per peer
counts. Checks that the path policy generalises beyond the shapes it was measured on.

    python benchmarks/shapes.py [--json FILE] [--quick] [--steady-heap]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from per_call import (  # benchmarks/ (the script's folder)
    _round,
    forward_fn,
    steady_heap,
    step_fn,
    write_json,
)

import torchmatgrad
from torchmatgrad import policy

#: (name, out_features, in_features): GPT-2 small (d = 768), Llama-7B (4096, MLP 11008), a
#: small square layer between the measured sizes, and narrow/odd widths.
SHAPES = [
    ("gpt2 qkv", 2304, 768),
    ("gpt2 attn out", 768, 768),
    ("small mlp", 512, 512),
    ("gpt2 mlp up", 3072, 768),
    ("gpt2 mlp down", 768, 3072),
    ("llama mlp up", 11008, 4096),
    ("llama mlp down", 4096, 11008),
    ("odd", 1000, 333),
    ("narrow", 16, 4096),
]
ROWS = [1, 8, 64, 512]
ROUNDS = 7


def _calls(fn, budget_s: float = 0.05) -> int:
    t = _round(fn, 1)
    return max(1, min(200, int(budget_s / max(t, 1e-7))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="two shapes, two row counts")
    parser.add_argument(
        "--steady-heap",
        action="store_true",
        help="glibc keeps freed memory (per_call.steady_heap): fresh .grad buffers do not fault",
    )
    args = parser.parse_args()
    heap = "steady" if args.steady_heap and steady_heap() else "default"
    shapes = SHAPES[:2] if args.quick else SHAPES
    row_counts = ROWS[:2] if args.quick else ROWS
    rows = []
    for name, n, m in shapes:
        torch.manual_seed(0)
        ref = torch.nn.Linear(m, n)
        ours = torchmatgrad.nn.Linear(m, n)
        ours.load_state_dict(ref.state_dict())
        for b in row_counts:
            x = torch.randn(b, m)
            xg = x.clone().requires_grad_()
            for case, make, arg, ops_ in (
                ("fwd", forward_fn, x, ("forward",)),
                ("fwdbwd", step_fn, xg, ("forward", "backward")),
            ):
                fns = {"torch": make(ref, arg), "torchmatgrad": make(ours, arg)}
                calls = _calls(fns["torch"])
                for fn in fns.values():
                    _round(fn, calls)  # warm-up
                times = {k: [] for k in fns}
                for _ in range(ROUNDS):
                    for k, fn in fns.items():
                        times[k].append(_round(fn, calls))
                med = {k: statistics.median(v) for k, v in times.items()}
                path = "/".join(policy.path(o, torch.float32, n, m, b) for o in ops_)
                row = dict(
                    shape=name,
                    n=n,
                    m=m,
                    rows=b,
                    case=case,
                    path=path,
                    torch_ms=med["torch"] * 1e3,
                    torchmatgrad_ms=med["torchmatgrad"] * 1e3,
                    speedup=med["torch"] / med["torchmatgrad"],
                )
                rows.append(row)
                print(
                    f"{name:15s} {n:5d}×{m:<5d} B={b:<4d} {case:6s} {path:15s} "
                    f"torch {row['torch_ms']:9.4f} ms  ours {row['torchmatgrad_ms']:9.4f} ms  "
                    f"{row['speedup']:.2f}×",
                    flush=True,
                )
    worst = min(rows, key=lambda r: r["speedup"])
    print(f"lowest: {worst['shape']} B={worst['rows']} {worst['case']} {worst['speedup']:.2f}×")
    if args.json:
        write_json(args.json, rows, table=policy.installed()["cpu"].source, heap=heap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
