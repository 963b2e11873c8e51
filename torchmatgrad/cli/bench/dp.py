"""``python -m torchmatgrad bench --case dp``: the cost of a DP-SGD step, in one run.

A GPT-2-small-shaped stack of torchmatgrad linear layers (width d = 768, MLP 4d, causal
single-head attention between qkv and its projection, LayerNorm without parameters, so every
trainable parameter is in a linear layer) takes one training step on a batch of B samples of T
tokens, regressing a random target (loss_i: mean squared error of sample i). Four ways, same
inputs, same weights, each on its own copy of the model:

* ``non-private``: ``loss.sum().backward()`` (``.grad`` None before): the baseline;
* ``torchmatgrad``: ``per_sample.clipped_backward(model, loss, C, noise_multiplier=1)``: one
  backward, per-sample norms and the clipped weight gradients by torchmatgrad's kernels;
* ``opacus-hooks``: Opacus's GradSampleModule (per-sample gradients B×n×m per layer, here by
  torchmatgrad's registered grad sampler) and DPOptimizer's clipping and noise;
* ``opacus-ghost``: Opacus's ghost clipping (norms from its norm sampler, here torchmatgrad's;
  two backward passes) and its optimizer's noise.

The optimizer's update itself is left out of every variant (it is the same for all). Time: the
median of single steps, taken in rounds: each round runs every variant for STEPS_PER_TURN
consecutive steps and times all but the first (a variant's step right after another variant's
finds the allocator's memory returned to the system: on the 2-core VM, interleaving step by step
with Opacus's B·n·m-sized buffers made every variant 4-5 times slower than in a training loop).
Memory: the peak of the bytes held during one step (the parameters, inputs and targets included;
on CUDA ``max_memory_allocated`` less what the device held before the step; on CPU the profiler's
allocation events plus the blocks torchmatgrad's CPU block cache hands out, which bypass torch's
allocator and so its profiler: :func:`.memory.cpu_peak`). A check step with noise 0 compares the
three DP gradients (they must agree to rounding). Opacus variants are skipped when Opacus is not
installed; a variant that fails (Opacus's hooks mode on GPT-2) is reported with its error.
"""

from __future__ import annotations

import copy
import itertools
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

import torchmatgrad
from torchmatgrad import per_sample

from .machine import _device_name, _loadavg, machine_info
from .memory import cpu_peak
from .norm_routes import format_norm_routes, norm_routes
from .report import now_utc, output_stem, write_json
from .timing import _error_text, _Peer, _sync, _warm

VARIANTS = ("non-private", "torchmatgrad", "opacus-hooks", "opacus-ghost")
#: Defaults by device type: (blocks, B, T values, rounds, seconds per variant). CPU: 2 blocks
#: keep the run near two minutes on a 2-core machine (every block is alike, so the ratios do
#: not depend on the depth); CUDA: GPT-2 small's 12.
DEFAULTS = {"cpu": (2, 4, (16, 64), 5, 10.0), "cuda": (12, 32, (128, 512, 1024), 8, 5.0)}
MAX_NORM = 1.0
NOISE = 1.0
STEPS_PER_TURN = 3  # consecutive steps of one variant per round; the first is not timed


class Block(torch.nn.Module):
    """One GPT-2-shaped block of torchmatgrad linear layers: qkv (d → 3d), causal attention,
    out (d → d), fc (d → 4d), GELU, proj (4d → d); pre-norm residuals."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = torchmatgrad.nn.Linear(d, 3 * d)
        self.out = torchmatgrad.nn.Linear(d, d)
        self.fc = torchmatgrad.nn.Linear(d, 4 * d)
        self.proj = torchmatgrad.nn.Linear(4 * d, d)
        self.ln1 = torch.nn.LayerNorm(d, elementwise_affine=False)
        self.ln2 = torch.nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att)
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


def make_model(blocks: int, d: int, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[Block(d) for _ in range(blocks)]).to(device)


class PerSampleMSE(torch.nn.Module):
    """Mean squared error per sample; ``reduction`` as Opacus's criteria have it."""

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = (out - target).square().reshape(out.shape[0], -1).mean(1)
        return loss if self.reduction == "none" else loss.sum()


