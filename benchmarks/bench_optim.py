"""Optimizer step benchmark: sparse_lth.optim (mask-aware, fused) against torch.optim + gradient masking + re-masking.

Parameter sets:
- ``vgg19``: the tensors of VGG-19 for CIFAR-10 (conv 3x3, cfg 64,64,M,128,128,M,256x4,M,512x4,M,512x4,M, then a
  512->10 fc; weights and biases: 20.03M parameters). Weights are masked at the density, biases are not.
- ``fc4096``: one 4096x4096 weight (16.8M parameters), masked at the density.
- ``tiny``: two small masked weights (7x13, 5x7) and their biases (138 parameters): not a benchmark, a smoke test
  of the script (seconds, even through Triton's interpreter). Not a default.

Densities 100/20/5/1 %. Implementations (``impl``):
- ``torch.optim-foreach+mask`` / ``torch.optim-fused+mask``: the dense-masking baseline: ``grad *= mask`` (foreach),
  ``torch.optim`` step (foreach=True / fused=True), ``p *= mask`` (foreach), over the dense tensors, with the masks
  in the parameters' dtype (as the layer benchmarks' baseline, ``torch.nn.utils.prune`` and open_lth keep them).
- ``torch.optim-foreach+boolmask`` / ``torch.optim-fused+boolmask``: the same with bool masks, which move 1 byte
  per weight instead of 4 (the faster choice on a GPU) but take a slow type-promoting path on the CPU (a bool mask
  multiply of a 4096x4096 tensor: 42 ms against 4.7 ms with a float mask, one thread here). Both are timed so the
  baseline is the better of the two on every device; ``summarize.py`` compares against the faster fused row.
- ``sparse_lth-<backend>-dense``: sparse_lth.optim with the masks attached (the dense path of a layer).
- ``sparse_lth-<backend>-compact``: sparse_lth.optim on compact vectors of the live weights (the sparse path of a
  layer: nnz elements per weight, no mask) plus the biases.
- ``torch.optim-fused-compact``: torch.optim (fused) on the same compact vectors: the floor for the compact path.

Optimizers (``op``): ``sgd`` = SGD(lr 0.1, momentum 0.9, weight decay 5e-4), the VGG-19 setting of the LTH paper;
``adam`` = Adam(lr 1e-3).

``bytes`` is the minimum memory traffic of one step of that parameter set, the same yardstick for every impl on
the same tensors: per element of a float32 parameter, SGD+momentum reads p, g, buf and writes p, buf (20 B); Adam
reads p, g, m, v and writes p, m, v (28 B); a mask adds 1 B per masked element. Dense impls are charged the dense
tensors, compact impls the compact ones. ``GBps`` = bytes / median time: the effective bandwidth of that yardstick
(an impl making several passes moves more than ``bytes``).

On CPU the torch backend is timed by the host clock: median and 20/80 % quantiles of --repeats steps after a warm-up
step, the impls of one row interleaved (one step of each per round, in a fresh random order every round: a fixed
order biased the benchmarks here by up to ~15 %, see ``baselines.interleaved_samples``); on CUDA the Triton backend
and torch.optim on CUDA are timed with triton.testing.do_bench. Rows go to benchmarks/results/optim_<device-slug>.csv. ``--backend interpret`` (CPU, TRITON_INTERPRET=1 in the environment)
runs sparse_lth's Triton kernels through Triton's interpreter: a check of the code path the CUDA run takes, not a
measurement; its rows go to a fresh temporary folder unless --out is given.

    python benchmarks/bench_optim.py                      # CPU now (the torch backend); CUDA if present
    python benchmarks/bench_optim.py --device cuda
    TRITON_INTERPRET=1 python benchmarks/bench_optim.py --device cpu --backend interpret --models tiny \
        --densities 1 0.1 --repeats 2 --out /tmp/optim_smoke.csv       # smoke run of the Triton path on CPU
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from baselines import (RowWriter, cpu_id, cpu_name, device_name, dry_run_out, git_commit, interleaved_samples,
                       interpreting, quantiles_ms, slug, time_ms, wall_ms)
from sparse_lth.optim import MASK_ATTR, SGD, Adam

ROOT = Path(__file__).resolve().parent.parent
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
MODELS = ["vgg19", "fc4096", "tiny"]
DEFAULT_MODELS = ["vgg19", "fc4096"]
BACKENDS = ["auto", "triton", "interpret", "torch"]
DENSITIES = [1.0, 0.2, 0.05, 0.01]
OPS = {
    "sgd": (SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4), 20),
    "adam": (Adam, torch.optim.Adam, dict(lr=1e-3), 28),
}
FIELDS = ["op", "model", "params", "density", "nnz", "dtype", "impl", "median_ms", "p20_ms", "p80_ms", "bytes",
          "GBps", "device", "commit"]


def model_shapes(name: str) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, masked) for every tensor of the parameter set."""
    if name == "fc4096":
        return [((4096, 4096), True)]
    if name == "tiny":
        return [((7, 13), True), ((7,), False), ((5, 7), True), ((5,), False)]
    if name != "vgg19":
        raise ValueError(f"unknown parameter set {name!r}; choose one of {MODELS}")
    shapes, c_in = [], 3
    for v in VGG19_CFG:
        if v == "M":
            continue
        shapes += [((v, c_in, 3, 3), True), ((v,), False)]
        c_in = v
    return shapes + [((10, 512), True), ((10,), False)]


