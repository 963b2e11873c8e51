"""The benchmark and `info` run and write well-formed output (no test asserts a speed)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch  # noqa: F401  (before torchmatgrad's extension)
from test_isa import ISAS

from torchmatgrad import policy
from torchmatgrad.cli import bench, info

TINY = ["--quick", "--n", "64", "--B", "1", "4", "--dtype", "float32"]
TINY += ["--reps", "3", "--warmup", "1", "--no-progress", "--name", "tiny"]


def _run_tiny(out, path: str) -> str:
    """A tiny --quick run with every op forced onto ``path``; returns the captured stdout."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), policy.force_path(path):
        rc = bench.main([*TINY, "--device", "cpu", "--out", str(out)])
    assert rc == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny --quick run shared by the checks: (out dir, captured stdout). The kernel path is
    forced, so the rows do not depend on this machine's path table (no extra "kernel" rows)."""
    out = tmp_path_factory.mktemp("bench_out")
    return out, _run_tiny(out, "kernel")


def test_json(tiny_run):
    out, _ = tiny_run
    doc = json.loads((out / "tiny.json").read_text())
    assert doc["schema"] == "torchmatgrad-bench/1"
    machine = doc["machine"]
    for key in ("cpu_model", "torch", "torchmatgrad", "git_commit", "torch_threads", "devices"):
        assert key in machine
    assert doc["copy_bandwidth_GBps"]["cpu"] > 0
    rows = doc["rows"]
    # 1 dtype × 1 n × 2 B × 3 cases × 2 peers (torch, torchmatgrad), plus torchmatgrad's
    # fused variant of fwdbwd_acc for each B.
    assert len(rows) == 14
    assert {(r["B"], r["case"], r["peer"], r["variant"]) for r in rows} == {
        (B, case, peer, variant)
        for B in (1, 4)
        for case in bench.CASES
        for peer, variant in (
            [("torch", "-"), ("torchmatgrad", "unfused"), ("torchmatgrad", "fused")]
            if case == "fwdbwd_acc"
            else [("torch", "-"), ("torchmatgrad", "-")]
        )
    }
    for r in rows:
        assert set(r) == set(bench.ROW_KEYS)
        assert r["error"] is None, r
        assert (r["device"], r["dtype"], r["n"], r["m"]) == ("cpu", "fp32", 64, 64)
        for key in ("median_ms", "min_ms", "gbps", "tflops", "floor_ms", "speedup_vs_torch"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["reps"] >= 3
        if r["peer"] == "torchmatgrad":
            assert r["path"] == "cpu:few-rows"
            assert r["rel_err"] < 1e-4
        else:
            assert r["speedup_vs_torch"] == 1.0


def test_vendor_default_keeps_kernel_rows(tmp_path):
    """Where the default path is the vendor route, every torchmatgrad row gets a partner forced
    onto the hand-written kernel (variant "kernel"), and each row names the path it took."""
    _run_tiny(tmp_path, "vendor")
    rows = json.loads((tmp_path / "tiny.json").read_text())["rows"]
    tmg = [r for r in rows if r["peer"] == "torchmatgrad"]
    default = [r for r in tmg if "kernel" not in r["variant"]]
    kernel = [r for r in tmg if "kernel" in r["variant"]]
    assert len(default) == len(kernel) == 2 * (len(bench.CASES) + 1)
    assert all("vendor" in r["path"] for r in default), default
    assert all(r["path"] == "cpu:few-rows" for r in kernel), kernel
    assert {(r["B"], r["case"], r["variant"]) for r in kernel} == {
        (r["B"], r["case"], "kernel" if r["variant"] == "-" else f"{r['variant']},kernel")
        for r in default
    }
    for r in tmg:
        assert r["error"] is None and r["rel_err"] < 1e-4, r


def test_csv(tiny_run):
    out, _ = tiny_run
    with open(out / "tiny.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == list(bench.ROW_KEYS)
    assert len(body) == 14
    assert all(len(line) == len(header) for line in body)
    col = header.index("median_ms")
    assert all(float(line[col]) > 0 for line in body)


def test_table_and_plot(tiny_run):
    out, stdout = tiny_run
    assert "speedup" in stdout and "fwdbwd_acc" in stdout and "torchmatgrad" in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "tiny-cpu.png").stat().st_size > 0
    else:
        assert "matplotlib not installed: skipping plot" in stdout
        assert not list(out.glob("*.png"))


def test_floor_bytes_passes_over_w():
    n = m = 1000
    w = n * m * 4
    for case, passes in (("fwd", 1), ("fwdbwd", 3), ("fwdbwd_acc", 4)):
        fb = bench.floor_bytes(case, n, m, 1, 4)
        assert passes * w <= fb < passes * w * 1.02


def test_bad_device_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert bench.main(["--device", "cuda", "--quick"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_dispatch_path():
    with policy.force_path("kernel"):
        assert info.dispatch_path("cpu", 1) == "cpu:few-rows"
        assert info.dispatch_path("cpu", 16) == "cpu:few-rows"
        assert info.dispatch_path("cpu", 17) == "cpu:tiled"
        assert info.dispatch_path("cuda", 16, torch.bfloat16) == "cuda:few-rows"
        assert info.dispatch_path("cuda:0", 4096) == "cuda:tiled"
    with policy.force_path("vendor"):
        assert info.dispatch_path("cpu", 1) == "cpu:vendor:MKL/oneDNN"
        assert info.dispatch_path("cuda:0", 4096, op="backward") == "cuda:vendor:cuBLAS"
    # Unforced: what the installed table says.
    table = policy.installed()["cpu"]
    for rows in (1, 16, 17, 300):
        want = table.path("forward", "float32", 1024, 1024, rows)
        got = info.dispatch_path("cpu", rows, torch.float32, 1024, 1024)
        assert (got == "cpu:vendor:MKL/oneDNN") == (want == "vendor"), (rows, got, want)


def test_info_reads_the_thresholds_from_the_extension():
    from torchmatgrad import _C

    for paths in info.DISPATCH.values():
        assert paths[0].max_rows == _C.few_rows
    with policy.force_path("kernel"):
        assert info.dispatch_path("cpu", _C.few_rows) == "cpu:few-rows"
        assert info.dispatch_path("cpu", _C.few_rows + 1) == "cpu:tiled"
    assert f"R ≤ {_C.cpu_dot_rows} dot products" in info.DISPATCH["cpu"][0].forward
    assert info.cpu_isa() == _C.cpu_isa in ISAS
    text = info.info_text()
    assert f"kernels use {_C.cpu_isa}" in text
    # The other routes' thresholds, from where they are decided.
    from torchmatgrad.curvature import _products

    assert f"up to {_C.transposed_forward_rows32} rows forward" in text
    assert f"below {_C.norms_vendor_rows_cpu} rows per sample on the CPU" in text
    assert f"d ≥ {_products.KERNEL_MIN_D} and {_products.KERNEL_MIN_ROWS} rows" in text


def test_info(capsys):
    assert info.main([]) == 0
    text = capsys.readouterr().out
    assert text == info.info_text() + "\n"
    assert "linear_backward" in text and "linear_backward_accumulate_" in text
    assert "CPU yes" in text  # the CPU kernels are compiled and registered
    assert torch.__version__ in text
    assert "cpu:few-rows" in text and "cpu:tiled" in text


def test_slow_peers_are_skipped(tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--n", "64", "--B", "1", "64", "--dtype", "fp32"]
    argv += ["--case", "fwd", "--reps", "3", "--warmup", "1", "--no-progress", "--no-plot"]
    argv += ["--max-call-time", "1e-7", "--out", str(tmp_path), "--name", "skip"]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "skip.json").read_text())["rows"]
    by_b = {B: [r for r in rows if r["B"] == B] for B in (1, 64)}
    assert all(r["error"] is None and r["median_ms"] > 0 for r in by_b[1])
    assert all(r["error"].startswith("skipped") and r["median_ms"] is None for r in by_b[64])
    assert "skipped" in capsys.readouterr().out
