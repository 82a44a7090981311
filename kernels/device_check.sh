#!/usr/bin/env bash
# GPU check of the Triton kernel only: the CUDA test suite (compiled kernels, no interpreter)
# and the benchmark.  A thin wrapper around the repository's gpu_check.sh (which also runs the
# training time study); run from anywhere on a machine with an NVIDIA GPU:
#     bash kernels/device_check.sh [all|tests|bench]     # default: all
# Writes $OUT/{gpu_report.md,env.txt,tests.txt,bench.md,log.txt} ($OUT defaults to a fresh
# temp dir).  Exits 0 if all passed, 1 if a test or the bench failed, 2 on a usage or
# environment error, 3 without CUDA; the bench runs (and its table is kept) even when a test
# fails.  Longer limits than gpu_check.sh's defaults: TESTS_TIMEOUT and BENCH_TIMEOUT
# default to 600 s each (expected: tests ~2-5 min, mostly Triton compilation; bench ~4 min).
set -uo pipefail

case "${1:-all}" in
    all) steps=(tests bench) ;;
    tests|bench) steps=("$1") ;;
    *) echo "usage: $0 [all|tests|bench]" >&2; exit 2 ;;
esac
TESTS_TIMEOUT="${TESTS_TIMEOUT:-600}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-600}" \
    exec bash "$(dirname "$0")/../gpu_check.sh" "${steps[@]}"
