#!/usr/bin/env python
"""Benchmark torchmatgrad.linear against torch: a thin wrapper around
:func:`torchmatgrad.cli.bench.main` (same options; ``--help`` lists them).

    python benchmarks/bench_linear.py --quick
    python benchmarks/bench_linear.py --device cuda --dtype bf16 fp32 --compile
"""

from __future__ import annotations

import os
import sys

import torch  # noqa: F401  (loads libtorch before torchmatgrad's extension)

try:
    from torchmatgrad.cli.bench import main
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from torchmatgrad.cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
