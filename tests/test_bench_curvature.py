"""``bench --case curvature``: the JSON it writes (a row for every quantity and library, timed or
with its reason), and the agreement check that keeps a wrong result from being reported as a
win (a deliberately scaled result is marked, exact and Monte Carlo)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import torchmatgrad
from torchmatgrad import curvature
from torchmatgrad.cli import bench
from torchmatgrad.cli.bench import curvature as curv_bench

pytest.importorskip("curvlinops")
pytest.importorskip("backpack")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

KEYS = {
    "device", "model", "B", "T", "d", "layers", "quantity", "library", "variant", "check",
    "median_ms", "min_ms", "steps_timed", "peak_mb", "time_vs_fwdbwd", "peak_vs_fwdbwd",
    "time_vs_torchmatgrad", "agrees", "rel_diff", "compared_with", "unsupported", "error",
}  # fmt: skip


def _run(tmp_path, capsys, name="c"):
    argv = ["--case", "curvature", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    assert bench.main([*argv, "--name", name]) == 0
    doc = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
    return doc, capsys.readouterr().out


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("curv")
    argv = ["--case", "curvature", "--quick", "--device", "cpu", "--out", str(out)]
    assert bench.main([*argv, "--name", "q"]) == 0
    return json.loads((out / "q.json").read_text(encoding="utf-8"))


def _rows(doc, model, quantity):
    return {r["library"] + "/" + r["variant"]: r for r in doc["rows"]
            if r["model"] == model and r["quantity"] == quantity}  # fmt: skip


def test_json_has_every_library_or_its_reason(quick):
    assert quick["schema"] == "torchmatgrad-bench-curvature/1"
    assert quick["machine"]["torch"] == torch.__version__
    rows = quick["rows"]
    assert {r["model"] for r in rows} == {"mlp", "seq"}
    for r in rows:
        assert set(r) == KEYS
        assert r["error"] is None, r
    for model in ("mlp", "seq"):
        base = _rows(quick, model, "fwd+bwd")["torch/torchmatgrad.nn.Linear"]
        assert base["time_vs_fwdbwd"] == 1.0 and base["peak_mb"] > 0
        for q in curv_bench.QUANTITIES[1:]:
            for lib in curv_bench.LIBRARIES:
                got = [r for r in rows if (r["model"], r["quantity"], r["library"]) ==
                       (model, q, lib)]  # fmt: skip
                assert got, (model, q, lib)
                for r in got:
                    timed = r["median_ms"] is not None and r["steps_timed"] > 0
                    assert timed != bool(r["unsupported"]), r
                    if timed:
                        assert r["peak_mb"] > 0 and r["time_vs_fwdbwd"] > 0
    # what each library lacks is said, not skipped
    seq_kflr = _rows(quick, "seq", "kfac-type-2")["backpack/KFLR"]
    assert "2-D layer inputs only" in seq_kflr["unsupported"]
    assert (
        "no empirical K-FAC" in _rows(quick, "mlp", "kfac-empirical")["backpack/-"]["unsupported"]
    )
    assert "no diagonal" in _rows(quick, "mlp", "diag-ggn-exact")["curvlinops/-"]["unsupported"]


def test_unperturbed_results_agree(quick):
    for r in quick["rows"]:
        if r["median_ms"] is None or r["quantity"] == "fwd+bwd":
            continue
        assert r["agrees"] is True, r
        assert r["compared_with"], r
        assert r["time_vs_torchmatgrad"] is not None
    # curvlinops draws the same targets: mc K-FAC compared exactly, BackPACK's statistically
    mc = _rows(quick, "mlp", "kfac-mc")
    assert mc["curvlinops/KFACLinearOperator"]["check"] == "same-draws"
    assert mc["curvlinops/KFACLinearOperator"]["rel_diff"] < curv_bench.TOL[torch.float32]
    assert mc["backpack/KFAC"]["check"] == "statistical"


def test_scaled_factors_are_marked(tmp_path, capsys, monkeypatch):
    real = curv_bench._ours_factors

    def scaled(kf):
        f = real(kf)
        return {k: v * 1.5 if kf.fisher_type == "type-2" else v for k, v in f.items()}

    monkeypatch.setattr(curv_bench, "_ours_factors", scaled)
    doc, out = _run(tmp_path, capsys)
    mlp = _rows(doc, "mlp", "kfac-type-2")
    # three libraries: the odd one out is marked, the two that agree are not
    assert mlp["torchmatgrad/factors"]["agrees"] is False
    assert mlp["curvlinops/KFACLinearOperator"]["agrees"] is True
    assert mlp["backpack/KFLR"]["agrees"] is True
    # no ratio to a wrong result
    assert all(r["time_vs_torchmatgrad"] is None for r in mlp.values())
    # two libraries that disagree: neither is trusted
    seq = _rows(doc, "seq", "kfac-type-2")
    assert seq["torchmatgrad/factors"]["agrees"] is False
    assert seq["curvlinops/KFACLinearOperator"]["agrees"] is False
    # BackPACK's MC K-FAC is checked against the agreed type-2 (curvlinops'), so it still agrees
    assert _rows(doc, "mlp", "kfac-mc")["backpack/KFAC"]["agrees"] is True
    assert "DIFF" in out
    assert _rows(doc, "mlp", "kfac-empirical")["torchmatgrad/factors"]["agrees"] is True


def test_scaled_mc_diagonal_is_marked(tmp_path, capsys, monkeypatch):
    real = curvature.diag_ggn

    def scaled(*args, mc_samples=None, **kw):
        d = real(*args, mc_samples=mc_samples, **kw)
        return {k: v * 10 for k, v in d.items()} if mc_samples else d

    monkeypatch.setattr(curvature, "diag_ggn", scaled)
    doc, _ = _run(tmp_path, capsys)
    for model in ("mlp", "seq"):
        rows = _rows(doc, model, "diag-ggn-mc")
        assert rows["torchmatgrad/1 sample"]["agrees"] is False
        assert rows["torchmatgrad/1 sample"]["rel_diff"] > 1
        assert rows["backpack/DiagGGNMC"]["agrees"] is True
        assert _rows(doc, model, "diag-ggn-exact")["torchmatgrad/-"]["agrees"] is True


def _row(quantity, library, check="exact"):
    return {"quantity": quantity, "library": library, "check": check, "agrees": None}


def test_agreement_rules():
    t = {"0.A": torch.randn(3, 3), "0.G": torch.randn(2, 2)}
    scaled = {k: 2 * v for k, v in t.items()}
    rows = [_row("kfac-type-2", lib) for lib in ("torchmatgrad", "curvlinops", "backpack")]
    curv_bench.agreement(rows, {0: t, 1: t, 2: scaled}, 1e-3, 0.1)
    assert [r["agrees"] for r in rows] == [True, True, False]
    assert rows[2]["rel_diff"] == pytest.approx(1.0)
    rows = rows[:2]
    curv_bench.agreement(rows, {0: t, 1: scaled}, 1e-3, 0.1)
    assert [r["agrees"] for r in rows] == [False, False]
    # a result with other keys never agrees; a lone result is unchecked, not "ok"
    rows = [_row("diag-ggn-exact", "torchmatgrad"), _row("diag-ggn-exact", "backpack")]
    curv_bench.agreement(rows, {0: t, 1: {"0.A": t["0.A"]}}, 1e-3, 0.1)
    assert rows[0]["rel_diff"] == math.inf and rows[0]["agrees"] is False
    rows = [_row("sum-grad-squared", "torchmatgrad")]
    curv_bench.agreement(rows, {0: t}, 1e-3, 0.1)
    assert rows[0]["agrees"] is None


def test_statistical_rule_uses_the_agreed_exact_result():
    G = torch.eye(4) + 0.1
    A = torch.randn(3, 3)
    rows = [
        _row("kfac-type-2", "torchmatgrad"),
        _row("kfac-type-2", "curvlinops"),
        _row("kfac-mc", "backpack", "statistical"),
        _row("kfac-mc", "other", "statistical"),
    ]
    exact = {"0.A": A, "0.G": G}
    results = {0: exact, 1: exact, 2: {"0.A": A, "0.G": 1.05 * G}, 3: {"0.A": A, "0.G": 1.5 * G}}
    curv_bench.agreement(rows, results, 1e-3, 0.1)
    assert rows[2]["agrees"] is True and rows[2]["rel_diff"] == pytest.approx(0.5)
    assert rows[3]["agrees"] is False
    # the input factor is deterministic: compared to the exact tolerance
    results[2] = {"0.A": 1.01 * A, "0.G": G}
    curv_bench.agreement(rows, results, 1e-3, 0.1)
    assert rows[2]["agrees"] is False


def test_missing_library_is_a_reason(monkeypatch):
    monkeypatch.setattr(curv_bench, "_curvlinops", lambda: None)
    monkeypatch.setattr(curv_bench, "_backpack", lambda: None)
    torch_model = curv_bench.make_model("mlp", 8, 1, "cpu", 0)
    model = torchmatgrad.nn.convert_linear(copy.deepcopy(torch_model))
    X, y = curv_bench.make_data("mlp", 4, 1, 8, "cpu", 0)
    ms = curv_bench.methods(model, torch_model, torch.nn.CrossEntropyLoss(), X, y, "mlp")
    for q in curv_bench.QUANTITIES[1:]:
        for lib in ("curvlinops", "backpack"):
            got = [m for m in ms if (m.quantity, m.library) == (q, lib)]
            assert got and all(m.unsupported for m in got), (q, lib)
    assert any("not installed" in m.unsupported for m in ms if m.library == "backpack")


def test_cpu_peak_when_two_blocks_die_at_the_end():
    # Two 4 MiB block-cache gradients still alive when the step returns die together: the last
    # sweep must count both frees (it once raised KeyError, re-entered through record_function).
    from torchmatgrad.cli.bench.memory import cpu_peak

    d = 1024
    l1, l2 = torchmatgrad.nn.Linear(d, d), torchmatgrad.nn.Linear(d, d)
    x = torch.randn(256, d)

    def step():
        torch.autograd.grad(l2(torch.relu(l1(x))).square().sum(), [l1.weight, l2.weight])

    assert cpu_peak(step) >= 2 * d * d * 4
