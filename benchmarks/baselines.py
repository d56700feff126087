"""What every benchmark shares: DESIGN.md's dense-masking baseline, the machine/commit labels of a result row, and
the timing / memory / dry-run helpers of the GPU benchmark scripts.

The dense-masking baseline is what users do today (open_lth / ``torch.nn.utils.prune`` style): an eager model whose
forward multiplies each weight by its mask, a standard ``torch.optim`` optimizer, gradients masked before and
weights re-masked after each step.
"""
from __future__ import annotations

import csv
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_lth.environment import cpu_id, cpu_name, git_commit  # noqa: F401 (the benchmarks import them from here)

RESULTS = Path(__file__).resolve().parent / "results"


class MaskedLinear(nn.Linear):
    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight * mask)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.register_buffer("mask", mask.to(self.weight))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MaskedConv2d(nn.Conv2d):
    def __init__(self, conv: nn.Conv2d, mask: torch.Tensor):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(conv.weight * mask)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.register_buffer("mask", mask.to(self.weight))

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def masked_baseline(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Swap (in place) every nn.Linear / nn.Conv2d named in ``masks`` for its dense-masking twin."""
    for name, module in list(model.named_modules()):
        for cname, child in list(module.named_children()):
            full = f"{name}.{cname}" if name else cname
            if full in masks and type(child) is nn.Linear:
                setattr(module, cname, MaskedLinear(child, masks[full]))
            elif full in masks and type(child) is nn.Conv2d:
                setattr(module, cname, MaskedConv2d(child, masks[full]))
    return model


def baseline_step(model, opt, x, y, set_to_none: bool = True):
    """One dense-masking training step: forward, backward, mask gradients, step, re-mask weights. ``set_to_none``
    False zeroes the gradients in place, as a step captured in a CUDA graph does (see :func:`plain_step`)."""
    opt.zero_grad(set_to_none=set_to_none)
    F.cross_entropy(model(x), y).backward()
    masked = [m for m in model.modules() if isinstance(m, (MaskedLinear, MaskedConv2d))]
    for m in masked:
        m.weight.grad.mul_(m.mask)
    opt.step()
    with torch.no_grad():
        for m in masked:
            m.weight.mul_(m.mask)


def make_optimizer(module, params, kind: str, lr: float, capturable: bool = False):
    """``module.SGD`` with momentum 0.9 (``kind="sgd"``, the paper's VGG/ResNet setting) or ``module.Adam``, from
    ``torch.optim`` or ``sparse_lth.optim``. ``capturable``: Adam with its step count on the device, for a CUDA
    graph (SGD needs nothing)."""
    if kind == "sgd":
        return module.SGD(params, lr=lr, momentum=0.9)
    return module.Adam(params, lr=lr, capturable=True) if capturable else module.Adam(params, lr=lr)


def model_step_device(args) -> torch.device | None:
    """The device of a model-level benchmark's ``--device``/``--threads`` (threads set), or None, said why, when
    it asks for CUDA where there is none."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu, or on a GPU machine", file=sys.stderr)
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    return dev


def plain_step(model, opt, x, y, set_to_none: bool = True):
    """One training step. ``set_to_none=False`` zeroes the gradients in place: a step captured in a CUDA graph
    keeps them at their warm-up addresses, so sparse_lth.optim finds its pointer tables built (a table built
    inside a capture is a host-to-device copy, which torch >= 2.11 refuses there), as sparse_lth.train does."""
    opt.zero_grad(set_to_none=set_to_none)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def exact_mask(shape, density: float, gen: torch.Generator) -> torch.Tensor:
    """A random bool mask of ``shape`` with exactly ``round(density * numel)`` live entries (CPU). Exact counts, as
    IMP's masks have: a Bernoulli draw lands a few weights either side of the density, and a path rule whose
    cutoff is that density then decides by chance."""
    numel = math.prod(shape)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=gen)[:round(density * numel)]] = True
    return flat.view(tuple(shape))


def random_masks(model: nn.Module, density: float, gen: torch.Generator, skip=()) -> dict[str, torch.Tensor]:
    """:func:`exact_mask` for every nn.Linear / nn.Conv2d of ``model`` (on the weight's device)."""
    return {n: exact_mask(m.weight.shape, density, gen).to(m.weight.device) for n, m in model.named_modules()
            if type(m) in (nn.Linear, nn.Conv2d) and n not in skip}


def cpu_device_label() -> str:
    """The device column of the CPU benchmarks: ``cpu: <cpu_id()> (<cores> cores, <torch threads> threads)``."""
    return f"cpu: {cpu_id()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}"


