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

ISAS = ("baseline", "avx2", "avx512", "avx512bf16")  # narrowest first
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


def test_unknown_isa_is_a_clear_import_error():
    probe = _run(["-c", "import torchmatgrad"], "sse9", 120)
    assert probe.returncode != 0
    assert "TORCHMATGRAD_CPU_ISA must name an instruction set" in probe.stderr
    assert "sse9" in probe.stderr


# The default variant is left out: every other test runs it.
@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa != torchmatgrad._C.cpu_isa])
def test_kernels_under_isa(isa):
    why = _usable(isa)
    if why is not None:
        pytest.skip(f"this CPU cannot run the {isa} kernels: {why}")
    args = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not cuda"]
    args += [str(TESTS / "test_linear.py"), str(TESTS / "test_accumulate.py")]
    done = _run(args, isa, 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
