"""``python -m torchmatgrad explain``: the derivative of W·x, printed and checked against autograd.

For a small random W (n×m) and x (m) it prints the index formula and the 3rd-order Jacobian slice
by slice, both vec (Kronecker) forms, the backprop outer product g·xᵀ, and the JVP along a random
direction and along all-ones, each compared with ``torch.autograd.functional.jacobian`` (max abs
error). Exit status: 0 when everything matches, 1 on a mismatch, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from ..jacobian import JacobianOperator, jacobian
from ..testing import DTYPES, generator, rand
from .explain_common import Checker, header, matrix

__all__ = ["build_parser", "main"]

PROG = "python -m torchmatgrad explain"


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def build_parser() -> _ArgumentParser:
    """The options of ``python -m torchmatgrad explain``."""
    p = _ArgumentParser(
        prog=PROG,
        description="Print the derivative of f = W·x (W: n×m, x: m) in index, vec/Kronecker and "
        "backprop form, each checked against torch.autograd.functional.jacobian.",
    )
    p.add_argument("--n", type=_positive_int, default=2, help="rows of W, len(f) (default 2)")
    p.add_argument("--m", type=_positive_int, default=3, help="columns of W, len(x) (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float64",
        help="dtype of W and x (default float64); references are computed in float64",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--per-sample",
        action="store_true",
        help="per-sample gradients of W·x and DP-SGD clipping instead (docs/per_sample.md)",
    )
    p.add_argument(
        "--curvature",
        action="store_true",
        help="second derivatives through W·x and K-FAC instead (docs/curvature.md)",
    )
    p.add_argument("--B", type=_positive_int, default=3, help="--per-sample: samples (default 3)")
    p.add_argument("--T", type=_positive_int, default=2, help="--per-sample: rows per sample (2)")
    return p


# ---- the walkthrough -----------------------------------------------------------------------


def _explain(n: int, m: int, seed: int, dtype: torch.dtype, device: torch.device) -> int:
    gen = generator(seed)

    def draw(*shape: int) -> Tensor:
        return rand(*shape, device=device, dtype=dtype, generator=gen)

    W, x, g, dW = draw(n, m), draw(m), draw(n), draw(n, m)
    # float64 copies of the very same values, for the autograd references.
    W64, x64, g64, dW64 = (t.double() for t in (W, x, g, dW))
    f64 = W64 @ x64
    J_ref = torch.autograd.functional.jacobian(lambda w: w @ x64, W64)  # (n, n, m)
    checker = Checker()
    dname = str(dtype).removeprefix("torch.")

    print(f"The derivative of f = W·x   (n = {n}, m = {m}, dtype = {dname}, seed = {seed})")
    print(f"W ({n}×{m}):")
    print(matrix(W))
    print(f"x ({m}):")
    print(matrix(x))
    print(f"f = W·x ({n}):")
    print(matrix(f64))
    print("References: torch.autograd.functional.jacobian(lambda W: W @ x, W) in float64.")

    # 1. index form / 3rd-order tensor
    header(f"[1] Index form: ∂f_i/∂W_kl = δ_ik·x_l  (3rd-order tensor J, shape ({n}, {n}, {m}))")
    print("  layout J[i, k, l]: output index i first, then W's (k, l)  (numerator layout)")
    print("  call: torchmatgrad.jacobian(W, x)  # wrt='weight', form='tensor'")
    J = jacobian(W, x)
    for i in range(n):
        print(f"  J[{i}, :, :] = ∂f_{i}/∂W  (row {i} is xᵀ, all other rows 0)")
        print(matrix(J[i], "      "))
    checker.check("tensor J vs autograd", J, J_ref)

    # 2./3. vec forms
    header(f"[2] vec form, column-major vec(W) = W.t().reshape(-1): ∂f/∂vec(W) = xᵀ ⊗ I_{n}")
    print(f"  shape ({n}, {n * m}); column l·n + k holds ∂f/∂W_kl")
    print("  call: torchmatgrad.jacobian(W, x, form='vec', order='col')")
    V_col = jacobian(W, x, form="vec", order="col")
    print(matrix(V_col))
    ref_col = torch.autograd.functional.jacobian(
        lambda v: v.reshape(m, n).t() @ x64, W64.t().reshape(-1)
    )
    checker.check("xᵀ ⊗ I_n vs autograd on W.t().reshape(-1)", V_col, ref_col)

    header(f"[3] vec form, row-major W.reshape(-1) (torch flatten): ∂f/∂W.reshape(-1) = I_{n} ⊗ xᵀ")
    print(f"  shape ({n}, {n * m}); column k·m + l holds ∂f/∂W_kl")
    print("  call: torchmatgrad.jacobian(W, x, form='vec', order='row')")
    V_row = jacobian(W, x, form="vec", order="row")
    print(matrix(V_row))
    ref_row = torch.autograd.functional.jacobian(lambda v: v.reshape(n, m) @ x64, W64.reshape(-1))
    checker.check("I_n ⊗ xᵀ vs autograd on W.reshape(-1)", V_row, ref_row)

    # 4. backprop: the outer product
    op = jacobian(W, x, form="operator")
    assert isinstance(op, JacobianOperator)
    header("[4] Backprop, scalar loss L with upstream g = ∂L/∂f: ∂L/∂W = g·xᵀ (outer product)")
    print(f"  g ({n}):")
    print(matrix(g))
    print("  call: torchmatgrad.jacobian(W, x, form='operator').vjp(g)")
    print("        # one torch.ops.torchmatgrad.linear_backward call; = Σ_i g_i·J[i]")
    gxt = op.vjp(g)
    print(matrix(gxt))
    checker.check("g·xᵀ vs Σ_i g_i·J_autograd[i]", gxt, torch.einsum("i,ikl->kl", g64, J_ref))

    # 5. JVP along a random direction
    header("[5] JVP along a random direction dW: J·dW = Σ_kl J[:, k, l]·dW_kl = dW·x")
    print(f"  dW ({n}×{m}):")
    print(matrix(dW))
    print("  call: op.jvp(dW)  # one torchmatgrad.linear call")
    jv = op.jvp(dW)
    print(matrix(jv))
    scale = (dW64.abs() @ x64.abs()).max().item()
    checker.check(
        "dW·x vs J_autograd·dW", jv, torch.einsum("ikl,kl->i", J_ref, dW64), k=m, scale=scale
    )

    # 6. JVP along all-ones: the circulating wrong answer
    ones = torch.ones(n, m, dtype=dtype, device=device)
    ones64 = ones.double()
    s = x64.sum()
    header("[6] JVP along dW = all-ones 1_{n×m}: J·1 = 1·x = (xᵀ·1_m)·1_n")
    print(f"  xᵀ·1_m = Σ_l x_l = {s.item():+.4f}")
    print("  call: op.jvp(torch.ones(n, m))")
    jv1 = op.jvp(ones)
    print(matrix(jv1))
    print("  (xᵀ·1_m)·1_n:")
    print(matrix(s * torch.ones(n, dtype=torch.float64)))
    scale1 = float(x64.abs().sum().item())
    checker.check(
        "J·1 vs J_autograd·1", jv1, torch.einsum("ikl,kl->i", J_ref, ones64), k=m, scale=scale1
    )
    checker.check(
        "J·1 vs (xᵀ·1_m)·1_n", jv1, s * torch.ones(n, dtype=torch.float64), k=m, scale=scale1
    )
    print(
        "  This n-vector is the directional derivative of W·x along dW = all-ones, NOT the\n"
        f"  Jacobian: J has n·n·m = {n * n * m} entries, δ_ik·x_l, mostly 0 and none of them 1\n"
        "  in general."
    )

    print()
    if checker.failures:
        print(f"MISMATCH in {len(checker.failures)} of {checker.count} checks: ", end="")
        print("; ".join(checker.failures))
        return 1
    print(f"All {checker.count} checks match torch.autograd.functional.jacobian.")
    return 0


def main(argv: list[str] | Sequence[str] | None = None) -> int:
    """Run ``explain``.

    Args:
        argv: the arguments after ``explain`` (``sys.argv[1:]`` when None), e.g.
            ``["--n", "2", "--m", "3", "--seed", "0", "--dtype", "float64"]``.

    Returns:
        0 when every result matches autograd, 1 on a mismatch, 2 on bad arguments (after a
        one-line error on stderr).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"argument --device: unknown device {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("argument --device: CUDA is not available")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"argument --device: expected cpu or cuda, got {args.device!r}")
    except SystemExit as e:  # --help (0) or a bad argument (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.per_sample:
        from .explain_per_sample import explain as explain_per_sample

        return explain_per_sample(
            args.n, args.m, args.B, args.T, args.seed, DTYPES[args.dtype], device
        )
    if args.curvature:
        from .explain_curvature import explain as explain_curvature

        return explain_curvature(
            args.n, args.m, args.B, args.T, args.seed, DTYPES[args.dtype], device
        )
    return _explain(args.n, args.m, args.seed, DTYPES[args.dtype], device)


if __name__ == "__main__":
    raise SystemExit(main())
