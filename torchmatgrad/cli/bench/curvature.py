"""``python -m torchmatgrad bench --case curvature``: torchmatgrad.curvature against curvlinops
and BackPACK on the same model, data and weights, time and peak memory per method, each also as
a ratio to a plain forward + backward of the same model in the same run.

Models (float32, CrossEntropyLoss "mean", CLASSES classes, every linear layer converted with
``convert_linear``; torchmatgrad and curvlinops share it, BackPACK gets an ``extend``-ed copy):

* ``mlp``: 784 → d → … → d → CLASSES (``--blocks`` hidden layers, ReLU), inputs [B, 784];
* ``seq``: d → … → d → CLASSES applied per position, inputs [B, T, d], one label per position
  (the output permuted to [B, C, T] for the loss, BackPACK's ``Permute``), kfac_approx
  "expand";
* ``tf``: ``--blocks`` transformer-shaped blocks (:class:`Block`: LayerNorm, qkv d → 3d, causal
  attention with HEADS heads, out d → d, residual; LayerNorm, fc d → 4d, GELU, proj 4d → d,
  residual), then d → CLASSES per position as ``seq``; inputs [B, T, d]. curvlinops' K-FAC
  runs on it; BackPACK's second-order extensions cannot (their rows say why, with BackPACK's
  error), its SumGradSquared can.

``--model`` picks among them (default: all). The floor of the K-FAC training step over the
plain step (:func:`gram_floor`, printed under each model's table): per layer (m inputs, n
outputs, R = B·T rows) the Grams xᵀx and gᵀg are R·(m² + n²) multiply-adds, half that with
symmetric products, on top of the step's 3·R·n·m (2·R·n·m for the first layer, whose input
needs no gradient) and, for tf, attention's 6·B·T²·d per block. Where m = n that is 1.33×;
the MLP's 1024-input head and 784-input first layer make it 1.50×, the tf blocks' d → 3d,
d → 4d and 4d → d layers (and its head) 1.65×: both above the issue's 1.4×. The exact
diagonal GGN takes T·C backwards per call; above EXACT_DIAG_MAX_BACKWARDS it is not run and its
rows say so.

Quantities: K-FAC factors (empirical, mc with one sample, type-2; weight and bias separate as
curvlinops and BackPACK have them; torchmatgrad's empirical also as the training step
"factors+grad", ``.grad`` filled by the same backward; BackPACK's rows always fill it), the
diagonal GGN (exact, MC) and the sum of squared per-sample gradients (the empirical Fisher's
diagonal: torchmatgrad's ``sum_grad_squared``, which forms no gradient; BackPACK's fills
``.grad``). A library without the method, or that cannot run it here, gets a row with the
reason.

Agreement: the first call's result of every method is compared before any timing is reported.
Exact quantities (and mc K-FAC of torchmatgrad and curvlinops, which draw the same targets from
the same seed) must agree with at least half of the other libraries' results, ≥ 1, to TOL
(max |a − b| / max |b| per tensor); a row that does not is marked "DIFF" and gets no ratio to
torchmatgrad. BackPACK's MC methods draw from torch's generator, torchmatgrad's MC diagonal from
its own: they are checked against the agreed exact quantity (K-FAC type-2, exact diagonal):
input factors to TOL, the trace of G and the sum of the diagonal to STAT_K/√(B·T) relative.

Timing as ``--case dp``: rounds of consecutive calls per method (the first of each turn not
timed), median; peak memory of one call (:func:`.dp._peak_bytes`: the parameters and inputs
included; on CPU the profiler's allocations plus torchmatgrad's block cache).

Memory verdict (torchmatgrad's rows, the issue's rule): a method may hold what the plain
forward + backward holds plus its result, with 10 % slack: peak ≤ MEM_SLACK × (the plain step's
peak + the bytes of the result: the factors A and G, a G shared by a weight and its bias once;
a diagonal's or sum's one number per parameter). The plain step's peak already holds the
gradients, so a method that forms none (factors alone, the diagonals) gets them as slack too.
Rows: ``result_mb``, ``peak_vs_budget`` (peak / (plain peak + result)) and ``mem_ok``; the
table's memory column says "mem ok 1.02×" or "mem 1.23× over".
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import torchmatgrad
from torchmatgrad import curvature

from .dp import _peak_bytes, _sample_turns
from .machine import _device_name, _loadavg, machine_info
from .report import now_utc, output_stem, write_json
from .timing import _error_text, _Peer

QUANTITIES = tuple(
    "fwd+bwd kfac-empirical kfac-mc kfac-type-2 diag-ggn-exact diag-ggn-mc sum-grad-squared".split()
)
LIBRARIES = ("torchmatgrad", "curvlinops", "backpack")
DISTRIBUTIONS = ("curvlinops-for-pytorch", "backpack-for-pytorch")
CLASSES = 10
MLP_IN = 784
HEADS = 12  # the tf model's attention heads
#: (B, T, d, hidden layers or blocks) by model; --quick: tiny sizes for a test.
DEFAULTS = {"mlp": (256, 1, 1024, 2), "seq": (32, 16, 256, 2), "tf": (4, 128, 768, 2)}
QUICK = {"mlp": (8, 1, 16, 1), "seq": (4, 3, 12, 1), "tf": (2, 5, 36, 1)}
MODELS = tuple(DEFAULTS)
#: The exact diagonal GGN takes T·C backwards per call (one per column of each loss term's
#: Hessian square root): above this many it is not run (the tf model's 1280 would be minutes
#: per call here), and the row says so.
EXACT_DIAG_MAX_BACKWARDS = 256
#: Peak-memory rule (module docstring): a torchmatgrad row is "mem ok" when its peak is at most
#: MEM_SLACK × (the plain step's peak + the bytes of the quantity's result).
MEM_SLACK = 1.1
#: (rounds, warm-up calls, seconds per method) by device type and preset.
TIMING = {"full": {"cpu": (10, 1, 3.0), "cuda": (10, 3, 2.0)}, "quick": {"cpu": (1, 0, 0.05)}}
TOL = {torch.float32: 1e-3, torch.float64: 1e-9}
#: An MC total (trace of G, sum of a diagonal) from one draw for each of M loss terms is off its
#: expectation by ~1/√M relative (per-term spread O(1) for CrossEntropy): allow STAT_K/√M.
STAT_K = 5.0
#: The exact quantity an MC quantity's expectation is.
EXPECTATION = {"kfac-mc": "kfac-type-2", "diag-ggn-mc": "diag-ggn-exact"}

NO_CURVLINOPS_DIAG = (
    "curvlinops has no diagonal extractor: its GGN / EF operators are matrix-free, so the "
    "diagonal costs one matvec per parameter (hutchinson_diag only estimates it)"
)
UNSUPPORTED = {
    ("kfac-empirical", "backpack"): "BackPACK has no empirical K-FAC (its KFAC is the MC "
    "Fisher, KFLR the type-2 GGN)",
    ("diag-ggn-exact", "curvlinops"): NO_CURVLINOPS_DIAG,
    ("diag-ggn-mc", "curvlinops"): NO_CURVLINOPS_DIAG,
    ("sum-grad-squared", "curvlinops"): NO_CURVLINOPS_DIAG,
}
#: BackPACK's HBP extensions (KFAC, KFLR) check ``module.input0.dim() == 2`` in every linear
#: layer; tried anyway, the error is recorded after this.
SEQ_KFAC_BACKPACK = "BackPACK's KFAC / KFLR take 2-D layer inputs only (no weight-sharing dim)"
#: BackPACK's second-order extensions pass their backpropagated quantity from module to module
#: and need a rule for each: the tf model's Block (LayerNorm, attention, residual adds inside)
#: has none, and they raise NotImplementedError (recorded after this). Its first-order
#: SumGradSquared needs only each linear layer's input and output gradient: it runs.
TF_BACKPACK = (
    "BackPACK's second-order extensions backpropagate module by module and have no rule for "
    "LayerNorm, attention or the residual adds"
)
TF_BACKPACK_SECOND_ORDER = ("kfac-mc", "kfac-type-2", "diag-ggn-exact", "diag-ggn-mc")


@dataclass
class Method:
    """One way to compute one quantity: ``step()`` is timed, ``result(step())`` compared."""

    quantity: str
    library: str
    variant: str
    step: Callable[[], Any] | None = None
    result: Callable[[Any], dict[str, torch.Tensor]] = lambda r: r
    clear: Callable[[], None] = lambda: None
    model: torch.nn.Module | None = None
    check: str | None = None  # "exact" | "same-draws" | "statistical"
    unsupported: str | None = None


# ---- models ---------------------------------------------------------------------------------


class _Permute(torch.nn.Module):
    """[B, T, C] -> [B, C, T] (CrossEntropy's class dim), for when BackPACK is absent."""

    def forward(self, x):
        return x.transpose(1, 2)


def _backpack():
    try:
        import backpack
        from backpack import extensions
        from backpack.custom_module.permute import Permute
    except ImportError:
        return None
    return backpack, extensions, Permute


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _curvlinops():
    try:
        import curvlinops
    except ImportError:
        return None
    return curvlinops


class Block(torch.nn.Module):
    """One transformer-shaped block in torch.nn.Linear layers (converted like the others):
    LayerNorm → qkv (d → 3d) → causal attention, HEADS heads (torch's
    scaled_dot_product_attention) → out (d → d), residual; LayerNorm → fc (d → 4d) → GELU →
    proj (4d → d), residual. LayerNorm without parameters, so every parameter is in a linear
    layer (what K-FAC covers)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        if d % HEADS:
            raise ValueError(f"d must be a multiple of {HEADS} (the heads), got {d}")
        self.ln1 = torch.nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d, elementwise_affine=False)
        self.fc = torch.nn.Linear(d, 4 * d)
        self.proj = torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (
            t.reshape(B, T, HEADS, d // HEADS).transpose(1, 2)
            for t in self.qkv(self.ln1(x)).chunk(3, dim=-1)
        )
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(B, T, d))
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln2(x))))


def make_model(kind: str, d: int, layers: int, device, seed: int) -> torch.nn.Module:
    """The ``kind`` model (module docstring) in torch.nn.Linear layers; ``layers``: hidden
    layers (mlp, seq) or blocks (tf)."""
    torch.manual_seed(seed)
    if kind == "tf":
        bp = _backpack()
        mods = [Block(d) for _ in range(layers)]
        mods += [torch.nn.Linear(d, CLASSES), bp[2](0, 2, 1) if bp else _Permute()]
        return torch.nn.Sequential(*mods).to(device)
    d_in = MLP_IN if kind == "mlp" else d
    mods: list[torch.nn.Module] = []
    for i in range(layers):
        mods += [torch.nn.Linear(d_in if i == 0 else d, d), torch.nn.ReLU()]
    mods.append(torch.nn.Linear(d if layers else d_in, CLASSES))
    if kind == "seq":
        bp = _backpack()
        mods.append(bp[2](0, 2, 1) if bp else _Permute())
    return torch.nn.Sequential(*mods).to(device)


def make_data(kind: str, B: int, T: int, d: int, device, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    shape = (B,) if kind == "mlp" else (B, T)
    X = torch.randn(*shape, MLP_IN if kind == "mlp" else d, generator=g)
    y = torch.randint(0, CLASSES, shape, generator=g)
    return X.to(device), y.to(device)


# ---- the methods ----------------------------------------------------------------------------


def _ours_factors(kf: curvature.KFAC) -> dict[str, torch.Tensor]:
    """K-FAC factors {"<layer>.A": A, "<layer>.G": G} (curvlinops' normalization)."""
    return {f"{b.name}.{k}": getattr(b, k) for b in kf.blocks() for k in ("A", "G")}


def _curvlinops_factors(op) -> dict[str, torch.Tensor]:
    out = {f"{n}.A": A for n, A in op._input_covariances.items()}
    out.update({f"{n}.G": G for n, G in op._gradient_covariances.items()})
    return out


def _backpack_factors(fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    """BackPACK's KFAC / KFLR savefield ([G, A] per weight) as {"<layer>.A", "<layer>.G"}."""
    out = {}
    for name, value in fields.items():
        if name.endswith(".weight"):
            layer = name[: -len(".weight")]
            out[f"{layer}.G"], out[f"{layer}.A"] = value[0], value[1]
    return out


def methods(model, torch_model, lf, X, y, kind: str) -> list[Method]:
    """Every (quantity, library) this benchmark knows, runnable or with its reason; ``model``
    converted, ``torch_model`` the same weights in torch.nn.Linear layers."""
    out: list[Method] = []

    def add(q, lib, variant, step, result=None, on=model, clear=None, check="exact"):
        clear = clear or (lambda: on.zero_grad(set_to_none=True))
        out.append(Method(q, lib, variant, step, result or (lambda r: r), clear, on, check))

    for m, variant in ((model, "torchmatgrad.nn.Linear"), (torch_model, "torch.nn.Linear")):
        add("fwd+bwd", "torch", variant, lambda m=m: lf(m(X), y).backward(), on=m, check=None)

    def ours_kfac(ft, with_grad=False):
        def step():
            kf = curvature.KFAC(model, lf, fisher_type=ft, separate_weight_and_bias=True)
            kf.step(X, y, accumulate_grad=with_grad)
            return kf

        return step

    factors = lambda r: _ours_factors(r)  # noqa: E731  (looked up at call time: tests patch it)
    cl = _curvlinops()
    for ft in ("empirical", "mc", "type-2"):
        q, check = f"kfac-{ft}", "same-draws" if ft == "mc" else "exact"
        add(q, "torchmatgrad", "factors", ours_kfac(ft), factors, check=check)
        if ft == "empirical":
            add(q, "torchmatgrad", "factors+grad", ours_kfac(ft, True), factors)
        if cl is None:
            out.append(Method(q, "curvlinops", "-", unsupported="curvlinops is not installed"))
            continue

        def cl_step(ft=ft):
            op = cl.KFACLinearOperator(
                model, lf, list(model.parameters()), [(X, y)], check_deterministic=False,
                fisher_type=ft, kfac_approx="expand", num_data=X.shape[0],
                num_per_example_loss_terms=y[0].numel(), separate_weight_and_bias=True,
            )  # fmt: skip
            op.compute_kronecker_factors()
            return op

        add(q, "curvlinops", "KFACLinearOperator", cl_step, _curvlinops_factors, check=check)
    backwards = y[0].numel() * CLASSES  # the exact diagonal's, per call
    skip_exact = (
        f"not run: the exact diagonal takes T·C = {backwards} backwards per call (more than "
        f"EXACT_DIAG_MAX_BACKWARDS = {EXACT_DIAG_MAX_BACKWARDS})"
        if backwards > EXACT_DIAG_MAX_BACKWARDS
        else None
    )
    if skip_exact:
        out.append(Method("diag-ggn-exact", "torchmatgrad", "-", unsupported=skip_exact))
    else:
        add("diag-ggn-exact", "torchmatgrad", "-", lambda: curvature.diag_ggn(model, lf, X, y))
    mc_diag = lambda: curvature.diag_ggn(model, lf, X, y, mc_samples=1)  # noqa: E731
    add("diag-ggn-mc", "torchmatgrad", "1 sample", mc_diag, check="statistical")
    sgs = lambda: curvature.sum_grad_squared(model, lf, X, y)  # noqa: E731
    add("sum-grad-squared", "torchmatgrad", "-", sgs)

    bp = _backpack()
    if bp is None:
        for q in QUANTITIES[1:]:
            out.append(
                Method(q, "backpack", "-", unsupported="backpack-for-pytorch is not installed")
            )
    else:
        backpack, E, _ = bp
        bp_model = backpack.extend(copy.deepcopy(model))
        bp_lf = backpack.extend(copy.deepcopy(lf))
        for q, ext, check in (
            ("kfac-mc", E.KFAC, "statistical"),
            ("kfac-type-2", E.KFLR, "exact"),
            ("diag-ggn-exact", E.DiagGGNExact, "exact"),
            ("diag-ggn-mc", E.DiagGGNMC, "statistical"),
            ("sum-grad-squared", E.SumGradSquared, "exact"),
        ):
            if skip_exact and q == "diag-ggn-exact":
                out.append(Method(q, "backpack", ext.__name__, unsupported=skip_exact))
                continue
            field = ext().savefield

            def step(ext=ext, field=field):
                torch.manual_seed(0)  # BackPACK's MC extensions draw from torch's generator
                with backpack.backpack(ext()):
                    bp_lf(bp_model(X), y).backward()
                return {n: getattr(p, field) for n, p in bp_model.named_parameters()}

            def clear(field=field):
                for p in bp_model.parameters():
                    p.grad = None
                    if hasattr(p, field):
                        delattr(p, field)

            result = _backpack_factors if q.startswith("kfac") else None
            add(q, "backpack", ext.__name__, step, result, bp_model, clear, check)
    for (q, lib), why in UNSUPPORTED.items():
        if lib != "backpack" or bp is not None:
            out.append(Method(q, lib, "-", unsupported=why))
    rank = {k: i for i, k in enumerate((*QUANTITIES, "torch", *LIBRARIES))}
    return sorted(out, key=lambda m: (rank[m.quantity], rank[m.library]))


# ---- agreement ------------------------------------------------------------------------------


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max |a − b| / max |b|; inf when the keys or shapes differ."""
    if a.keys() != b.keys() or any(a[k].shape != v.shape for k, v in b.items()):
        return math.inf
    b = {k: v.double() for k, v in b.items()}
    diffs = [
        (a[k].double() - v).abs().max() / v.abs().max().clamp_min(1e-300) for k, v in b.items()
    ]
    return max((d.item() for d in diffs), default=0.0)


def stat_diff(mc: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], tol, stat_tol):
    """An MC result against the exact quantity it estimates, in units of its tolerance (≤ 1:
    agrees): input factors (".A", deterministic) to ``tol``; the trace of a G, or a diagonal's
    sum, to ``stat_tol`` relative."""
    if mc.keys() != exact.keys():
        return math.inf
    worst = 0.0
    for k, ref in exact.items():
        if k.endswith(".A"):
            worst = max(worst, rel_diff({k: mc[k]}, {k: ref}) / tol)
            continue
        total = (lambda t: t.diagonal().sum()) if k.endswith(".G") else (lambda t: t.sum())
        r = total(ref.double()).item()
        worst = max(worst, abs(total(mc[k].double()).item() - r) / (abs(r) or 1.0) / stat_tol)
    return worst


def agreement(rows: list[dict[str, Any]], results: dict[int, dict], tol, stat_tol) -> None:
    """Set each row's ``agrees`` / ``rel_diff`` / ``compared_with`` (module docstring)."""
    by_q: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if i in results and r["quantity"] != "fwd+bwd":
            by_q.setdefault(r["quantity"], []).append(i)
    for q in QUANTITIES:
        exact = [i for i in by_q.get(q, []) if rows[i]["check"] in ("exact", "same-draws")]
        for i in exact:
            others = [j for j in exact if j != i]
            diffs = [rel_diff(results[i], results[j]) for j in others]
            ok = sum(d <= tol for d in diffs)
            rows[i]["compared_with"] = [rows[j]["library"] for j in others]
            rows[i]["rel_diff"] = max(diffs) if diffs else None
            rows[i]["agrees"] = None if not others else ok >= 1 and 2 * ok >= len(others)
    for q in QUANTITIES:
        stat = [i for i in by_q.get(q, []) if rows[i]["check"] == "statistical"]
        refs = [i for i in by_q.get(EXPECTATION.get(q, ""), []) if rows[i]["agrees"]]
        for i in stat:
            if not refs:
                continue
            d = stat_diff(results[i], results[refs[0]], tol, stat_tol)
            ref = f"{rows[refs[0]]['library']} {EXPECTATION[q]}"
            rows[i].update(compared_with=[ref], rel_diff=d, agrees=d <= 1.0)


def layer_shapes(kind: str, d: int, layers: int) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer of ``make_model(kind, d, layers)``."""
    if kind == "tf":
        block = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
        return block * layers + [(d, CLASSES)]
    d_in = MLP_IN if kind == "mlp" else d
    return [(d_in if i == 0 else d, d) for i in range(layers)] + [(d if layers else d_in, CLASSES)]


def gram_floor(kind: str, B: int, T: int, d: int, layers: int) -> tuple[float, float]:
    """The K-FAC step's floor over the plain step in multiply-adds (module docstring): (with
    symmetric Grams, with full Grams)."""
    shapes = layer_shapes(kind, d, layers)
    R = B * T
    step = 3 * R * sum(n * m for m, n in shapes) - R * shapes[0][0] * shapes[0][1]
    if kind == "tf":
        step += 6 * B * T * T * d * layers
    grams = R * sum(m * m + n * n for m, n in shapes)
    return 1 + grams / 2 / step, 1 + grams / step


def linear_layers(kind: str, layers: int) -> int:
    """The model's linear layers: hidden layers + the head, or 4 per block + the head (tf)."""
    return 4 * layers + 1 if kind == "tf" else layers + 1


def run_point(kind, B, T, d, layers, device, rounds, warmup, max_time, seed):
    torch_model = make_model(kind, d, layers, device, seed)
    model = torchmatgrad.nn.convert_linear(copy.deepcopy(torch_model))
    X, y = make_data(kind, B, T, d, device, seed)
    lf = torch.nn.CrossEntropyLoss()
    ms = methods(model, torch_model, lf, X, y, kind)
    rows, results, peers = [], {}, {}
    for i, m in enumerate(ms):
        rows.append({
            "device": str(device), "model": kind, "B": B, "T": T, "d": d,
            "layers": linear_layers(kind, layers),
            "quantity": m.quantity, "library": m.library, "variant": m.variant,
            "check": m.check, "median_ms": None, "min_ms": None, "steps_timed": 0, "peak_mb": None,
            "time_vs_fwdbwd": None, "peak_vs_fwdbwd": None, "time_vs_torchmatgrad": None,
            "result_mb": None, "peak_vs_budget": None, "mem_ok": None,
            "agrees": None, "rel_diff": None, "compared_with": [],
            "unsupported": m.unsupported, "error": None,
        })  # fmt: skip
        if m.unsupported:
            continue
        try:
            m.clear()
            r = m.step()
            if m.quantity != "fwd+bwd":
                res = m.result(r)
                rows[i]["result_mb"] = result_bytes(res) / 2**20
                results[i] = {k: v.detach().clone() for k, v in res.items()}
                del res
            del r
            for _ in range(warmup):
                m.clear()
                m.step()
        except Exception as e:  # a library that cannot run this model: say why
            why = None
            if m.library == "backpack" and kind == "seq" and m.quantity.startswith("kfac"):
                why = SEQ_KFAC_BACKPACK
            if m.library == "backpack" and kind == "tf" and m.quantity in TF_BACKPACK_SECOND_ORDER:
                why = TF_BACKPACK
            rows[i]["unsupported" if why else "error"] = (
                f"{why}: {_error_text(e)}" if why else _error_text(e)
            )
            continue
        peers[i] = _Peer(str(i), "-", "-", lambda k, c=m.clear: c(), lambda k, s=m.step: s())
    agreement(rows, results, TOL[X.dtype], STAT_K / math.sqrt(y.numel()))
    _sample_turns(list(peers.values()), device, rounds, max_time)
    for i, p in peers.items():
        m, row = ms[i], rows[i]
        if p.error or not p.samples:
            row["error"] = p.error or row["error"]
            continue
        row["steps_timed"] = len(p.samples)
        row["median_ms"] = 1e3 * sorted(p.samples)[len(p.samples) // 2]
        row["min_ms"] = 1e3 * min(p.samples)  # the shared 2-core VM: load comes in bursts
        try:
            peak = _peak_bytes(device, m.clear, m.step, m.model, X, y)
            row["peak_mb"] = None if peak is None else peak / 2**20
        except Exception as e:  # e.g. out of memory
            row["error"] = _error_text(e)
        m.clear()
    _ratios(rows)
    return rows


def result_bytes(result: dict[str, torch.Tensor]) -> int:
    """Bytes of a quantity's result, a tensor that appears under two names (a G shared by a
    layer's weight and bias) counted once."""
    seen = {(t.data_ptr(), t.numel(), t.dtype): t for t in result.values()}
    return sum(t.numel() * t.element_size() for t in seen.values())


def memory_verdict(
    peak: float, plain_peak: float, result: float, slack: float = MEM_SLACK
) -> tuple[float, bool]:
    """(peak / (plain_peak + result), whether peak ≤ slack · (plain_peak + result)): the
    peak-memory rule of the module docstring, any one unit for all three."""
    if not plain_peak > 0 or result < 0 or peak < 0:
        raise ValueError(
            f"need plain_peak > 0 and peak, result >= 0, got {peak=}, {plain_peak=}, {result=}"
        )
    budget = plain_peak + result
    return peak / budget, peak <= slack * budget


def _ratios(rows: list[dict[str, Any]]) -> None:
    base = rows[0]  # fwd+bwd of the converted model (methods() puts it first)
    ours = {r["quantity"]: r for r in reversed(rows) if r["library"] == "torchmatgrad"}
    for r in rows:
        if r["median_ms"] is None:
            continue
        if base["median_ms"]:
            r["time_vs_fwdbwd"] = r["median_ms"] / base["median_ms"]
        if base["peak_mb"] and r["peak_mb"]:
            r["peak_vs_fwdbwd"] = r["peak_mb"] / base["peak_mb"]
            if r["library"] == "torchmatgrad" and r["result_mb"] is not None:
                ratio, ok = memory_verdict(r["peak_mb"], base["peak_mb"], r["result_mb"])
                r["peak_vs_budget"], r["mem_ok"] = ratio, ok
        o = ours.get(r["quantity"])
        if o and o["median_ms"] and r["agrees"] and o["agrees"] is not False:
            r["time_vs_torchmatgrad"] = r["median_ms"] / o["median_ms"]


def mem_text(row: dict[str, Any]) -> str:
    """The memory column: "mem ok 1.02×" or "mem 1.23× over" (peak over the plain step's
    peak + the result's bytes; over: above MEM_SLACK), "-" where there is no verdict."""
    if row.get("mem_ok") is None:
        return "-"
    ratio = row["peak_vs_budget"]
    return f"mem ok {ratio:.2f}×" if row["mem_ok"] else f"mem {ratio:.2f}× over"


def format_rows(rows: list[dict[str, Any]]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [
        f"{'model':5} {'B':>4} {'T':>3} {'d':>5}  {'quantity':16} {'library':12} {'variant':22} "
        f"{'ms':>9} {'min ms':>9} {'×fwdbwd':>7} {'peak MB':>8} {'×peak':>6} {'×ours':>6}  "
        f"{'memory':14} check"
    ]
    for r in rows:
        head = (
            f"{r['model']:5} {r['B']:>4} {r['T']:>3} {r['d']:>5}  {r['quantity']:16} "
            f"{r['library']:12} {r['variant'][:22]:22} "
        )
        if r["unsupported"]:
            lines.append(head + f"unsupported: {r['unsupported']}"[:150])
            continue
        verdict = {True: "ok", False: "DIFF", None: "-"}[r["agrees"]]
        if r["rel_diff"] is not None:
            verdict += f" {r['rel_diff']:.1e}" + (" (×tol)" if r["check"] == "statistical" else "")
        lines.append(
            head + f"{f(r['median_ms'], '9.2f')} {f(r['min_ms'], '9.2f')} "
            f"{f(r['time_vs_fwdbwd'], '7.2f')} "
            f"{f(r['peak_mb'], '8.1f')} {f(r['peak_vs_fwdbwd'], '6.2f')} "
            f"{f(r['time_vs_torchmatgrad'], '6.2f')}  {mem_text(r):14} {verdict}"
            + (f"  ERROR {r['error']}" if r["error"] else "")
        )
    return "\n".join(lines)


#: The issue's target for the K-FAC training step (gradient + empirical factors).
STEP_TARGET = 1.4


def summary(rows: list[dict[str, Any]], kind: str, B: int, T: int, d: int, layers: int) -> str:
    """One point's K-FAC line: the step and the factors alone over the plain step, against
    STEP_TARGET and :func:`gram_floor`, and the memory verdicts of torchmatgrad's rows."""
    sym, full = gram_floor(kind, B, T, d, layers)
    base = rows[0]
    ours = {r["variant"]: r for r in rows
            if r["quantity"] == "kfac-empirical" and r["library"] == "torchmatgrad"}  # fmt: skip

    def ratio(variant):
        r = ours.get(variant, {})
        if r.get("time_vs_fwdbwd") is None:
            return "-"
        text = f"{r['time_vs_fwdbwd']:.2f}×"
        if r.get("min_ms") and base.get("min_ms"):
            text += f" (fastest calls: {r['min_ms'] / base['min_ms']:.2f}×)"
        return text

    step = ours.get("factors+grad", {}).get("time_vs_fwdbwd")
    met = "-" if step is None else ("met" if step <= STEP_TARGET else "missed")
    if step is not None and step < sym:
        met += ", below the floor: the medians are noise"
    mem = [r for r in rows if r["mem_ok"] is not None]
    over = [f"{r['quantity']}/{r['variant']}" for r in mem if not r["mem_ok"]]
    return (
        f"{kind}: K-FAC step (gradient + empirical factors) {ratio('factors+grad')} a plain "
        f"forward + backward (target ≤ {STEP_TARGET}×: {met}), factors alone "
        f"{ratio('factors')}; floor in multiply-adds {sym:.2f}× with symmetric Grams, "
        f"{full:.2f}× with full ones; memory: {len(mem) - len(over)} of {len(mem)} rows within "
        f"{MEM_SLACK}× (plain peak + result)" + (f", over: {', '.join(over)}" if over else "")
    )


def main(args) -> int:
    """Run the curvature benchmark for ``args`` (the bench command's options: --device, --B,
    --T, --d, --blocks, --model, --reps, --warmup, --max-time, --quick, --out, --name,
    --seed)."""
    device = torch.device((args.device or ["cpu"])[0])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA requested but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    preset = "quick" if args.quick else "full"
    rounds, warmup, max_time = TIMING[preset].get(device.type, TIMING["full"][device.type])
    rounds = args.reps or rounds
    warmup = args.warmup if args.warmup is not None else warmup
    max_time = args.max_time if args.max_time is not None else max_time
    sizes = QUICK if args.quick else DEFAULTS
    t0 = time.perf_counter()
    meta = machine_info([device])
    print(
        f"{device}: {_device_name(device)}; {torch.get_num_threads()} threads; load average "
        f"{_loadavg()}; curvlinops {'present' if _curvlinops() else 'absent'}, BackPACK "
        f"{'present' if _backpack() else 'absent'}"
    )
    rows: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    points = [
        (kind, B, T, args.d or d0, args.blocks or layers0)
        for kind, (B0, T0, d0, layers0) in sizes.items()
        if kind in (args.model or MODELS)
        for B in args.B or [B0]
        for T in ((args.T or [T0]) if kind != "mlp" else [1])
    ]
    for kind, B, T, d, layers in points:
        with warnings.catch_warnings():  # BackPACK's hooks on the first layer; torch.jit's
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", category=FutureWarning)
            # BackPACK's SumGradSquared on tf: Block has parameters only in its linear layers
            warnings.filterwarnings("ignore", message="Extension saving to .* for Module")
            pt = run_point(kind, B, T, d, layers, device, rounds, warmup, max_time, args.seed)
        print(format_rows(pt))
        print(summary(pt, kind, B, T, d, layers), flush=True)
        sym, full = gram_floor(kind, B, T, d, layers)
        floors.append({"model": kind, "B": B, "T": T, "d": d, "symmetric": sym, "full": full})
        rows += pt
    elapsed = time.perf_counter() - t0
    meta["loadavg_end"] = _loadavg()
    out, stem = output_stem(args.out, args.name, "curvature")
    doc = {
        "schema": "torchmatgrad-bench-curvature/1",
        "created": now_utc(),
        "elapsed_s": round(elapsed, 2),
        "settings": {
            "preset": preset,
            "dtype": "float32",
            "loss": "CrossEntropyLoss(reduction='mean')",
            "classes": CLASSES,
            "mlp_in_features": MLP_IN,
            "tf_heads": HEADS,
            "mem_slack": MEM_SLACK,
            "timing": {"rounds": rounds, "warmup": warmup, "max_time_s": max_time},
            "tol": TOL[torch.float32],
            "stat_tol": "STAT_K / sqrt(B·T)",
            "stat_k": STAT_K,
            "path": torchmatgrad.policy.current_path(),
            "libraries": {d: _version(d) for d in DISTRIBUTIONS},
        },
        "notes": "median of single calls in rounds per method; peak: bytes held during one "
        "call, parameters and inputs included; time_vs_fwdbwd / peak_vs_fwdbwd: over the "
        "converted model's plain forward + backward; time_vs_torchmatgrad: over torchmatgrad's "
        "row of the quantity, only where both agree; agrees: see the module docstring",
        "machine": meta,
        "kfac_step_target": STEP_TARGET,
        "gram_floors": floors,
        "rows": rows,
    }
    path = write_json(doc, out / f"{stem}.json")
    print(f"{len(rows)} rows in {elapsed:.1f} s; wrote {path}")
    return 0
