"""The per-sample tools: python -m torchmatgrad explain --per-sample, and bench's DP case."""

from __future__ import annotations

import pytest
import torch

import torchmatgrad
from torchmatgrad.testing import rand


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--dtype", "float32", "--n", "5", "--m", "7", "--B", "4", "--T", "3", "--seed", "1"],
        ["--T", "1"],
    ],
    ids=["default", "float32", "T=1"],
)
def test_explain_per_sample(argv, capsys):
    from torchmatgrad.cli import explain

    assert explain.main(["--per-sample", *argv]) == 0
    out = capsys.readouterr().out
    assert "⟨G_i·G_iᵀ, X_i·X_iᵀ⟩_F" in out and "MISMATCH" not in out


def test_bench_dp_runs(tmp_path, capsys):
    import json

    from torchmatgrad.cli import bench

    argv = ["--case", "dp", "--device", "cpu", "--d", "32", "--blocks", "1", "--B", "3"]
    argv += ["--T", "5", "--reps", "2", "--warmup", "1", "--out", str(tmp_path), "--name", "dp"]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "dp.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) <= set(bench.dp.VARIANTS) and {"non-private", "torchmatgrad"} <= set(rows)
    for r in rows.values():
        assert r["error"] is None, r
        assert r["median_ms"] > 0 and r["peak_mb"] > 0
    for name in ("opacus-hooks", "opacus-ghost"):
        if name in rows:  # the three DP steps agree (noise 0)
            assert rows[name]["grad_rel_diff_vs_torchmatgrad"] < 1e-5
    assert "torchmatgrad" in capsys.readouterr().out


def test_bench_peak_counts_the_block_cache():
    """A step's peak covers what it leaves alive: the gradients, 1 MiB and more of them from
    the CPU block cache, which torch's profiler does not see."""
    from torchmatgrad.cli.bench import dp, memory

    model = torch.nn.Sequential(torchmatgrad.nn.Linear(600, 700), torchmatgrad.nn.Linear(700, 500))
    x = rand(3, 600)

    def step():
        model(x).square().sum().backward()

    step()
    model.zero_grad(set_to_none=True)
    peak = memory.cpu_peak(step)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert grads >= 2**20 and peak >= grads
    assert peak < grads + 2**20  # activations are small here
    assert dp.cpu_peak is memory.cpu_peak
