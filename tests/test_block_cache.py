"""The CPU block cache that large fresh gradients come from (csrc/cpu/block_cache.h).

A grad_W or grad_input of at least 1 MiB is written into a block that goes back to the cache
when its tensor dies and is handed to the next gradient of its size: the pages stay mapped,
nothing is faulted in again. What must hold: a reused block is fully rewritten (never stale,
never NaN), the cache keeps no more than its limit, empty_cache gives the blocks back, and the
tensors behave like any other (resize, shared memory, pickling, other threads).
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading

import pytest
import torch
from conftest import run_python

import torchmatgrad
from torchmatgrad import policy
from torchmatgrad.testing import assert_close, rand

ops = torch.ops.torchmatgrad
MiB = 2**20
N, M = 512, 1024  # a float32 grad_W of 2 MiB: a cached block


def _grad_weight(rows: int, path: str, seed: int):
    """(grad_W from the op on ``path``, its float64 reference, torch's)."""
    g, x, w = rand(rows, N, seed=seed), rand(rows, M, seed=seed + 1), rand(N, M, seed=seed + 2)
    with contextlib.nullcontext() if path == "auto" else policy.force_path(path):
        _, gw, _ = ops.linear_backward(g, x, w, [False, True, False])
    return gw, g.double().t() @ x.double(), g.t() @ x


@pytest.mark.parametrize("path", ["kernel", "vendor"])
@pytest.mark.parametrize("rows", [3, 40, 300])
def test_reused_block_is_rewritten(path, rows):
    """A poisoned block handed back is the next gradient's block, and none of it stays NaN."""
    torchmatgrad.empty_cache()
    gw, _, _ = _grad_weight(rows, path, seed=1)
    ptr = gw.data_ptr()
    gw.fill_(float("nan"))
    del gw
    assert torchmatgrad.cpu_cached_bytes() >= N * M * 4
    gw, ref, peer = _grad_weight(rows, path, seed=2)
    assert gw.data_ptr() == ptr, "the freed block was not reused"
    assert_close(gw, ref, k=rows, peers=[peer], what="grad_weight from a reused block")


@pytest.mark.parametrize("path", ["kernel", "vendor"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulate"])
def test_reused_grad_input_block_is_rewritten(path, accumulate):
    """grad_input (here [2, 150, M] float32, 1.2 MiB) comes from the cache too, from either op
    and either path: a poisoned block handed back is fully rewritten."""

    def grad_input(seed):
        g, x, w = (
            rand(2, 150, N, seed=seed),
            rand(2, 150, M, seed=seed + 1),
            rand(N, M, seed=seed + 2),
        )
        with policy.force_path(path):
            if accumulate:
                gi, _ = ops.linear_backward_accumulate_(g, x, w, torch.zeros(N, M), [True, False])
            else:
                gi, _, _ = ops.linear_backward(g, x, w, [True, False, False])
        return gi, g.double() @ w.double(), g @ w

    torchmatgrad.empty_cache()
    gi, _, _ = grad_input(seed=5)
    ptr = gi.data_ptr()
    gi.fill_(float("nan"))
    del gi
    assert torchmatgrad.cpu_cached_bytes() >= 300 * M * 4
    gi, ref, peer = grad_input(seed=8)
    assert gi.data_ptr() == ptr, "the freed block was not reused"
    assert gi.shape == (2, 150, M)
    assert_close(gi, ref, k=N, peers=[peer], what="grad_input from a reused block")


def test_training_loop_with_grads_set_to_none():
    """zero_grad(set_to_none=True) between steps: every step's gradient is correct and the
    cache holds the freed gradients, not more."""
    torchmatgrad.empty_cache()
    lin = torchmatgrad.nn.Linear(M, N)
    ref = torch.nn.Linear(M, N)
    ref.load_state_dict(lin.state_dict())
    for step in range(3):
        x = rand(5, M, seed=10 + step)
        lin.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        lin(x).square().sum().backward()
        ref(x).square().sum().backward()
        assert_close(lin.weight.grad, ref.weight.grad.double(), k=5, what=f"step {step}")
        assert torchmatgrad.cpu_cached_bytes() <= N * M * 4
    lin.zero_grad(set_to_none=True)
    assert torchmatgrad.cpu_cached_bytes() >= N * M * 4
    torchmatgrad.empty_cache()
    assert torchmatgrad.cpu_cached_bytes() == 0


def test_small_outputs_bypass_the_cache():
    torchmatgrad.empty_cache()
    g, x, w = rand(3, 64), rand(3, 128), rand(64, 128)  # 32 KiB
    _, gw, _ = ops.linear_backward(g, x, w, [False, True, False])
    del gw
    assert torchmatgrad.cpu_cached_bytes() == 0


def test_cached_tensors_behave_like_any_other():
    """resize_ beyond the block, share_memory_, torch.save/load, and release from another
    thread."""
    torchmatgrad.empty_cache()
    gw, ref, _ = _grad_weight(3, "kernel", seed=3)
    expect = gw.clone()
    buf = io.BytesIO()
    torch.save(gw, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), expect)
    gw.share_memory_()
    assert gw.is_shared() and torch.equal(gw, expect)
    gw2, _, _ = _grad_weight(3, "kernel", seed=4)
    gw2.resize_(2 * N, M)  # a larger block from the same allocator; the old one is released
    gw2[N:].fill_(1.0)
    assert gw2.shape == (2 * N, M) and bool(gw2[N:].eq(1.0).all())
    t = threading.Thread(target=gw2.resize_, args=(0,))  # its block released there
    t.start()
    t.join()
    del gw2, gw
    assert torchmatgrad.cpu_cached_bytes() > 0


def test_concurrent_backwards():
    """Blocks taken and released by several threads at once: every gradient is right."""
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(5):
                # the policy's path: forcing one is process-wide, not for threads
                gw, ref, peer = _grad_weight(3, "auto", seed=100 * seed + 3 * i)
                assert_close(gw, ref, k=3, peers=[peer], what=f"thread {seed}, call {i}")
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


_KEEP_TWO = """
import torch, torchmatgrad
from torchmatgrad import _C
a = torch.ops.torchmatgrad._cpu_empty_reused([1024, 1024], torch.float32)  # 4 MiB
b = torch.ops.torchmatgrad._cpu_empty_reused([1024, 1024], torch.float32)
del a, b
print(_C.cpu_cache_limit_bytes, torchmatgrad.cpu_cached_bytes())
"""


@pytest.mark.parametrize("cache_mb,kept", [("0", 0), ("5", 4), ("9", 8)])
def test_limit_from_the_environment(cache_mb, kept):
    r = run_python(_KEEP_TWO, TORCHMATGRAD_CPU_CACHE_MB=cache_mb)
    assert r.returncode == 0, r.stderr
    limit, cached = map(int, r.stdout.split())
    assert (limit, cached) == (int(cache_mb) * MiB, kept * MiB)


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5"])
def test_bad_limit_is_a_clear_import_error(bad):
    r = run_python("import torchmatgrad", TORCHMATGRAD_CPU_CACHE_MB=bad)
    assert r.returncode != 0
    assert "TORCHMATGRAD_CPU_CACHE_MB: expected a whole number of MiB >= 0" in r.stderr
    assert repr(bad) in r.stderr or f"'{bad}'" in r.stderr


def test_fork_while_another_thread_holds_the_cache():
    """A fork (DataLoader workers) while another thread is inside the cache: the child can
    still take and give back blocks (its lock is not left held; without the atfork handlers
    the child hangs and this fails)."""
    assert ops._cpu_cache_fork_selftest()


_OOM_RETRY = """
import resource, torch, torchmatgrad
MiB = 2**20
def vm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
e = torch.ops.torchmatgrad._cpu_empty_reused
a, b = e([16 * MiB], torch.float32), e([16 * MiB], torch.float32)  # 64 MiB each
del a, b
held = torchmatgrad.cpu_cached_bytes()
resource.setrlimit(resource.RLIMIT_AS, (vm() + 50 * MiB, resource.RLIM_INFINITY))
c = e([25 * MiB], torch.float32)  # 100 MiB: fits only once the cached blocks are given back
print(held, torchmatgrad.cpu_cached_bytes(), c.numel())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")
def test_out_of_memory_gives_the_cache_back_first():
    """An allocation that fails while the cache holds free blocks of other sizes succeeds once
    they are given back (the address space is limited so that it cannot fit beside them)."""
    r = run_python(_OOM_RETRY, TORCHMATGRAD_CPU_CACHE_MB="1024")
    assert r.returncode == 0, r.stderr
    held, after, numel = map(int, r.stdout.split())
    assert (held, after, numel) == (128 * MiB, 0, 25 * MiB)
