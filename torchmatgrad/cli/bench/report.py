"""The results: the text table, the CSV file and the plot."""

from __future__ import annotations

import csv
import datetime
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .grid import ROW_KEYS


def _json_value(v: Any) -> Any:
    """None for a non-finite float (strict JSON has no NaN/inf)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def output_stem(out: str | Path, name: str | None, prefix: str) -> tuple[Path, str]:
    """The results folder (created) and the file stem: ``name``, else ``<prefix>-<local time>``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder, name or datetime.datetime.now().strftime(f"{prefix}-%Y%m%d-%H%M%S")


def now_utc() -> str:
    """The ``created`` stamp of a results document."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(doc: dict[str, Any], path: Path) -> Path:
    """``doc`` as strict JSON (its rows' non-finite floats as None) at ``path``."""
    doc = {**doc, "rows": [{k: _json_value(v) for k, v in r.items()} for r in doc["rows"]]}
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


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
        "unit",
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
                r.get("unit") or "-",
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
    numeric = set(range(9, 15)) | {2, 3}

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
