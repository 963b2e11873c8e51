"""The GPU check's scripts, tried here without a GPU (scripts/gpu_check.sh, scripts/gpu_*.py).

Everything that does not need a GPU runs on the CPU kernels (the smoke pass, the benchmark
driver and its summary, the environment report, the stage dispatch in CPU and dry-run modes), so
that a call on a lent GPU machine can only fail on what needs the GPU. Nothing here pretends to
be a GPU run: the CUDA stages report themselves skipped, and the status lines say "cpu mode".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchmatgrad
from scripts import gpu_bench, gpu_env, gpu_smoke, gpu_summary, gpu_tc_bench

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
NO_GPU = not torch.cuda.is_available()


def _sh(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    base = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    for name in ("OUT", "GPU_CHECK_DEVICE", "DRY_RUN", "SKIP_BUILD", "TORCH_CUDA_ARCH_LIST"):
        base.pop(name, None)  # the test says where results go and how the script runs
    return subprocess.run(
        ["bash", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- gpu_smoke ---------------------------------------------------------------------------------


def test_smoke_on_cpu_kernels(capsys):
    assert gpu_smoke.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cpu path=kernel: ok" in out and "cpu path=vendor: ok" in out
    checks = int(re.search(r"gpu_smoke: (\d+) checks on cpu: all match", out).group(1))
    assert checks > 1000


def test_smoke_sanitize_mode_on_cpu(capsys):
    assert gpu_smoke.main(["--device", "cpu", "--sanitize", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "paths kernel, sanitize mode" in out and "path=vendor" not in out


def test_smoke_cases_cover_every_kernel_family():
    cases = gpu_smoke.cases()
    few = torchmatgrad._C.few_rows
    for dtype in gpu_smoke.DTYPES:
        mine = [c for c in cases if c.dtype == dtype]
        assert {1, 3, few} <= {c.rows for c in mine}  # RMAX 1, 4, 16
        assert any(c.rows > few for c in mine), "no tiled-GEMM case"
        assert any(c.offset for c in mine) and any(not c.offset for c in mine), "vector/scalar"
    assert any(c.rows * c.n * c.m == 0 for c in cases), "no empty case"
    assert any(c.rows >= 2048 and c.n >= 2048 for c in cases), "no case with many GEMM tiles"


class _Ops:
    """torch.ops.torchmatgrad with one op replaced, to show the checks bite."""

    def __init__(self, **replace):
        self._replace = replace

    def __getattr__(self, name):
        return self._replace.get(name, getattr(torch.ops.torchmatgrad, name))


@pytest.mark.parametrize(
    "fault,expect",
    [
        ("off", "max abs error"),
        ("nan", "non-finite values"),
        ("unmasked", "a result left out by the mask was computed"),
    ],
)
def test_smoke_catches_wrong_results(monkeypatch, fault, expect):
    real = torch.ops.torchmatgrad

    def linear(x, w, b=None):
        y = real.linear(x, w, b)
        if fault == "off":
            return y + 1e-3
        if fault == "nan" and y.numel():
            y = y.clone()
            y.view(-1)[-1] = float("nan")  # one element "never written"
        return y

    def linear_backward(g, x, w, mask):
        return real.linear_backward(g, x, w, [True, True, True])

    replace = {"linear_backward": linear_backward} if fault == "unmasked" else {"linear": linear}
    monkeypatch.setattr(gpu_smoke, "ops", _Ops(**replace))
    report = gpu_smoke.Report()
    case = gpu_smoke.Case(torch.float32, 3, 70, 64)
    gpu_smoke.check_case(report, case, "cpu", "kernel", seed=0, sanitize=False)
    assert report.failures and all(expect in f for f in report.failures), report.failures


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible")
def test_smoke_without_gpu_says_so(capsys):
    assert gpu_smoke.main(["--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


# ---- gpu_summary -------------------------------------------------------------------------------


def _row(peer, variant, case, dtype, n, B, ms, floor_ms=0.05, path="cuda:few-rows", **kw):
    row = dict.fromkeys(
        ("q1_ms", "q3_ms", "min_ms", "gbps", "tflops", "rel_err", "error", "speedup_vs_torch")
    )
    row.update(
        device="cuda:0",
        device_name="NVIDIA H200 (sm_90)",
        peer=peer,
        variant=variant,
        case=case,
        dtype=dtype,
        n=n,
        m=n,
        B=B,
        median_ms=ms,
        floor_ms=floor_ms,
        floor_frac=None if ms is None else floor_ms / ms,
        path="aten" if peer == "torch" else path,
    )
    row.update(kw)
    return row


def _doc(rows):
    return {
        "created": "2026-11-26T00:00:00+00:00",
        "machine": {
            "devices": {"cuda:0": "NVIDIA H200 (sm_90)"},
            "torch": "2.11.0+cu130",
            "torch_cuda": "13.0",
            "git_commit": "abc1234",
            "git_dirty": False,
        },
        "copy_bandwidth_GBps": {"cuda:0": 4260.0},
        "rows": rows,
    }


def test_summary_verdicts():
    docs = [
        _doc(
            [
                _row("torch", "-", "fwd", "fp32", 8192, 1, 0.0996, 0.063),
                _row("torchmatgrad", "-", "fwd", "fp32", 8192, 1, 0.066, 0.063),  # met
                _row("torch", "-", "fwd", "fp32", 8192, 16, 0.213, 0.063),
                _row("torchmatgrad", "-", "fwd", "fp32", 8192, 16, 0.090, 0.063),  # missed
                _row("torch", "-", "fwdbwd_acc", "fp32", 8192, 1, 0.459, 0.252),
                _row("torchmatgrad", "unfused", "fwdbwd_acc", "fp32", 8192, 1, 0.40, 0.252),
                _row("torchmatgrad", "fused", "fwdbwd_acc", "fp32", 8192, 1, 0.28, 0.252),
                # main_grad: its own torch row; the floor (fp32 main_grad) is above the target
                _row("torch", "main_grad", "fwdbwd_acc", "bf16", 16384, 1, 1.2, 0.756),
                _row("torchmatgrad", "main_grad", "fwdbwd_acc", "bf16", 16384, 1, 0.8, 0.756),
                # a vendor default with the forced kernel beside it
                _row("torch", "-", "fwd", "fp32", 8192, 4096, 11.0, 0.07),
                _row(
                    "torchmatgrad", "-", "fwd", "fp32", 8192, 4096, 11.1, 0.07, path="cuda:vendor"
                ),
                _row("torchmatgrad", "kernel", "fwd", "fp32", 8192, 4096, 25.0, 0.07, path="tiled"),
            ]
        )
    ]
    by_label = {v.target.label: v for v in gpu_summary.verdicts(docs)}
    assert by_label["forward fp32 8192², B=1"].verdict == "met"
    assert by_label["forward fp32 8192², B=16"].verdict == "MISSED (+20%)"
    assert by_label["step, .grad accumulated (fused), fp32 8192², B=1"].ours_ms == 0.28
    mg = by_label["step, main_grad fp32, bf16 16384², B=1"]
    assert (mg.torch_ms, mg.ours_ms, mg.below_floor) == (1.2, 0.8, True)
    assert by_label["forward bf16 8192², B=1"].verdict == "not measured"
    text = gpu_summary.summarize(docs)
    assert "NVIDIA H200 (sm_90); copy bandwidth 4260 GB/s" in text and "abc1234" in text
    header = next(line for line in text.splitlines() if line.startswith("case"))
    assert "variant" in header.split() and "path" in header.split()
    # fused and unfused rows are told apart, each against the same torch row
    acc = [line for line in text.splitlines() if line.startswith("fwdbwd_acc  fp32")]
    assert len(acc) == 2 and "unfused" in acc[0] and " fused" in acc[1]
    assert any("kernel" in line and "25.0000" in line for line in text.splitlines())
    assert "targets: 2 met, 2 missed, 7 not measured; 1 under this card's byte floor" in text
    assert "| step, main_grad fp32, bf16 16384², B=1 | 1.2000 ms | 0.8000 ms |" in text


@pytest.mark.slow
def test_summary_reads_what_the_bench_writes(tmp_path, capsys):
    assert gpu_bench.main(["--device", "cpu", "--out", str(tmp_path), "--quick"]) == 0
    capsys.readouterr()
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = [r for d in doc["runs"] for r in d["rows"]]
    variants = {(r["peer"], r["variant"]) for r in rows}
    assert {("torch", "-"), ("torchmatgrad", "-"), ("torchmatgrad", "fused")} <= variants
    assert {("torch", "main_grad"), ("torchmatgrad", "main_grad")} <= variants
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    assert all(r["median_ms"] and r["path"] for r in rows)
    written = (tmp_path / "summary.txt").read_text()
    assert gpu_summary.main([str(tmp_path / "bench.json")]) == 0
    assert capsys.readouterr().out == written  # the summary can be rebuilt from bench.json
    assert "targets (issue #10):" in written and "not measured" in written  # CPU: no targets


def test_main_grad_floor_counts_fp32_buffer():
    n, B = 16384, 1
    fwdbwd = gpu_bench.grid.floor_bytes("fwdbwd", n, n, B, 2)
    assert gpu_bench.main_grad_floor_bytes(n, n, B, 2) == fwdbwd - 2 * n * n + 8 * n * n
    # at the H200's 4.26 TB/s this is 0.756 ms: above the issue's 0.58 ms target
    assert gpu_bench.main_grad_floor_bytes(n, n, B, 2) / 4.26e12 * 1e3 > 0.58


# ---- gpu_env ------------------------------------------------------------------------------------


def test_env_report(capsys):
    assert gpu_env.main([]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "built with CUDA:" in out
    want = 0 if torchmatgrad._C.with_cuda else 1  # --require-cuda: the build, not the GPU
    assert gpu_env.main(["--require-cuda"]) == want


def test_build_stamp_follows_the_sources(tmp_path):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "a.cu").write_text("x")
    (tmp_path / "setup.py").write_text("y")
    first = gpu_env.build_stamp(tmp_path, "9.0")
    assert first == gpu_env.build_stamp(tmp_path, "9.0")
    assert first != gpu_env.build_stamp(tmp_path, "8.0;9.0")
    (tmp_path / "csrc" / "cuda" / "a.cu").write_text("x2")
    assert first != gpu_env.build_stamp(tmp_path, "9.0")


KERNEL = "_ZN12torchmatgrad4cuda12_GLOBAL__N_129linear_forward_kernel_fewrowsIfLi1ELi4EEEvPKT_S5_"
RES_USAGE = f"""
Fatbin elf code:
================
arch = sm_90
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function {KERNEL}:
  REG:40 STACK:0 SHARED:2048 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z11some_kernelPf:
  REG:8 STACK:16 SHARED:0 LOCAL:4 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_kernel_list_parsing_and_filter(monkeypatch):
    funcs = gpu_env.parse_res_usage(RES_USAGE)
    assert [f[1]["REG"] for f in funcs] == [40, 8] and funcs[1][1]["LOCAL"] == 4
    assert gpu_env._short(funcs[0][0]) == "linear_forward_kernel_fewrows<fLi1ELi4E>"

    class Done:
        stdout, stderr = RES_USAGE, ""

    monkeypatch.setenv("CUOBJDUMP", "/bin/true")
    monkeypatch.setattr(gpu_env.subprocess, "run", lambda *a, **k: Done())
    lines, problems = gpu_env.kernels_report("torchmatgrad")
    assert "1 match the sanitizer filter kns=torchmatgrad; 1 use local memory" in lines[-1]
    assert problems == ["not matched by kns=torchmatgrad: _Z11some_kernelPf"]


