"""torchmatgrad.nn.Linear under DistributedDataParallel and FSDP2 (gloo, 2 processes, loopback).

The test starts its own two processes, bounded in time; each compares the same model built with
torch.nn.Linear and with torchmatgrad.nn.Linear after a few steps, with and without fused
gradient accumulation, including no_sync() micro-batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from _distributed_harness import run_workers, skip_unless_distributed


def _model(cls, **kw):
    torch.manual_seed(0)
    return torch.nn.Sequential(cls(6, 8, **kw), torch.nn.Tanh(), cls(8, 3, **kw))


def _ddp(rank: int, world: int) -> None:
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    import torchmatgrad

    # the layers here are small: fuse them anyway (the CPU size threshold would run them unfused)
    torchmatgrad.accumulate.FUSE_MIN_ELEMENTS_CPU = 0
    torch.manual_seed(100 + rank)  # different data on each rank
    data = [torch.randn(4, 6) for _ in range(6)]
    ref = DDP(_model(torch.nn.Linear))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in ("unfused", "fused"):
            ours = DDP(_model(torchmatgrad.nn.Linear, grad_accumulation=mode))
            for model in (ref, ours) if mode == "unfused" else (ours,):
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                for step in range(3):
                    opt.zero_grad(set_to_none=False)
                    with model.no_sync():  # a local micro-batch, reduced with the next one
                        model(data[2 * step]).square().sum().backward()
                    model(data[2 * step + 1]).square().sum().backward()
                    opt.step()
                if model is ref:
                    ref_state = [p.detach().clone() for p in ref.parameters()]
                    ref_grads = [p.grad.clone() for p in ref.parameters()]
            for p, r in zip(ours.parameters(), ref_state, strict=True):
                torch.testing.assert_close(p.detach(), r)
            for p, g in zip(ours.parameters(), ref_grads, strict=True):
                torch.testing.assert_close(p.grad, g)
    messages = [str(w.message) for w in caught]
    assert any("torch.distributed is initialized" in m for m in messages), messages
    # Parameters are identical on both ranks (DDP all-reduced the gradients).
    flat = torch.cat([p.detach().flatten() for p in ours.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    torch.testing.assert_close(gathered[0], gathered[1])


def _fsdp(rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    import torchmatgrad

    torch.manual_seed(100 + rank)
    data = [torch.randn(4, 6) for _ in range(3)]
    results = []
    for cls in (torch.nn.Linear, torchmatgrad.nn.Linear):
        model = _model(cls)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in data:
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        results.append([p.full_tensor().detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@skip_unless_distributed()
def test_ddp_matches_nn_linear(tmp_path):
    run_workers(_ddp, 2, tmp_path)


@skip_unless_distributed()
def test_fsdp2_matches_nn_linear(tmp_path):
    run_workers(_fsdp, 2, tmp_path)