def _opacus():
    try:
        import opacus  # noqa: F401
    except ImportError:
        return None
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    return {
        "GradSampleModule": GradSampleModule,
        "Ghost": GradSampleModuleFastGradientClipping,
        "DPOptimizer": DPOptimizer,
        "GhostOptimizer": DPOptimizerFastGradientClipping,
        "GhostLoss": DPLossFastGradientClipping,
    }


def _steps(
    base: torch.nn.Module,
    x,
    y,
    noise: float,
    generator_seed: int,
    criterion=PerSampleMSE,
    prepare=lambda m: m,
) -> dict[str, Any]:
    """One step function per variant (each on its own copy of ``base``) and how to clear it:
    {variant: (zero_grad, step, parameters)}. ``criterion(reduction)``: the loss module;
    ``prepare``: what the non-private and torchmatgrad variants do to their copy (e.g.
    convert_linear); Opacus gets ``base`` as it is."""
    PerSampleMSE = criterion  # noqa: N806  (the loss of this run)
    B = x.shape[0]
    out: dict[str, Any] = {}
    device = x.device

    model = prepare(copy.deepcopy(base))

    def plain():
        PerSampleMSE()(model(x), y).backward()

    out["non-private"] = (lambda m=model: m.zero_grad(set_to_none=True), plain, model)

    ours = per_sample.enable(prepare(copy.deepcopy(base)))
    gen = torch.Generator(device=device).manual_seed(generator_seed)

    def dp():
        loss = PerSampleMSE("none")(ours(x), y)
        per_sample.clipped_backward(ours, loss, MAX_NORM, noise_multiplier=noise, generator=gen)

    out["torchmatgrad"] = (lambda m=ours: m.zero_grad(set_to_none=True), dp, ours)

    op = _opacus()
    if op is None:
        return out
    hooks_model = copy.deepcopy(base)
    gsm = op["GradSampleModule"](hooks_model, batch_first=True, loss_reduction="sum")
    hooks_opt = op["DPOptimizer"](
        torch.optim.SGD(hooks_model.parameters(), lr=0.0),
        noise_multiplier=noise,
        max_grad_norm=MAX_NORM,
        expected_batch_size=B,
        loss_reduction="sum",
        generator=torch.Generator(device=device).manual_seed(generator_seed),
    )

    def hooks():
        PerSampleMSE()(gsm(x), y).backward()
        hooks_opt.pre_step()

    out["opacus-hooks"] = (lambda: hooks_opt.zero_grad(set_to_none=True), hooks, hooks_model)

    ghost_model = copy.deepcopy(base)
    ghost = op["Ghost"](ghost_model, batch_first=True, loss_reduction="sum", max_grad_norm=MAX_NORM)
    ghost_opt = op["GhostOptimizer"](
        torch.optim.SGD(ghost_model.parameters(), lr=0.0),
        noise_multiplier=noise,
        max_grad_norm=MAX_NORM,
        expected_batch_size=B,
        loss_reduction="sum",
        generator=torch.Generator(device=device).manual_seed(generator_seed),
    )
    criterion = op["GhostLoss"](ghost, ghost_opt, PerSampleMSE(), "sum")

    def ghost_step():
        criterion(ghost(x), y).backward()
        ghost_opt.pre_step()

    out["opacus-ghost"] = (lambda: ghost_opt.zero_grad(set_to_none=True), ghost_step, ghost_model)
    return out


def _held_bytes(model: torch.nn.Module, *tensors: torch.Tensor) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    return params + grads + sum(t.numel() * t.element_size() for t in tensors)


def _peak_bytes(device: torch.device, clear, step, model, x, y) -> int | None:
    """Peak bytes held during one step, parameters and inputs included (None: not measurable
    with this torch)."""
    clear()
    base = _held_bytes(model, x, y)
    if device.type == "cuda":
        # What the step allocates on top of what the device held before it (the other variants'
        # models and buffers included, so they are subtracted): the first GPU run reported the
        # device-wide peak, other variants' retained buffers in it.
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return base + torch.cuda.max_memory_allocated(device) - before
    peak = cpu_peak(step)
    return None if peak is None else base + peak


