"""Tensor parallelism: torchmatgrad's ops on DTensor (gloo on loopback, 2 and 4 processes).

Starting processes is the slow part (each imports torch), so one launch of 2 processes and one
of 4 run every check in turn, and each check is reported as its own test. A model check builds
the same model twice, with torch.nn.Linear and converted by torchmatgrad.nn.convert_linear,
applies the same plan to both and compares outputs, gradients (full_tensor) and parameters over
several AdamW steps; it also checks that the converted model ran torchmatgrad's ops on DTensors.
The op checks call torch.ops.torchmatgrad.* on DTensors with every placement combination and
compare with the same op on the full tensors.

Layout: _tp_models.py (the models, the plan, the comparison), _tp_op_checks.py (the op
checks), this file (the model checks and the launches).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _distributed_harness import run_checks, skip_unless_distributed
from _tp_models import Block, _batches, _compare_with_nn_linear, _llama_plan, _tp, _tp_mesh
from _tp_op_checks import check_ops, check_ops_2d
from torch import nn

import torchmatgrad

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
