"""The response study's pieces: neighbour agreement and the gradient probe against independent computations,
--lam 0 --train leaving M' as the base method trains it, the lambda* rule on a hand-made table, and a tiny
study whose run folders are deleted and rebuilt from the committed results."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import runs
import exp_ablations as ab
from conftest import DEFAULTS, make_config, tiny_args
from kernels.reference import topology_loss_reference


# ------------------------------------------------------------------------------ neighbour agreement
def brute_force_agreement(f_ref, f, k):
    """NumPy float64: each row's k nearest other rows by cosine in both spaces; mean shared fraction."""
    def neighbours(g):
        z = g / np.linalg.norm(g, axis=1, keepdims=True)
        sim = z @ z.T
        np.fill_diagonal(sim, -np.inf)
        return [set(np.argsort(-row, kind="stable")[:k]) for row in sim]
    a, b = neighbours(f_ref.astype(np.float64)), neighbours(f.astype(np.float64))
    return float(np.mean([len(x & y) / k for x, y in zip(a, b)]))


def test_neighbour_agreement_matches_brute_force():
    rng = np.random.default_rng()  # fresh inputs on every run
    n, d = int(rng.integers(40, 90)), int(rng.integers(3, 12))
    f_ref = rng.normal(size=(n, d))
    f = f_ref + rng.normal(scale=rng.uniform(0.2, 2.0), size=(n, d))  # related, not equal
    ks = [1, 5, 10]
    got = common.neighbour_agreement(torch.tensor(f_ref, dtype=torch.float32), torch.tensor(f, dtype=torch.float32), ks)
    for k in ks:
        assert got[str(k)] == pytest.approx(brute_force_agreement(f_ref, f, k), abs=1e-6)
    same = common.neighbour_agreement(torch.tensor(f), torch.tensor(f) * 3.0, [5])  # cosine: scale-free
    assert same["5"] == pytest.approx(1.0)
    # chunked rows give the same neighbours as one block
    z = torch.tensor(f, dtype=torch.float32)
    assert torch.equal(common.cosine_neighbours(z, 7, chunk=13), common.cosine_neighbours(z, 7))
    with pytest.raises(common.UserError, match="needs more than"):
        common.neighbour_agreement(z[:5], z[:5], [5])


# ------------------------------------------------------------------------------ the gradient probe
def one_state(method, lam, tp_input="adv", seed=None):
    torch.manual_seed(seed if seed is not None else random.randrange(10 ** 6))
    cfg = make_config(method=method, train=True, lam=lam, arch="cnn_small", std_arch="cnn_small", steps=1,
                      tp_input=tp_input, epochs=4)
    models = common.build_models(cfg, 10, torch.device("cpu"))
    x, y = torch.rand(12, 3, 16, 16), torch.randint(0, 10, (12,))
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    return cfg, models, common.StepState(models.adv, x, y, x_adv, models.std)


@pytest.mark.parametrize("method,lam,tp_input", [("at", "5", "adv"), ("trades", "0.3a", "nat"), ("trades", "2", "adv")])
def test_gradient_probe_against_float64_autograd(method, lam, tp_input):
    cfg, models, s = one_state(method, lam, tp_input)
    terms = common.BASE_METHODS[method].loss(s, cfg)
    got = common.gradient_probe(s, sum(terms.values()), cfg, epoch=2)
    # independent: f' as a float64 leaf, the losses rebuilt from it through M''s last layer, L_TP by the reference
    with torch.no_grad():
        f_std = models.std(s.x, return_features=True)[0].double()
        f_adv, f_nat = (models.adv(v, return_features=True)[0].double() for v in (s.x_adv, s.x))
    fc = models.adv.fc.double()
    leaf = (f_adv if tp_input == "adv" else f_nat).clone().requires_grad_(True)
    z_adv = fc(leaf) if tp_input == "adv" else fc(f_adv)
    z_nat = fc(leaf) if tp_input == "nat" else fc(f_nat)
    if method == "at":
        robust = F.cross_entropy(z_adv, s.y)
    else:
        robust = F.cross_entropy(z_nat, s.y) + cfg.beta * F.kl_div(F.log_softmax(z_adv, 1), F.softmax(z_nat, 1),
                                                                   reduction="batchmean")
    g_rob = torch.autograd.grad(robust, leaf)[0]
    g_tp = torch.autograd.grad(topology_loss_reference(f_std, leaf, reduction="sum"), leaf)[0]
    lam_t = cfg.lam.at(2, cfg.epochs)[1]
    assert got["grad/robust_norm"].item() == pytest.approx(g_rob.norm().item(), rel=1e-4)
    assert got["grad/tp_norm"].item() == pytest.approx(g_tp.norm().item(), rel=1e-4)
    assert got["grad/share"].item() == pytest.approx(lam_t * g_tp.norm().item() / g_rob.norm().item(), rel=1e-4)
    cos = (g_rob.flatten() @ g_tp.flatten() / (g_rob.norm() * g_tp.norm())).item()
    assert got["grad/cos"].item() == pytest.approx(cos, abs=1e-4)


