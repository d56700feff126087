"""The table of README.md: Fashion-MNIST test accuracy at early stop of MNIST tickets (this folder's JSON files)
beside Fashion-MNIST's own IMP ticket and random reinit (their run folders under runs/, see README.md).

    python results/lenet300_100_quick_transfer/table.py [RUNS]      # RUNS: the run root (default runs)
"""
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = sys.argv[1] if len(sys.argv) > 1 else "runs"
FM_IMP, FM_REINIT = "lenet300_100_imp_7355be88a4", "lenet300_100_reinit_8799d3b09d"
ROUNDS, SEEDS = (4, 8, 12, 16), (0, 1)


def metrics(exp: str, seed: int, r: int) -> dict:
    with open(os.path.join(RUNS, exp, f"seed_{seed}", f"round_{r:02d}", "metrics.json")) as f:
        return json.load(f)


def mine(kind: str, seed: int, r: int) -> dict:
    with open(os.path.join(HERE, f"{kind}_s{seed}_r{r}.json")) as f:
        return json.load(f)


rows = [("Fashion-MNIST's own ticket (its masks, θ0)", lambda s, r: metrics(FM_IMP, s, r)),
        ("MNIST's ticket (MNIST's masks, θ0)", lambda s, r: mine("mnist_ticket", s, r)),
        ("MNIST's masks, new weights", lambda s, r: mine("mnist_masks_fresh", s, r)),
        ("Fashion-MNIST's random reinit (its masks, new weights)", lambda s, r: metrics(FM_REINIT, s, r))]
pct = [statistics.fmean(metrics(FM_IMP, s, r)["percent_remaining"] for s in SEEDS) for r in ROUNDS]
dense = statistics.fmean(metrics(FM_IMP, s, 0)["early_stop_test_acc"] for s in SEEDS)
print(f"Fashion-MNIST test accuracy at early stop (%), mean of seeds {SEEDS} [min, max]; the dense network: "
      f"{100 * dense:.2f}\n")
print("| weights remaining | " + " | ".join(f"{p:.3g}%" for p in pct) + " |")
print("|---|" + "---|" * len(ROUNDS))
for name, get in rows:
    cells = []
    for r in ROUNDS:
        v = [100 * get(s, r)["early_stop_test_acc"] for s in SEEDS]
        cells.append(f"{statistics.fmean(v):.2f} [{min(v):.2f}, {max(v):.2f}]")
    print(f"| {name} | " + " | ".join(cells) + " |")
