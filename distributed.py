"""Multi-GPU training under torchrun (--ddp): the process group, each rank's shard of the global batch,
the global gather of L_TP, collective decisions (stop, finiteness, errors) and the DDP wrap.

A small module of its own, beside common.py (DESIGN.md: small modules where common.py would lose
clarity): common.py calls these functions at a few fixed points of run(), train() and train_step();
without --ddp every one of them is a no-op or the identity, so the single-process path is unchanged.

    torchrun --nproc_per_node G exp_cifar10.py ... --ddp

How a --ddp run stays the run of one process with the same --batch-size (the global batch):
- every rank builds the same epoch plan (common.epoch_plan) and takes the contiguous slice
  [r B/G, (r+1) B/G) of every global batch (shard);
- per-sample means (CE, TRADES' batchmean KL, MART, ALP, LBGAT) are means over B/G on each rank and DDP
  averages the gradients over the G ranks: the global-batch mean;
- L_TP (and RKD) with --tp-scope global: f and f' are gathered from every rank in rank order
  (gather_rows, differentiable) and every rank computes the same loss on the global batch. The
  backward of the all-gather sums the G identical copies of dL/df' (a reduce-scatter SUM), DDP divides
  by G: the gradient of the single-process loss (tests/test_ddp.py checks it). --tp-scope local: each
  rank's graph on its own B/G samples, a coarser graph (and with the default sum reduction ~G times
  smaller).
- BatchNorm buffers are averaged over the ranks after every step (sync_buffers): the ranks hold the
  same model at every step boundary (the attack, the monitoring, checkpoints and resume see one
  model) and running means equal those of the global batch. Train-mode BatchNorm still normalises each
  rank's B/G samples unless --sync-bn (SyncBatchNorm, CUDA only): without it a BatchNorm model's results
  depend on G a little, as with any DDP run.
- the attacks' random starts come from a per-step, per-rank seed (seed_step): the ranks draw
  independent noise and a resumed run replays it; a --ddp run is therefore not bitwise the same as a
  plain run, only equal in distribution (with a deterministic attack it is the same run, up to float
  rounding).
Rank 0 alone writes the run folder (lock, config.json, log.txt, metrics.jsonl, checkpoints) and
prints; every rank runs the monitoring evaluation (identical models, same seed: same numbers, no
waiting at a barrier). Checkpoints hold the bare modules' state_dicts: they load in a plain run.
"""
import contextlib
import os
import pickle
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Settings of this launch rather than of the run: a --resume has them off unless given again (so a run
# started under torchrun can continue in one process, and the other way round).
LAUNCH_SETTINGS = ("ddp", "sync_bn")
_control = None  # a gloo group for small host-side decisions (the stop flag, errors) next to NCCL


def launched():
    """Started by torchrun (or another launcher that sets its environment)?"""
    return all(k in os.environ for k in TORCHRUN_ENV)


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's rank: of the open process group, else torchrun's RANK, else 0."""
    if active():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size():
    if active():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main():
    """Rank 0: the process that writes the run folder and prints."""
    return rank() == 0


def setting_problem(cfg):
    """What makes the --ddp settings unrunnable here (runs.validate raises it as a UserError), or None."""
    g = world_size()
    if not cfg.ddp:
        if g > 1:
            return (f"started by torchrun with {g} processes but without --ddp (each would train the whole run "
                    "alone); add --ddp")
        if cfg.sync_bn:
            return "--sync-bn needs --ddp"
        return None
    if not launched():
        return ("--ddp needs torchrun's environment (RANK, WORLD_SIZE, ...): start it with "
                "torchrun --nproc_per_node G <script> ... --ddp")
    if cfg.batch_size % g:
        return f"--batch-size {cfg.batch_size} is the global batch: it must be divisible by the {g} processes"
    if cfg.train and cfg.tp_scope == "local" and cfg.batch_size // g < 2:
        return f"--tp-scope local needs >= 2 samples per process (--batch-size {cfg.batch_size}, {g} processes)"
    if cfg.awp:
        return "--awp is not built for --ddp (its proxy step is per process); train AWP runs in one process"
    if cfg.device.startswith("cuda:"):
        return "--ddp takes each process's GPU from torchrun's LOCAL_RANK: pass --device cuda, not a numbered GPU"
    if cfg.sync_bn and not cfg.device.startswith("cuda"):
        return "--sync-bn needs --device cuda (PyTorch's SyncBatchNorm runs on GPUs only)"
    return None


@contextlib.contextmanager
def process_group(cfg):
    """--ddp: the process group of torchrun's processes (NCCL on CUDA, gloo on the CPU), this process's
    GPU = LOCAL_RANK; closed on the way out (after a barrier when all went well). Without --ddp: nothing."""
    global _control
    if not cfg.ddp:
        yield
        return
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # so --device cuda means this rank's GPU
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        _control = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        _control = dist.group.WORLD
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            dist.barrier(group=_control)
        _control = None
        dist.destroy_process_group()


def main_decides(fn):
    """Run fn() on rank 0 alone (e.g. lock and check the run folder) and give every rank its result;
    when fn raises, every rank raises the same exception (no rank is left waiting in a collective)."""
    if not active():
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            try:
                pickle.dumps(e)
                box[0] = ("raise", e)
            except Exception:  # an exception that cannot travel: the other ranks get its text
                box[0] = ("raise", RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
            dist.broadcast_object_list(box, src=0, group=_control)
            raise
    dist.broadcast_object_list(box, src=0, group=_control)
    kind, value = box[0]
    if kind == "raise":
        raise value
    return value


def quiet(_msg):
    """The log of ranks other than 0."""


def bar_disable():
    """tqdm's `disable`: rank 0 shows bars (on a terminal), the other ranks never do."""
    return None if is_main() else True


def stderr(text):
    """Messages main() prints; rank 0 alone speaks (every rank raised the same error)."""
    if is_main():
        sys.stderr.write(text)


# ------------------------------------------------------------------------------------- one training step
def shard(idx):
    """This rank's contiguous slice of a global batch's indices."""
    if not active():
        return idx
    n = len(idx) // world_size()
    return idx[rank() * n:(rank() + 1) * n]


def seed_step(cfg, epoch, step):
    """--ddp: torch's RNG (the attacks' random starts) from (seed, epoch, step, rank): independent noise on
    every rank, and a resumed run draws what the uninterrupted one did."""
    if active():
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, step, rank()]).generate_state(1, np.uint64)[0]))