def test_lam_0_train_leaves_m_prime_as_the_base_method_trains_it():
    """--lam 0 --train: M' takes exactly the base method's step (same start, same random start of the
    attack); M is trained next to it; the probe says share 0 but measures L_TP's raw gradient."""
    for method in ("at", "trades"):
        seed = random.randrange(10 ** 6)
        cfg, models, _ = one_state(method, "0", seed=seed)
        base_cfg = make_config(**{k: getattr(cfg, k) for k in ("method", "arch", "steps", "epochs")})
        base_adv = common.build_model(cfg.arch, 10)
        base_adv.load_state_dict(models.adv.state_dict())
        std_before = {k: v.clone() for k, v in models.std.state_dict().items()}
        x, y = torch.rand(12, 3, 16, 16), torch.randint(0, 10, (12,))
        opts = common.build_optimizers(models, cfg)
        torch.manual_seed(seed + 1)
        terms = common.train_step(models, opts, x, y, cfg, epoch=1, probe=True)
        base = common.Models(base_adv)
        torch.manual_seed(seed + 1)
        common.train_step(base, common.build_optimizers(base, base_cfg), x, y, base_cfg, epoch=1)
        for k, v in base_adv.state_dict().items():
            assert torch.allclose(v, models.adv.state_dict()[k], rtol=0, atol=1e-6), (method, k)
        assert any(not torch.equal(v, models.std.state_dict()[k]) for k, v in std_before.items())  # M learned
        assert terms["tp"].item() == 0 and terms["grad/share"].item() == 0 and terms["grad/tp_norm"].item() > 0


def test_a_run_logs_the_gradient_share_per_epoch(tiny_npz, tmp_path):
    common.main(DEFAULTS, tiny_args(tiny_npz, tmp_path / "r", "--method", "at", "--train", "--lam", "2",
                                    "--batch-size", "8"), prefix="t")
    rows = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    assert len(rows) == 2
    for row in rows:
        assert row["grad/share"] > 0 and row["grad/tp_norm"] > 0 and row["grad/robust_norm"] > 0  # a mean of ratios
        assert -1 <= row["grad/cos"] <= 1 and "loss/grad/share" not in row
        assert row["loss/total"] == pytest.approx(sum(v for k, v in row.items()
                                                      if k.startswith("loss/") and k != "loss/total"))
    common.main(DEFAULTS, tiny_args(tiny_npz, tmp_path / "b", "--method", "at", "--batch-size", "8"), prefix="t")
    assert not any(k.startswith("grad/") for k in json.loads(open(tmp_path / "b" / "metrics.jsonl").readline()))


