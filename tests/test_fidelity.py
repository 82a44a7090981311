"""Issue 11: the baselines as their authors released them, model selection on held-out training data, the LAS
eps, and evaluating / exporting plain state_dicts.

The references below re-implement the official code in float64, independently of common.py:
  TRADES  yaodongyu/TRADES trades.py            start x + 0.001 N(0,1), not clamped before the first step
  MART    YisenWang/MART mart.py                the same start, CE (batch mean) as the attack loss
  AT      MadryLab/cifar10_challenge pgd_attack.py   start x + U(-eps, eps), clipped to the pixel range
  LBGAT   dvlab-research/LBGAT lbgat.py         MSE(M'(x'), M(x)) + CE(M(x), y) + beta KL(M'(x') || M'(x)) / B
  WRN     RobustBench robustbench/model_zoo/architectures/wide_resnet.py (TRADES' layer names)
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import runs
from conftest import DEFAULTS, ROOT, make_config, tiny_args


def fresh_seed():
    return int(np.random.SeedSequence().entropy % 2 ** 31)


def small_model(seed, num_classes=4):
    torch.manual_seed(seed)
    return common.CNNSmall(num_classes, width=8).double()


def images(seed, n=8, size=12):
    """Random images with saturated borders (0 and 1), as zero padding and real photos have: there the
    clamp of the attack's start matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
    x[..., :2] = 0.0
    x[..., -2:] = 1.0
    return x, torch.randint(0, 4, (n,), generator=g)


def log_softmax64(z):
    return z - torch.logsumexp(z, dim=1, keepdim=True)


# ------------------------------------------------------------------------------ 2. training attack starts
def official_first_step(method, model, x, y, eps, step):
    """One iteration of the official attack loop (model in eval mode), written from the official files."""
    model.eval()
    if method in ("trades", "mart"):
        x_adv = x + 0.001 * torch.randn_like(x)  # trades.py / mart.py: no clamp before the first step
    else:
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)  # pgd_attack.py: clipped start
    x_adv.requires_grad_(True)
    z = model(x_adv)
    if method == "trades":
        with torch.no_grad():
            p_nat = torch.exp(log_softmax64(model(x)))
        loss = (p_nat * (torch.log(p_nat) - log_softmax64(z))).sum()  # KLDivLoss(size_average=False)
    elif method == "mart":
        loss = -log_softmax64(z).gather(1, y[:, None]).mean()  # F.cross_entropy, batch mean
    else:
        loss = -log_softmax64(z).gather(1, y[:, None]).sum()  # Madry's xent: summed
    grad, = torch.autograd.grad(loss, x_adv)
    x_adv = x_adv.detach() + step * grad.sign()
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


@pytest.mark.parametrize("method", ["trades", "mart", "at", "alp"])
def test_first_training_attack_step_is_the_official_one(method):
    seed = fresh_seed()
    model, (x, y) = small_model(seed), images(seed + 1)
    cfg = make_config(method=method, steps=1)
    torch.manual_seed(seed)
    want = official_first_step(method, model, x, y, cfg.eps, cfg.step_size)
    torch.manual_seed(seed)
    ours = common.BASE_METHODS[method].attack(model, x, y, cfg)
    assert torch.equal(ours, want), f"seed {seed}: {int((ours != want).sum())} of {x.numel()} elements differ"
    if method in ("trades", "mart"):  # the first release's starts differ on these inputs: the check can fail
        cfg.baselines = "release1"
        torch.manual_seed(seed)
        old = common.BASE_METHODS[method].attack(model, x, y, cfg)
        assert (old != want).float().mean() > 0.01, f"seed {seed}"


