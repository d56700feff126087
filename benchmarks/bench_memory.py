"""Memory of a lottery-ticket network in training: sparse-lth against the dense-masking baseline, byte by byte.

    python benchmarks/bench_memory.py                                   # LeNet-300-100, Conv-6, ResNet-20, VGG-19
    python benchmarks/bench_memory.py --models vgg19 --densities 1 0.015 --device cuda

DESIGN.md's promise for the sparse path is that "memory, gradients and optimizer state scale with nnz". This
script counts it. Each model gets a random mask with exact live counts at each density on every conv/linear layer
except the output layer (as ``bench_model_step.py``), takes one training step on synthetic data of its input shape
at its paper batch size with its paper optimizer (SGD momentum 0.9 for VGG/ResNet, Adam otherwise), and then
every tensor that outlives the step is counted once per storage, in the first of these groups that holds it:

* ``params``: the trainable parameters (dense weights, or the compact ``values`` of the sparse path; biases, BN);
* ``grads``: their ``.grad``;
* ``optim``: everything the optimizer holds but the parameters: its state (momentum, Adam's two moments and step
  counts) and its caches (sparse_lth.optim's torch backend keeps each masked weight's mask as int32 bits on the CPU:
  4 bytes a weight, on the dense path);
* ``masks_index``: everything else the model holds: masks (the baseline's float mask, the layers' bool
  ``weight_mask`` and the dense path's weight-dtype gradient mask), the sparse path's index structures and the
  torch backend's per-tap tables, BN running statistics;
* ``saved``: the tensors autograd keeps from the forward for the backward (``saved_tensors_hooks``), less those
  already counted above and the input batch: activations, and the baseline's ``weight * mask`` copy of the
  weight of every layer whose input needs a gradient (all but the first), which it saves for that gradient.

``state`` = params + grads + optim + masks_index (what stays resident between steps); ``total`` = state + saved
(the step's high-water mark if nothing else were allocated). Implementations:

* ``dense_masking``: DESIGN.md's baseline (``baselines.py``) with torch.optim;
* ``sparse_lth``: ``sparsify`` + each layer's automatic path (``choose_paths``: on CUDA by timing, on the CPU by the
  density rule) + sparse-lth's mask-aware optimizer; ``paths`` has one letter per layer (d dense, s sparse,
  h sparse with some ops dense);
* ``sparse_lth_sparse``: the same with every layer forced onto the sparse path: the floor.

These are exact counts, the same on every machine with the same torch (on the CPU the torch backend's buffers,
on CUDA the Triton backend's). On CUDA ``peak_bytes`` adds ``torch.cuda.max_memory_allocated`` over one step with
only that implementation resident (allocator and library workspaces included); on the CPU it is left empty.
Rows go to ``benchmarks/results/memory_<device>.csv`` and a table to the ``.md`` beside it (``--table CSV`` writes
the table again from a CSV alone).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import (RESULTS, baseline_step, device_name, git_commit, make_optimizer, masked_baseline,
                       model_step_device, path_letter, plain_step, random_masks, slug, write_rows)
from sparse_lth import optim as sl_optim
from sparse_lth.layers import choose_paths, sparse_layers, sparsify
from sparse_lth.models import build_model, paper_hparams

GROUPS = ("params", "grads", "optim", "masks_index", "saved")
DEFAULT_MODELS = ("lenet300_100", "conv6", "resnet20", "vgg19")
IMPLS = ("dense_masking", "sparse_lth", "sparse_lth_sparse")


# ----------------------------------------------------------------------------------------------------------------
# counting storages
# ----------------------------------------------------------------------------------------------------------------
def storages(t: torch.Tensor):
    """``(key, nbytes)`` of every storage behind ``t``: one for a strided tensor (its whole storage, however small
    the view), the index and value arrays of a sparse one."""
    if t.layout == torch.strided:
        if t.device.type == "meta":
            return
        s = t.untyped_storage()
        yield (t.device, s.data_ptr()), s.nbytes()
    elif t.layout == torch.sparse_coo:
        yield from storages(t._indices())
        yield from storages(t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        yield from storages(t.crow_indices())
        yield from storages(t.col_indices())
        yield from storages(t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        yield from storages(t.ccol_indices())
        yield from storages(t.row_indices())
        yield from storages(t.values())


def tensors_in(obj, depth: int = 0, _seen=None):
    """Every tensor reachable from ``obj`` through containers, dataclasses and plain objects' attributes (the
    sparse layers keep their index structures as plain attributes and small objects), not through modules."""
    _seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth > 4 or id(obj) in _seen or isinstance(obj, (nn.Module, type, str, bytes, int, float, bool)) \
            or obj is None or callable(obj):
        return
    _seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    elif dataclasses.is_dataclass(obj):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return
    for v in items:
        yield from tensors_in(v, depth + 1, _seen)


class Ledger:
    """Bytes per group, each storage counted once, in the first group that claims it."""

    def __init__(self):
        self.seen: set = set()
        self.bytes = {g: 0 for g in GROUPS}

    def claim(self, group: str, tensors) -> None:
        for t in tensors:
            for key, n in storages(t):
                if key not in self.seen:
                    self.seen.add(key)
                    self.bytes[group] += n


def resident(model: nn.Module, opt: torch.optim.Optimizer, ledger: Ledger) -> None:
    params = list(model.parameters())
    ledger.claim("params", params)
    ledger.claim("grads", [p.grad for p in params if p.grad is not None])
    # everything the optimizer holds: its state, and what it keeps beside it (sparse_lth.optim's CPU masking
    # keeps each masked weight's mask as int32 bits, 4 bytes a weight; the parameters are claimed already)
    ledger.claim("optim", list(tensors_in(vars(opt))))
    held = []
    for m in model.modules():
        held += list(m._buffers.values())
        held += [t for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")
                 for t in tensors_in(v)]
    ledger.claim("masks_index", [t for t in held if t is not None])


def saved_for_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ledger: Ledger) -> None:
    """Run one forward + backward, and claim for ``saved`` every tensor autograd saves during the forward (less
    those already counted and the input batch)."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    for key, _ in list(storages(x)) + list(storages(y)):
        ledger.seen.add(key)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    ledger.claim("saved", kept)
    kept.clear()
    loss.backward()