def slug(s: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in s)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:60]


def path_letter(layer) -> str:
    """A sparse layer's configuration in one letter: d dense path; s sparse path, every op on the sparse kernels;
    h sparse path with some ops dense."""
    if layer.path == "dense":
        return "d"
    return "h" if "dense" in layer.ops.values() else "s"


def write_rows(rows: list[dict], out: Path | str) -> None:
    """Write ``rows`` (dicts with the same keys) as a CSV file at ``out`` (its folder made), and say so."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


class RowWriter:
    """CSV rows written as they are measured: the file (and its folder) made with the first row, each row flushed,
    so a run stopped by a time limit (gpu_suite.sh's parts) keeps every row it measured. ``close()`` says where."""

    def __init__(self, out: Path | str, fieldnames: list[str] | None = None):
        self.out, self.fieldnames, self.count = Path(out), fieldnames, 0
        self._file = self._writer = None

    def add(self, row: dict) -> None:
        if self._file is None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.out, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames or list(row))
            self._writer.writeheader()
        self._writer.writerow(row)
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            print(f"wrote {self.count} rows to {self.out}")


# ----------------------------------------------------------------------------------------------------------------
# GPU benchmark scripts: one timer, one peak-memory probe and the --dry-run plumbing for CUDA and CPU alike
# ----------------------------------------------------------------------------------------------------------------
DRY_RUN_DEVICE = "cpu-dry-run (Triton interpreter)"  # the device column of every --dry-run row: never a GPU figure


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dry_run_problem(script: str) -> str | None:
    """Why ``script --dry-run`` cannot run here (None when it can). The Triton kernels run on CPU tensors only
    through Triton's interpreter, which reads TRITON_INTERPRET when Triton is first imported; the scripts never
    set it themselves, so it must come from the environment."""
    if interpreting():
        return None
    return (f"{script} --dry-run runs the Triton kernels on CPU through Triton's interpreter, which needs "
            f"TRITON_INTERPRET=1 in the environment before Triton is imported. Nothing was run; use:\n"
            f"    TRITON_INTERPRET=1 python benchmarks/{script} --dry-run")


def dry_run_out(filename: str) -> Path:
    """Default CSV of a --dry-run: a fresh temporary folder, never benchmarks/results/ (dry-run rows are not
    results)."""
    return Path(tempfile.mkdtemp(prefix="sparse_lth_dry_run_")) / filename


def quantiles_ms(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of times (linear interpolation; one sample is its own quantiles)."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("no timing samples")

    def q(f):
        pos = f * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return statistics.median(xs), q(0.2), q(0.8)


def interleaved_samples(fns: dict, repeats: int, time_one, warmup: int = 3) -> dict[str, list[float]]:
    """``{name: [ms, ...]}``: ``warmup`` untimed calls of each function, then ``repeats`` rounds that each time
    every function once with ``time_one(fn) -> ms``, in a fresh (seeded) random order every round. A fixed
    order, or a rotated one, which keeps every function's predecessor, lets the neighbour bias the figures: on
    the 2-core CPU here the run right after dense masking was ~15 % slower than the same configuration after
    another sparse one."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    names = list(fns)
    order = random.Random(0)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(repeats):
        order.shuffle(names)
        for k in names:
            samples[k].append(time_one(fns[k]))
    return samples


def wall_ms(fn, inner: int = 1) -> float:
    """Mean milliseconds of ``inner`` back-to-back calls of ``fn``, by the host clock (CPU work)."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e3


def time_ms(fn, device: torch.device, *, warmup: int = 25, rep: int = 100, cpu_calls: int = 3
            ) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()``. On CUDA ``triton.testing.do_bench`` (``warmup`` / ``rep`` in ms;
    it clears L2 before every timed call); elsewhere (the --dry-run on CPU) ``cpu_calls`` calls timed with
    time.perf_counter and no warm-up of its own (the scripts call every function once before timing it)."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    ts = []
    for _ in range(max(1, cpu_calls)):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return quantiles_ms(ts)


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def peak_memory(fn, device: torch.device) -> int | None:
    """Peak ``torch.cuda.max_memory_allocated`` over one call of ``fn`` on CUDA (what is already allocated counts);
    None on CPU, where nothing is measured and ``fn`` is not called (the CSV leaves the column empty)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak


def print_skipped(skipped: list[str], dry_run: bool) -> None:
    """The closing list of what a benchmark run could not measure (each also printed where it happened)."""
    if skipped:
        print(f"\nskipped ({len(skipped)}):")
        for msg in skipped:
            print(f"  {msg}")
    elif dry_run:
        print("\nskipped: none")
