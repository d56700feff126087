"""CPU benchmark: where the sparse path of ``SparseLinear`` / ``SparseConv2d`` starts to beat its dense path (the
CPU density rules).

On the CPU ``path="auto"`` does not time layers (runs stay bit-reproducible); it applies density thresholds,
``sparse_lth.layers.CPU_LINEAR_SPARSE_MAX_DENSITY`` and ``CPU_CONV_SPARSE_MAX_DENSITY``. This script measures what
they should be: one layer forward + backward (input and weight gradients, bias; no input gradient for a network's
first conv layer, as in training), fp32, at each shape and density, on

* ``dense``                   the dense path (MKL / oneDNN, gradient masked as it lands);
* ``sparse``                  the sparse path, every op on the ``torch`` backend's sparse products (CSR products
                              for linear layers, shifted CSR products for conv layers: ``kernels/torch_conv.py``);
* ``sparse/<op>:dense``       the sparse path with one op run dense on the scattered values;
* ``unfold_csr`` (conv only)  the im2col alternative: ``F.unfold`` + CSR products + ``F.fold``, weight gradient
                              by ``sampled_addmm`` (``bench_conv_gpu.make_unfold_csr``; it always computes the
                              input gradient).

Configurations of one (shape, density) are timed interleaved, in a fresh random order every repeat
(``baselines.interleaved_samples``). The summary gives, per shape, the sparse path's speedup over the dense path
and the crossover: the highest density measured at which the all-sparse path is faster, with every lower density
faster too.

    python benchmarks/bench_crossover_cpu.py --threads 2
        # writes benchmarks/results/crossover_cpu_<machine>-<N>-threads.{csv,md}
    python benchmarks/bench_crossover_cpu.py --kind conv --threads 2
        # the conv layers of Conv-6 (batch 60), ResNet-20 and VGG-19 (CIFAR-10, batch 128):
        # benchmarks/results/crossover_conv_cpu_<machine>-<N>-threads.{csv,md}

Speed is reported, never asserted.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from types import SimpleNamespace

import torch
import torch.nn as nn

from baselines import (RESULTS, cpu_device_label, cpu_name, exact_mask, git_commit, interleaved_samples, slug, wall_ms,
                       write_rows)

from bench_conv_gpu import make_unfold_csr
from sparse_lth.layers import (CPU_CONV_SPARSE_MAX_DENSITY, CPU_LINEAR_SPARSE_MAX_DENSITY, OPS, SparseConv2d,
                               SparseLinear)

# (out_features, in_features, batch, inner calls per sample): the LeNet-300-100 layers at the paper's batch, a
# mid-sized layer, and a VGG-19 conv layer as a matrix product (512 x 512*3*3) at a CPU-sized batch
SHAPES = [(300, 784, 60, 10), (100, 300, 60, 20), (1024, 1024, 256, 3), (512, 4608, 256, 2)]
DENSITIES = [0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05]
# 3x3 conv layers, padding 1, as (name, c_in, c_out, input height = width, stride, batch, input gradient): every
# distinct shape of Conv-6 (batch 60) and ResNet-20 (batch 128), VGG-19's deepest (batch 128; its wider early
# layers are the shapes of the others' at more channels)
CONV_SHAPES = [
    ("conv6.1", 3, 64, 32, 1, 60, False), ("conv6.2", 64, 64, 32, 1, 60, True),
    ("conv6.3", 64, 128, 16, 1, 60, True), ("conv6.4", 128, 128, 16, 1, 60, True),
    ("conv6.5", 128, 256, 8, 1, 60, True), ("conv6.6", 256, 256, 8, 1, 60, True),
    ("resnet20.16", 16, 16, 32, 1, 128, True), ("resnet20.16-32s2", 16, 32, 32, 2, 128, True),
    ("resnet20.32", 32, 32, 16, 1, 128, True), ("resnet20.64", 64, 64, 8, 1, 128, True),
    ("vgg19.512@4", 512, 512, 4, 1, 128, True), ("vgg19.512@2", 512, 512, 2, 1, 128, True),
]
CONV_DENSITIES = [0.2, 0.1, 0.05, 0.03, 0.02, 0.01]
CONFIGS = ["dense", "sparse"] + [f"sparse/{op}:dense" for op in OPS]
CONV_CONFIGS = CONFIGS + ["unfold_csr"]


def layer_for(ref: nn.Module, mask: torch.Tensor, config: str):
    cls = SparseLinear if isinstance(ref, nn.Linear) else SparseConv2d
    if config == "dense":
        return cls.from_dense(ref, mask, path="dense")
    layer = cls.from_dense(ref, mask, path="sparse")
    if config != "sparse":
        layer.restore_path(config)
    assert layer.path_label == config, (layer.path_label, config)
    return layer


def _fns(ref: nn.Module, mask: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> dict:
    fns = {}
    for config in CONFIGS:
        layer = layer_for(ref, mask, config)

        def step(layer=layer):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(dy)

        fns[config] = step
    return fns


def step_fns(rows: int, cols: int, batch: int, density: float, gen: torch.Generator) -> dict:
    mask = exact_mask((rows, cols), density, gen)  # exact live count, as IMP's masks
    x = torch.randn(batch, cols, generator=gen).requires_grad_(True)
    return _fns(nn.Linear(cols, rows), mask, x, torch.randn(batch, rows, generator=gen))


def conv_step_fns(c_in: int, c_out: int, hw: int, stride: int, batch: int, input_grad: bool, density: float,
                  gen: torch.Generator) -> dict:
    ref = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    mask = exact_mask(ref.weight.shape, density, gen)
    x = torch.randn(batch, c_in, hw, hw, generator=gen).requires_grad_(input_grad)
    out_hw = (hw - 1) // stride + 1
    dy = torch.randn(batch, c_out, out_hw, out_hw, generator=gen)
    fns = _fns(ref, mask, x, dy)
    spec = SimpleNamespace(batch=batch, out_size=out_hw, k=3, stride=stride, pad=1, size=hw)
    fns["unfold_csr"] = make_unfold_csr(spec, x.detach(), dy, ref.weight.detach(), mask, ref.bias.detach(),
                                        torch.float32)["both"]
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
    ap.add_argument("--kind", choices=("linear", "conv"), default="linear")
    ap.add_argument("--repeats", type=int, default=None, help="default: 31 (linear), 11 (conv)")
    ap.add_argument("--densities", type=float, nargs="+", default=None,
                    help="default: " + " ".join(map(str, DENSITIES)) + " (linear), " +
                         " ".join(map(str, CONV_DENSITIES)) + " (conv)")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="shapes: OUTxINxBATCH for linear (any; default: " +
                         " ".join(f"{r}x{c}x{b}" for r, c, b, _ in SHAPES) + "), layer names for conv (" +
                         " ".join(c[0] for c in CONV_SHAPES) + ")")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (the .md summary goes beside it)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)  # the command, as given, for the table's header
    conv = args.kind == "conv"
    configs = CONV_CONFIGS if conv else CONFIGS
    args.repeats = args.repeats or (11 if conv else 31)
    args.densities = args.densities or (CONV_DENSITIES if conv else DENSITIES)
    for d in args.densities:
        if not 0.0 < d < 1.0:
            ap.error(f"--densities must lie in (0, 1), got {d}")
    if conv:
        known = {c[0]: c for c in CONV_SHAPES}
    else:
        known = {f"{r}x{c}x{b}": (r, c, b, n) for r, c, b, n in SHAPES}
    shapes = list(known.values())
    if args.shapes:
        if not conv:  # any OUTxINxBATCH: calls per timed sample as for the default shapes (~1.4e8 / r*c*b)
            for s in args.shapes:
                m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", s)
                if m and s not in known and min(map(int, m.groups())) > 0:
                    r, c, b = map(int, m.groups())
                    known[s] = (r, c, b, min(20, max(2, round(1.4e8 / (r * c * b)))))
        unknown = [s for s in args.shapes if s not in known]
        if unknown:
            ap.error(f"unknown shape(s) {unknown}; choose from {sorted(known)}"
                     + ("" if conv else " or give OUTxINxBATCH"))
        shapes = [known[s] for s in args.shapes]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = cpu_device_label()
    meta = {"device": device, "torch": torch.__version__, "commit": git_commit()}
    print(f"{device}; torch {torch.__version__}; commit {meta['commit']}; {args.repeats} interleaved repeats")
    rows = []
    gen = torch.Generator().manual_seed(0)
    table: dict[tuple, dict[float, dict[str, float]]] = {}
    for case in shapes:
        if conv:
            name, c_in, c_out, hw, stride, b, input_grad = case
            shape, inner = f"{name} {c_in}->{c_out} {hw}x{hw}" + (f" s{stride}" if stride > 1 else ""), 1
        else:
            r, c, b, inner = case
            shape = f"{r}x{c}"
        for d in sorted(args.densities, reverse=True):
            fns = (conv_step_fns(c_in, c_out, hw, stride, b, input_grad, d, gen) if conv
                   else step_fns(r, c, b, d, gen))
            samples = interleaved_samples(fns, args.repeats, lambda f: wall_ms(f, inner))
            med = {k: statistics.median(v) for k, v in samples.items()}
            table.setdefault((shape, b), {})[d] = med
            for config, ms in med.items():
                rows.append({"shape": shape, "batch": b, "density": d, "config": config,
                             "median_ms": round(ms, 4), "speedup_vs_dense_path": round(med["dense"] / ms, 3),
                             "repeats": args.repeats, "dtype": "float32", **meta})
            print(f"{shape} b{b} d={d:<5} dense {med['dense']:.3f} ms | " + " | ".join(
                f"{k} {med['dense'] / med[k]:.2f}x" for k in configs[1:]), flush=True)
    stem = "crossover_conv_cpu" if conv else "crossover_cpu"
    out = args.out or RESULTS / f"{stem}_{slug(cpu_name())}-{torch.get_num_threads()}-threads.csv"
    write_rows(rows, out)
    md = out.with_suffix(".md")
    what = ("SparseConv2d (3x3, padding 1) forward + backward (input gradient except for a first layer, weight and "
            "bias gradients)" if conv else "SparseLinear forward + backward (input, weight and bias gradients)")
    rule = CPU_CONV_SPARSE_MAX_DENSITY if conv else CPU_LINEAR_SPARSE_MAX_DENSITY
    lines = [f"# {out.stem}", "",
             f"{device}, torch {torch.__version__}, commit {meta['commit']}, fp32, one {what}, median of "
             f"{args.repeats} interleaved repeats. Cells: speedup of each sparse-path configuration over the dense "
             "path (dense-path ms / config ms). "
             f"`python benchmarks/bench_crossover_cpu.py {' '.join(argv)}`; the rule in use: sparse at or below "
             f"{rule:g} density.", "",
             "| shape | batch | density | dense path ms | " + " | ".join(configs[1:]) + " |",
             "|---|---|---|---|" + "---|" * (len(configs) - 1)]
    crossings = []
    for (shape, b), per in table.items():
        for d in sorted(per, reverse=True):
            med = per[d]
            lines.append(f"| {shape} | {b} | {d:g} | {med['dense']:.3f} | " +
                         " | ".join(f"{med['dense'] / med[k]:.2f}x" for k in configs[1:]) + " |")
        x = crossover({d: per[d]["dense"] / per[d]["sparse"] for d in per})
        crossings.append(f"- {shape} at batch {b}: the all-sparse path wins at and below "
                         f"{'no measured density' if x is None else f'{x:g}'}")
    lines += ["", "Crossover (highest measured density below which the all-sparse path wins throughout):", ""]
    lines += crossings
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(crossings))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
