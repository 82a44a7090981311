#!/usr/bin/env bash
# GPU check of the Triton kernel: the CUDA test suite (compiled kernels, no interpreter) and
# the benchmark.  Run from anywhere on a machine with an NVIDIA GPU:
#     bash kernels/device_check.sh [all|tests|bench]     # default: all
# Writes $OUT/{env.txt,tests.txt,bench.md,log.txt} ($OUT defaults to a fresh temp dir).
# Uses `python` from PATH if it imports torch and triton; otherwise creates .venv and installs
# requirements.txt.  Exits non-zero if a test fails, the bench fails, or CUDA is missing; the
# bench runs (and its table is kept) even when a test fails.  Expected: tests ~2-5 min
# (mostly Triton compilation), bench under ~4 min (BENCH_TIMEOUT, default 600 s, caps it).
set -uo pipefail

WHAT="${1:-all}"
case "$WHAT" in all|tests|bench) ;; *) echo "usage: $0 [all|tests|bench]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t device_check.XXXXXX)}"
mkdir -p "$OUT"
log() { echo "[device_check] $*" | tee -a "$OUT/log.txt"; }
log "outputs in $OUT"

PY=python
if ! "$PY" -c "import torch, triton" >/dev/null 2>&1; then
    log "torch/triton not importable with '$PY'; creating .venv from requirements.txt"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv || { log "venv creation failed"; exit 2; }
    fi
    .venv/bin/python -m pip install -q -r requirements.txt >>"$OUT/log.txt" 2>&1 \
        || { log "pip install failed (see $OUT/log.txt)"; exit 2; }
    PY=.venv/bin/python
fi

# the GPU path must not run in the interpreter
unset TRITON_INTERPRET

"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
EOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "CUDA not available: nothing to check on this machine"
    exit 3
fi

test_rc=0
if [ "$WHAT" != bench ]; then
    log "pytest tests/test_kernels.py"
    start=$(date +%s)
    "$PY" -m pytest -q -rs tests/test_kernels.py >"$OUT/tests.txt" 2>&1
    test_rc=$?
    log "tests rc=$test_rc in $(( $(date +%s) - start ))s: $(tail -n 1 "$OUT/tests.txt")"
fi

bench_rc=0
if [ "$WHAT" != tests ]; then
    log "python -m kernels.bench"
    start=$(date +%s)
    timeout "${BENCH_TIMEOUT:-600}" "$PY" -m kernels.bench >"$OUT/bench.md" 2>"$OUT/bench_stderr.txt"
    bench_rc=$?
    log "bench rc=$bench_rc in $(( $(date +%s) - start ))s"
    cat "$OUT/bench.md"
fi

[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
