"""torchmatgrad: the derivative of W·x, exact and fast.

``torchmatgrad.linear`` and ``torchmatgrad.nn.Linear`` are drop-ins for ``F.linear`` and
``nn.Linear`` backed by hand-written CPU and CUDA kernels; ``torchmatgrad.jacobian`` gives the
explicit derivatives of W·x.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import (
    _C,  # noqa: F401  (runs the op registrations)
    distributed,  # noqa: F401  (DTensor sharding rules for tensor parallelism)
    nn,
)
from .jacobian import jacobian
from .ops import linear

__version__ = "0.1.0"

__all__ = ["jacobian", "linear", "nn", "__version__"]
