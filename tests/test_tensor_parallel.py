"""Tensor parallelism: torchmatgrad's ops on DTensor (gloo on loopback, 2 and 4 processes).

Starting processes is the slow part (each imports torch), so one launch of 2 processes and one
of 4 run every check in turn, and each check is reported as its own test. A model check builds
the same model twice, with torch.nn.Linear and converted by torchmatgrad.nn.convert_linear,
applies the same plan to both and compares outputs, gradients (full_tensor) and parameters over
several AdamW steps; it also checks that the converted model ran torchmatgrad's ops on DTensors.
The op checks call torch.ops.torchmatgrad.* on DTensors with every placement combination and
compare with the same op on the full tensors.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _distributed_harness import run_checks, skip_unless_distributed
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


# ---- model checks --------------------------------------------------------------------------


def check_colwise(rank, world):
    from torch.distributed.tensor.parallel import ColwiseParallel

    mesh = _tp_mesh(world)
    for bias in (True, False):
        _compare_with_nn_linear(
            lambda bias=bias: nn.Sequential(nn.Linear(6, 4 * world + 1, bias=bias)),
            _tp(mesh, {"0": ColwiseParallel(use_local_output=False)}),
            _batches((3, 5, 6)),
        )


def check_rowwise(rank, world):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel

    mesh = _tp_mesh(world)
    for bias in (True, False):
        _compare_with_nn_linear(
            lambda bias=bias: nn.Sequential(nn.Linear(4 * world + 1, 5, bias=bias)),
            _tp(mesh, {"0": RowwiseParallel(input_layouts=Replicate())}),
            _batches((3, 4 * world + 1)),
        )


def check_mlp(rank, world):
    """The issue's example: Colwise then Rowwise around an activation, in float32 too."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    for dtype in (torch.float64, torch.float32):
        _compare_with_nn_linear(
            lambda: nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 6)),
            _tp(_tp_mesh(world), {"0": ColwiseParallel(), "2": RowwiseParallel()}),
            _batches((2, 5, 6)),
            dtype=dtype,
        )


class _SequenceParallelModel(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(self.down(F.gelu(self.up(self.norm(x)))))


def check_sequence_parallel(rank, world):
    """LayerNorm on sequence shards, Colwise/Rowwise around the MLP, and a Linear that is itself
    SequenceParallel (replicated weight, input sharded on the sequence dimension)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
    )

    plan = {
        "norm": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(output_layouts=Shard(1)),
        "proj": SequenceParallel(),
    }
    batches = [x.chunk(world, dim=1)[rank] for x in _batches((2, 2 * world, 8))]
    _compare_with_nn_linear(_SequenceParallelModel, _tp(_tp_mesh(world), plan), batches)


def check_llama_block(rank, world):
    _compare_with_nn_linear(Block, _tp(_tp_mesh(world), _llama_plan(False)), _batches((2, 8, 16)))


def check_llama_block_sequence_parallel(rank, world):
    batches = [x.chunk(world, dim=1)[rank] for x in _batches((2, 8, 16))]
    _compare_with_nn_linear(Block, _tp(_tp_mesh(world), _llama_plan(True)), batches)


def check_fused_accumulation(rank, world):
    """grad_accumulation="fused" under TP: with more than one process, the fused path is off
    (warned once) and the ordinary backward gives nn.Linear's results over micro-batches."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    torchmatgrad.accumulate.FUSE_MIN_ELEMENTS_CPU = 0  # small layers: try to fuse them anyway
    for mode in ("fused", "main_grad"):
        torchmatgrad.accumulate._warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _compare_with_nn_linear(
                lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6)),
                _tp(_tp_mesh(world), {"0": ColwiseParallel(), "2": RowwiseParallel()}),
                _batches((4, 6)),
                grad_accumulation=mode,
                micro_batches=2,
            )
        messages = [str(w.message) for w in caught]
        assert any("torch.distributed is initialized" in m for m in messages), messages


