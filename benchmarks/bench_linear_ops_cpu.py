"""CPU benchmark: each op of a sparse linear layer, sparse (torch backend) against dense on the scattered values.

What the per-op choice of the sparse path (``ops=``, see ``sparse_lth/functional.py``) chooses between, op by op:

* ``forward``      sparse: ``torch_ops.linear_forward`` (CSR)      dense: scatter the values, ``F.linear``
* ``input_grad``   sparse: ``torch_ops.linear_backward_input``     dense: scatter the values, ``dy @ W``
* ``weight_grad``  sparse: ``torch_ops.linear_backward_weight``    dense: ``dy^T x`` gathered at the live positions

    python benchmarks/bench_linear_ops_cpu.py --threads 2     # writes benchmarks/results/linear_ops_cpu_<machine>.csv

fp32, random masks, medians of interleaved repeats. Speed is reported, never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from baselines import (RESULTS, cpu_device_label, cpu_name, exact_mask, git_commit, interleaved_samples, slug, wall_ms,
                       write_rows)

from sparse_lth.functional import scatter_values
from sparse_lth.kernels import torch_ops
from sparse_lth.kernels.format import build_format, to_values

SHAPES = [(300, 784, 60), (100, 300, 60), (1024, 1024, 256), (512, 4608, 256)]  # rows, cols, batch
DENSITIES = [0.5, 0.2, 0.1, 0.05, 0.02]


def ops_for(rows: int, cols: int, batch: int, density: float, gen: torch.Generator) -> dict:
    mask = exact_mask((rows, cols), density, gen)  # exact live count, as IMP's masks
    w = torch.randn(rows, cols, generator=gen) * mask
    fmt = build_format(mask)
    v = to_values(w, mask)
    flat = fmt.row_idx.long() * cols + fmt.col_idx.long()
    x, dy = torch.randn(batch, cols, generator=gen), torch.randn(batch, rows, generator=gen)
    return {
        ("forward", "sparse"): lambda: torch_ops.linear_forward(x, v, fmt),
        ("forward", "dense"): lambda: F.linear(x, scatter_values(v, flat, (rows, cols))),
        ("input_grad", "sparse"): lambda: torch_ops.linear_backward_input(dy, v, fmt),
        ("input_grad", "dense"): lambda: dy @ scatter_values(v, flat, (rows, cols)),
        ("weight_grad", "sparse"): lambda: torch_ops.linear_backward_weight(dy, x, fmt),
        ("weight_grad", "dense"): lambda: (dy.t() @ x).reshape(-1).index_select(0, flat),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=101)
    ap.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = cpu_device_label()
    meta = {"device": device, "torch": torch.__version__, "commit": git_commit()}
    rows = []
    gen = torch.Generator().manual_seed(0)
    for r, c, b in SHAPES:
        for d in args.densities:
            samples = interleaved_samples(ops_for(r, c, b, d, gen), args.repeats, wall_ms)
            med = {k: statistics.median(xs) for k, xs in samples.items()}
            for (op, impl), ms in med.items():
                rows.append({"shape": f"{r}x{c}", "batch": b, "density": d, "op": op, "impl": impl,
                             "median_ms": round(ms, 4), "repeats": args.repeats, "dtype": "float32", **meta})
            print(f"{r}x{c} b{b} d={d:<5} " + " | ".join(
                f"{op} s {med[(op, 'sparse')]:.3f} d {med[(op, 'dense')]:.3f}"
                for op in ("forward", "input_grad", "weight_grad")), flush=True)
    out = args.out or RESULTS / f"linear_ops_cpu_{slug(cpu_name())}-{torch.get_num_threads()}-threads.csv"
    write_rows(rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
