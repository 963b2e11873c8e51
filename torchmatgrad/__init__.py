"""torchmatgrad: the derivative of W·x, exact and fast."""

from . import _C  # noqa: F401  (runs the op registrations)
