"""exp_example_method.py: a copied experiment script that registers its own base method trains, resumes,
evaluates and tabulates it from the command line, and a study can name it (--extend)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT, cli, read_rows, tiny_args, write_npz

SCRIPT = "exp_example_method.py"


def test_the_example_registers_a_real_method(monkeypatch):
    monkeypatch.delitem(sys.modules, "exp_example_method", raising=False)
    monkeypatch.setitem(common.BASE_METHODS, "at_ls", None)  # restored (removed) after the test
    import exp_example_method as ex  # importing registers at_ls, as running the script does
    assert common.BASE_METHODS["at_ls"].attack is common.attack_ce
    torch.manual_seed(0)
    z, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    s = common.StepState(None, None, y, None)
    s._cache["adv"] = (None, z)
    smoothed = (1 - ex.SMOOTHING) * torch.nn.functional.one_hot(y, 4) + ex.SMOOTHING / 4
    want = -(smoothed * torch.log_softmax(z, 1)).sum(1).mean()
    assert torch.allclose(ex.loss_at_ls(s, None)["ce_adv_ls"], want)


@pytest.mark.slow
def test_the_example_method_trains_resumes_and_evaluates_from_the_command_line(tmp_path):
    npz = write_npz(tmp_path / "data.npz")
    out = tmp_path / "run"
    args = tiny_args(npz, out, "--train", "--epochs", "40")
    assert "at_ls" in cli("--help", script=SCRIPT).stdout
    p = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:  # stop it after its first checkpoint, as a scheduler's SIGTERM would
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=120)[1]
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    done_before = len(read_rows(out))
    assert done_before < 40
    r = cli("--data-file", npz, "--out", str(out), "--device", "cpu", "--resume", script=SCRIPT)
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert [row["epoch"] for row in rows] == list(range(1, 41)) and "loss/ce_adv_ls" in rows[-1]
    assert json.load(open(out / "config.json"))["config"]["method"] == "at_ls"
    r = cli("--data-file", npz, "--out", str(out), "--device", "cpu", "--resume")  # exp_cifar10.py lacks at_ls
    assert r.returncode == 2 and "the method at_ls is not registered here" in r.stderr and "Traceback" not in r.stderr
    r = cli("--eval", str(out / "last.pt"), "--metrics", "nat,pgd,tp", "--eval-steps", "2", script=SCRIPT)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out / "eval.json"))
    assert res["epoch"] == 40 and "test_ltp" in res
    r = cli("--table", str(out), script=SCRIPT)
    assert r.returncode == 0 and "| run (last.pt, epoch 40" in r.stdout
    # its run name says the method; a study can name it once the script is imported
    r = cli("--data-file", npz, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--quick", "--epochs", "1",
            "--train-n", "48", "--val-n", "16", "--batch-size", "16", "--test-n", "16", "--eval-n", "16", script=SCRIPT)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / "runs")[0].startswith("example_method_at_ls_")
    r = cli("--study", "lambda", "--quick", "--dry-run", "--extend", SCRIPT, "--method", "at_ls",
            "--runs-dir", str(tmp_path / "study"), script="exp_ablations.py")
    assert r.returncode == 0 and "/at_ls_lam-0_train_quick" in r.stdout, r.stderr
    r = cli("--study", "lambda", "--quick", "--dry-run", "--method", "at_ls", script="exp_ablations.py")
    assert r.returncode == 2 and "invalid choice: 'at_ls'" in r.stderr
