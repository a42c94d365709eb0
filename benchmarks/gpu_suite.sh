#!/usr/bin/env bash
# The one script a GPU session runs on the device machine (from the repository root):
#
#     bash benchmarks/gpu_suite.sh                 # everything, inside ~9 minutes
#     bash benchmarks/gpu_suite.sh build info test # or split over two calls (the build stays
#     bash benchmarks/gpu_suite.sh bench report    #  installed between calls on a warm machine)
#
# Steps (each under `timeout`, each may fail without stopping the others; the rc table is printed
# at the end, followed by a short results table):
#   build   pip install --no-build-isolation --no-deps -e .      -> $OUT/build.log
#   info    python -m fastlm.info                                -> $OUT/info.log
#   test    pytest -q tests  (the whole test suite, with CUDA)   -> $OUT/test.log
#   bench   FASTLM_BENCH_RECORD=1 pytest benchmarks --benchmark-only, as two runs so that a slow
#           attention grid cannot starve the rest: swiglu/model/generate, then attention
#                                                                -> $OUT/bench_misc.log, $OUT/bench_attention.log
#           then copies benchmarks/results.jsonl to $OUT (and the rows this call added to
#           $OUT/results_new.jsonl: append that file to the repository's benchmarks/results.jsonl)
#   report  python -m benchmarks.report -> $OUT/REPORT.md, $OUT/plots/*.png, short table on stdout
#
# Time: the whole call stays inside FASTLM_SUITE_BUDGET seconds (default 530). Each step runs under
# `timeout min(cap, seconds left - reserve)`; caps (seconds, env to override): build 300
# (FASTLM_T_BUILD), info 30 (FASTLM_T_INFO), test 180 (FASTLM_T_TEST), bench: misc 120
# (FASTLM_T_BENCH_MISC) + attention 300 (FASTLM_T_BENCH_ATTN), report 60 (FASTLM_T_REPORT).
# Rows are appended as each benchmark finishes, so a benchmark run cut by its timeout keeps what it
# measured. FASTLM_BENCH_GRID=quick shrinks the attention grid (D=128, T in {1k, 4k, 16k}).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/out/gpu_suite}
mkdir -p "$OUT"
BUDGET=${FASTLM_SUITE_BUDGET:-530}
T0=$(date +%s)
RESERVE=25  # seconds kept back for the report and the summary

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build info test bench report)
for s in "${STEPS[@]}"; do
  case "$s" in build|info|test|bench|report) ;; *) echo "unknown step '$s' (build info test bench report)"; exit 2;; esac
done

RES=${FASTLM_BENCH_RESULTS:-benchmarks/results.jsonl}
SUMMARY=()
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# run_step NAME CAP LOG CMD...: run CMD under timeout min(CAP, time left - RESERVE), log to LOG
run_step() {
  local name=$1 cap=$2 log=$3; shift 3
  local lim; lim=$(( $(left) - RESERVE )); [ "$name" = report ] && lim=$(( $(left) ))
  [ "$lim" -gt "$cap" ] && lim=$cap
  if [ "$lim" -lt 5 ]; then
    SUMMARY+=("$(printf '%-16s %-8s %s' "$name" skipped "no time left in the ${BUDGET}s budget")")
    echo "== $name: skipped (no time left)"; return 0
  fi
  echo "== $name (timeout ${lim}s): $*"
  local t=$(date +%s)
  timeout -k 10 "$lim" "$@" > "$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  local what="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMEOUT($rc)"
  SUMMARY+=("$(printf '%-16s %-12s %5ss  %s' "$name" "$what" "$dt" "$log")")
  tail -n 4 "$log" | sed 's/^/   | /'
  return 0
}

has() { local s; for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

if has build; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # build only for this GPU: much faster than every arch
    arch=$(python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
    [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST="$arch"
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS FASTLM_CUDA=${FASTLM_CUDA:-auto}"
  run_step build "${FASTLM_T_BUILD:-300}" "$OUT/build.log" pip install --no-build-isolation --no-deps -e .
fi
if has info; then
  run_step info "${FASTLM_T_INFO:-30}" "$OUT/info.log" python -m fastlm.info
  cat "$OUT/info.log"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$OUT/info.log" 2>&1
fi
if has test; then
  run_step test "${FASTLM_T_TEST:-180}" "$OUT/test.log" python -m pytest -q -p no:cacheprovider tests
fi
if has bench; then
  before=$( [ -f "$RES" ] && wc -l < "$RES" || echo 0 )
  export FASTLM_BENCH_RECORD=1
  run_step bench-misc "${FASTLM_T_BENCH_MISC:-120}" "$OUT/bench_misc.log" \
    python -m pytest -p no:cacheprovider benchmarks/test_bench_swiglu.py benchmarks/test_bench_model.py \
    benchmarks/test_bench_generate.py --benchmark-only --benchmark-columns=median,rounds \
    --benchmark-json "$OUT/bench_misc.json"
  run_step bench-attention "${FASTLM_T_BENCH_ATTN:-300}" "$OUT/bench_attention.log" \
    python -m pytest -p no:cacheprovider benchmarks/test_bench_attention.py --benchmark-only \
    --benchmark-columns=median,rounds --benchmark-json "$OUT/bench_attention.json"
  if [ -f "$RES" ]; then
    cp "$RES" "$OUT/results.jsonl"
    tail -n +$((before + 1)) "$RES" > "$OUT/results_new.jsonl"
    echo "   | $(wc -l < "$OUT/results_new.jsonl") new result rows -> $OUT/results_new.jsonl"
  fi
fi
if has report; then
  dev=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')" 2>/dev/null)
  run_step report "${FASTLM_T_REPORT:-60}" "$OUT/report.log" \
    python -m benchmarks.report --results "$RES" --device "$dev" --out "$OUT/REPORT.md" --plots "$OUT/plots" --summary --short
fi

echo
echo "== steps (budget ${BUDGET}s, used $(( $(date +%s) - T0 ))s; logs in $OUT)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if has report && [ -f "$OUT/report.log" ]; then
  echo
  sed -n '/^## /,$p' "$OUT/report.log"
fi
