#!/usr/bin/env python
"""Turn the rows under benchmarks/results/ into tables, target checks and plots for README.

Reads whatever result files exist for one device (``--device SLUG`` picks the files whose name ends in that slug;
by default every device found, each summarized on its own):

* ``linear_<dev>.csv``       (bench_linear_gpu.py)  speedup of the Triton sparse linear kernels over dense masking
* ``conv_*<dev>.csv``        (bench_conv_gpu.py)    the same for the sparse conv kernels, per layer
* ``optim_*<dev>.csv``       (bench_optim.py)       optimizer step against torch.optim + masking, and its floor
* ``model_step_*<dev>.csv``  (bench_model_step.py)  whole training steps, automatic path choice
* ``ceilings_<dev>.csv``     (bench_ceilings.py)    measured bandwidth, the floor of the optimizer step
* ``train_loop_<dev>.csv``   (bench_train_loop.py)  train()'s step time, waiting for the device between
  evaluations only against after every step

and writes ``benchmarks/results/summary_<dev>.md`` (tables and the issues' targets with the measured ratio and
whether it is met) and ``summary_<dev>_*.png`` (speedup against density). Every figure is a ratio of two medians
of the same run on the same device; nothing is measured here.

    python benchmarks/summarize.py                       # every device with results
    python benchmarks/summarize.py --device nvidia-h100-80gb-hbm3
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------------- reading
def read_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows += [dict(r, _file=Path(p).name) for r in csv.DictReader(f)]
    return rows


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _dens(v) -> float:
    return round(_f(v), 6)


def runs(rows) -> list[list[dict]]:
    """The rows grouped by the run that measured them. A script writes a new file per run (``--out``, or its
    default name), so a file is a run: a ratio is only ever taken between two medians of one file."""
    groups = defaultdict(list)
    for r in rows:
        groups[r.get("_file", "")].append(r)
    return [groups[k] for k in sorted(groups)]


def merge_runs(per_run: list[dict], score) -> tuple[dict, set]:
    """One entry per key from several runs' {key: entry} dicts: the run that measured more of it (``score``), on a
    tie the file later in name order (``per_run`` comes sorted by file name). Returns the merged dict, where an
    entry more than one run measured says how many in ``_runs``, and those keys."""
    out, seen, repeated = {}, {}, set()
    for res in per_run:
        for k, v in res.items():
            if k in seen:
                repeated.add(k)
            seen[k] = True
            if k not in out or score(v) >= score(out[k]):
                out[k] = v
    for k in repeated:
        out[k] = dict(out[k], _runs=sum(k in res for res in per_run))
    return out, repeated


def _finite_count(*vals) -> int:
    return sum(1 for v in vals if isinstance(v, float) and math.isfinite(v))


def ratio(num, den) -> float:
    return num / den if num and den and math.isfinite(num) and math.isfinite(den) and den > 0 else math.nan


def fmt_x(v: float) -> str:
    return f"{v:.2f}x" if math.isfinite(v) else "-"


def fmt_ms(v) -> str:
    """A time in ms, or "-" where it was not measured (a run cut short by its time limit: no dense-masking row)."""
    v = _f(v)
    return f"{v:.4g}" if math.isfinite(v) else "-"


# ------------------------------------------------------------------------------------------------------- targets
class Target:
    """One target of an issue: ``measured >= need`` (or ``<=`` when ``at_most``)."""

    def __init__(self, issue: str, what: str, need: float, measured: float, at_most: bool = False):
        self.issue, self.what, self.need, self.measured, self.at_most = issue, what, need, measured, at_most

    @property
    def status(self) -> str:
        if not math.isfinite(self.measured):
            return "not measured"
        ok = self.measured <= self.need if self.at_most else self.measured >= self.need
        return "met" if ok else "NOT met"

    def row(self) -> str:
        need = f"<= {self.need:g}x" if self.at_most else f">= {self.need:g}x"
        return f"| {self.issue} | {self.what} | {need} | {fmt_x(self.measured)} | {self.status} |"


# --------------------------------------------------------------------------------------------------------- linear
def linear_speedups(rows) -> dict:
    """{(op, shape, batch, dtype, density): {"sparse": x, "csr": x, "layer": x, "path": label}} speedups over
    dense masking in the same precision (fp32 against fp32 dense masking with TF32 off; bf16 against dense masking
    under bf16 autocast); "layer" is SparseLinear after its automatic choice (the configuration in "path"). Each
    entry's ratios come from one run (file); a configuration measured by several runs takes the run that measured
    more of it (``_runs`` says how many measured it)."""
    per_run = []
    for run in runs(rows):
        med, paths = {}, {}
        for r in run:
            key = (r["op"], r["shape"], int(r["batch"]), r["dtype"], _dens(r["density"]), r["impl"])
            med[key] = _f(r["median_ms"])
            paths[key] = r.get("path") or ""
        out = {}
        for (op, shape, batch, dtype, d, impl), t in med.items():
            if impl != "sparse_triton":
                continue
            base = med.get((op, shape, batch, dtype, d, "dense_mask" if dtype == "fp32" else "dense_mask_autocast"))
            csr = med.get((op, shape, batch, dtype, d, "torch_sparse_csr"))
            layer_key = (op, shape, batch, dtype, d, "sparse_lth_layer")
            out[(op, shape, batch, dtype, d)] = {"sparse": ratio(base, t), "csr": ratio(base, csr),
                                                 "layer": ratio(base, med.get(layer_key)),
                                                 "path": paths.get(layer_key, ""), "dense_ms": base, "sparse_ms": t,
                                                 "_file": run[0].get("_file", "")}
        per_run.append(out)
    merged, _ = merge_runs(per_run, lambda v: _finite_count(v["sparse"], v["layer"], v["csr"]))
    return merged


def _repeated_note(entries: dict) -> list[str]:
    """A line naming the configurations that more than one run (file) measured, and the file each row is from."""
    rep = {k: v for k, v in entries.items() if v.get("_runs", 1) > 1}
    if not rep:
        return []
    return ["", f"{len(rep)} configurations were measured by more than one run (file); each row's ratios are from "
            "one file, the one that measured more of it: " + "; ".join(
                f"{' '.join(str(p) for p in k)} from {v['_file']}" for k, v in sorted(rep.items(), key=str)) + "."]


def linear_section(rows, targets: list[Target]) -> list[str]:
    sp = linear_speedups(rows)
    lines = ["## Sparse linear (bench_linear_gpu.py), forward + backward",
             "", "Speedup of the Triton kernels over dense masking in the same precision (fp32: TF32 off; bf16: "
             "autocast); `best` = the faster of the two paths, which the automatic choice picks when its timing "
             "is right; `auto layer` = `SparseLinear` through autograd after its automatic choice (measured; the "
             "configuration it chose in `chosen`, a sparse path's ops run dense named after `/`); `CSR` = "
             "torch.sparse CSR's speedup over the same dense masking.", "",
             "| layer | batch | dtype | density | dense ms | sparse ms | sparse | best | auto layer | chosen | CSR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (op, shape, batch, dtype, d), v in sorted(sp.items(), key=lambda kv: (kv[0][1], kv[0][3], -kv[0][4])):
        if op != "fwd+bwd":
            continue
        best = max(v["sparse"], 1.0) if math.isfinite(v["sparse"]) else math.nan
        lines.append(f"| {shape} | {batch} | {dtype} | {d:g} | {fmt_ms(v['dense_ms'])} | {fmt_ms(v['sparse_ms'])} | "
                     f"{fmt_x(v['sparse'])} | {fmt_x(best)} | {fmt_x(v['layer'])} | {v['path'] or '-'} | "
                     f"{fmt_x(v['csr'])} |")
    lines += _repeated_note(sp)
    big = ("fwd+bwd", "4096x4096", 4096)
    for dtype, pairs in (("fp32", ((0.05, 3), (0.02, 6), (0.01, 10))), ("bf16", ((0.02, 1.5), (0.01, 2.5)))):
        for d, need in pairs:
            v = sp.get(big + (dtype, d), {}).get("sparse", math.nan)
            targets.append(Target("#4", f"4096x4096 b4096 {dtype} fwd+bwd, {100 - 100 * d:g}% sparse", need, v))
    for dtype in ("fp32", "bf16"):
        auto = [v["layer"] for k, v in sp.items() if k[:3] == big and k[3] == dtype and math.isfinite(v["layer"])]
        targets.append(Target("#4", f"4096x4096 b4096 {dtype} fwd+bwd, automatic choice (SparseLinear), worst "
                              "density (never slower: >= ~1)", 0.95, min(auto) if auto else math.nan))
    for shape in ("300x784", "100x300"):
        # the layer after its automatic choice: the kernel's own ratio can be below 1 where the choice runs dense
        auto = [v["layer"] for k, v in sp.items() if k[0] == "fwd+bwd" and k[1] == shape and k[3] == "fp32"
                and math.isfinite(v["layer"])]
        targets.append(Target("#4", f"LeNet layer {shape} b60 fp32, automatic choice (SparseLinear), worst density "
                              "(parity: >= ~1)", 0.95, min(auto) if auto else math.nan))
    return lines


# ----------------------------------------------------------------------------------------------------------- conv
def conv_speedups(rows) -> dict:
    """{(layer, direction, density, dtype): ratios over dense masking}, each entry's ratios from one run (file)."""
    per_run = []
    for run in runs(rows):
        med = {(r["layer"], r["direction"], _dens(r["density"]), r["impl"], r["dtype"]): _f(r["median_ms"])
               for r in run}
        paths = {(r["layer"], r["direction"], _dens(r["density"]), r["dtype"]): r.get("path") or ""
                 for r in run if r["impl"] == "sparse_lth_layer"}
        out = {}
        for (layer, direction, d, impl, dtype), t in med.items():
            if impl != "triton_sparse":
                continue
            if dtype == "fp32":
                tf32 = med.get((layer, direction, d, "dense_mask", "fp32-tf32"))
                out[(layer, direction, d, "fp32")] = {
                    "vs_tf32": ratio(tf32, t),
                    "vs_ieee": ratio(med.get((layer, direction, d, "dense_mask", "fp32-ieee")), t),
                    "vs_csr": ratio(med.get((layer, direction, d, "unfold_csr", "fp32")), t), "ms": t,
                    "layer_vs_tf32": ratio(tf32, med.get((layer, direction, d, "sparse_lth_layer", "fp32-tf32"))),
                    "path": paths.get((layer, direction, d, "fp32-tf32"), ""), "_file": run[0].get("_file", "")}
            else:
                amp = med.get((layer, direction, d, "dense_mask_amp", "bf16-autocast"))
                out[(layer, direction, d, dtype)] = {
                    "vs_bf16": ratio(amp, t), "ms": t,
                    "layer_vs_bf16": ratio(amp, med.get((layer, direction, d, "sparse_lth_layer", "bf16-autocast"))),
                    "path": paths.get((layer, direction, d, "bf16-autocast"), ""), "_file": run[0].get("_file", "")}
        per_run.append(out)
    merged, _ = merge_runs(per_run, lambda v: _finite_count(*(x for k, x in v.items() if k != "ms")))
    return merged


