"""``python -m torchmatgrad results``: the generated blocks of README.md and benchmarks/RESULTS.md
are what the stored JSON says now, and the command groups, picks and summarises runs correctly
(checked on small synthetic runs)."""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

import pytest
import torch

from torchmatgrad import cli
from torchmatgrad.cli import results

CASES = [("fwd", "-"), ("fwdbwd", "-"), ("fwdbwd_acc", "unfused"), ("fwdbwd_acc", "fused")]


def test_blocks_are_current():
    stale = results.update(write=False)
    assert not stale, f"stale results blocks in {stale}: run python -m torchmatgrad results --write"


def test_readme_stays_short():
    # Issue 29: a newcomer's five minutes. A new machine kind adds 9 lines to the block; when
    # this fails, shorten the prose (move it to docs/), not the generated tables.
    lines = results.README.read_text(encoding="utf-8").count("\n")
    assert lines <= 220, f"README.md has {lines} lines, at most 220"


def _row(dtype, n, B, case, variant, peer, speedup, path="cpu:few-rows", device="cpu"):
    return {
        "device": device,
        "dtype": dtype,
        "n": n,
        "m": n,
        "B": B,
        "case": case,
        "peer": peer,
        "variant": variant,
        "path": path if peer == "torchmatgrad" else "aten",
        "median_ms": 1.0,
        "speedup_vs_torch": speedup,
        "error": None,
    }


def _grid(rng, ratios=None, dtypes=("fp32", "bf16"), sizes=(64, 256), Bs=(1, 16, 256)):
    """Rows of a grid: torch's and torchmatgrad's default rows (random ratios unless given), and
    a forced-kernel row per cell whose ratio must never count."""
    rows, k = [], 0
    for dtype in dtypes:
        for n in sizes:
            for B in Bs:
                for case, variant in CASES:
                    rows.append(_row(dtype, n, B, case, "-", "torch", 1.0))
                    x = ratios[k] if ratios is not None else rng.uniform(0.5, 3.0)
                    k += 1
                    path = "cpu:vendor:MKL/oneDNN" if B == 256 else "cpu:few-rows"
                    rows.append(_row(dtype, n, B, case, variant, "torchmatgrad", x, path))
                    rows.append(_row(dtype, n, B, case, "kernel", "torchmatgrad", 1e-3))
    return rows


def _machine(cpu="Test CPU", isa="avx512", torch_version="2.14.1"):
    return {
        "cpu_model": cpu,
        "cpu_isa": isa,
        "torch": torch_version,
        "torch_threads": 2,
        "devices": {"cpu": cpu},
    }


def _doc(rows, machine, created):
    return {
        "schema": results.GRID_SCHEMA,
        "created": created,
        "argv": [],
        "settings": {"preset": "full"},
        "machine": machine,
        "rows": rows,
    }


def _write(path, doc):
    path.write_text(json.dumps(doc), encoding="utf-8")


def test_grouping_and_newest_wins(tmp_path):
    rng = random.Random()
    kind_a, kind_b = _machine(), _machine(isa="avx512bf16")
    _write(tmp_path / "aaaaaaa-t-grid.json", _doc(_grid(rng), kind_a, "2026-01-01T00:00:00+00:00"))
    _write(tmp_path / "bbbbbbb-t-grid.json", _doc(_grid(rng), kind_a, "2026-01-02T00:00:00+00:00"))
    # Named after an older commit, but run later: the time decides.
    _write(tmp_path / "0000000-t-grid.json", _doc(_grid(rng), kind_b, "2026-01-03T00:00:00+00:00"))
    _write(tmp_path / "ccccccc-t-grid.json", _doc(_grid(rng), kind_b, "2026-01-01T12:00:00+00:00"))
    # The first machine again, with another torch: its own kind, listed beside the first.
    older_torch = _machine(torch_version="2.13.0")
    _write(tmp_path / "1111111-t-grid.json", _doc(_grid(rng), older_torch, "2026-01-04T00:00:00"))
    # Not a grid (a partial run, another layout): never current.
    _write(tmp_path / "ddddddd-t-a.json", _doc(_grid(rng), kind_a, "2026-02-01T00:00:00+00:00"))
    (tmp_path / "eeeeeee-t-shapes.json").write_text('{"meta": {}, "rows": []}', encoding="utf-8")
    (tmp_path / "bbbbbbb-t-grid-cpu.png").write_bytes(b"")
    (tmp_path / "ccccccc-t-grid-cpu.png").write_bytes(b"")  # the kind's newest plot

    runs = results.load_runs(tmp_path)
    assert sorted(r.commit for r in runs) == [
        "0000000",
        "1111111",
        "aaaaaaa",
        "bbbbbbb",
        "ccccccc",
    ]
    now = results.current(runs)
    # The machine run most recently first; on one machine, the newest torch first.
    assert [r.commit for r in now] == ["bbbbbbb", "1111111", "0000000"]
    text = results.render(runs, full=True, base=tmp_path)
    for commit in ("aaaaaaa", "ddddddd", "eeeeeee"):
        assert commit not in text
    assert "ISA unit `avx512bf16`" in text and "ISA unit `avx512`" in text
    assert (
        "bbbbbbb, 2026-01-02 ([JSON](bbbbbbb-t-grid.json), [plot](bbbbbbb-t-grid-cpu.png))" in text
    )
    assert (
        "0000000, 2026-01-03 ([JSON](0000000-t-grid.json), "
        "[plot of ccccccc](ccccccc-t-grid-cpu.png))" in text
    )
    short = results.render(runs, full=False, base=tmp_path)
    assert "](ccccccc-t-grid-cpu.png)\n" in short and "](bbbbbbb-t-grid-cpu.png)\n" in short


