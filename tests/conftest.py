"""Fixtures shared by the tests: devices, dtypes, the check cells as parameters, and the rule
that every CUDA test carries ``pytest.mark.cuda`` (so ``pytest -m cuda`` selects exactly the
CUDA tests and ``-m "not cuda"`` the others). Inputs, tolerances and references come from
torchmatgrad.testing, the one source the tests and the tools share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchmatgrad.testing import DTYPES as _DTYPES_BY_NAME

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter from the repository root, with ``env`` added to
    this process's environment (settings read once at import); output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


NO_GPU = not torch.cuda.is_available()
#: The marks of everything that needs a GPU: selected by -m cuda, skipped with a reason here.
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(NO_GPU, reason="no CUDA GPU visible")]

DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]
DTYPES = list(_DTYPES_BY_NAME.values())


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    return request.param


def cell_params(checks) -> list:
    """Every (check, device, dtype) cell of a torchmatgrad.testing table that applies, as
    parameters; the CUDA cells carry CUDA_MARKS. (Cells that do not apply are not generated.)"""
    cells = []
    for check in checks:
        for dev in ("cpu", "cuda"):
            for dt in DTYPES:
                if check.applies(dev, dt) is None:
                    marks = CUDA_MARKS if dev == "cuda" else []
                    cells.append(
                        pytest.param(check, dev, dt, id=f"{check.name}-{dev}-{dt}", marks=marks)
                    )
    return cells


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def pytest_collection_modifyitems(config, items):
    """A test that runs on a CUDA device (a parameter "cuda", "cuda:N" or a CUDA
    torch.device) must be marked cuda; collection fails otherwise, naming the tests."""
    params = (getattr(item, "callspec", None) for item in items)
    unmarked = [
        item.nodeid
        for item, spec in zip(items, params, strict=True)
        if spec is not None
        and any(_is_cuda(v) for v in spec.params.values())
        and item.get_closest_marker("cuda") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests with a CUDA device parameter must carry pytest.mark.cuda (use "
            "conftest.DEVICES or CUDA_MARKS): " + ", ".join(unmarked[:10])
        )


@pytest.fixture(autouse=True)
def fuse_small_cpu_weights(monkeypatch):
    """The tests use small layers; on CPU a "fused" call with a weight under
    accumulate.FUSE_MIN_ELEMENTS_CPU runs unfused by default, so every test lowers it to 0 to
    exercise fusion (test_accumulate.py tests the threshold itself)."""
    from torchmatgrad import accumulate

    monkeypatch.setattr(accumulate, "FUSE_MIN_ELEMENTS_CPU", 0)
