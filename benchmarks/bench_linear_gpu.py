#!/usr/bin/env python
"""Benchmark the Triton sparse linear kernels against dense masking and torch.sparse CSR on a CUDA GPU.

Layers (rows x cols at batch B): LeNet-300-100's 300x784 and 100x300 at batch 60, a conv-sized 512x4608 at batch
2048 and 4096x4096 at batch 4096; densities 100/50/20/10/5/2/1 %; ops ``fwd``, ``bwd`` (input + weight + bias
gradients) and ``fwd+bwd``.

Implementations (the ``impl`` column):

* ``sparse_triton``    kernels/sparse_linear.py on compact values (fp32, or bf16 values/activations with fp32
                       accumulation and fp32 weight gradients)
* ``dense_mask``       what users do today: ``F.linear(x, W * mask, b)`` through autograd, the weight gradient
                       masked after backward; fp32 with TF32 *off* (torch.backends.cuda.matmul.allow_tf32 = False)
* ``dense_mask_autocast`` the same under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (the bf16 rows)
* ``torch_sparse_csr`` torch.sparse CSR (cuSPARSE): forward ``W_csr @ x^T``, input gradient through a CSR of W^T
                       (gathering values by t_perm, as torch has no shared transposed view), weight gradient by
                       ``torch.sparse.sampled_addmm``
* ``sparse_lth_layer`` what a user gets: ``SparseLinear`` through autograd after ``layer.time_paths`` (the automatic
                       choice: dense path, or sparse path with each op on the kernels or dense, the fastest step
                       measured on the device; the ``path`` column names it), under bf16 autocast for bf16 rows
                       with fp32 master weights; the issue's "never slower than dense masking" is read off it
* ``build_format``     (op ``build_format``) the index build that runs once per mask, i.e. once per IMP round

``sparse_triton`` is what a layer gets: variant "auto", which on large ops (nnz * batch >= 2**25) times the gather
kernel against the slab kernels' configurations once per problem and keeps the fastest; every candidate's median
goes to ``variants_<out-file-stem>.csv`` beside the rows (and is printed), so one run shows both kernels.

Timing: ``triton.testing.do_bench`` (it clears L2 before every timed call) medians and 20/80 % quantiles; inputs
are also rotated among up to 8 copies when one set is smaller than 64 MiB. peak_mem_bytes is the peak of
``torch.cuda.max_memory_allocated`` over one call, with only that implementation's state and its inputs resident
(plus the shared bool mask, rows*cols bytes; the rotated input copies count too, but only for small layers).

Rows go to ``benchmarks/results/linear_<device-slug>.csv``, a new file per run (a file is one run: summarize.py
only ever divides medians of one file); ``--quick`` rows go to a fresh temporary folder unless --out is given
(their short timing is not a result to summarize). A table with speedups against fp32 dense masking (and
against bf16-autocast dense masking for the bf16 rows) is printed.

``--dry-run`` runs the whole code path (every implementation, op, dtype and the correctness check) on CPU, the
Triton kernels through Triton's interpreter, on tiny layers (7x13 at batch 5, 33x65 at batch 9) at densities 1 and
0.1 unless --shapes / --densities say otherwise. It checks the script, not the speed: do_bench gives way to a few
perf_counter-timed calls, peak_mem_bytes is left empty, the device column reads "cpu-dry-run (Triton
interpreter)", and rows go to a fresh temporary folder unless --out is given (never to benchmarks/results/). The
interpreter must be switched on before Triton is imported, so TRITON_INTERPRET=1 must come from the environment
(the script refuses to dry-run without it and never sets it). Implementations torch cannot run on CPU are reported
as skipped.

    python benchmarks/bench_linear_gpu.py                 # everything (a few minutes on an H100)
    python benchmarks/bench_linear_gpu.py --quick         # one small shape, three densities (to a temp folder)
    TRITON_INTERPRET=1 python benchmarks/bench_linear_gpu.py --dry-run --out /tmp/linear_dry.csv   # CPU, seconds
"""
from __future__ import annotations

import argparse
import atexit
import csv
import gc
import math
import os
import re
import signal
import sys
from pathlib import Path

