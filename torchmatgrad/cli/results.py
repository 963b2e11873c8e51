"""The current benchmark tables per machine kind, from the stored JSON: ``python -m torchmatgrad
results``.

It reads ``benchmarks/results/``: every ``<commit>-...-grid.json`` (a CPU grid written by ``bench
--name <commit>-torch<version>-grid``) and every ``<commit>-<card>-bench.json`` (the bench
stage of ``scripts/gpu_check.sh``, several bench documents in one file). The other files there
(partial runs, ``shapes.py``, ``--case dp``, ``tune``) have their own layouts and are listed in
benchmarks/RESULTS.md's index, not summarised here.

A machine kind is what decides the ratios: for a CPU its model name, the ISA unit the kernels ran
with and the torch version; for a GPU the card and the torch version. Per kind the newest run (by
its ``created`` time) is the current one. Its table says, per dtype (and, in the full form, per
weight size), how many of torchmatgrad's default-path rows (``bench``'s "-", "unfused", "fused"
and "main_grad" variants; the forced-kernel rows beside them are left out) reach 0.97× torch's
speed in the same run, their median and worst ratio, and which paths ran. The commit is the one
the file is named after.

``--write`` rewrites the block between ``<!-- results:begin -->`` and ``<!-- results:end -->``
in README.md (the short form) and in benchmarks/RESULTS.md (the full form); ``--check`` exits 1
when either is stale (tests/test_results.py asserts the same).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BEGIN",
    "END",
    "THRESHOLD",
    "Run",
    "current",
    "load_runs",
    "render",
    "summarize",
    "update",
]

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# A row "keeps up" with torch at 0.97× or more: the noise of one run on the 2-core guests.
THRESHOLD = 0.97
GRID_SCHEMA = "torchmatgrad-bench/1"
GPU_SCHEMA = "torchmatgrad-gpu-bench/1"
# bench's variants on the default path; "kernel" (forced hand-written path) rows are extra.
DEFAULT_VARIANTS = ("-", "unfused", "fused", "main_grad")
CASES = {"fwd": "fwd", "fwdbwd": "fwd+bwd", "fwdbwd_acc": "acc"}


@dataclass(frozen=True)
class Run:
    """One stored benchmark run: the file, its commit (from the file name) and its rows."""

    path: Path
    commit: str
    created: datetime.datetime
    machine: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def device(self) -> str:
        """ "cpu" or "cuda", from the rows (a run times one device type)."""
        types = {str(r.get("device", "cpu")).split(":")[0] for r in self.rows}
        return "cuda" if "cuda" in types else "cpu"

    @property
    def kind(self) -> tuple[str, ...]:
        m = self.machine
        if self.device == "cuda":
            cards = [v for k, v in m.get("devices", {}).items() if k.startswith("cuda")]
            return ("cuda", cards[0] if cards else "?", str(m.get("torch")))
        return ("cpu", str(m.get("cpu_model")), str(m.get("cpu_isa")), str(m.get("torch")))

    @property
    def date(self) -> str:
        return self.created.date().isoformat()


def _created(doc: dict[str, Any], path: Path) -> datetime.datetime:
    try:
        t = datetime.datetime.fromisoformat(str(doc["created"]))
    except (KeyError, ValueError) as e:
        got = doc.get("created")
        raise ValueError(f"{path}: 'created' must be an ISO time, got {got!r}") from e
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def load_runs(directory: Path = RESULTS_DIR) -> list[Run]:
    """The grids and GPU bench files under ``directory``, oldest first."""
    runs = []
    for path in sorted(Path(directory).glob("*.json")):
        if not path.name.endswith(("-grid.json", "-bench.json")):
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        docs = doc.get("runs", []) if doc.get("schema") == GPU_SCHEMA else [doc]
        docs = [d for d in docs if d.get("schema") == GRID_SCHEMA and d.get("rows")]
        if not docs:
            continue
        rows = [r for d in docs for r in d["rows"]]
        created = max(_created(d, path) for d in docs)
        commit = path.name.split("-", 1)[0]
        runs.append(Run(path, commit, created, docs[0]["machine"], rows))
    return sorted(runs, key=lambda r: r.created)


def _version(torch_version: str) -> tuple[int, ...]:
    """(2, 14, 1) for "2.14.1+cu130"."""
    head = torch_version.split("+")[0]
    return tuple(int(p) for p in head.split(".") if p.isdigit())


def current(runs: Iterable[Run]) -> list[Run]:
    """The newest run of each machine kind: CPUs first, the machine (model and ISA unit, or
    card) run most recently first, and on one machine the newest torch first."""
    newest: dict[tuple[str, ...], Run] = {}
    for run in runs:
        if run.kind not in newest or run.created > newest[run.kind].created:
            newest[run.kind] = run
    latest: dict[tuple[str, ...], float] = {}
    for run in newest.values():
        machine = run.kind[:-1]
        latest[machine] = max(latest.get(machine, 0.0), run.created.timestamp())

    def order(run: Run) -> tuple[Any, ...]:
        version = tuple(-v for v in _version(run.kind[-1]))
        return (run.device != "cpu", -latest[run.kind[:-1]], run.kind[:-1], version)

    return sorted(newest.values(), key=order)


# ---- the summary ------------------------------------------------------------------------------


def _is_vendor(path: str) -> bool:
    return ":vendor" in path


def _path_class(path: str) -> str:
    parts = path.split("+")
    if all(_is_vendor(p) for p in parts):
        return "vendor"
    return "kernel" if not any(_is_vendor(p) for p in parts) else "mixed"


def _size(row: dict[str, Any]) -> str:
    n, m = row["n"], row["m"]
    return f"{n}²" if n == m else f"{n}×{m}"


def _cell(row: dict[str, Any], size: bool = False, dtype: bool = False) -> str:
    case = CASES.get(row["case"], row["case"])
    variant = "" if row.get("variant", "-") == "-" else f" {row['variant']}"
    shape = (f"{row['dtype']} " if dtype else "") + (f"{_size(row)} " if size else "")
    return f"{shape}{case}{variant} B={row['B']}"


def coverage(rows: Sequence[dict[str, Any]]) -> str:
    """What a run covered: its cases, weight sizes and batch rows."""
    mine = default_rows(rows)
    cases = [CASES.get(c, c) for c in dict.fromkeys(r["case"] for r in mine)]
    sizes = sorted({(r["n"] * r["m"], _size(r)) for r in mine})
    Bs = sorted({int(r["B"]) for r in mine})
    size = ", ".join(s for _, s in sizes) if len(sizes) <= 3 else f"{sizes[0][1]}–{sizes[-1][1]}"
    B = ", ".join(map(str, Bs)) if len(Bs) <= 3 else f"{Bs[0]}–{Bs[-1]}"
    return f"{', '.join(cases)}; {size}; B = {B}"


@dataclass(frozen=True)
class Summary:
    """torchmatgrad's default-path rows of one group, against torch in the same run."""

    rows: int
    kept_up: int  # speedup ≥ THRESHOLD
    failed: int  # a row with an error (no time)
    median: float | None
    worst: dict[str, Any] | None  # the row with the lowest ratio
    paths: dict[str, int]  # kernel / vendor / mixed -> rows


