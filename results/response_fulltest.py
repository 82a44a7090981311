"""The response study's TRADES confirmation pairs (seeds 4-6, lambda 0 and 0.1) on all 10,000 test images.

Checkpoints are not committed, so each run is trained again from its committed results/response/<run>/config.json
(on another CPU the weights differ a little: bit-for-bit equality holds on one machine only; the driver prints the
largest difference of the retrained metrics.jsonl from the committed one), then last.pt is evaluated on all 10,000
test images (natural, PGD-20, test L_TP, neighbour agreement) and on the first 1,000 again, for comparison.
    OMP_NUM_THREADS=1 python results/response_fulltest.py 0 &      # lambda 0 runs
    OMP_NUM_THREADS=1 python results/response_fulltest.py 0.1      # lambda 0.1 runs
Run folders: runs/response_fulltest/<run>/ (not committed); the table is in results/response.md.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import runs  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data", "cifar10.npz")


def retrain_and_evaluate(seed, lam):
    name = f"trades_lam-{lam}_seed-{seed}_train"
    saved = os.path.join(ROOT, "results", "response", name)
    with open(os.path.join(saved, "config.json")) as fh:
        cfg = runs.Config.from_saved(json.load(fh)["config"])
    cfg.data_file, cfg.device = SHARED, "cpu"
    run_dir = os.path.join(ROOT, "runs", "response_fulltest", name)
    status = runs.run_status(run_dir)
    if status != "done":
        runs.run(cfg, run_dir, resume=status == "partial", overwrite=status != "partial" and os.path.isdir(run_dir),
                 command="results/response_fulltest.py")
    want, got = runs.read_metrics(saved), runs.read_metrics(run_dir)
    diff = max(abs(a[k] - b[k]) for a, b in zip(want, got) for k in a if k != "seconds" and isinstance(a[k], float))
    print(f"{name}: largest |difference| of metrics.jsonl values from the committed run: {diff:.3g}", flush=True)
    for n in (10000, 1000):
        ecfg = runs.EvalConfig(metrics=["nat", "pgd", "tp", "nbr"], test_n=n, nbr_k=[10, 30], device="cpu",
                               data_file=SHARED)
        runs.evaluate_run(os.path.join(run_dir, "last.pt"), ecfg, run_dir)


if __name__ == "__main__":
    for seed in (4, 5, 6):
        for lam in sys.argv[1:] or ["0", "0.1"]:
            retrain_and_evaluate(seed, lam)
