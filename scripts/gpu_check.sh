#!/usr/bin/env bash
# One command for a machine with a CUDA GPU, torch and nvcc (no network needed):
#   build in place -> CUDA tests -> compute-sanitizer (memcheck, racecheck, initcheck) on a small
#   script that runs every kernel path once -> benchmark against torch eager -> short table.
#
# Usage: scripts/gpu_check.sh [RESULTS_DIR]
#   results go to $1, else $RESULTS_DIR, else $OUT, else ./gpu_results: build.log, tests.log,
#   sanitizer.log, bench.log, bench.json (all benchmark rows), status.txt, summary.txt (at most
#   8 files, flat, so the whole folder can be fetched). Target: about 6 minutes on an H100/H200.
# Environment: PYTHON (default python3), SKIP_BUILD=1 (use the extension already built),
#   QUICK=1 (fewer benchmark repetitions), TORCH_CUDA_ARCH_LIST (default: the visible GPU).
# Every step runs even when an earlier one failed; status.txt records each step's exit status
# and the script exits non-zero if any step failed.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-${RESULTS_DIR:-${OUT:-$ROOT/gpu_results}}}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
PY="${PYTHON:-python3}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1

STATUS="$RESULTS/status.txt"
: >"$STATUS"
FAILED=0
T0=$SECONDS

# step NAME LOG CMD...: run CMD with its output appended to LOG (and echoed), record the status.
step() {
  local name="$1" log="$2"
  shift 2
  local t=$SECONDS
  echo "=== [$name] $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  if [ "$rc" -eq 77 ]; then
    verdict=skipped
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED (exit $rc)"
    FAILED=1
  fi
  printf '%-22s %-18s %4ds\n' "$name" "$verdict" $((SECONDS - t)) | tee -a "$STATUS"
}

# ---- 0. the machine -----------------------------------------------------------------------
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -2
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count())"
} >"$RESULTS/build.log" 2>&1
cat "$RESULTS/build.log"

# ---- 1. build in place --------------------------------------------------------------------
build() {
  if [ "${SKIP_BUILD:-0}" = 1 ]; then
    echo "SKIP_BUILD=1: using the extension already built"
  else
    MAX_JOBS="$(nproc)" FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" - <<'EOF'
import torch, torchmatgrad
c = torchmatgrad._C
assert c.with_cuda, "the extension was built without CUDA"
assert torch._C._dispatch_has_kernel_for_dispatch_key("torchmatgrad::linear", "CUDA"), \
    "no CUDA kernel registered for torchmatgrad::linear"
print("built with CUDA for archs", c.cuda_arch_list)
EOF
}
step build "$RESULTS/build.log" build

# ---- 2. CUDA tests (tests/test_cuda.py and every device=cuda case of the other files) -----
step tests "$RESULTS/tests.log" timeout 900 "$PY" -m pytest -q -rs -p no:cacheprovider tests -k cuda

# ---- 3. compute-sanitizer on a small script that runs each kernel path once ---------------
cat >"$SCRATCH/sanitize_ops.py" <<'EOF'
# Every CUDA kernel path once, on small shapes, results checked against the CPU kernels.
import torch
import torchmatgrad  # noqa: F401

ops = torch.ops.torchmatgrad
torch.manual_seed(0)
dev = "cuda"
bad = []


def check(name, got, ref, tol):
    if got is None and ref is None:
        return
    err = (got.double().cpu() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.double().abs().max().item()) if ref.numel() else 1.0
    if not err <= tol * scale:
        bad.append(f"{name}: error {err:.3g}")


