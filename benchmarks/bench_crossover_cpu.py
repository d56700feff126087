"""CPU benchmark: where the sparse path of ``SparseLinear`` starts to beat its dense path (the CPU density rule).

On the CPU ``path="auto"`` does not time layers (runs stay bit-reproducible); it applies a density threshold,
``sparse_lth.layers.CPU_LINEAR_SPARSE_MAX_DENSITY``. This script measures what that threshold should be: one
``SparseLinear`` forward + backward (input and weight gradients, bias), fp32, at each shape and density, on

* ``dense``                   the dense path (MKL ``F.linear``, gradient masked as it lands);
* ``sparse``                  the sparse path, every op on the ``torch`` backend's sparse products;
* ``sparse/<op>:dense``       the sparse path with one op run dense on the scattered values.

Configurations of one (shape, density) are timed interleaved, in a fresh random order every repeat
(``baselines.interleaved_samples``). The summary gives, per shape, the sparse path's speedup over the dense path
and the crossover: the highest density measured at which the all-sparse path is faster, with every lower density
faster too.

    python benchmarks/bench_crossover_cpu.py --threads 2
        # writes benchmarks/results/crossover_cpu_<machine>-<N>-threads.{csv,md}

Speed is reported, never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

from baselines import RESULTS, cpu_device_label, cpu_name, git_commit, interleaved_samples, slug, wall_ms, write_rows

from sparse_lth.layers import CPU_LINEAR_SPARSE_MAX_DENSITY, OPS, SparseLinear

# (out_features, in_features, batch, inner calls per sample): the LeNet-300-100 layers at the paper's batch, a
# mid-sized layer, and a VGG-19 conv layer as a matrix product (512 x 512*3*3) at a CPU-sized batch
SHAPES = [(300, 784, 60, 10), (100, 300, 60, 20), (1024, 1024, 256, 3), (512, 4608, 256, 2)]
DENSITIES = [0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05]
CONFIGS = ["dense", "sparse"] + [f"sparse/{op}:dense" for op in OPS]


def layer_for(ref: nn.Linear, mask: torch.Tensor, config: str) -> SparseLinear:
    if config == "dense":
        return SparseLinear.from_dense(ref, mask, path="dense")
    layer = SparseLinear.from_dense(ref, mask, path="sparse")
    if config != "sparse":
        layer.restore_path(config)
    assert layer.path_label == config, (layer.path_label, config)
    return layer


def step_fns(rows: int, cols: int, batch: int, density: float, gen: torch.Generator) -> dict:
    mask = torch.rand(rows, cols, generator=gen) < density
    ref = nn.Linear(cols, rows)
    x = torch.randn(batch, cols, generator=gen).requires_grad_(True)
    dy = torch.randn(batch, rows, generator=gen)
    fns = {}
    for config in CONFIGS:
        layer = layer_for(ref, mask, config)

        def step(layer=layer):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(dy)

        fns[config] = step
    return fns


def crossover(speedup_by_density: dict[float, float]) -> float | None:
    """The highest density at which the sparse path wins (speedup > 1) with every lower measured density winning
    too; None when it loses at the lowest."""
    best = None
    for d in sorted(speedup_by_density):
        if speedup_by_density[d] <= 1.0:
            break
        best = d
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="subset of the shapes, as OUTxINxBATCH (default: " +
                         " ".join(f"{r}x{c}x{b}" for r, c, b, _ in SHAPES) + ")")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (the .md summary goes beside it)")
    args = ap.parse_args(argv)
    for d in args.densities:
        if not 0.0 < d < 1.0:
            ap.error(f"--densities must lie in (0, 1), got {d}")
    shapes = SHAPES
    if args.shapes:
        known = {f"{r}x{c}x{b}": (r, c, b, n) for r, c, b, n in SHAPES}
        unknown = [s for s in args.shapes if s not in known]
        if unknown:
            ap.error(f"unknown shape(s) {unknown}; choose from {sorted(known)}")
        shapes = [known[s] for s in args.shapes]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = cpu_device_label()
    meta = {"device": device, "torch": torch.__version__, "commit": git_commit()}
    print(f"{device}; torch {torch.__version__}; commit {meta['commit']}; {args.repeats} interleaved repeats")
    rows = []
    gen = torch.Generator().manual_seed(0)
    table: dict[tuple, dict[float, dict[str, float]]] = {}
    for r, c, b, inner in shapes:
        for d in sorted(args.densities, reverse=True):
            samples = interleaved_samples(step_fns(r, c, b, d, gen), args.repeats, lambda f: wall_ms(f, inner))
            med = {k: statistics.median(v) for k, v in samples.items()}
            table.setdefault((r, c, b), {})[d] = med
            for config, ms in med.items():
                rows.append({"shape": f"{r}x{c}", "batch": b, "density": d, "config": config,
                             "median_ms": round(ms, 4), "speedup_vs_dense_path": round(med["dense"] / ms, 3),
                             "repeats": args.repeats, "dtype": "float32", **meta})
            print(f"{r}x{c} b{b} d={d:<5} dense {med['dense']:.3f} ms | " + " | ".join(
                f"{k} {med['dense'] / med[k]:.2f}x" for k in CONFIGS[1:]), flush=True)
    out = args.out or RESULTS / f"crossover_cpu_{slug(cpu_name())}-{torch.get_num_threads()}-threads.csv"
    write_rows(rows, out)
    md = out.with_suffix(".md")
    lines = [f"# {out.stem}", "",
             f"{device}, torch {torch.__version__}, commit {meta['commit']}, fp32, one SparseLinear forward + "
             f"backward (input, weight and bias gradients), median of {args.repeats} interleaved repeats. Cells: "
             "speedup of each sparse-path configuration over the dense path (dense-path ms / config ms). "
             f"`python benchmarks/bench_crossover_cpu.py`; the rule in use: sparse at or below "
             f"{CPU_LINEAR_SPARSE_MAX_DENSITY:g} density.", "",
             "| shape | batch | density | dense path ms | " + " | ".join(CONFIGS[1:]) + " |",
             "|---|---|---|---|" + "---|" * (len(CONFIGS) - 1)]
    crossings = []
    for (r, c, b), per in table.items():
        for d in sorted(per, reverse=True):
            med = per[d]
            lines.append(f"| {r}x{c} | {b} | {d:g} | {med['dense']:.3f} | " +
                         " | ".join(f"{med['dense'] / med[k]:.2f}x" for k in CONFIGS[1:]) + " |")
        x = crossover({d: per[d]["dense"] / per[d]["sparse"] for d in per})
        crossings.append(f"- {r}x{c} at batch {b}: the all-sparse path wins at and below "
                         f"{'no measured density' if x is None else f'{x:g}'}")
    lines += ["", "Crossover (highest measured density below which the all-sparse path wins throughout):", ""]
    lines += crossings
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(crossings))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