def test_evaluation_reports_neighbour_agreement(tiny_npz, tmp_path):
    common.main(DEFAULTS, tiny_args(tiny_npz, tmp_path / "r", "--method", "at", "--train", "--lam", "0"), prefix="t")
    common.main(DEFAULTS, ["--eval", str(tmp_path / "r" / "last.pt"), "--metrics", "nat,nbr", "--nbr-k", "3,7"],
                prefix="t")
    res = json.load(open(tmp_path / "r" / "eval.json"))
    ck = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    cfg = runs.Config.from_saved(ck["config"])
    models = common.build_models(cfg, 4, torch.device("cpu"))
    for k, m in models.saved().items():
        m.load_state_dict(ck["models"][k])
        m.eval()
    data = common.load_data(cfg, torch.device("cpu"))
    x = common.to_float(data.x_test)
    with torch.no_grad():
        f_std, f_adv = models.std(x, return_features=True)[0].numpy(), models.adv(x, return_features=True)[0].numpy()
    assert res["nbr"]["natural"]["7"] == pytest.approx(brute_force_agreement(f_std, f_adv, 7), abs=1e-6)
    assert set(res["nbr"]["robust"]) == {"3", "7"} and "pgd" in res  # x' is PGD-20 of M'


# ------------------------------------------------------------------------------ the study
def test_lambda_rule_on_a_hand_made_table():
    seeds = ab.RESPONSE_SELECT_SEEDS
    scores = {"0": {s: 0.9 for s in seeds}, "0.03": {1: 0.70, 2: 0.72, 3: 0.71}, "0.1": {1: 0.80, 2: 0.60, 3: 0.73},
              "0.3": {1: 0.74, 2: 0.68, 3: 0.74}, "1": {1: 0.50, 2: 0.90, 3: 0.70}}
    # means: 0.03 -> 0.71, 0.1 -> 0.71, 0.3 -> 0.72, 1 -> 0.70; lambda 0's 0.9 is not a candidate
    assert ab.select_lambda(scores)[0] == "0.3"
    scores["0.3"] = {1: 0.71, 2: 0.71, 3: 0.71}  # three-way tie at 0.71: the smallest lambda
    assert ab.select_lambda(scores)[0] == "0.03"
    del scores["1"][2]
    lam, why = ab.select_lambda(scores)
    assert lam is None and "1 runs missing" in why
    rows = [{"val_nat_acc": 0.1, "val_pgd10_acc": 0.1}, {"val_nat_acc": 0.5, "val_pgd10_acc": 0.25}]
    assert ab.val_score(rows) == pytest.approx(0.75)  # the last epoch = last.pt


def test_the_design_is_the_registered_one():
    runs = ab.response_runs()
    arm1 = [st for arm, st in runs if arm == "lambda"]
    assert sorted({str(st["lam"]) for st in arm1}) == ["0", "0.03", "0.1", "0.3", "1"]
    assert sorted({st["seed"] for st in arm1}) == [1, 2, 3] and len(arm1) == 15
    confirm = [st for arm, st in runs if arm == "confirm"]
    assert len(confirm) == 12 and {st["seed"] for st in confirm} == {4, 5, 6}
    capacity = [st for arm, st in runs if arm == "capacity"]  # AT and lambda* at width x1 are arm 2's runs
    assert sorted((st["arch"], str(st["lam"])) for st in capacity if st["seed"] == 4) == [
        ("cnn6", "5"), ("cnn6x2", "0"), ("cnn6x2", "5"), ("cnn6x2", ab.PENDING)]
    assert all(st["train"] and st["arch"] == st["std_arch"] for _, st in runs)
    cfg = ab.ResponseStudy([]).study.config(ab.response_settings("at", "0.1"))
    assert (cfg.train_n, cfg.val_n, cfg.epochs, cfg.steps, cfg.baselines, cfg.tp_reduction) == (
        8000, 1000, 8, 3, "official", "sum")


TINY = {"train_n": 0, "val_n": 16, "epochs": 1, "milestones": [1], "batch_size": 16, "steps": 1, "eval_steps": 1,
        "eval_n": 16, "test_n": 0, "device": "cpu", "arch": "cnn_small", "std_arch": "cnn_small"}


