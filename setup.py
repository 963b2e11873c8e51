"""Build torchmatgrad's C++ (and, when possible, CUDA) extension `torchmatgrad._C`.

Environment:
  USE_CUDA=0             build the CPU kernels only, even where CUDA is available.
  FORCE_CUDA=1           compile the CUDA sources even with no GPU visible (needs nvcc and a
                         CUDA build of torch).
  TORCH_CUDA_ARCH_LIST   GPU architectures; default with no GPU visible: DEFAULT_CUDA_ARCHS.
  CUDA_HOME              the CUDA toolkit; found from /usr/local/cuda (or the real nvcc) if unset.
  MAX_JOBS               parallel compile jobs (ninja).
  DEBUG=1                -O0 -g.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

# Hopper (9.0) is the target of the CUDA kernels; 8.0 keeps Ampere working.
DEFAULT_CUDA_ARCHS = "8.0;9.0"
ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """CUDA_HOME as torch would want it, before torch.utils.cpp_extension reads it at import.

    A wrapper script named nvcc on PATH (as on some machines) makes torch guess the wrong
    root, so the real toolkit is looked for first.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(
            os.path.join(root, "include")
        ):
            os.environ["CUDA_HOME"] = root
            return


_find_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _nvidia_include_dirs():
    """Headers that torch's CUDA headers include (cuBLAS, cuSPARSE, ...) but a bare toolkit
    may lack: the torch CUDA wheel ships them in site-packages/nvidia/*/include."""
    dirs = []
    try:
        import nvidia  # namespace package installed with the torch CUDA wheel
    except ImportError:
        return dirs
    for base in list(nvidia.__path__):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) or os.path.isfile(
                os.path.join(inc, "cusparse.h")
            ):
                dirs.append(inc)
    return dirs


def _want_cuda():
    if os.environ.get("USE_CUDA", "1") == "0":
        return False, "USE_CUDA=0"
    if torch.version.cuda is None:
        return False, "torch has no CUDA"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    # A toolkit and a CUDA torch but no GPU: still compile, so the CUDA sources stay built.
    return True, "CUDA toolkit and CUDA torch found"


def get_extensions():
    debug = os.environ.get("DEBUG", "0") == "1"
    with_cuda, why = _want_cuda()
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=fast lets the compiler fuse a*b+c into FMA in the CPU kernels.
    # -fopenmp: at::parallel_for is a header template over `#pragma omp parallel` (torch's CPU
    # build uses OpenMP); without the flag it silently runs on one thread.
    cxx += ["-ffp-contract=fast", "-Wno-psabi", "-fopenmp"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "(from the visible GPUs)")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _nvidia_include_dirs()
        define_macros += [
            ("TORCHMATGRAD_WITH_CUDA", None),
            ("TORCHMATGRAD_CUDA_ARCHS", '"' + archs.replace('"', "") + '"'),
        ]
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + [
            "--expt-relaxed-constexpr",
            "-lineinfo",
        ]
        ext_cls = CUDAExtension
        print(
            f"torchmatgrad: building CPU + CUDA kernels ({why}); CUDA_HOME={CUDA_HOME}; "
            f"TORCH_CUDA_ARCH_LIST={archs}",
            file=sys.stderr,
        )
    else:
        ext_cls = CppExtension
        print(f"torchmatgrad: building CPU kernels only ({why})", file=sys.stderr)
    # -lstdc++ before the driver's own libraries: the shared libstdc++ (the one torch uses) even
    # where the toolchain links it statically by default. Seen on the GPU machine (/opt/gcc g++
    # 13.3): the extension carried a private static copy of libstdc++ next to the process's shared
    # one, and number formatting in error messages broke (the shape errors of the CUDA ops
    # segfaulted; here, simulated with LDFLAGS=-static-libstdc++, "got shape [" came out cut).
    link_args = ["-fopenmp"] + (["-lstdc++"] if sys.platform.startswith("linux") else [])
    return [
        ext_cls(
            "torchmatgrad._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=link_args,
            py_limited_api=False,
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