def run(dtype, rows, n, m, offset=0, bias=True):
    tol = {torch.float64: 1e-12, torch.float32: 1e-4}.get(dtype, 3e-2)

    def mk(*shape):
        t = torch.randn(*shape, dtype=torch.float64).to(dtype)
        if offset:  # a view one element into a buffer: misaligned, takes the scalar loads
            buf = torch.empty(t.numel() + offset, dtype=dtype)
            t = buf[offset:].view(shape).copy_(t)
        return t

    x, w, g, gw0 = mk(rows, m), mk(n, m), mk(rows, n), mk(n, m)
    b = mk(n) if bias else None
    tag = f"{dtype} R={rows} n={n} m={m} off={offset}"

    def on(t):
        if t is None:
            return None
        if not offset:
            return t.to(dev)
        buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=dev)
        return buf[offset:].view(t.shape).copy_(t)

    xc, wc, gc, bc, gwc = map(on, (x, w, g, b, gw0))
    check(f"fwd {tag}", ops.linear(xc, wc, bc), ops.linear(x, w, b), tol)
    for mask in ([True, True, True], [True, False, False], [False, True, True], [False, False, True]):
        for got, ref in zip(ops.linear_backward(gc, xc, wc, mask), ops.linear_backward(g, x, w, mask)):
            check(f"bwd {mask} {tag}", got, ref, tol)
    acc, acc_ref = gwc.clone(), gw0.clone()
    outs = ops.linear_backward_accumulate_(gc, xc, wc, acc, [True, True])
    refs = ops.linear_backward_accumulate_(g, x, w, acc_ref, [True, True])
    check(f"acc {tag}", acc, acc_ref, tol)
    for got, ref in zip(outs, refs):
        check(f"acc outs {tag}", got, ref, tol)
    if dtype in (torch.bfloat16, torch.float16):  # fp32 master gradient
        acc32, ref32 = gw0.float().to(dev), gw0.float()
        ops.linear_backward_accumulate_(gc, xc, wc, acc32, [False, False])
        ops.linear_backward_accumulate_(g, x, w, ref32, [False, False])
        check(f"acc fp32 master {tag}", acc32, ref32, 1e-4)


for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
    for rows in (1, 3, 16, 40):  # few-rows kernels (RMAX 1, 4, 16) and the tiled GEMM
        run(dtype, rows, 70, 64)  # vector loads; 70 rows: several row chunks in the backward
        run(dtype, rows, 9, 67, offset=1, bias=False)  # scalar loads, one row chunk
run(torch.float32, 1, 300, 8)  # many row chunks, a narrow strip
run(torch.float32, 2200, 2300, 24)  # 128² GEMM tiles (≥ 2 per multiprocessor)
for shape in ((0, 5, 7), (3, 0, 7), (3, 5, 0)):  # empty
    run(torch.float32, *shape)
torch.cuda.synchronize()
print("\n".join(bad) if bad else "all results match the CPU kernels")
raise SystemExit(1 if bad else 0)
EOF

sanitize() {
  local tool="$1" san
  san="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
  if [ ! -x "$san" ]; then
    echo "compute-sanitizer not found: skipped"
    return 77
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 400 "$san" --tool "$tool" --error-exitcode 99 \
    --print-limit 20 "$PY" "$SCRATCH/sanitize_ops.py"
}
step "sanitizer-plain" "$RESULTS/sanitizer.log" "$PY" "$SCRATCH/sanitize_ops.py"
for tool in memcheck racecheck initcheck; do
  step "sanitizer-$tool" "$RESULTS/sanitizer.log" sanitize "$tool"
done

