#!/usr/bin/env bash
# GPU check in one command, for a machine with an NVIDIA GPU (under 8 minutes with the defaults):
#     bash gpu_check.sh [tests] [bench] [study] [ddp]  # default: tests bench study, in this order
#   tests  pytest tests/test_kernels.py, compiled kernels (no interpreter)
#   bench  python -m kernels.bench (eager / torch.compile / fused ieee / fused tf32)
#   study  the training time study, fast path off, then the same with --fast
#   ddp    (only when asked) the quick time study under torchrun --ddp --sync-bn on every visible GPU
#          (NCCL; with one GPU a 1-process smoke test of the path, not a multi-GPU measurement)
# Writes $OUT/gpu_report.md (GPU, date, versions, every step's command, exit status, time and
# output) plus each step's full output ($OUT defaults to a fresh temp dir, printed first).
# A failing or timed-out step is recorded and the next one still runs; each step runs under
# `timeout` (TESTS_TIMEOUT=160, BENCH_TIMEOUT=150, STUDY_TIMEOUT=70 per run, in seconds).
# Python: $PYTHON, else `python` from PATH if it imports torch and triton, else .venv (made
# from requirements.txt if needed).
# Exit: 0 all steps passed, 1 a step failed, 2 usage or environment error, 3 no CUDA.
set -uo pipefail

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests bench study)
for s in "${STEPS[@]}"; do
    case "$s" in tests|bench|study|ddp) ;; *) echo "usage: $0 [tests] [bench] [study] [ddp]" >&2; exit 2 ;; esac
done
cd "$(dirname "$0")" || exit 2
OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT" || exit 2
REPORT="$OUT/gpu_report.md"
T0=$(date +%s)
log() { echo "[gpu_check] $*" | tee -a "$OUT/log.txt"; }
log "outputs in $OUT"

imports() { "$1" -c "import torch, triton" >/dev/null 2>&1; }

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        imports "$PYTHON" && { PY="$PYTHON"; return 0; }
        log "PYTHON=$PYTHON does not import torch and triton"; return 1
    fi
    for p in python python3 .venv/bin/python; do
        if command -v "$p" >/dev/null 2>&1 && imports "$p"; then PY="$p"; return 0; fi
    done
    log "no python imports torch and triton; creating .venv from requirements.txt"
    [ -x .venv/bin/python ] || python3 -m venv .venv >>"$OUT/log.txt" 2>&1 \
        || { log "venv creation failed (see $OUT/log.txt)"; return 1; }
    .venv/bin/python -m pip install -q -r requirements.txt >>"$OUT/log.txt" 2>&1 \
        || { log "pip install failed (see $OUT/log.txt)"; return 1; }
    PY=.venv/bin/python
}

fence() {  # the last $2 lines of file $1 as a code block (whole outputs stay in $OUT)
    local lines; lines=$(wc -l <"$1")
    [ "$lines" -gt "$2" ] && echo "(last $2 of $lines lines; all in $(basename "$1"))"
    echo '```'; tail -n "$2" "$1"; echo '```'
}

PY=""
pick_python || exit 2
log "python: $PY"
# the GPU path must not run in the interpreter
unset TRITON_INTERPRET

"$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import platform, torch, triton
print("- GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE (CUDA not available)")
print("- torch", torch.__version__, "| CUDA", torch.version.cuda, "| triton", triton.__version__,
      "| python", platform.python_version())
EOF
{
    echo "# GPU check ($(date -Is))"
    echo
    cat "$OUT/env.txt"
    echo "- host: $(hostname), $(getconf _NPROCESSORS_ONLN) CPUs; git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
    echo "- steps: ${STEPS[*]}"
    echo
} >"$REPORT"
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "CUDA not available: nothing to check on this machine (exit 3)"
    echo "**CUDA not available: no step ran.**" >>"$REPORT"
    exit 3
fi

FAILED=()
run_step() {  # run_step TITLE FILE TIMEOUT CMD...: run under timeout, record in the report
    local title="$1" file="$2" limit="$3"; shift 3
    log "$title: $* (timeout ${limit}s)"
    local start rc status; start=$(date +%s)
    local err="$OUT/$file"  # a markdown output (the bench table) keeps its stderr apart
    [ "${file%.md}" != "$file" ] && err="$OUT/${file%.md}_stderr.txt"
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$file" 2>>"$err"
    rc=$?
    local took=$(( $(date +%s) - start ))
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${limit}s (rc $rc)"; FAILED+=("$title") ;;
        *) status="FAILED (rc $rc)"; FAILED+=("$title") ;;
    esac
    log "$title: $status in ${took}s"
    {
        echo "## $title"
        echo
        echo "\`$*\` — **$status**, ${took}s"
        echo
        if [ "$err" = "$OUT/$file" ]; then
            fence "$OUT/$file" 150
        else
            cat "$OUT/$file"
            [ -s "$err" ] && { echo; echo "stderr:"; fence "$err" 40; }
        fi
        echo
    } >>"$REPORT"
}

STUDY=(exp_ablations.py --study time --arch wrn34_10 --std-arch resnet18 --batch-size 128
       --steps-only 10 --warmup 3)
BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"
BENCH_BUDGET=$(( BENCH_TIMEOUT > 70 ? BENCH_TIMEOUT - 40 : 30 ))  # the bench stops itself first
for s in "${STEPS[@]}"; do
    case "$s" in
        tests) run_step "Kernel tests (CUDA)" tests.txt "${TESTS_TIMEOUT:-160}" \
                   "$PY" -m pytest -q -rs --durations=10 tests/test_kernels.py ;;
        bench) run_step "Kernel bench" bench.md "$BENCH_TIMEOUT" \
                   "$PY" -m kernels.bench --budget-s "$BENCH_BUDGET" ;;
        study) run_step "Time study, fast path off" study_off.txt "${STUDY_TIMEOUT:-70}" \
                   "$PY" "${STUDY[@]}"
               run_step "Time study, --fast" study_fast.txt "${STUDY_TIMEOUT:-70}" \
                   "$PY" "${STUDY[@]}" --fast ;;
        ddp) G=$("$PY" -c "import torch; print(torch.cuda.device_count())")
             run_step "Time study, torchrun --ddp on $G GPU(s)" ddp.txt "${DDP_TIMEOUT:-120}" \
                 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$G" exp_ablations.py --study time \
                 --quick --ddp --sync-bn --device cuda --steps-only 5 --warmup 2 ;;
    esac
done

TOTAL=$(( $(date +%s) - T0 ))
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "**All steps passed** in ${TOTAL}s." >>"$REPORT"
    log "all steps passed in ${TOTAL}s; report: $REPORT"
    exit 0
fi
printf -v list '%s; ' "${FAILED[@]}"
echo "**Failed: ${list%; }** (total ${TOTAL}s)." >>"$REPORT"
log "failed: ${list%; } (total ${TOTAL}s); report: $REPORT"
exit 1
