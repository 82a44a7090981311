"""Topology-preserving loss L_TP: PyTorch reference + fused Triton kernel.

Public API: `topology_loss(f_std, f_adv, reduction="sum", impl="auto")`.
This package knows nothing of common.py.
"""
import os

from .reference import topology_loss_reference

IMPLS = ("auto", "torch", "triton")


def triton_available(device_type):
    """The Triton kernel runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests)."""
    try:
        from . import fused  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def topology_loss(f_std, f_adv, reduction="sum", impl="auto"):
    """L_TP between standard features f_std (N x D, detached) and adversarial features f_adv.

    impl: "torch" = kernels/reference.py; "triton" = the fused kernel; "auto" = the kernel
    on CUDA when it imports, the reference otherwise.
    """
    if impl not in IMPLS:
        raise ValueError(f"topology_loss: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if (f_adv.is_cuda and triton_available("cuda")) else "torch"
    if impl == "torch":
        return topology_loss_reference(f_std, f_adv, reduction)
    if not triton_available(f_adv.device.type):
        raise RuntimeError("topology_loss: impl='triton' needs triton and a CUDA tensor "
                           "(or TRITON_INTERPRET=1 on the CPU)")
    from .fused import topology_loss_triton
    return topology_loss_triton(f_std, f_adv, reduction)