# ----------------------------------------------------------------------------------------------------------------
# one implementation, counted
# ----------------------------------------------------------------------------------------------------------------
def build(impl: str, model_name: str, masks, x, kind: str, lr: float, input_shape):
    """The model, its optimizer, a one-step closure and the paths' letters; ``x`` = (inputs, targets)."""
    dev = x[0].device
    if impl == "dense_masking":
        model = masked_baseline(build_model(model_name, seed=0, input_shape=input_shape).to(dev), masks)
        opt = make_optimizer(torch.optim, model.parameters(), kind, lr)
        return model, opt, (lambda: baseline_step(model, opt, x[0], x[1])), "-"
    model = sparsify(build_model(model_name, seed=0, input_shape=input_shape).to(dev), masks=masks)
    if impl == "sparse_lth_sparse":
        for _, layer in sparse_layers(model):
            if layer.nnz < layer.weight_mask.numel():
                layer.set_mask(layer.weight_mask, path="sparse")
    else:
        choose_paths(model, x[0])
    opt = make_optimizer(sl_optim, model.parameters(), kind, lr)
    paths = "".join(path_letter(layer) for _, layer in sparse_layers(model))
    return model, opt, (lambda: plain_step(model, opt, x[0], x[1])), paths


def measure(impl: str, model_name: str, masks, batch, kind: str, lr: float, input_shape) -> dict:
    x, y = batch
    dev = x.device
    model, opt, step, paths = build(impl, model_name, masks, (x, y), kind, lr, input_shape)
    step()  # optimizer state exists from here on
    peak = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    ledger = Ledger()
    resident(model, opt, ledger)  # after the step: the grads are still there, as at every optimizer step
    saved_for_backward(model, x, y, ledger)
    out = dict(ledger.bytes)
    out["state"] = sum(out[g] for g in GROUPS if g != "saved")
    out["total"] = out["state"] + out["saved"]
    out["peak"] = peak
    out["paths"] = paths
    out["nnz"] = sum(int(m.sum()) for m in masks.values())
    del model, opt, step
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def mib(n) -> str:
    return f"{n / 2 ** 20:.2f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Training memory: sparse-lth against dense masking ({meta['device']})", "",
             f"`python benchmarks/bench_memory.py {meta['argv']}` at commit {meta['commit']}, torch {meta['torch']}, "
             "fp32. MiB; exact counts of every storage that outlives a step (state) and of what autograd saves "
             "for the backward (saved), each counted once (see the script's docstring). x = dense masking / "
             "this.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        lines += [f"## {model}, batch {sub[0]['batch']}, {sub[0]['optimizer']}", "",
                  "| density | impl | paths | params | grads | optim | masks + index | state | state x | saved "
                  "| total | total x |" + (" peak | peak x |" if sub[0]["peak_bytes"] != "" else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if sub[0]["peak_bytes"] != ""
                                                                          else "")]
        for r in sub:
            line = (f"| {r['density']:g} | {r['impl']} | {r['paths']} | {mib(r['params_bytes'])} | "
                    f"{mib(r['grads_bytes'])} | {mib(r['optim_bytes'])} | {mib(r['masks_index_bytes'])} | "
                    f"{mib(r['state_bytes'])} | {r['state_x']:.2f}x | {mib(r['saved_bytes'])} | "
                    f"{mib(r['total_bytes'])} | {r['total_x']:.2f}x |")
            if r["peak_bytes"] != "":
                line += f" {mib(r['peak_bytes'])} | {r['peak_x']:.2f}x |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def md_path(csv_path) -> str:
    csv_path = str(csv_path)
    return csv_path[:-4] + ".md" if csv_path.endswith(".csv") else csv_path + ".md"


