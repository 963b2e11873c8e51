"""Multi-process test harness: N spawned processes, gloo on loopback, a hard time limit.

``run_workers(body, world, result_dir)`` starts ``world`` processes, each of which joins a gloo
process group on 127.0.0.1 and calls ``body(rank, world)``; a traceback on any rank fails the
test, and so does running past the time limit (the processes are killed). ``run_checks`` runs a
list of named checks in one launch (starting processes costs seconds: torch is imported in each)
and reports on each check separately.
"""

from __future__ import annotations

import datetime
import functools
import gc
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120

Body = Callable[[int, int], None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, body: Body, world: int, port: int, result_dir: str, timeout_s: float):
    """Start the process group, run body(rank, world), tear the group down, leave ok<rank> or
    err<rank> behind, and leave without interpreter finalization.

    The exit is os._exit: once the group is destroyed and the result written, nothing of ours
    is left to check, and letting the interpreter finalize objects that still point at gloo's
    threads (DDP's reducer holds its process group) is the likely place where a worker aborted
    once on CI ("terminate called without an active exception")."""
    error = None
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            # A rank stuck in a collective its peers never join fails instead of hanging.
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        body(rank, world)
    except Exception:
        error = traceback.format_exc()
    try:
        gc.collect()  # free DDP reducers and pending work while the group still exists
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()
    except Exception:
        error = (error or "") + "while destroying the process group:\n" + traceback.format_exc()
    name = f"err{rank}" if error else f"ok{rank}"
    with open(os.path.join(result_dir, name), "w") as f:
        f.write(error or "")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is the file; a nonzero exit means a crash before it


def _join(ctx, result_dir: Path, timeout: float) -> bool:
    """ctx.join, with what every rank left behind when one of them crashed."""
    try:
        return ctx.join(timeout=timeout)
    except mp.ProcessExitedException as e:
        left = {p.name: p.read_text() for p in sorted(result_dir.glob("*"))}
        pytest.fail(f"a worker crashed: {e}\nthe ranks left: {left}")


def run_workers(body: Body, world: int, result_dir: Path, timeout_s: float = TIMEOUT_S) -> None:
    """Run body(rank, world) in `world` processes; fail on any error or past `timeout_s`."""
    result_dir = Path(result_dir)
    ctx = mp.start_processes(
        _worker,
        args=(body, world, _free_port(), str(result_dir), timeout_s),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not _join(ctx, result_dir, max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            errors = [p.read_text() for p in sorted(result_dir.glob("*err*"))]
            pytest.fail(
                f"{world} workers did not finish within {timeout_s} s\n" + "\n".join(errors)
            )
    errors = [p.read_text() for p in sorted(result_dir.glob("err*"))]
    assert not errors, "\n".join(errors)
    assert sorted(p.name for p in result_dir.glob("ok*")) == [f"ok{r}" for r in range(world)]


def _run_named(checks: dict[str, Body], result_dir: str, rank: int, world: int) -> None:
    """Run the checks in order; the first failure on any rank stops all ranks (their later
    collectives would no longer pair up)."""
    control = dist.new_group(backend="gloo")  # not the group a failed check may have left busy
    for name, check in checks.items():
        failed, start = torch.zeros(1), time.monotonic()
        try:
            check(rank, world)
            with open(os.path.join(result_dir, f"{name}.ok{rank}"), "w") as f:
                f.write(f"{time.monotonic() - start:.2f} s")  # for finding slow checks
        except Exception:
            with open(os.path.join(result_dir, f"{name}.err{rank}"), "w") as f:
                f.write(f"rank {rank}:\n{traceback.format_exc()}")
            failed += 1
        dist.all_reduce(failed, group=control)
        if failed.item():
            return


def run_checks(
    checks: dict[str, Body], world: int, result_dir: Path, timeout_s: float = TIMEOUT_S
) -> dict[str, str | None]:
    """Run named checks, in order, in one launch of `world` processes. Returns, for each check,
    None if it passed on every rank, else why not (tracebacks, or that it did not run)."""
    result_dir = Path(result_dir)
    body = functools.partial(_run_named, checks, str(result_dir))
    run_workers(body, world, result_dir, timeout_s)
    results: dict[str, str | None] = {}
    for name in checks:
        errors = [p.read_text() for p in sorted(result_dir.glob(f"{name}.err*"))]
        passed = len(list(result_dir.glob(f"{name}.ok*"))) == world
        if errors:
            results[name] = "\n".join(errors)
        elif not passed:
            results[name] = "not run: an earlier check failed"
        else:
            results[name] = None
    return results


def skip_unless_distributed() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


__all__ = ["TIMEOUT_S", "run_checks", "run_workers", "skip_unless_distributed"]
