"""The short table of a benchmark run, and the issue's targets with their verdicts.

    python -m scripts.gpu_summary RESULTS/bench.json [more.json ...] [--out summary.txt]

Reads bench JSON (one ``python -m torchmatgrad bench`` document, or the ``{"runs": [...]}`` that
scripts/gpu_bench.py writes) and prints:

1. every torchmatgrad row beside torch eager from the same run: case, dtype, n, B, **variant**
   ("-"; "unfused"/"fused" for the accumulated step; "main_grad"; "kernel" where the process was
   forced onto the hand-written kernel beside a vendor default), the path the ops took, both
   times, the speedup over torch and the fraction of the byte floor reached;
2. the targets of the GPU-check issue (#10): for each, torch, torchmatgrad on its default path
   (and the forced kernel where that differs), the target, this card's byte floor (the bytes
   that must move, at the copy bandwidth measured in the same run) and the verdict: ``met``,
   ``MISSED``, or ``not measured``; a target under the byte floor is flagged, since no kernel can
   reach it on this card (the targets were set from H200 numbers: an H100 moves about 30% fewer
   bytes per second);
3. the same targets as Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """An upper bound on torchmatgrad's median time for one benchmark row."""

    label: str
    case: str
    dtype: str
    n: int
    B: int
    variant: str  # the torchmatgrad row's variant
    ms: float


#: The issue's targets (torch 2.11 eager in the same run; H100/H200).
TARGETS = (
    Target("forward fp32 8192², B=1", "fwd", "fp32", 8192, 1, "-", 0.070),
    Target("forward fp32 8192², B=16", "fwd", "fp32", 8192, 16, "-", 0.075),
    Target("forward bf16 8192², B=1", "fwd", "bf16", 8192, 1, "-", 0.036),
    Target("forward bf16 16384², B=16", "fwd", "bf16", 16384, 16, "-", 0.135),
    Target("fwd+bwd (.grad None) fp32 8192², B=1", "fwdbwd", "fp32", 8192, 1, "-", 0.22),
    Target("fwd+bwd (.grad None) fp32 8192², B=16", "fwdbwd", "fp32", 8192, 16, "-", 0.25),
    Target("fwd+bwd (.grad None) bf16 16384², B=1", "fwdbwd", "bf16", 16384, 1, "-", 0.44),
    Target(
        "step, .grad accumulated (fused), fp32 8192², B=1",
        "fwdbwd_acc",
        "fp32",
        8192,
        1,
        "fused",
        0.29,
    ),
    Target(
        "step, main_grad fp32, bf16 16384², B=1", "fwdbwd_acc", "bf16", 16384, 1, "main_grad", 0.58
    ),
    Target(
        "step, .grad accumulated (fused), fp32 8192², B=16",
        "fwdbwd_acc",
        "fp32",
        8192,
        16,
        "fused",
        0.32,
    ),
    Target("fwd+bwd fp32 1024², B=1", "fwdbwd", "fp32", 1024, 1, "-", 0.103),
)


def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Bench documents from files holding one document or ``{"runs": [documents]}``."""
    docs = []
    for p in paths:
        doc = json.loads(Path(p).read_text(encoding="utf-8"))
        docs += doc["runs"] if "runs" in doc else [doc]
    return docs


def _rows(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for d in docs for r in d.get("rows", [])]


def _torch_variant(variant: str) -> str:
    """The torch row a torchmatgrad row is compared with: the main_grad step has its own."""
    return "main_grad" if variant.startswith("main_grad") else "-"


def _key(r: dict[str, Any], variant: str) -> tuple:
    return (r["device"], r["case"], r["dtype"], r["n"], r["B"], variant)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(torch_ms: float | None, ours_ms: float | None) -> str:
    return "-" if not torch_ms or not ours_ms else f"{torch_ms / ours_ms:.2f}x"


def _table(header: Sequence[str], body: list[Sequence[str]], right: set[int]) -> list[str]:
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(b) for b in body]


def header_lines(docs: Sequence[dict[str, Any]]) -> list[str]:
    """Card, copy bandwidth, torch, commit and date of the runs."""
    if not docs:
        return ["no benchmark runs"]
    meta = docs[0].get("machine", {})
    devices = dict.fromkeys(
        n for d in docs for n in d.get("machine", {}).get("devices", {}).values()
    )
    bws = [bw for d in docs for bw in d.get("copy_bandwidth_GBps", {}).values()]
    commit = meta.get("git_commit") or "unknown"
    if meta.get("git_dirty"):
        commit += "+dirty"
    lo, hi = (f"{min(bws):.0f}", f"{max(bws):.0f}") if bws else ("-", "-")
    bw = (lo if lo == hi else f"{lo}-{hi}") + " GB/s"
    return [
        f"{', '.join(devices) or '?'}; copy bandwidth {bw} (read + write counted); "
        f"torch {meta.get('torch', '?')} (CUDA {meta.get('torch_cuda')}); torchmatgrad commit "
        f"{commit}; {docs[0].get('created', '?')}"
    ]


def rows_table(docs: Sequence[dict[str, Any]]) -> list[str]:
    """Every torchmatgrad row beside torch's time from the same run."""
    rows = _rows(docs)
    torch_ms = {_key(r, r["variant"]): r["median_ms"] for r in rows if r["peer"] == "torch"}
    body = []
    for r in rows:
        if r["peer"] == "torch" or r["peer"] == "-":
            if r.get("error") and r["peer"] == "-":
                body.append(
                    (
                        r["case"],
                        r["dtype"],
                        str(r["n"]),
                        str(r["B"]),
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        "ERROR " + r["error"][:60],
                    )
                )
            continue
        t = torch_ms.get(_key(r, _torch_variant(r["variant"])))
        pct = None if r.get("floor_frac") is None else 100 * r["floor_frac"]
        note = ("ERROR " + r["error"][:60]) if r.get("error") else ""
        body.append(
            (
                r["case"],
                r["dtype"],
                str(r["n"]),
                str(r["B"]),
                r["variant"],
                r["path"],
                _fmt(t, ".4f"),
                _fmt(r["median_ms"], ".4f"),
                _ratio(t, r["median_ms"]),
                _fmt(pct, ".0f"),
                note,
            )
        )
    header = (
        "case",
        "dtype",
        "n",
        "B",
        "variant",
        "path",
        "torch ms",
        "ours ms",
        "speedup",
        "%floor",
        "",
    )
    return _table(header, body, right={2, 3, 6, 7, 8, 9})