from baselines import (DRY_RUN_DEVICE, cpu_name, dry_run_out, dry_run_problem, empty_cache, git_commit,
                       peak_memory, print_skipped, slug, synchronize, time_ms)

ROOT = Path(__file__).resolve().parents[1]

SHAPES = [  # (rows, cols, batch)
    (300, 784, 60),
    (100, 300, 60),
    (512, 4608, 2048),
    (4096, 4096, 4096),
]
DENSITIES = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01]
DRY_RUN_SHAPES = [(7, 13, 5), (33, 65, 9)]  # --dry-run defaults: odd sizes, a partial block everywhere
DRY_RUN_DENSITIES = [1.0, 0.1]
DRY_RUN_CALLS = 3  # --dry-run: timed calls per row
OPS = ["fwd", "bwd", "fwd+bwd"]
IMPLS = ["sparse_triton", "dense_mask", "sparse_lth_layer", "torch_sparse_csr"]
DTYPES = ["fp32", "bf16"]
FIELDS = ["op", "shape", "batch", "density", "dtype", "impl", "median_ms", "p20", "p80", "peak_mem_bytes",
          "device", "commit", "path"]
L2_BYTES = 64 << 20  # rotate inputs while one set is smaller than this (H100 L2: 50 MB)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, metavar="ROWSxCOLSxBATCH",
                   help="layers to run, e.g. 300x784x60 (default: the four layers above; --dry-run: "
                        f"{' '.join(f'{r}x{c}x{b}' for r, c, b in DRY_RUN_SHAPES)})")
    p.add_argument("--densities", nargs="+", type=float, default=None, metavar="D",
                   help=f"fractions of live weights (default: {DENSITIES}; --dry-run: {DRY_RUN_DENSITIES})")
    p.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS,
                   help="implementations (dense_mask means dense_mask_autocast for the bf16 rows)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=DTYPES)
    p.add_argument("--no-build-format", action="store_true", help="skip timing build_format")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup time in ms (default: %(default)s)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time in ms (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV file, written anew (default: benchmarks/results/linear_<device-slug>.csv; --dry-run "
                        "and --quick: a new temporary folder)")
    p.add_argument("--quick", action="store_true", help="one small layer, densities 1, 0.1, 0.01, fast timing")
    p.add_argument("--dry-run", action="store_true",
                   help="check the script on CPU: Triton interpreter (needs TRITON_INTERPRET=1 in the environment), "
                        "tiny layers, a few perf_counter-timed calls; the rows are not results")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick and args.dry_run:
        p.error("--quick and --dry-run do not go together (--dry-run has its own tiny defaults)")
    if args.shapes is None:
        args.shapes = [f"{r}x{c}x{b}" for r, c, b in (DRY_RUN_SHAPES if args.dry_run else SHAPES)]
    if args.densities is None:
        args.densities = list(DRY_RUN_DENSITIES if args.dry_run else DENSITIES)
    shapes = []
    for s in args.shapes:
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", s)
        if not m:
            p.error(f"bad shape {s!r}: expected ROWSxCOLSxBATCH, e.g. 300x784x60")
        shapes.append(tuple(int(v) for v in m.groups()))
    args.shapes = shapes
    for d in args.densities:
        if not 0.0 < d <= 1.0:
            p.error(f"density {d} is not in (0, 1]")
    if args.quick:
        args.shapes, args.densities, args.warmup, args.rep = [(300, 784, 60)], [1.0, 0.1, 0.01], 10, 30
    return args






def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    if args.dry_run:
        problem = dry_run_problem("bench_linear_gpu.py")
        if problem:
            print(problem, file=sys.stderr)
            return 2
    elif not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_linear_gpu.py measures the Triton kernels compiled on a CUDA GPU; no usable GPU here "
              "(torch.cuda.is_available() is False or TRITON_INTERPRET is set). Nothing was run.", file=sys.stderr)
        return 2

    import torch.nn.functional as F
    import triton

    from sparse_lth.kernels.format import build_format
    from sparse_lth.kernels.sparse_linear import (
        reference_backward_input, reference_backward_weight, reference_forward,
        sparse_linear_backward_input, sparse_linear_backward_weight, sparse_linear_forward,
    )

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.dry_run:
        dev, name = torch.device("cpu"), DRY_RUN_DEVICE
        out_path = args.out or dry_run_out("linear_dry_run.csv")
    else:
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(dev)
        out_path = args.out or (dry_run_out("linear_quick.csv") if args.quick
                                else ROOT / "benchmarks" / "results" / f"linear_{slug(name)}.csv")
    commit = git_commit()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(out_path, "w", newline="")  # one run per file: ratios are never taken across runs
    writer = csv.DictWriter(fh, fieldnames=FIELDS)
    writer.writeheader()
    print(f"device: {name}  triton {triton.__version__}  torch {torch.__version__}  commit {commit}")
    if args.dry_run:
        print(f"DRY RUN on {cpu_name()}: checks the code path, the times mean nothing")
    print(f"results -> {out_path}")
    # the variant timings are written when the run ends, also when a time limit stops it (timeout(1) sends
    # SIGTERM, made an exit here, which runs the atexit handlers): gpu_suite.sh's linear-targets part may be cut
    variants_path = out_path.parent / f"variants_{out_path.stem}.csv"
    write_variants = _once(lambda: write_variant_choices(variants_path, name, commit))
    atexit.register(write_variants)
    if not args.dry_run:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    results = []  # (op, shape, batch, density, dtype, impl, median)
    skipped = []  # what could not run (e.g. a torch.sparse op without bf16 support on this device)
    checks = [0, 0]  # correctness checks run, mismatching

    def record(op, rows, cols, batch, density, dtype, impl, q, peak, path=""):
        med, p20, p80 = q
        row = dict(op=op, shape=f"{rows}x{cols}", batch=batch, density=density, dtype=dtype, impl=impl,
                   median_ms=f"{med:.6g}", p20=f"{p20:.6g}", p80=f"{p80:.6g}",
                   peak_mem_bytes="" if peak is None else peak, device=name,
                   commit=commit, path=path)
        writer.writerow(row)
        fh.flush()
        results.append((op, f"{rows}x{cols}", batch, density, dtype, impl, med))

    def bench(fn):
        return time_ms(fn, dev, warmup=args.warmup, rep=args.rep, cpu_calls=DRY_RUN_CALLS)

    def peak_of(fn):  # None on CPU (nothing measured)
        return peak_memory(fn, dev)

    def free():
        gc.collect()
        empty_cache(dev)

    gen = torch.Generator(device=dev)
    for rows, cols, batch in args.shapes:
        for density in args.densities:
            gen.manual_seed(args.seed)
            n = rows * cols
            nnz = max(1, int(round(density * n)))
            mask = torch.zeros(n, dtype=torch.bool, device=dev)
            mask[torch.randperm(n, device=dev, generator=gen)[:nnz]] = True
            mask = mask.view(rows, cols)
            fmt = build_format(mask)
            w_full = torch.randn(rows, cols, device=dev, generator=gen) / math.sqrt(cols)
            w_full *= mask

            if not args.no_build_format:
                q = bench(lambda: build_format(mask))
                record("build_format", rows, cols, batch, density, "bool", "build_format", q,
                       peak_of(lambda: build_format(mask)))

            for dtype_name in args.dtypes:
                dt = torch.float32 if dtype_name == "fp32" else torch.bfloat16
                in_bytes = batch * (rows + cols) * (4 if dt == torch.float32 else 2)
                n_rot = max(1, min(8, L2_BYTES // max(1, in_bytes)))
                for impl in args.impls:
                    impl_name = "dense_mask_autocast" if (impl == "dense_mask" and dt != torch.float32) else impl
                    try:
                        fns = make_impl(impl, dt, torch, F, fmt, mask, w_full, rows, cols, batch, n_rot, gen, dev,
                                        sparse_linear_forward, sparse_linear_backward_input,
                                        sparse_linear_backward_weight)
                    except Exception as e:  # e.g. a torch.sparse op without bf16 support
                        print(f"  skip {impl_name} {dtype_name} {rows}x{cols} d={density}: {type(e).__name__}: {e}")
                        skipped.append(f"{impl_name} {dtype_name} {rows}x{cols}x{batch} d={density} (all ops): "
                                       f"{type(e).__name__}: {first_line(e)}")
                        free()
                        continue
                    if impl == "sparse_triton" and not args.no_check:
                        checks[0] += 1
                        checks[1] += check(fns["state"], fmt, dt, torch, reference_forward,
                                           reference_backward_input, reference_backward_weight, sparse_linear_forward,
                                           sparse_linear_backward_input, sparse_linear_backward_weight,
                                           f"{rows}x{cols}x{batch} d={density} {dtype_name}")
                    # compile and autotune outside the timed and memory-measured calls
                    fns["single_fwd"]()
                    fns["single_bwd"]()
                    fns["single_fwd+bwd"]()
                    synchronize(dev)
                    for op in args.ops:
                        fn = fns[op]
                        try:
                            peak = peak_of(fns["single_" + op])
                            q = bench(fn)
                        except Exception as e:
                            print(f"  skip {impl_name} {op} {dtype_name} {rows}x{cols} d={density}: "
                                  f"{type(e).__name__}: {e}")
                            skipped.append(f"{impl_name} {op} {dtype_name} {rows}x{cols}x{batch} d={density}: "
                                           f"{type(e).__name__}: {first_line(e)}")
                            continue
                        record(op, rows, cols, batch, density, dtype_name, impl_name, q, peak, fns.get("path", ""))
                    del fns
                    free()
            del mask, fmt, w_full
            free()
    fh.close()
    print_table(results)
    write_variants()
    print_skipped(skipped, args.dry_run)
    if not args.no_check:
        print(f"correctness checks: {checks[0]} run, {checks[1]} mismatching")
    print(f"\nrows written to {out_path}")
    return 0


def _once(fn):
    """``fn`` callable any number of times, run at most once."""
    done = []

    def run():
        if not done:
            done.append(True)
            fn()
    return run


def write_variant_choices(path: Path, device: str, commit: str) -> None:
    """What the kernels' variant "auto" timed on this run's large ops (gather kernel against each slab
    configuration, see kernels/sparse_linear.py) and chose: printed, and written to ``path`` (this run's own file)."""
    from sparse_lth.kernels.sparse_linear import variant_choices

    choices = variant_choices()
    if not choices:
        return
    fields = ["op", "n_out", "n_in", "batch", "nnz", "dtype", "batch_minor", "candidate", "median_ms", "chosen",
              "device", "commit"]
    print("\nvariant auto (one timing per problem):")
    with open(path, "w", newline="") as f:  # this run's choices, beside this run's rows
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for (op, n_out, n_in, batch, nnz, dtype, batch_minor, _), (variant, cfg, times) in choices.items():
            best = min(times.values())
            for cand, ms in times.items():
                w.writerow(dict(op=op, n_out=n_out, n_in=n_in, batch=batch, nnz=nnz, dtype=str(dtype)[6:],
                                batch_minor=batch_minor, candidate=cand, median_ms=f"{ms:.6g}",
                                chosen=ms == best, device=device, commit=commit))
            others = ", ".join(f"{c} {ms:.3f}" for c, ms in times.items() if ms != best)
            print(f"  {op:<11}{n_out}x{n_in} b{batch} nnz {nnz} {str(dtype)[6:]}: {variant} {cfg or ''} "
                  f"{best:.3f} ms  (others: {others})")
    print(f"variant timings written to {path}")


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def make_impl(impl, dt, torch, F, fmt, mask, w_full, rows, cols, batch, n_rot, gen, dev,
              sparse_linear_forward, sparse_linear_backward_input, sparse_linear_backward_weight):
    """Closures {fwd, bwd, fwd+bwd, single_*} for one implementation; inputs rotate among n_rot copies."""
    # activations arrive in dt (under bf16 autocast a hidden layer's input is the previous layer's bf16 output)
    xs = [torch.randn(batch, cols, device=dev, generator=gen).to(dt) for _ in range(n_rot)]
    dys = [torch.randn(batch, rows, device=dev, generator=gen).to(dt) for _ in range(n_rot)]
    it = [0]

    def nxt():
        it[0] = (it[0] + 1) % n_rot
        return it[0]

    if impl == "sparse_triton":
        from sparse_lth.kernels.sparse_linear import prepare_operand

        values = w_full[mask].to(dt).contiguous()
        bias = torch.zeros(rows, device=dev, dtype=dt)
        # what the autograd Function does with the row-major x and dy of every step: prepare_operand reads them in
        # place when small, else copies each batch-minor once (timed: it is part of the step); the forward's x
        # serves the weight gradient, one dy serves both gradients
        x_ops = [prepare_operand(x, fmt.nnz) for x in xs]  # what a forward saved, for the backward-only timing

        def fwd(i=None):
            i = nxt() if i is None else i
            x_op = prepare_operand(xs[i], fmt.nnz)
            return sparse_linear_forward(x_op, values, fmt, bias), x_op

        def bwd(i=None, x_op=None):
            i = nxt() if i is None else i
            x_op = x_ops[i] if x_op is None else x_op
            dy_op = prepare_operand(dys[i], fmt.nnz)
            dx = sparse_linear_backward_input(dy_op, values, fmt)
            dv = sparse_linear_backward_weight(dy_op, x_op, fmt, out_dtype=torch.float32)
            db = dy_op.sum(0, dtype=torch.float32)
            return dx, dv, db

        def both():
            i = nxt()
            _, x_op = fwd(i)
            return bwd(i, x_op)

        state = dict(values=values, bias=bias, x=xs[0], dy=dys[0])
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both, "single_fwd": lambda: fwd(0), "single_bwd": lambda: bwd(0),
                "single_fwd+bwd": both, "state": state}

    if impl == "dense_mask":
        w = w_full.clone().requires_grad_(True)
        b = torch.zeros(rows, device=dev, requires_grad=True)
        fmask = mask.to(torch.float32)
        xs = [x.requires_grad_(True) for x in xs]
        ac = dt != torch.float32

        def fwd(i=None):
            i = nxt() if i is None else i
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ac):
                return F.linear(xs[i], w * fmask, b)

        ys = [fwd(i) for i in range(n_rot)]  # graphs kept for the backward-only timing

        def bwd(i=None):
            i = nxt() if i is None else i
            w.grad = b.grad = xs[i].grad = None
            ys[i].backward(dys[i].to(ys[i].dtype), retain_graph=True)
            w.grad.mul_(fmask)  # masked gradient: pruned weights stay zero

        def both():
            i = nxt()
            w.grad = b.grad = xs[i].grad = None
            y = fwd(i)
            y.backward(dys[i].to(y.dtype))
            w.grad.mul_(fmask)

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both, "single_fwd": lambda: fwd(0), "single_bwd": lambda: bwd(0),
                "single_fwd+bwd": both}

    if impl == "sparse_lth_layer":
        from sparse_lth.layers import SparseLinear

        lin = torch.nn.Linear(cols, rows, device=dev)
        with torch.no_grad():
            lin.weight.copy_(w_full)
            lin.bias.zero_()
        layer = SparseLinear.from_dense(lin, mask, path="dense",
                                        backend="triton" if dev.type == "cuda" else "interpret")
        ac = dt != torch.float32
        xs = [x.requires_grad_(True) for x in xs]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ac):
            label = layer.time_paths((batch, cols), reps=3 if dev.type == "cpu" else 10)

        def fwd(i=None):
            i = nxt() if i is None else i
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ac):
                return layer(xs[i])

        ys = [fwd(i) for i in range(n_rot)]  # graphs kept for the backward-only timing

        def bwd(i=None):
            i = nxt() if i is None else i
            layer.zero_grad(set_to_none=True)
            xs[i].grad = None
            ys[i].backward(dys[i].to(ys[i].dtype), retain_graph=True)

        def both():
            i = nxt()
            layer.zero_grad(set_to_none=True)
            xs[i].grad = None
            y = fwd(i)
            y.backward(dys[i].to(y.dtype))

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both, "single_fwd": lambda: fwd(0), "single_bwd": lambda: bwd(0),
                "single_fwd+bwd": both, "path": label}

    if impl == "torch_sparse_csr":
        vals = w_full[mask].to(dt).contiguous()
        crow, col = fmt.row_ptr.to(torch.int64), fmt.col_idx.to(torch.int64)
        tcrow, tcol, tperm = fmt.col_ptr.to(torch.int64), fmt.t_row_idx.to(torch.int64), fmt.t_perm.to(torch.int64)
        bias = torch.zeros(rows, device=dev, dtype=dt)
        w_csr = torch.sparse_csr_tensor(crow, col, vals, (rows, cols))
        pattern = torch.sparse_csr_tensor(crow, col, torch.zeros_like(vals), (rows, cols))

        def fwd(i=None):
            i = nxt() if i is None else i
            return (w_csr @ xs[i].t()).t() + bias

        def bwd(i=None):
            i = nxt() if i is None else i
            wt_csr = torch.sparse_csr_tensor(tcrow, tcol, vals[tperm], (cols, rows))  # values regathered per step
            dx = (wt_csr @ dys[i].t()).t()
            dw = torch.sparse.sampled_addmm(pattern, dys[i].t(), xs[i], beta=0.0)
            db = dys[i].sum(0)
            return dx, dw, db

        def both():
            i = nxt()
            fwd(i)
            return bwd(i)

        fwd(0), bwd(0)  # raise here (caught by the caller) if an op lacks this dtype
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both, "single_fwd": lambda: fwd(0), "single_bwd": lambda: bwd(0),
                "single_fwd+bwd": both}

    raise ValueError(impl)


