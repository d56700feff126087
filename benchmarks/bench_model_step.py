"""A whole training step of a lottery-ticket network: sparse-lth against the dense-masking baseline, in one run.

    python benchmarks/bench_model_step.py --model vgg19 --batch 128 --device cuda      # issue 5's VGG-19 step
    python benchmarks/bench_model_step.py --model lenet300_100 --batch 60 --device cpu

Synthetic data of the model's input shape (timing only). Every conv/linear layer except the output layer (the
paper's VGG/ResNet setting: fc 0%) gets a random mask at each density. Implementations, interleaved per repeat:

* ``dense_masking``: DESIGN.md's baseline with torch.optim (SGD momentum 0.9 for VGG/ResNet, Adam otherwise);
* ``sparse_lth``: ``sparsify`` + each layer's automatic path (``choose_paths`` times both paths on CUDA, and on the
  sparse path each op both ways, each timed step with the row's optimizer step, as the IMP driver times; the
  ``paths`` column has one letter per layer: d dense, s sparse, h sparse with some ops dense), torch.optim;
* ``sparse_lth_optim``: the same with sparse-lth's mask-aware fused optimizer.

``--cuda-graph`` adds ``dense_masking_graph``, ``sparse_lth_graph`` and ``sparse_lth_optim_graph``: the same
steps captured once as a CUDA graph (forward, backward, masking, optimizer step) and timed as replays, with the
Adams made ``capturable=True`` (torch.optim's for the first two, sparse-lth's fused one for the third; SGD as it
is). A LeNet-sized step on a GPU is mostly host time (``bench_host_overhead.py``); a replay has none. The sparse
path's layers are capture-safe once warmed up (no op that reads back from the device: ``tests/test_layers_triton.py``),
and their parameters are the live values, so torch's capturable optimizers step them with no mask; sparse-lth's
capturable Adam keeps its step counts on the device and its tables cached (the graph steps zero their gradients
in place, so the tables built in the warm-up serve the capture). Each graph is checked against the same
step run eagerly: a
twin (a deep copy, same paths) takes the same steps eagerly and ``graph_check`` is the largest difference of
their parameters after ``--check-steps`` steps. A graph row's ``speedup_vs_dense_masking`` is against
``dense_masking_graph``. Without CUDA the "graph" is the eager step (a stand-in that checks the script, not a
figure).

fp32 (TF32 for convolutions as PyTorch's default, matmul TF32 off). Rows go to
``benchmarks/results/model_step_<device>.csv``. Speed is recorded, never asserted.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time

import torch

from baselines import (RESULTS, RowWriter, baseline_step, device_name, git_commit, interleaved_samples, make_optimizer,
                       masked_baseline, model_step_device, path_letter, plain_step, random_masks, slug)
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


def capture_step(step, device: torch.device, warmup: int):
    """The replay of a CUDA graph of ``step()``: ``warmup`` calls on a side stream first (autotuning, the layers'
    path and variant timing, optimizer state and library workspaces happen there, outside the capture), then one
    capture, as torch.cuda.graphs' whole-network example does. Without CUDA, ``step`` itself (a stand-in)."""
    if device.type != "cuda":
        for _ in range(warmup):
            step()
        return step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def graph_and_twin(model, opt_factory, step_fn, x, y, device, warmup: int, check_steps: int):
    """(replay, max |parameter difference| against an eager twin after warmup + check_steps steps each)."""
    twin = copy.deepcopy(model)
    opt, twin_opt = opt_factory(model), opt_factory(twin)
    replay = capture_step(lambda: step_fn(model, opt, x, y), device, warmup)
    for _ in range(warmup):
        step_fn(twin, twin_opt, x, y)
    for _ in range(check_steps):
        replay()
        step_fn(twin, twin_opt, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    diff = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    return replay, diff


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
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time each step captured as a CUDA graph (see the module docstring)")
    ap.add_argument("--check-steps", type=int, default=3,
                    help="steps of a graph and of its eager twin before their parameters are compared")
    args = ap.parse_args(argv)
    if args.cuda_graph and args.warmup < 1:
        ap.error("--cuda-graph needs --warmup >= 1 (the steps before the capture)")
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
    out = args.out or RESULTS / f"model_step_{args.model}_{slug(meta['device'])}.csv"
    rows = RowWriter(out)  # each row written as it is measured (a time limit keeps what was measured)
    for density in args.densities:
        masks = random_masks(proto, density, gen, skip=(proto.output_layer,))
        impls, paths, checks = {}, {}, {}
        base = masked_baseline(build_model(args.model, seed=0).to(dev), masks)
        bo = make_optimizer(torch.optim, base.parameters(), kind, hp["lr"])
        impls["dense_masking"] = lambda m=base, o=bo: baseline_step(m, o, x, y)
        for name, module in (("sparse_lth", torch.optim), ("sparse_lth_optim", sl_optim)):
            m = sparsify(build_model(args.model, seed=0).to(dev), masks=masks)
            choose_paths(m, x, optimizer=lambda ps, module=module: make_optimizer(module, ps, kind, hp["lr"]))
            o = make_optimizer(module, m.parameters(), kind, hp["lr"])
            impls[name] = lambda m=m, o=o: plain_step(m, o, x, y)
            paths[name] = "".join(path_letter(layer) for _, layer in sparse_layers(m))
        if args.cuda_graph:
            def capturable(mod, kind=kind, lr=hp["lr"]):  # (torch's capturable Adam refuses CPU tensors)
                return make_optimizer(torch.optim, mod.parameters(), kind, lr, capturable=dev.type == "cuda")

            def capturable_sl(mod, kind=kind, lr=hp["lr"]):  # sparse-lth's capturable Adam also takes CPU tensors
                return make_optimizer(sl_optim, mod.parameters(), kind, lr, capturable=True)

            # gradients zeroed in place in every graph (and its eager twin): see baselines.plain_step
            graphs = [("dense_masking_graph", masked_baseline(build_model(args.model, seed=0).to(dev), masks),
                       functools.partial(baseline_step, set_to_none=False), capturable)]
            for name, factory, module in (("sparse_lth_graph", capturable, torch.optim),
                                          ("sparse_lth_optim_graph", capturable_sl, sl_optim)):
                m = sparsify(build_model(args.model, seed=0).to(dev), masks=masks)
                choose_paths(m, x, optimizer=lambda ps, module=module: make_optimizer(module, ps, kind, hp["lr"]))
                paths[name] = "".join(path_letter(layer) for _, layer in sparse_layers(m))
                graphs.append((name, m, functools.partial(plain_step, set_to_none=False), factory))
            for name, model, step_fn, factory in graphs:
                try:
                    impls[name], checks[name] = graph_and_twin(model, factory, step_fn, x, y, dev, args.warmup,
                                                               args.check_steps)
                except RuntimeError as e:  # a capture that fails costs its row, not the others'
                    print(f"{args.model} b{args.batch} d={density:<6} {name}: capture failed: {e}", file=sys.stderr,
                          flush=True)
                    continue
                print(f"{args.model} b{args.batch} d={density:<6} {name}: parameters {checks[name]:.3g} from its "
                      "eager twin's", flush=True)
        samples = interleaved_samples(impls, args.repeats, lambda fn: time_step(fn, dev), args.warmup)
        for k, xs in samples.items():
            med = statistics.median(xs)
            base = samples.get("dense_masking_graph" if k.endswith("_graph") else "dense_masking")
            base_med = statistics.median(base) if base else float("nan")
            rows.add({**meta, "density": density, "impl": k, "paths": paths.get(k, "-"),
                         "median_ms": round(med, 4), "min_ms": round(min(xs), 4), "max_ms": round(max(xs), 4),
                         "repeats": len(xs), "speedup_vs_dense_masking": round(base_med / med, 3),
                         "graph": ("cuda" if dev.type == "cuda" else "stand-in") if k in checks else "-",
                         "graph_check": f"{checks[k]:.3g}" if k in checks else "-"})
            print(f"{args.model} b{args.batch} d={density:<6} {k:19s} {med:9.3f} ms  x{base_med / med:5.2f}  "
                  f"paths {paths.get(k, '-')}", flush=True)
    rows.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
