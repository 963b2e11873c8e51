"""Benchmark torchmatgrad.linear against torch on the same inputs: ``python -m torchmatgrad bench``.

For every device, dtype, size n = m (weight n×m) and batch rows B it times three cases:

* ``fwd``: y = x·Wᵀ + b.
* ``fwdbwd``: forward, then backward with ``.grad`` None before (grad_input, grad_W, grad_b).
* ``fwdbwd_acc``: forward, then backward adding into an existing ``.grad`` (gradient
  accumulation); torchmatgrad runs twice: "unfused" (autograd's AccumulateGrad adds a temporary
  grad_W into ``.grad``) and "fused" (``grad_accumulation="fused"``: the backward kernel adds
  into ``.grad`` in place).

Peers (same run, same inputs, timings interleaved call by call): torch eager (F.linear and its
autograd) and torchmatgrad; with ``--compile`` also torch.compile of F.linear and of
torchmatgrad.linear. Each row reports the median time, the achieved bandwidth (the byte floor's
bytes over the time), TFLOP/s, the byte floor (the bytes that must move, at the copy bandwidth
measured in the same run) and the speedup over torch eager. Results go to a table on stdout and
to JSON, CSV and (with matplotlib) PNG files under ``--out``.

Timing: warm-up calls, then the median of many single calls (CUDA events on CUDA,
``time.perf_counter`` on CPU); the weight is rotated among enough copies that they do not fit in
the last-level cache (2× its size), so each call reads W from memory. Warm-up and sampling of a
peer stop early after ``--max-time`` seconds (at least 3 samples), and a peer whose call is
predicted to take over ``--max-call-time`` is skipped; even so the full CPU grid takes long
(torch's 16-bit CPU GEMMs are slow at large B): pick subsets with --dtype/--n/--B/--case.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import torchmatgrad

from .. import info

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float64": "fp64",
    "double": "fp64",
}
CASES = ("fwd", "fwdbwd", "fwdbwd_acc")
FULL_N = {"cpu": (1024, 4096, 8192), "cuda": (1024, 4096, 8192, 16384)}
FULL_B = (1, 2, 4, 8, 16, 64, 256, 4096)
QUICK_N = (256, 1024)
QUICK_B = (1, 16)
QUICK_DTYPES = ("fp32", "bf16")
#: Skip a peer predicted to take longer than this per call (seconds), by device type.
DEFAULT_MAX_CALL_TIME = {"cpu": 30.0, "cuda": 10.0}
#: (reps, warmup, max seconds per peer and grid point) by preset and device type.
DEFAULT_TIMING = {
    "full": {"cpu": (30, 3, 2.0), "cuda": (100, 10, 1.0)},
    "quick": {"cpu": (40, 2, 0.3), "cuda": (30, 5, 0.2)},
}
MAX_COPIES = 4096  # most weight copies rotated through
MIN_REPS = 3  # samples taken even past --max-time

ROW_KEYS = (
    "device",
    "device_name",
    "dtype",
    "n",
    "m",
    "B",
    "case",
    "peer",
    "variant",
    "path",
    "w_copies",
    "reps",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "min_ms",
    "gbps",
    "tflops",
    "floor_bytes",
    "floor_ms",
    "floor_frac",
    "speedup_vs_torch",
    "rel_err",
    "error",
)


# ---- machine facts -------------------------------------------------------------------------


def _git_commit() -> tuple[str | None, bool | None]:
    """(short commit, dirty) of the checkout torchmatgrad is imported from; (None, None) if
    that is not a git checkout or git is missing."""
    where = os.path.dirname(os.path.abspath(torchmatgrad.__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return commit or None, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _cpu_llc_bytes() -> int:
    """Size of the CPU's last-level cache (Linux sysfs), 32 MiB if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in base.glob("index*"):
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def _cache_bytes(device: torch.device) -> int:
    """Last-level cache size of ``device`` (GPU L2 or CPU LLC)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    return _cpu_llc_bytes()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor})"
    return info.cpu_model()


def machine_info(devices: Sequence[torch.device]) -> dict[str, Any]:
    """What the JSON records about the machine and the software."""
    commit, dirty = _git_commit()
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": info.cpu_model(),
        "cpu_isa": info.cpu_isa(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchmatgrad": torchmatgrad.__version__,
        "torchmatgrad_with_cuda": int(getattr(torchmatgrad._C, "with_cuda", 0)),
        "git_commit": commit,
        "git_dirty": dirty,
        "fused_grad_accumulation": True,
        "devices": {str(d): _device_name(d) for d in devices},
        "cache_bytes": {str(d): _cache_bytes(d) for d in devices},
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ---- timing --------------------------------------------------------------------------------


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


# ---- one grid point ------------------------------------------------------------------------


def _torch_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def _tmg_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, grad_accumulation: str = "unfused"
) -> torch.Tensor:
    return torchmatgrad.linear(x, w, b, grad_accumulation=grad_accumulation)


def floor_bytes(case: str, n: int, m: int, B: int, elem: int) -> int:
    """Bytes that must move: forward reads W, x, b and writes y; the backward reads W again,
    G and x and writes grad_input, grad_W and grad_b; accumulation also reads and writes
    ``.grad`` in place of writing grad_W once (W·4 passes in all)."""
    fwd = n * m + B * m + B * n + n
    if case == "fwd":
        return elem * fwd
    bwd = n * m + B * n + B * m + B * m + n  # read W, G, x; write grad_input, grad_b
    if case == "fwdbwd":
        return elem * (fwd + bwd + n * m)  # write grad_W
    return elem * (fwd + bwd + 2 * n * m + n)  # read and write .grad (W and b)


def flops(case: str, n: int, m: int, B: int) -> int:
    """Multiply-adds ×2: 2·B·n·m forward; backward adds G·W and Gᵀ·X (and n·m adds into
    ``.grad`` when accumulating)."""
    f = 2 * B * n * m
    if case == "fwd":
        return f
    return 3 * f + (n * m if case == "fwdbwd_acc" else 0)


def _copies(w_bytes: int, device: torch.device) -> int:
    return max(1, min(MAX_COPIES, math.ceil(2 * _cache_bytes(device) / max(1, w_bytes))))


def _peers_for(
    case: str,
    device: torch.device,
    dtype: torch.dtype,
    B: int,
    ws: list[torch.Tensor],
    bs: list[torch.Tensor],
    x: torch.Tensor,
    gy: torch.Tensor | None,
    compile_peers: bool,
) -> list[_Peer]:
    k = len(ws)
    path = info.dispatch_path(device.type, B, dtype)
    impls: list[tuple[str, Callable[..., torch.Tensor], str, str]] = [
        ("torch", _torch_linear, "aten", "-"),
        ("torchmatgrad", _tmg_linear, path, "unfused" if case == "fwdbwd_acc" else "-"),
    ]
    if case == "fwdbwd_acc":
        # The backward kernel adds into the existing .grad in place (issue: fused accumulation).
        fused = functools.partial(_tmg_linear, grad_accumulation="fused")
        impls.append(("torchmatgrad", fused, path, "fused"))
    if compile_peers:
        torch._dynamo.reset()
        impls.append(
            ("torch.compile", torch.compile(_torch_linear, dynamic=False), "inductor", "-")
        )
        impls.append(
            (
                "torchmatgrad.compile",
                torch.compile(_tmg_linear, dynamic=False),
                info.dispatch_path(device.type, B, dtype),
                "-",
            )
        )

    def nothing(i: int) -> None:
        pass

    def clear_grads(i: int) -> None:
        j = i % k
        ws[j].grad = None
        bs[j].grad = None
        x.grad = None

    def clear_input_grad(i: int) -> None:
        x.grad = None

    peers = []
    for name, fn, path, variant in impls:
        if case == "fwd":

            def call(i: int, fn: Callable[..., torch.Tensor] = fn) -> torch.Tensor:
                return fn(x, ws[i % k], bs[i % k])

            peers.append(_Peer(name, variant, path, nothing, call))
            continue
        if case == "fwdbwd_acc" and name == "torchmatgrad.compile":
            variant = "unfused"

        def call(i: int, fn: Callable[..., torch.Tensor] = fn) -> torch.Tensor:
            y = fn(x, ws[i % k], bs[i % k])
            y.backward(gy)
            return y

        pre = clear_grads if case == "fwdbwd" else clear_input_grad
        peers.append(_Peer(name, variant, path, pre, call))
    return peers


def run_point(
    device: torch.device,
    dtype_name: str,
    n: int,
    B: int,
    cases: Iterable[str],
    *,
    reps: int,
    warmup: int,
    max_time: float,
    copy_bw: float,
    compile_peers: bool,
    seed: int = 0,
    rates: dict[tuple[str, str, str, str], float] | None = None,
    max_call_time: float = math.inf,
) -> list[dict[str, Any]]:
    """Time every case and peer at one (device, dtype, n, B); one row per case and peer.

    ``rates`` maps (device, dtype, case, peer) to the FLOP/s of that peer's last timed row and
    is updated here; a peer predicted from it to take over ``max_call_time`` seconds per call
    is skipped (its row says so), which keeps the slow 16-bit CPU GEMMs at large B bounded."""
    dtype = DTYPES[dtype_name]
    m = n
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = 1.0 / math.sqrt(m)
    w0 = (torch.randn(n, m, device=device, generator=gen) * scale).to(dtype)
    b0 = torch.randn(n, device=device, generator=gen).to(dtype)
    x0 = torch.randn(B, m, device=device, generator=gen).to(dtype)
    gy0 = (torch.randn(B, n, device=device, generator=gen) * 0.1).to(dtype)
    k = _copies(n * m * elem, device)
    dev_name = _device_name(device)
    rows: list[dict[str, Any]] = []
    for case in cases:
        grad = case != "fwd"
        ws = [w0.clone().requires_grad_(grad) for _ in range(k)]
        bs = [b0.clone().requires_grad_(grad) for _ in range(k)]
        x = x0.clone().requires_grad_(grad)
        if case == "fwdbwd_acc":
            for w, b in zip(ws, bs, strict=True):
                w.grad = torch.zeros_like(w)
                b.grad = torch.zeros_like(b)
        peers = _peers_for(case, device, dtype, B, ws, bs, x, gy0 if grad else None, compile_peers)
        fb = floor_bytes(case, n, m, B, elem)
        fl = flops(case, n, m, B)
        for p in peers:
            rate = None if rates is None else rates.get((str(device), dtype_name, case, p.name))
            if rate and fl / rate > max_call_time:
                p.error = (
                    f"skipped: ~{fl / rate:.0f} s per call predicted "
                    f"(> --max-call-time {max_call_time:g})"
                )
        counter = itertools.count()
        _warm(peers, device, warmup, max_time, counter)
        _sample(peers, device, reps, max_time, counter)
        floor_s = fb / copy_bw
        torch_median = None
        for p in peers:
            med = statistics.median(p.samples) if p.samples else None
            if p.name == "torch":
                torch_median = med
            if med and rates is not None:
                rates[(str(device), dtype_name, case, p.name)] = fl / med
            q = statistics.quantiles(p.samples, n=4) if len(p.samples) >= 2 else None
            rows.append(
                {
                    "device": str(device),
                    "device_name": dev_name,
                    "dtype": dtype_name,
                    "n": n,
                    "m": m,
                    "B": B,
                    "case": case,
                    "peer": p.name,
                    "variant": p.variant,
                    "path": p.path,
                    "w_copies": k,
                    "reps": len(p.samples),
                    "median_ms": med * 1e3 if med else None,
                    "q1_ms": q[0] * 1e3 if q else None,
                    "q3_ms": q[2] * 1e3 if q else None,
                    "min_ms": min(p.samples) * 1e3 if p.samples else None,
                    "gbps": fb / med / 1e9 if med else None,
                    "tflops": fl / med / 1e12 if med else None,
                    "floor_bytes": fb,
                    "floor_ms": floor_s * 1e3,
                    "floor_frac": floor_s / med if med else None,
                    "speedup_vs_torch": (torch_median / med) if med and torch_median else None,
                    "rel_err": p.rel_err,
                    "error": p.error,
                }
            )
        del peers, ws, bs, x
        gc.collect()
    return rows


def _json_value(v: Any) -> Any:
    """None for a non-finite float (strict JSON has no NaN/inf)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _error_row(device: torch.device, dtype_name: str, n: int, B: int, e: BaseException) -> dict:
    """A row for a grid point that could not be set up at all."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(
        device=str(device),
        device_name=_device_name(device),
        dtype=dtype_name,
        n=n,
        m=n,
        B=B,
        case="-",
        peer="-",
        variant="-",
        path="-",
        error=_error_text(e),
    )
    return row


# ---- output --------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    return format(v, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    header = (
        "device",
        "dtype",
        "n",
        "B",
        "case",
        "peer",
        "variant",
        "path",
        "ms",
        "GB/s",
        "TFLOP/s",
        "floor ms",
        "%floor",
        "rel err",
        "speedup",
    )
    body = []
    for r in rows:
        body.append(
            (
                r["device"],
                r["dtype"],
                str(r["n"]),
                str(r["B"]),
                r["case"],
                r["peer"],
                r["variant"],
                r["path"],
                _fmt(r["median_ms"], ".4g"),
                _fmt(r["gbps"], ".3g"),
                _fmt(r["tflops"], ".3g"),
                _fmt(r["floor_ms"], ".3g"),
                _fmt(None if r["floor_frac"] is None else 100 * r["floor_frac"], ".0f"),
                _fmt(r["rel_err"], ".1e"),
                "error: " + r["error"][:60]
                if r["error"]
                else _fmt(r["speedup_vs_torch"], ".2f") + ("x" if r["speedup_vs_torch"] else ""),
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    numeric = set(range(8, 14)) | {2, 3}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    return "\n".join(out)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One line per row, columns ROW_KEYS."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=ROW_KEYS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else r[k] for k in ROW_KEYS})


def plot(rows: Sequence[dict[str, Any]], device: str, path: Path) -> bool:
    """Time vs B and speedup over torch vs B for one device: a column per dtype, two rows per
    case; a color per n, a line style per peer; the byte floor dotted gray. False (and a
    message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping plot")
        return False
    rows = [r for r in rows if r["device"] == device and r["median_ms"] is not None]
    if not rows:
        return False

    def uniq(key: str) -> list[Any]:
        return list(dict.fromkeys(r[key] for r in rows))

    dtypes, cases, ns, peers = uniq("dtype"), uniq("case"), sorted(uniq("n")), uniq("peer")
    styles = {
        "torch": "-",
        "torchmatgrad": "--",
        "torch.compile": ":",
        "torchmatgrad.compile": "-.",
    }
    markers = {"torch": "o", "torchmatgrad": "s", "torch.compile": "^", "torchmatgrad.compile": "v"}
    cmap = plt.get_cmap("viridis")
    colors = {n: cmap(i / max(1, len(ns) - 1) * 0.85) for i, n in enumerate(ns)}
    fig, axes = plt.subplots(
        2 * len(cases),
        len(dtypes),
        figsize=(4.2 * len(dtypes), 3.0 * 2 * len(cases)),
        squeeze=False,
    )
    for ci, case in enumerate(cases):
        for di, dt in enumerate(dtypes):
            ax_t, ax_s = axes[2 * ci][di], axes[2 * ci + 1][di]
            for n in ns:
                sel = [r for r in rows if r["case"] == case and r["dtype"] == dt and r["n"] == n]
                fl = sorted({(r["B"], r["floor_ms"]) for r in sel})
                if fl:
                    ax_t.plot(*zip(*fl, strict=True), color="gray", ls=":", lw=0.8)
                for peer in peers:
                    pts = sorted(
                        (r["B"], r["median_ms"], r["speedup_vs_torch"])
                        for r in sel
                        if r["peer"] == peer and r["median_ms"] is not None
                    )
                    if not pts:
                        continue
                    Bs, ms, sp = zip(*pts, strict=True)
                    kw = {
                        "color": colors[n],
                        "ls": styles.get(peer, "-"),
                        "marker": markers.get(peer, "."),
                        "ms": 3,
                        "label": f"{peer} n={n}",
                    }
                    ax_t.plot(Bs, ms, **kw)
                    if peer != "torch":
                        ax_s.plot(Bs, [s if s is not None else math.nan for s in sp], **kw)
            ax_t.set_title(f"{case} {dt}: time (ms)", fontsize=9)
            ax_s.set_title(f"{case} {dt}: speedup over torch", fontsize=9)
            ax_t.set_yscale("log")
            ax_s.axhline(1.0, color="gray", lw=0.8)
            for ax in (ax_t, ax_s):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("B (rows)", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    axes[1][0].legend(fontsize=6)
    name = rows[0]["device_name"]
    fig.suptitle(f"torchmatgrad vs torch on {name} (dotted gray: byte floor)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- command line --------------------------------------------------------------------------


def _dtype_name(s: str) -> str:
    s = _DTYPE_ALIASES.get(s.lower(), s.lower())
    if s not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {s!r}; choose from {', '.join(DTYPES)}")
    return s


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m torchmatgrad bench``."""
    p = argparse.ArgumentParser(
        prog="python -m torchmatgrad bench",
        description="Time torchmatgrad.linear against torch (forward, forward+backward, "
        "forward+backward with gradient accumulation).",
    )
    p.add_argument(
        "--device", nargs="+", help="cuda, cuda:1, cpu ... (default: all available, CUDA first)"
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        type=_dtype_name,
        help="fp32 bf16 fp16 fp64 (default: all; --quick: fp32 bf16)",
    )
    p.add_argument(
        "--n",
        nargs="+",
        type=int,
        help="sizes n = m (weight n×m); default 1024 4096 8192 (+16384 on CUDA); --quick: 256 1024",
    )
    p.add_argument(
        "--B",
        nargs="+",
        type=int,
        help="batch rows; default 1 2 4 8 16 64 256 4096; --quick: 1 16",
    )
    p.add_argument("--case", nargs="+", choices=CASES, help="default: all")
    p.add_argument("--quick", action="store_true", help="small grid, few reps (< 1 min on CPU)")
    p.add_argument("--compile", action="store_true", help="add torch.compile peers")
    p.add_argument(
        "--reps", type=int, help="timed calls per peer (default CPU/CUDA 30/100; --quick 40/30)"
    )
    p.add_argument(
        "--warmup", type=int, help="untimed calls per peer first (default 3/10; --quick 2/5)"
    )
    p.add_argument(
        "--max-time",
        type=float,
        help="seconds after which to stop sampling a peer (at least 3 calls; default 2/1; "
        "--quick 0.3/0.2)",
    )
    p.add_argument(
        "--max-call-time",
        type=float,
        help="skip a peer whose call is predicted (from its last row) to take longer "
        "(seconds; default 30 CPU, 10 CUDA; 0: never skip)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    p.add_argument("--out", default="bench_out", help="directory for JSON/CSV/PNG (bench_out)")
    p.add_argument("--name", help="file name stem (default bench-<date>-<time>)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p


def _devices(names: Sequence[str] | None) -> list[torch.device]:
    if not names:
        names = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    devices = []
    for s in names:
        d = torch.device(s)
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("CUDA requested but torch.cuda.is_available() is False")
            if d.index is None:
                d = torch.device("cuda", torch.cuda.current_device())
        elif d.type != "cpu":
            raise ValueError(f"unsupported device {s!r} (cpu or cuda)")
        devices.append(d)
    return devices


def _progress(total: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="pt", dynamic_ncols=True, leave=False)
        except ImportError:
            pass
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and write ``<out>/<name>.json``, ``.csv`` and
    ``-<device>.png``. Returns 0, or 2 on a bad request (e.g. CUDA asked for but absent)."""
    args = build_parser().parse_args(argv)
    try:
        devices = _devices(args.device)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "full"
    dtypes = args.dtype or (list(QUICK_DTYPES) if args.quick else list(DTYPES))
    Bs = args.B or list(QUICK_B if args.quick else FULL_B)
    cases = args.case or list(CASES)

    grid = []
    for d in devices:
        ns = args.n or list(QUICK_N if args.quick else FULL_N[d.type])
        grid += [(d, dt, n, B) for dt in dtypes for n in ns for B in Bs]

    t_start = time.perf_counter()
    meta = machine_info(devices)
    copy_bw: dict[str, float] = {}
    timing: dict[str, tuple[int, int, float]] = {}
    max_call_time: dict[str, float] = {}
    for d in devices:
        reps, warmup, max_time = DEFAULT_TIMING[preset][d.type]
        reps = args.reps or reps
        warmup = args.warmup if args.warmup is not None else warmup
        max_time = args.max_time if args.max_time is not None else max_time
        timing[str(d)] = (reps, max(1, warmup), max_time)
        mct = (
            args.max_call_time if args.max_call_time is not None else DEFAULT_MAX_CALL_TIME[d.type]
        )
        max_call_time[str(d)] = mct if mct > 0 else math.inf
        copy_bw[str(d)] = copy_bandwidth(d, reps=max(reps, 10), max_time=max(1.0, max_time))
        print(f"{d}: {_device_name(d)}; copy bandwidth {copy_bw[str(d)] / 1e9:.1f} GB/s")
    print(f"load average {meta['loadavg_start']}, {torch.get_num_threads()} torch threads")

    bar = _progress(len(grid), not args.no_progress)
    rows: list[dict[str, Any]] = []
    rates: dict[tuple[str, str, str, str], float] = {}
    try:
        for d, dt, n, B in grid:
            if bar is not None:
                bar.set_description(f"{d} {dt} n={n} B={B}")
            reps, warmup, max_time = timing[str(d)]
            try:
                rows += run_point(
                    d,
                    dt,
                    n,
                    B,
                    cases,
                    reps=reps,
                    warmup=warmup,
                    max_time=max_time,
                    copy_bw=copy_bw[str(d)],
                    compile_peers=args.compile,
                    seed=args.seed,
                    rates=rates,
                    max_call_time=max_call_time[str(d)],
                )
            except Exception as e:  # e.g. out of memory setting the point up
                rows.append(_error_row(d, dt, n, B, e))
                gc.collect()
                if d.type == "cuda":
                    torch.cuda.empty_cache()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t_start
    # Again at the end: a drift says the machine's load changed during the run.
    copy_bw_end = {str(d): copy_bandwidth(d, reps=10, max_time=0.5) / 1e9 for d in devices}
    rows = [{k: _json_value(v) for k, v in r.items()} for r in rows]

    print(format_table(rows))
    meta["loadavg_end"] = _loadavg()
    print(
        "copy bandwidth at the end: "
        + ", ".join(f"{d} {bw:.1f} GB/s" for d, bw in copy_bw_end.items())
        + f"; load average {meta['loadavg_end']}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or datetime.datetime.now().strftime("bench-%Y%m%d-%H%M%S")
    doc = {
        "schema": "torchmatgrad-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "elapsed_s": round(elapsed, 2),
        "settings": {
            "preset": preset,
            "dtypes": dtypes,
            "B": Bs,
            "cases": cases,
            "compile": args.compile,
            "max_call_time_s": {
                d: (None if math.isinf(t) else t) for d, t in max_call_time.items()
            },
            "timing": {
                d: dict(zip(("reps", "warmup", "max_time_s"), t, strict=True))
                for d, t in timing.items()
            },
            "timer": {
                str(d): "torch.cuda.Event per call" if d.type == "cuda" else "perf_counter per call"
                for d in devices
            },
            "notes": "median of single calls, peers interleaved; gbps = floor_bytes / median; "
            "floor_ms = floor_bytes / copy bandwidth; speedup = torch eager / this peer",
        },
        "machine": meta,
        "copy_bandwidth_GBps": {d: bw / 1e9 for d, bw in copy_bw.items()},
        "copy_bandwidth_end_GBps": copy_bw_end,
        "dispatch": {
            p.name: {"max_rows": p.max_rows, "forward": p.forward, "backward": p.backward}
            for paths in info.DISPATCH.values()
            for p in paths
        },
        "rows": rows,
    }
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    write_csv(rows, csv_path)
    written = [json_path, csv_path]
    if not args.no_plot:
        if importlib.util.find_spec("matplotlib") is None:
            print("matplotlib not installed: skipping plot")
        else:
            for d in devices:
                png = out / f"{stem}-{d.type}{d.index or ''}.png"
                if plot(rows, str(d), png):
                    written.append(png)
    print(f"{len(rows)} rows in {elapsed:.1f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