def check_fused_accumulation_on_shards(rank, world):
    """Lifting the more-than-one-process rule (TP alone would not need it): the fused kernel then
    adds Gᵀ·X into the column- and row-wise shards of weight.grad in place, through the DTensor
    rule of linear_backward_accumulate_, with nn.Linear's results."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    accumulate = torchmatgrad.accumulate
    world_size = accumulate._distributed_world
    accumulate._distributed_world = lambda: 1
    accumulate.FUSE_MIN_ELEMENTS_CPU = 0  # small layers: fuse them anyway
    accumulate._warned.clear()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="torchmatgrad: fused")  # no fallback
            ops = _compare_with_nn_linear(
                lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6)),
                _tp(_tp_mesh(world), {"0": ColwiseParallel(), "2": RowwiseParallel()}),
                _batches((4, 6)),
                grad_accumulation="fused",
                micro_batches=2,
            )
    finally:
        accumulate._distributed_world = world_size
    assert "torchmatgrad.linear_backward_accumulate_" in ops, sorted(ops)


def check_registered_on_import(rank, world):
    """`import torchmatgrad` (done by this module) does not import torch.distributed.tensor
    (about a second), and is enough: the rules are registered as soon as torch's tensor
    parallelism imports it. First in each launch, before anything imports it."""
    import sys

    assert "torch.distributed.tensor" not in sys.modules
    assert not torchmatgrad.distributed._registered
    import torch.distributed.tensor.parallel  # noqa: F401

    assert torchmatgrad.distributed._registered


def check_hf_llama(rank, world):
    """A tiny Hugging Face Llama, converted, with the Llama plan on every decoder layer."""
    import transformers
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def make():
        config = transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
        )
        return _HFHidden(transformers.LlamaModel(config))

    plan = {}
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"model.layers.{i}.mlp.gate_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.up_proj"] = ColwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32, (2, 8), generator=g) for _ in range(3)]
    _compare_with_nn_linear(make, _tp(_tp_mesh(world), plan), batches)


class _HFHidden(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


def check_fsdp2_over_tp(rank, world):
    """2-D: TP inside pairs of ranks, FSDP2 (fully_shard) across them; each data-parallel rank
    trains on its own data."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    tp = _tp(mesh["tp"], _llama_plan(False))

    def parallelize(model):
        tp(model)
        fully_shard(model.attention, mesh=mesh["dp"])
        fully_shard(model.feed_forward, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        assert model.attention.wq.weight.device_mesh.ndim == 2  # sharded over dp and tp

    seed = 10 + mesh["dp"].get_local_rank()
    with warnings.catch_warnings():
        # The row-wise layers hand back their output's local tensor, a view; the block only
        # adds it out of place, which is what FSDP2's warning asks for.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        _compare_with_nn_linear(Block, parallelize, _batches((2, 8, 16), seed=seed))


# ---- op checks: every placement combination against the full tensors -----------------------


def _dtensor(full, mesh, placements):
    """A DTensor of `full` with these placements; a Partial dimension splits the value unevenly
    (rank c of n holds (c+1)/(n(n+1)/2) of it)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    plain = [Replicate() if p.is_partial() else p for p in placements]
    local = distribute_tensor(full, mesh, plain, src_data_rank=None).to_local().clone()
    for i, p in enumerate(placements):
        if p.is_partial():
            c, n = mesh.get_local_rank(i), mesh.size(i)
            local = local * (c + 1) / (n * (n + 1) / 2)
    return DTensor.from_local(local, mesh, placements, shape=full.shape, stride=full.stride())


def _options(mesh_ndim: int, per_dim) -> list[tuple]:
    """Every tuple of placements (one per mesh dimension) drawn from per_dim."""
    return list(itertools.product(per_dim, repeat=mesh_ndim))


def _combos(options_per_arg, limit: int | None, seed: int):
    """Every combination of the arguments' options; a seeded sample of `limit` if given (the
    same on every rank)."""
    combos = list(itertools.product(*options_per_arg))
    if limit is not None and len(combos) > limit:
        combos = random.Random(seed).sample(combos, limit)
    return combos


def _check_ops(mesh, limit: int | None = None, per_grad_weight: int = 12) -> None:
    """Placements of every argument against the op on full float64 tensors, uneven and empty
    shards included: every combination (a seeded sample of `limit` per op and input rank, if
    given) for linear and linear_backward; for linear_backward_accumulate_ every grad_weight
    placement with `per_grad_weight` combinations of the others."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    ops = torch.ops.torchmatgrad
    f64 = torch.float64
    g = torch.Generator().manual_seed(0)
    n, m = 7, 6  # odd n: uneven shards of W's rows
    W = torch.randn(n, m, dtype=f64, generator=g)
    b = torch.randn(n, dtype=f64, generator=g)
    R, P = Replicate(), Partial()
    opts_w = _options(mesh.ndim, [R, Shard(0), Shard(1), P])
    opts_b = [None, *_options(mesh.ndim, [R, Shard(0), P])]
    masks = [[True, True, True], [True, False, False], [False, True, True], [False, True, False]]
    for shape in ((m,), (3, 5, m)):
        x = torch.randn(shape, dtype=f64, generator=g)
        G = torch.randn((*shape[:-1], n), dtype=f64, generator=g)
        Gm, xm = G.reshape(-1, n), x.reshape(-1, m)
        opts_x = _options(mesh.ndim, [R, P, *(Shard(d) for d in range(len(shape)))])

        for px, pw, pb in _combos([opts_x, opts_w, opts_b], limit, 1):
            where = f"linear x {px} W {pw} b {pb}"
            bias = None if pb is None else _dtensor(b, mesh, pb)
            y = ops.linear(_dtensor(x, mesh, px), _dtensor(W, mesh, pw), bias)
            ref = F.linear(x, W, None if pb is None else b)
            torch.testing.assert_close(y.full_tensor(), ref, msg=where)

        for i, (pg, px, pw) in enumerate(_combos([opts_x, opts_x, opts_w], limit, 2)):
            mask = masks[i % len(masks)]
            where = f"linear_backward G {pg} x {px} W {pw} mask {mask}"
            res = ops.linear_backward(
                _dtensor(G, mesh, pg), _dtensor(x, mesh, px), _dtensor(W, mesh, pw), mask
            )
            for t, ref, wanted in zip(res, (G @ W, Gm.t() @ xm, Gm.sum(0)), mask, strict=True):
                assert (t is None) == (not wanted), where
                if wanted:
                    torch.testing.assert_close(t.full_tensor(), ref, msg=where)

        # The handler's rule depends on grad_weight's placement (the other inputs are
        # redistributed to match it): every grad_weight placement, with a sample of the rest.
        combos = [
            (*rest, pgw)
            for j, pgw in enumerate(opts_w)
            for rest in _combos([opts_x, opts_x, opts_w], per_grad_weight, 3 + j)
        ]
        for i, (pg, px, pw, pgw) in enumerate(combos):
            mask = masks[i % len(masks)][::2]  # (grad_input, grad_bias)
            where = f"linear_backward_accumulate_ G {pg} x {px} W {pw} grad_W {pgw} mask {mask}"
            start = torch.randn(n, m, dtype=f64, generator=g)
            gw = _dtensor(start, mesh, pgw)
            gi, gb = ops.linear_backward_accumulate_(
                _dtensor(G, mesh, pg), _dtensor(x, mesh, px), _dtensor(W, mesh, pw), gw, mask
            )
            assert gw.placements == pgw, where  # in place: the placement is kept
            torch.testing.assert_close(gw.full_tensor(), start + Gm.t() @ xm, msg=where)
            assert (gi is None) == (not mask[0]) and (gb is None) == (not mask[1]), where
            if mask[0]:
                torch.testing.assert_close(gi.full_tensor(), G @ W, msg=where)
            if mask[1]:
                torch.testing.assert_close(gb.full_tensor(), Gm.sum(0), msg=where)


