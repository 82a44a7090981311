"""Benchmark of L_TP forward + backward: eager reference, torch.compile'd reference, fused
Triton kernel with ieee and with tf32 dot products.

    python -m kernels.bench [--n 128 512 ...] [--d 512 640] [--quick] [--budget-s 220]

Prints a markdown table (not a test) and, on CUDA, a line "suggested CROSSOVER_N = ..." for
kernels/__init__.py: the smallest measured N from which the fused kernel (default precision)
beats the eager reference for every D, at that N and every larger one measured.

On CUDA: the median ms of 3-100 calls timed one by one with CUDA events (about 200 ms per
case after two untimed calls, the first of which compiles), and the peak memory allocated
beyond the inputs (torch.cuda.max_memory_allocated minus the baseline).  Cases whose N x N
temporaries cannot fit are reported as OOM without running; cases predicted to overrun the
time budget (from the same column at the previous N, cost ~ N^2) or started after it are
reported as skipped.  Without CUDA the kernel runs in Triton's interpreter: those numbers
only show that the script works, they are not a speed measurement.
"""
import argparse
import datetime
import os
import platform
import statistics
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module imports triton

import triton  # noqa: E402

from .reference import topology_loss_reference  # noqa: E402
from . import fused  # noqa: E402

NS, DS = (128, 512, 1024, 2048, 8192, 65536), (512, 640)
QUICK_NS, QUICK_DS = (128, 1024, 8192), (512,)
CPU_NS = (128, 512)          # defaults without CUDA
CPU_MAX_N_REFERENCE = 2048   # the CPU reference beyond this takes too long
CPU_MAX_N_INTERPRETER = 512  # the interpreter beyond this takes minutes
NN_TEMPORARIES = 16          # ~ N x N fp32 matrices the reference keeps alive (forward + backward)
TARGET_MS = 200              # timed calls per case: about this long, 3 to 100 of them
CALLS_PER_CASE = 6           # 2 untimed + 1 estimate + >= 3 timed: for the budget prediction
COLUMNS = ("eager", "compile", "fused ieee", "fused tf32")


def fwd_bwd(fn, f_std, f_adv):
    return torch.autograd.grad(fn(f_std, f_adv), f_adv)


def _fused(precision):
    return lambda f_std, f_adv: fused.topology_loss_triton(f_std, f_adv, precision=precision)


def cuda_time_ms(call):
    """Median of individually event-timed calls, as many as fit in ~TARGET_MS (3 to 100)."""
    def once():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    first = once()
    reps = max(3, min(100, int(TARGET_MS / max(first, 1e-3))))
    return statistics.median(once() for _ in range(reps))


def cuda_case(fn, f_std, f_adv, dense):
    """(ms, MiB) as numbers, or reason strings."""
    n = f_adv.shape[0]
    if dense:
        need = NN_TEMPORARIES * 4 * n * n
        if need > torch.cuda.mem_get_info()[0]:
            return f"OOM (skipped: ~{need / 2**30:.0f} GiB needed)", "OOM"
    try:
        fwd_bwd(fn, f_std, f_adv)  # compile / JIT outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, f_std, f_adv)
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        return cuda_time_ms(lambda: fwd_bwd(fn, f_std, f_adv)), mib
    except torch.cuda.OutOfMemoryError:
        return "OOM", "OOM"
    except Exception as e:  # e.g. a torch.compile failure: report it, keep benchmarking
        return f"error: {type(e).__name__}", "-"
    finally:
        torch.cuda.empty_cache()


def cpu_case(fn, f_std, f_adv, reps):
    fwd_bwd(fn, f_std, f_adv)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fwd_bwd(fn, f_std, f_adv)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), "n/a"


def suggest_crossover(results, ns, ds, column="fused ieee"):
    """Smallest N such that, at N and at every larger measured N, `column` has a time and
    beats the eager reference for every D (an eager OOM counts as a win).  None if none.

    results[(n, d)][name] = ms (float) or a reason string."""
    def wins(n):
        for d in ds:
            cell = results.get((n, d), {})
            mine, eager = cell.get(column), cell.get("eager")
            if not isinstance(mine, float):
                return False
            if isinstance(eager, float) and not mine < eager:
                return False
        return True
    best = None
    for n in sorted(ns, reverse=True):
        if not wins(n):
            break
        best = n
    return best


def grid_text(n):
    """The fused kernel's launch config at N (interpreter or CUDA), for the table."""
    cfg = fused._config(n, torch.device("cuda" if CUDA else "cpu"))
    return f"{cfg.block}: {triton.cdiv(n, cfg.block)}x{cfg.splits}"


def fmt(x, digits):
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