def _check(steps: dict[str, Any]) -> dict[str, float]:
    """Max |difference| of the DP variants' gradients against torchmatgrad's, relative to its
    largest entry (noise 0)."""
    grads = {}
    for name, (clear, step, model) in steps.items():
        if name == "non-private":
            continue
        clear()
        try:
            step()
        except Exception:  # reported by the timed steps, which fail the same way
            clear()
            continue
        grads[name] = torch.cat([p.grad.flatten().double() for p in model.parameters()])
        clear()
    ref = grads["torchmatgrad"]
    scale = ref.abs().max().item() or 1.0
    return {
        n: (g - ref).abs().max().item() / scale for n, g in grads.items() if n != "torchmatgrad"
    }


def _sample_turns(peers, device: torch.device, rounds: int, max_time: float) -> None:
    """Rounds of STEPS_PER_TURN consecutive steps per live variant, all but the first timed;
    a variant stops after ``max_time`` seconds (at least one round)."""
    cuda = device.type == "cuda"
    spent = dict.fromkeys((p.name for p in peers), 0.0)
    for r in range(rounds):
        live = [p for p in peers if p.error is None and (r == 0 or spent[p.name] < max_time)]
        if not live:
            break
        for p in live:
            for k in range(STEPS_PER_TURN):
                try:
                    p.pre(k)
                    _sync(device)
                    t0 = time.perf_counter()
                    if cuda:
                        e0, e1 = (
                            torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True),
                        )
                        e0.record()
                        p.call(k)
                        e1.record()
                        e1.synchronize()
                        dt = e0.elapsed_time(e1) / 1e3
                    else:
                        p.call(k)
                        dt = time.perf_counter() - t0
                    spent[p.name] += time.perf_counter() - t0
                except Exception as e:  # e.g. out of memory: report it, keep the others
                    p.error = _error_text(e)
                    p.samples.clear()
                    break
                if k > 0:
                    p.samples.append(dt)


def _stack_setup(blocks: int, d: int, B: int, T: int, device: torch.device, seed: int):
    """The default model: make_model's stack, random inputs and regression targets."""
    base = make_model(blocks, d, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, d, generator=g).to(device)
    y = torch.randn(B, T, d, generator=g).to(device)
    return base, x, y, {}


