"""Check cells, the op-check table and the runner shared by the tests and ``check``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import linear
from .inputs import generator, linear_inputs, rand
from .tolerance import assert_close


@dataclass
class Check:
    """One row of a table: `applies(device, dtype)` returns None or the reason it does not
    apply; `run(device, dtype)` raises AssertionError on a mismatch."""

    name: str
    run: Callable[[str, torch.dtype], None]
    applies: Callable[[str, torch.dtype], str | None] = lambda d, t: None


def _float64_only(device: str, dtype: torch.dtype) -> str | None:
    return None if dtype == torch.float64 else "numerical gradient checks need float64"


# ---- op checks ----------------------------------------------------------------------------

_ops = torch.ops.torchmatgrad


def _check_forward(device, dtype):
    g = generator(1)
    for shape in [(5,), (3, 5), (2, 3, 5)]:
        x, w, b = (rand(*s, device=device, dtype=dtype, generator=g) for s in (shape, (4, 5), (4,)))
        ref = F.linear(x.double(), w.double(), b.double())
        assert_close(
            _ops.linear(x, w, b), ref, k=5, peers=[F.linear(x, w, b)], what=f"forward {shape}"
        )


def _check_backward_op(device, dtype):
    g = generator(2)
    x, w, go = (rand(*s, device=device, dtype=dtype, generator=g) for s in ((3, 5), (4, 5), (3, 4)))
    gi, gw, gb = _ops.linear_backward(go, x, w, [True, True, True])
    G, X, W = go.double(), x.double(), w.double()
    assert_close(gi, G @ W, k=4, peers=[go @ w], what="grad_input = G·W")
    assert_close(gw, G.t() @ X, k=3, peers=[go.t() @ x], what="grad_weight = Gᵀ·X")
    assert_close(gb, G.sum(0), k=3, peers=[go.sum(0)], what="grad_bias = ΣG")


def _jacobians(fn, x, w, b):
    return torch.autograd.functional.jacobian(fn, (x, w, b))


def _check_jacobian(device, dtype):
    x, w, b = linear_inputs(device, dtype, 3, rows=(), n=3, m=4, requires_grad=False)
    ours = _jacobians(linear, x, w, b)
    ref = _jacobians(F.linear, x.double(), w.double(), b.double())
    # Every entry is one product with a one-hot vector: exact up to one rounding (k = 1).
    for name, a, r in zip(("x", "W", "b"), ours, ref, strict=True):
        assert_close(a, r, what=f"d(Wx+b)/d{name}")
    # The 3rd-order tensor itself: J[i, k, l] = δ_ik·x_l, shape (n, n, m).
    expected = torch.einsum("ik,l->ikl", torch.eye(3, dtype=torch.float64), x.double().cpu())
    assert_close(ours[1], expected, what="d(Wx)/dW = δ_ik·x_l")


def _check_gradcheck(device, dtype):
    x, w, b = linear_inputs(device, dtype, 4, rows=(2,), m=3)
    assert torch.autograd.gradcheck(linear, (x, w, b))


OP_CHECKS = [
    Check("forward vs float64", _check_forward),
    Check("backward op vs G·W, Gᵀ·X, ΣG", _check_backward_op),
    Check("Jacobians vs autograd.functional", _check_jacobian),
    Check("gradcheck", _check_gradcheck, _float64_only),
]


def run_table(checks: list[Check], devs: list[str], dtypes: list[torch.dtype]):
    """Run every applicable cell; returns (rows, failures) where rows[i] is the list of cell
    strings for checks[i]."""
    rows, failures, notes = [], [], {}
    for check in checks:
        cells = []
        for dev in devs:
            for dt in dtypes:
                reason = check.applies(dev, dt)
                if reason is not None:
                    cells.append("n/a")
                    notes.setdefault(check.name, reason)
                    continue
                try:
                    check.run(dev, dt)
                    cells.append("pass")
                except Exception as exc:  # noqa: BLE001 - every failure is reported
                    cells.append("FAIL")
                    failures.append(f"{check.name} [{dev}, {dt}]: {type(exc).__name__}: {exc}")
        rows.append(cells)
    return rows, failures, notes
