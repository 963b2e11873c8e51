"""Every feature on both paths: the op, autograd, transform, Jacobian, module, accumulation and
distributed (DDP, FSDP2, tensor-parallel) tests run again with the process forced onto the
hand-written kernels (TORCHMATGRAD_PATH=kernel) and onto the vendor routes
(TORCHMATGRAD_PATH=vendor). The default run (the policy's mix) is the rest of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
FILES = [
    "test_linear.py",
    "test_accumulate.py",
    "test_transforms.py",
    "test_jacobian.py",
    "test_nn.py",
    "test_errors.py",
    "test_distributed.py",
    "test_tensor_parallel.py",
]


@pytest.mark.parametrize("path", ["kernel", "vendor"])
def test_suite_on_one_path(path):
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not cuda"]
    args += [str(TESTS / f) for f in FILES]
    done = subprocess.run(
        args,
        env={**os.environ, "TORCHMATGRAD_PATH": path},
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=TESTS.parent,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
