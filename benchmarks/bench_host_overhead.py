"""Host time of the Triton path: what sparse-lth's Python costs per training step around its kernels.

On a GPU a LeNet-300-100 layer's kernels take microseconds, so a step's time there is mostly the host's: the
modules, the autograd Functions, the argument checks and the launch wrappers (issue 4's "LeNet-sized layers at
least at parity" target is about this). This script measures that host side on any machine: it runs the layers on
the Triton backend through Triton's interpreter with every kernel launch replaced by a no-op, so what is timed is
sparse-lth's own Python (and torch's autograd around it), not a kernel. Beside it, the *torch floor*: the same
model and step with each sparse layer's autograd Function replaced by a trivial one (allocations of the right
shapes, the bias gradient), which no wrapper can go below. Triton's own launcher (argument binding, cache lookup)
is not in either figure: stubbed here, it adds its cost per launch on a GPU.

    python benchmarks/bench_host_overhead.py                 # LeNet-300-100 at 2 %, one thread
    python benchmarks/bench_host_overhead.py --densities 0.2 0.02 --out host.csv
    python benchmarks/bench_host_overhead.py --optimizer sparse_lth_adam     # sparse-lth's fused Adam in the step
    python benchmarks/bench_host_overhead.py --model conv6 --batch 1         # Conv-6's sparse convs and linears
    python benchmarks/bench_host_overhead.py --optimizer torch_sgd_fused sparse_lth_sgd torch_adam_fused \
        sparse_lth_adam sparse_lth_adam_capturable                           # one row each: the optimizers' host time

The step's optimizer (``--optimizer``) is torch.optim.SGD by default; with ``sparse_lth_sgd`` / ``sparse_lth_adam``
/ ``sparse_lth_adam_capturable`` sparse-lth's fused optimizer runs on the interpreter backend with its launch
stubbed too, in the step and the floor alike, so ``step_us`` includes its host time and ``host_us_per_launch`` still
isolates the layers'. ``torch_sgd_fused`` / ``torch_adam_fused`` are torch.optim's fused SGD (momentum 0.9, as
sparse-lth's) and Adam, the references for the optimizer's own time; on the CPU their update really computes (a few
thousand live weights at 2 %: a few microseconds), on a GPU it is one launch per device and dtype.

``--model conv2|conv4|conv6`` runs Conv-2/4/6 on CIFAR-shaped inputs, their convolutions on the sparse path too
(the floor swaps them for a trivial Function as well). Their ReLUs and poolings really compute on the CPU (~20 ms a
step at batch 60), which drowns the host figures in noise: ``--batch 1`` keeps them at ~1-2 ms.

Columns: median microseconds per step (optimizer step included) over ``--repeats`` rounds of ``--inner`` steps (one
by default), interleaved with the floor; ``opt_us``, the median time of the optimizer's ``step()`` alone within the
sparse-layer steps; the kernel launches per step (forward, backward) as counted by the stub; and sparse-lth's host
microseconds per launch, (step - floor) / launches. Timings, never asserted; they depend on the host CPU (the GPU
machine's will differ).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the launches go through InterpretedFunction
if "triton" in sys.modules:  # pragma: no cover - only if imported as a module after Triton
    raise RuntimeError("bench_host_overhead.py must be run as a script, before Triton is imported")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from baselines import cpu_device_label, git_commit, interleaved_samples, random_masks, wall_ms, write_rows  # noqa: E402

from sparse_lth.kernels._conv_geometry import out_size  # noqa: E402
from sparse_lth.layers import SparseConv2d, sparse_layers, sparsify  # noqa: E402
from sparse_lth.models import build_model, default_dataset  # noqa: E402

INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


class LaunchStub:
    """Replaces ``InterpretedFunction.__getitem__``: ``kernel[grid](...)`` does nothing but count."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        import triton.runtime.interpreter as interp

        from sparse_lth.kernels import _triton

        self._cls = interp.InterpretedFunction
        self._orig = self._cls.__getitem__
        stub = self

        def launch(*args, **kwargs):
            stub.count += 1

        self._cls.__getitem__ = lambda fn, grid: launch
        # no kernel is interpreted, so an interpreter that cannot run with this NumPy (Triton 3.6 with NumPy >= 2.4,
        # as on the GPU machine) does not matter here: its launch-time refusal is switched off with the launches
        self._triton, self._problem = _triton, _triton._interpreter_problem
        _triton._interpreter_problem = lambda: None
        return self

    def __exit__(self, *exc):
        self._cls.__getitem__ = self._orig
        self._triton._interpreter_problem = self._problem


class _Trivial(torch.autograd.Function):
    """The torch floor of one sparse linear layer: its output and gradients allocated, nothing computed."""

    @staticmethod
    def forward(ctx, x, values, bias, rows):
        ctx.save_for_backward(x, values)
        return x.new_empty((x.shape[0], rows))

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(values), dy.sum(0), None


class _FloorLinear(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(layer.nnz))
        self.bias = nn.Parameter(torch.zeros(layer.weight_shape[0]))
        self.rows = layer.weight_shape[0]

    def forward(self, x):
        return _Trivial.apply(x.reshape(-1, x.shape[-1]), self.values, self.bias, self.rows)


class _TrivialConv(torch.autograd.Function):
    """The torch floor of one sparse conv layer: its output and gradients allocated, nothing computed."""

    @staticmethod
    def forward(ctx, x, values, bias, out_shape):
        ctx.save_for_backward(x, values)
        return x.new_empty(out_shape)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(values), dy.sum((0, 2, 3)), None