def check(state, fmt, dt, torch, ref_f, ref_i, ref_w, fwd, bwd_i, bwd_w, label):
    """Warn (loudly) when the kernels disagree with the float64 references on the benchmark's own inputs; return how
    many of the three ops disagree."""
    x, v, b, dy = state["x"], state["values"], state["bias"], state["dy"]
    tol = 1e-4 if dt == torch.float32 else 2e-2
    pairs = [("forward", fwd(x, v, fmt, b), ref_f(x.double(), v.double(), fmt, b.double())),
             ("backward_input", bwd_i(dy, v, fmt), ref_i(dy.double(), v.double(), fmt)),
             ("backward_weight", bwd_w(dy, x, fmt, out_dtype=torch.float32), ref_w(dy.double(), x.double(), fmt))]
    bad = 0
    for what, got, ref in pairs:
        scale = ref.abs().max().item() if ref.numel() else 0.0
        err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
        if not math.isfinite(err) or err > tol * max(1.0, scale):
            print(f"  !! MISMATCH {label} {what}: max err {err:.3g} (scale {scale:.3g})")
            bad += 1
    return bad


def print_table(results):
    base = {}
    for op, shape, batch, density, dtype, impl, med in results:
        if impl == "dense_mask" and dtype == "fp32":
            base[(op, shape, batch, density, "fp32")] = med
        if impl == "dense_mask_autocast":
            base[(op, shape, batch, density, "bf16")] = med
    hdr = f"{'op':<13}{'shape':>11}{'batch':>6}{'density':>8} {'dtype':<5} {'impl':<20}{'median ms':>11}" \
          f"{'vs fp32 dense':>15}{'vs bf16 dense':>15}"
    print()
    print(hdr)
    print("-" * len(hdr))
    for op, shape, batch, density, dtype, impl, med in results:
        f32 = base.get((op, shape, batch, density, "fp32"))
        b16 = base.get((op, shape, batch, density, "bf16"))
        s32 = f"{f32 / med:.2f}x" if f32 and op != "build_format" else ""
        s16 = f"{b16 / med:.2f}x" if b16 and dtype == "bf16" and op != "build_format" else ""  # bf16 rows only
        print(f"{op:<13}{shape:>11}{batch:>6}{density:>8.3g} {dtype:<5} {impl:<20}{med:>11.4f}{s32:>15}{s16:>15}")


if __name__ == "__main__":
    # timeout(1) stops a run with SIGTERM: made an exit, so the atexit handlers (the variant timings) still run
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
