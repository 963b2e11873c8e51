"""The path policy: the table, forcing a path, `tune` and its cache, and the vendor routes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_python

import torchmatgrad
from torchmatgrad import policy
from torchmatgrad.cli import tune
from torchmatgrad.testing import assert_close, rand

ops = torch.ops.torchmatgrad
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_policy():
    before = policy.installed()
    yield
    for device_type, table in before.items():
        policy.install(table, device_type)


def _random_table(seed: int) -> policy.PathTable:
    rng = random.Random(seed)
    paths = {
        (op, dt): [
            "".join(rng.choice("kv") for _ in range(policy.N_ROWS)) for _ in range(policy.N_SIZES)
        ]
        for op in policy.OPS
        for dt in policy.DTYPES
    }
    return policy.PathTable("test", "random", paths).validate()


@pytest.mark.usefixtures("restore_policy")
def test_cpp_and_python_agree_on_buckets():
    """The C++ decision equals the Python table lookup for random tables and shapes, the
    bucket edges included (both read _C.path_size_edges / path_row_edges)."""
    rng = random.Random(0)
    for seed in range(3):
        table = _random_table(seed)
        policy.install(table, "cpu")
        shapes = [(1, 1, 0), (64, 64, 1), (65, 64, 2), (4096, 4096, 1024), (4097, 4096, 1025)]
        shapes += [
            (rng.randint(1, 9000), rng.randint(1, 9000), rng.randint(0, 5000)) for _ in range(300)
        ]
        for n, m, rows in shapes:
            for op in policy.OPS:
                for dt in policy.DTYPES:
                    want = table.path(op, dt, n, m, rows)
                    assert policy.path(op, getattr(torch, dt), n, m, rows) == want


def test_bucket_edges_come_from_the_extension():
    assert policy.SIZE_EDGES == tuple(torchmatgrad._C.path_size_edges)
    assert policy.ROW_EDGES == tuple(torchmatgrad._C.path_row_edges)
    assert policy.rows_bucket(torchmatgrad._C.few_rows) < policy.rows_bucket(
        torchmatgrad._C.few_rows + 1
    )


def test_force_path_context_manager():
    assert policy.current_path() == "auto"
    with policy.force_path("vendor"):
        assert policy.path("forward", torch.float32, 64, 64, 1) == "vendor"
        with policy.force_path("kernel"):
            assert policy.path("forward", torch.float32, 4096, 4096, 4096) == "kernel"
        assert policy.current_path() == "vendor"
    assert policy.current_path() == "auto"
    with pytest.raises(ValueError, match="path must be one of auto, kernel, vendor, got 'fast'"):
        with policy.force_path("fast"):
            pass
    assert policy.current_path() == "auto"


def test_same_shape_same_path():
    seen = {policy.path("backward", torch.float32, 300, 200, r) for _ in range(5) for r in (40,)}
    assert len(seen) == 1


@pytest.mark.parametrize("value", ["kernel", "vendor"])
def test_environment_forces_a_path(value):
    done = run_python(
        "import torch, torchmatgrad as t\n"
        "print(t.policy.current_path(), t.policy.path('forward', torch.float32, 4096, 4096, 1),"
        " t.policy.path('forward', torch.float32, 64, 64, 4096))",
        TORCHMATGRAD_PATH=value,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [value] * 3


def test_bad_environment_value_is_a_clear_error():
    done = run_python("import torchmatgrad", TORCHMATGRAD_PATH="fastest")
    assert done.returncode != 0
    assert "TORCHMATGRAD_PATH must be one of auto, kernel, vendor, got 'fastest'" in done.stderr


# ---- the tensor-core few-rows forward's switch (CUDA kernel; the switch itself is device-free) --


@pytest.mark.parametrize("value,want", [("", "False"), ("0", "False"), ("1", "True")])
def test_tensor_core_switch_from_the_environment(value, want):
    done = run_python(
        "import torchmatgrad as t; print(t.policy.cuda_tensor_cores(), t._C.cuda_tc_env)",
        TORCHMATGRAD_CUDA_TC=value,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [want, str(int(want == "True"))]


def test_tensor_core_switch_bad_value_is_a_clear_error():
    done = run_python("import torchmatgrad", TORCHMATGRAD_CUDA_TC="yes")
    assert done.returncode != 0
    assert "TORCHMATGRAD_CUDA_TC must be 0 or 1, got 'yes'" in done.stderr


def test_tensor_core_switch_is_off_by_default_and_restored():
    from torchmatgrad.cli import info

    if os.environ.get("TORCHMATGRAD_CUDA_TC") == "1":
        pytest.skip("this process was started with TORCHMATGRAD_CUDA_TC=1")
    assert policy.cuda_tensor_cores() is False
    assert "enabled no" in info.tc_status() and "unverified on hardware" in info.tc_status()
    bf16, rows = torch.bfloat16, torchmatgrad._C.tc_few_rows_min
    top = torchmatgrad._C.tc_few_rows_max
    cores = {r: info._kernel_path("cuda", r).name for r in (rows, top, top + 1)}
    assert cores == {rows: "cuda:few-rows", top: "cuda:tiled", top + 1: "cuda:tiled"}
    with policy.force_path("kernel"):
        assert info.dispatch_path("cuda", rows, bf16, 1024, 1024) == cores[rows]
        with policy.cuda_tensor_cores_enabled():
            assert policy.cuda_tensor_cores() is True
            assert "enabled yes" in info.tc_status()
            assert info.dispatch_path("cuda", rows, bf16, 1024, 1024) == info.TC_PATH
            assert info.dispatch_path("cuda", top, torch.float16, 64, 64) == info.TC_PATH
            # Not on the tensor cores: too many rows, float32, m % 8 != 0, the backward.
            assert info.dispatch_path("cuda", top + 1, bf16, 1024, 1024) == cores[top + 1]
            assert info.dispatch_path("cuda", top, torch.float32, 1024, 1024) == cores[top]
            assert info.dispatch_path("cuda", top, bf16, 1024, 1027) == cores[top]
            assert info.dispatch_path("cuda", top, bf16, op="backward") == cores[top]
        # The vendor route comes first: the switch only changes the kernel path.
        with policy.force_path("vendor"), policy.cuda_tensor_cores_enabled():
            assert info.dispatch_path("cuda", rows, bf16, 1024, 1024) == "cuda:vendor:cuBLAS"
    assert policy.cuda_tensor_cores() is False


def test_info_states_the_tensor_core_kernels():
    from torchmatgrad.cli import info

    text = info.info_text()
    compiled = "compiled yes" if torchmatgrad._C.with_cuda else "compiled no (CPU-only build)"
    line = next(s for s in text.splitlines() if s.startswith("CUDA tensor-core few-rows kernels"))
    assert compiled in line and "unverified on hardware" in line and "TORCHMATGRAD_CUDA_TC" in line
    lo, hi = torchmatgrad._C.tc_few_rows_min, torchmatgrad._C.tc_few_rows_max
    assert (lo, hi) == (torchmatgrad._C.few_rows, 64)
    assert f"{info.TC_PATH}: {lo} ≤ R ≤ {hi}, forward and grad_W" in text


@pytest.mark.parametrize("path", ["kernel", "vendor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1,), (3, 7), (40,)], ids=str)
def test_both_paths_match_the_reference(path, dtype, rows):
    n, m = 33, 70
    x, w, b, g = rand(*rows, m, dtype=dtype), rand(n, m, dtype=dtype), rand(n, dtype=dtype), None
    g = rand(*rows, n, dtype=dtype)
    buf0 = rand(n, m, dtype=dtype)
    with policy.force_path(path):
        y = ops.linear(x, w, b)
        gi, gw, gb = ops.linear_backward(g, x, w, [True, True, True])
        buf = buf0.clone()
        agi, agb = ops.linear_backward_accumulate_(g, x, w, buf, [True, True])
    k = x.numel() // m
    X, G, W = x.double().reshape(k, m), g.double().reshape(k, n), w.double()
    peer = torch.nn.functional.linear(x, w, b)
    assert_close(y, torch.nn.functional.linear(x.double(), W, b.double()), k=m, peers=[peer])
    assert_close(gi, (G @ W).reshape(x.shape), k=n, peers=[(g.reshape(k, n) @ w).reshape(x.shape)])
    assert_close(gw, G.t() @ X, k=k, peers=[g.reshape(k, n).t() @ x.reshape(k, m)])
    assert_close(gb, G.sum(0), k=k, peers=[g.reshape(k, n).sum(0)])
    assert_close(
        buf,
        buf0.double() + G.t() @ X,
        k=k + 1,
        peers=[buf0 + g.reshape(k, n).t() @ x.reshape(k, m)],
    )
    assert torch.equal(agi, gi) and torch.equal(agb, gb)


@pytest.mark.parametrize("dtype16", [torch.bfloat16, torch.float16])
def test_vendor_fp32_master_gradient(dtype16):
    n, m, rows = 24, 40, 9
    x, w, g = rand(rows, m, dtype=dtype16), rand(n, m, dtype=dtype16), rand(rows, n, dtype=dtype16)
    buf0 = rand(n, m)
    out = {}
    for path in ("kernel", "vendor"):
        buf = buf0.clone()
        with policy.force_path(path):
            ops.linear_backward_accumulate_(g, x, w, buf, [False, False])
        out[path] = buf
    ref = buf0.double() + g.double().t() @ x.double()
    for buf in out.values():
        assert buf.dtype == torch.float32
        assert_close(buf, ref, k=rows + 1)  # a float32 rounding bound: accumulated in float32


def test_vendor_accumulation_adds_in_place_without_a_weight_sized_temporary():
    n, m, rows = 256, 192, 8
    x, w, g = rand(rows, m), rand(n, m), rand(rows, n)
    buf = rand(n, m)
    ptr = buf.data_ptr()
    with policy.force_path("vendor"):
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            ops.linear_backward_accumulate_(g, x, w, buf, [True, True])
    assert buf.data_ptr() == ptr
    events = prof.key_averages()
    names = {e.key for e in events}
    assert "aten::addmm_" in names, names
    w_bytes = n * m * buf.element_size()
    biggest = max(e.self_cpu_memory_usage for e in events)
    assert biggest < w_bytes, (biggest, w_bytes)


def test_fused_accumulation_on_the_vendor_path():
    """grad_accumulation='fused' still adds into .grad in place on the vendor route."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 32)
    ours = torchmatgrad.nn.Linear(48, 32, grad_accumulation="fused")
    ours.load_state_dict(ref.state_dict())
    with policy.force_path("vendor"):
        for _ in range(3):
            x = rand(40, 48)
            ref(x).square().sum().backward()
            buf = ours.weight.grad
            ours(x).square().sum().backward()
            if buf is not None:
                assert ours.weight.grad is buf
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)


