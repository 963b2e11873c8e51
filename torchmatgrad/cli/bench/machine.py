"""The machine a benchmark runs on: CPU/GPU names, cache sizes, the software and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import torchmatgrad

from ... import policy
from .. import info


def _git_commit() -> tuple[str | None, bool | None]:
    """(short commit, dirty) of the checkout torchmatgrad is imported from; (None, None) if
    that is not a git checkout or git is missing."""
    where = os.path.dirname(os.path.abspath(torchmatgrad.__file__))

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", "-C", where, *args], capture_output=True, text=True, timeout=10, check=True
        )
        return run.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit or None, bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def _cpu_llc_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs), 32 MiB if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in base.glob("index*"):
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def _cache_bytes(device: torch.device) -> int:
    """Last-level cache size of ``device`` (GPU L2 or CPU LLC)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    return _cpu_llc_bytes()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor})"
    return policy.cpu_model()


def machine_info(devices: Sequence[torch.device]) -> dict[str, Any]:
    """What the JSON records about the machine and the software."""
    commit, dirty = _git_commit()
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": policy.cpu_model(),
        "cpu_isa": info.cpu_isa(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchmatgrad": torchmatgrad.__version__,
        "torchmatgrad_with_cuda": int(getattr(torchmatgrad._C, "with_cuda", 0)),
        "git_commit": commit,
        "git_dirty": dirty,
        "fused_grad_accumulation": True,
        "devices": {str(d): _device_name(d) for d in devices},
        "cache_bytes": {str(d): _cache_bytes(d) for d in devices},
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
