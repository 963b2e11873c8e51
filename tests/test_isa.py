"""Every CPU instruction-set variant of the kernels, not only the one this CPU picks by default.

The kernels are compiled once per ISA (csrc/cpu/isa_*.cpp) and the widest the CPU has is used;
TORCHMATGRAD_CPU_ISA picks a narrower one. The default variant runs in every other test; here
the kernel tests run again in a subprocess for each other variant this CPU can execute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import torchmatgrad

ISAS = ("baseline", "avx2", "avx512", "avx512bf16", "amx")  # narrowest first
# The AMX drivers on a software model of the tiles: never the default, only when asked for.
EMULATED = ("amxemu",)
TESTS = Path(__file__).parent


def _run(code_or_args: list[str], isa: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCHMATGRAD_CPU_ISA=isa)
    return subprocess.run(
        [sys.executable, *code_or_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=TESTS.parent,
    )


def _usable(isa: str) -> str | None:
    """None if this CPU and build can run `isa`, else why not."""
    probe = _run(["-c", "import torchmatgrad; print(torchmatgrad._C.cpu_isa)"], isa, 120)
    if probe.returncode == 0 and probe.stdout.split()[-1:] == [isa]:
        return None
    return (probe.stderr.strip().splitlines() or ["?"])[-1]


def test_default_is_widest_available():
    usable = [isa for isa in ISAS if _usable(isa) is None]
    assert torchmatgrad._C.cpu_isa == usable[-1], (torchmatgrad._C.cpu_isa, usable)


def test_amx_status_says_why():
    """The AMX unit is used exactly where CPUID has AMX-BF16 and Linux grants the tile state;
    elsewhere `cpu_amx` (shown by `info`) says which of the two failed."""
    status = torchmatgrad._C.cpu_amx
    has_amx = "amx_bf16" in _cpu_flags()
    if torchmatgrad._C.cpu_isa == "amx":
        assert status == "in use"
    elif not has_amx:
        assert status == "not used: the CPU has no AMX-BF16 (CPUID leaf 7: amx_bf16, amx_tile)"
        probe = _run(["-c", "import torchmatgrad"], "amx", 120)
        assert probe.returncode != 0 and "the CPU has no AMX-BF16" in probe.stderr
    else:
        assert status.startswith("not used: "), status


def test_amx_grant_refused_falls_back():
    """With arch_prctl refused (a seccomp filter, as a container policy would), the process
    falls back to the next unit and says why; on a CPU without AMX the CPUID reason comes first."""
    code = "\n".join(
        [
            "import ctypes, struct",
            "libc = ctypes.CDLL(None, use_errno=True)",
            # BPF: load the syscall number; arch_prctl (158) -> ERRNO(EPERM), else allow.
            "f = [(0x20, 0, 0, 0), (0x15, 0, 1, 158), (6, 0, 0, 0x50001), (6, 0, 0, 0x7FFF0000)]",
            "fb = ctypes.create_string_buffer(b''.join(struct.pack('HBBI', *i) for i in f))",
            "prog = struct.pack('HxxxxxxQ', len(f), ctypes.addressof(fb))",
            "assert libc.prctl(38, 1, 0, 0, 0) == 0",  # PR_SET_NO_NEW_PRIVS
            "assert libc.prctl(22, 2, prog, 0, 0) == 0, ctypes.get_errno()",  # SECCOMP_MODE_FILTER
            "import torchmatgrad",
            "print(torchmatgrad._C.cpu_isa)",
            "print(torchmatgrad._C.cpu_amx)",
        ]
    )
    done = _run(["-c", code], "", 120)
    assert done.returncode == 0, done.stderr[-2000:]
    isa, status = done.stdout.strip().splitlines()[-2:]
    assert isa != "amx"
    if "amx_bf16" in _cpu_flags():
        assert "Linux refused the tile state" in status and "not permitted" in status, status
    else:
        assert "the CPU has no AMX-BF16" in status, status


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The /proc/cpuinfo flags each unit's code needs (csrc/cpu/isa.cpp, cpu_has).
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}
NEEDS = {
    "baseline": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": _AVX512,
    "avx512bf16": _AVX512 | {"avx512_bf16"},
    "amx": _AVX512 | {"avx512_bf16", "amx_bf16", "amx_tile"},
    "amxemu": _AVX512,
}


@pytest.mark.parametrize("isa", ["", *ISAS, *EMULATED])
def test_only_units_the_cpu_has_are_built(isa):
    """Building a unit's kernel table runs code compiled for its ISA, so on a CPU without that
    ISA it is an illegal instruction: on an AVX2-only AMD Zen 3, `import torchmatgrad` died so
    when the picker built every unit's table to choose one. A process builds the tables of the
    unit it uses (the AMX and AVX512-BF16 units are built on the avx512 one, whose per-sample
    kernels they use; by default a wide unit's process also builds avx2's for narrow calls),
    and no other."""
    if isa and (why := _usable(isa)) is not None:
        pytest.skip(f"this CPU cannot run the {isa} kernels: {why}")
    code = "import torch, torchmatgrad; print(torch.ops.torchmatgrad._cpu_units_opened())"
    done = _run(["-c", code], isa, 120)
    assert done.returncode == 0, done.stderr[-2000:]
    opened = set(done.stdout.split())
    used = isa or torchmatgrad._C.cpu_isa
    expected = {used}
    if used in ("avx512bf16", "amx", "amxemu"):
        expected.add("avx512")
    if not isa and used not in ("baseline", "avx2"):
        expected.add("avx2")
    assert opened == expected, (opened, expected)
    flags = _cpu_flags()
    for unit in opened:
        assert NEEDS[unit] <= flags, (unit, NEEDS[unit] - flags)


def test_unknown_isa_is_a_clear_import_error():
    probe = _run(["-c", "import torchmatgrad"], "sse9", 120)
    assert probe.returncode != 0
    assert "TORCHMATGRAD_CPU_ISA must name an instruction set" in probe.stderr
    assert "sse9" in probe.stderr


# The default variant is left out: every other test runs it.
@pytest.mark.parametrize("isa", [i for i in ISAS + EMULATED if i != torchmatgrad._C.cpu_isa])
def test_kernels_under_isa(isa):
    why = _usable(isa)
    if why is not None:
        pytest.skip(f"this CPU cannot run the {isa} kernels: {why}")
    args = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not cuda"]
    args += [str(TESTS / "test_linear.py"), str(TESTS / "test_accumulate.py")]
    args += [str(TESTS / "test_tiles.py")]
    done = _run(args, isa, 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