def run_point(
    device: torch.device,
    blocks: int,
    d: int,
    B: int,
    T: int,
    reps: int,
    warmup: int,
    max_time: float,
    seed: int,
    which: str = "stack",
) -> list[dict[str, Any]]:
    if which == "gpt2":
        from .dp_gpt2 import setup
    else:
        setup = _stack_setup
    base, x, y, kw = setup(blocks, d, B, T, device, seed)
    agreement = _check(_steps(base, x, y, 0.0, seed, **kw))
    steps = _steps(base, x, y, NOISE, seed, **kw)
    peers = [
        _Peer(name, "-", "-", lambda i, c=clear: c(), lambda i, s=step: s())
        for name, (clear, step, _) in steps.items()
    ]
    _warm(peers, device, warmup, max_time, itertools.count())
    _sample_turns(peers, device, reps, max_time)
    rows = []
    base_ms = base_peak = None
    for p in peers:
        clear, step, model = steps[p.name]
        row: dict[str, Any] = {
            "device": str(device),
            "device_name": _device_name(device),
            "model": which,
            "blocks": blocks,
            "d": d,
            "B": B,
            "T": T,
            "variant": p.name,
            "steps_timed": len(p.samples),
            "median_ms": None,
            "peak_mb": None,
            "time_vs_nonprivate": None,
            "peak_vs_nonprivate": None,
            "grad_rel_diff_vs_torchmatgrad": agreement.get(p.name),
            "error": p.error,
        }
        if p.error is None and p.samples:
            samples = sorted(p.samples)
            row["median_ms"] = 1e3 * samples[len(samples) // 2]
            try:
                peak = _peak_bytes(device, clear, step, model, x, y)
                row["peak_mb"] = None if peak is None else peak / 2**20
            except Exception as e:  # e.g. out of memory
                row["error"] = _error_text(e)
        if p.name == "non-private":
            base_ms, base_peak = row["median_ms"], row["peak_mb"]
        if base_ms and row["median_ms"]:
            row["time_vs_nonprivate"] = row["median_ms"] / base_ms
        if base_peak and row["peak_mb"]:
            row["peak_vs_nonprivate"] = row["peak_mb"] / base_peak
        rows.append(row)
        clear()
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [
        f"{'device':6} {'B':>3} {'T':>5}  {'variant':13} {'ms':>9} {'×time':>6} "
        f"{'peak MB':>9} {'×peak':>6}  {'Δgrad':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['device']:6} {r['B']:>3} {r['T']:>5}  {r['variant']:13} "
            f"{f(r['median_ms'], '9.1f')} {f(r['time_vs_nonprivate'], '6.2f')} "
            f"{f(r['peak_mb'], '9.1f')} {f(r['peak_vs_nonprivate'], '6.2f')}  "
            f"{f(r['grad_rel_diff_vs_torchmatgrad'], '8.1e')}"
            + (f"  ERROR {r['error']}" if r["error"] else "")
        )
    return "\n".join(lines)


def main(args) -> int:
    """Run the DP benchmark for ``args`` (the bench command's options: --device, --B, --T,
    --blocks, --d, --reps, --warmup, --max-time, --out, --name, --seed, --threads)."""
    with warnings.catch_warnings():
        # Opacus's hooks on the first layer, whose input needs no gradient: expected, not news.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return _main(args)


def _main(args) -> int:
    devices = [torch.device(s) for s in (args.device or ["cpu"])]
    model = "gpt2" if "dp-gpt2" in (args.case or ()) else "stack"
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    meta = machine_info(devices)
    for device in devices:
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: CUDA requested but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        blocks, B0, T0, reps0, time0 = DEFAULTS[device.type]
        blocks = args.blocks or blocks
        Bs = args.B or [B0]
        Ts = args.T or list(T0)
        reps = args.reps or reps0
        warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 3)
        max_time = args.max_time if args.max_time is not None else time0
        print(
            f"{device}: {_device_name(device)}; {model}, {blocks} blocks, d = {args.d}, "
            f"{torch.get_num_threads()} threads, path policy {torchmatgrad.policy.current_path()}; "
            f"load average {_loadavg()}"
        )
        for B in Bs:
            for T in Ts:
                rows += run_point(
                    device, blocks, args.d, B, T, reps, warmup, max_time, args.seed, model
                )
                print(format_rows([r for r in rows if r["B"] == B and r["T"] == T]), flush=True)
                if model == "stack":
                    routes += norm_routes(device, args.d, B, T, max(3, reps))
                    print(format_norm_routes(routes[-4:]), flush=True)
    elapsed = time.perf_counter() - t0
    meta["loadavg_end"] = _loadavg()
    out, stem = output_stem(args.out, args.name, "dp")
    doc = {
        "schema": "torchmatgrad-bench-dp/1",
        "created": now_utc(),
        "elapsed_s": round(elapsed, 2),
        "settings": {
            "max_norm": MAX_NORM,
            "noise_multiplier": NOISE,
            "d": args.d,
            "path": torchmatgrad.policy.current_path(),
        },
        "notes": "median of single steps, variants interleaved; peak: bytes held by torch's "
        "allocator during one step, parameters and inputs included (CPU: profiler allocation "
        "events; CUDA: max_memory_allocated less what the device held before the step); Δgrad: "
        "max |grad - torchmatgrad's| / max |grad| with noise 0",
        "machine": meta,
        "rows": rows,
        "norm_routes": routes,
    }
    path = write_json(doc, out / f"{stem}.json")
    print(f"{len(rows)} rows in {elapsed:.1f} s; wrote {path}")
    return 0