class Budget:
    """Skips a case started after the budget, or predicted (cost ~ N^2 from the same column
    at the previous N) to end after it."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds
        self.last = {}  # column -> (n, ms)

    def skip_reason(self, column, n):
        left = self.end - time.monotonic()
        if left <= 0:
            return "skipped (time budget)"
        if column in self.last:
            n0, ms = self.last[column]
            predicted = CALLS_PER_CASE * ms * (n / n0) ** 2 / 1e3
            if predicted > left:
                return f"skipped (~{predicted:.0f} s predicted, {left:.0f} s left)"
        return None

    def record(self, column, n, ms):
        if isinstance(ms, float):
            self.last[column] = (n, ms)


def cuda_row(n, d, f_std, f_adv, compiled, budget):
    fns = {"eager": (topology_loss_reference, True), "compile": (compiled, True),
           "fused ieee": (_fused("ieee"), False), "fused tf32": (_fused("tf32"), False)}
    row = {}
    for column, (fn, dense) in fns.items():
        reason = budget.skip_reason(column, n)
        ms, mib = (reason, "-") if reason else cuda_case(fn, f_std, f_adv, dense)
        budget.record(column, n, ms)
        row[column] = (ms, mib)
    return row


def cpu_row(n, f_std, f_adv):
    skip = ("skipped (CPU)", "n/a")
    eager = cpu_case(topology_loss_reference, f_std, f_adv, 5) if n <= CPU_MAX_N_REFERENCE else skip
    ieee = cpu_case(_fused("ieee"), f_std, f_adv, 3) if n <= CPU_MAX_N_INTERPRETER else skip
    return {"eager": eager, "compile": ("not run (CPU)", "n/a"), "fused ieee": ieee,
            "fused tf32": ("= ieee (interpreter)", "n/a")}


def header():
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU"
    name = torch.cuda.get_device_name() if CUDA else cpu
    print(f"# L_TP forward + backward, fp32\n\n"
          f"- device: {name}\n- torch {torch.__version__}, triton {triton.__version__}\n"
          f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    if CUDA:
        print("- median ms of 3-100 calls timed with CUDA events; MiB = peak memory allocated "
              "beyond the inputs; grid = fused tile size: column blocks x row splits\n")
    else:
        print("- **CPU / TRITON_INTERPRET — not a speed measurement**: the reference is eager PyTorch "
              "on the CPU (median of 5, time.perf_counter); the Triton kernel runs in the interpreter "
              "(median of 3), where tf32 computes as ieee; torch.compile not run; memory not measured\n")
    cols = " | ".join(f"{c} ms | {c} MiB" for c in COLUMNS)
    print(f"| N | D | grid | {cols} |")
    print("|---|---|---" + "|---" * 2 * len(COLUMNS) + "|")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", help="batch sizes N")
    parser.add_argument("--d", type=int, nargs="+", help="feature widths D")
    parser.add_argument("--quick", action="store_true", help=f"N {QUICK_NS}, D {QUICK_DS}")
    parser.add_argument("--budget-s", type=float, default=220,
                        help="CUDA: start no case after this many seconds (default 220)")
    args = parser.parse_args(argv)
    ns = args.n or (QUICK_NS if args.quick else NS if CUDA else CPU_NS)
    ds = args.d or (QUICK_DS if args.quick else DS)
    device = "cuda" if CUDA else "cpu"
    budget = Budget(args.budget_s)
    compiled = torch.compile(topology_loss_reference, dynamic=True) if CUDA else None
    header()
    results = {}
    for n in ns:
        for d in ds:
            g = torch.Generator().manual_seed(n + d)
            f_std = torch.randn(n, d, generator=g).to(device)
            f_adv = torch.randn(n, d, generator=g).to(device).requires_grad_()
            row = cuda_row(n, d, f_std, f_adv, compiled, budget) if CUDA else cpu_row(n, f_std, f_adv)
            results[(n, d)] = {c: ms for c, (ms, _) in row.items()}
            cells = " | ".join(f"{fmt(ms, 3 if CUDA else 1)} | {fmt(mib, 1)}" for ms, mib in row.values())
            print(f"| {n} | {d} | {grid_text(n)} | {cells} |", flush=True)
    print()
    if not CUDA:
        print("No crossover suggested: CPU / interpreter run.")
        return
    for column in ("fused ieee", "fused tf32"):
        cross = suggest_crossover(results, ns, ds, column)
        what = "CROSSOVER_N" if column == f"fused {fused.DEFAULT_PRECISION}" else f"crossover ({column})"
        if cross is None:
            print(f"suggested {what} = None  ({column} is not faster than eager for every D "
                  "at the largest N measured)")
        else:
            print(f"suggested {what} = {cross}  ({column} fwd+bwd faster than eager for every D "
                  f"at every measured N >= {cross})")


if __name__ == "__main__":
    main()