def default_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if r.get("peer") == "torchmatgrad" and r.get("variant", "-") in DEFAULT_VARIANTS
    ]


def summarize(rows: Sequence[dict[str, Any]]) -> Summary:
    """The summary of torchmatgrad's default-path rows among ``rows``."""
    mine = default_rows(rows)
    timed = [r for r in mine if r.get("speedup_vs_torch") is not None and not r.get("error")]
    ratios = [float(r["speedup_vs_torch"]) for r in timed]
    paths: dict[str, int] = {}
    for r in timed:
        c = _path_class(str(r.get("path", "")))
        paths[c] = paths.get(c, 0) + 1
    return Summary(
        rows=len(mine),
        kept_up=sum(x >= THRESHOLD for x in ratios),
        failed=len(mine) - len(timed),
        median=statistics.median(ratios) if ratios else None,
        worst=min(timed, key=lambda r: float(r["speedup_vs_torch"])) if timed else None,
        paths=paths,
    )


# ---- rendering --------------------------------------------------------------------------------


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _png(run: Run) -> Path | None:
    """The PNG that ``bench`` wrote beside the run's JSON (``<stem>-cpu.png``, ``<stem>.png``)."""
    stem = run.path.name[: -len(".json")]
    for name in (f"{stem}-{run.device}.png", f"{stem}.png"):
        if (run.path.parent / name).exists():
            return run.path.parent / name
    return None


