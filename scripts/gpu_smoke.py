"""Every kernel path of torchmatgrad once, on small shapes, against float64 references.

    python -m scripts.gpu_smoke [--device cuda|cpu] [--paths kernel vendor] [--sanitize]

For each dtype (float32, bfloat16, float64, float16), row count (1, 3, 16: the few-rows kernels
for RMAX 1, 4, 16; 40: the tiled GEMM) and layout (16-byte loads; a base pointer one element
off, odd widths and no bias: the scalar loads), plus a strip with many row chunks, a GEMM with
at least two 128² tiles per multiprocessor and empty shapes, it runs the three ops with the
process forced onto each path (``--paths``; the hand-written kernels and the vendor route):

* ``linear`` (forward);
* ``linear_backward`` under five output masks (unwanted results must come back as None);
* ``linear_backward_accumulate_`` into a copy of an existing gradient, and for 16-bit weights
  into a float32 master gradient;
* and, outside ``--sanitize``, a two-micro-batch training step through ``torchmatgrad.linear``
  with ``grad_accumulation="fused"`` and ``"main_grad"``.

Each result is compared with the float64 reference computed from the same input values, under
torchmatgrad.testing's tolerance policy (k = terms summed; for 16-bit dtypes the peers are the
CPU kernel's and torch's results in the same dtype, torch's on the CPU and, outside
``--sanitize``, on the device). Outputs are checked for NaN (the allocator is poisoned first),
so an unwritten element fails.

``--device cpu`` runs exactly the same checks on the CPU kernels, so everything but the CUDA
kernels themselves is tried on a machine without a GPU before a GPU is spent on it.
``--sanitize`` (for compute-sanitizer) checks the hand-written kernels only and makes every device
input by a host-to-device copy, so initcheck sees initialized memory without instrumenting torch's
own kernels. Exit status: 0 all match, 1 a mismatch (each is listed), 2 bad usage (e.g. no GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import torchmatgrad
from torchmatgrad import policy
from torchmatgrad.testing import DTYPES as DTYPE_NAMES
from torchmatgrad.testing import (
    SHORT_NAMES,
    assert_close,
    generator,
    poison_allocator,
    rand,
)

ops = torch.ops.torchmatgrad
DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
ROWS = (1, 3, 16, 40)  # few-rows kernels RMAX 1, 4, 16; 40 > kFewRows: the tiled GEMM
BACKWARD_MASKS = (
    (True, True, True),
    (True, False, False),
    (False, True, False),
    (False, False, True),
    (False, True, True),
)
ACCUMULATE_MASKS = ((True, True), (False, False))


@dataclass(frozen=True)
class Case:
    """One shape: x [rows, m], W [n, m], G [rows, n]; ``offset``: every tensor starts that many
    elements into its buffer (misaligned base pointers: the scalar-load fallback)."""

    dtype: torch.dtype
    rows: int
    n: int
    m: int
    offset: int = 0
    bias: bool = True

    def __str__(self) -> str:
        extra = (f" off={self.offset}" if self.offset else "") + ("" if self.bias else " nobias")
        return f"{SHORT_NAMES[self.dtype]} R={self.rows} n={self.n} m={self.m}{extra}"


def cases(dtypes=DTYPES) -> list[Case]:
    out = []
    for dtype in dtypes:
        for rows in ROWS:
            out.append(Case(dtype, rows, 70, 64))  # 16-byte loads; 70 W rows: several chunks
            out.append(Case(dtype, rows, 9, 67, offset=1, bias=False))  # scalar loads
    out.append(Case(torch.float32, 1, 300, 8))  # many row chunks of a narrow strip
    out.append(Case(torch.bfloat16, 5, 300, 8, offset=1))
    out.append(Case(torch.float32, 2200, 2300, 24))  # 128² GEMM tiles, ≥ 2 per multiprocessor
    out.append(Case(torch.bfloat16, 300, 264, 1032))  # K = 1032: many k-tiles, 16-byte loads
    for rows, n, m in ((0, 5, 7), (3, 0, 7), (3, 5, 0), (20, 5, 0)):  # empty
        out.append(Case(torch.float32, rows, n, m))
    return out


# ---- running the ops ---------------------------------------------------------------------------


def make_inputs(case: Case, seed: int) -> dict[str, torch.Tensor | None]:
    """CPU inputs from one seed (float64 draws cast to the dtype: the reference sees the same
    values)."""
    g = generator(seed)
    kw = {"dtype": case.dtype, "generator": g}
    t = {
        "x": rand(case.rows, case.m, **kw),
        "w": rand(case.n, case.m, **kw),
        "g": rand(case.rows, case.n, **kw),
        "b": rand(case.n, **kw) if case.bias else None,
        "gw0": rand(case.n, case.m, **kw),
    }
    if case.dtype in (torch.bfloat16, torch.float16):
        t["gw32"] = rand(case.n, case.m, dtype=torch.float32, generator=g)
    return t


def place(t: torch.Tensor | None, device: str, offset: int) -> torch.Tensor | None:
    """A copy of ``t`` on ``device`` made by a host-to-device copy (no device kernel runs);
    ``offset`` elements into a larger buffer when asked (a misaligned base pointer)."""
    if t is None:
        return None
    if not offset:
        return t.to(device, copy=True)
    host = torch.empty(t.numel() + offset, dtype=t.dtype)
    host[offset:].copy_(t.reshape(-1))
    return host.to(device)[offset:].view(t.shape)


def run_ops(t: dict, poison: bool) -> dict[str, torch.Tensor | None]:
    """Every op on the tensors ``t``; results by name (None where a mask left one out)."""
    x, w, g, b = t["x"], t["w"], t["g"], t["b"]
    dev = w.device

    def fresh(shape, dtype):
        if poison:
            poison_allocator(shape, dtype, dev)

    out: dict[str, torch.Tensor | None] = {}
    fresh((x.shape[0], w.shape[0]), w.dtype)
    out["forward"] = ops.linear(x, w, b)
    for mask in BACKWARD_MASKS:
        fresh(w.shape, w.dtype)
        gi, gw, gb = ops.linear_backward(g, x, w, list(mask))
        tag = "".join("T" if k else "F" for k in mask)
        out[f"backward {tag} grad_input"] = gi
        out[f"backward {tag} grad_weight"] = gw
        out[f"backward {tag} grad_bias"] = gb
    for mask in ACCUMULATE_MASKS:
        tag = "".join("T" if k else "F" for k in mask)
        acc = t["gw0"].clone()
        gi, gb = ops.linear_backward_accumulate_(g, x, w, acc, list(mask))
        out[f"accumulate {tag} grad_weight"] = acc
        out[f"accumulate {tag} grad_input"] = gi
        out[f"accumulate {tag} grad_bias"] = gb
    if "gw32" in t:
        acc32 = t["gw32"].clone()
        ops.linear_backward_accumulate_(g, x, w, acc32, [False, False])
        out["accumulate fp32 master grad_weight"] = acc32
    return out


def references(t: dict) -> dict[str, tuple[torch.Tensor | None, int]]:
    """(float64 reference or None where masked out, terms summed) for every result of run_ops."""
    x, w, g = (t[k].double() for k in ("x", "w", "g"))
    rows, n, m = x.shape[0], w.shape[0], w.shape[1]
    y = F.linear(x, w, None if t["b"] is None else t["b"].double())
    gi, gw, gb = g @ w, g.t() @ x, g.sum(0)
    ref: dict[str, tuple[torch.Tensor | None, int]] = {"forward": (y, m)}
    for mask in BACKWARD_MASKS:
        tag = "".join("T" if k else "F" for k in mask)
        for want, name, r, k in zip(
            mask,
            ("grad_input", "grad_weight", "grad_bias"),
            (gi, gw, gb),
            (n, rows, rows),
            strict=True,
        ):
            ref[f"backward {tag} {name}"] = (r if want else None, k)
    for mask in ACCUMULATE_MASKS:
        tag = "".join("T" if k else "F" for k in mask)
        ref[f"accumulate {tag} grad_weight"] = (t["gw0"].double() + gw, rows + 1)
        ref[f"accumulate {tag} grad_input"] = (gi if mask[0] else None, n)
        ref[f"accumulate {tag} grad_bias"] = (gb if mask[1] else None, rows)
    if "gw32" in t:
        ref["accumulate fp32 master grad_weight"] = (t["gw32"].double() + gw, rows + 1)
    return ref


def torch_results(t: dict) -> dict[str, torch.Tensor]:
    """torch's own results in the inputs' dtype (peers of the 16-bit tolerance)."""
    x, w, g, b = t["x"], t["w"], t["g"], t["b"]
    gw = g.t() @ x
    out = {"forward": F.linear(x, w, b)}
    for mask in BACKWARD_MASKS:
        tag = "".join("T" if k else "F" for k in mask)
        out[f"backward {tag} grad_input"] = g @ w
        out[f"backward {tag} grad_weight"] = gw
        out[f"backward {tag} grad_bias"] = g.sum(0)
    for mask in ACCUMULATE_MASKS:
        tag = "".join("T" if k else "F" for k in mask)
        out[f"accumulate {tag} grad_weight"] = t["gw0"] + gw
        out[f"accumulate {tag} grad_input"] = g @ w
        out[f"accumulate {tag} grad_bias"] = g.sum(0)
    if "gw32" in t:
        out["accumulate fp32 master grad_weight"] = t["gw32"] + gw.float()
    return out


# ---- checks --------------------------------------------------------------------------------------


class Report:
    """Counts checks and collects every mismatch (the run goes on after one)."""

    def __init__(self) -> None:
        self.checks = 0
        self.failures: list[str] = []

    def check(self, what: str, fn: Callable[[], None]) -> None:
        self.checks += 1
        try:
            fn()
        except AssertionError as e:
            self.failures.append(f"{what}: {e}")
        except Exception as e:  # noqa: BLE001 - a crash of one op is a finding, not the end
            self.failures.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")


def check_case(
    report: Report, case: Case, device: str, path: str, seed: int, sanitize: bool
) -> None:
    cpu = make_inputs(case, seed)
    refs = references(cpu)
    peers: dict[str, list[torch.Tensor]] = {name: [] for name in refs}
    if case.dtype in (torch.bfloat16, torch.float16):
        for name, r in torch_results(cpu).items():
            peers[name].append(r)
        if device != "cpu":  # the CPU kernel in the same dtype
            with policy.force_path("kernel"):
                for name, r in run_ops(cpu, poison=False).items():
                    if r is not None:
                        peers[name].append(r)
    dev = {k: place(v, device, case.offset) for k, v in cpu.items()}
    with policy.force_path(path):
        got = run_ops(dev, poison=not sanitize)
    if device != "cpu":
        torch.cuda.synchronize()
        if case.dtype in (torch.bfloat16, torch.float16) and not sanitize:
            # torch on the device (cuBLAS, which may reduce in 16 bits): the vendor route's peer
            for name, r in torch_results(dev).items():
                peers[name].append(r)
    for name, (ref, k) in refs.items():
        what = f"{device} {path:6s} {case}: {name}"
        ours = got[name]
        if ref is None:
            report.check(what, lambda ours=ours: _assert_none(ours))
            continue

        def one(ours=ours, ref=ref, k=k, name=name, what=what) -> None:
            assert ours is not None, "missing result"
            assert ours.device.type == torch.device(device).type, f"on {ours.device}"
            assert_close(ours, ref, k=k, peers=peers[name], what=name)

        report.check(what, one)


def _assert_none(t: torch.Tensor | None) -> None:
    assert t is None, "a result left out by the mask was computed"


def check_training_step(report: Report, device: str, path: str, seed: int) -> None:
    """Two micro-batches through torchmatgrad.linear with fused accumulation into ``.grad`` and
    into a float32 ``main_grad``, against float64 autograd."""
    for dtype, mode in (
        (torch.float32, "fused"),
        (torch.bfloat16, "fused"),
        (torch.bfloat16, "main_grad"),
    ):
        for rows in (1, 16, 40):
            n, m = 48, 72
            gen = generator(seed + rows)
            w0 = rand(n, m, dtype=dtype, generator=gen)
            b0 = rand(n, dtype=dtype, generator=gen)
            xs = [rand(rows, m, dtype=dtype, generator=gen) for _ in range(2)]
            cs = [rand(rows, n, dtype=dtype, generator=gen) for _ in range(2)]
            what = f"{device} {path:6s} step {SHORT_NAMES[dtype]} R={rows} {mode}"

            def one(w0=w0, b0=b0, xs=xs, cs=cs, mode=mode, rows=rows) -> None:
                w = w0.to(device).requires_grad_()
                b = b0.to(device).requires_grad_()
                with policy.force_path(path):
                    for x, c in zip(xs, cs, strict=True):
                        y = torchmatgrad.linear(x.to(device), w, b, grad_accumulation=mode)
                        (y * c.to(device)).sum().backward()
                ref_gw = sum(c.double().t() @ x.double() for x, c in zip(xs, cs, strict=True))
                ref_gb = sum(c.double().sum(0) for c in cs)
                k = 2 * rows
                if mode == "main_grad":
                    assert w.grad is None, ".grad written although main_grad was asked for"
                    got = w.main_grad
                    assert got.dtype == torch.float32, f"main_grad is {got.dtype}"
                    # float32 sums of exact 16-bit products: a float32 bound
                    assert_close(got, ref_gw, k=k, what="main_grad")
                else:
                    theirs = sum(c.t() @ x for x, c in zip(xs, cs, strict=True))
                    assert_close(w.grad, ref_gw, k=k, peers=[theirs], what="weight.grad")
                assert_close(b.grad, ref_gb, k=k, peers=[sum(c.sum(0) for c in cs)], what="bias")

            report.check(what, one)


def run(device: str, paths: list[str], sanitize: bool, seed: int, dtypes) -> Report:
    report = Report()
    for path in paths:
        t0 = time.perf_counter()
        before = len(report.failures)
        for i, case in enumerate(cases(dtypes)):
            check_case(report, case, device, path, seed + i, sanitize)
        if not sanitize:
            check_training_step(report, device, path, seed)
        bad = len(report.failures) - before
        print(
            f"{device} path={path}: {'ok' if not bad else f'{bad} MISMATCHES'} "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return report


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument(
        "--paths",
        nargs="+",
        choices=("kernel", "vendor", "auto"),
        help="paths to force, in turn (default: kernel vendor; --sanitize: kernel)",
    )
    p.add_argument(
        "--dtypes", nargs="+", type=_dtype, help="float32 bfloat16 float64 float16 (default all)"
    )
    p.add_argument(
        "--sanitize",
        action="store_true",
        help="for compute-sanitizer: hand-written kernels only, inputs copied from the host, no "
        "allocator poisoning, no autograd step",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = str(torch.device(args.device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if device.startswith("cuda") and not torchmatgrad._C.with_cuda:
        print("gpu_smoke: the extension was built without CUDA", file=sys.stderr)
        return 2
    paths = args.paths or (["kernel"] if args.sanitize else ["kernel", "vendor"])
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU kernels"
    print(
        f"gpu_smoke: {device} ({name}), torch {torch.__version__}, paths {', '.join(paths)}"
        + (", sanitize mode" if args.sanitize else ""),
        flush=True,
    )
    report = run(device, paths, args.sanitize, args.seed, tuple(args.dtypes or DTYPES))
    for line in report.failures:
        print("MISMATCH " + line)
    verdict = "all match" if not report.failures else f"{len(report.failures)} mismatches"
    print(f"gpu_smoke: {report.checks} checks on {device}: {verdict}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
