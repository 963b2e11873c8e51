"""`python -m torchmatgrad check`: every op on every available device against autograd.

Two tables:

* the op check (default): for each device and dtype, the forward, the backward op and the
  Jacobians with respect to W, x and b against ``torch.autograd.functional.jacobian`` of a
  float64 reference, plus ``gradcheck`` in float64;
* the transform conformance matrix (``--transforms``): rows are PyTorch transforms (double
  backward, forward-mode AD, vmap, jacrev/jacfwd, autocast, torch.compile, ...), columns are
  device × dtype, cells are pass / FAIL / n/a with the reason.

This command only runs and prints the cells; they live in :mod:`torchmatgrad.testing`
(OP_CHECKS, TRANSFORMS), where tests/test_linear.py and tests/test_transforms.py run them too, so
the printed matrix and the test suite cannot disagree.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..testing import DTYPES, OP_CHECKS, SHORT_NAMES, TRANSFORMS, devices, run_table


def format_table(checks, rows, devs, dtypes) -> str:
    cols = [f"{d} {SHORT_NAMES[t]}" for d in devs for t in dtypes]
    width = max(len(c.name) for c in checks)
    lines = [" | ".join([" " * width] + cols)]
    lines.append("-" * len(lines[0]))
    for check, cells in zip(checks, rows, strict=True):
        lines.append(
            " | ".join(
                [check.name.ljust(width)]
                + [c.ljust(len(h)) for c, h in zip(cells, cols, strict=True)]
            )
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m torchmatgrad check``."""
    parser = argparse.ArgumentParser(
        prog="python -m torchmatgrad check",
        description="Check every torchmatgrad op on every available device against autograd.",
    )
    parser.add_argument(
        "--transforms", action="store_true", help="print the transform conformance matrix"
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        action="append",
        help="check this device only (repeatable; default: every available device)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    devs = args.device or devices()
    if "cuda" in devs and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    dtypes = list(DTYPES.values())
    checks = TRANSFORMS if args.transforms else OP_CHECKS
    title = "transform conformance" if args.transforms else "op checks"
    print(f"torchmatgrad {title} (torch {torch.__version__}; devices: {', '.join(devs)})")
    rows, failures, notes = run_table(checks, devs, dtypes)
    print(format_table(checks, rows, devs, dtypes))
    if notes:
        print("\nn/a:")
        for name, reason in notes.items():
            print(f"  {name}: {reason}")
    if failures:
        print(f"\n{len(failures)} failure(s):")
        for f in failures:
            print(f"  {f}")
        return 1
    print("\nall checks passed")
    return 0
