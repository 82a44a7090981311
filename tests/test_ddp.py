"""--ddp on the CPU: 2 processes on the gloo backend (torch.multiprocessing), against one process.

Each spawn costs seconds (two fresh interpreters import torch), so one spawn runs every in-process
check (steps_2x, the step and L_TP gradient checks) and one runs the three CLI runs of the resume test."""
import faulthandler
import json
import dataclasses
import os
import random
import shutil
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import common
import runs
import distributed
from conftest import DEFAULTS, refused, tiny_args

pytestmark = pytest.mark.slow  # separate processes (gloo)

DEADLINE_S = 240  # a hung collective fails the test instead of hanging the suite


def free_ports(n):
    """n free ports below the kernel's ephemeral range: a rank that waits for rank 0's store keeps connecting to
    the port, and a port inside that range can be handed to its own client socket (a TCP self-connect: a hang)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        low = int(fh.read().split()[0])
    ports = []
    while len(ports) < n:
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _entry(rank, fn, world, port, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(DEADLINE_S - 30, exit=True)  # a hang shows where it was, then ends
    fn(rank, *args)


def spawn(fn, *args, world=2):
    """fn(rank, *args) in `world` fresh processes with torchrun's environment; fails on any error or hang."""
    port = free_ports(1)[0]
    ctx = mp.start_processes(_entry, args=(fn, world, port, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + DEADLINE_S
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__}: the {world} processes did not finish in {DEADLINE_S} s")


# ------------------------------------------------------------------------------------- one step, L_TP gradient
class TinyNet(common.Classifier):
    """BatchNorm-free (train and eval mode are the same function): 2 convs, 16-d features."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.feature_dim = 16
        self.fc = nn.Linear(16, num_classes)

    def embed(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


def fixed_start_pgd(model, x, loss_fn, eps, step_size, steps, start="uniform"):
    """common.pgd with a start that is a function of the image (random starts differ between a process of
    128 images and two of 64): the attack itself stays a real multi-step PGD."""
    x = x.detach()
    x_adv = (x + eps * torch.sin(97.0 * x + 1.0)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(loss_fn(model(x_adv)), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def step_cfg(method, **kw):
    cfg = runs.make_config(dict(dataset="cifar10"), {"device": "cpu"})
    cfg.method, cfg.train, cfg.lam, cfg.arch, cfg.std_arch = (method, True, common.Lambda.parse("5"),
                                                              "tiny_test", "tiny_test")
    cfg.steps, cfg.eps, cfg.step_size, cfg.tp_impl, cfg.ddp, cfg.lr = 3, 8 / 255, 2 / 255, "torch", True, 0.05
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


STEP_CASES = {"at+train": step_cfg("at"), "trades+train": step_cfg("trades"),
              "trades+share": step_cfg("trades", lam=common.Lambda.parse("share:0.5"))}  # norms over the global batch


def batches():
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 128, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (2, 128), generator=g)


def two_steps(cfg):
    """Two train_steps of a fresh float64 model pair on the two batches (this process's shard under --ddp);
    -> the saved state_dicts. Two steps: DDP's second iteration is where a broken reduction shows."""
    torch.manual_seed(0)
    models = common.build_models(cfg, 4, torch.device("cpu"))
    opts = common.build_optimizers(models, cfg)
    distributed.wrap(models, cfg)
    xs, ys = batches()
    for x, y in zip(xs, ys):
        common.train_step(models, opts, distributed.shard(x), distributed.shard(y), cfg, epoch=1)
    return {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in models.saved().items()}


def tp_gradient(cfg):
    """L_TP (relation_tp, through relation_inputs) of a fresh float64 M' on 16 images, M frozen; -> (loss,
    {name: grad of M'}) after one backward (under --ddp: through DDP and, for --tp-scope global, the gather)."""
    torch.manual_seed(1)
    adv, std = TinyNet(), TinyNet()
    g = torch.Generator().manual_seed(4)
    x, x_adv = (torch.rand(16, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, 4, (16,), generator=g)
    net = adv
    if distributed.active():  # the fc layer gets no gradient from L_TP alone
        net = torch.nn.parallel.DistributedDataParallel(adv, forward_sync_buffers=False, find_unused_parameters=True)
    s = common.StepState(net, distributed.shard(x), distributed.shard(y), distributed.shard(x_adv), std,
                         std_trainable=False)
    s.gather = distributed.relation_gather(cfg)
    loss = common.relation_tp(s, cfg)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adv.named_parameters() if p.grad is not None}


def _use_test_net():
    common.MODELS["tiny_test"] = TinyNet
    torch.set_default_dtype(torch.float64)


def step_worker(rank, out):
    _use_test_net()
    common.pgd = fixed_start_pgd
    dist_cfg = runs.make_config(dict(dataset="cifar10"), {"device": "cpu", "ddp": True})
    with distributed.process_group(dist_cfg):
        res = {"steps": {name: two_steps(cfg) for name, cfg in STEP_CASES.items()},
               "tp": {scope: tp_gradient(step_cfg("at", tp_scope=scope)) for scope in ("global", "local")}}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The in-process checks run once on 2 gloo processes: {rank: results}."""
    out = str(tmp_path_factory.mktemp("ddp_steps"))
    spawn(step_worker, out)
    return {r: torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)}


@pytest.fixture
def single(monkeypatch):
    monkeypatch.setitem(common.MODELS, "tiny_test", TinyNet)
    monkeypatch.setattr(common, "pgd", fixed_start_pgd)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_two_ranks_of_64_take_the_step_of_one_process_of_128(case, two_ranks, single):
    want = two_steps(dataclasses.replace(STEP_CASES[case], ddp=False))
    for r in (0, 1):
        got = two_ranks[r]["steps"][case]
        assert set(got) == set(want) == {"adv", "std"}
        for k in want:
            for name, v in want[k].items():
                assert torch.allclose(got[k][name], v, rtol=0, atol=1e-5), f"rank {r}: {k}.{name} differs"
                assert torch.equal(got[k][name], two_ranks[0]["steps"][case][k][name])  # ranks agree exactly
        moved = max((want["adv"][n] - v).abs().max().item() for n, v in two_steps_init().items())
        assert moved > 1e-3  # the steps did change the weights


def two_steps_init():
    torch.manual_seed(0)
    return {n: v.clone() for n, v in TinyNet().state_dict().items()}


def test_tp_scope_global_gradient_is_the_single_process_gradient(two_ranks, single):
    """all_gather's backward sums each rank's copy of dL/df' (reduce-scatter SUM) and DDP averages over the
    2 ranks: the gradient of L_TP on the concatenated batch, not 1/2 or 2x of it."""
    loss, grads = tp_gradient(step_cfg("at", ddp=False))
    for r in (0, 1):
        got_loss, got = two_ranks[r]["tp"]["global"]
        assert torch.allclose(got_loss, loss, rtol=1e-6), (got_loss, loss)  # every rank has the global loss
        assert set(grads) == {n for n in got if not n.startswith("fc.")} and len(grads) == 4
        for n, g in grads.items():
            assert torch.allclose(got[n], g, rtol=1e-5, atol=1e-9), f"rank {r}: grad of {n}"


def test_tp_scope_local_is_the_mean_of_the_per_shard_losses(two_ranks, single):
    """--tp-scope local: each rank's graph on its 8 images; DDP averages: d/dw of (L(shard 0) + L(shard 1)) / 2."""
    cfg = step_cfg("at", ddp=False)
    torch.manual_seed(1)
    adv, std = TinyNet(), TinyNet()
    g = torch.Generator().manual_seed(4)
    x, x_adv = (torch.rand(16, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, 4, (16,), generator=g)
    losses = [common.relation_tp(common.StepState(adv, x[h], y[h], x_adv[h], std, std_trainable=False), cfg)
              for h in (slice(0, 8), slice(8, 16))]
    (sum(losses) / 2).backward()
    global_grads = tp_gradient(cfg)[1]
    for r in (0, 1):
        got_loss, got = two_ranks[r]["tp"]["local"]
        assert torch.allclose(got_loss, losses[r].detach(), rtol=1e-6)
        for n, p in adv.named_parameters():
            if p.grad is not None:
                assert torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-9), f"rank {r}: grad of {n}"
    assert any(not torch.allclose(g, dict(adv.named_parameters())[n].grad, rtol=1e-3) for n, g in global_grads.items())


# ------------------------------------------------------------------------------------- runs: files, resume
def main_code(argv, port):
    """common.main in this rank's process on a fresh port -> its exit code (0 when it returns)."""
    os.environ["MASTER_PORT"] = str(port)
    try:
        common.main(DEFAULTS, argv, prefix="test")
        return 0
    except SystemExit as e:
        return e.code


def run_worker(rank, npz, root, ports):
    argv = lambda name, *extra: tiny_args(npz, os.path.join(root, name), "--method", "trades", "--train", "--lbgat",
                                          "--ddp", *extra)
    codes = {"full": main_code(argv("full"), ports[0])}
    real_step, calls = common.train_step, {"n": 0}

    def interrupting_step(*a, **kw):  # Ctrl-C reaching rank 0 alone, during step 3 of epoch 1
        calls["n"] += 1
        if calls["n"] == 3 and rank == 0:
            common.StopFlag.requested = True
        return real_step(*a, **kw)
    common.train_step = interrupting_step
    codes["cut"] = main_code(argv("cut"), ports[1])
    common.train_step = real_step
    if rank == 0:  # a copy of the interrupted run for the test to resume in one process
        shutil.copytree(os.path.join(root, "cut"), os.path.join(root, "cut_copy"))
    codes["resumed"] = main_code(argv("cut", "--resume"), ports[2])

    def poisoned_step(*a, **kw):  # a NaN loss on rank 1 alone: both ranks must stop (exit 1), none hang
        terms = real_step(*a, **kw)
        return {k: v * float("nan") for k, v in terms.items()} if rank == 1 else terms
    common.train_step = poisoned_step
    codes["nan"] = main_code(argv("nan"), ports[3])
    common.train_step = real_step
    with open(os.path.join(root, f"codes{rank}.json"), "w") as fh:
        json.dump(codes, fh)


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_a_two_rank_run_writes_one_folder_resumes_exactly_and_loads_in_one_process(tiny_npz, tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    spawn(run_worker, tiny_npz, str(root), free_ports(4))
    codes = [json.load(open(root / f"codes{r}.json")) for r in (0, 1)]
    assert codes[0] == codes[1] == {"full": 0, "cut": 130, "resumed": 0, "nan": 1}  # the ranks stopped together
    assert sorted(os.listdir(root)) == ["codes0.json", "codes1.json", "cut", "cut_copy", "full", "nan"]  # nothing else
    assert not os.path.exists(root / "nan" / "last.pt")  # NaN in epoch 1: no checkpoint
    assert open(root / "nan" / "log.txt").read().count("diverged: non-finite loss in epoch 1") == 1
    files = {"config.json", "metrics.jsonl", "log.txt", "last.pt", "best.pt"}
    assert set(os.listdir(root / "full")) == files  # rank 0's files only, lock released
    log = open(root / "full" / "log.txt").read()
    assert log.count("run folder:") == 1 and "DDP: 2 processes (gloo), global batch 16 = 2 x 8" in log
    assert "resumed from" in open(root / "cut" / "log.txt").read()
    full = torch.load(root / "full" / "last.pt", weights_only=False)
    cut = torch.load(root / "cut" / "last.pt", weights_only=False)
    assert full["world_size"] == 2 and cut["progress"]["epoch"] == 2
    for k in full["models"]:  # the resumed 2-rank run is the uninterrupted one (interrupted mid-epoch)
        for name, v in full["models"][k].items():
            assert torch.equal(v, cut["models"][k][name]), f"{k}.{name} differs after resume"
    r_full, r_cut = rows(root / "full"), rows(root / "cut")
    assert [r["epoch"] for r in r_full] == [r["epoch"] for r in r_cut] == [1, 2]
    for a, b in zip(r_full, r_cut):
        for k, v in a.items():
            if k.startswith("loss/"):  # the saved sums are means over the ranks: equal up to float rounding
                assert b[k] == pytest.approx(v, rel=1e-9), k
            elif k != "seconds":
                assert b[k] == v, k
    # the checkpoint is a plain one: keys unchanged, it evaluates and resumes in one process
    assert not any(n.startswith("module.") for m in full["models"].values() for n in m)
    capsys.readouterr()
    common.main(DEFAULTS, ["--eval", str(root / "full" / "last.pt"), "--metrics", "nat", "--device", "cpu"],
                prefix="test")
    assert json.load(open(root / "full" / "eval.json"))
    one = root / "cut_copy"  # interrupted with 2 processes, resumed in one (--ddp is a PLACE setting)
    at = torch.load(one / "last.pt", weights_only=False)["progress"]
    assert (at["epoch"], at["step"]) == (0, 3)  # both ranks stopped after step 3 of epoch 1
    common.main(DEFAULTS, ["--data-file", tiny_npz, "--out", str(one), "--device", "cpu", "--resume"], prefix="test")
    assert torch.load(one / "last.pt", weights_only=False)["progress"]["epoch"] == 2
    assert [r["epoch"] for r in rows(one)] == [1, 2]


# ------------------------------------------------------------------------------------- refusals
TORCHRUN_ENV = dict(RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")


@pytest.mark.parametrize("world,flags,needle", [
    (None, ["--ddp"], "needs torchrun"),
    ("3", ["--ddp"], "divisible by the 3 processes"),
    ("2", ["--ddp", "--awp"], "--awp is not built for --ddp"),
    ("2", ["--ddp", "--train", "--relation", "crd"], "--relation crd is not built for --ddp"),
    ("2", ["--ddp", "--sync-bn"], "--sync-bn needs --device cuda"),
    ("2", [], "without --ddp"),
    (None, ["--sync-bn"], "--sync-bn needs --ddp"),
])
def test_ddp_settings_that_cannot_run_are_one_line_errors(world, flags, needle, tiny_npz, tmp_path, monkeypatch,
                                                          capsys):
    for k in list(TORCHRUN_ENV) + ["WORLD_SIZE"]:
        monkeypatch.delenv(k, raising=False)
    if world:
        for k, v in {**TORCHRUN_ENV, "WORLD_SIZE": world}.items():
            monkeypatch.setenv(k, v)
    err = refused(tiny_args(tiny_npz, tmp_path / "r", *flags), capsys)
    assert needle in err
    assert not os.path.exists(tmp_path / "r")


def test_ddp_settings_are_place_settings_and_tp_scope_local_is_named():
    kinds = {f.name: f.metadata["kind"] for f in runs.fields(runs.Config)}
    assert kinds["ddp"] == kinds["sync_bn"] == runs.PLACE and kinds["tp_scope"] == runs.RUN
    base = runs.make_config(DEFAULTS, {})
    assert runs.run_name(runs.make_config(DEFAULTS, {"ddp": True}), base) == "trades"
    assert runs.run_name(runs.make_config(DEFAULTS, {"tp_scope": "local"}), base) == "trades_tp-scope-local"