def test_tune_writes_the_cache_that_import_reads(tmp_path):
    env = {"TORCHMATGRAD_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchmatgrad",
            "tune",
            "--quick",
            "--sizes",
            "64",
            "128",
            "--rows",
            "1",
            "32",
            "--reps",
            "3",
            "--max-time",
            "0.05",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    files = list(tmp_path.glob("policy-cpu-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["source"].startswith("tune on ") and len(doc["measurements"]) == 3 * 2 * 2
    probe = run_python(
        "import json, torchmatgrad as t\n"
        "table = t.policy.installed()['cpu']\n"
        "print(json.dumps([table.source, table.to_json()['paths']]))",
        **env,
    )
    assert probe.returncode == 0, probe.stderr
    source, paths = json.loads(probe.stdout)
    assert source == doc["source"] and paths == doc["paths"]


def test_derive_table_generalises_from_measured_points():
    pts = [
        dict(op=op, dtype="float32", n=n, m=n, rows=r, kernel_ms=1.0, vendor_ms=v)
        for op in policy.OPS
        for n in (256, 4096)
        for r, v in ((1, 2.0), (16, 2.0), (256, 0.5))
    ]
    table = tune.derive_table("test", "unit", pts)
    # Measured points decide their own buckets; others take the nearest; float64 copies
    # float32; bfloat16/float16 (not measured) keep the generic rule.
    assert table.path("forward", "float32", 4096, 4096, 1) == "kernel"
    assert table.path("forward", "float32", 4096, 4096, 256) == "vendor"
    assert table.path("forward", "float32", 4096, 11008, 300) == "vendor"  # rectangular, unmeasured
    assert table.path("forward", "float32", 300, 500, 8) == "kernel"
    assert table.path("backward", "float64", 256, 256, 256) == "vendor"
    assert (
        table.paths[("forward", "bfloat16")]
        == policy.generic_table("x").paths[("forward", "bfloat16")]
    )
    # A lone choice between two opposite ones along the rows, within noise, is smoothed away;
    # a clear loss stays.
    lone = [dict(pts[0], rows=r, vendor_ms=v) for r, v in ((1, 2.0), (2, 0.95), (4, 2.0))]
    smoothed = tune.derive_table("test", "unit", lone)
    assert smoothed.path("forward", "float32", 256, 256, 2) == "kernel"
    clear = [dict(p, vendor_ms=0.7) if p["rows"] == 2 else p for p in lone]
    assert (
        tune.derive_table("test", "unit", clear).path("forward", "float32", 256, 256, 2) == "vendor"
    )
    # A size bucket keeps the kernel only where the bucket below (its lower edge) chose it
    # too: 1024² won on the kernel at 64 rows, 512² (measured) did not, so a 768² layer, in
    # 1024²'s bucket, takes the vendor route; at 16 rows both won and it keeps the kernel.
    edges = [
        dict(pts[0], n=n, m=n, rows=r, vendor_ms=v)
        for n, r, v in ((512, 16, 2.0), (512, 64, 0.5), (1024, 16, 2.0), (1024, 64, 1.0))
    ]
    bracketed = tune.derive_table("test", "unit", edges)
    assert bracketed.path("forward", "float32", 1024, 1024, 64) == "vendor"
    assert bracketed.path("forward", "float32", 768, 768, 64) == "vendor"
    assert bracketed.path("forward", "float32", 768, 768, 16) == "kernel"
    assert bracketed.path("forward", "float32", 2048, 2048, 16) == "kernel"
    # A tie (within the margin) stays on the kernel.
    tie = [dict(pts[0], kernel_ms=1.0, vendor_ms=0.99)]
    assert (
        tune.derive_table("test", "unit", tie).path("forward", "float32", 256, 256, 1) == "kernel"
    )


def test_info_prints_the_table():
    from torchmatgrad.cli import info

    text = info.info_text()
    assert "Path policy" in text
    assert policy.installed()["cpu"].source in text
    for op in policy.OPS:
        assert op in text


def test_measured_defaults_are_valid_and_say_where_they_come_from():
    assert policy.DEFAULTS, "no measured default table"
    for kind, table in policy.DEFAULTS.items():
        assert table.device_kind == kind and table.validate() is table
        assert table.measurements, kind  # every default keeps the numbers it came from
        assert "torch" in table.source and "20" in table.source, table.source  # torch, date
        # and is what tune derives from them (the measured dtypes; the others copy a sibling)
        derived = tune.derive_table(kind, table.source, table.measurements, base=table)
        assert derived.paths == table.paths, kind
        # where the vendor route measured faster (after smoothing), it is taken
        for p, c in zip(table.measurements, tune._smoothed(table.measurements), strict=True):
            if c == "v":
                assert table.path(p["op"], p["dtype"], p["n"], p["m"], p["rows"]) == "vendor", p


def test_tune_from_bench_derives_a_table(tmp_path, capsys):
    runs = sorted((ROOT / "benchmarks" / "results").glob("3522df2-*.json"))
    out = tmp_path / "amd.json"
    argv = ["--from-bench", *map(str, runs), "--kind", "cpu/test", "--source", "unit test"]
    assert tune.main([*argv, "--out", str(out)]) == 0
    table = policy.PathTable.from_json(json.loads(out.read_text())).validate()
    assert table.device_kind == "cpu/test" and table.measurements
    assert tune.main(argv) == 2  # no --out
    assert "needs --kind, --source and --out" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_policy")
@pytest.mark.parametrize("flag", ["avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"])
def test_native_16bit_cpu_is_its_own_kind(monkeypatch, flag):
    """A CPU with native 16-bit dot products (which oneDNN uses, the kernels do not) is a kind of
    its own: the tables measured without them do not apply, and until it is tuned the generic
    rule (vendor route above the few rows) keeps bf16 GEMMs off the kernels."""
    real = policy._cpuinfo_field
    flags = "fpu sse2 avx2 avx512f"

    def fake(name):
        return flags if name == "flags" else real(name)

    monkeypatch.setattr(policy, "_cpuinfo_field", fake)
    plain = policy.device_kind("cpu")
    assert not plain.endswith("-bf16")
    flags = f"fpu sse2 avx2 avx512f {flag}"
    kind = policy.device_kind("cpu")
    assert kind == plain + "-bf16"
    # Untuned (a shipped table for this kind, if any, set aside): the generic rule.
    untuned = {k: v for k, v in policy.DEFAULTS.items() if k != kind}
    monkeypatch.setattr(policy, "DEFAULTS", untuned)
    monkeypatch.setattr(policy, "_load_cache", lambda device: None)
    policy.load("cpu")
    table = policy.installed()["cpu"]
    assert table.device_kind == kind and table.source.startswith("generic rule")
    assert policy.path("forward", torch.bfloat16, 4096, 4096, 256, "cpu") == "vendor"
    assert policy.path("forward", torch.bfloat16, 4096, 4096, 1, "cpu") == "kernel"


@pytest.mark.usefixtures("restore_policy")
def test_cuda_table_is_loaded_when_cuda_initialises(monkeypatch):
    """Import installs the generic CUDA rule and defers the measured table to CUDA's
    initialisation (looking up the device's kind needs its capability; importing must not
    initialise CUDA); at that point the default of the device's kind replaces it."""
    hooks = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(policy._compat, "on_cuda_init", lambda fn: hooks.append(fn) or True)
    policy._init()
    assert policy.installed()["cuda"].source == policy._CUDA_PENDING
    assert len(hooks) == 1
    monkeypatch.setattr(policy, "_load_cache", lambda device: None)
    monkeypatch.setattr(policy, "device_kind", lambda device="cpu": "cuda/sm_90")
    hooks[0]()  # what CUDA's initialisation runs
    table = policy.installed()["cuda"]
    assert table is policy.DEFAULTS["cuda/sm_90"]
    # the H100 measurement: cuBLAS from 4 rows for a float32 forward at 8192², the kernel at 1
    assert policy.path("forward", torch.float32, 8192, 8192, 1, "cuda") == "kernel"
    assert policy.path("forward", torch.float32, 8192, 8192, 16, "cuda") == "vendor"


@pytest.mark.usefixtures("restore_policy")
def test_cuda_table_failure_keeps_the_generic_rule(monkeypatch):
    pending = policy.installed()["cuda"]

    def broken(device="cpu"):
        raise RuntimeError("no capability")

    monkeypatch.setattr(policy, "device_kind", broken)
    monkeypatch.setattr(policy, "_load_cache", lambda device: None)
    with pytest.warns(UserWarning, match="CUDA path table not loaded .*no capability"):
        policy._load_cuda()
    assert policy.installed()["cuda"] is pending


def test_import_does_not_initialise_cuda():
    r = run_python("import torch, torchmatgrad; print(torch.cuda.is_initialized())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.usefixtures("restore_policy")
def test_shipped_native_16bit_table_is_installed(monkeypatch):
    """A native-16-bit kind with a shipped table (cpu/x86_64-avx512bf16-intel-bf16, measured on an
    Emerald Rapids whose AMX the hypervisor masks) gets that table, not the generic rule."""
    kind = "cpu/x86_64-avx512bf16-intel-bf16"
    table = policy.DEFAULTS[kind]
    assert table.source.startswith("tune on") and "Emerald Rapids" in table.source
    monkeypatch.setattr(policy, "device_kind", lambda device="cpu": kind)
    monkeypatch.setattr(policy, "_load_cache", lambda device: None)
    policy.load("cpu")
    assert policy.installed()["cpu"] is table
