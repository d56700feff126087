"""CPU benchmark: why torch's default Adam slows down as a network is pruned, in one run.

torch's ``sqrt`` on the CPU goes through MKL's vector math, which takes a slow error path on zeros; torch.optim's
default Adam on CPU tensors (single-tensor, as its ``foreach`` one) calls it over the whole second moment, and under
dense masking, or on sparse-lth's dense path, every pruned weight keeps a zero there. torch's fused Adam
(``fused=True``, which sparse-lth's own Adam runs on the CPU) computes its square root inline and does not slow
down. Two parts, each interleaved (a new random order every repeat):

- ``sqrt``: ``torch.sqrt`` over 235,200 fp32 values (LeNet-300-100's first layer) that are uniform in (0, 1], all
  zero, or zero at 80 % of the entries (a layer at 20 %);
- ``adam_step``: one ``step()`` alone (the gradients fixed, from one training step) over every parameter of a
  LeNet-300-100 on sparse-lth's dense path with every layer at the density (so pruned weights, their gradients
  and their Adam state are zero, as under dense masking), for ``torch.optim.Adam`` with its defaults, with
  ``foreach=True``, with ``fused=True``, and ``sparse_lth.optim.Adam`` (mask-aware: masks each gradient and weight
  too).

    python benchmarks/bench_adam_zeros_cpu.py --threads 1   # benchmarks/results/adam_zeros_cpu_<machine>-1-threads.*

Speed is reported, never asserted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from baselines import (RESULTS, cpu_device_label, cpu_name, git_commit, interleaved_samples, plain_step,
                       quantiles_ms, random_masks, slug, wall_ms, write_rows)

import sparse_lth.optim
from sparse_lth.layers import sparsify
from sparse_lth.models import build_model

SQRT_NUMEL = 300 * 784
DENSITIES = (1.0, 0.2, 0.05, 0.01)
OPTIMIZERS = {
    "torch_default": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "torch_foreach": lambda ps, lr: torch.optim.Adam(ps, lr=lr, foreach=True),
    "torch_fused": lambda ps, lr: torch.optim.Adam(ps, lr=lr, fused=True),
    "sparse_lth": lambda ps, lr: sparse_lth.optim.Adam(ps, lr=lr),
}


def sqrt_inputs(numel: int = SQRT_NUMEL) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    uniform = 1.0 - torch.rand(numel, generator=g)  # (0, 1]: no zero
    return {"uniform": uniform, "zeros": torch.zeros(numel),
            "zeros_80pct": uniform * (torch.rand(numel, generator=g) < 0.2)}


def bench_sqrt(repeats: int, inner: int) -> dict[str, list[float]]:
    return interleaved_samples({name: (lambda x=x: torch.sqrt(x)) for name, x in sqrt_inputs().items()}, repeats,
                               lambda f: wall_ms(f, inner))


def adam_steps(density: float, lr: float = 1.2e-3) -> dict:
    """``{optimizer: step}`` over a LeNet-300-100 each, on the dense path at ``density``, after one training step
    (the state exists, the gradients stay as they are: every timed step reads the same ones)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (60,), generator=gen)
    masks = random_masks(build_model("lenet300_100", seed=0), density, gen)
    steps = {}
    for name, make in OPTIMIZERS.items():
        model = sparsify(build_model("lenet300_100", seed=0), masks=masks, path="dense")
        opt = make(list(model.parameters()), lr)
        plain_step(model, opt, x, y)
        steps[name] = opt.step
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=41, help="timed repeats per case (median taken)")
    ap.add_argument("--inner", type=int, default=10, help="calls per timed repeat")
    ap.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.inner < 1:
        ap.error("--repeats and --inner need at least 1")
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        ap.error(f"--densities must be in (0, 1], got {args.densities}")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"device": cpu_device_label(), "torch": torch.__version__, "commit": git_commit()}
    rows = []

    def record(part: str, case: str, impl: str, xs: list[float]) -> None:
        med, p20, p80 = quantiles_ms(xs)
        rows.append({"part": part, "case": case, "impl": impl, "median_ms": round(med, 4), "p20_ms": round(p20, 4),
                     "p80_ms": round(p80, 4), "repeats": len(xs), "dtype": "float32", **meta})
        print(f"{part:10s} {case:14s} {impl:14s} median {med:8.4f} ms", flush=True)

    for name, xs in bench_sqrt(args.repeats, args.inner).items():
        record("sqrt", f"{SQRT_NUMEL}", name, xs)
    for d in args.densities:
        for name, xs in interleaved_samples(adam_steps(d), args.repeats, lambda f: wall_ms(f, args.inner)).items():
            record("adam_step", f"lenet_d{d:g}", name, xs)
    out = args.out or RESULTS / f"adam_zeros_cpu_{slug(cpu_name())}-{torch.get_num_threads()}-threads.csv"
    write_rows(rows, out)
    med = {(r["part"], r["case"], r["impl"]): r["median_ms"] for r in rows}
    md = out.with_suffix(".md")
    with open(md, "w") as f:
        f.write(f"# {out.stem}\n\n{meta['device']}, torch {meta['torch']}, commit {meta['commit']}, fp32, median of "
                f"{args.repeats} interleaved repeats of {args.inner} calls, ms per call.\n\n"
                f"`torch.sqrt` over {SQRT_NUMEL:,} values:\n\n| values | ms | x uniform |\n|---|---|---|\n")
        base = med[("sqrt", f"{SQRT_NUMEL}", "uniform")]
        for name in sqrt_inputs(1):
            v = med[("sqrt", f"{SQRT_NUMEL}", name)]
            f.write(f"| {name} | {v:.4f} | {v / base:.2f}x |\n")
        f.write("\nAdam's `step()` alone over LeNet-300-100 on sparse-lth's dense path (pruned weights, gradients "
                "and state zero):\n\n| density | " + " | ".join(f"{n} ms" for n in OPTIMIZERS)
                + " | default / fused |\n|---|" + "---|" * (len(OPTIMIZERS) + 1) + "\n")
        for d in args.densities:
            v = {n: med[("adam_step", f"lenet_d{d:g}", n)] for n in OPTIMIZERS}
            f.write(f"| {d:g} | " + " | ".join(f"{v[n]:.4f}" for n in OPTIMIZERS)
                    + f" | {v['torch_default'] / v['torch_fused']:.2f}x |\n")
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
