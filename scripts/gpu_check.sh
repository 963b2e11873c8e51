#!/usr/bin/env bash
# shellcheck disable=SC2317  # stages run as "stage_$name", steps' functions through bash -c
# The GPU check of torchmatgrad's CUDA kernels, in stages that each fit one call of a lent GPU
# machine (issue #10). Everything here that does not need a GPU is tried on the CPU machine
# first (GPU_CHECK_DEVICE=cpu, tests/test_gpu_scripts.py), so a GPU call can only fail on what
# needs a GPU.
#
# Usage: scripts/gpu_check.sh STAGE[+STAGE...] [RESULTS_DIR]
#        scripts/gpu_check.sh help | list
#   RESULTS_DIR: $2, else $OUT (the device tool's results folder), else ./gpu_results. Every
#   stage writes there, flat (the device tool returns at most 8 files, letters/digits/._- only):
#     status.txt      one line per step: ok / skipped (why) / FAILED (exit) / TIMEOUT, seconds
#     gpu_check.log   everything every step printed
#     bench.json      bench: every benchmark row (peer, variant, path, times, floors)
#     summary.txt     bench: the short table and the issue's targets with verdicts
#     tune-cuda.json  sweep: kernel vs cuBLAS per op, dtype, size and rows, and the path table
#     tc-bench.json   tc: the tensor-core few-rows forward vs cuBLAS and the CUDA cores
#     _C.cpython-312-x86_64-linux-gnu.so, build.stamp
#                     build: the extension (debug info stripped) and its build stamp, to carry
#                     to a fresh machine instead of building again (see the runbook)
#
# Stages (measured on the first GPU run, H100 80GB HBM3, 16 cores, 2026-11-26, commit 4c0ff11;
# the step timeouts bound each stage):
#   build     104 s     build in place for TORCH_CUDA_ARCH_LIST=9.0 with MAX_JOBS=$(nproc);
#                       import check (CUDA kernels registered, built for the visible GPU);
#                       libstdc++ linked shared; skipped when build/gpu_check.stamp matches the
#                       sources (SKIP_BUILD)
#   smoke     9 s       scripts/gpu_smoke.py: every kernel path (forced kernel, forced vendor),
#                       4 dtypes, few-rows/GEMM, vector/scalar loads, masks, accumulation,
#                       fused and main_grad steps, against float64 references
#   bench     19 s      scripts/gpu_bench.py: the issue's target shapes, torch eager vs
#                       torchmatgrad default vs forced kernel, fused and main_grad steps;
#                       writes bench.json and summary.txt (the table comes last in the output)
#   sweep     7 s       python -m torchmatgrad tune --device cuda: kernel vs cuBLAS for
#                       B = 1, 2, 4, 8, 16, 32, 64, 256, 4096 (the CUDA crossover, from numbers)
#   tests     92 s      pytest -m "cuda and not slow" -k "not compile" (1080 tests on the
#                       hand-written kernels; pytest-xdist and pytest-timeout where installed)
#   compile   47 s      pytest -m "cuda and not slow" -k compile (torch.compile, CUDA graphs)
#   sanitize  ~5 min    compute-sanitizer on gpu_smoke --sanitize (small shapes): memcheck 12 s
#                       and racecheck 71 s restricted to torchmatgrad's kernels (--kernel-name
#                       kns=torchmatgrad: every kernel is in namespace torchmatgrad::cuda;
#                       `python -m scripts.gpu_env --kernels` checks that); initcheck on every
#                       kernel (not yet timed that way; with the filter it ran past 150 s on
#                       false reports); a missing tool, no GPU, or "Device not supported" is
#                       reported as skipped (exit 77)
#   memcheck, racecheck, initcheck   one sanitizer tool alone (for a rerun)
#   big       9 s       the >2^31-element test alone (4 cases, a 4.3 GB bf16 weight each)
#   dp        74 s      python -m torchmatgrad bench --case dp: the DP-SGD step of a GPT-2-small
#                       stack (12 blocks, B = 32, T = 128, 512, 1024), non-private vs ours vs
#                       Opacus hooks/ghost (issue #12), and per_sample_grad_norms per layer
#                       kind on the kernel and on the bmm route (dp.json's norm_routes: confirms
#                       or moves kNormsVendorRowsCuda, issue 28); writes dp.json. The image has no
#                       Opacus: its wheel in .whl/ (carried) is installed to /tmp/tmg-site first
#   tc        (not yet run) the tensor-core few-rows forward (issue #28; off by default, never
#                       run on a GPU before): scripts/gpu_tc_bench.py first (cuBLAS, the CUDA-core
#                       kernels and the tensor-core kernel in one run, bf16/fp16, n = m = 4096,
#                       8192, rows 16/32/64: ms, W GB/s, ratios, error against cuBLAS; writes
#                       tc-bench.json), then its tests (pytest -k tc_ tests/test_cuda.py), and
#                       with TORCHMATGRAD_CUDA_TC=1 (every bf16/fp16 forward of 16..64 rows on
#                       it): gpu_smoke, its memcheck and racecheck, test_cuda.py's other CUDA
#                       tests. Needs the build (no carry)
#   all       = build+smoke+bench+sweep+tests+compile+sanitize+big+dp+tc (longer than one call)
#
# GPU runbook (15 minutes of device time in all, start-up and idle included; one call <= 600 s;
# a machine goes back 30 s after a call and none starts with under 4 minutes left). What worked
# on the first run: the machine started in ~35 s; the second call was made at once, on the warm
# machine (no second start-up, no carry); 683 s of device time in all.
#   0. Here first: `GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh all /tmp/gpu` and
#      `python -m pytest -q tests/test_gpu_scripts.py` pass; commit; note the short commit.
#      status() says whether this task has a machine (can_start_another). The device tool
#      sends the checkout the session started in (not a helper's worktree).
#   1. run(command="GPU_CHECK_COMMIT=<sha> bash scripts/gpu_check.sh build+smoke+tests+bench+sweep",
#          carry=[".whl"], timeout_s=420)        measured ~230 s: build 104, smoke 9, tests 92,
#                                                bench 19, sweep 7
#   2. At once, before reading further (the machine waits 30 s):
#      run(command="GPU_CHECK_COMMIT=<sha> bash scripts/gpu_check.sh sanitize+dp+big+compile",
#          carry=[".whl"], timeout_s=540)        ~7-8 min; compile last: a cut loses only it.
#      The build of call 1 is still there (its stamp matches), so no build. On a fresh machine
#      instead, carry the returned _C.cpython-312-x86_64-linux-gnu.so (into torchmatgrad/) and
#      build.stamp (as build/gpu_check.stamp) to skip it.
#   3. A failure fixed: rerun that one stage at once (within 30 s, on the warm machine, e.g.
#      "SKIP_BUILD=0 bash scripts/gpu_check.sh build+smoke" or "racecheck") only while
#      status's budget_left_s allows it; then give_back().
#   Issue #28's tensor-core few-rows forward, in one call of its own (~6 min predicted: build
#   ~100 s, bench ~40 s, tests ~60 s, smoke 9 s, memcheck 12 s, racecheck ~70 s, suite ~60 s;
#   not yet measured):
#      run(command="GPU_CHECK_COMMIT=<sha> bash scripts/gpu_check.sh build+tc", timeout_s=560)
#      then read tc-bench.json / the log's table before switching it on by default anywhere.
#   Record the run in benchmarks/RESULTS.md (date, card, torch, commit, summary.txt's tables).
#   The targets were set from H200 numbers: on an H100 the byte floors of the memory-bound
#   targets lie above them (summary.txt flags each); compare ratios to torch there.
#
# Building on the device (item 2 of the issue), measured on the 2-core CPU machine (torch
# 2.14.1+cu130, nvcc 13.0, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=1): 250 s in all, the units
# backward_fewrows.cu 44 s, linear_cuda.cu 41 s, autograd.cpp 32 s, gemm.cu 25 s,
# isa_baseline.cpp 21 s, linear_cpu.cpp 16 s, forward_fewrows.cu 15 s, ops.cpp 13 s, the rest
# under 12 s each. With 16 parallel jobs the build is bound by its longest unit: about 45 s plus
# setup.py and the link, ~60-70 s (PERF.md: a one-.cu extension built there in 47 s).
# Chosen: build on the device (stage build), once per fresh machine at most; later calls carry
# the stripped extension (10.6 MB) and skip the build. Not possible as things stand: building
# here for the device, whose python3 is 3.12 with torch 2.11.0+cu130. `pip download
# torch==2.11.0` works from this machine's index (the cp312 manylinux_2_28 wheel, 531 MB, with
# CUDA 13.0.2 wheels as dependencies), but this machine has no Python 3.12 to build a
# cpython-312 extension with. An abi3 (limited-API) extension would load there: torch's headers
# compile with Py_LIMITED_API=0x030A0000, and ops.cpp fails only on the PyTuple_SET_ITEM macro
# (PyTuple_SetItem is the limited-API call); with that and py_limited_api in setup.py, a build
# against torch 2.11.0 (in a venv of its own, with its CUDA wheels, several GB) could be carried.
#
# Environment:
#   GPU_CHECK_DEVICE=cpu  run the stages' Python on the CPU kernels (no build, smoke/bench/
#                         sweep on CPU, tests collect and skip): tries everything but the GPU
#   DRY_RUN=1             print each step's command instead of running it
#   SKIP_BUILD=1          never build (use what is there); SKIP_BUILD=0 always build; unset:
#                         build unless build/gpu_check.stamp matches (python -m scripts.gpu_env)
#   GPU_CHECK_COMMIT      the commit under test (the device copy has no .git)
#   TORCH_CUDA_ARCH_LIST  default 9.0 (H100/H200); PYTHON default python3; QUICK=1 fewer reps
#   TEST_WORKERS          pytest-xdist workers for tests/compile (default 8; 0: serial)
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
DRY_RUN="${DRY_RUN:-0}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STAGES=(build smoke bench sweep tests compile sanitize memcheck racecheck initcheck big dp tc)
ALL=(build smoke bench sweep tests compile sanitize big dp tc)
SAN_UNSUPPORTED=""

