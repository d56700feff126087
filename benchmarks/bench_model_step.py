"""A whole training step of a lottery-ticket network: sparse-lth against the dense-masking baseline, in one run.

    python benchmarks/bench_model_step.py --model vgg19 --batch 128 --device cuda      # issue 5's VGG-19 step
    python benchmarks/bench_model_step.py --model lenet300_100 --batch 60 --device cpu

Synthetic data of the model's input shape (timing only). Every conv/linear layer except the output layer (the
paper's VGG/ResNet setting: fc 0%) gets a random mask at each density. Implementations, interleaved per repeat:

* ``dense_masking``: DESIGN.md's baseline with torch.optim (SGD momentum 0.9 for VGG/ResNet, Adam otherwise);
* ``sparse_lth``: ``sparsify`` + each layer's automatic path (``choose_paths`` times both paths on CUDA, and on the
  sparse path each op both ways; the ``paths`` column has one letter per layer: d dense, s sparse, h sparse with
  some ops dense), torch.optim;
* ``sparse_lth_optim``: the same with sparse-lth's mask-aware fused optimizer.

fp32 (TF32 for convolutions as PyTorch's default, matmul TF32 off). Rows go to
``benchmarks/results/model_step_<device>.csv``. Speed is recorded, never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from baselines import (RESULTS, baseline_step, device_name, git_commit, interleaved_samples, make_optimizer,
                       masked_baseline, model_step_device, path_letter, plain_step, random_masks, slug, write_rows)
from sparse_lth import optim as sl_optim
from sparse_lth.layers import choose_paths, sparse_layers, sparsify
from sparse_lth.models import build_model, paper_hparams


def time_step(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vgg19")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.2, 0.05, 0.015])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = model_step_device(args)
    if dev is None:
        return 2
    hp = paper_hparams(args.model)
    kind = "sgd" if hp["optimizer"] == "sgd" else "adam"
    gen = torch.Generator().manual_seed(0)
    proto = build_model(args.model, seed=0)
    x = torch.randn(args.batch, *proto.input_shape, generator=gen).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(dev)
    meta = {"model": args.model, "batch": args.batch, "dtype": "float32", "device": device_name(dev),
            "commit": git_commit(), "torch": torch.__version__}
    rows = []
    for density in args.densities:
        masks = random_masks(proto, density, gen, skip=(proto.output_layer,))
        impls, paths = {}, {}
        base = masked_baseline(build_model(args.model, seed=0).to(dev), masks)
        bo = make_optimizer(torch.optim, base.parameters(), kind, hp["lr"])
        impls["dense_masking"] = lambda m=base, o=bo: baseline_step(m, o, x, y)
        for name, module in (("sparse_lth", torch.optim), ("sparse_lth_optim", sl_optim)):
            m = sparsify(build_model(args.model, seed=0).to(dev), masks=masks)
            choose_paths(m, x)
            o = make_optimizer(module, m.parameters(), kind, hp["lr"])
            impls[name] = lambda m=m, o=o: plain_step(m, o, x, y)
            paths[name] = "".join(path_letter(layer) for _, layer in sparse_layers(m))
        samples = interleaved_samples(impls, args.repeats, lambda fn: time_step(fn, dev), args.warmup)
        base_med = statistics.median(samples["dense_masking"])
        for k, xs in samples.items():
            med = statistics.median(xs)
            rows.append({**meta, "density": density, "impl": k, "paths": paths.get(k, "-"),
                         "median_ms": round(med, 4), "min_ms": round(min(xs), 4), "max_ms": round(max(xs), 4),
                         "repeats": len(xs), "speedup_vs_dense_masking": round(base_med / med, 3)})
            print(f"{args.model} b{args.batch} d={density:<6} {k:17s} {med:9.3f} ms  x{base_med / med:5.2f}  "
                  f"paths {paths.get(k, '-')}", flush=True)
    out = args.out or RESULTS / f"model_step_{args.model}_{slug(meta['device'])}.csv"
    write_rows(rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
