"""Peak CPU memory of a step, the blocks of torchmatgrad's CPU block cache included.

torch's profiler sees the allocations of torch's CPU allocator only. A fresh grad_W or
grad_input of 1 MiB or more comes from torchmatgrad's block cache (csrc/cpu/block_cache.h),
which allocates with posix_memalign and does not report to the profiler, so a peak from the
profiler alone leaves out the gradients of every torchmatgrad backward (in ``bench --case dp``:
the non-private step's 54 MiB of gradients, which made the DP step look 1.77× as large). Until
the block cache reports its blocks to the profiler (``c10::reportMemoryUsageToProfiler`` in its
allocate and release), :func:`cpu_peak` adds them from a dispatch mode.
"""

from __future__ import annotations

import torch

from torchmatgrad import _compat

__all__ = ["cpu_peak"]


#: The marker a block-cache output leaves in the profile: "<prefix> <storage ptr> <±bytes>".
_MARK = "torchmatgrad.bench.block"
_BLOCK_MIN_BYTES = 2**20  # the block cache's smallest block (csrc/cpu/block_cache.cpp)


class _BlockTally(_compat.dispatch_mode_base()):
    """Leaves a profiler marker for each fresh ≥ 1 MiB CPU output of a torchmatgrad op (grad_W,
    grad_input: from the block cache, invisible to the profiler's allocation events) and one
    when its storage dies (checked at every later op, so a free is seen at most one op late)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple] = {}

    def sweep(self) -> None:
        # pop, not del: a sweep outside __torch_dispatch__ (cpu_peak's last) re-enters this mode
        # through record_function's op, and the nested sweep may take the next dead block first.
        for ptr, (ref, n) in list(self.live.items()):
            if ref.expired() and self.live.pop(ptr, None) is not None:
                with torch.profiler.record_function(f"{_MARK} {ptr} {-n}"):
                    pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef

        self.sweep()
        out = func(*args, **(kwargs or {}))
        if func.namespace != "torchmatgrad":
            return out
        inputs = {
            a.untyped_storage().data_ptr()
            for a in (*args, *(kwargs or {}).values())
            if isinstance(a, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr, n = storage.data_ptr(), storage.nbytes()
            if n >= _BLOCK_MIN_BYTES and ptr not in inputs and ptr not in self.live:
                self.live[ptr] = (StorageWeakRef(storage), n)
                with torch.profiler.record_function(f"{_MARK} {ptr} {n}"):
                    pass
        return out


def cpu_peak(step) -> int | None:
    """The most bytes held at once during ``step()`` above what was held before: torch's
    allocations (the profiler's allocation events, with their addresses) plus the block cache's
    (the markers of :class:`_BlockTally`, counted when their address is not a live allocation
    of torch's). None: this torch's profiler cannot say."""
    from torch.profiler import ProfilerActivity, profile

    tally = _BlockTally()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with tally:
                step()
                tally.sweep()
        events = []
        todo = list(prof.profiler.kineto_results.experimental_event_tree())
        while todo:
            node = todo.pop()
            todo.extend(node.children)
            kind, fields = node.typed
            if kind.name == "Allocation":
                events.append((node.start_time_ns, False, fields.ptr, fields.alloc_size))
            elif node.name.startswith(_MARK):
                _, ptr, n = node.name.split()
                events.append((node.start_time_ns, True, int(ptr), int(n)))
    except AttributeError:  # the profiler's results changed shape
        return None
    events.sort(key=lambda e: e[0])
    torch_live: set[int] = set()
    blocks: dict[int, int] = {}
    total = peak = 0
    for _, marker, ptr, n in events:
        if not marker:
            (torch_live.add if n > 0 else torch_live.discard)(ptr)
            total += n
        elif n > 0 and ptr not in torch_live and ptr not in blocks:
            blocks[ptr] = n
            total += n
        elif n < 0:
            total -= blocks.pop(ptr, 0)
        peak = max(peak, total)
    return peak
