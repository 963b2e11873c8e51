"""Runs docs/curvature.md's Python blocks in order, in one namespace (so CI runs the docs)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "curvature.md"


def test_curvature_doc_blocks_run(capsys):
    pytest.importorskip("laplace")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    assert "loss" in capsys.readouterr().out
