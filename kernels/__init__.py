"""Topology-preserving loss L_TP: PyTorch reference + fused Triton kernel.

Public API: `topology_loss(f_std, f_adv, reduction="sum", impl="auto", precision=None)`.
This package knows nothing of common.py.
"""
import os

from .reference import topology_loss_reference

IMPLS = ("auto", "torch", "triton")

# Batch size N from which impl="auto" runs the fused kernel on CUDA (below it: the eager
# reference, whose few big cuBLAS calls win while the kernel cannot fill the GPU).
# None = not measured yet: auto always uses the reference.  The number comes from the line
# "suggested CROSSOVER_N = ..." that `python -m kernels.bench` prints on a GPU (BENCH.md).
CROSSOVER_N = None


def triton_available(device_type):
    """The Triton kernel runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests)."""
    try:
        from . import fused  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def choose_impl(impl, n, device_type):
    """"torch" or "triton" for N rows on device_type; explicit choices pass through."""
    if impl not in IMPLS:
        raise ValueError(f"topology_loss: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    fused = (CROSSOVER_N is not None and n >= CROSSOVER_N
             and device_type == "cuda" and triton_available("cuda"))
    return "triton" if fused else "torch"


def topology_loss(f_std, f_adv, reduction="sum", impl="auto", precision=None):
    """L_TP between standard features f_std (N x D, detached) and adversarial features f_adv.

    impl: "torch" = kernels/reference.py; "triton" = the fused kernel; "auto" = the kernel on
    CUDA for N >= CROSSOVER_N, the reference otherwise (always, while CROSSOVER_N is None).
    precision: the kernel's dot precision, "ieee" or "tf32" (None = kernels.fused's
    DEFAULT_PRECISION); the reference ignores it.
    """
    impl = choose_impl(impl, f_adv.shape[0] if f_adv.dim() else 0, f_adv.device.type)
    if impl == "torch":
        return topology_loss_reference(f_std, f_adv, reduction)
    if not triton_available(f_adv.device.type):
        raise RuntimeError("topology_loss: impl='triton' needs triton and a CUDA tensor "
                           "(or TRITON_INTERPRET=1 on the CPU)")
    from .fused import topology_loss_triton
    return topology_loss_triton(f_std, f_adv, reduction, precision)