# ---- 4. benchmark against torch eager (same run, same inputs) -----------------------------
REPS=100
WARMUP=10
[ "${QUICK:-0}" = 1 ] && REPS=30 && WARMUP=5
RAW="$SCRATCH/bench"
mkdir -p "$RAW"
bench() {  # bench NAME DTYPE N "B..." "CASE..."
  local name="$1" dtype="$2" n="$3" bs="$4" cases="$5"
  # shellcheck disable=SC2086
  "$PY" -m torchmatgrad bench --device cuda --dtype "$dtype" --n "$n" --B $bs --case $cases \
    --reps "$REPS" --warmup "$WARMUP" --out "$RAW" --name "$name" --no-plot --no-progress
}
# The target shapes: forward fp32 8192² B=1, 16 and fwd+bwd (.grad None before) B=1, 16;
# forward bf16 8192² B=1; bf16 16384² forward B=16 and fwd+bwd B=1 (B=1 fwd, B=16 fwd+bwd come
# along); forward fp32 8192² B=4096 (the hand-written tiled GEMM against cuBLAS); fwd+bwd fp32
# 1024² B=1 (launch and framework overhead). fwdbwd_acc: the step with gradient accumulation,
# torch vs torchmatgrad unfused vs fused (fp32 8192² B=1, 16; bf16 16384² B=1).
step bench-fp32-8192 "$RESULTS/bench.log" bench a_fp32_8192 fp32 8192 "1 16" "fwd fwdbwd fwdbwd_acc"
step bench-bf16-8192 "$RESULTS/bench.log" bench b_bf16_8192 bf16 8192 "1" "fwd"
step bench-bf16-16384 "$RESULTS/bench.log" bench c_bf16_16384 bf16 16384 "1 16" "fwd fwdbwd fwdbwd_acc"
step bench-fp32-B4096 "$RESULTS/bench.log" bench d_fp32_b4096 fp32 8192 "4096" "fwd"
step bench-fp32-1024 "$RESULTS/bench.log" bench e_fp32_1024 fp32 1024 "1" "fwdbwd"

# ---- 5. merge the benchmark rows; the short table, last ------------------------------------
"$PY" - "$RAW" "$RESULTS/bench.json" "$RESULTS/summary.txt" <<'EOF' 2>&1 | tee -a "$RESULTS/bench.log"
import json, sys
from pathlib import Path

raw, out_json, out_txt = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
docs = [json.loads(p.read_text()) for p in sorted(raw.glob("*.json"))]
rows = [r for d in docs for r in d.get("rows", [])]
out_json.write_text(json.dumps({"runs": docs}, indent=1) + "\n")
torch_ms = {(r["dtype"], r["n"], r["B"], r["case"]): r["median_ms"] for r in rows if r["peer"] == "torch"}
lines = [f"{'case':7} {'dtype':5} {'n':>6} {'B':>5}  {'torch ms':>9} {'ours ms':>9} {'speedup':>7} {'%floor':>6}  path",]
for r in rows:
    if r["peer"] != "torchmatgrad":
        continue
    key = (r["dtype"], r["n"], r["B"], r["case"])
    t, o = torch_ms.get(key), r["median_ms"]
    f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
    pct = None if r.get("floor_frac") is None else 100 * r["floor_frac"]
    note = ("  ERROR " + r["error"][:50]) if r.get("error") else ""
    lines.append(f"{r['case']:7} {r['dtype']:5} {r['n']:>6} {r['B']:>5}  {f(t, '9.4f')} {f(o, '9.4f')} "
                 f"{f(r.get('speedup_vs_torch'), '6.2f')}x {f(pct, '6.0f')}  {r['path']}{note}")
if docs:
    d = docs[0]
    lines.insert(0, f"{d['rows'][0]['device_name'] if d['rows'] else '?'}; copy bandwidth "
                    + ", ".join(f"{k} {v:.0f} GB/s" for k, v in d["copy_bandwidth_GBps"].items()))
out_txt.write_text("\n".join(lines) + "\n")
print(f"{len(rows)} benchmark rows from {len(docs)} runs -> {out_json}")
EOF

echo
echo "==== steps ($((SECONDS - T0)) s in all; results in $RESULTS)"
cat "$STATUS"
echo
echo "==== benchmark (median of single calls, CUDA events; speedup = torch eager / torchmatgrad)"
cat "$RESULTS/summary.txt" 2>/dev/null || echo "(no benchmark rows)"
exit "$FAILED"