def test_every_kernel_is_in_namespace_torchmatgrad():
    """The sanitizer runs with --kernel-name kns=torchmatgrad: a kernel outside the namespace
    would go unchecked. (The built extension itself: python -m scripts.gpu_env --kernels.)"""
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu*")):
        text = path.read_text()
        first_kernel = text.find("__global__")
        if first_kernel < 0:
            continue
        opened = text.rfind("namespace torchmatgrad", 0, first_kernel)
        assert opened >= 0, f"{path.name}: a kernel before namespace torchmatgrad"
        assert "}  // namespace torchmatgrad" not in text[opened:first_kernel], path.name


@pytest.mark.skipif(
    not torchmatgrad._C.with_cuda
    or not (os.environ.get("CUOBJDUMP") or gpu_env._tool("cuobjdump")),
    reason="needs an extension built with CUDA and cuobjdump",
)
def test_built_kernels_match_the_sanitizer_filter(capsys):
    assert gpu_env.main(["--kernels"]) == 0, capsys.readouterr().out


# ---- gpu_tc_bench ------------------------------------------------------------------------------


def test_tc_bench_on_cpu_kernels(tmp_path, capsys):
    """The tensor-core benchmark's plumbing on the CPU kernels (where the switch changes nothing):
    every point timed for all three peers, the table printed, the JSON written; the switch and
    the forced path are restored."""
    forced, tc = torchmatgrad.policy.current_path(), torchmatgrad.policy.cuda_tensor_cores()
    assert gpu_tc_bench.main(["--device", "cpu", "--out", str(tmp_path), "--quick"]) == 0
    assert (torchmatgrad.policy.current_path(), torchmatgrad.policy.cuda_tensor_cores()) == (
        forced,
        tc,
    )
    out = capsys.readouterr().out
    assert "tensor-core few-rows forward vs cuBLAS" in out
    doc = json.loads((tmp_path / "tc-bench.json").read_text())
    dtypes, sizes, rows = gpu_tc_bench.SHAPES["cpu"]
    assert len(doc["rows"]) == len(dtypes) * len(sizes) * len(rows)
    for r in doc["rows"]:
        assert not r["errors"], r["errors"]
        assert all(v > 0 for v in r["ms"].values()) and r["speedup_vs_cublas"] > 0
        assert r["rel_err_vs_cublas"]["tensor-cores"] < 0.05
    assert gpu_tc_bench.SHAPES["cuda"] == (["bf16", "fp16"], [4096, 8192], [16, 32, 64])


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible")
def test_tc_bench_without_gpu_says_so(tmp_path, capsys):
    assert gpu_tc_bench.main(["--device", "cuda", "--out", str(tmp_path)]) == 77
    assert "skipped: no CUDA GPU visible" in capsys.readouterr().out


