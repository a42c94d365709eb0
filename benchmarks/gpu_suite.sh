#!/usr/bin/env bash
# The GPU session's one command (see benchmarks/gpu_check.py's docstring for the steps and options):
#     OUT=/path/to/output benchmarks/gpu_suite.sh [--steps correct,headline] [--budget-s 420]
# Writes every row to "$OUT" as it is measured (only that folder comes back from a lent machine) and
# prints a summary of at most 40 lines last. Before the device call, here: `python -m
# benchmarks.cuda_direct --prebuild` (carry .gpu_prebuilt/) and a dry run (`--dry-run`). The commit
# is taken from git here and travels as FASTLM_COMMIT (the GPU copy has no .git); a copy without git
# and without FASTLM_COMMIT records a hash of the sources instead.
set -u
cd "$(dirname "$0")/.." || exit 1
if [ -z "${OUT:-}" ]; then
    echo "error: set OUT to the output folder (on a lent GPU machine: the \$OUT it provides)" >&2
    exit 2
fi
FASTLM_COMMIT="${FASTLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" \
    exec python3 -m benchmarks.gpu_check --out "$OUT" --budget-s 420 "$@"