def table_from_csv(path: str) -> int:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"{path}: no rows", file=sys.stderr)
        return 2
    for r in rows:
        r["density"] = float(r["density"])
        for k in list(r):
            if k.endswith("_bytes") and r[k] != "":
                r[k] = int(r[k])
            elif k.endswith("_x"):
                r[k] = float(r[k])
    meta = {"device": rows[0]["device"], "commit": rows[0]["commit"], "torch": rows[0]["torch"],
            "argv": rows[0].get("argv", "")}
    with open(md_path(path), "w") as f:
        f.write(markdown(rows, meta))
    print(f"wrote {md_path(path)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.2, 0.05, 0.015])
    ap.add_argument("--batch", type=int, default=None, help="default: each model's paper batch size")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="CSV path (the table goes beside it as .md)")
    ap.add_argument("--table", metavar="CSV", default=None,
                    help="measure nothing: write the .md table of an earlier run's CSV beside it (a GPU run's CSV "
                         "comes back alone)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.table:
        return table_from_csv(args.table)
    bad = [d for d in args.densities if not 0 < d <= 1]
    if bad:
        ap.error(f"densities must be in (0, 1], got {bad}")
    dev = model_step_device(args)
    if dev is None:
        return 2
    meta = {"device": device_name(dev), "commit": git_commit(), "torch": torch.__version__,
            "argv": " ".join(argv)}
    rows = []
    for model_name in args.models:
        hp = paper_hparams(model_name)
        kind = "sgd" if hp["optimizer"] == "sgd" else "adam"
        batch_size = args.batch or hp["batch_size"]
        gen = torch.Generator().manual_seed(0)
        proto = build_model(model_name, seed=0)
        shape = tuple(proto.input_shape)
        x = torch.randn(batch_size, *shape, generator=gen).to(dev)
        y = torch.randint(0, 10, (batch_size,), generator=gen).to(dev)
        for density in args.densities:
            masks = {k: v.to(dev) for k, v in random_masks(proto, density, gen, skip=(proto.output_layer,)).items()}
            base = None
            for impl in args.impls:
                got = measure(impl, model_name, masks, (x, y), kind, hp["lr"], shape)
                if impl == "dense_masking":
                    base = got
                row = {"model": model_name, "batch": batch_size, "optimizer": kind, "density": density, "impl": impl,
                       "paths": got["paths"], "nnz": got["nnz"],
                       **{f"{g}_bytes": got[g] for g in GROUPS + ("state", "total")},
                       "peak_bytes": "" if got["peak"] is None else got["peak"]}
                for k in ("state", "total", "peak"):
                    ok = base is not None and got[k] and base[k] is not None
                    row[f"{k}_x"] = round(base[k] / got[k], 3) if ok else float("nan")
                row.update(device=meta["device"], commit=meta["commit"], torch=meta["torch"], argv=meta["argv"])
                rows.append(row)
                print(f"{model_name:13s} d={density:<6g} {impl:18s} state {mib(got['state']):>9s} MiB "
                      f"(x{row['state_x']:.2f})  total {mib(got['total']):>9s} MiB (x{row['total_x']:.2f})  "
                      f"paths {got['paths']}", flush=True)
    out = args.out or RESULTS / f"memory_{slug(meta['device'])}.csv"
    write_rows(rows, out)
    md = md_path(out)
    with open(md, "w") as f:
        f.write(markdown(rows, meta))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
