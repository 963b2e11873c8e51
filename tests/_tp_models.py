"""The tensor-parallel tests' models (a Llama-style block, torchtitan's plan for it) and the
comparison of a model of nn.Linear with its conversion under the same plan.

Nothing here imports torch.distributed.tensor at import time: the workers import this module
before check_registered_on_import, which needs that module not imported yet.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchmatgrad

# ---- models --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Llama's RMSNorm, as torch's SequenceParallel expects it (ones-initialized weight)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal multi-head attention; head counts are read from the (possibly sharded) output,
    so that q/k/v column-wise give each rank its own heads."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in self.qkv())
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))

    def qkv(self):
        return self.wq, self.wk, self.wv


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1·x) * w3·x), w1 the gate, w3 up, w2 down."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """A Llama-style transformer block: pre-norm attention and SwiGLU MLP with residuals."""

    def __init__(self, dim: int = 16, n_heads: int = 4, hidden: int = 24) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = Attention(dim, n_heads)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = FeedForward(dim, hidden)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


def _llama_plan(sequence_parallel: bool) -> dict:
    """torchtitan's plan for a Llama block: q/k/v and gate/up column-wise, o and down row-wise;
    with sequence parallelism the norms run on sequence shards in between."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    if sequence_parallel:
        seq_to_full = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        )
        plan.update(
            {
                "attention_norm": SequenceParallel(),
                "attention": seq_to_full,
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": copy.deepcopy(seq_to_full),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            }
        )
    return plan


# ---- comparing a model of nn.Linear with its conversion under the same plan ------------------


class _OpRecorder(TorchDispatchMode):
    """Names of the ops called with DTensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _train(model, batches, *, micro_batches: int = 1, record: bool = False):
    """Outputs, gradients and parameters (all full tensors) over len(batches) AdamW steps,
    and the ops seen with DTensor arguments in the first step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outputs, grads = [], []
    recorder = _OpRecorder()
    for step, x in enumerate(batches):
        opt.zero_grad(set_to_none=micro_batches == 1)
        for part in x.chunk(micro_batches, dim=0):
            with recorder if record and step == 0 else contextlib.nullcontext():
                y = model(part)
                y.square().sum().backward()
            outputs.append(_full(y.detach()))
        grads.append([_full(p.grad).clone() for p in model.parameters()])
        opt.step()
    params = [_full(p.detach()).clone() for p in model.parameters()]
    return outputs, grads, params, recorder.ops


def _compare_with_nn_linear(
    make, parallelize, batches, *, dtype=torch.float64, grad_accumulation="unfused", **kw
):
    """Build make() twice, convert one, parallelize both the same way, train, compare.

    float64 by default: in float32, AdamW turns rounding-level differences of the gradients into
    steps of lr (torch's own TP against the unsharded model differs as much), so equality would
    be checked only as far as float32 rounding allows."""
    torch.manual_seed(0)
    ref = make().to(dtype)
    batches = [x.to(dtype) if x.is_floating_point() else x for x in batches]
    ours = torchmatgrad.nn.convert_linear(copy.deepcopy(ref), grad_accumulation=grad_accumulation)
    assert any(isinstance(m, torchmatgrad.nn.Linear) for m in ours.modules())
    results = []
    for model in (ref, ours):
        parallelize(model)
        results.append(_train(model, batches, record=model is ours, **kw))
    (out_r, grad_r, par_r, _), (out_o, grad_o, par_o, ops) = results
    for a, b in zip(out_o, out_r, strict=True):
        torch.testing.assert_close(a, b)
    for step_o, step_r in zip(grad_o, grad_r, strict=True):
        for a, b in zip(step_o, step_r, strict=True):
            torch.testing.assert_close(a, b)
    for a, b in zip(par_o, par_r, strict=True):
        torch.testing.assert_close(a, b)
    assert {"torchmatgrad.linear", "torchmatgrad.linear_backward"} <= ops, sorted(ops)
    assert not {"aten.mm", "aten.addmm", "aten.linear"} & ops, sorted(ops)
    return ops


def _tp(mesh, plan):
    """parallelize_module with this plan (a fresh copy per model)."""
    from torch.distributed.tensor.parallel import parallelize_module

    return lambda model: parallelize_module(model, mesh, copy.deepcopy(plan))


def _batches(shape, steps: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _tp_mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))
