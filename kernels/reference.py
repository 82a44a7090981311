"""PyTorch reference of the topology-preserving loss L_TP (Mi et al., Eqs. 8-14).

This file is the single source of truth for the formula: the Triton kernel
(kernels/fused.py) and every test are checked against it.

For features X (N x D) a neighbour graph is built, P from the standard model M's
features f_std and Q from the adversarial model M''s features f_adv:

    x_i  <- x_i / max(||x_i||, 1e-8)
    d_ij  = 1 - cos(x_i, x_j)                       (in [0, 2])
    rho_j = min_{k != j} d_jk                        (distance of j to its nearest other sample)
    p_{i|j} = (2 - d_ij + rho_j) / sum_{k != j} (2 - d_kj + rho_j)      for i != j

Each column j is a probability distribution over the other samples.  Note: the paper's
Eq. 10 prints the denominator as sum_k (2 - d~_jk) with rho of the wrong index (rho_k
would make the columns not sum to 1); we use the normalised reading above, where the same
rho_j appears in numerator and denominator.

    L_TP = sum_{i != j} [ p log(p/q) + (1-p) log((1-p)/(1-q)) ]      (Eq. 14)

computed with xlogy so 0 * log 0 = 0, and with q clamped to [1e-12, 1 - 1e-12]; the
clamp is applied as log(max(q, 1e-12)) and log(max(1 - q, 1e-12)) so that it also
holds in float32, where 1 - 1e-12 rounds to 1.  The diagonal never enters.
reduction="sum" is Eq. 14 as printed; "mean" divides by N.
"""
import torch

EPS_NORM = 1e-8   # row-norm floor: a zero feature vector stays zero instead of NaN
EPS_PROB = 1e-12  # clamp of q and 1 - q inside the logs


def check_inputs(f_std, f_adv, reduction):
    """Shared argument checks of every implementation (clear errors, no tracebacks deep inside)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"topology_loss: reduction must be 'sum' or 'mean', got {reduction!r}")
    if f_std.dim() != 2 or f_adv.dim() != 2:
        raise ValueError("topology_loss: features must be 2-D (N x D), got shapes "
                         f"{tuple(f_std.shape)} and {tuple(f_adv.shape)}")
    if f_std.shape[0] != f_adv.shape[0]:
        raise ValueError("topology_loss: f_std and f_adv must have the same number of rows, got "
                         f"{f_std.shape[0]} and {f_adv.shape[0]}")
    if f_adv.shape[0] < 2:
        raise ValueError(f"topology_loss: needs at least 2 samples (got N={f_adv.shape[0]}); "
                         "drop the last incomplete batch")


def neighbour_graph(x):
    """Column-stochastic neighbour graph P (N x N, zero diagonal) of features x (N x D)."""
    n = x.shape[0]
    x = x / x.norm(dim=1, keepdim=True).clamp_min(EPS_NORM)
    d = 1.0 - x @ x.t()
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    rho = d.masked_fill(eye, float("inf")).min(dim=0).values       # rho_j, gradient to the arg-min
    w = (2.0 - d + rho[None, :]).masked_fill(eye, 0.0)             # w_ij = 2 - d_ij + rho_j
    return w / w.sum(dim=0, keepdim=True), eye


def topology_loss_reference(f_std, f_adv, reduction="sum"):
    """L_TP(f_std, f_adv) -> 0-dim tensor; differentiable in f_adv only (f_std is detached).

    Computed in float32, or float64 when the input is float64.
    """
    check_inputs(f_std, f_adv, reduction)
    dtype = torch.float64 if f_adv.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        p, eye = neighbour_graph(f_std.detach().to(dtype))
    q, _ = neighbour_graph(f_adv.to(dtype))
    log_q = q.clamp_min(EPS_PROB).log()
    log_1mq = (1.0 - q).clamp_min(EPS_PROB).log()
    terms = (torch.xlogy(p, p) - p * log_q
             + torch.xlogy(1.0 - p, 1.0 - p) - (1.0 - p) * log_1mq)
    loss = terms.masked_fill(eye, 0.0).sum()
    return loss / p.shape[0] if reduction == "mean" else loss