def plot(run: Run, runs: Iterable[Run]) -> tuple[Path, str] | None:
    """(PNG, its commit): the run's own plot, else that of the newest earlier run of its kind
    that has one (a grid run with ``--no-plot``, or without matplotlib, stores none)."""
    earlier = [r for r in runs if r.kind == run.kind and r.created <= run.created]
    for r in sorted(earlier, key=lambda r: r.created, reverse=True):
        png = _png(r)
        if png is not None:
            return png, r.commit
    return None


def heading(run: Run, png: tuple[Path, str] | None, base: Path) -> str:
    """The line naming the machine, torch, commit, date, the file and the plot."""
    m = run.machine
    if run.device == "cuda":
        what = f"**{run.kind[1]}**, torch {m.get('torch')}"
    else:
        threads = m.get("torch_threads")
        what = (
            f"**{m.get('cpu_model')}**, ISA unit `{m.get('cpu_isa')}`"
            + (f", {threads} threads" if threads else "")
            + f", torch {m.get('torch')}"
        )
    links = f"[JSON]({_link(run.path, base)})"
    if png is None:
        links += ", no plot stored"
    else:
        of = "" if png[1] == run.commit else f" of {png[1]}"
        links += f", [plot{of}]({_link(png[0], base)})"
    return f"{what}; commit {run.commit}, {run.date} ({links})"


def _paths(s: Summary) -> str:
    return ", ".join(f"{k} {s.paths[k]}" for k in ("kernel", "mixed", "vendor") if k in s.paths)


def _line(label: Sequence[str], s: Summary, full: bool) -> str:
    kept = f"{s.kept_up} of {s.rows}" + (f" ({s.failed} failed)" if s.failed else "")
    worst = "–"
    if s.worst is not None:  # the full form's line names the weight already
        worst = f"{_x(s.worst['speedup_vs_torch'])} ({_cell(s.worst, not full)})"
    cells = [*label, kept, _x(s.median), worst] + ([_paths(s)] if full else [])
    return "| " + " | ".join(cells) + " |"


def _dtypes(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["dtype"] for r in default_rows(rows)))


