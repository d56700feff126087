"""pytest-benchmark suite (CPU): SparseLinear forward+backward on the torch backend against dense masking, at
the LeNet shapes and at 512x4608 (a VGG-19 conv layer as a matrix product) with a CPU-sized batch; and
``build_format``, the index build that runs once per mask (once per IMP round), up to 4096x4096.

    python -m pytest benchmarks/test_bench_linear_cpu.py --benchmark-json benchmarks/results/linear_cpu.json

(4096x4096 at batch 4096 is a GPU shape: ~0.4 TFLOP per step, seconds per call on 2 cores; see
bench_linear_gpu.py.) Speed is recorded here, never asserted.
"""
import pytest
import torch
import torch.nn as nn

from sparse_lth.kernels.format import build_format
from sparse_lth.layers import SparseLinear

from baselines import MaskedLinear

SHAPES = [(300, 784, 60), (100, 300, 60), (512, 4608, 256)]
DENSITIES = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01]


@pytest.mark.parametrize("impl", ["dense_masking", "sparse_lth_auto", "sparse_lth_sparse"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}_b{s[2]}")
def test_linear_fwd_bwd(benchmark, shape, density, impl):
    out_f, in_f, batch = shape
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(out_f, in_f, generator=gen) < density
    ref = nn.Linear(in_f, out_f)
    x = torch.randn(batch, in_f, generator=gen, requires_grad=True)
    dy = torch.randn(batch, out_f, generator=gen)
    if impl == "dense_masking":
        layer = MaskedLinear(ref, mask)

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)
            layer.weight.grad.mul_(layer.mask)
    else:
        layer = SparseLinear.from_dense(ref, mask, path=impl.split("_")[-1])

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)
    # what is timed computes the masked layer (speed is recorded, never asserted; correctness is)
    want = MaskedLinear(ref, mask)
    xr = x.detach().clone().requires_grad_()
    want(xr).backward(dy)
    x.grad = None
    y = layer(x)
    y.backward(dy)
    torch.testing.assert_close(y, want(xr), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    if impl == "sparse_lth_sparse":
        assert layer.path == "sparse"
    benchmark.extra_info.update(density=density, impl=impl, path=getattr(layer, "path", "masked"),
                                device="cpu", dtype="float32")
    benchmark(step)


@pytest.mark.parametrize("density", [1.0, 0.2, 0.05, 0.01])
@pytest.mark.parametrize("shape", [(300, 784), (512, 4608), (4096, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_build_format(benchmark, shape, density):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < density
    benchmark.extra_info.update(density=density, device="cpu", op="build_format")
    fmt = benchmark(build_format, mask)
    assert fmt.nnz == int(mask.sum())
    rebuilt = torch.zeros(shape, dtype=torch.bool)
    rebuilt[fmt.row_idx.long(), fmt.col_idx.long()] = True
    assert torch.equal(rebuilt, mask)
