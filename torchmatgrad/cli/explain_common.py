"""What the ``explain`` walkthroughs share: printing of vectors and matrices, section headers,
and the checker that compares each printed result with its float64 autograd reference.

explain.py (W·x), explain_per_sample.py (``--per-sample``) and explain_curvature.py
(``--curvature``) all import it; none of them imports another.
"""

from __future__ import annotations

from torch import Tensor

from ..testing import compare

__all__ = ["Checker", "header", "matrix", "row"]


def row(v: Tensor) -> str:
    return "[ " + "  ".join(f"{float(a):+.4f}" for a in v.reshape(-1).tolist()) + " ]"


def matrix(t: Tensor, indent: str = "    ") -> str:
    t = t.double().cpu()
    if t.dim() == 1:
        return indent + row(t)
    return "\n".join(indent + row(r) for r in t)


def header(title: str) -> None:
    print()
    print(title)
    print("-" * min(len(title), 100))


class Checker:
    """Compares results with float64 autograd references under torchmatgrad.testing's
    tolerance policy and remembers mismatches."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.count = 0

    def check(
        self, what: str, got: Tensor, ref: Tensor, *, k: int = 1, scale: float | None = None
    ) -> None:
        """Print and record whether got ≈ ref; ``k`` terms were summed into each entry and
        ``scale`` bounds their Σ|terms| (default max|ref|)."""
        self.count += 1
        if tuple(got.shape) != tuple(ref.shape):
            self.failures.append(what)
            print(f"  {what}: MISMATCH (shape {list(got.shape)} vs {list(ref.shape)})")
            return
        ok, err, tol = compare(got.detach(), ref, k=k, scale=scale)
        if not ok:
            self.failures.append(what)
        verdict = "matches" if ok else "MISMATCH"
        print(f"  {what}: {verdict} (max abs error {err:.3e}, tolerance {tol:.1e})")
