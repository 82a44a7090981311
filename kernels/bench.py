"""Benchmark of L_TP forward + backward: eager reference, torch.compile'd reference, Triton kernel.

    python -m kernels.bench [--n 128 512 ...] [--d 512 640] [--quick]

Prints a markdown table (not a test).  On CUDA: median ms over triton.testing.do_bench and
the peak memory allocated beyond the inputs (torch.cuda.max_memory_allocated minus the
baseline); cases whose N x N temporaries cannot fit are reported as OOM without running.
Without CUDA the kernel runs in Triton's interpreter: those numbers only show that the
script works, they are not a speed measurement.
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
from .fused import topology_loss_triton  # noqa: E402

NS, DS = (128, 512, 2048, 8192, 65536), (512, 640)
QUICK_NS, QUICK_DS = (128, 2048), (512,)
CPU_NS = (128, 512)          # defaults without CUDA
CPU_MAX_N_REFERENCE = 2048   # the CPU reference beyond this takes too long
CPU_MAX_N_INTERPRETER = 512  # the interpreter beyond this takes minutes
NN_TEMPORARIES = 16          # ~ N x N fp32 matrices the reference keeps alive (forward + backward)


def fwd_bwd(fn, f_std, f_adv):
    return torch.autograd.grad(fn(f_std, f_adv), f_adv)


def cuda_case(fn, f_std, f_adv, dense):
    """(median ms, peak extra MiB) on CUDA, or a reason string for both."""
    n = f_adv.shape[0]
    if dense:
        need = NN_TEMPORARIES * 4 * n * n
        free = torch.cuda.mem_get_info()[0]
        if need > free:
            return f"OOM (skipped: ~{need / 2**30:.0f} GiB needed)", "OOM"
    try:
        fwd_bwd(fn, f_std, f_adv)  # compile / JIT outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, f_std, f_adv)
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(lambda: fwd_bwd(fn, f_std, f_adv), warmup=25, rep=100,
                                     return_mode="median")
        return f"{ms:.3f}", f"{mib:.1f}"
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
    return f"{1e3 * statistics.median(times):.1f}", "n/a"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", help="batch sizes N")
    parser.add_argument("--d", type=int, nargs="+", help="feature widths D")
    parser.add_argument("--quick", action="store_true", help=f"N {QUICK_NS}, D {QUICK_DS}")
    args = parser.parse_args()
    ns = args.n or (QUICK_NS if args.quick else NS if CUDA else CPU_NS)
    ds = args.d or (QUICK_DS if args.quick else DS)
    device = "cuda" if CUDA else "cpu"

    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU"
    name = torch.cuda.get_device_name() if CUDA else cpu
    print(f"# L_TP forward + backward, fp32\n\n"
          f"- device: {name}\n- torch {torch.__version__}, triton {triton.__version__}\n"
          f"- date: {datetime.date.today().isoformat()}")
    if CUDA:
        print("- median ms (triton.testing.do_bench); MiB = peak memory allocated beyond the inputs\n")
        compiled = torch.compile(topology_loss_reference, dynamic=True)
    else:
        print("- **CPU / TRITON_INTERPRET — not a speed measurement**: the reference is eager PyTorch "
              "on the CPU (median of 5, time.perf_counter); the Triton kernel runs in the interpreter "
              "(median of 3); torch.compile not run; memory not measured\n")
    print("| N | D | eager ms | eager MiB | compile ms | compile MiB | Triton ms | Triton MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for n in ns:
        for d in ds:
            g = torch.Generator().manual_seed(n + d)
            f_std = torch.randn(n, d, generator=g).to(device)
            f_adv = torch.randn(n, d, generator=g).to(device).requires_grad_()
            if CUDA:
                cells = (cuda_case(topology_loss_reference, f_std, f_adv, dense=True)
                         + cuda_case(compiled, f_std, f_adv, dense=True)
                         + cuda_case(topology_loss_triton, f_std, f_adv, dense=False))
            else:
                skip = ("skipped (CPU)", "n/a")
                ref_ok, interp_ok = n <= CPU_MAX_N_REFERENCE, n <= CPU_MAX_N_INTERPRETER
                cells = ((cpu_case(topology_loss_reference, f_std, f_adv, 5) if ref_ok else skip)
                         + ("not run (CPU)", "n/a")
                         + (cpu_case(topology_loss_triton, f_std, f_adv, 3) if interp_ok else skip))
            print(f"| {n} | {d} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