def conv_section(rows, targets: list[Target]) -> list[str]:
    sp = conv_speedups(rows)
    lines = ["## Sparse conv2d (bench_conv_gpu.py), forward + backward", "",
             "Speedup of the Triton fp32 kernels over dense masking with cuDNN, TF32 on (PyTorch's default for "
             "convolutions) and off (IEEE fp32), over unfold + torch.sparse CSR; bf16 kernels over dense masking "
             "under bf16 autocast; `auto layer` = `SparseConv2d` through autograd after its automatic choice "
             "(measured), against dense masking in the same precision, with the configuration it chose.", "",
             "| layer | density | triton fp32 ms | vs TF32 | vs IEEE | vs unfold+CSR | triton bf16 ms | vs bf16 | "
             "auto layer fp32 vs TF32 (chosen) | auto layer bf16 vs bf16 (chosen) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(k[0], k[2]) for k in sp if k[1] == "both"}, key=lambda t: (t[0], -t[1]))
    for layer, d in keys:
        a = sp.get((layer, "both", d, "fp32"), {})
        b = sp.get((layer, "both", d, "bf16"), {})
        lines.append(f"| {layer} | {d:g} | {fmt_ms(a.get('ms'))} | {fmt_x(a.get('vs_tf32', math.nan))} | "
                     f"{fmt_x(a.get('vs_ieee', math.nan))} | {fmt_x(a.get('vs_csr', math.nan))} | "
                     f"{fmt_ms(b.get('ms'))} | {fmt_x(b.get('vs_bf16', math.nan))} | "
                     f"{fmt_x(a.get('layer_vs_tf32', math.nan))} ({a.get('path') or '-'}) | "
                     f"{fmt_x(b.get('layer_vs_bf16', math.nan))} ({b.get('path') or '-'}) |")
    lines += _repeated_note(sp)
    for layer, px in (("vgg19/conv10-12", "4x4"), ("vgg19/conv13-16", "2x2")):
        v = sp.get((layer, "both", 0.02, "fp32"), {})
        targets.append(Target("#5", f"512->512 3x3 at {px} px, fwd+bwd, 98% sparse, fp32 vs cuDNN TF32 on", 2,
                              v.get("vs_tf32", math.nan)))
        targets.append(Target("#5", f"512->512 3x3 at {px} px, fwd+bwd, 98% sparse, fp32 vs cuDNN IEEE fp32", 2,
                              v.get("vs_ieee", math.nan)))
    for dtype, key in (("fp32", "layer_vs_tf32"), ("bf16", "layer_vs_bf16")):
        auto = [v[key] for k, v in sp.items()
                if k[1] == "both" and k[3] == dtype and math.isfinite(v.get(key, math.nan))]
        targets.append(Target("#5", f"conv layers {dtype} fwd+bwd, automatic choice (SparseConv2d), worst layer and "
                              "density (never slower: >= ~1)", 0.95, min(auto) if auto else math.nan))
    return lines


# ---------------------------------------------------------------------------------------------------------- optim
# the dense-masking baselines of bench_optim.py, masks in the parameters' dtype and bool: the faster one is the bar
FUSED_BASELINES = ("torch.optim-fused+mask", "torch.optim-fused+boolmask")


def optim_section(rows, ceilings, targets: list[Target]) -> list[str]:
    bw = next((_f(r["rate"]) for r in ceilings if r["kind"] == "copy"), math.nan)  # GB/s, read + write
    per_run, compact_runs = [], []
    for run in runs(rows):
        med = {(r["op"], r["model"], r["dtype"], _dens(r["density"]), r["impl"]): r for r in run}
        out, compact = {}, defaultdict(dict)
        for (op, model, dtype, d, impl), r in med.items():
            base = min((_f(med[(op, model, dtype, d, b)]["median_ms"]) for b in FUSED_BASELINES
                        if (op, model, dtype, d, b) in med), default=math.nan)
            out[(op, model, dtype, d, impl)] = dict(r, _speedup=ratio(base, _f(r["median_ms"])))
            if impl.startswith("sparse_lth-triton") and impl.endswith("-compact"):
                compact[(op, model, dtype)][d] = _f(r["median_ms"]) / max(_f(r["nnz"]), 1.0)
        per_run.append(out)
        compact_runs.append(compact)
    med, repeated = merge_runs(per_run, lambda v: _finite_count(v["_speedup"]))
    lines = ["## Optimizer step (bench_optim.py)", "",
             f"Floor = the step's unavoidable bytes / the measured copy bandwidth ({bw:.4g} GB/s, "
             "bench_ceilings.py)." if math.isfinite(bw) else "No ceilings file: the floor is not computed.", "",
             "| op | params | dtype | density | impl | ms | GB/s | x floor | speedup vs torch fused+mask "
             "(faster mask dtype) |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst_dense, worst_floor = math.inf, 0.0
    for (op, model, dtype, d, impl), r in sorted(med.items(), key=lambda kv: (kv[0][:3], -kv[0][3], kv[0][4])):
        t = _f(r["median_ms"])
        floor = _f(r["bytes"]) / (bw * 1e9) * 1e3 if math.isfinite(bw) else math.nan
        lines.append(f"| {op} | {model} | {dtype} | {d:g} | {impl} | {t:.4g} | {_f(r['GBps']):.4g} | "
                     f"{fmt_x(ratio(t, floor))} | {fmt_x(r['_speedup'])} |")
        if impl.startswith("sparse_lth-triton") and impl.endswith("-dense"):
            worst_dense = min(worst_dense, r["_speedup"])
            worst_floor = max(worst_floor, ratio(t, floor))
    if repeated:
        lines += ["", f"{len(repeated)} rows were measured by more than one run (file); each row is from one file, "
                  "its speedup against that file's baseline."]
    # time per live weight across densities, within one run; where several runs measured a case, the one with the
    # most densities
    compact = {}
    for run in compact_runs:
        for k, per in run.items():
            if len(per) >= len(compact.get(k, {})):
                compact[k] = per
    has_triton = any(k[4].startswith("sparse_lth-triton") for k in med)
    targets.append(Target("#6", "dense path vs torch.optim fused + masking (worst row)", 2,
                          worst_dense if has_triton and math.isfinite(worst_dense) else math.nan))
    targets.append(Target("#6", "dense path time / bytes-at-measured-bandwidth floor (worst row)", 1.5,
                          worst_floor if has_triton and worst_floor > 0 else math.nan, at_most=True))
    for (op, model, dtype), per in compact.items():
        if 1.0 in per and len(per) > 1:
            spread = max(per.values()) / per[1.0]
            targets.append(Target("#6", f"compact path {op} {model} {dtype}: time per live weight, worst density "
                                        "/ density 1 (proportional: ~1)", 1.5, spread, at_most=True))
    return lines


# ----------------------------------------------------------------------------------------------------- model step
def model_section(rows, targets: list[Target]) -> list[str]:
    lines = ["## Whole training steps (bench_model_step.py), automatic path choice", "",
             "A `*_graph` row is the step captured once as a CUDA graph and replayed (`--cuda-graph`): its speedup is "
             "against `dense_masking_graph`, and `graph check` is the largest parameter difference from an eager "
             "twin after the same steps.", "",
             "| model | batch | density | impl | paths | ms | speedup vs dense masking | graph check |",
             "|---|---|---|---|---|---|---|---|"]
    worst = defaultdict(lambda: math.inf)
    graphed = defaultdict(lambda: math.inf)
    for r in sorted(rows, key=lambda r: (r["model"], -_f(r["density"]), r["impl"])):
        sp = _f(r["speedup_vs_dense_masking"])
        lines.append(f"| {r['model']} | {r['batch']} | {_f(r['density']):g} | {r['impl']} | {r['paths']} | "
                     f"{_f(r['median_ms']):.4g} | {fmt_x(sp)} | {r.get('graph_check') or '-'} |")
        if r["impl"].endswith("_graph"):
            if r["impl"] != "dense_masking_graph" and r.get("graph") == "cuda":
                graphed[r["model"]] = min(graphed[r["model"]], sp)
        elif r["impl"] != "dense_masking":
            worst[r["model"]] = min(worst[r["model"]], sp)
    for model, w in worst.items():
        targets.append(Target("#4/#5", f"{model} step, automatic paths, worst density (never slower: >= ~1)", 0.95, w))
    for model, w in graphed.items():
        targets.append(Target("#4", f"{model} step as a CUDA graph against dense masking's graph, worst density "
                                    "(at least parity)", 0.95, w))
    vgg = [_f(r["speedup_vs_dense_masking"]) for r in rows
           if r["model"] == "vgg19" and abs(_f(r["density"]) - 0.015) < 1e-9 and r["impl"] != "dense_masking"]
    targets.append(Target("#5", "VGG-19 training step at 1.5% weights remaining", 1.5, max(vgg) if vgg else math.nan))
    return lines


# ----------------------------------------------------------------------------------------------------- train loop
def train_loop_section(rows) -> list[str]:
    lines = ["## The training loop (bench_train_loop.py)", "",
             "`train()`'s own milliseconds per step (evaluations excluded) on LeNet-300-100, batch 60: `stretch` "
             "waits for the device only between evaluations, `per_step_sync` after every step (the loop before "
             "session 29), `graph` replays each step as a CUDA graph (`cuda_graph=True`); the speedup is against "
             "`per_step_sync`, in the same run.", "",
             "| density | optimizer | paths | mode | ms/step | speedup vs waiting after every step |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-_f(r["density"]), r["optimizer_impl"], r["mode"])):
        lines.append(f"| {_f(r['density']):g} | {r['optimizer_impl']} | {r['paths']} | {r['mode']} | "
                     f"{_f(r['median_ms_per_step']):.4g} | {fmt_x(_f(r['speedup_vs_per_step_sync']))} |")
    return lines


# ---------------------------------------------------------------------------------------------------------- plots
def plot(dev: str, lin_rows, conv_rows, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if lin_rows:
        sp = linear_speedups(lin_rows)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, dtype in zip(axes, ("fp32", "bf16")):
            for shape in sorted({k[1] for k in sp}):
                pts = sorted((k[4], v["sparse"]) for k, v in sp.items()
                             if k[0] == "fwd+bwd" and k[1] == shape and k[3] == dtype and math.isfinite(v["sparse"]))
                if pts:
                    batch = next(k[2] for k in sp if k[1] == shape)
                    ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{shape} b{batch}")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set(xscale="log", yscale="log", xlabel="weights remaining (%)", title=f"sparse linear, {dtype}")
            ax.invert_xaxis()
            ax.legend(fontsize=8)
        axes[0].set_ylabel("speedup over dense masking (fwd+bwd)")
        fig.suptitle(dev, fontsize=9)
        fig.tight_layout()
        p = out_dir / f"summary_{dev}_linear.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    if conv_rows:
        sp = conv_speedups(conv_rows)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for layer in sorted({k[0] for k in sp}):
            pts = sorted((k[2], v["vs_tf32"]) for k, v in sp.items()
                         if k[0] == layer and k[1] == "both" and k[3] == "fp32" and math.isfinite(v["vs_tf32"]))
            if pts:
                ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1, label=layer)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="weights remaining (%)",
               ylabel="speedup over dense masking (cuDNN, TF32 on)", title=f"sparse conv2d fp32, fwd+bwd\n{dev}")
        ax.invert_xaxis()
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = out_dir / f"summary_{dev}_conv.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made


# ----------------------------------------------------------------------------------------------------------- main
KINDS = {"linear_": "linear", "conv_": "conv", "optim_": "optim", "model_step_": "model", "ceilings_": "ceilings",
         "train_loop_": "train_loop"}


# files whose names start like a producer's but that another script writes (bench_linear_ops_cpu.py's CPU rows)
NOT_SUMMARIZED = ("linear_ops_",)


def kind_of(path: Path) -> str | None:
    if path.name.startswith(NOT_SUMMARIZED):
        return None
    return next((k for prefix, k in KINDS.items() if path.name.startswith(prefix)), None)


def devices(results: Path) -> list[str]:
    """Slugs of the devices named in the linear, conv, optim, model-step and train-loop files."""
    found = set()
    for p in results.glob("*.csv"):
        if kind_of(p) in (None, "ceilings"):
            continue
        rows = read_rows([p])
        if rows and "device" in rows[0] and rows[0]["device"]:
            found.add(_slug(rows[0]["device"]))
    return sorted(found)


def _slug(s: str) -> str:
    """baselines.slug, without importing torch."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in s)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:60]


def summarize(dev: str, results: Path = RESULTS, out_dir: Path | None = None, plots: bool = True) -> Path:
    out_dir = out_dir or results
    by_kind = defaultdict(list)
    for p in sorted(results.glob("*.csv")):
        if kind_of(p) is None:
            continue
        rows = [r for r in read_rows([p]) if _slug(r.get("device", "")) == dev]
        if not rows:
            continue
        kind = kind_of(p)
        if kind:
            by_kind[kind] += rows
    if not by_kind:
        raise SystemExit(f"no result rows for device {dev!r} under {results}")
    targets: list[Target] = []
    body = []
    if by_kind["linear"]:
        body += linear_section(by_kind["linear"], targets) + [""]
    if by_kind["conv"]:
        body += conv_section(by_kind["conv"], targets) + [""]
    if by_kind["optim"]:
        body += optim_section(by_kind["optim"], by_kind["ceilings"], targets) + [""]
    if by_kind["model"]:
        body += model_section(by_kind["model"], targets) + [""]
    if by_kind["train_loop"]:
        body += train_loop_section(by_kind["train_loop"]) + [""]
    device = next(r["device"] for rows in by_kind.values() for r in rows)
    commits = sorted({r.get("commit", "") for rows in by_kind.values() for r in rows} - {""})
    head = [f"# Benchmark summary: {device}", "",
            f"Generated by `python benchmarks/summarize.py --device {dev}` from the CSV rows of this device "
            f"(commits {', '.join(commits) or 'unknown'}). Ratios of medians measured in one run each.", ""]
    if targets:
        head += ["## Targets", "", "| issue | target | needs | measured | status |", "|---|---|---|---|---|"]
        head += [t.row() for t in targets] + [""]
    out = out_dir / f"summary_{dev}.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head + body).rstrip() + "\n")
    if plots:
        plot(dev, by_kind["linear"], by_kind["conv"], out_dir)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="device slug (default: every device with results)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result CSVs")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the results folder)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    devs = [args.device] if args.device else devices(args.results)
    if not devs:
        print(f"no result files under {args.results}", file=sys.stderr)
        return 1
    for dev in devs:
        try:
            out = summarize(dev, args.results, args.out, plots=not args.no_plots)
        except SystemExit as e:
            print(e, file=sys.stderr)
            continue
        print(f"wrote {out}")
        print(out.read_text().split("\n## ", 2)[1] if "## Targets" in out.read_text() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