# ---- gpu_check.sh -------------------------------------------------------------------------------


def test_check_help_and_stage_names():
    done = _sh(str(SCRIPT), "help")
    assert done.returncode == 0 and "Usage: scripts/gpu_check.sh STAGE" in done.stdout
    assert "GPU runbook" in done.stdout and "run(command=" in done.stdout
    assert _sh(str(SCRIPT)).returncode == 1  # no stage: usage
    listed = _sh(str(SCRIPT), "list").stdout.split()
    assert listed[:5] == ["build", "smoke", "bench", "sweep", "tests"] and "all" in listed
    bad = _sh(str(SCRIPT), "build+bogus", "/tmp/never")
    assert bad.returncode == 2 and "unknown stage 'bogus'" in bad.stderr


def test_check_dry_run_lists_every_step(tmp_path):
    done = _sh(str(SCRIPT), "all", str(tmp_path), env={"DRY_RUN": "1"})
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "gpu_check.log").read_text()
    steps = re.findall(r"^=== \[([\w-]+)\] (.*)$", log, re.M)
    names = [s for s, _ in steps]
    assert names.index("bench") < names.index("tests")  # the numbers come before the tests
    cmd = dict(steps)
    assert "TORCH_CUDA_ARCH_LIST=9.0" in cmd["build"] and "MAX_JOBS=" in cmd["build"]
    assert "-m scripts.gpu_smoke --device cuda" in cmd["smoke"]  # a module: repo on the path
    for tool in ("memcheck", "racecheck"):
        assert f"--tool {tool} --kernel-name kns=torchmatgrad" in cmd[tool]
    # initcheck sees torch's kernels too: what they write would read as uninitialized otherwise
    assert "--tool initcheck --error-exitcode" in cmd["initcheck"]
    for tool in ("memcheck", "racecheck", "initcheck"):
        assert "-m scripts.gpu_smoke --device cuda --sanitize" in cmd[tool]
    assert "not\\ compile" in cmd["tests"] and "over_2_31" in cmd["big"]
    assert "--rows 1 2 4 8 16 32 64 256 4096" in cmd["sweep"]
    # The tensor-core stage: numbers first, then its tests, then the others with it switched on.
    assert names.index("tc-bench") < names.index("tc-tests") < names.index("tc-suite")
    assert "-m scripts.gpu_tc_bench --device cuda" in cmd["tc-bench"]
    assert "tc_" in cmd["tc-tests"] and "tests/test_cuda.py" in cmd["tc-tests"]
    for name in ("tc-smoke", "tc-memcheck", "tc-racecheck", "tc-suite"):
        assert cmd[name].startswith("TORCHMATGRAD_CUDA_TC=1 "), cmd[name]
    status = (tmp_path / "status.txt").read_text()
    assert status.count("dry-run (timeout") == len(steps)
    assert all(int(t) <= 300 for t in re.findall(r"timeout (\d+)s", status))  # one call each