# ------------------------------------------------------------------------------ 1. LBGAT
def official_lbgat_loss(adv, std, x, x_adv, y, beta):
    """lbgat.py: mse(out_adv, out) + ce(out, y) + beta * KLDivLoss(sum)(log_softmax(out_adv), softmax(out_natural)) / B,
    with out = M(x) (M not detached: the guidance trains both models)."""
    out_adv, out_natural, out = adv(x_adv), adv(x), std(x)
    mse = ((out_adv - out) ** 2).mean()
    ce = -log_softmax64(out).gather(1, y[:, None]).mean()
    p = torch.exp(log_softmax64(out_natural))
    kl = (p * (log_softmax64(out_natural) - log_softmax64(out_adv))).sum() / len(x)
    return mse + ce + beta * kl


def step_loss_and_grads(cfg, adv, std, x, y, seed):
    """Our training step's total loss and gradients (no optimiser step) with a 0-step attack (x' = its start)."""
    models = common.Models(adv, std)
    torch.manual_seed(seed)
    terms = common.train_step(models, {}, x, y, cfg, epoch=1)
    grads = {k: [p.grad.clone() for p in m.parameters()] for k, m in (("adv", adv), ("std", std))}
    return sum(terms.values()).item(), grads, terms


def reference_grads(loss, adv, std):
    return {k: torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
            for k, m in (("adv", adv), ("std", std))}


def lbgat_case(seed, **flags):
    cfg = make_config(lbgat=True, steps=0, **flags)
    adv, std = small_model(seed).train(), small_model(seed + 1).train()
    ref_adv, ref_std = copy.deepcopy(adv), copy.deepcopy(std)
    x, y = images(seed + 2)
    return cfg, adv, std, ref_adv, ref_std, x, y


def test_trades_lbgat_is_lbgat_py():
    """TRADES + LBGAT = LBGAT's released loss: no CE(M'(x), y); value and gradients of both models."""
    seed = fresh_seed()
    beta = float(np.random.default_rng(seed).uniform(1, 6))
    cfg, adv, std, ref_adv, ref_std, x, y = lbgat_case(seed, method="trades", beta=beta)
    total, grads, terms = step_loss_and_grads(cfg, adv, std, x, y, seed)
    assert "ce_nat" not in terms
    torch.manual_seed(seed)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)  # lbgat.py clamps x' once more after the loop
    ref = official_lbgat_loss(ref_adv, ref_std, x, x_adv, y, beta)
    assert total == pytest.approx(ref.item(), rel=1e-12), f"seed {seed}"
    for k, gs in reference_grads(ref, ref_adv, ref_std).items():
        for g_ours, g_ref in zip(grads[k], gs):
            assert torch.allclose(g_ours, g_ref, rtol=1e-9, atol=1e-12), f"{k}, seed {seed}"


def test_at_lbgat_keeps_eq15_and_lbgat0_is_lbgat_py_with_beta_0():
    seed = fresh_seed()
    # the paper's Eq. 15 (default): CE(M'(x'), y) + gamma MSE(M'(x'), M(x)), and M's CE(M(x), y)
    cfg, adv, std, ref_adv, ref_std, x, y = lbgat_case(seed, method="at")
    total, _, terms = step_loss_and_grads(cfg, adv, std, x, y, seed)
    torch.manual_seed(seed)
    x_adv = (x + torch.empty_like(x).uniform_(-cfg.eps, cfg.eps)).clamp(0, 1)
    z_adv, z_std = ref_adv(x_adv), ref_std(x)
    eq15 = (-log_softmax64(z_adv).gather(1, y[:, None]).mean() + ((z_adv - z_std) ** 2).mean()
            - log_softmax64(z_std).gather(1, y[:, None]).mean())
    assert set(terms) == {"ce_adv", "lbgat_mse", "ce_std"} and total == pytest.approx(eq15.item(), rel=1e-12)
    # --lbgat0: LBGAT's released LBGAT0 (lbgat.py with beta 0, its KL attack's start): no term on M' but the guidance
    cfg, adv, std, ref_adv, ref_std, x, y = lbgat_case(seed, method="at", lbgat0=True)
    total, grads, terms = step_loss_and_grads(cfg, adv, std, x, y, seed)
    torch.manual_seed(seed)
    ref = official_lbgat_loss(ref_adv, ref_std, x, (x + 0.001 * torch.randn_like(x)).clamp(0, 1), y, 0.0)
    assert set(terms) == {"lbgat_mse", "ce_std"} and total == pytest.approx(ref.item(), rel=1e-12), f"seed {seed}"
    for k, gs in reference_grads(ref, ref_adv, ref_std).items():
        for g_ours, g_ref in zip(grads[k], gs):
            assert torch.allclose(g_ours, g_ref, rtol=1e-9, atol=1e-12), f"{k}, seed {seed}"