def tiny_study(monkeypatch, tiny_npz):
    monkeypatch.setattr(ab, "RESPONSE_TRAIN", {**ab.RESPONSE_TRAIN, **TINY, "data_file": tiny_npz})
    monkeypatch.setattr(ab, "RESPONSE_EVAL", {"knn_k": [3], "knn_train_n": 16, "nbr_k": [3, 5], "aa_n": 8,
                                              "aa_attacks": ["apgd-ce"]})
    monkeypatch.setattr(ab, "RESPONSE_METRICS", {a: ["nat", "pgd", "knn", "tp", "nbr"] for a in ab.RESPONSE_ARMS})
    monkeypatch.setattr(ab, "WIDTHS", {"cnn_small": 1, "cnn6": 2})
    monkeypatch.setattr(ab, "RESPONSE_MINUTES", {("at", 1, "lambda"): 1, ("at", 1, "full"): 1, ("at", 2, "full"): 2})


@pytest.mark.slow
def test_study_runs_keeps_results_and_rebuilds_from_them(tiny_npz, tmp_path, monkeypatch, capsys):
    tiny_study(monkeypatch, tiny_npz)
    runs_dir, results = tmp_path / "runs", tmp_path / "results"
    args = ["--runs-dir", str(runs_dir)]
    table = ab.response_study(["lambda"], args, False, print, results_root=str(results))
    rs = ab.ResponseStudy(args, str(results))
    lam_star, _ = ab.select_lambda(rs.scores())
    assert lam_star in ab.RESPONSE_LAMBDAS and f"lambda* = {lam_star}" in table
    kept = sorted(os.listdir(results))
    assert len(kept) == 17 and {"tables.md", "response.png"} <= set(kept)  # 15 runs, the tables, the figure
    for name in kept:
        if os.path.isdir(results / name):
            assert sorted(os.listdir(results / name)) == ["config.json", "eval.json", "metrics.jsonl"]
    first = (results / "tables.md").read_text()
    # a new machine: the run folders are gone; nothing is retrained, the tables come back the same
    shutil.rmtree(runs_dir)
    capsys.readouterr()
    ab.response_study(["lambda"], args, True, print, results_root=str(results))
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"response study: 15 runs; lambda*: {lam_star} ")
    assert sum(line.startswith("[done] lambda: ") for line in out) == 15
    assert ab.response_study(["lambda"], args, False, print, results_root=str(results)).split("## Every")[0] == \
        first.split("## Every")[0]
    assert not runs_dir.exists()  # nothing ran again
    assert ab.response_study(["lambda"], args, False, print, results_root=str(results), report_only=True) == \
        (results / "tables.md").read_text().rstrip("\n")
    # a committed result that disagrees with the design is refused, not reused
    cfg_path = next(p for p in results.glob("*/config.json"))
    saved = json.loads(cfg_path.read_text())
    saved["config"]["epochs"] = 3
    cfg_path.write_text(json.dumps(saved))
    with pytest.raises(common.UserError, match=r"other settings \(epochs\)"):
        ab.response_study(["lambda"], args, True, print, results_root=str(results))


def test_dry_run_lists_every_run_with_minutes(tmp_path, capsys):
    ab.main(["--study", "response", "--dry-run", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    runs = ab.response_runs()
    listed = [l for l in out if l.startswith("[")]
    assert len(listed) == len(runs) == 35
    assert all("core-min" in l for l in listed) and out[-1].startswith("remaining: ~")
    assert not os.listdir(tmp_path)


def test_committed_study_results_hold_no_absolute_path():
    """Every committed result file (results/<study>/<run>/*.json) names paths relative to the repository."""
    import glob
    files = glob.glob(os.path.join(runs.REPO, "results", "*", "*", "*.json"))
    assert len(files) >= 70  # the response study: 35 runs x (config.json, eval.json) at least

    def strings(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)
        elif isinstance(v, str):
            yield v
    for f in files:
        with open(f) as fh:
            bad = [s for s in strings(json.load(fh)) if os.path.isabs(s)]
        assert not bad, f"{f} names absolute paths: {bad}"
