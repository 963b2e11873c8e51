"""The tensor-parallel op checks: torch.ops.torchmatgrad.* on DTensors with every placement
combination, against the same op on the full tensors (run by test_tensor_parallel.py's
launches)."""

from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F
from _tp_models import _tp_mesh

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