def test_first_release_lbgat_loss_kept_for_its_runs():
    """A run saved before this change (baselines release1) keeps TRADES' CE(M'(x), y) next to LBGAT's terms."""
    seed = fresh_seed()
    cfg, adv, std, *_ = lbgat_case(seed, method="trades")
    cfg.baselines = "release1"
    _, _, terms = step_loss_and_grads(cfg, adv, std, *images(seed + 2), seed)
    assert set(terms) == {"ce_nat", "trades_kl", "lbgat_mse", "ce_std"}


def test_lbgat_teacher_is_resnet18_lbgat_unless_given():
    cfg = make_config(lbgat=True, arch="cnn_small")
    assert common.std_arch_of(cfg) == "resnet18_lbgat"
    std = common.build_models(cfg, 10, torch.device("cpu")).std
    assert ([s[0].conv1.stride for s in (std.layer1, std.layer2, std.layer3, std.layer4)]
            == [(1, 1), (1, 1), (2, 2), (2, 2)])
    assert common.std_arch_of(make_config(train=True)) == "resnet18"
    assert common.std_arch_of(make_config(lbgat=True, std_arch="resnet18")) == "resnet18"


@pytest.mark.slow
@pytest.mark.parametrize("flags,needle", [(["--lbgat0"], "--lbgat0 needs --lbgat"),
                                          (["--lbgat", "--lbgat0", "--method", "trades"], "--method at"),
                                          (["--val-n", "64"], "--val-n 64 leaves no training images")])
def test_bad_combinations_exit_2_with_one_line(flags, needle, tiny_npz, tmp_path):
    r = subprocess.run([sys.executable, "exp_cifar10.py", "--data-file", tiny_npz, "--out", str(tmp_path / "x"),
                        "--device", "cpu", "--arch", "cnn_small", "--std-arch", "cnn_small", "--batch-size", "16",
                        *flags],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------------------ 3. LAS schedule
def test_las_schedule_trains_and_evaluates_at_8_255(tiny_npz, tmp_path, capsys):
    assert make_config(schedule="las").eps == pytest.approx(8 / 255)
    assert make_config(schedule="las", eps=0.031).eps == 0.031  # an explicit --eps wins
    assert make_config().eps == 0.031
    out = tmp_path / "las"
    common.main(DEFAULTS, tiny_args(tiny_npz, out, "--schedule", "las", "--epochs", "1", "--method", "at"), prefix="t")
    assert json.load(open(out / "config.json"))["config"]["eps"] == pytest.approx(8 / 255)
    capsys.readouterr()
    common.main(DEFAULTS, ["--eval", str(out / "last.pt"), "--device", "cpu", "--metrics", "nat,pgd",
                           "--eval-steps", "2"],
                prefix="t")
    assert "(8.00/255)" in capsys.readouterr().out
    assert json.load(open(out / "eval.json"))["eps"] == pytest.approx(8 / 255)


# ------------------------------------------------------------------------------ 4. model selection on held-out data
def test_old_configs_load_without_validation_split_and_with_the_first_release_baselines():
    with open(os.path.join(ROOT, "tests", "fixtures", "legacy_run", "config.json")) as fh:
        old = runs.Config.from_saved(json.load(fh)["config"])
    assert (old.val_n, old.baselines, old.lbgat0) == (0, "release1", False)
    new = make_config()
    assert (new.val_n, new.baselines) == (1000, "official")
    assert runs.Config.from_saved(new.to_dict()) == new  # today's runs load as saved
    assert make_config(quick=True).val_n == 500


def test_validation_split_is_held_out_and_monitored(tiny_npz, tmp_path, monkeypatch):
    labels = []
    real_step = common.train_step
    monkeypatch.setattr(common, "train_step", lambda *a, **kw: (labels.append(a[3]), real_step(*a, **kw))[1])
    out = tmp_path / "val"
    common.main(DEFAULTS, tiny_args(tiny_npz, out, "--val-n", "16", "--method", "at"), prefix="t")
    assert len(labels) == 2 * 3  # 64 - 16 = 48 training images: 3 batches of 16 per epoch
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert all({"val_nat_acc", "val_pgd2_acc", "nat_acc", "pgd2_acc"} <= set(r) for r in rows)
    # val_nat_acc is M''s accuracy on the last 16 training images
    with np.load(tiny_npz) as z:
        x_val = torch.from_numpy(z["x_train"][-16:]).permute(0, 3, 1, 2).float() / 255
        y_val = torch.from_numpy(z["y_train"][-16:])
    model = common.build_model("cnn_small", 4)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=False)["models"]["adv"])
    with torch.no_grad():
        acc = (model.eval()(x_val).argmax(1) == y_val).double().mean().item()
    assert rows[-1]["val_nat_acc"] == pytest.approx(acc)