@dataclass
class Verdict:
    target: Target
    torch_ms: float | None
    ours_ms: float | None
    kernel_ms: float | None  # forced onto the hand-written kernel, where the default is not
    floor_ms: float | None
    path: str

    @property
    def verdict(self) -> str:
        if self.ours_ms is None:
            return "not measured"
        if self.ours_ms <= self.target.ms:
            return "met"
        return f"MISSED (+{100 * (self.ours_ms / self.target.ms - 1):.0f}%)"

    @property
    def below_floor(self) -> bool:
        return self.floor_ms is not None and self.target.ms < self.floor_ms


def verdicts(docs: Sequence[dict[str, Any]], targets: Sequence[Target] = TARGETS) -> list[Verdict]:
    """Each target against the first matching rows (by case, dtype, n, B and variant)."""
    rows = [r for r in _rows(docs) if r.get("median_ms") is not None]
    out = []
    for t in targets:

        def find(peer: str, variant: str, t: Target = t) -> dict[str, Any] | None:
            return next(
                (
                    r
                    for r in rows
                    if (r["peer"], r["variant"], r["case"], r["dtype"], r["n"], r["B"])
                    == (peer, variant, t.case, t.dtype, t.n, t.B)
                ),
                None,
            )

        ours = find("torchmatgrad", t.variant)
        theirs = find("torch", _torch_variant(t.variant))
        kernel = find("torchmatgrad", "kernel" if t.variant == "-" else f"{t.variant},kernel")
        floor = ours or theirs
        out.append(
            Verdict(
                t,
                theirs["median_ms"] if theirs else None,
                ours["median_ms"] if ours else None,
                kernel["median_ms"] if kernel else None,
                floor["floor_ms"] if floor else None,
                ours["path"] if ours else "-",
            )
        )
    return out


def targets_table(vs: Sequence[Verdict]) -> list[str]:
    body = []
    for v in vs:
        note = "target < byte floor here" if v.below_floor else ""
        body.append(
            (
                v.target.label,
                _fmt(v.torch_ms, ".4f"),
                _fmt(v.ours_ms, ".4f"),
                _ratio(v.torch_ms, v.ours_ms),
                _fmt(v.kernel_ms, ".4f"),
                f"{v.target.ms:.3f}",
                _fmt(v.floor_ms, ".4f"),
                v.verdict,
                note,
            )
        )
    header = (
        "target",
        "torch ms",
        "ours ms",
        "speedup",
        "kernel ms",
        "target ms",
        "floor ms",
        "verdict",
        "",
    )
    lines = _table(header, body, right={1, 2, 3, 4, 5, 6})
    met = sum(v.verdict == "met" for v in vs)
    missing = sum(v.ours_ms is None for v in vs)
    lines.append(
        f"targets: {met} met, {len(vs) - met - missing} missed, {missing} not measured"
        + (
            f"; {sum(v.below_floor for v in vs)} under this card's byte floor"
            if any(v.below_floor for v in vs)
            else ""
        )
    )
    return lines


def markdown(docs: Sequence[dict[str, Any]], vs: Sequence[Verdict]) -> list[str]:
    """The targets as Markdown rows for benchmarks/RESULTS.md."""
    lines = [
        "| target | torch | torchmatgrad | speedup | forced kernel | target | floor | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in vs:
        cells = [
            v.target.label,
            _fmt(v.torch_ms, ".4f") + " ms",
            _fmt(v.ours_ms, ".4f") + " ms",
            _ratio(v.torch_ms, v.ours_ms),
            _fmt(v.kernel_ms, ".4f"),
            f"≤ {v.target.ms:.3f} ms",
            _fmt(v.floor_ms, ".4f") + " ms",
            v.verdict + (" (target < floor)" if v.below_floor else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summarize(docs: Sequence[dict[str, Any]]) -> str:
    """The whole summary: header, rows, targets, Markdown."""
    vs = verdicts(docs)
    out = header_lines(docs)
    out += ["", "torchmatgrad vs torch eager, same run (median of single calls):"]
    out += rows_table(docs)
    out += ["", "targets (issue #10):"]
    out += targets_table(vs)
    out += ["", "for benchmarks/RESULTS.md:"] + markdown(docs, vs)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="bench JSON files (or gpu_bench.py's bench.json)")
    p.add_argument("--out", help="also write the summary here")
    args = p.parse_args(argv)
    try:
        docs = load(args.json)
    except (OSError, ValueError, KeyError) as e:
        print(f"gpu_summary: cannot read {args.json}: {e}", file=sys.stderr)
        return 2
    text = summarize(docs)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