def test_gpu_bench_file_is_one_run_of_its_card(tmp_path):
    rng = random.Random()
    card = {"cuda:0": "Test GPU (sm_90)"}
    docs = []
    for i, dtype in enumerate(("fp32", "bf16")):
        rows = [
            {**r, "device": "cuda:0"} for r in _grid(rng, dtypes=(dtype,), sizes=(512,), Bs=(1,))
        ]
        machine = {**_machine(torch_version="2.11.0"), "devices": card}
        docs.append(_doc(rows, machine, f"2026-01-01T00:00:0{i}+00:00"))
    _write(tmp_path / "fffffff-gpu-bench.json", {"schema": results.GPU_SCHEMA, "runs": docs})
    (run,) = results.current(results.load_runs(tmp_path))
    assert run.device == "cuda" and run.kind == ("cuda", "Test GPU (sm_90)", "2.11.0")
    assert run.date == "2026-01-01" and len(results.default_rows(run.rows)) == 2 * len(CASES)
    text = results.render([run], True, tmp_path)
    assert "**Test GPU (sm_90)**, torch 2.11.0; commit fffffff, 2026-01-01 (" in text
    assert "no plot stored" in text


def test_summary_counts_median_and_worst():
    rng = random.Random()
    cells = 2 * 2 * 3 * len(CASES)
    ratios = [rng.uniform(0.5, 3.0) for _ in range(cells - 1)] + [rng.uniform(0.1, 0.4)]
    rng.shuffle(ratios)
    rows = _grid(rng, ratios)
    bad = _row("fp32", 64, 4, "fwd", "-", "torchmatgrad", None)
    s = results.summarize(rows + [{**bad, "error": "out of memory"}])
    assert s.rows == cells + 1 and s.failed == 1
    assert s.kept_up == sum(x >= results.THRESHOLD for x in ratios)
    assert s.median == pytest.approx(torch.tensor(ratios, dtype=torch.float64).quantile(0.5).item())
    assert s.worst["speedup_vs_torch"] == min(ratios)
    assert s.paths == {"kernel": cells * 2 // 3, "vendor": cells // 3}

    # The table's rows per dtype are the summaries of that dtype's rows alone.
    now = datetime.datetime.now(datetime.timezone.utc)
    run = results.Run(Path("1234567-t-grid.json"), "1234567", now, _machine(), rows)
    short = results.table(run, full=False)
    for dtype in ("fp32", "bf16"):
        pairs = zip(ratios, results.default_rows(rows), strict=True)
        mine = [x for x, r in pairs if r["dtype"] == dtype]
        line = next(line for line in short if line.startswith(f"| {dtype} |"))
        kept = sum(x >= results.THRESHOLD for x in mine)
        assert f"| {kept} of {len(mine)} |" in line
        assert f"| {min(mine):.2f}× (" in line
    full = results.table(run, full=True)
    assert len(full) == 2 + 2 * 2  # head, rule, a line per dtype and size


def test_write_and_check(tmp_path, capsys):
    rng = random.Random()
    data = tmp_path / "results"
    data.mkdir()
    _write(data / "abcdef0-t-grid.json", _doc(_grid(rng), _machine(), "2026-01-01T00:00:00+00:00"))
    readme, log = tmp_path / "README.md", tmp_path / "RESULTS.md"
    for path in (readme, log):
        path.write_text(f"head\n{results.BEGIN}\nold\n{results.END}\ntail\n", encoding="utf-8")
    targets = [(readme, False), (log, True)]
    assert results.update(data, targets, write=False) == [readme, log]
    assert results.update(data, targets, write=True) == [readme, log]
    assert results.update(data, targets, write=False) == []
    runs = results.load_runs(data)
    for path, full in targets:
        text = path.read_text(encoding="utf-8")
        block = results.render(runs, full, tmp_path)
        assert text == f"head\n{results.BEGIN}\n{block}{results.END}\ntail\n"
        assert "[JSON](results/abcdef0-t-grid.json" in text
    assert "| weight |" in log.read_text(encoding="utf-8")
    # The forced-kernel rows are summarised apart, in the full form only.
    forced = sum(r["variant"] == "kernel" for r in runs[0].rows)
    assert f"forced where the default is the vendor route: {forced} rows" in log.read_text("utf-8")
    assert "forced" not in readme.read_text(encoding="utf-8")
    assert "| weight |" not in readme.read_text(encoding="utf-8")

    assert cli.main(["results", "--dir", str(data), "--short"]) == 0
    assert "abcdef0" in capsys.readouterr().out

    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="README.md: the markers"):
        results.update(data, targets, write=False)