def test_best_pt_is_chosen_on_validation_not_test(tiny_npz, tmp_path, monkeypatch, capsys):
    """Test accuracy peaks in epoch 1, validation accuracy in epoch 2: best.pt must be epoch 2's."""
    monkeypatch.setattr(common, "epoch_eval", lambda models, data, cfg, epoch: {"nat_acc": 0.5,
                                                                                "pgd2_acc": [0.9, 0.1][epoch - 1]})
    real_val = common.val_eval
    monkeypatch.setattr(common, "val_eval", lambda models, data, cfg, epoch: {**real_val(models, data, cfg, epoch),
                                                                              "val_pgd2_acc": [0.1, 0.9][epoch - 1]})
    out = tmp_path / "sel"
    common.main(DEFAULTS, tiny_args(tiny_npz, out, "--val-n", "16", "--method", "at"), prefix="t")
    assert torch.load(out / "best.pt", weights_only=False)["progress"]["epoch"] == 2
    for ckpt, label in (("best.pt", "best-by-val"), ("last.pt", "last")):
        common.main(DEFAULTS, ["--eval", str(out / ckpt), "--device", "cpu", "--metrics", "nat", "--eval-steps", "1"],
                    prefix="t")
        assert json.load(open(out / "eval.json"))["selection"] == label
    capsys.readouterr()
    common.main(DEFAULTS, ["--table", str(out)], prefix="t")
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].rstrip().endswith("| checkpoint |") and table[2].rstrip().endswith("| last |")


def test_without_validation_split_best_pt_says_it_was_chosen_on_test(tiny_npz, tmp_path):
    out = tmp_path / "noval"
    common.main(DEFAULTS, tiny_args(tiny_npz, out, "--method", "at", "--epochs", "1"), prefix="t")
    common.main(DEFAULTS, ["--eval", str(out / "best.pt"), "--device", "cpu", "--metrics", "nat", "--eval-steps", "1"],
                prefix="t")
    assert json.load(open(out / "eval.json"))["selection"] == "best-by-test"


