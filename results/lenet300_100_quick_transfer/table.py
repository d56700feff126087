"""The tables of README.md: the test accuracy at early stop of tickets trained on the other dataset (this folder's
JSON files) beside that dataset's own IMP ticket and random reinit (their run folders under runs/, see README.md).

    python results/lenet300_100_quick_transfer/table.py [RUNS]      # RUNS: the run root (default runs)
"""
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = sys.argv[1] if len(sys.argv) > 1 else "runs"
RUN = {"MNIST": ("lenet300_100_imp_e80cb65d84", "lenet300_100_reinit_ade6822571"),
       "Fashion-MNIST": ("lenet300_100_imp_7355be88a4", "lenet300_100_reinit_8799d3b09d")}
PREFIX = {"MNIST": "mnist", "Fashion-MNIST": "fm"}  # the files of tickets found on that dataset
ROUNDS, SEEDS = (4, 8, 12, 16), (0, 1)


def metrics(exp: str, seed: int, r: int) -> dict:
    with open(os.path.join(RUNS, exp, f"seed_{seed}", f"round_{r:02d}", "metrics.json")) as f:
        return json.load(f)


def mine(kind: str, seed: int, r: int) -> dict:
    with open(os.path.join(HERE, f"{kind}_s{seed}_r{r}.json")) as f:
        return json.load(f)


def table(found_on: str, trained_on: str) -> None:
    own_imp, own_reinit = RUN[trained_on]
    p = PREFIX[found_on]
    rows = [(f"{trained_on}'s own ticket (its masks, θ0)", lambda s, r: metrics(own_imp, s, r)),
            (f"{found_on}'s ticket (its masks, θ0)", lambda s, r: mine(f"{p}_ticket", s, r)),
            (f"{found_on}'s masks, new weights", lambda s, r: mine(f"{p}_masks_fresh", s, r)),
            (f"{trained_on}'s random reinit (its masks, new weights)", lambda s, r: metrics(own_reinit, s, r))]
    pct = [statistics.fmean(metrics(own_imp, s, r)["percent_remaining"] for s in SEEDS) for r in ROUNDS]
    dense = statistics.fmean(metrics(own_imp, s, 0)["early_stop_test_acc"] for s in SEEDS)
    print(f"### {found_on} tickets trained on {trained_on}\n")
    print(f"{trained_on} test accuracy at early stop (%), mean of seeds {SEEDS} [min, max]; the dense network: "
          f"{100 * dense:.2f}\n")
    print("| weights remaining | " + " | ".join(f"{q:.3g}%" for q in pct) + " |")
    print("|---|" + "---|" * len(ROUNDS))
    for name, get in rows:
        cells = []
        for r in ROUNDS:
            v = [100 * get(s, r)["early_stop_test_acc"] for s in SEEDS]
            cells.append(f"{statistics.fmean(v):.2f} [{min(v):.2f}, {max(v):.2f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()


table("MNIST", "Fashion-MNIST")
table("Fashion-MNIST", "MNIST")