def _sourced(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``body`` in a bash that sourced gpu_check.sh (its functions, nothing run)."""
    return _sh("-c", f'source "{SCRIPT}"; {body}', env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})


def _fake_sanitizer(tmp_path: Path, output: str, rc: int) -> None:
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!/bin/sh\necho '{output}'\nexit {rc}\n")
    fake.chmod(0o755)


@pytest.mark.parametrize(
    "output,rc,want",
    [
        ("========= Error: Device not supported", 1, 77),
        ("========= ERROR SUMMARY: 0 errors", 0, 0),
        ("========= Invalid __global__ read of size 4 bytes", 99, 99),
    ],
)
def test_sanitizer_verdicts(tmp_path, output, rc, want):
    """How a sanitizer run is classified (a stand-in compute-sanitizer and GPU check: this is
    the classification, not a sanitizer run)."""
    _fake_sanitizer(tmp_path, output, rc)
    done = _sourced("have_gpu() { return 0; }; sanitize_tool memcheck", tmp_path)
    assert done.returncode == want, done.stdout + done.stderr
    if want == 77:
        assert "skipped: compute-sanitizer says: Device not supported" in done.stdout


def test_sanitizer_without_gpu_is_skipped(tmp_path):
    _fake_sanitizer(tmp_path, "should not run", 1)
    done = _sourced("have_gpu() { return 1; }; sanitize_tool racecheck", tmp_path)
    assert done.returncode == 77 and "skipped: no CUDA GPU visible" in done.stdout
    assert "should not run" not in done.stdout


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible")
def test_check_cuda_stage_without_gpu_is_skipped(tmp_path):
    """In CUDA mode with no GPU a test stage says skipped, and does not start a build."""
    done = _sh(str(SCRIPT), "big", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    status = (tmp_path / "status.txt").read_text()
    assert re.search(r"^big\s+skipped \(no test ran", status, re.M), status
    assert "build" not in status.split("\n", 1)[1] and "[cpu mode]" not in status


@pytest.mark.slow
def test_check_cpu_mode_end_to_end(tmp_path):
    """The stages' Python through the script, on the CPU kernels: env, smoke, sweep; the CUDA
    tests and the sanitizer report themselves skipped; no line claims a GPU run."""
    stages = "build+smoke+sweep+big+sanitize"
    done = _sh(str(SCRIPT), stages, str(tmp_path), env={"GPU_CHECK_DEVICE": "cpu"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    status = (tmp_path / "status.txt").read_text()
    assert "(cpu mode: not a GPU run)" in status
    lines = {ln.split()[0]: ln for ln in status.splitlines() if ln.endswith("s") and "[" in ln}
    for name in ("env", "smoke", "sweep"):
        assert re.match(rf"{name}\s+ok \[cpu mode\]", lines[name]), lines[name]
    assert "skipped (no test ran" in lines["big"]
    assert "skipped (compute-sanitizer not found)" in lines["memcheck"] or shutil.which(
        "compute-sanitizer"
    )
    assert all("[cpu mode]" in ln for ln in lines.values())
    tune = json.loads((tmp_path / "tune-cpu.json").read_text())
    assert {m["rows"] for m in tune["measurements"]} == {1, 16, 64}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_check.log",
        "status.txt",
        "tune-cpu.json",
    ]