# ------------------------------------------------------------------------------ 5. public checkpoints
class RBBlock(nn.Module):
    """RobustBench's wide_resnet.BasicBlock, by its published layer names (pre-activation; a widening block's
    shortcut sees the activated input)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c_out), nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + out


class RBNetworkBlock(nn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RBBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RobustBenchWideResNet(nn.Module):
    """RobustBench's WideResNet(depth, num_classes, widen_factor) with sub_block1=False, its default."""

    def __init__(self, depth=34, num_classes=10, widen_factor=10):
        super().__init__()
        n, ch = (depth - 4) // 6, [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = RBNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = RBNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = RBNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(ch[3]), nn.ReLU()
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.avg_pool2d(out, 8).flatten(1))


def run_checkpoint(path, model, arch):
    """A checkpoint as train() writes it, holding `model` as M'."""
    cfg = make_config(arch=arch)
    torch.save({"models": {"adv": model.state_dict()}, "optimizers": {}, "progress": {"epoch": 3, "step": 0, "sums": {},
                "best": 0.0}, "rng": None, "config": cfg.to_dict()}, path)


def test_export_loads_strictly_into_robustbench_wrn34_10(tmp_path):
    torch.manual_seed(fresh_seed())
    ours = common.build_model("wrn34_10", 10)
    for m in ours.modules():  # trained-looking BN statistics, so a mixed-up key would show in the logits
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    run_checkpoint(tmp_path / "best.pt", ours, "wrn34_10")
    common.main(DEFAULTS, ["--export", str(tmp_path / "best.pt"), str(tmp_path / "wrn.pt")], prefix="t")
    state = torch.load(tmp_path / "wrn.pt", weights_only=True)
    rb = RobustBenchWideResNet(34, 10, 10)
    rb.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rb.eval()(x), ours.eval()(x), atol=1e-5)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "module"])
def test_eval_of_a_bare_state_dict_with_normalisation(wrap, tiny_npz, tmp_path):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = common.build_model("cnn_small", 4).eval()
    state = model.state_dict()
    ck = {"bare": state, "state_dict": {"state_dict": state},
          "module": {"module." + k: v for k, v in state.items()}}[wrap]
    torch.save(ck, tmp_path / "public.pt")
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    common.main(DEFAULTS, ["--eval", str(tmp_path / "public.pt"), "--arch", "cnn_small", "--data-file", tiny_npz,
                           "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)), "--device", "cpu",
                           "--metrics", "nat,pgd", "--eval-steps", "2"], prefix="t")
    res = json.load(open(tmp_path / "eval.json"))
    with np.load(tiny_npz) as z:
        x = torch.from_numpy(z["x_test"]).permute(0, 3, 1, 2).double() / 255
        y = torch.from_numpy(z["y_test"])
    m, s = (torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1))
    with torch.no_grad():
        want = (model.double()((x - m) / s).argmax(1) == y).double().mean().item()
    assert res["natural"] == pytest.approx(want), f"seed {seed}"
    assert res["selection"] == "state_dict" and res["arch"] == "cnn_small" and res["eps"] == pytest.approx(0.031)


@pytest.mark.slow
def test_checkpoint_kind_and_bad_state_dicts(tmp_path, tiny_npz, capsys):
    state = common.build_model("cnn_small", 4).state_dict()
    run_checkpoint(tmp_path / "last.pt", common.build_model("cnn_small", 4), "cnn_small")
    with pytest.raises(SystemExit) as e:
        common.main(DEFAULTS, ["--export", str(tmp_path / "last.pt"), str(tmp_path / "no" / "such" / "dir.pt")],
                    prefix="t")
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert common.checkpoint_kind({"models": {"adv": state}, "config": {}, "progress": {}}) == "run"
    assert common.checkpoint_kind(state) == common.checkpoint_kind({"state_dict": state}) == "state_dict"
    torch.save(state, tmp_path / "p.pt")
    for flags, needle in ((["--arch", "resnet18"], "does not fit --arch resnet18"), ([], "needs --arch")):
        r = subprocess.run([sys.executable, "exp_cifar10.py", "--eval", str(tmp_path / "p.pt"), "--data-file", tiny_npz,
                            "--device", "cpu", *flags], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
