"""CPU benchmark: sparse-lth's layers against the dense-masking baseline, in one run.

Cases (issue 2): a LeNet-300-100 training step (batch 60, Adam) and a 1024x1024 linear layer forward+backward
(batch 256), at densities 100/20/5/2/1%; with ``--cases conv6``, a Conv-6 training step on CIFAR-10-shaped
synthetic data (batch 60, Adam 3e-4, every layer at the density: 6 conv layers, 3 linear). The baseline is DESIGN.md's dense masking: an eager model whose forward
multiplies each weight by its mask, torch.optim, gradients masked and weights re-masked after each step. fp32.

    python benchmarks/bench_layers_cpu.py            # writes benchmarks/results/layers_cpu_<machine>-<N>-threads.{csv,md}
    python benchmarks/bench_layers_cpu.py --cases conv6 --repeats 11   # layers_conv6_cpu_<machine>-<N>-threads.*

Implementations timed against each other, interleaved within every repeat (in a random order drawn anew every repeat) so machine noise hits all alike:
``dense_masking`` (the baseline), ``sparse_lth_auto`` (the layer's own path choice: on the CPU by density),
``sparse_lth_timed`` (the choice by timing, as on CUDA: ``choose_paths(..., timed=True)`` / ``layer.time_paths``,
the sparse path with each op on the sparse ops or dense; in a training step each timed step includes the step of
the training's optimizer, passed as ``optimizer=``, as the IMP driver does), for a training step
``sparse_lth_timed_fwd_bwd`` (the choice by timing the forward and backward only), and the layer forced onto each path
(``sparse_lth_dense``, ``sparse_lth_sparse``). For the LeNet step also: ``dense_masking_fused_adam`` (the baseline
with torch's fused Adam) and the automatic paths with torch's fused Adam (``sparse_lth_auto_fused_adam``) and with
sparse-lth's mask-aware Adam (``sparse_lth_auto_mask_aware_adam``), those two against the fused baseline (the CSV's
``baseline`` column names the row each speedup divides): torch's default Adam on the CPU is single-tensor and its
sqrt goes through MKL, several times slower on zeros, and a pruned weight leaves zeros in the second moment under
dense masking and on sparse-lth's dense path, not on its sparse path. Speed is reported, never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

from baselines import (RESULTS, MaskedLinear, baseline_step, cpu_device_label, cpu_name, exact_mask, git_commit,
                       interleaved_samples, masked_baseline, path_letter, plain_step, quantiles_ms, random_masks, slug,
                       wall_ms, write_rows)

import sparse_lth.optim
from sparse_lth.layers import SparseLinear, choose_paths, sparse_layers, sparsify
from sparse_lth.models import build_model

DENSITIES = (1.0, 0.2, 0.05, 0.02, 0.01)




# ------------------------------------------------------------------------- timing
def interleaved_medians(fns: dict, repeats: int, inner: int, warmup: int = 3) -> dict[str, list[float]]:
    return interleaved_samples(fns, repeats, lambda f: wall_ms(f, inner), warmup)


# the other optimizers a training step is timed with (``bench_model_step(..., other_optimizers=True)``): torch's
# default Adam (single-tensor on the CPU) runs its sqrt through MKL, which is several times slower on zeros, and a
# pruned weight's second moment is zero on the dense path and under dense masking; torch's fused Adam is not
OPTIMIZER_LABELS = {"": "torch Adam", "_fused_adam": "torch Adam fused", "_mask_aware_adam": "sparse_lth Adam"}


def _adam(suffix: str, params, lr: float) -> torch.optim.Optimizer:
    if suffix == "_fused_adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if suffix == "_mask_aware_adam":
        return sparse_lth.optim.Adam(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


def _optimizer_label(impl: str) -> str:
    """The optimizer a training step's row steps with, by the suffix of its name."""
    return next((label for s, label in OPTIMIZER_LABELS.items() if s and impl.endswith(s)), OPTIMIZER_LABELS[""])


