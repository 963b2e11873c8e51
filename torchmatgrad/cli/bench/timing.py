"""Timing: copy bandwidth, and warm-up and interleaved sampling of the peers at a grid point."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .machine import _cache_bytes

#: Skip a peer predicted to take longer than this per call (seconds), by device type.
DEFAULT_MAX_CALL_TIME = {"cpu": 30.0, "cuda": 10.0}
#: (reps, warmup, max seconds per peer and grid point) by preset and device type.
DEFAULT_TIMING = {
    "full": {"cpu": (30, 3, 2.0), "cuda": (100, 10, 1.0)},
    "quick": {"cpu": (40, 2, 0.3), "cuda": (30, 5, 0.2)},
}
MIN_REPS = 3  # samples taken even past --max-time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, reps: int, max_time: float) -> float:
    """Copy bandwidth of ``device`` in bytes/s: bytes read + written by ``dst.copy_(src)`` over
    the median time, with ``src`` 4× the last-level cache (at least 64 MiB)."""
    nbytes = max(64 << 20, 4 * _cache_bytes(device))
    if device.type == "cuda":
        nbytes = max(nbytes, 1 << 30)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(max(reps, MIN_REPS)):
        if device.type == "cuda":
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        if len(times) >= MIN_REPS and time.perf_counter() - start > max_time:
            break
    return 2 * nbytes / statistics.median(times)


@dataclass
class _Peer:
    """One implementation timed at one grid point."""

    name: str
    variant: str
    path: str
    pre: Callable[[int], None]  # untimed, before each call (e.g. ``.grad = None``)
    call: Callable[[int], Any]  # the timed call on weight copy i % copies
    samples: list[float] = field(default_factory=list)
    events: list[tuple[Any, Any]] = field(default_factory=list)
    error: str | None = None
    rel_err: float | None = None

    def run(self, i: int) -> Any:
        self.pre(i)
        return self.call(i)


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def _rel_err(y: Any, ref: torch.Tensor | None) -> float | None:
    if ref is None or not isinstance(y, torch.Tensor):
        return None
    wide = torch.float64 if ref.dtype == torch.float64 else torch.float32
    scale = ref.to(wide).abs().max().item()
    diff = (y.detach().to(wide) - ref.to(wide)).abs().max().item()
    return diff / scale if scale > 0 else diff


def _warm(
    peers: Sequence[_Peer],
    device: torch.device,
    warmup: int,
    max_time: float,
    counter: Iterator[int],
) -> None:
    """Warm every peer up (``warmup`` calls, fewer once they take ``max_time``: one call of a
    slow op is warm-up enough); the first peer's first output is the reference for the
    others' ``rel_err``.

    ``counter`` is shared by all peers of a grid point: every call, whichever peer makes it,
    takes the next weight copy, so no peer finds the copy another one just read in cache."""
    ref: torch.Tensor | None = None
    for k, p in enumerate(peers):
        if p.error is not None:  # skipped
            continue
        try:
            start = time.perf_counter()
            y = p.run(next(counter))
            if k == 0 and isinstance(y, torch.Tensor):
                ref = y.detach()
            else:
                p.rel_err = _rel_err(y, ref)
            del y
            if p.name.endswith(".compile"):
                _sync(device)
                start = time.perf_counter()  # the first call compiled: not the op's time
            for _ in range(warmup - 1):
                _sync(device)
                if time.perf_counter() - start > max_time:
                    break
                p.run(next(counter))
        except Exception as e:  # a peer that cannot run this point is reported, not fatal
            p.error = _error_text(e)
            if k == 0:
                ref = None


def _sample(
    peers: Sequence[_Peer],
    device: torch.device,
    reps: int,
    max_time: float,
    counter: Iterator[int],
) -> None:
    """Time single calls of the live peers round-robin (interleaved, so that load from other
    processes hits all peers alike) until ``reps`` rounds or ``max_time`` per peer."""
    live = [p for p in peers if p.error is None]
    if not live:
        return
    cuda = device.type == "cuda"
    _sync(device)
    start = time.perf_counter()
    for r in range(reps):
        for p in list(live):
            i = next(counter)
            try:
                p.pre(i)
                if cuda:
                    e0 = torch.cuda.Event(enable_timing=True)
                    e1 = torch.cuda.Event(enable_timing=True)
                    e0.record()
                    p.call(i)
                    e1.record()
                    p.events.append((e0, e1))
                else:
                    t0 = time.perf_counter()
                    p.call(i)
                    p.samples.append(time.perf_counter() - t0)
            except Exception as e:  # e.g. out of memory: report the peer, keep the others
                p.error = _error_text(e)
                p.events.clear()
                p.samples.clear()
                live.remove(p)
        if cuda and r % 10 == 9:
            _sync(device)
        if r + 1 >= MIN_REPS and time.perf_counter() - start > max_time * len(live):
            break
    if cuda:
        _sync(device)
        for p in live:
            p.samples = [e0.elapsed_time(e1) / 1e3 for e0, e1 in p.events]
            p.events.clear()
