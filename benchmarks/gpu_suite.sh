#!/usr/bin/env bash
# Thin wrapper kept for old instructions: the GPU run is now one Python script with a hard budget,
#     python -m benchmarks.gpu_check --out DIR [--budget-s 420] [--steps env,headline] [--dry-run]
# (see its docstring). OUT (default out/gpu_check) and extra arguments are passed through.
set -u
cd "$(dirname "$0")/.." || exit 1
exec python3 -m benchmarks.gpu_check --out "${OUT:-out/gpu_check}" "$@"
