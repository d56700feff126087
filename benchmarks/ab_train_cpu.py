"""A/B of the training loop between two checkouts: ``sparse-lth train`` (LeNet-300-100 on MNIST, the paper's
settings) run from checkout A and from checkout B in fresh processes, alternated, ``--repeats`` times at each
density; the figure is ``train()``'s own ``time_per_step`` (training steps only, evaluations excluded), the median
over the repeats, and the ratio A / B of the medians measured in this one run. It also says whether the two
checkouts trained the same network (every evaluation of the curve equal): a change meant to be faster only must
say "identical".

    git worktree add /tmp/before HEAD~1
    python benchmarks/ab_train_cpu.py --a /tmp/before --b . --data ../shared/data --threads 1

Rows (one per run) go to ``--out`` (default ``benchmarks/results/ab_train_cpu_<machine>-<N>-threads.csv``).
Speed is recorded, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from baselines import RESULTS, cpu_id, cpu_name, slug, write_rows

RUN = """
from sparse_lth.cli import main
raise SystemExit(main(["train", "--data", {data!r}, "--iterations", "{it}", "--eval-every", "{it}",
                       "--density", "{d}", "--threads", "{threads}", "--no-progress", "--out", {out!r}]))
"""


def commit_of(checkout: Path) -> str:
    r = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                       text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def run_once(checkout: Path, data: str, iterations: int, density: float, threads: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", RUN.format(data=data, it=iterations, d=density, threads=threads,
                                                              out=str(out))],
                          env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"ab_train_cpu.py: the run from {checkout} failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout A (e.g. a worktree of the commit before)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B")
    ap.add_argument("--data", default=os.environ.get("SPARSE_LTH_DATA"), help="MNIST folder (default "
                    "$SPARSE_LTH_DATA)")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.035])
    ap.add_argument("--iterations", type=int, default=1500, help="training steps per run (default 1500)")
    ap.add_argument("--repeats", type=int, default=6, help="runs per checkout and density (default 6)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for c in (args.a, args.b):
        if not (c / "sparse_lth" / "train.py").exists():
            ap.error(f"{c} is not a sparse-lth checkout (no sparse_lth/train.py)")
    if not args.data:
        ap.error("give --data (or $SPARSE_LTH_DATA): the MNIST folder")
    if args.iterations < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--iterations, --repeats and --threads must be at least 1")
    if any(not 0 < d <= 1 for d in args.densities):
        ap.error("--densities must lie in (0, 1]")
    arms = {"a": (args.a.resolve(), commit_of(args.a)), "b": (args.b.resolve(), commit_of(args.b))}
    device = f"cpu: {cpu_id()} ({os.cpu_count()} cores, {args.threads} threads)"
    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="ab_train_") as tmp:
        for rep in range(args.repeats):
            order = ("a", "b") if rep % 2 == 0 else ("b", "a")  # alternate which runs first
            for d in args.densities:
                for arm in order:
                    checkout, commit = arms[arm]
                    m = run_once(checkout, args.data, args.iterations, d, args.threads,
                                 Path(tmp) / f"{arm}_{d}_{rep}.json")
                    curves.setdefault((arm, d), m["curve"])
                    rows.append(dict(arm=arm, checkout=str(checkout), commit=commit, density=d, repeat=rep,
                                     iterations=args.iterations, us_per_step=round(m["time_per_step"] * 1e6, 1),
                                     test_acc=m["test_acc"], device=device))
                    print(f"rep {rep} d={d:<6g} {arm} ({commit}): {rows[-1]['us_per_step']:8.1f} us/step",
                          flush=True)
    out = args.out or RESULTS / f"ab_train_cpu_{slug(cpu_name())}-{args.threads}-threads.csv"
    write_rows(rows, out)
    print(f"\n{device}; A = {arms['a'][1]}, B = {arms['b'][1]}; median of {args.repeats} runs of "
          f"{args.iterations} steps")
    for d in args.densities:
        med = {arm: statistics.median(r["us_per_step"] for r in rows if r["arm"] == arm and r["density"] == d)
               for arm in arms}
        same = curves[("a", d)] == curves[("b", d)]
        print(f"density {d:g}: A {med['a']:.0f} us/step, B {med['b']:.0f} us/step, A/B {med['a'] / med['b']:.3f}x; "
              f"trained networks {'identical' if same else 'DIFFERENT'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