def bench_model_step(model_name: str, x: torch.Tensor, lr: float, density: float, repeats: int, inner: int,
                     other_optimizers: bool = False) -> dict:
    """One training step of ``model_name`` (Adam, every layer at ``density``): dense masking against sparse-lth.
    ``other_optimizers``: also dense masking with torch's fused Adam (``dense_masking_fused_adam``) and sparse-lth's
    automatic paths with it (``sparse_lth_auto_fused_adam``) and with sparse-lth's mask-aware Adam
    (``sparse_lth_auto_mask_aware_adam``), those two compared with the fused baseline (``baselines``)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    masks = random_masks(build_model(model_name, seed=0), density, gen)
    fns, paths, compared = {}, {}, {}
    b = masked_baseline(build_model(model_name, seed=0), masks)
    bo = torch.optim.Adam(b.parameters(), lr=lr)
    fns["dense_masking"] = lambda: baseline_step(b, bo, x, y)
    if other_optimizers:
        bf = masked_baseline(build_model(model_name, seed=0), masks)
        bfo = _adam("_fused_adam", bf.parameters(), lr)
        fns["dense_masking_fused_adam"] = lambda: baseline_step(bf, bfo, x, y)
        for suffix in ("_fused_adam", "_mask_aware_adam"):
            m = sparsify(build_model(model_name, seed=0), masks=masks, path="auto")
            o = _adam(suffix, m.parameters(), lr)
            fns[f"sparse_lth_auto{suffix}"] = (lambda m=m, o=o: plain_step(m, o, x, y))
            paths[f"sparse_lth_auto{suffix}"] = "/".join(path_letter(l) for _, l in sparse_layers(m))
            compared[f"sparse_lth_auto{suffix}"] = "dense_masking_fused_adam"
    for path in ("auto", "timed", "timed_fwd_bwd", "dense", "sparse"):
        m = sparsify(build_model(model_name, seed=0), masks=masks, path="auto" if path.startswith("timed") else path)
        if path == "timed":  # each timed step with the training's optimizer step, as the IMP driver times
            choose_paths(m, x, timed=True, optimizer=lambda ps: torch.optim.Adam(ps, lr=lr))
        elif path == "timed_fwd_bwd":  # the forward and backward only, as the timed choice was before it took one
            choose_paths(m, x, timed=True)
        o = torch.optim.Adam(m.parameters(), lr=lr)
        fns[f"sparse_lth_{path}"] = (lambda m=m, o=o: plain_step(m, o, x, y))
        paths[f"sparse_lth_{path}"] = "/".join(path_letter(l) for _, l in sparse_layers(m))
    return {"samples": interleaved_medians(fns, repeats, inner=inner), "paths": paths,
            "optimizers": {k: _optimizer_label(k) for k in fns}, "baselines": compared}


def bench_lenet(density: float, repeats: int) -> dict:
    return bench_model_step("lenet300_100", torch.randn(60, 1, 28, 28), 1.2e-3, density, repeats, inner=10,
                            other_optimizers=True)


def bench_conv6(density: float, repeats: int) -> dict:
    return bench_model_step("conv6", torch.randn(60, 3, 32, 32), 3e-4, density, repeats, inner=1)


def bench_linear(density: float, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    n, batch = 1024, 256
    mask = exact_mask((n, n), density, gen)  # exact live count, as IMP's masks
    x = torch.randn(batch, n, generator=gen)
    dy = torch.randn(batch, n, generator=gen)
    ref = nn.Linear(n, n)
    b = MaskedLinear(ref, mask)

    def baseline():
        xi = x.requires_grad_(True)
        xi.grad = None  # (else every backward also accumulates dx into the shared leaf's .grad)
        b.zero_grad(set_to_none=True)
        b(xi).backward(dy)
        b.weight.grad.mul_(b.mask)

    fns, paths = {"dense_masking": baseline}, {}
    for path in ("auto", "timed", "dense", "sparse"):
        layer = SparseLinear.from_dense(ref, mask, path="auto" if path == "timed" else path)
        if path == "timed":
            layer.time_paths((batch, n))

        def run(layer=layer):
            xi = x.requires_grad_(True)
            xi.grad = None
            layer.zero_grad(set_to_none=True)
            layer(xi).backward(dy)

        fns[f"sparse_lth_{path}"] = run
        paths[f"sparse_lth_{path}"] = layer.path_label
    return {"samples": interleaved_medians(fns, repeats, inner=3), "paths": paths}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=61, help="timed repeats per implementation (median taken)")
    ap.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/...)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--cases", choices=("linear", "conv6"), default="linear",
                    help="linear: the LeNet-300-100 step and the 1024x1024 layer (default); conv6: the Conv-6 step")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: needs at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev_name = cpu_name()
    meta = {"device": cpu_device_label(),
            "torch": torch.__version__, "commit": git_commit()}
    rows = []
    cases = ([("conv6_train_step_b60", bench_conv6)] if args.cases == "conv6" else
             [("lenet300_100_train_step_b60", bench_lenet), ("linear1024_fwd_bwd_b256", bench_linear)])
    for case, fn in cases:
        for d in args.densities:
            r = fn(d, args.repeats)
            for impl, xs in r["samples"].items():
                baseline = r.get("baselines", {}).get(impl, "dense_masking")
                base_med = statistics.median(r["samples"][baseline])
                med, p20, p80 = quantiles_ms(xs)  # one repeat is its own quantiles
                rows.append({"case": case, "density": d, "impl": impl, "path": r["paths"].get(impl, "-"),
                             "optimizer": r.get("optimizers", {}).get(impl, "-"),
                             "median_ms": round(med, 4), "p20_ms": round(p20, 4), "p80_ms": round(p80, 4),
                             "speedup_vs_dense_masking": round(base_med / med, 3), "baseline": baseline,
                             "repeats": len(xs), "dtype": "float32", **meta})
                print(f"{case:30s} d={d:<5} {impl:24s} {rows[-1]['path']:12s} median {med:8.3f} ms  "
                      f"x{base_med / med:5.2f}", flush=True)
    stem = "layers_conv6_cpu" if args.cases == "conv6" else "layers_cpu"
    out = args.out or RESULTS / f"{stem}_{slug(dev_name)}-{torch.get_num_threads()}-threads.csv"
    write_rows(rows, out)
    md = out.with_suffix(".md")
    with open(md, "w") as f:
        f.write(f"# {out.stem}\n\n{meta['device']}, torch {meta['torch']}, commit {meta['commit']}, fp32, "
                f"median of {args.repeats} interleaved repeats; speedup = dense-masking median / this median.\n"
                f"Path letters: d = dense path, s = sparse path, h = sparse path with some ops dense, per layer; "
                f"auto = the CPU's density rule, timed = the choice by timing (as on CUDA; a training step's timing "
                f"includes its optimizer's step), timed fwd+bwd = by timing the forward and backward only.\n\n"
                "| case | density | dense masking ms | sparse-lth auto ms (path) | speedup auto | timed ms (path) | "
                "speedup timed | timed fwd+bwd ms (path) | speedup timed fwd+bwd | forced sparse ms | speedup sparse |"
                "\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for case in dict.fromkeys(r["case"] for r in rows):
            for d in args.densities:
                g = {r["impl"]: r for r in rows if r["case"] == case and r["density"] == d}
                a, t, s = g["sparse_lth_auto"], g["sparse_lth_timed"], g["sparse_lth_sparse"]
                base = g["dense_masking"]["median_ms"]  # speedups from the medians (rounding them once)
                fb = g.get("sparse_lth_timed_fwd_bwd")  # (a layer's forward+backward case: its timed row is that)
                fb_cells = (f"{fb['median_ms']:.3f} ({fb['path']}) | {base / fb['median_ms']:.2f}x" if fb else "- | -")
                f.write(f"| {case} | {d:g} | {base:.3f} | {a['median_ms']:.3f} "
                        f"({a['path']}) | {base / a['median_ms']:.2f}x | {t['median_ms']:.3f} ({t['path']}) "
                        f"| {base / t['median_ms']:.2f}x | {fb_cells} | {s['median_ms']:.3f} | "
                        f"{base / s['median_ms']:.2f}x |\n")
        other = [r for r in rows if r["impl"] == "dense_masking_fused_adam"]
        if other:
            f.write("\nThe training steps with other optimizers (same masks, same run): dense masking with torch's "
                    "default Adam and with torch's fused Adam (`fused=True`); sparse-lth's automatic paths with "
                    "torch's fused Adam and with sparse-lth's mask-aware Adam, each speedup against dense masking "
                    "with torch's fused Adam. (torch's default Adam on the CPU takes MKL's sqrt, several times "
                    "slower on the zeros a pruned weight leaves in its second moment; the fused one does not.)\n\n"
                    "| case | density | dense masking, torch Adam ms | dense masking, fused Adam ms | "
                    "auto + fused Adam ms (path) | speedup | auto + sparse_lth Adam ms | speedup |\n"
                    "|---|---|---|---|---|---|---|---|\n")
            for bf in other:
                g = {r["impl"]: r for r in rows if r["case"] == bf["case"] and r["density"] == bf["density"]}
                base = bf["median_ms"]
                af, am = g["sparse_lth_auto_fused_adam"], g["sparse_lth_auto_mask_aware_adam"]
                f.write(f"| {bf['case']} | {bf['density']:g} | {g['dense_masking']['median_ms']:.3f} | {base:.3f} | "
                        f"{af['median_ms']:.3f} ({af['path']}) | {base / af['median_ms']:.2f}x | "
                        f"{am['median_ms']:.3f} | {base / am['median_ms']:.2f}x |\n")
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
