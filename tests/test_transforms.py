"""The transform conformance matrix (`python -m torchmatgrad check --transforms`), cell by cell.

Each applicable (transform, device, dtype) cell is one test; cells that do not apply (e.g.
gradcheck in bfloat16) are not generated. CUDA cells are marked cuda and skipped only when no GPU
is visible.
"""

from __future__ import annotations

import pytest
from conftest import cell_params

from torchmatgrad.cli.check import main
from torchmatgrad.testing import TRANSFORMS

CELLS = cell_params(TRANSFORMS)


@pytest.mark.parametrize("check,device,dtype", CELLS)
def test_transform_cell(check, device, dtype):
    check.run(device, dtype)


def test_matrix_prints_and_passes(capsys):
    assert main(["--transforms", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for check in TRANSFORMS:
        assert check.name in out
    assert "FAIL" not in out
