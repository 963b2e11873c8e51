"""What the tests and the tools check with: one tolerance policy, the input makers, the cells.

**Tolerance policy.** Every comparison of a result with the truth, in the tests, in
``python -m torchmatgrad check`` and ``explain`` and in the GPU scripts, goes through
:func:`assert_close` (or :func:`compare`, which returns the verdict instead of raising):

* the reference is computed in float64 from the very same input values (upcast exactly);
* float32 / float64: ``max|got - ref| ≤ FP_FACTOR · eps · scale · √k``, with ``k`` the number of
  terms summed into one result (the reduction length; use the longest chain for composites)
  and ``scale = max(1, max|ref|)``, or a bound of Σ|terms| given by the caller;
* bfloat16 / float16 with peers (torch's own result in the same dtype, another kernel):
  ``≤ PEER_FACTOR · (largest peer error) + eps · scale``: at most about twice torch's own error
  plus one rounding at the largest value (flash-attention's rule);
* bfloat16 / float16 without peers: ``eps · scale + FP_FACTOR · eps(float32) · scale · √k``:
  one rounding of the result to 16 bits plus float32 accumulation of k terms.

**Inputs.** :func:`rand` makes fresh standard-normal values in float64 and casts them (so a
reference built from ``.double()`` sees exactly the same numbers), never zeros;
:func:`poison_allocator` leaves NaN where the next output is likely to be allocated.

**Cells.** Two tables of check cells, run by tests/test_linear.py, tests/test_transforms.py and
``python -m torchmatgrad check``, so the printed matrix and the test suite cannot disagree:

* the op checks (:data:`OP_CHECKS`): for each device and dtype, the forward, the backward op and
  the Jacobians with respect to W, x and b against ``torch.autograd.functional.jacobian`` of a
  float64 reference, plus ``gradcheck`` in float64;
* the transform conformance matrix (:data:`TRANSFORMS`): rows are PyTorch transforms (double
  backward, forward-mode AD, vmap, jacrev/jacfwd, autocast, torch.compile, ...), columns are
  device × dtype, cells are pass / FAIL / n/a with the reason.

The package, by concern: :mod:`.tolerance` (the policy), :mod:`.inputs` (the input makers),
:mod:`.cells` (the cell type, the op checks, :func:`run_table`) and :mod:`.transforms` (the
transform conformance cells). Import everything from ``torchmatgrad.testing``.
"""

from __future__ import annotations

from .cells import OP_CHECKS, Check, run_table
from .inputs import OpLog, double_leaves, generator, linear_inputs, poison_allocator, rand
from .tolerance import (
    DTYPES,
    FP_FACTOR,
    LOW_PRECISION,
    PEER_FACTOR,
    SHORT_NAMES,
    Comparison,
    accumulate_dtype,
    assert_close,
    compare,
    devices,
    max_error,
    reference_scale,
    tolerance,
)
from .transforms import TRANSFORMS

__all__ = [
    "Check",
    "Comparison",
    "DTYPES",
    "FP_FACTOR",
    "LOW_PRECISION",
    "OP_CHECKS",
    "OpLog",
    "PEER_FACTOR",
    "SHORT_NAMES",
    "TRANSFORMS",
    "accumulate_dtype",
    "assert_close",
    "compare",
    "devices",
    "double_leaves",
    "generator",
    "linear_inputs",
    "max_error",
    "poison_allocator",
    "rand",
    "reference_scale",
    "run_table",
    "tolerance",
]