def _check_tp_placements(mesh) -> None:
    """The TP styles' combinations run with no communication and give the placements of the
    rules (torchmatgrad/distributed.py), so the rules, not a redistribution, were used."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.debug import CommDebugMode

    ops = torch.ops.torchmatgrad
    R, P = Replicate(), Partial()
    n, m = 8, 6
    W, b = torch.randn(n, m), torch.randn(n)
    x, G = torch.randn(2, 4, m), torch.randn(2, 4, n)
    gw0 = torch.zeros(n, m)

    def d(t, p):
        return _dtensor(t, mesh, [p])

    cases = [
        # (x, W, b) -> y ; (G, x, W) -> (gi, gW, gb)
        ((R, Shard(0), Shard(0)), Shard(2), (Shard(2), R, Shard(0)), (P, Shard(0), Shard(0))),
        ((Shard(2), Shard(1), P), P, (R, Shard(2), Shard(1)), (Shard(2), Shard(1), R)),
        ((Shard(1), R, R), Shard(1), (Shard(1), Shard(1), R), (Shard(1), P, P)),
        ((R, R, R), R, (R, R, R), (R, R, R)),
    ]
    for (px, pw, pb), py, (pg, px2, pw2), pgrads in cases:
        args = (d(x, px), d(W, pw), d(b, pb))
        with CommDebugMode() as comm:
            y = ops.linear(*args)
        assert y.placements == (py,), (px, pw, pb, y.placements)
        assert comm.get_total_counts() == 0, (px, pw, pb, comm.get_comm_counts())
        args = (d(G, pg), d(x, px2), d(W, pw2))
        with CommDebugMode() as comm:
            grads = ops.linear_backward(*args, [True, True, True])
        assert tuple(t.placements[0] for t in grads) == pgrads, (pg, px2, pw2)
        assert comm.get_total_counts() == 0, (pg, px2, pw2, comm.get_comm_counts())
        gw = d(gw0, pgrads[1]) if not pgrads[1].is_partial() else None
        if gw is not None:
            with CommDebugMode() as comm:
                gi, gb = ops.linear_backward_accumulate_(*args, gw, [True, True])
            assert (gi.placements[0], gw.placements[0], gb.placements[0]) == pgrads
            assert comm.get_total_counts() == 0, (pg, px2, pw2, comm.get_comm_counts())


def check_ops(rank, world):
    """Every combination on 2 ranks; on 4 (shards of 2, 2, 2, 1 rows and empty ones) a sample."""
    mesh = _tp_mesh(world)
    _check_tp_placements(mesh)
    if world == 2:
        _check_ops(mesh)
    else:
        _check_ops(mesh, limit=40, per_grad_weight=4)


def check_ops_2d(rank, world):
    """A 2 × 2 mesh: DTensor combines the one-dimension rules over both mesh dimensions."""
    from torch.distributed.device_mesh import init_device_mesh

    _check_ops(init_device_mesh("cpu", (2, world // 2)), limit=20, per_grad_weight=1)


# ---- the two launches ----------------------------------------------------------------------

# Each launch takes 30-40 s on 2 idle cores; the limit leaves room for a loaded CI machine.
TIMEOUT_S = 300

_HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

CHECKS_2 = {
    "registered_on_import": check_registered_on_import,
    "ops": check_ops,
    "colwise": check_colwise,
    "rowwise": check_rowwise,
    "mlp": check_mlp,
    "sequence_parallel": check_sequence_parallel,
    "llama_block": check_llama_block,
    "llama_block_sequence_parallel": check_llama_block_sequence_parallel,
    "fused_accumulation": check_fused_accumulation,
    "fused_accumulation_on_shards": check_fused_accumulation_on_shards,
    **({"hf_llama": check_hf_llama} if _HAVE_TRANSFORMERS else {}),
}
CHECKS_4 = {
    "registered_on_import": check_registered_on_import,
    "ops": check_ops,
    "ops_2d": check_ops_2d,
    "llama_block_sequence_parallel": check_llama_block_sequence_parallel,
    "fsdp2_over_tp": check_fsdp2_over_tp,
}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run_checks(CHECKS_2, 2, tmp_path_factory.mktemp("tp2"), timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    return run_checks(CHECKS_4, 4, tmp_path_factory.mktemp("tp4"), timeout_s=TIMEOUT_S)


@skip_unless_distributed()
@pytest.mark.parametrize("check", [c for c in CHECKS_2 if c != "hf_llama"])
def test_two_processes(two_processes, check):
    assert two_processes[check] is None, two_processes[check]


@skip_unless_distributed()
@pytest.mark.parametrize("check", list(CHECKS_4))
def test_four_processes(four_processes, check):
    assert four_processes[check] is None, four_processes[check]


@skip_unless_distributed()
@pytest.mark.parametrize(
    "code",
    [
        # torch.distributed.tensor imported first: registered by `import torchmatgrad`
        "import torch.distributed.tensor, torchmatgrad",
        # explicitly, before anything imported torch.distributed.tensor (the import hook fires
        # inside the call)
        "import torchmatgrad; assert torchmatgrad.distributed.register_sharding_rules()",
    ],
    ids=["dtensor_first", "explicit"],
)
def test_registration_in_a_fresh_process(code):
    """The other order, `import torchmatgrad` then torch's TP, is the first check of each
    launch above."""
    code += "\nassert torchmatgrad.distributed._registered"
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())


def _env():
    """This environment, with the torchmatgrad under test first on the path."""
    root = str(Path(torchmatgrad.__file__).parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


@skip_unless_distributed()
def test_hf_llama_two_processes(two_processes):
    pytest.importorskip("transformers")
    assert two_processes["hf_llama"] is None, two_processes["hf_llama"]
