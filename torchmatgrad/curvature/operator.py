"""The Kronecker-factored curvature of a model's linear layers as a lazy operator.

One block per layer. With the weight W [n, m] flattened row-major (torch's ``W.reshape(-1)``),
K-FAC's block is G ⊗ A (G [n, n] the output-gradient factor, A [m, m] the input factor), and
(G ⊗ A)·vec(M) = vec(G·M·A) for M [n, m]: never the n·m × n·m matrix. With the bias joined
("append 1 to x"), M is [W | b] [n, m + 1] and A is [m + 1, m + 1]; with the bias separate its
block is G alone. The eigendecomposition is per factor, G = Q_G·diag(λ_G)·Q_Gᵀ and
A = Q_A·diag(λ_A)·Q_Aᵀ, so the block's eigenvalues are E = λ_G·λ_Aᵀ [n, m] in the basis
Q_G ⊗ Q_A; EK-FAC keeps that basis and replaces E by corrected eigenvalues. Everything else
follows from (Q, E) per block:

* (K + δI)⁻¹·v = Q·diag(1/(E + δ))·Qᵀ·v (exact for the damped Kronecker block, no n·m inverse);
* log det(K + δI) = Σ log(E + δ);  tr(K) = Σ E = tr(G)·tr(A).

Vectors are either one flat tensor [P] (P = Σ numel of the parameters, in ``params`` order:
each layer's weight then bias) or a list of tensors shaped like ``params``; a matrix is [P, K].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["KroneckerBlock", "KroneckerOperator"]


@dataclasses.dataclass
class KroneckerBlock:
    """One layer's block.

    Attributes:
        name: the layer's module name.
        weight, bias: the layer's parameters (bias None when absent).
        G (Tensor[n, n] | None): the output-gradient factor (None for an eigen-only block).
        A (Tensor[m(+1), m(+1)] | None): the input factor, [m + 1, m + 1] when ``joint``.
        joint: the bias is the last column of [W | b] (its 1 appended to x), else separate.
        Q_G, Q_A, E, E_bias: eigenbasis and eigenvalues ([n, m(+1)], and [n] for a separate
            bias); filled by :meth:`KroneckerOperator.eigh` or given (EK-FAC).
    """

    name: str
    weight: Tensor
    bias: Tensor | None
    G: Tensor | None
    A: Tensor | None
    joint: bool
    Q_G: Tensor | None = None
    Q_A: Tensor | None = None
    E: Tensor | None = None
    E_bias: Tensor | None = None

    @property
    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def eigh(self) -> None:
        if self.E is not None:
            return
        lam_g, self.Q_G = torch.linalg.eigh(self.G)
        lam_a, self.Q_A = torch.linalg.eigh(self.A)
        self.E = torch.outer(lam_g, lam_a)
        if self.bias is not None and not self.joint:
            self.E_bias = lam_g


def _kron_apply(G: Tensor, M: Tensor, A: Tensor) -> Tensor:
    """G·M_k·A for every column k: M [n, m, K] -> [n, m, K]."""
    return torch.einsum("ij,jkv,kl->ilv", G, M, A)


def _eig_apply(Q_G: Tensor, Q_A: Tensor, scale: Tensor, M: Tensor) -> Tensor:
    """Q·diag(scale)·Qᵀ with Q = Q_G ⊗ Q_A: M [n, m, K] -> [n, m, K]."""
    rot = torch.einsum("ji,jkv,kl->ilv", Q_G, M, Q_A)
    rot.mul_(scale.unsqueeze(-1))
    return torch.einsum("ij,jkv,lk->ilv", Q_G, rot, Q_A)


class KroneckerOperator:
    """Block-diagonal Kronecker-factored curvature over the given layers' parameters.

    Args:
        blocks: one :class:`KroneckerBlock` per layer.
        eigen: apply the blocks through their eigendecomposition (Q, E) instead of G·M·A
            (EK-FAC, whose E is not λ_G·λ_Aᵀ).
    """

    def __init__(self, blocks: Sequence[KroneckerBlock], *, eigen: bool = False) -> None:
        self.blocks = list(blocks)
        self.params = [p for b in self.blocks for p in b.params]
        self.numel = sum(p.numel() for p in self.params)
        self.shape = (self.numel, self.numel)
        self._eigen = eigen

    # ---- vectors ----------------------------------------------------------------------------

    def _split(self, v: Tensor | Sequence[Tensor]) -> tuple[list[Tensor], bool, bool]:
        """v as a list of [*param.shape, K] and how it came (flat?, had a K column?)."""
        if isinstance(v, Tensor):
            if v.dim() not in (1, 2) or v.shape[0] != self.numel:
                raise ValueError(
                    f"v must have shape [{self.numel}] or [{self.numel}, K], got {list(v.shape)}"
                )
            vec = v.dim() == 1
            V = v.unsqueeze(1) if vec else v
            parts, off = [], 0
            for p in self.params:
                parts.append(V[off : off + p.numel()].reshape(*p.shape, V.shape[1]))
                off += p.numel()
            return parts, True, vec
        v = list(v)
        if len(v) != len(self.params) or any(
            t.shape != p.shape for t, p in zip(v, self.params, strict=True)
        ):
            raise ValueError(
                "v must be a list of tensors shaped like the operator's parameters "
                f"{[list(p.shape) for p in self.params]}, got {[list(t.shape) for t in v]}"
            )
        return [t.unsqueeze(-1) for t in v], False, True

    @staticmethod
    def _join(parts: list[Tensor], flat: bool, vec: bool):
        if not flat:
            return [t.squeeze(-1) for t in parts]
        out = torch.cat([t.reshape(-1, t.shape[-1]) for t in parts])
        return out.squeeze(1) if vec else out

    def _apply(self, v, weight_fn, bias_fn):
        parts, flat, vec = self._split(v)
        out, i = [], 0
        for blk in self.blocks:
            Mw = parts[i]
            if blk.bias is not None and blk.joint:
                M = torch.cat([Mw, parts[i + 1].unsqueeze(1)], dim=1)
                R = weight_fn(blk, M)
                out += [R[:, :-1], R[:, -1]]
                i += 2
                continue
            out.append(weight_fn(blk, Mw))
            i += 1
            if blk.bias is not None:
                out.append(bias_fn(blk, parts[i]))
                i += 1
        return self._join(out, flat, vec)

    # ---- products ---------------------------------------------------------------------------

    def matvec(self, v):
        """K·v for v [P], [P, K] or a list shaped like ``params``."""
        if self._eigen:
            return self._scaled(v, lambda E: E)
        return self._apply(
            v,
            lambda b, M: _kron_apply(b.G, M, b.A),
            lambda b, M: b.G @ M,
        )

    __matmul__ = matvec

    def _scaled(self, v, fn):
        self.eigh()
        return self._apply(
            v,
            lambda b, M: _eig_apply(b.Q_G, b.Q_A, fn(b.E), M),
            lambda b, M: b.Q_G @ (fn(b.E_bias).unsqueeze(-1) * (b.Q_G.t() @ M)),
        )

    def inverse_matvec(self, v, damping: float = 0.0):
        """(K + δ·I)⁻¹·v, exact for each damped block (through its eigendecomposition)."""
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        return self._scaled(v, lambda E: 1.0 / (E + damping))

    def inverse(self, damping: float = 0.0) -> _Inverse:
        """(K + δ·I)⁻¹ as an operator (``@`` applies it)."""
        self.eigh()
        return _Inverse(self, damping)

    # ---- spectral quantities ----------------------------------------------------------------

    def eigh(self) -> list[KroneckerBlock]:
        """Eigendecompose every block (per factor, cached); returns the blocks with Q_G, Q_A,
        E (and E_bias) filled."""
        for b in self.blocks:
            b.eigh()
        return self.blocks

    def eigenvalues(self) -> Tensor:
        """All P eigenvalues (unsorted, block by block)."""
        self.eigh()
        parts = []
        for b in self.blocks:
            parts.append(b.E.reshape(-1))
            if b.E_bias is not None:
                parts.append(b.E_bias)
        return torch.cat(parts)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """log det(K + δ·I) = Σ log(E + δ)."""
        return (self.eigenvalues() + damping).log().sum()

    def trace(self) -> Tensor:
        """tr(K): Σ tr(G)·tr(A) (+ tr(G) for a separate bias), or Σ E for EK-FAC."""
        if self._eigen:
            return self.eigenvalues().sum()
        total = 0.0
        for b in self.blocks:
            tg = b.G.trace()
            total = total + tg * b.A.trace()
            if b.bias is not None and not b.joint:
                total = total + tg
        return total

    def to_dense(self) -> Tensor:
        """The P × P matrix (for tests and small models): K applied to the identity."""
        p0 = self.params[0]
        eye = torch.eye(self.numel, dtype=p0.dtype, device=p0.device)
        return self.matvec(eye)


class _Inverse:
    """(K + δ·I)⁻¹ of a :class:`KroneckerOperator` (apply with ``@`` or :meth:`matvec`)."""

    def __init__(self, op: KroneckerOperator, damping: float) -> None:
        self.op, self.damping, self.shape = op, damping, op.shape

    def matvec(self, v):
        return self.op.inverse_matvec(v, self.damping)

    __matmul__ = matvec

    def logdet(self) -> Tensor:
        return -self.op.logdet(self.damping)