def make_set(name, density, device, dtype, gen):
    """Dense tensors with masks, and the compact equivalent (live values + unmasked tensors)."""
    dense, compact = [], []
    for shape, masked in model_shapes(name):
        w = torch.randn(shape, generator=gen).to(device, dtype)
        g = torch.randn(shape, generator=gen).to(device, dtype)
        m = None
        if masked:
            m = (torch.rand(shape, generator=gen) < density).to(device) if density < 1 else \
                torch.ones(shape, dtype=torch.bool, device=device)
            w.mul_(m)
        dense.append((w, g, m))
        if m is None:
            compact.append((w.clone(), g.clone()))
        else:
            compact.append((w[m].clone(), g[m].clone()))
    return dense, compact


def params_with_grads(pairs):
    out = []
    for w, g in pairs:
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        out.append(p)
    return out


def build_impls(op, dense, compact, device, backend):
    ours_cls, ref_cls, kw, _ = OPS[op]
    impls = {}

    def baseline(kind, bool_mask):
        ps = params_with_grads([(w, g) for w, g, _ in dense])
        masks = [m if m is None or bool_mask else m.to(w.dtype) for w, _, m in dense]
        mp = [p for p, m in zip(ps, masks) if m is not None]
        mg = [p.grad for p in mp]
        mm = [m for m in masks if m is not None]
        opt = ref_cls(ps, **kw, **{kind: True})

        def step():
            torch._foreach_mul_(mg, mm)
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(mp, mm)
        return step

    for kind in ("foreach", "fused"):
        for bool_mask in (False, True):
            name = f"torch.optim-{kind}+{'boolmask' if bool_mask else 'mask'}"
            try:
                step = baseline(kind, bool_mask)
                step()
                impls[name] = ("dense", step)
            except (RuntimeError, ValueError) as e:  # fused not available for this device/dtype
                print(f"  (skipping {name}: {e})", file=sys.stderr)

    ps = params_with_grads([(w, g) for w, g, _ in dense])
    for p, (_, _, m) in zip(ps, dense):
        if m is not None:
            setattr(p, MASK_ATTR, m)
    opt_dense = ours_cls(ps, backend=backend, **kw)
    impls[f"sparse_lth-{backend}-dense"] = ("dense", opt_dense.step)

    opt_compact = ours_cls(params_with_grads(compact), backend=backend, **kw)
    impls[f"sparse_lth-{backend}-compact"] = ("compact", opt_compact.step)
    try:
        ref_compact = ref_cls(params_with_grads(compact), **kw, fused=True)
        ref_compact.step()
        impls["torch.optim-fused-compact"] = ("compact", ref_compact.step)
    except (RuntimeError, ValueError) as e:
        print(f"  (skipping torch.optim fused compact: {e})", file=sys.stderr)
    return impls


def time_impls(impls: dict, device: torch.device, repeats: int) -> dict[str, tuple[float, float, float]]:
    """``{impl: (median, p20, p80) ms}``. On CUDA each impl on its own with do_bench. On CPU the impls are timed
    interleaved, one step of each per round in a fresh random order (``baselines.interleaved_samples``), after a
    warm-up step each, so the machine's drift and each impl's neighbour hit all of them alike."""
    if device.type == "cuda":
        # rep 100 ms: 7 impls per row, and the suite's optim part has a time limit
        return {name: time_ms(fn, device, warmup=25, rep=100) for name, (_, fn) in impls.items()}
    samples = interleaved_samples({name: fn for name, (_, fn) in impls.items()}, max(1, repeats), wall_ms,
                                  warmup=1)
    return {name: quantiles_ms(ts) for name, ts in samples.items()}


