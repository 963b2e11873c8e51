"""``torch.nn.MultiheadAttention`` with its projections on torchmatgrad's linear op.

torch's MHA does not call its projections through modules: ``F.multi_head_attention_forward``
reads ``in_proj_weight`` (or ``q/k/v_proj_weight`` when kdim/vdim differ) and
``out_proj.weight`` itself and calls ``F.linear`` on them. Nor can a ``TorchFunctionMode``
reach those ``F.linear`` calls: ``F.multi_head_attention_forward`` dispatches on
``__torch_function__`` itself, so a mode sees that call and torch runs its body with the mode
off. So :func:`multi_head_attention_forward` here is torch's function (same signature, same
steps in the same order, same results) with its three kinds of projection on
:func:`torchmatgrad.linear`; the attention between them is torch's
(``scaled_dot_product_attention``, or ``baddbmm``/``softmax``/``bmm`` when the weights are
returned). :class:`MultiheadAttention` is ``nn.MultiheadAttention`` calling it, and
:func:`torchmatgrad.linear_mode` routes ``F.multi_head_attention_forward`` calls to it.

torch's fused inference fast path (``torch._native_multi_head_attention``) needs eval mode and
no gradient (grad disabled, or nothing requiring grad). In exactly that case, where there is no
backward for torchmatgrad's kernels to compute, :class:`MultiheadAttention` runs
``nn.MultiheadAttention.forward`` unchanged: torch takes its fast path where its other
conditions hold (nested tensors included) and its own slow path otherwise. With
``nn.TransformerEncoderLayer``'s fast path it is the same: that layer reads the weights itself.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import linear

__all__ = ["MultiheadAttention", "multi_head_attention_forward"]


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A bool mask as an additive float one (True: -inf), as torch's MHA turns it."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _check_dims(query, key, value, key_padding_mask, attn_mask, num_heads) -> bool:
    """torch's shape rules for MHA's inputs; whether the call is batched (3-D query)."""
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 2-D (L, E) or 3-D (L, N, E), got {tuple(query.shape)}")
    batched = query.dim() == 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            f"key and value must be {query.dim()}-D as query is, got {tuple(key.shape)} and "
            f"{tuple(value.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise ValueError(
            f"key_padding_mask must be {query.dim() - 1}-D ({'(N, S)' if batched else '(S)'}), "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise ValueError(
                f"attn_mask must be 2-D (L, S) or 3-D (N·num_heads, L, S), got "
                f"{tuple(attn_mask.shape)}"
            )
        if not batched and attn_mask.dim() == 3:
            expected = (num_heads, query.shape[0], key.shape[0])
            if attn_mask.shape != expected:
                raise ValueError(f"attn_mask must be {expected}, got {tuple(attn_mask.shape)}")
    return batched


def _in_projection_packed(q, k, v, w, b):
    """q·W_qᵀ + b_q, k·W_kᵀ + b_k, v·W_vᵀ + b_v from the packed W [3E, E]: one product when
    q, k and v are one tensor (self-attention), two when k is v (torch's order and layout)."""
    e = q.size(-1)
    if k is v:
        if q is k:
            proj = linear(q, w, b)
            proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            proj = proj.contiguous()
            return proj[0], proj[1], proj[2]
        w_q, w_kv = w.split([e, e * 2])
        b_q, b_kv = (None, None) if b is None else b.split([e, e * 2])
        kv = linear(k, w_kv, b_kv)
        kv = kv.unflatten(-1, (2, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return linear(q, w_q, b_q), kv[0], kv[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return linear(q, w_q, b_q), linear(k, w_k, b_k), linear(v, w_v, b_v)


def multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """:func:`torch.nn.functional.multi_head_attention_forward` with the in- and out-projections
    on :func:`torchmatgrad.linear`; same arguments, shapes and results.

    Shapes (sequence first, as torch's function): query (Tensor[L, N, E] or [L, E]), key and
    value (Tensor[S, N, E_k] / [S, N, E_v], or unbatched), key_padding_mask ([N, S] or [S]),
    attn_mask ([L, S] or [N·num_heads, L, S]). Returns (attn_output [L, N, E],
    attn_weights [N, L, S] (averaged) / [N, num_heads, L, S] or None).
    """
    batched = _check_dims(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]

    if (
        key_padding_mask is not None
        and attn_mask is not None
        and key_padding_mask.dtype != attn_mask.dtype
    ):
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same "
            "type for both instead.",
            stacklevel=2,
        )
    key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA's is_causal does the masking
    else:
        attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        if key_padding_mask is not None:
            is_causal = False  # merged with the padding mask it is no longer causal

    if embed_dim != embed_dim_to_check:
        raise ValueError(
            f"query's last dim must be embed_dim {embed_dim_to_check}, got {embed_dim}"
        )
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")

    if not use_separate_proj_weight:
        if key.shape != value.shape:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ")
        if in_proj_weight is None:
            raise ValueError("in_proj_weight is None and use_separate_proj_weight is False")
        q, k, v = _in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key's sequence and batch dims {tuple(key.shape[:2])} differ from value's "
                f"{tuple(value.shape[:2])}"
            )
        if q_proj_weight is None or k_proj_weight is None or v_proj_weight is None:
            raise ValueError("use_separate_proj_weight needs q_, k_ and v_proj_weight")
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q = linear(query, q_proj_weight, b_q)
        k = linear(key, k_proj_weight, b_k)
        v = linear(value, v_proj_weight, b_v)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                f"{(bsz * num_heads, tgt_len, src_len)}."
            )

    if bias_k is not None and bias_v is not None:
        if static_k is not None or static_v is not None:
            raise ValueError("bias_k and bias_v cannot be added to static_k / static_v")
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    elif bias_k is not None or bias_v is not None:
        raise ValueError("bias_k and bias_v must be given together")

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    for name, static in (("static_k", static_k), ("static_v", static_v)):
        if static is not None and (static.size(0) != bsz * num_heads or static.size(2) != head_dim):
            raise ValueError(
                f"{name} must be ({bsz * num_heads}, S, {head_dim}), got {tuple(static.shape)}"
            )
    k = (
        k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if static_k is None
        else static_k
    )
    v = (
        v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if static_v is None
        else static_v
    )

    if add_zero_attn:
        zeros = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)

    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise ValueError(
                f"key_padding_mask must be {(bsz, src_len)} (batch, source length, after "
                f"bias_kv / zero_attn), got {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights

    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    del q, k, v  # q, k, v may be views of one packed projection: free it before the reshape
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    return (out if batched else out.squeeze(1)), None


class MultiheadAttention(torch.nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` whose projections (packed ``in_proj_weight``, or
    ``q/k/v_proj_weight`` when kdim/vdim differ, and ``out_proj``) run on torchmatgrad's op.

    Same constructor, parameters, ``state_dict`` and results; it subclasses torch's, so
    ``isinstance`` checks and ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` keep working.
    In eval mode with no gradient to compute it is torch's forward unchanged, fused fast path
    included (see :mod:`torchmatgrad.mha`). The projections accumulate their gradients as
    autograd does: ``grad_accumulation`` (of ``convert_linear``, or of a converted
    ``out_proj``, whose weight MHA reads itself) does not apply to them.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self._may_need_grad(query, key, value) or query.is_nested:
            # Where torch's fast path can apply (or a nested query, which only it takes).
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        batched = query.dim() == 3
        if self.batch_first and batched:
            # Transposed views that keep the identities (query is key is value) torch tests.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def _may_need_grad(self, *inputs: Tensor) -> bool:
        """Training, or autograd on with some input or parameter requiring grad: the cases in
        which torch's fast path never runs."""
        if self.training:
            return True
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in inputs) or any(
            p.requires_grad for p in self.parameters()
        )

    @classmethod
    def from_mha(cls, module: torch.nn.MultiheadAttention) -> MultiheadAttention:
        """A torchmatgrad MultiheadAttention sharing ``module``'s parameters and submodules (the
        same objects: no copy, same ``state_dict``) and its attributes and training mode."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(
                f"from_mha expects a torch.nn.MultiheadAttention, got {type(module).__name__}"
            )
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        own = set(new.__dict__)
        # MHA's own attributes (embed_dim, num_heads, batch_first, bias_k=None, ...).
        new.__dict__.update({k: v for k, v in module.__dict__.items() if k not in own})
        new._parameters.update(module._parameters)
        new._buffers.update(module._buffers)
        new._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
        new._modules.update(module._modules)
        new.training = module.training
        return new
