"""The training loop's own step time: sparse-lth's ``train()`` (what ``sparse-lth imp`` runs every round) on a
LeNet-300-100, waiting for the device only between evaluations (as it does now) against waiting after every step
(as it did before session 29), in one run.

    python benchmarks/bench_train_loop.py --device cuda            # LeNet-300-100, batch 60, 2 % and 100 %
    python benchmarks/bench_train_loop.py --device cpu --iterations 60 --repeats 3

On a GPU a LeNet-sized step is mostly host time (``bench_host_overhead.py``); a loop that waits for the device
after every step adds the device's time to the host's, where one that lets the host run ahead overlaps them. The
two modes are the same ``train()`` call: ``stretch`` with no callback, so the loop synchronizes only at its
evaluations (one at the start, one at the end of the ``--iterations`` steps); ``per_step_sync`` with a do-nothing
callback after every step, before which the loop synchronizes (what it did after every step before); on a GPU
also ``graph``, ``train()`` with ``cuda_graph=True`` (each step replayed as a captured CUDA graph after three
warm-up steps and a capture, which its time per step includes). The figure is ``train()``'s own
``time_per_step`` (steps only, evaluations excluded), median over ``--repeats`` runs of each, interleaved. Synthetic MNIST-shaped data on the device (timing only), the paper's settings (Adam 1.2e-3,
batch 60), random masks at each density on every layer but the output layer, each layer's automatic path,
``--optimizer-impl`` torch.optim's Adam or sparse-lth's fused one. On the CPU the two modes do the same thing
(there is nothing to wait for): a check of the script, not a figure. Rows go to
``benchmarks/results/train_loop_<device>.csv``. Speed is recorded, never asserted.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch

from baselines import (RESULTS, device_name, git_commit, interleaved_samples, path_letter, random_masks, slug,
                       write_rows)
from sparse_lth.data import DeviceDataset
from sparse_lth.layers import choose_paths, sparse_layers, sparsify
from sparse_lth.models import build_model
from sparse_lth.train import TrainConfig, train


def synthetic_mnist(n: int, device: torch.device, seed: int = 0) -> DeviceDataset:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = protos[y] + torch.randn(n, 1, 28, 28, generator=g)
    return DeviceDataset(x.to(device), y.to(device))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.02, 1.0])
    ap.add_argument("--iterations", type=int, default=500, help="steps per timed train() call")
    ap.add_argument("--repeats", type=int, default=5, help="timed train() calls per mode (interleaved)")
    ap.add_argument("--optimizer-impl", nargs="+", default=["torch", "sparse_lth"], choices=["torch", "sparse_lth"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.repeats < 1:
        ap.error("--iterations and --repeats must be at least 1")
    if any(not 0 < d <= 1 for d in args.densities):
        ap.error("--densities must lie in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu, or on a GPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    train_data, test_data = synthetic_mnist(6000, dev), synthetic_mnist(1000, dev, seed=1)
    modes = ["per_step_sync", "stretch"] + (["graph"] if dev.type == "cuda" else [])
    meta = {"model": "lenet300_100", "batch": 60, "iterations": args.iterations, "device": device_name(dev),
            "commit": git_commit(), "torch": torch.__version__}
    rows = []
    gen = torch.Generator().manual_seed(0)
    for density in args.densities:
        proto = build_model("lenet300_100", seed=0)
        masks = random_masks(proto, density, gen, skip=(proto.output_layer,))
        for impl in args.optimizer_impl:
            model = sparsify(build_model("lenet300_100", seed=0).to(dev), masks=masks)
            choose_paths(model, train_data.x[:60])
            paths = "".join(path_letter(layer) for _, layer in sparse_layers(model))
            cfg = TrainConfig(optimizer="adam", lr=1.2e-3, batch_size=60, iterations=args.iterations,
                              eval_every=args.iterations, train_eval_size=0, eval_batch_size=1000, seed=0,
                              progress=False, optimizer_impl=impl)
            per_step: dict[str, list[float]] = {mode: [] for mode in modes}

            def run(mode, model=model, cfg=cfg, per_step=per_step):
                # a callback after every step makes the loop wait for the device before it: the old behaviour
                callback = (lambda it, m: None) if mode == "per_step_sync" else None
                run_cfg = dataclasses.replace(cfg, cuda_graph=True) if mode == "graph" else cfg
                out = train(model, train_data, test_data, run_cfg, callback=callback)
                per_step[mode].append(out["time_per_step"] * 1e3)
                return 0.0

            # (the timing that counts is train()'s own, recorded by run(); the first call of each is a warm-up)
            interleaved_samples({mode: (lambda mode=mode: run(mode)) for mode in per_step}, args.repeats,
                                lambda fn: fn(), warmup=1)
            med = {mode: statistics.median(xs[1:]) for mode, xs in per_step.items()}
            for mode in modes:
                xs = per_step[mode][1:]
                rows.append({**meta, "density": density, "optimizer_impl": impl, "paths": paths, "mode": mode,
                             "median_ms_per_step": round(med[mode], 4), "min_ms": round(min(xs), 4),
                             "max_ms": round(max(xs), 4), "repeats": len(xs),
                             "speedup_vs_per_step_sync": round(med["per_step_sync"] / med[mode], 3)})
                print(f"d={density:<5g} {impl:10s} {mode:14s} {med[mode]:8.4f} ms/step  "
                      f"x{med['per_step_sync'] / med[mode]:5.2f}  paths {paths}", flush=True)
    out = args.out or RESULTS / f"train_loop_{slug(meta['device'])}.csv"
    write_rows(rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
