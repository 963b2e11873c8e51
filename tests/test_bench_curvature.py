"""``bench --case curvature``: the JSON it writes (a row for every quantity and library, timed or
with its reason), and the agreement check that keeps a wrong result from being reported as a
win (a deliberately scaled result is marked, exact and Monte Carlo)."""

from __future__ import annotations

import contextlib
import copy
import io
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
    "time_vs_torchmatgrad", "result_mb", "peak_vs_budget", "mem_ok", "agrees", "rel_diff",
    "compared_with", "unsupported", "error",
}  # fmt: skip


def _run(tmp_path, capsys, name="c"):
    argv = ["--case", "curvature", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    assert bench.main([*argv, "--name", name]) == 0
    doc = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
    return doc, capsys.readouterr().out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curv")
    argv = ["--case", "curvature", "--quick", "--device", "cpu", "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main([*argv, "--name", "q"]) == 0
    return json.loads((out / "q.json").read_text(encoding="utf-8")), printed.getvalue()


@pytest.fixture(scope="module")
def quick(quick_run):
    return quick_run[0]


def _rows(doc, model, quantity):
    return {r["library"] + "/" + r["variant"]: r for r in doc["rows"]
            if r["model"] == model and r["quantity"] == quantity}  # fmt: skip


def test_json_has_every_library_or_its_reason(quick):
    assert quick["schema"] == "torchmatgrad-bench-curvature/1"
    assert quick["machine"]["torch"] == torch.__version__
    rows = quick["rows"]
    assert {r["model"] for r in rows} == {"mlp", "seq", "tf"}
    for r in rows:
        assert set(r) == KEYS
        assert r["error"] is None, r
    for model in ("mlp", "seq", "tf"):
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
    # on tf only torchmatgrad has the diagonals (curvlinops has none, BackPACK cannot run it):
    # unchecked, and said so, not "ok"
    lone = {("tf", "diag-ggn-exact"), ("tf", "diag-ggn-mc")}
    for r in quick["rows"]:
        if r["median_ms"] is None or r["quantity"] == "fwd+bwd":
            continue
        if (r["model"], r["quantity"]) in lone:
            assert r["agrees"] is None and not r["compared_with"], r
            assert r["time_vs_torchmatgrad"] is None
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


# ---- the transformer-shaped model -----------------------------------------------------------


def test_tf_model_runs_and_agrees_with_curvlinops(quick):
    rows = [r for r in quick["rows"] if r["model"] == "tf"]
    B, T, d, blocks = curv_bench.QUICK["tf"]
    assert {(r["B"], r["T"], r["d"], r["layers"]) for r in rows} == {(B, T, d, 4 * blocks + 1)}
    for q in ("kfac-empirical", "kfac-mc", "kfac-type-2"):
        got = _rows(quick, "tf", q)
        cl = got["curvlinops/KFACLinearOperator"]
        assert cl["median_ms"] is not None and cl["agrees"] is True, cl
        assert cl["rel_diff"] < curv_bench.TOL[torch.float32]
        assert cl["compared_with"] == ["torchmatgrad"] * (2 if q == "kfac-empirical" else 1)
        assert cl["time_vs_torchmatgrad"] > 0
        for r in got.values():
            if r["library"] == "torchmatgrad":
                assert r["agrees"] is True and r["median_ms"] > 0, r


def test_tf_backpack_rows_say_why(quick):
    for q in curv_bench.TF_BACKPACK_SECOND_ORDER:
        (bp,) = [r for r in quick["rows"] if (r["model"], r["quantity"], r["library"]) ==
                 ("tf", q, "backpack")]  # fmt: skip
        assert bp["unsupported"].startswith(curv_bench.TF_BACKPACK), bp
        assert "Error: " in bp["unsupported"] and bp["median_ms"] is None  # BackPACK's own
        assert bp["error"] is None
    emp = _rows(quick, "tf", "kfac-empirical")["backpack/-"]
    assert "no empirical K-FAC" in emp["unsupported"]
    # its first-order SumGradSquared runs and agrees with ours
    sgs = _rows(quick, "tf", "sum-grad-squared")
    assert sgs["backpack/SumGradSquared"]["agrees"] is True
    assert sgs["torchmatgrad/-"]["agrees"] is True


def test_tf_block_is_attention_with_heads():
    # The block's attention mixes positions causally: position 0's output does not depend on
    # later positions, the last one's does.
    torch.manual_seed(0)
    block = curv_bench.Block(24).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    y = block(x)
    (g0,) = torch.autograd.grad(y[:, 0].sum(), x, retain_graph=True)
    (g4,) = torch.autograd.grad(y[:, 4].sum(), x)
    assert g0[:, 1:].abs().max() == 0 and g4[:, :4].abs().max() > 0
    # 12 heads of 2: the same with one head would differ
    q, k, v = block.qkv(block.ln1(x)).detach().chunk(3, -1)
    one = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = x + block.out(one)
    ref = ref + block.proj(torch.nn.functional.gelu(block.fc(block.ln2(ref))))
    assert (ref - y).abs().max() > 1e-6
    with pytest.raises(ValueError, match="multiple of 12"):
        curv_bench.Block(20)


def test_exact_diagonal_is_skipped_above_its_backwards():
    torch_model = curv_bench.make_model("tf", 12, 1, "cpu", 0)
    model = torchmatgrad.nn.convert_linear(copy.deepcopy(torch_model))
    T = curv_bench.EXACT_DIAG_MAX_BACKWARDS // curv_bench.CLASSES + 1
    X, y = curv_bench.make_data("tf", 1, T, 12, "cpu", 0)
    ms = curv_bench.methods(model, torch_model, torch.nn.CrossEntropyLoss(), X, y, "tf")
    exact = [m for m in ms if m.quantity == "diag-ggn-exact"]
    assert {m.library for m in exact} == set(curv_bench.LIBRARIES)
    assert all(m.unsupported and m.step is None for m in exact)
    assert any(f"{T * curv_bench.CLASSES} backwards" in m.unsupported for m in exact)


# ---- the peak-memory verdict and the K-FAC floor ----------------------------------------------


def test_memory_verdict_rule():
    assert curv_bench.memory_verdict(110.0, 100.0, 0.0) == (pytest.approx(1.1), True)
    ratio, ok = curv_bench.memory_verdict(110.1, 100.0, 0.0)
    assert ratio == pytest.approx(1.101) and not ok
    # the result's bytes are added to the plain peak before the slack
    assert curv_bench.memory_verdict(130.0, 100.0, 20.0)[1]
    assert not curv_bench.memory_verdict(133.0, 100.0, 20.0)[1]
    assert curv_bench.memory_verdict(133.0, 100.0, 20.0, slack=1.2)[1]
    with pytest.raises(ValueError, match="plain_peak"):
        curv_bench.memory_verdict(1.0, 0.0, 0.0)


def test_memory_verdict_is_from_the_measured_numbers(quick_run):
    doc, out = quick_run
    assert doc["settings"]["mem_slack"] == curv_bench.MEM_SLACK
    judged = 0
    for model in curv_bench.MODELS:
        rows = [r for r in doc["rows"] if r["model"] == model]
        base = rows[0]
        assert base["quantity"] == "fwd+bwd" and base["variant"] == "torchmatgrad.nn.Linear"
        for r in rows:
            if r["library"] != "torchmatgrad" or r["median_ms"] is None:
                assert r["mem_ok"] is None and r["peak_vs_budget"] is None, r
                continue
            budget = base["peak_mb"] + r["result_mb"]
            assert r["result_mb"] > 0
            assert r["peak_vs_budget"] == pytest.approx(r["peak_mb"] / budget)
            assert r["mem_ok"] == (r["peak_mb"] <= curv_bench.MEM_SLACK * budget)
            assert curv_bench.mem_text(r) in out
            judged += 1
    assert judged >= 3 * 5
    assert out.count("K-FAC step (gradient + empirical factors)") == len(curv_bench.MODELS)


def test_result_bytes_counts_a_shared_tensor_once():
    G, A = torch.randn(3, 3), torch.randn(5, 5)
    assert curv_bench.result_bytes({"w.A": A, "w.G": G, "b.G": G}) == (9 + 25) * 4
    assert curv_bench.result_bytes({"w.G": G, "b.G": G.clone()}) == 2 * 9 * 4


def test_gram_floor_counts_multiply_adds():
    # mlp 784-1024-1024-10: the Grams over the step's GEMMs (no grad_input for the first layer)
    shapes = [(784, 1024), (1024, 1024), (1024, 10)]
    step = 3 * sum(m * n for m, n in shapes) - 784 * 1024
    grams = sum(m * m + n * n for m, n in shapes)
    sym, full = curv_bench.gram_floor("mlp", 256, 1, 1024, 2)
    assert sym == pytest.approx(1 + grams / 2 / step) and full == pytest.approx(1 + grams / step)
    assert curv_bench.layer_shapes("mlp", 1024, 2) == shapes
    # tf: 4 layers a block and the head; attention adds 6·B·T²·d a block to the step
    d, B, T = 24, 2, 7
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * 2 + [(d, 10)]
    assert curv_bench.layer_shapes("tf", d, 2) == shapes
    R = B * T
    step = 3 * R * sum(m * n for m, n in shapes) - R * d * 3 * d + 2 * 6 * B * T * T * d
    grams = R * sum(m * m + n * n for m, n in shapes)
    assert curv_bench.gram_floor("tf", B, T, d, 2)[0] == pytest.approx(1 + grams / 2 / step)


def test_summary_line_states_target_floor_and_memory():
    def row(variant, ms, fastest, ratio, mem_ok, q="kfac-empirical", lib="torchmatgrad"):
        return {"quantity": q, "library": lib, "variant": variant, "median_ms": ms,
                "min_ms": fastest, "time_vs_fwdbwd": ratio, "mem_ok": mem_ok}  # fmt: skip

    rows = [
        row("torchmatgrad.nn.Linear", 100.0, 50.0, 1.0, None, "fwd+bwd", "torch"),
        row("factors+grad", 130.0, 95.0, 1.3, True),
        row("factors", 160.0, 80.0, 1.6, False),
    ]
    text = curv_bench.summary(rows, "mlp", 256, 1, 1024, 2)
    assert "step (gradient + empirical factors) 1.30× (fastest calls: 1.90×)" in text
    assert "target ≤ 1.4×: met, below the floor" in text  # 1.3 < the floor 1.50
    assert "factors alone 1.60× (fastest calls: 1.60×)" in text
    assert "floor in multiply-adds 1.50× with symmetric Grams, 2.01× with full ones" in text
    assert "1 of 2 rows within 1.1×" in text and "over: kfac-empirical/factors" in text
    rows[1]["time_vs_fwdbwd"] = 1.55
    assert "target ≤ 1.4×: missed), factors" in curv_bench.summary(rows, "mlp", 256, 1, 1024, 2)
