#!/usr/bin/env python
"""Benchmark the direct sparse conv2d Triton kernels against dense masking, on every distinct conv layer of
VGG-19 and ResNet-20 on CIFAR-10 (batch 128) and of Conv-6 (batch 60).

Runs on CUDA only (the kernels' speed means nothing through the CPU interpreter), but for --dry-run (below). For
each layer, density (100/50/20/10/5/2/1 % by default) and direction (forward, backward = input + weight gradient
given dy and the saved input, both = forward + backward) it times, with ``triton.testing.do_bench`` (median, p20,
p80):

  triton_sparse      kernels/sparse_conv.py, fp32 and bf16 (fp32 accumulation)
  dense_mask         F.conv2d(x, weight * mask) + autograd, cuDNN, fp32 with TF32 on (PyTorch's default for
                     convolutions, torch.backends.cudnn.allow_tf32=True) and off (IEEE fp32)
  dense_mask_amp     the same under torch.autocast(bfloat16)
  unfold_csr         F.unfold + torch.sparse CSR matmul (cuSPARSE) + F.fold; weight gradient by
                     torch.sparse.sampled_addmm; fp32
  sparse_lth_layer   what a user gets: SparseConv2d through autograd after ``layer.time_paths`` (the automatic
                     choice: dense path, or sparse path with each op on the kernels or on cuDNN; the ``path``
                     column names it), fp32 with TF32 on (PyTorch's default) and under bf16 autocast

and writes one row per measurement to benchmarks/results/conv_<device-slug>.csv, then prints a table with speedups
against dense masking (fp32 rows against TF32-on dense masking, bf16 rows against bf16-autocast dense masking).

--dry-run runs the whole code path (every implementation, direction and dtype, and the correctness check) on CPU,
the Triton kernels through Triton's interpreter, on tiny layers (DRY_RUN_LAYERS: 3->4 channels on 5x5 pixels with a
bias, and 4->5 channels stride 2 without, batch 2) at densities 1 and 0.1, unless --layers / --densities say
otherwise (--layers then picks among the dry/* and the real layers). It checks the script, not the speed: do_bench
gives way to a few perf_counter-timed calls, peak_mem_bytes is left empty, the device column reads "cpu-dry-run
(Triton interpreter)", and rows go to a fresh temporary folder unless --out is given (never to benchmarks/results/).
The interpreter must be switched on before Triton is imported, so TRITON_INTERPRET=1 must come from the
environment (the script refuses to dry-run without it and never sets it). Implementations torch cannot run on CPU
are listed as skipped.

  python benchmarks/bench_conv_gpu.py                 # everything (about 10-20 minutes)
  python benchmarks/bench_conv_gpu.py --quick         # a few layers and densities, shorter timing (to a temp folder)
  python benchmarks/bench_conv_gpu.py --costs         # flops / minimum bytes per layer (no GPU needed)
  TRITON_INTERPRET=1 python benchmarks/bench_conv_gpu.py --dry-run --out /tmp/conv_dry.csv   # CPU, seconds
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from baselines import (DRY_RUN_DEVICE, cpu_name, dry_run_out, dry_run_problem, empty_cache, git_commit,
                       peak_memory, print_skipped, slug, synchronize, time_ms)

ROOT = Path(__file__).resolve().parent.parent
DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
DRY_RUN_DENSITIES = (1.0, 0.1)
DRY_RUN_CALLS = 3  # --dry-run: timed calls per row
DIRECTIONS = ("forward", "backward", "both")
IMPLS = ("triton_sparse", "dense_mask", "dense_mask_amp", "unfold_csr", "sparse_lth_layer")
FIELDS = ["layer", "shape", "batch", "density", "dtype", "impl", "direction", "median_ms", "p20_ms", "p80_ms",
          "peak_mem_bytes", "device", "commit", "count", "nnz", "path"]


@dataclass(frozen=True)
class ConvLayer:
    name: str      # model/layer
    batch: int
    c_in: int
    c_out: int
    size: int      # input height = width
    k: int = 3
    stride: int = 1
    pad: int = 1
    bias: bool = True
    count: int = 1  # how many layers of the model have this shape

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.pad - self.k) // self.stride + 1

    @property
    def shape(self) -> str:
        return (f"x({self.batch},{self.c_in},{self.size},{self.size})*w({self.c_out},{self.c_in},{self.k},{self.k})"
                f"/s{self.stride}p{self.pad}->({self.batch},{self.c_out},{self.out_size},{self.out_size})")


def _vgg19(batch=128):
    # cfg [64,64,M,128,128,M,256x4,M,512x4,M,512x4,M], 3x3 pad 1, on 32x32
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
    seen: dict[tuple, list] = {}
    c, size, i = 3, 32, 0
    for v in cfg:
        if v == "M":
            size //= 2
            continue
        i += 1
        key = (c, v, size)
        seen.setdefault(key, []).append(i)
        c = v
    return [ConvLayer(f"vgg19/conv{idx[0]}" + (f"-{idx[-1]}" if len(idx) > 1 else ""), batch, ci, co, s,
                      count=len(idx)) for (ci, co, s), idx in seen.items()]


def _resnet20(batch=128):
    # open_lth's CIFAR ResNet-20: conv 3->16, three stages of 3 blocks (16/32/64 channels at 32/16/8 px); the
    # first conv of stages 2 and 3 has stride 2 and the block a 1x1 stride-2 projection shortcut. No conv bias.
    L = lambda *a, **k: ConvLayer(*a, bias=False, **k)  # noqa: E731
    return [
        L("resnet20/conv1", batch, 3, 16, 32),
        L("resnet20/stage1", batch, 16, 16, 32, count=6),
        L("resnet20/stage2.down", batch, 16, 32, 32, stride=2),
        L("resnet20/stage2", batch, 32, 32, 16, count=5),
        L("resnet20/stage2.shortcut", batch, 16, 32, 32, k=1, stride=2, pad=0),
        L("resnet20/stage3.down", batch, 32, 64, 16, stride=2),
        L("resnet20/stage3", batch, 64, 64, 8, count=5),
        L("resnet20/stage3.shortcut", batch, 32, 64, 16, k=1, stride=2, pad=0),
    ]


def _conv6(batch=60):
    # Conv-6: 64,64,M,128,128,M,256,256,M on 32x32 input, 3x3 pad 1
    return [
        ConvLayer("conv6/conv1", batch, 3, 64, 32), ConvLayer("conv6/conv2", batch, 64, 64, 32),
        ConvLayer("conv6/conv3", batch, 64, 128, 16), ConvLayer("conv6/conv4", batch, 128, 128, 16),
        ConvLayer("conv6/conv5", batch, 128, 256, 8), ConvLayer("conv6/conv6", batch, 256, 256, 8),
    ]


def all_layers() -> list[ConvLayer]:
    return _vgg19() + _resnet20() + _conv6()


# --dry-run: tiny layers (3x3 pad 1 with a bias; 3x3 stride 2 without, as ResNet-20's downsampling convs), odd sizes
# so that every block of the kernels is partial. The interpreter takes ~0.1-0.5 s per kernel call even here.
DRY_RUN_LAYERS = [
    ConvLayer("dry/conv", 2, 3, 4, 5),
    ConvLayer("dry/down", 2, 4, 5, 5, stride=2, bias=False),
]


# ----------------------------------------------------------------------------------------------------------------
# costs (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------
def layer_costs(layer: ConvLayer, density: float, elem_bytes: int = 4) -> dict:
    """Flops (2 per multiply-add, padding taps counted) and the minimum bytes each op must move: read its inputs
    once and write its outputs once. Sparse weights cost values + 4-byte column index + row pointers."""
    n, o = layer.batch, layer.out_size
    cols = layer.c_in * layer.k * layer.k
    dense_w = layer.c_out * cols
    nnz = round(density * dense_w)
    x = n * layer.c_in * layer.size * layer.size * elem_bytes
    y = n * layer.c_out * o * o * elem_bytes
    w = nnz * (elem_bytes + 4) + (layer.c_out + 1) * 4 + (layer.bias * layer.c_out * elem_bytes)
    flops = 2 * n * o * o * nnz
    return dict(nnz=nnz, fwd_flops=flops, bwd_flops=2 * flops,
                fwd_bytes=x + w + y,                         # x, W -> y
                bwd_bytes=(y + w + x) + (x + y + nnz * elem_bytes))  # dy, W -> dx ; dy, x -> dW (live)


def print_costs(layers, densities):
    print(f"{'layer':28s} {'shape':62s} {'dens':>5s} {'nnz':>9s} {'fwd GFLOP':>9s} {'fwd MB':>8s} "
          f"{'fwd F/B':>7s} {'bwd GFLOP':>9s} {'bwd MB':>8s}")
    for layer in layers:
        for d in densities:
            c = layer_costs(layer, d)
            print(f"{layer.name:28s} {layer.shape:62s} {d:5.0%} {c['nnz']:9d} {c['fwd_flops'] / 1e9:9.3f} "
                  f"{c['fwd_bytes'] / 1e6:8.2f} {c['fwd_flops'] / c['fwd_bytes']:7.1f} "
                  f"{c['bwd_flops'] / 1e9:9.3f} {c['bwd_bytes'] / 1e6:8.2f}")


# ----------------------------------------------------------------------------------------------------------------
# implementations: each returns {direction: fn}, all set up on the device of their tensors (the GPU; the CPU in a
# --dry-run)
# ----------------------------------------------------------------------------------------------------------------




def make_triton(layer, x, dy, weight, mask, bias, dtype):
    from sparse_lth.kernels.format import build_format, to_values
    from sparse_lth.kernels.sparse_conv import (sparse_conv2d_backward_input, sparse_conv2d_backward_weight,
                                                sparse_conv2d_forward)
    fmt = build_format(mask)
    values = to_values(weight, mask).to(dtype)
    b = bias.to(dtype) if bias is not None else None
    x, dy = x.to(dtype), dy.to(dtype)
    k, s, p = (layer.k, layer.k), layer.stride, layer.pad

    def fwd():
        return sparse_conv2d_forward(x, values, fmt, k, b, s, p)

    def bwd():
        dx = sparse_conv2d_backward_input(dy, values, fmt, x.shape, k, s, p)
        dv = sparse_conv2d_backward_weight(dy, x, fmt, k, s, p)
        db = dy.sum((0, 2, 3)) if b is not None else None
        return dx, dv, db

    def both():
        return fwd(), bwd()

    return dict(forward=fwd, backward=bwd, both=both)


def make_dense_mask(layer, x, dy, weight, mask, bias, dtype, autocast):
    """What users do today: a dense weight multiplied by its mask in the forward, autograd for the gradients."""
    import torch
    import torch.nn.functional as F

    w = weight.clone().requires_grad_()
    m = mask.to(weight.dtype)
    b = bias.clone().requires_grad_() if bias is not None else None
    xg = x.clone().requires_grad_()
    s, p = layer.stride, layer.pad
    return autograd_directions(lambda: F.conv2d(xg, w * m, b, s, p), [xg, w] + ([b] if b is not None else []),
                               dy, autocast)


def autograd_directions(forward, params, dy, autocast: bool) -> dict:
    """{forward, backward, both} closures for a module-like ``forward()`` through autograd: backward replays one
    saved graph (retain_graph), both runs the forward again; under bf16 autocast when asked."""
    import torch

    def run_fwd():
        with torch.autocast(dy.device.type, dtype=torch.bfloat16, enabled=autocast):
            return forward()

    y_saved = run_fwd()
    dy_ = dy.to(y_saved.dtype)

    def fwd():
        with torch.no_grad():
            return run_fwd()

    def bwd():
        return torch.autograd.grad(y_saved, params, dy_, retain_graph=True)

    def both():
        return torch.autograd.grad(run_fwd(), params, dy_)

    return dict(forward=fwd, backward=bwd, both=both)


def make_layer(layer, x, dy, weight, mask, bias, autocast):
    """SparseConv2d after its automatic choice, timed on this device (under autocast when asked)."""
    import torch

    from sparse_lth.layers import SparseConv2d

    conv = torch.nn.Conv2d(layer.c_in, layer.c_out, layer.k, layer.stride, layer.pad, bias=bias is not None,
                           device=x.device)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    mod = SparseConv2d.from_dense(conv, mask, path="dense", backend="triton" if x.device.type == "cuda" else
                                  "interpret")
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        label = mod.time_paths(tuple(x.shape), reps=3 if x.device.type == "cpu" else 10)
    xg = x.clone().requires_grad_()
    return dict(autograd_directions(lambda: mod(xg), [xg] + list(mod.parameters()), dy, autocast), path=label)


def make_unfold_csr(layer, x, dy, weight, mask, bias, dtype):
    """F.unfold + torch.sparse CSR x dense (cuSPARSE) + F.fold; dW at the live positions by sampled_addmm."""
    import torch
    import torch.nn.functional as F

    from sparse_lth.kernels.format import build_format, to_values
    fmt = build_format(mask)
    values = to_values(weight, mask)
    n, o, k, s, p = layer.batch, layer.out_size, layer.k, layer.stride, layer.pad
    cols, c_out, L = fmt.cols, fmt.rows, layer.out_size ** 2
    row_ptr, col_idx = fmt.row_ptr.long(), fmt.col_idx.long()
    col_ptr, t_row, t_perm = fmt.col_ptr.long(), fmt.t_row_idx.long(), fmt.t_perm.long()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    pattern = torch.sparse_csr_tensor(row_ptr, col_idx, torch.zeros_like(values), (c_out, cols),
                                      check_invariants=False)

    def im2col(xx):
        return F.unfold(xx, k, 1, p, s).transpose(0, 1).reshape(cols, n * L)

    x_saved = im2col(x)  # what the forward would save for the weight gradient

    def fwd():
        wm = torch.sparse_csr_tensor(row_ptr, col_idx, values, (c_out, cols), check_invariants=False)
        y = (wm @ im2col(x)).view(c_out, n, o, o).permute(1, 0, 2, 3)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        return y

    def bwd():
        dym = dy.permute(1, 0, 2, 3).reshape(c_out, n * L)
        wt = torch.sparse_csr_tensor(col_ptr, t_row, values[t_perm], (cols, c_out), check_invariants=False)
        dx_cols = (wt @ dym).view(cols, n, L).transpose(0, 1)
        dx = F.fold(dx_cols, (layer.size, layer.size), k, 1, p, s)
        dv = torch.sparse.sampled_addmm(pattern, dym, x_saved.t(), beta=0.0).values()
        db = dy.sum((0, 2, 3)) if bias is not None else None
        return dx, dv, db

    def both():
        return fwd(), bwd()

    return dict(forward=fwd, backward=bwd, both=both)


def check_triton(layer, x, weight, mask, bias):
    """Sanity check before timing: the fp32 kernel forward against cuDNN in IEEE fp32."""
    import torch
    import torch.nn.functional as F

    from sparse_lth.kernels.format import build_format, to_values
    from sparse_lth.kernels.sparse_conv import sparse_conv2d_forward
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        want = F.conv2d(x, weight * mask, bias, layer.stride, layer.pad)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    got = sparse_conv2d_forward(x, to_values(weight, mask), build_format(mask), layer.k, bias, layer.stride,
                                layer.pad)
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    return err / scale


def measure(fn, warmup, rep, dev):
    """(median, p20, p80, peak bytes) of fn on dev: do_bench and the CUDA allocator's peak over one call on the
    GPU; a few perf_counter-timed calls and no peak (None) on the CPU of a --dry-run."""
    fn()  # compile / warm caches outside the timed region
    synchronize(dev)
    med, p20, p80 = time_ms(fn, dev, warmup=warmup, rep=rep, cpu_calls=DRY_RUN_CALLS)
    synchronize(dev)
    peak = peak_memory(fn, dev)
    return med, p20, p80, peak


def random_mask(shape, density, gen, device):
    import torch

    numel = math.prod(shape)
    nnz = round(density * numel)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=gen)[:nnz]] = True
    return flat.view(shape).to(device)


def select_layers(names, dry_run):
    """The layers whose names contain one of the substrings ``names`` (all when none are given); --dry-run: among
    the dry/* and the real layers, the dry/* ones by default."""
    if dry_run:
        pool = DRY_RUN_LAYERS + all_layers() if names else DRY_RUN_LAYERS
    else:
        pool = all_layers()
    return [lay for lay in pool if not names or any(f in lay.name for f in names)]


def run(args):
    import torch

    if args.dry_run:
        problem = dry_run_problem("bench_conv_gpu.py")
        if problem:
            sys.exit(problem)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_conv_gpu.py: no CUDA device; these are GPU benchmarks of the Triton kernels "
                     "(use --costs for the flop/byte table, which needs no GPU).")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("bench_conv_gpu.py: TRITON_INTERPRET is set; unset it to run compiled kernels on the GPU.")
    if args.dry_run:
        dev, device_name = torch.device("cpu"), DRY_RUN_DEVICE
        out_path = Path(args.out) if args.out else dry_run_out("conv_dry_run.csv")
    else:
        dev = torch.device("cuda")
        device_name = torch.cuda.get_device_name(dev)
        out_path = Path(args.out) if args.out else (
            dry_run_out("conv_quick.csv") if args.quick  # short timing: not a result to summarize
            else ROOT / "benchmarks" / "results" / f"conv_{slug(device_name)}.csv")
    commit = git_commit()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    layers = select_layers(args.layers, args.dry_run)
    if not layers:
        sys.exit(f"bench_conv_gpu.py: no layer name contains any of {args.layers}")
    densities = args.densities
    if args.quick:
        layers = [lay for lay in layers if lay.name in ("vgg19/conv2", "vgg19/conv10-12", "resnet20/stage2",
                                                        "resnet20/stage3.shortcut", "conv6/conv4")] or layers[:3]
        densities = [d for d in densities if d in (1.0, 0.1, 0.01)] or densities[:2]
    warmup, rep = (10, 30) if args.quick else (args.warmup, args.rep)
    print(f"device: {device_name}; torch {torch.__version__}; commit {commit}; cudnn.allow_tf32 default "
          f"{torch.backends.cudnn.allow_tf32}; matmul.allow_tf32 {torch.backends.cuda.matmul.allow_tf32}")
    if args.dry_run:
        print(f"DRY RUN on {cpu_name()}: checks the code path, the times mean nothing")
    print(f"{len(layers)} layers x {len(densities)} densities -> {out_path}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    failed = []  # what could not run (e.g. an op torch lacks on this device)
    mismatches = 0
    with open(out_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for layer in layers:
            for density in densities:
                torch.manual_seed(0)
                x = torch.randn(layer.batch, layer.c_in, layer.size, layer.size, device=dev)
                weight = torch.randn(layer.c_out, layer.c_in, layer.k, layer.k, device=dev) / math.sqrt(
                    layer.c_in * layer.k * layer.k)
                mask = random_mask(weight.shape, density, gen, dev)
                bias = torch.randn(layer.c_out, device=dev) if layer.bias else None
                dy = torch.randn(layer.batch, layer.c_out, layer.out_size, layer.out_size, device=dev)
                nnz = int(mask.sum())
                rel = check_triton(layer, x, weight, mask, bias)
                if not rel < 1e-3:
                    mismatches += 1
                    print(f"WARNING {layer.name} density {density}: triton forward differs from cuDNN "
                          f"(max error / max |y| = {rel:.2e})")
                variants = []
                if "triton_sparse" in args.impls:
                    variants += [("triton_sparse", "fp32", lambda: make_triton(layer, x, dy, weight, mask, bias,
                                                                               torch.float32), None),
                                 ("triton_sparse", "bf16", lambda: make_triton(layer, x, dy, weight, mask, bias,
                                                                               torch.bfloat16), None)]
                if "dense_mask" in args.impls:
                    mk = lambda: make_dense_mask(layer, x, dy, weight, mask, bias, torch.float32, False)  # noqa
                    variants += [("dense_mask", "fp32-tf32", mk, True), ("dense_mask", "fp32-ieee", mk, False)]
                if "dense_mask_amp" in args.impls:
                    variants += [("dense_mask_amp", "bf16-autocast",
                                  lambda: make_dense_mask(layer, x, dy, weight, mask, bias, torch.float32, True),
                                  None)]
                if "unfold_csr" in args.impls:
                    variants += [("unfold_csr", "fp32",
                                  lambda: make_unfold_csr(layer, x, dy, weight, mask, bias, torch.float32), None)]
                if "sparse_lth_layer" in args.impls:
                    variants += [("sparse_lth_layer", "fp32-tf32",
                                  lambda: make_layer(layer, x, dy, weight, mask, bias, False), True),
                                 ("sparse_lth_layer", "bf16-autocast",
                                  lambda: make_layer(layer, x, dy, weight, mask, bias, True), None)]
                for impl, dtype_name, make, tf32 in variants:
                    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                    if tf32 is not None:
                        torch.backends.cudnn.allow_tf32 = tf32
                    try:
                        fns = make()
                        for direction in args.directions:
                            med, p20, p80, peak = measure(fns[direction], warmup, rep, dev)
                            row = dict(layer=layer.name, shape=layer.shape, batch=layer.batch, density=density,
                                       dtype=dtype_name, impl=impl, direction=direction, median_ms=f"{med:.5f}",
                                       p20_ms=f"{p20:.5f}", p80_ms=f"{p80:.5f}",
                                       peak_mem_bytes="" if peak is None else peak,
                                       device=device_name, commit=commit, count=layer.count, nnz=nnz,
                                       path=fns.get("path", ""))
                            writer.writerow(row)
                            fh.flush()
                            rows.append(row)
                        del fns
                    except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking
                        msg = (f"{impl}/{dtype_name} on {layer.name} density {density}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                        print(f"FAILED {msg}")
                        failed.append(msg)
                    finally:
                        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
                        empty_cache(dev)
                print(f"done {layer.name} density {density:.0%} (nnz {nnz})", flush=True)
    print_table(rows)
    print_skipped(failed, args.dry_run)
    print(f"correctness checks (triton fp32 forward against F.conv2d): {len(layers) * len(densities)} run, "
          f"{mismatches} mismatching")
    print(f"\nrows written to {out_path}")


def print_table(rows):
    """Median ms per implementation, and speedups: fp32 rows against dense masking fp32 with TF32 on (PyTorch's
    default for convolutions), bf16 rows against dense masking under bf16 autocast."""
    by = {(r["layer"], r["density"], r["direction"], r["impl"], r["dtype"]): float(r["median_ms"]) for r in rows}
    keys = sorted({(r["layer"], r["density"], r["direction"]) for r in rows},
                  key=lambda t: (t[0], -float(t[1]), DIRECTIONS.index(t[2])))
    cols = [("triton_sparse", "fp32"), ("triton_sparse", "bf16"), ("dense_mask", "fp32-tf32"),
            ("dense_mask", "fp32-ieee"), ("dense_mask_amp", "bf16-autocast"), ("unfold_csr", "fp32")]
    head = ["triton32", "triton16", "dense-tf32", "dense-ieee", "dense-bf16", "unfold-csr", "x tf32", "x bf16",
            "x csr"]
    print(f"\n{'layer':26s} {'dens':>5s} {'dir':8s} " + " ".join(f"{h:>10s}" for h in head))
    for layer, dens, direction in keys:
        t = [by.get((layer, dens, direction) + c) for c in cols]
        fmt = lambda v: f"{v:10.3f}" if v is not None else f"{'-':>10s}"  # noqa: E731
        sp = lambda a, b: f"{b / a:9.2f}x" if a and b else f"{'-':>10s}"  # noqa: E731
        print(f"{layer:26s} {float(dens):5.0%} {direction:8s} " + " ".join(fmt(v) for v in t)
              + " " + sp(t[0], t[2]) + " " + sp(t[1], t[4]) + " " + sp(t[0], t[5]))
    print("\nx tf32: dense masking fp32 (cuDNN, TF32 on) / triton fp32;  x bf16: dense masking bf16 autocast / "
          "triton bf16;  x csr: unfold+CSR fp32 / triton fp32.  >1 means the Triton kernels are faster.")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", nargs="*", default=None,
                    help="substrings of layer names to keep (e.g. vgg19 resnet20/stage3); default: all")
    ap.add_argument("--densities", nargs="*", type=float, default=None,
                    help=f"fractions of live weights (default: {list(DENSITIES)}; "
                         f"--dry-run: {list(DRY_RUN_DENSITIES)})")
    ap.add_argument("--directions", nargs="*", choices=DIRECTIONS, default=list(DIRECTIONS))
    ap.add_argument("--impls", nargs="*", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms (default: %(default)s)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="5 layers x 3 densities, short timing")
    ap.add_argument("--out", default=None, help="CSV path, written anew (default: benchmarks/results/conv_<device-"
                                                "slug>.csv; --dry-run and --quick: a new temporary folder)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the script on CPU: Triton interpreter (needs TRITON_INTERPRET=1 in the environment), "
                         "tiny dry/* layers, a few perf_counter-timed calls; the rows are not results")
    ap.add_argument("--costs", action="store_true",
                    help="print flops and minimum bytes per layer and density, then exit (no GPU needed)")
    args = ap.parse_args(argv)
    if args.quick and args.dry_run:
        ap.error("--quick and --dry-run do not go together (--dry-run has its own tiny defaults)")
    if args.densities is None:
        args.densities = list(DRY_RUN_DENSITIES if args.dry_run else DENSITIES)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.costs:
        print_costs(DRY_RUN_LAYERS if args.dry_run else all_layers(), args.densities)
        return
    # sparse_lth (with its kernels) comes from the install or PYTHONPATH: putting the repository root first on
    # sys.path would shadow it with ./sparse_lth, which has no kernels/ subpackage (kernels/ lives beside it)
    run(args)


if __name__ == "__main__":
    main()
