"""Fixtures shared by the tests: devices and dtypes. Inputs, tolerances and references come
from torchmatgrad.testing, the one source the tests and the tools share."""

from __future__ import annotations

import pytest
import torch

from torchmatgrad.testing import DTYPES as _DTYPES_BY_NAME

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
    ),
]
DTYPES = list(_DTYPES_BY_NAME.values())


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    return request.param