def table(run: Run, full: bool) -> list[str]:
    """One run's summary table: per dtype (short) or per dtype and weight size (full)."""
    head = ["dtype"] + (["weight"] if full else []) + [f"rows ≥ {THRESHOLD}× torch", "median"]
    head += ["worst"] + (["paths (rows)"] if full else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dtype in _dtypes(run.rows):
        of_dtype = [r for r in run.rows if r["dtype"] == dtype]
        if not full:
            out.append(_line([dtype], summarize(of_dtype), full))
            continue
        sizes = dict.fromkeys((r["n"], r["m"]) for r in default_rows(of_dtype))
        for n, m in sorted(sizes):
            group = [r for r in of_dtype if (r["n"], r["m"]) == (n, m)]
            out.append(_line([dtype, _size(group[0])], summarize(group), full))
    return out


def _ratio(row: dict[str, Any]) -> float:
    v = row.get("speedup_vs_torch")
    return float("inf") if v is None else float(v)


def notes(run: Run) -> list[str]:
    """The full form's lines under a table: the forced-kernel rows, and every row below."""
    out = []
    forced = [r for r in run.rows if r.get("peer") == "torchmatgrad"]
    forced = [r for r in forced if "kernel" in str(r.get("variant", "")).split(",")]
    forced = [r for r in forced if r.get("speedup_vs_torch") is not None]
    if forced:
        worst = min(forced, key=_ratio)
        median = statistics.median(_ratio(r) for r in forced)
        out += [
            "The hand-written kernels forced where the default is the vendor route: "
            f"{len(forced)} row{'s' * (len(forced) != 1)}, median {_x(median)}, lowest "
            f"{_x(_ratio(worst))} ({_cell(worst, True, True)}).",
            "",
        ]
    below = sorted((r for r in default_rows(run.rows) if _ratio(r) < THRESHOLD), key=_ratio)
    if below:
        cells = ", ".join(f"{_cell(r, True, True)} {_x(_ratio(r))}" for r in below)
        out += [f"Below {THRESHOLD}×: {cells}.", ""]
    return out


def render(runs: Iterable[Run], full: bool, base: Path) -> str:
    """The generated block: for each machine kind's current run, its heading and table. Links
    are relative to ``base`` (the folder of the file the block goes in)."""
    runs = list(runs)
    out: list[str] = []
    for run in current(runs):
        s = summarize(run.rows)
        png = plot(run, runs)
        total = f"{s.rows} rows ({coverage(run.rows)}): {s.kept_up} ≥ {THRESHOLD}×, median "
        out += [f"{heading(run, png, base)}: {total}{_x(s.median)}.", "", *table(run, full), ""]
        if full:
            out += notes(run)
        elif png is not None:
            what = run.kind[1] if run.device == "cuda" else f"{run.kind[1]}, {run.kind[3]}"
            out += [f"![{what}, commit {png[1]}]({_link(png[0], base)})", ""]
    if not out:
        return "No stored grid found.\n"
    return "\n".join(out).rstrip() + "\n"


def _replace(text: str, block: str, where: Path) -> str:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"{where}: the markers {BEGIN} ... {END} are missing")
    return text[: begin + len(BEGIN)] + "\n" + block + text[end:]


def expected(target: Path, runs: Sequence[Run], full: bool) -> str:
    """``target``'s text with its generated block as the stored results say now."""
    text = target.read_text(encoding="utf-8")
    return _replace(text, render(runs, full, target.parent), target)


def update(
    directory: Path = RESULTS_DIR,
    targets: Sequence[tuple[Path, bool]] | None = None,
    *,
    write: bool,
) -> list[Path]:
    """The targets (file, full form?) whose block is stale; rewritten when ``write``."""
    targets = targets if targets is not None else [(README, False), (RESULTS_MD, True)]
    runs = load_runs(directory)
    stale = []
    for target, full in targets:
        text = expected(target, runs, full)
        if text != target.read_text(encoding="utf-8"):
            stale.append(target)
            if write:
                target.write_text(text, encoding="utf-8")
    return stale


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchmatgrad results",
        description="Print the current benchmark table of each machine kind, from the JSON "
        "stored in benchmarks/results/ (the newest grid of each CPU model + ISA unit + torch, "
        "and of each GPU card + torch): torchmatgrad's default-path rows against torch in the "
        "same run.",
    )
    p.add_argument("--dir", type=Path, default=RESULTS_DIR, help="the stored results' folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--short", action="store_true", help="the README's form: one row per dtype")
    g.add_argument(
        "--write",
        action="store_true",
        help="rewrite the generated blocks of README.md (short) and benchmarks/RESULTS.md (full)",
    )
    g.add_argument("--check", action="store_true", help="exit 1 when either block is stale")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.write or args.check:
        stale = update(args.dir, write=args.write)
        for path in stale:
            print(f"{'wrote' if args.write else 'stale'}: {path}")
        return 1 if stale and args.check else 0
    sys.stdout.write(render(load_runs(args.dir), not args.short, Path.cwd()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