def gather_rows(t):
    """Concatenate every rank's t along dim 0 in rank order, differentiably: the backward hands each rank
    the sum over ranks of the gradient of its rows (reduce-scatter SUM). torch.distributed.nn.functional's
    all_gather is deprecated in this PyTorch in favour of this functional collective."""
    from torch.distributed._functional_collectives import all_gather_single
    return all_gather_single(t.contiguous(), 0, dist.group.WORLD)


def relation_gather(cfg):
    """The gather StepState.gather applies to a relation loss's features: gather_rows for --tp-scope global
    under --ddp with G > 1, else None (the loss sees this process's batch)."""
    if cfg.ddp and cfg.tp_scope == "global" and active() and world_size() > 1:
        return gather_rows
    return None


def mean_over_ranks(sums):
    """{name: 0-dim tensor} -> the mean over ranks of each (one all-reduce); the identity without --ddp."""
    if not active() or not sums:
        return sums
    keys = list(sums)
    v = torch.stack([sums[k] for k in keys])
    dist.all_reduce(v)
    return dict(zip(keys, (v / world_size()).unbind()))


def norms_over_ranks(n_a, n_b, dot):
    """Two gradient norms and their dot product over the global batch from each rank's part (sums of squares and
    of dot products, one all-reduce): every rank gets the same numbers (--lam share:S: one lambda on every rank).
    Each rank's gradients on its rows are G times the single-process ones for L_TP and the per-sample means
    alike, so ratios and cosines equal the single-process run's. The identity without --ddp."""
    if not active() or world_size() == 1:
        return n_a, n_b, dot
    v = torch.stack([n_a * n_a, n_b * n_b, dot])
    dist.all_reduce(v)
    return v[0].sqrt(), v[1].sqrt(), v[2]


def any_rank(flag):
    """True on every rank when flag is True on any (a Ctrl-C / SIGTERM reached one of them): the ranks stop
    at the same step. A host-side all-reduce on the gloo group: no wait for the GPU."""
    if not active():
        return flag
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def sync_buffers(models, cfg):
    """After each step: average the trained models' floating buffers (BatchNorm running statistics) over
    the ranks, so every rank holds the same model at step boundaries. Not needed with --sync-bn (the
    statistics are global already); a frozen M never changes its buffers."""
    if not active() or cfg.sync_bn or world_size() == 1:
        return
    bufs = [b for k, m in models.trained().items() for b in m.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def wrap(models, cfg):
    """--ddp: SyncBatchNorm (--sync-bn), then DistributedDataParallel around each trained model; the loss
    forwards of train_step go through the wrappers (models.ddp), attacks and evaluation use the bare
    modules (no DDP hooks, no collectives) and checkpoints save the bare modules (keys unchanged).
    forward_sync_buffers=False (was broadcast_buffers=False; buffers are still synced once, at the wrap):
    DDP's per-forward buffer broadcast between the two train-mode forwards of M'
    (x and x') modifies BatchNorm buffers in place that cuDNN saved for the backward (PyTorch's known
    "modified by an inplace operation" error); sync_buffers averages them once per step instead.
    find_unused_parameters=False: every trained parameter gets a gradient in every step; the attack's
    forwards run on the bare module with its parameters frozen (common.eval_mode), so several forwards
    before one backward never fire DDP's hooks twice."""
    if not active():
        return models
    from torch.nn.parallel import DistributedDataParallel as DDP
    cuda = next(models.adv.parameters()).is_cuda
    models.ddp = {}
    for k, m in models.trained().items():
        if cfg.sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(m)  # in place below the root: same Parameters, same keys
        models.ddp[k] = DDP(m, device_ids=[torch.cuda.current_device()] if cuda else None,
                            forward_sync_buffers=False, find_unused_parameters=False)
    return models


def describe(cfg):
    """One log line on how the run is spread over the ranks."""
    g = world_size()
    return (f"DDP: {g} processes ({dist.get_backend()}), global batch {cfg.batch_size} = {g} x {cfg.batch_size // g}, "
            f"tp-scope {cfg.tp_scope}, sync-bn {'on' if cfg.sync_bn else 'off'}")