usage() {
  sed -n '3,/^set -u/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# ---- steps ------------------------------------------------------------------------------------

# step NAME TIMEOUT CMD...: run CMD (a program or one of the functions exported below, bounded
# by TIMEOUT seconds) with its output in the log, and record the verdict: exit 0 ok, 77 skipped
# (the reason is its last "skipped: ..." line), 124 TIMEOUT, else FAILED. $WHAT, when set, is
# what the log and a dry run show instead of CMD.
step() {
  local name="$1" limit="$2"
  shift 2
  local t=$SECONDS out rc verdict
  echo "=== [$name] ${WHAT:-$(printf "%q " "$@")}" | tee -a "$LOG"
  if [ "$DRY_RUN" = 1 ]; then
    printf '%-18s %-50s %4ds\n' "$name" "dry-run (timeout ${limit}s)" 0 >>"$STATUS"
    return 0
  fi
  out="$(mktemp)"
  timeout -k 10 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee "$out" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    verdict="ok"
  elif [ "$rc" -eq 77 ]; then
    verdict="skipped ($(grep -o 'skipped: .*' "$out" | tail -1 | cut -c10- | cut -c1-60))"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="TIMEOUT (${limit}s)"
    FAILED=1
  else
    verdict="FAILED (exit $rc)"
    FAILED=1
  fi
  rm -f "$out"
  [ "$DEVICE" = cpu ] && verdict="$verdict [cpu mode]"
  printf '%-18s %-50s %4ds\n' "$name" "$verdict" $((SECONDS - t)) | tee -a "$STATUS"
  return "$rc"
}

have_gpu() {
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

# ---- stages -----------------------------------------------------------------------------------

build_is_current() {
  [ -f build/gpu_check.stamp ] || return 1
  [ "$(cat build/gpu_check.stamp)" = "$("$PY" -m scripts.gpu_env --stamp 2>/dev/null)" ] ||
    return 1
  "$PY" -m scripts.gpu_env --require-cuda >/dev/null 2>&1
}

do_build() {
  local t=$SECONDS
  MAX_JOBS="$(nproc)" FORCE_CUDA=1 "$PY" setup.py build_ext --inplace || return 1
  echo "build took $((SECONDS - t)) s with MAX_JOBS=$(nproc), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  mkdir -p build && "$PY" -m scripts.gpu_env --stamp >build/gpu_check.stamp
}

# The extension must use the process's shared libstdc++: a private static copy beside it broke
# number formatting in error messages on the first GPU run (2026-11-26: /opt/gcc's g++ linked
# libstdc++.a; the CUDA ops' shape errors segfaulted). setup.py links -lstdc++ for that.
check_libstdcxx() {
  local so
  command -v readelf >/dev/null || {
    echo "skipped: readelf not found"
    return 77
  }
  so="$("$PY" -c 'import importlib.util as u; print(u.find_spec("torchmatgrad._C").origin)')" ||
    return 1
  if readelf -d "$so" | grep -q 'NEEDED.*libstdc++'; then
    echo "libstdc++ linked shared: $(readelf -d "$so" | grep 'NEEDED.*libstdc++' | tr -s ' ')"
    return 0
  fi
  echo "$so links libstdc++ statically (no NEEDED libstdc++.so): a private copy of the C++"
  echo "runtime beside torch's; error messages that format numbers break. Compiler: $(command -v g++)"
  return 1
}

# The extension and its stamp into the results, to carry to a fresh machine.
keep_build() {
  local so
  so="$("$PY" -c 'import torchmatgrad._C as c; print(c.__file__)')" || return 1
  cp build/gpu_check.stamp "$RESULTS/build.stamp" 2>/dev/null || true
  strip -g -o "$RESULTS/$(basename "$so")" "$so" 2>/dev/null || cp "$so" "$RESULTS/"
  ls -l "$RESULTS/$(basename "$so")"
}

stage_build() {
  step env 60 "$PY" -m scripts.gpu_env
  if [ "$DEVICE" = cpu ]; then
    echo "cpu mode: no build; the in-place build is used as it is" | tee -a "$LOG"
    return
  fi
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  local skip="${SKIP_BUILD:-auto}"
  if [ "$skip" = auto ] && [ "$DRY_RUN" != 1 ] && build_is_current; then
    echo "build/gpu_check.stamp matches the sources: no build" | tee -a "$LOG"
  elif [ "$skip" = 1 ]; then
    echo "SKIP_BUILD=1: no build" | tee -a "$LOG"
  else
    WHAT="MAX_JOBS=$(nproc) FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST $PY setup.py build_ext --inplace" \
      step build 240 do_build
  fi
  step import-check 60 "$PY" -m scripts.gpu_env --require-cuda
  step libstdcxx 30 check_libstdcxx
  step kernel-list 60 "$PY" -m scripts.gpu_env --kernels
  [ "$DRY_RUN" = 1 ] || keep_build >>"$LOG" 2>&1
}

stage_smoke() {
  step smoke 180 "$PY" -m scripts.gpu_smoke --device "$DEVICE"
}

stage_bench() {
  local args=(--device "$DEVICE" --out "$RESULTS")
  [ "${QUICK:-0}" = 1 ] && args+=(--quick)
  [ -n "${GPU_CHECK_COMMIT:-}" ] && args+=(--commit "$GPU_CHECK_COMMIT")
  step bench 270 "$PY" -m scripts.gpu_bench "${args[@]}"
}

stage_sweep() {
  local args=(--device "$DEVICE" --out "$RESULTS/tune-$DEVICE.json" --no-install)
  if [ "$DEVICE" = cpu ]; then
    args+=(--sizes 256 --rows 1 16 64 --dtype float32 --reps 3 --max-time 0.05)
  else
    args+=(--sizes 1024 4096 8192 --rows 1 2 4 8 16 32 64 256 4096 --dtype float32 bfloat16)
  fi
  step sweep 240 "$PY" -m torchmatgrad tune "${args[@]}"
}

pytest_args() {
  local args=(-q -rfEs -p no:cacheprovider)
  local workers="${TEST_WORKERS:-8}"
  if [ "$DEVICE" != cpu ] && [ "$workers" != 0 ] && "$PY" -c 'import xdist' 2>/dev/null; then
    args+=(-n "$workers")
  fi
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    args+=(--timeout 150)
  fi
  echo "${args[@]}"
}

# run_pytest ARGS...: pytest, but a run in which every selected test was skipped (no GPU) is
# reported as skipped (exit 77), not as a pass.
run_pytest() {
  local log rc summary
  log="$(mktemp)"
  # shellcheck disable=SC2046
  "$PY" -m pytest $(pytest_args) "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  summary="$(grep -E '^[0-9]+ (passed|failed|skipped|deselected|error)' "$log" | tail -1)"
  rm -f "$log"
  if [ "$rc" -eq 0 ] && ! grep -q passed <<<"$summary"; then
    echo "skipped: no test ran ($summary)"
    return 77
  fi
  return "$rc"
}

stage_tests() {
  step tests 270 run_pytest -m "cuda and not slow" -k "not compile" tests
}

stage_compile() {
  step compile 240 run_pytest -m "cuda and not slow" -k compile tests
}

stage_big() {
  # Serial: each case holds a 4.3 GB weight, its gradient and float64 slices of both.
  TEST_WORKERS=0 step big 240 run_pytest -m cuda -k over_2_31 tests/test_cuda.py
}

# sanitize_tool TOOL: compute-sanitizer TOOL on gpu_smoke --sanitize, our kernels only.
sanitize_tool() {
  local tool="$1" san log rc
  san="$(command -v compute-sanitizer || true)"
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -z "$san" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && san="$d/bin/compute-sanitizer"
  done
  if [ -z "$san" ]; then
    echo "skipped: compute-sanitizer not found"
    return 77
  fi
  if ! have_gpu; then
    echo "skipped: no CUDA GPU visible"
    return 77
  fi
  if [ -n "$SAN_UNSUPPORTED" ]; then
    echo "skipped: Device not supported (seen in an earlier tool)"
    return 77
  fi
  log="$(mktemp)"
  # initcheck tracks which bytes were written by watching the instrumented kernels' stores: with
  # the filter, everything torch's own kernels write (references, comparison results) reads as
  # uninitialized when copied to the host (seen on the first GPU run, 2026-11-26: every report was
  # a cudaMemcpy of torch's results, and the step ran out of time printing them). So initcheck
  # instruments every kernel; memcheck and racecheck only ours.
  local filter=(--kernel-name kns=torchmatgrad)
  [ "$tool" = initcheck ] && filter=()
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" "${filter[@]}" \
    --error-exitcode 99 --print-limit 20 \
    "$PY" -m scripts.gpu_smoke --device cuda --sanitize 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if grep -qiE "device not supported|not supported on this (device|platform)" "$log"; then
    echo "skipped: compute-sanitizer says: Device not supported"
    rm -f "$log"
    return 77
  fi
  rm -f "$log"
  return "$rc"
}

run_sanitizer() {
  local tool="$1"
  if [ "$DRY_RUN" != 1 ] && [ -n "$SAN_UNSUPPORTED" ]; then
    step "$tool" 10 sanitize_tool "$tool"
    return
  fi
  local filter="--kernel-name kns=torchmatgrad " limit=150
  [ "$tool" = initcheck ] && filter="" && limit=270
  WHAT="PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool $filter--error-exitcode 99 --print-limit 20 $PY -m scripts.gpu_smoke --device cuda --sanitize" \
    step "$tool" "$limit" sanitize_tool "$tool"
  # "Device not supported" once means it for every tool: skip the others at once.
  tail -1 "$STATUS" | grep -q "Device not supported" && export SAN_UNSUPPORTED=1
  return 0
}

export PY DEVICE SAN_UNSUPPORTED TEST_WORKERS
export -f have_gpu do_build sanitize_tool pytest_args run_pytest check_libstdcxx

# Opacus for the dp stage: the device image lacks it; its wheel travels in .whl/ (ignored by
# git, named in the device tool's carry; `pip download --no-deps opacus==1.6.0 -d .whl`).
dp_opacus() {
  "$PY" -c 'import opacus' 2>/dev/null && return 0
  compgen -G "$ROOT/.whl/opacus-*.whl" >/dev/null || {
    echo "no Opacus and no .whl/opacus-*.whl: the Opacus variants are skipped"
    return 0
  }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tmg-site \
    "$ROOT"/.whl/opacus-*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/tmg-site"
}

stage_dp() {
  local args=(--device "$DEVICE" --case dp --out "$RESULTS" --name dp --no-plot --no-progress)
  if [ "$DEVICE" = cpu ]; then
    args+=(--B 2 --T 8 --blocks 1 --reps 2 --max-time 0.2)
  else
    args+=(--max-time 2)
  fi
  [ "$DRY_RUN" = 1 ] || dp_opacus >>"$LOG" 2>&1
  step dp 240 "$PY" -m torchmatgrad bench "${args[@]}"
}

# The tensor-core few-rows forward (csrc/cuda/forward_fewrows_tc.cu, TORCHMATGRAD_CUDA_TC): the
# numbers first, then its own tests, then the CUDA-core tests with it switched on.
stage_tc() {
  local args=(--device "$DEVICE" --out "$RESULTS")
  [ "${QUICK:-0}" = 1 ] && args+=(--quick)
  step tc-bench 240 "$PY" -m scripts.gpu_tc_bench "${args[@]}"
  step tc-tests 240 run_pytest -m cuda -k "tc_" tests/test_cuda.py
  # gpu_smoke's bf16/fp16 cases of 16 and 40 rows take the kernel with the switch on.
  TORCHMATGRAD_CUDA_TC=1 WHAT="TORCHMATGRAD_CUDA_TC=1 $PY -m scripts.gpu_smoke --device $DEVICE" \
    step tc-smoke 180 "$PY" -m scripts.gpu_smoke --device "$DEVICE"
  local tool
  for tool in memcheck racecheck; do
    TORCHMATGRAD_CUDA_TC=1 WHAT="TORCHMATGRAD_CUDA_TC=1 compute-sanitizer --tool $tool --kernel-name kns=torchmatgrad ... $PY -m scripts.gpu_smoke --device cuda --sanitize" \
      step "tc-$tool" 150 sanitize_tool "$tool"
  done
  TORCHMATGRAD_CUDA_TC=1 WHAT="TORCHMATGRAD_CUDA_TC=1 run_pytest -m cuda and not slow -k not tc_ and not compile and not over_2_31 tests/test_cuda.py" \
    step tc-suite 270 run_pytest -m "cuda and not slow" -k "not tc_ and not compile and not over_2_31" tests/test_cuda.py
}

stage_memcheck() { run_sanitizer memcheck; }
stage_racecheck() { run_sanitizer racecheck; }
stage_initcheck() { run_sanitizer initcheck; }
stage_sanitize() {
  step sanitizer-filter 60 "$PY" -m scripts.gpu_env --kernels --filter torchmatgrad
  run_sanitizer memcheck
  run_sanitizer racecheck
  run_sanitizer initcheck
}

# ---- main -------------------------------------------------------------------------------------

main() {
  if [ $# -lt 1 ] || [ "$1" = help ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    usage
    [ $# -ge 1 ]
    exit $?
  fi
  if [ "$1" = list ]; then
    printf '%s\n' "${STAGES[@]}" all
    exit 0
  fi
  if [ "$DEVICE" != cuda ] && [ "$DEVICE" != cpu ]; then
    echo "GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2
    exit 2
  fi

  local WANT RUN s
  IFS=+ read -r -a WANT <<<"$1"
  RUN=()
  for s in "${WANT[@]}"; do
    if [ "$s" = all ]; then
      RUN+=("${ALL[@]}")
    elif printf '%s\n' "${STAGES[@]}" | grep -qx -- "$s"; then
      RUN+=("$s")
    else
      echo "unknown stage '$s'; stages: ${STAGES[*]} all (join with +)" >&2
      exit 2
    fi
  done

  # A stage that needs the extension, on a GPU machine where none is built (a fresh one, nothing
  # carried) or the sources changed since: build first, unless told not to.
  if [ "$DEVICE" = cuda ] && [ "$DRY_RUN" != 1 ] && [ "${SKIP_BUILD:-auto}" != 1 ] &&
    ! printf '%s\n' "${RUN[@]}" | grep -qx build && have_gpu; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    if ! build_is_current; then
      echo "no current CUDA build here (build/gpu_check.stamp): the build stage runs first"
      RUN=(build "${RUN[@]}")
    fi
  fi

  RESULTS="${2:-${OUT:-$ROOT/gpu_results}}"
  mkdir -p "$RESULTS" || exit 2
  RESULTS="$(cd "$RESULTS" && pwd)"
  STATUS="$RESULTS/status.txt"
  LOG="$RESULTS/gpu_check.log"
  FAILED=0
  T0=$SECONDS

  {
    echo "gpu_check $(IFS=+; echo "${RUN[*]}") on ${HOSTNAME:-?} at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    commit="${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    echo "commit $commit; device $DEVICE$([ "$DEVICE" = cpu ] && echo ' (cpu mode: not a GPU run)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
      echo "no nvidia-smi"
  } | tee -a "$STATUS" | tee -a "$LOG"

  for s in "${RUN[@]}"; do
    "stage_$s" || true
  done

  echo
  echo "==== steps ($((SECONDS - T0)) s in all; results in $RESULTS)"
  cat "$STATUS"
  if [ -f "$RESULTS/summary.txt" ] && printf '%s\n' "${RUN[@]}" | grep -qx bench; then
    echo
    echo "==== benchmark (median of single calls, CUDA events; speedup = torch eager / torchmatgrad)"
    sed '/^for benchmarks\/RESULTS.md:/,$d' "$RESULTS/summary.txt"
  fi
  exit "$FAILED"
}

# Sourced (tests/test_gpu_scripts.py calls single functions), nothing runs.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
