"""What the GPU check runs on, whether the build is the one wanted, and what its kernels use.

    python -m scripts.gpu_env                    # machine, software, extension; exit 0
    python -m scripts.gpu_env --require-cuda     # exit 1 unless the CUDA kernels are built,
                                                 # registered and compiled for the visible GPU
    python -m scripts.gpu_env --stamp            # print the build stamp (see below)
    python -m scripts.gpu_env --kernels [--filter torchmatgrad]
        # every device function in the extension (cuobjdump -res-usage): registers, stack,
        # shared and local memory; exit 1 if one lacks the sanitizer's filter string

The build stamp is a hash of everything a build depends on here: the sources under csrc/,
setup.py, the Python and torch versions and TORCH_CUDA_ARCH_LIST. scripts/gpu_check.sh stores
it beside an in-place build and skips the next build when it still matches (a machine kept warm,
or an extension carried to a fresh machine).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Python packages the stages use, beyond torch (the device image is fixed: report what it has).
PACKAGES = ("pytest", "hypothesis", "xdist", "pytest_timeout", "expecttest", "tqdm", "matplotlib")


def build_stamp(root: Path = ROOT, arch_list: str | None = None) -> str:
    """sha256 over csrc/**, setup.py, the Python and torch versions and the arch list."""
    import torch

    h = hashlib.sha256()
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    for p in [*files, root / "setup.py"]:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if arch_list is None else arch_list
    h.update(f"{platform.python_version()}\0{torch.__version__}\0{arch}".encode())
    return h.hexdigest()[:16]


def _tool(name: str) -> str | None:
    """A CUDA tool from PATH, $CUDA_HOME/bin or /usr/local/cuda/bin."""
    found = shutil.which(name)
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.access(os.path.join(base, "bin", name), os.X_OK):
            return os.path.join(base, "bin", name)
    return None


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({type(e).__name__})"
    return out.splitlines()[-1] if out else "?"


def describe() -> list[str]:
    """The machine and the software, one fact a line."""
    import torch

    lines = [
        f"python {platform.python_version()} at {sys.executable}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), {os.cpu_count()} CPUs",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) >> 20} MiB"
            )
    else:
        lines.append("no CUDA GPU visible")
    for tool in ("nvcc", "compute-sanitizer", "cuobjdump"):
        path = _tool(tool)
        lines.append(f"{tool}: {_version([path, '--version']) if path else 'not found'}")
    have = [p for p in PACKAGES if importlib.util.find_spec(p) is not None]
    missing = ", ".join(p for p in PACKAGES if p not in have) or "-"
    lines.append(f"packages: {', '.join(have)}; missing: {missing}")
    return lines


def extension_report(require_cuda: bool) -> tuple[list[str], list[str]]:
    """(facts, problems) about the in-place build of torchmatgrad._C."""
    import torch

    try:
        import torchmatgrad
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return [], [f"import torchmatgrad failed: {type(e).__name__}: {e}"]
    c = torchmatgrad._C
    with_cuda = bool(getattr(c, "with_cuda", 0))
    archs = str(getattr(c, "cuda_arch_list", ""))
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("torchmatgrad::linear", "CUDA")
    where = Path(c.__file__)
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    facts = [
        f"torchmatgrad {torchmatgrad.__version__} from {where}",
        f"built with CUDA: {'yes, archs ' + archs if with_cuda else 'no'}; CUDA kernels "
        f"registered: {'yes' if registered else 'no'}",
    ]
    problems = []
    if require_cuda:
        if not with_cuda:
            problems.append("the extension was built without CUDA")
        if not registered:
            problems.append("no CUDA kernel registered for torchmatgrad::linear")
        if with_cuda and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            built = {a.strip().removesuffix("+PTX").replace("a", "") for a in archs.split(";")}
            if f"{major}.{minor}" not in built:
                problems.append(
                    f"built for {archs or '?'}, but the GPU is {major}.{minor}: rebuild with "
                    f"TORCH_CUDA_ARCH_LIST={major}.{minor}"
                )
    return facts, problems


_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_res_usage(text: str) -> list[tuple[str, dict[str, int]]]:
    """(mangled name, {REG, STACK, SHARED, LOCAL}) for each function of cuobjdump -res-usage."""
    out: list[tuple[str, dict[str, int]]] = []
    name = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        if name is not None:
            out.append((name, {k: int(v) for k, v in _USAGE.findall(line)}))
            name = None
    return out


def _short(name: str) -> str:
    """The kernel's own name and template arguments from a mangled name (enough to tell the
    instantiations apart; c++filt is not always there)."""
    m = re.search(r"(linear_\w+?kernel_[a-z_]+)I(.*?)EEv", name)
    return f"{m.group(1)}<{m.group(2)}>" if m else name[:100]


def kernels_report(filter_text: str) -> tuple[list[str], list[str]]:
    """(table lines, problems): every device function of the extension and its resources."""
    import torchmatgrad

    tool = os.environ.get("CUOBJDUMP") or _tool("cuobjdump")
    if tool is None:
        return ["skipped: cuobjdump not found"], ["skipped"]
    so = torchmatgrad._C.__file__
    run = subprocess.run([tool, "-res-usage", so], capture_output=True, text=True, timeout=120)
    funcs = parse_res_usage(run.stdout)
    if not funcs:
        return [f"cuobjdump found no device functions in {so}: {run.stderr.strip()[:200]}"], [
            "no device code in the extension"
        ]
    lines = [f"{'kernel':70s} {'REG':>4s} {'STACK':>5s} {'SHARED':>6s} {'LOCAL':>5s}"]
    for name, use in funcs:
        lines.append(
            f"{_short(name)[:70]:70s} {use.get('REG', 0):4d} {use.get('STACK', 0):5d} "
            f"{use.get('SHARED', 0):6d} {use.get('LOCAL', 0):5d}"
        )
    unmatched = [n for n, _ in funcs if filter_text not in n]
    spills = [n for n, u in funcs if u.get("LOCAL", 0) > 0]
    lines.append(
        f"{len(funcs)} device functions; {len(funcs) - len(unmatched)} match the sanitizer filter "
        f"kns={filter_text}; {len(spills)} use local memory (spills)"
    )
    problems = [f"not matched by kns={filter_text}: {_short(n)}" for n in unmatched]
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--require-cuda", action="store_true", help="fail unless CUDA kernels work")
    p.add_argument("--stamp", action="store_true", help="print the build stamp only")
    p.add_argument("--kernels", action="store_true", help="list the device functions")
    p.add_argument("--filter", default="torchmatgrad", help="sanitizer kernel filter (kns=)")
    args = p.parse_args(argv)
    if args.stamp:
        print(build_stamp())
        return 0
    if args.kernels:
        lines, problems = kernels_report(args.filter)
    else:
        lines = describe()
        facts, problems = extension_report(args.require_cuda)
        lines += facts
    print("\n".join(lines))
    if problems == ["skipped"]:
        return 77  # the tool to look with is missing: nothing was checked
    for problem in problems:
        print("PROBLEM: " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