def bench_device_name(device: torch.device, detailed: bool = True) -> str:
    """``baselines.device_name``, with the thread count on CPU (it is part of the result file's name) and, unless
    ``detailed`` is False (the file name), the CPU's family and model (``baselines.cpu_id``)."""
    if device.type == "cuda":
        return device_name(device)
    return f"cpu: {cpu_id() if detailed else cpu_name()} ({torch.get_num_threads()} threads)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=MODELS)
    ap.add_argument("--densities", nargs="+", type=float, default=DENSITIES)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=11, help="CPU: timed steps per row (interleaved rounds)")
    ap.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="sparse_lth.optim backend: auto = triton on CUDA, torch on CPU; interpret = the Triton "
                         "kernels on CPU through Triton's interpreter (needs TRITON_INTERPRET=1 in the environment; "
                         "checks the code path, times mean nothing)")
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/optim_<device-slug>.csv)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch.set_num_threads (1 is steadier on a loaded machine: no waiting on descheduled "
                         "pool threads)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backend = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "torch")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu)")
    if backend == "triton" and (device.type != "cuda" or interpreting()):
        ap.error("--backend triton needs --device cuda and TRITON_INTERPRET unset")
    if backend == "interpret" and (device.type != "cpu" or not interpreting()):
        ap.error("--backend interpret runs the Triton kernels on CPU through Triton's interpreter: it needs --device "
                 "cpu and TRITON_INTERPRET=1 in the environment (set before Triton is imported)")
    dev_name = bench_device_name(device)
    if args.out:
        out = Path(args.out)
    elif backend == "interpret":  # a check of the code path, not results
        out = dry_run_out(f"optim_interpret_{slug(dev_name)}.csv")
    else:
        out = ROOT / "benchmarks" / "results" / f"optim_{slug(bench_device_name(device, detailed=False))}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    elt = torch.tensor([], dtype=dtype).element_size()
    rows = RowWriter(out, FIELDS)  # each row written as it is measured (a time limit keeps what was measured)
    gen = torch.Generator().manual_seed(0)
    print(f"device: {dev_name}; backend: {backend}; dtype: {args.dtype}; commit {commit}")
    for model in args.models:
        for density in args.densities:
            dense, compact = make_set(model, density, device, dtype, gen)
            n_params = sum(w.numel() for w, _, _ in dense)
            nnz = sum(w.numel() for w, _ in compact)
            n_masked = sum(w.numel() for w, _, m in dense if m is not None)
            for op in args.ops:
                per_elt = OPS[op][3] - 3 * (4 - elt)  # p, g, p (param dtype); state stays fp32
                impls = build_impls(op, dense, compact, device, backend)
                times = time_impls(impls, device, args.repeats)
                for impl, (kind, _) in impls.items():
                    med, p20, p80 = times[impl]
                    nbytes = per_elt * (n_params if kind == "dense" else nnz) + (n_masked if kind == "dense" else 0)
                    row = dict(op=op, model=model, params=n_params, density=density, nnz=nnz, dtype=args.dtype,
                               impl=impl, median_ms=round(med, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                               bytes=nbytes, GBps=round(nbytes / (med * 1e-3) / 1e9, 2), device=dev_name,
                               commit=commit)
                    rows.add(row)
                    print(f"{op:5s} {model:7s} d={density:<5} {impl:32s} {med:9.3f} ms  [{p20:.3f}, {p80:.3f}]  "
                          f"{row['GBps']:8.2f} GB/s", flush=True)
                del impls
                gc.collect()
            del dense, compact
            gc.collect()
    if device.type == "cuda":  # did the alignment hints through the int64 -> pointer casts give vector loads?
        from sparse_lth.kernels import optim as K

        for key, handle in K.LAST_COMPILED.items():
            try:
                ptx = handle.asm["ptx"]
                print(f"PTX {key}: {ptx.count('ld.global.v4')} ld.global.v4, {ptx.count('st.global.v4')} "
                      f"st.global.v4, {ptx.count('ld.global.v2')} ld.global.v2")
            except Exception as e:  # noqa: BLE001 - inspection only
                print(f"PTX {key}: not inspectable ({e})")
    rows.close()


if __name__ == "__main__":
    main()