class _FloorConv(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(layer.nnz))
        self.bias = nn.Parameter(torch.zeros(layer.out_channels))
        self.geometry = (layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation)

    def forward(self, x):
        c, k, s, p, d = self.geometry
        oh, ow = out_size(x.shape[2], x.shape[3], k, s, p, d, "floor conv")
        return _TrivialConv.apply(x, self.values, self.bias, (x.shape[0], c, oh, ow))


def floor_model(sparse_model: nn.Module) -> nn.Module:
    """``sparse_model`` with every sparse layer swapped for :class:`_FloorLinear` / :class:`_FloorConv`."""
    m = copy.deepcopy(sparse_model)
    for name, layer in sparse_layers(m):
        parent = m.get_submodule(name.rpartition(".")[0]) if "." in name else m
        floor = _FloorConv(layer) if isinstance(layer, SparseConv2d) else _FloorLinear(layer)
        setattr(parent, name.rpartition(".")[2], floor)
    return m


def sgd_step(model, opt, x, y, opt_ms: list | None = None):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if opt_ms is None:
        opt.step()
        return
    t0 = time.perf_counter()
    opt.step()
    opt_ms.append((time.perf_counter() - t0) * 1e3)


OPTIMIZERS = ("torch_sgd", "torch_sgd_fused", "torch_adam_fused", "sparse_lth_sgd", "sparse_lth_adam",
              "sparse_lth_adam_capturable")


def make_opt(kind: str, params):
    """The step's optimizer: torch.optim.SGD, or sparse-lth's fused SGD / Adam on the interpreter backend (its one
    launch stubbed like the layers', so its host time is in the step and the floor alike)."""
    from sparse_lth import optim as sl_optim

    if kind == "torch_sgd":
        return torch.optim.SGD(params, lr=0.01)
    if kind == "torch_sgd_fused":  # what sparse_lth_sgd replaces (momentum too); on the CPU its update computes
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, fused=True)
    if kind == "torch_adam_fused":
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    if kind == "sparse_lth_sgd":
        return sl_optim.SGD(params, lr=0.01, momentum=0.9, backend="interpret")
    return sl_optim.Adam(params, lr=1e-3, backend="interpret", capturable=kind == "sparse_lth_adam_capturable")


def measure(model_name: str, density: float, batch: int, repeats: int, inner: int,
            optimizer: str = "torch_sgd") -> dict:
    gen = torch.Generator().manual_seed(0)
    masks = random_masks(build_model(model_name, seed=0), density, gen)
    model = sparsify(build_model(model_name, seed=0), masks=masks, path="sparse", backend="interpret")
    floor = floor_model(model)
    x = torch.randn(batch, *INPUT_SHAPES[default_dataset(model_name)], generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    opt, fopt = make_opt(optimizer, model.parameters()), make_opt(optimizer, floor.parameters())
    with LaunchStub() as stub:
        fwd0 = stub.count
        loss = F.cross_entropy(model(x), y)
        fwd = stub.count - fwd0
        loss.backward()
        bwd = stub.count - fwd0 - fwd
        opt_ms: list[float] = []
        fns = {"sparse_lth": lambda: sgd_step(model, opt, x, y, opt_ms),
               "torch_floor": lambda: sgd_step(floor, fopt, x, y)}
        samples = interleaved_samples(fns, repeats, lambda f: wall_ms(f, inner), warmup=3)
    us = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    us["opt"] = statistics.median(opt_ms[3:]) * 1e3  # without the 3 warm-up calls (one step each, whatever inner)
    launches = fwd + bwd
    return {"model": model_name, "density": density, "batch": batch, "optimizer": optimizer,
            "step_us": round(us["sparse_lth"], 1),
            "floor_us": round(us["torch_floor"], 1), "opt_us": round(us["opt"], 1), "launches_fwd": fwd, "launches_bwd": bwd,
            "host_us_per_launch": round((us["sparse_lth"] - us["torch_floor"]) / launches, 1) if launches else "",
            "device": cpu_device_label(), "torch": torch.__version__, "commit": git_commit()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet300_100", choices=["lenet300_100", "conv2", "conv4", "conv6"],
                    help="LeNet-300-100 on 28x28 MNIST-shaped inputs, or Conv-2/4/6 on 32x32x3 CIFAR-shaped ones "
                         "(default: lenet300_100)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.02])
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1001, help="interleaved rounds (median over them)")
    ap.add_argument("--inner", type=int, default=1,
                    help="steps per timed round (1: each step timed alone, so that a preempted step is one outlier "
                         "the median drops, not a slower round)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--optimizer", choices=OPTIMIZERS, nargs="+", default=["torch_sgd"],
                    help="the step's optimizer, in the step and the floor alike; several: one row each "
                         "(default: torch_sgd)")
    ap.add_argument("--out", help="write the rows as CSV here")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.inner < 1 or args.batch < 1:
        ap.error("--repeats, --inner and --batch must be at least 1")
    if any(not 0 < d <= 1 for d in args.densities):
        ap.error("--densities must lie in (0, 1]")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'optimizer':>26} {'density':>8} {'step us':>9} {'floor us':>9} {'opt us':>7} {'launches fwd+bwd':>17} "
          f"{'host us/launch':>15}")
    for kind in args.optimizer:
        for d in args.densities:
            r = measure(args.model, d, args.batch, args.repeats, args.inner, kind)
            rows.append(r)
            print(f"{kind:>26} {d:>8g} {r['step_us']:>9.1f} {r['floor_us']:>9.1f} {r['opt_us']:>7.1f} "
                  f"{r['launches_fwd']:>8} + {r['launches_bwd']:<6} {r['host_us_per_launch']:>15}")
    print(f"device: {rows[0]['device']}, torch {torch.__version__}; kernel launches stubbed (host side only)")
    if args.out:
        write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
