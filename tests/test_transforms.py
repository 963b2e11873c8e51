"""The transform conformance matrix (`python -m torchmatgrad check --transforms`), cell by cell.

Each applicable (transform, device, dtype) cell is one test; cells that do not apply (e.g.
gradcheck in bfloat16) are not generated. CUDA cells are skipped only when no GPU is visible.
"""

from __future__ import annotations

import pytest
import torch

from torchmatgrad.cli.check import main
from torchmatgrad.testing import DTYPES, TRANSFORMS

CELLS = []
for check in TRANSFORMS:
    for dev in ("cpu", "cuda"):
        for dt in DTYPES.values():
            if check.applies(dev, dt) is None:
                marks = []
                if dev == "cuda":
                    marks.append(
                        pytest.mark.skipif(
                            not torch.cuda.is_available(), reason="no CUDA GPU visible"
                        )
                    )
                CELLS.append(
                    pytest.param(check, dev, dt, id=f"{check.name}-{dev}-{dt}", marks=marks)
                )


@pytest.mark.parametrize("check,device,dtype", CELLS)
def test_transform_cell(check, device, dtype):
    check.run(device, dtype)


def test_matrix_prints_and_passes(capsys):
    assert main(["--transforms", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for check in TRANSFORMS:
        assert check.name in out
    assert "FAIL" not in out
