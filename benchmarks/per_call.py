#!/usr/bin/env python
"""Per-call cost of a small layer: torch.nn.Linear against torchmatgrad.nn.Linear (same
parameters, same input), forward under no_grad and forward + backward, timed interleaved in one
process (rounds of many calls each, alternating; the fastest round per peer is reported, so a
preempted round does not count). Prints one line per case and, with --json, writes them.

    python benchmarks/per_call.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import torchmatgrad

CASES = [(64, 1), (256, 8), (1024, 1)]  # (n = m, rows)
ROUNDS, CALLS = 15, 400


def _round(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def forward_fn(module, x):
    """One forward call under no_grad."""

    def f():
        with torch.no_grad():
            module(x)

    return f


def step_fn(module, xg):
    """One forward + backward call, every .grad None before it."""

    def f():
        module.weight.grad = module.bias.grad = xg.grad = None
        module(xg).sum().backward()

    return f


def steady_heap() -> bool:
    """Ask glibc's malloc never to give the heap back (trim) and never to serve a block by its
    own mmap: a freed W-sized .grad is then reused instead of being faulted in afresh, a page at
    a time. Without this, on a 2-core Xeon guest, whether a fresh W-sized .grad faults depends
    on the heap's history, not on whose code runs: 1024², 1 row, forward + backward, 500 calls
    each in fresh processes, 149 of torch's calls faulted and 32 of ours, and another pairing
    went the other way. Applies to both peers alike. False where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    never = 1 << 30
    return bool(libc.mallopt(m_trim_threshold, never)) and bool(
        libc.mallopt(m_mmap_threshold, 1 << 25)  # glibc's upper limit for this threshold
    )


def write_json(path: str, rows: list[dict], **meta) -> None:
    """The rows, with torch's version, the thread count, the machine and the CPU kernels' ISA
    (and ``meta``), as JSON at ``path``."""
    meta = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        cpu_isa=torchmatgrad._C.cpu_isa,
        **meta,
    )
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    for n, b in CASES:
        torch.manual_seed(0)
        ref = torch.nn.Linear(n, n)
        ours = torchmatgrad.nn.Linear(n, n)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(b, n)
        xg = x.clone().requires_grad_()
        for case, make, arg in (
            ("forward, no_grad", forward_fn, x),
            ("forward + backward", step_fn, xg),
        ):
            fns = {"torch": make(ref, arg), "torchmatgrad": make(ours, arg)}
            for fn in fns.values():
                _round(fn, CALLS)  # warm-up
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(ROUNDS):
                for name, fn in fns.items():
                    best[name] = min(best[name], _round(fn, CALLS))
            row = dict(
                n=n,
                rows=b,
                case=case,
                torch_us=best["torch"] * 1e6,
                torchmatgrad_us=best["torchmatgrad"] * 1e6,
            )
            row["ratio"] = row["torchmatgrad_us"] / row["torch_us"]
            rows.append(row)
            print(
                f"nn.Linear {n}×{n}, {b} row(s), {case:18s}: torch {row['torch_us']:7.1f} µs, "
                f"torchmatgrad {row['torchmatgrad_us']:7.1f} µs, {row['ratio']:.2f}× torch's time"
            )
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
