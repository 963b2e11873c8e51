"""torchmatgrad: the derivative of W·x, exact and fast.

``torchmatgrad.linear`` and ``torchmatgrad.nn.Linear`` are drop-ins for ``F.linear`` and
``nn.Linear`` backed by hand-written CPU and CUDA kernels; ``torchmatgrad.jacobian`` gives the
explicit derivatives of W·x; ``torchmatgrad.per_sample`` per-sample gradient norms and DP-SGD
clipping in one backward. ``torchmatgrad.testing`` holds the tolerance policy, input makers
and check cells the tests and tools share; the commands (``python -m torchmatgrad``) live in
``torchmatgrad.cli``.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import (
    _C,  # noqa: F401  (runs the op registrations)
    curvature,
    distributed,  # noqa: F401  (DTensor sharding rules for tensor parallelism)
    nn,
    opacus_support,  # noqa: F401  (Opacus samplers, registered when opacus is imported)
    per_sample,
    policy,
)
from ._version import __version__
from .jacobian import jacobian
from .mode import LinearMode, linear_mode
from .ops import cpu_cached_bytes, empty_cache, linear

__all__ = [
    "LinearMode",
    "cpu_cached_bytes",
    "curvature",
    "empty_cache",
    "jacobian",
    "linear",
    "linear_mode",
    "nn",
    "per_sample",
    "policy",
    "__version__",
]
