"""Triton sparse linear kernels (kernels/sparse_linear.py) against their float64 dense-mask references.

Runs the very same kernels compiled on a GPU, or through Triton's interpreter on CPU (see conftest.py); shapes and
batches are kept small because the interpreter costs milliseconds per program.

Every kernel output is written into a NaN-poisoned buffer, itself inside a larger NaN-filled guard buffer: an
element the kernel fails to write stays NaN and fails the comparison, and a write outside the output shows in the
guard band.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_lth.kernels.format import build_format, to_dense
from sparse_lth.kernels.sparse_linear import (
    reference_backward_input,
    reference_backward_weight,
    reference_forward,
    sparse_linear_backward_input,
    sparse_linear_backward_weight,
    sparse_linear_forward,
)

DENSITIES = [1.0, 0.5, 0.1, 0.02, 0.005, 0.0]
# relative error of the one rounding on store (the kernels accumulate in fp32): half an ulp for fp16; a whole ulp
# for bf16, because Triton's interpreter truncates fp32 -> bf16 (compiled kernels round to nearest)
ROUND = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def make_mask(rows, cols, density, seed, empty=True):
    """A random mask with exactly round(density * rows * cols) live weights; with ``empty`` (and 0 < density < 1)
    row 1 and column cols-2 are cleared so that the kernels meet rows and columns with no live weight."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    nnz = int(round(density * n))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[:nnz]] = True
    mask = flat.view(rows, cols)
    if empty and 0.0 < density < 1.0 and rows > 2 and cols > 2:
        mask[1, :] = False
        mask[:, cols - 2] = False
    return mask


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``t`` (B, n) in another memory layout."""
    if kind == "contig":
        return t.contiguous()
    if kind == "batch_minor":  # (B, n) with strides (1, B)
        return t.t().contiguous().t()
    if kind == "strided":  # every other column of a wider buffer, rows padded: no unit stride anywhere
        big = torch.full((t.shape[0], 2 * t.shape[1] + 3), float("nan"), dtype=t.dtype, device=t.device)
        v = big[:, 1:1 + 2 * t.shape[1]:2]
        v.copy_(t)
        return v
    raise ValueError(kind)


def poisoned(shape, dtype, device, kind="contig"):
    """A NaN-filled output view inside a larger NaN-filled guard buffer; returns (view, guard, inner-mask)."""
    if len(shape) == 1:
        guard = torch.full((shape[0] + 7,), float("nan"), dtype=dtype, device=device)
        view = guard[3:3 + shape[0]]
        inner = torch.zeros(guard.shape, dtype=torch.bool, device=device)
        inner[3:3 + shape[0]] = True
        return view, guard, inner
    b, n = shape
    if kind == "batch_minor":  # guard is (n + 3, b + 2), the view its transposed interior
        guard = torch.full((n + 3, b + 2), float("nan"), dtype=dtype, device=device)
        view = guard[2:2 + n, 1:1 + b].t()
        inner = torch.zeros(guard.shape, dtype=torch.bool, device=device)
        inner[2:2 + n, 1:1 + b] = True
    else:
        guard = torch.full((b + 2, n + 3), float("nan"), dtype=dtype, device=device)
        view = guard[1:1 + b, 2:2 + n]
        inner = torch.zeros(guard.shape, dtype=torch.bool, device=device)
        inner[1:1 + b, 2:2 + n] = True
    return view, guard, inner


def check_guard(guard, inner):
    assert torch.isnan(guard[~inner]).all(), "kernel wrote outside its output"


def assert_matches(out, ref, absref, dtype, what):
    """|out - ref| <= round(dtype) * |ref| + 1e-5 * absref + 1e-6, elementwise, with absref the same sum over
    absolute values (the scale of the rounding errors of an fp32 accumulation)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out = out.double().cpu()
    ref = ref.double().cpu()
    absref = absref.double().cpu()
    assert not torch.isnan(out).any(), f"{what}: {int(torch.isnan(out).sum())} NaN (unwritten?) elements"
    err = (out - ref).abs()
    tol = ROUND[dtype] * ref.abs() + 1e-5 * absref + 1e-6
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements off; max err {err.max().item():.3g}, "
                           f"first at {tuple(bad.nonzero()[0].tolist())}")


def setup(rows, cols, batch, density, dtype, device, seed=0, empty=True):
    mask = make_mask(rows, cols, density, seed, empty)
    fmt = build_format(mask.to(device))
    values = randn(fmt.nnz, dtype=dtype, device=device, seed=seed + 1)
    x = randn(batch, cols, dtype=dtype, device=device, seed=seed + 2)
    bias = randn(rows, dtype=dtype, device=device, seed=seed + 3)
    dy = randn(batch, rows, dtype=dtype, device=device, seed=seed + 4)
    return mask, fmt, values, x, bias, dy


def abs_refs(x, values, fmt, bias, dy):
    """float64 sums of absolute values matching each op (tolerance scales)."""
    w = to_dense(values.double().abs(), fmt)
    fwd = x.double().abs() @ w.t() + (0 if bias is None else bias.double().abs())
    bwd_in = dy.double().abs() @ w
    g = dy.double().abs().t() @ x.double().abs()
    bwd_w = g[fmt.row_idx.long(), fmt.col_idx.long()]
    return fwd, bwd_in, bwd_w


def run_all(rows, cols, batch, density, dtype, device, *, in_layout="contig", out_layout="contig", bias=True,
            activation=None, seed=0, config_fwd=None, config_w=None, wgrad_dtype=None):
    mask, fmt, values, x, b, dy = setup(rows, cols, batch, density, dtype, device, seed)
    if not bias:
        b = None
    if 0.0 < density < 1.0 and rows > 2 and cols > 2:  # the test really meets empty rows and columns
        assert not mask[1].any() and not mask[:, cols - 2].any()
    xin, dyin = layout(x, in_layout), layout(dy, in_layout)
    a_fwd, a_in, a_w = abs_refs(x, values, fmt, b, dy)

    y, guard, inner = poisoned((batch, rows), dtype, device, out_layout)
    res = sparse_linear_forward(xin, values, fmt, b, activation, out=y, config=config_fwd)
    assert res.data_ptr() == y.data_ptr()
    check_guard(guard, inner)
    x64, v64, dy64 = x.double(), values.double(), dy.double()
    b64 = None if b is None else b.double()
    assert_matches(y, reference_forward(x64, v64, fmt, b64, activation), a_fwd, dtype, "forward")

    dx, guard, inner = poisoned((batch, cols), dtype, device, out_layout)
    sparse_linear_backward_input(dyin, values, fmt, out=dx, config=config_fwd)
    check_guard(guard, inner)
    assert_matches(dx, reference_backward_input(dy64, v64, fmt), a_in, dtype, "backward_input")

    wd = dtype if wgrad_dtype is None else wgrad_dtype
    dv, guard, inner = poisoned((fmt.nnz,), wd, device)
    sparse_linear_backward_weight(dyin, xin, fmt, out_dtype=wgrad_dtype, out=dv, config=config_w)
    check_guard(guard, inner)
    assert_matches(dv, reference_backward_weight(dy64, x64, fmt), a_w, wd, "backward_weight")
    return fmt


# ---------------------------------------------------------------------------------------------------------------
# the references themselves, against autograd through a dense masked weight
# ---------------------------------------------------------------------------------------------------------------
def test_references_match_autograd():
    mask, fmt, values, x, b, dy = setup(13, 29, 6, 0.3, torch.float64, "cpu", seed=5)
    w = to_dense(values, fmt).clone().requires_grad_(True)
    xx = x.clone().requires_grad_(True)
    y = torch.relu(torch.nn.functional.linear(xx, w * mask, b))
    y.backward(dy)
    torch.testing.assert_close(reference_forward(x, values, fmt, b, "relu"), y.detach())
    pre = torch.nn.functional.linear(x, w.detach() * mask, b)
    g = dy * (pre > 0)
    torch.testing.assert_close(reference_backward_input(g, values, fmt), xx.grad)
    torch.testing.assert_close(reference_backward_weight(g, x, fmt), w.grad[mask])
    assert (w.grad[~mask] == 0).all()  # through w * mask, pruned positions get no gradient


# ---------------------------------------------------------------------------------------------------------------
# kernels vs references
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 13)])
def test_small_all_densities(kernel_device, rows, cols, batch, density):
    run_all(rows, cols, batch, density, torch.float32, kernel_device, bias=True, activation=None, seed=rows + batch)
    run_all(rows, cols, batch, density, torch.float32, kernel_device, bias=False, activation="relu", seed=3,
            in_layout="strided", out_layout="batch_minor")


@pytest.mark.parametrize("density", DENSITIES)
def test_257x129_all_densities(kernel_device, density):
    # bias + relu, a non-contiguous (strided) input; batch 5
    run_all(257, 129, 5, density, torch.float32, kernel_device, bias=True, activation="relu",
            in_layout="strided", seed=11)


def test_257x129_batch1_no_bias(kernel_device):
    run_all(257, 129, 1, 0.1, torch.float32, kernel_device, bias=False, activation=None, seed=12)


@pytest.mark.parametrize("density,batch,in_layout", [(0.1, 5, "contig"), (0.005, 1, "batch_minor")])
def test_300x784(kernel_device, density, batch, in_layout):
    run_all(300, 784, batch, density, torch.float32, kernel_device, bias=True, activation="relu",
            in_layout=in_layout, seed=13)


@pytest.mark.parametrize("in_layout", ["contig", "strided"])
@pytest.mark.parametrize("in_place", [True, False])
def test_row_major_operands_in_place_or_copied(kernel_device, monkeypatch, in_layout, in_place):
    """A row-major or strided operand is read in place (its own strides) or copied batch-minor first: same results."""
    from sparse_lth.kernels import sparse_linear as K

    monkeypatch.setattr(K, "IN_PLACE_MAX_BYTES", 1 << 40 if in_place else 0)
    monkeypatch.setattr(K, "IN_PLACE_MAX_GATHERS", 1 << 40 if in_place else 0)
    run_all(57, 43, 19, 0.2, torch.float32, kernel_device, bias=True, activation="relu", in_layout=in_layout,
            seed=17)


def test_prepare_operand_decides_once():
    from sparse_lth.kernels import sparse_linear as K

    x = torch.randn(60, 784)                                   # LeNet's input batch, row-major: 188 KB
    assert K.prepare_operand(x, 2_000) is x                    # few gathers: read in place, no copy
    big = K.prepare_operand(x, 300 * 784)                      # 14M gathers: copied batch-minor once
    assert big is not x and big.stride(0) == 1 and torch.equal(big, x)
    assert K.prepare_operand(big, 300 * 784) is big            # a prepared operand passes through unchanged
    bm = x.t().contiguous().t()
    assert K.prepare_operand(bm, 300 * 784) is bm              # already batch-minor
    large = torch.randn(512, 1024)                             # 2 MiB > IN_PLACE_MAX_BYTES
    assert K.prepare_operand(large, 1).stride(0) == 1
    one = torch.randn(1, 784)                                  # batch 1: any layout is batch-minor
    assert K.prepare_operand(one, 10**9) is one


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [1.0, 0.1])
def test_half_precision(kernel_device, dtype, density):
    run_all(33, 70, 5, density, dtype, kernel_device, bias=True, activation="relu", seed=21)
    # weight gradient of half inputs in fp32
    run_all(7, 13, 3, density, dtype, kernel_device, bias=True, seed=22, wgrad_dtype=torch.float32)


def test_multiple_blocks_and_partial_tiles(kernel_device):
    # explicit small blocks: several k-steps per row, several row blocks and batch blocks, partial last ones
    for density in (1.0, 0.3):
        run_all(18, 40, 37, density, torch.float32, kernel_device, bias=True, activation="relu", seed=31,
                config_fwd={"BLOCK_R": 4, "BLOCK_K": 16, "BLOCK_B": 16}, config_w={"BLOCK_NNZ": 32, "BLOCK_B": 16})


def test_int64_pointers(kernel_device):
    # the pointer dtypes build_format uses once nnz can pass 2**31
    mask, fmt, values, x, b, dy = setup(30, 50, 3, 0.2, torch.float32, kernel_device, seed=41)
    fmt64 = dataclasses.replace(fmt, row_ptr=fmt.row_ptr.long(), col_ptr=fmt.col_ptr.long(),
                                t_perm=fmt.t_perm.long(), col_idx=fmt.col_idx.long(), row_idx=fmt.row_idx.long(),
                                t_row_idx=fmt.t_row_idx.long(), row_order=fmt.row_order.long(),
                                col_order=fmt.col_order.long())
    a_fwd, a_in, a_w = abs_refs(x, values, fmt, b, dy)
    assert_matches(sparse_linear_forward(x, values, fmt64, b), reference_forward(x, values, fmt, b), a_fwd,
                   torch.float32, "forward int64")
    assert_matches(sparse_linear_backward_input(dy, values, fmt64), reference_backward_input(dy, values, fmt), a_in,
                   torch.float32, "backward_input int64")
    assert_matches(sparse_linear_backward_weight(dy, x, fmt64), reference_backward_weight(dy, x, fmt), a_w,
                   torch.float32, "backward_weight int64")


def test_fully_pruned(kernel_device):
    mask, fmt, values, x, b, dy = setup(9, 11, 4, 0.0, torch.float32, kernel_device)
    assert fmt.nnz == 0
    torch.testing.assert_close(sparse_linear_forward(x, values, fmt, b), b.expand(4, 9), rtol=0, atol=0)
    torch.testing.assert_close(sparse_linear_forward(x, values, fmt, b, "relu"), torch.relu(b).expand(4, 9),
                               rtol=0, atol=0)
    assert (sparse_linear_forward(x, values, fmt) == 0).all()
    assert (sparse_linear_backward_input(dy, values, fmt) == 0).all()
    dv = sparse_linear_backward_weight(dy, x, fmt)
    assert dv.shape == (0,) and dv.dtype == torch.float32


def test_default_layouts_and_dtypes(kernel_device):
    mask, fmt, values, x, b, dy = setup(12, 20, 6, 0.4, torch.bfloat16, kernel_device, seed=51)
    y = sparse_linear_forward(x, values, fmt, b)
    assert y.shape == (6, 12) and y.dtype == torch.bfloat16 and y.t().is_contiguous()  # batch-minor
    a_fwd, a_in, a_w = abs_refs(x, values, fmt, b, dy)
    assert_matches(y, reference_forward(x.double(), values.double(), fmt, b.double()), a_fwd, torch.bfloat16,
                   "forward default out")
    dx = sparse_linear_backward_input(dy, values, fmt)
    assert dx.shape == (6, 20) and dx.dtype == torch.bfloat16
    assert_matches(dx, reference_backward_input(dy.double(), values.double(), fmt), a_in, torch.bfloat16,
                   "backward_input default")
    dv = sparse_linear_backward_weight(dy, x, fmt)
    assert dv.shape == (fmt.nnz,) and dv.dtype == torch.bfloat16
    dv32 = sparse_linear_backward_weight(dy, x, fmt, out_dtype=torch.float32)
    assert dv32.dtype == torch.float32
    assert_matches(dv32, reference_backward_weight(dy.double(), x.double(), fmt), a_w, torch.float32, "dW fp32")
    assert_matches(dv, reference_backward_weight(dy.double(), x.double(), fmt), a_w, torch.bfloat16, "dW bf16")


def test_empty_batch(kernel_device):
    mask, fmt, values, x, b, dy = setup(5, 6, 0, 0.5, torch.float32, kernel_device)
    assert sparse_linear_forward(x, values, fmt, b).shape == (0, 5)
    assert sparse_linear_backward_input(dy, values, fmt).shape == (0, 6)
    assert (sparse_linear_backward_weight(dy, x, fmt) == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def prob(kernel_device):
    return setup(6, 10, 3, 0.5, torch.float32, kernel_device, seed=61)


def test_bad_shapes(prob):
    mask, fmt, values, x, b, dy = prob
    with pytest.raises(ValueError, match="x has shape"):
        sparse_linear_forward(x[:, :-1], values, fmt, b)
    with pytest.raises(ValueError, match="x has shape"):
        sparse_linear_forward(x[0], values, fmt, b)
    with pytest.raises(ValueError, match="x has shape"):
        sparse_linear_forward(x[None], values, fmt, b)
    with pytest.raises(ValueError, match="values has shape"):
        sparse_linear_forward(x, values[:-1], fmt, b)
    with pytest.raises(ValueError, match="bias has shape"):
        sparse_linear_forward(x, values, fmt, b[:-1])
    with pytest.raises(ValueError, match="dy has shape"):
        sparse_linear_backward_input(dy[:, :-1], values, fmt)
    with pytest.raises(ValueError, match="values has shape"):
        sparse_linear_backward_input(dy, values[1:], fmt)
    with pytest.raises(ValueError, match="x has shape"):
        sparse_linear_backward_weight(dy, x[:-1], fmt)
    with pytest.raises(ValueError, match="dy has shape"):
        sparse_linear_backward_weight(dy.t(), x, fmt)
    # a batch whose loop index would wrap in int32 (expanded views: no memory behind them)
    huge = 2**31 - 4000
    with pytest.raises(ValueError, match="overflows the kernels' int32 batch loop"):
        sparse_linear_backward_weight(dy[:1].expand(huge, -1), x[:1].expand(huge, -1), fmt)
    # a strided vector (values, bias) would be read as if contiguous: refused
    with pytest.raises(ValueError, match=r"values has stride 2; a vector must be contiguous"):
        sparse_linear_forward(x, values.repeat_interleave(2)[::2], fmt, b)
    with pytest.raises(ValueError, match=r"bias has stride 2"):
        sparse_linear_forward(x, values, fmt, b.repeat_interleave(2)[::2])
    with pytest.raises(ValueError, match=r"values has stride 2"):
        sparse_linear_backward_input(dy, values.repeat_interleave(2)[::2], fmt)
    with pytest.raises(ValueError, match="out is"):
        sparse_linear_forward(x, values, fmt, b, out=torch.empty(3, 7, device=x.device))
    with pytest.raises(ValueError, match="out is"):
        sparse_linear_backward_weight(dy, x, fmt, out=torch.empty(fmt.nnz, dtype=torch.float16, device=x.device))


def test_an_out_buffer_that_shares_memory_or_needs_grad_is_refused_and_a_written_one_is_seen_by_autograd(prob):
    """out= that is an input (on a GPU's many programs the kernel read what it had written: errors of 5-8), an
    expanded stride-0 buffer (every row the last one written), or a leaf that requires grad: refused. A buffer
    written in place that a graph saved now fails that graph's backward, as torch's in-place ops do (the kernels
    write behind autograd's back: it went on with the new values)."""
    mask, fmt, values, x, b, dy = prob  # a 6x10 weight, batch 3
    sq = setup(7, 7, 3, 0.5, torch.float32, x.device, seed=62)  # square: out may be x itself
    _, sfmt, svalues, sx, sb, sdy = sq
    for call in (lambda: sparse_linear_forward(sx, svalues, sfmt, sb, out=sx),
                 lambda: sparse_linear_backward_input(sdy, svalues, sfmt, out=sdy),
                 lambda: sparse_linear_forward(x, values, fmt, b, out=torch.empty(1, 6, device=x.device).expand(3, 6)),
                 lambda: sparse_linear_backward_weight(dy, x, fmt, out=torch.empty(1, device=x.device).expand(fmt.nnz)),
                 lambda: sparse_linear_forward(x, values, fmt, b, out=torch.empty(3, 6, device=x.device,
                                                                                  requires_grad=True))):
        with pytest.raises(ValueError, match="out (shares memory with an input|has a zero stride|requires grad)"):
            call()
    buf = torch.empty(4 * 3 * 7, device=x.device)  # two views of one buffer that do not overlap: fine
    y = sparse_linear_forward(sx, svalues, sfmt, sb, out=buf[21:42].view(3, 7))
    assert torch.equal(y, sparse_linear_forward(sx, svalues, sfmt, sb))
    a = torch.randn(3, 6, device=x.device, requires_grad=True)
    o = torch.zeros(3, 6, device=x.device)
    loss = (a * o).sum()  # saves o
    sparse_linear_forward(x, values, fmt, b, out=o)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bad_dtypes(prob):
    mask, fmt, values, x, b, dy = prob
    with pytest.raises(TypeError, match="dtypes must match"):
        sparse_linear_forward(x, values.half(), fmt, b)
    with pytest.raises(TypeError, match="dtypes must match"):
        sparse_linear_forward(x, values, fmt, b.bfloat16())
    with pytest.raises(TypeError, match="dtype"):
        sparse_linear_forward(x.double(), values.double(), fmt)
    with pytest.raises(TypeError, match="dtype"):
        sparse_linear_forward(x.long(), values, fmt)
    with pytest.raises(TypeError, match="dtypes must match"):
        sparse_linear_backward_input(dy.bfloat16(), values, fmt)
    with pytest.raises(TypeError, match="dtypes must match"):
        sparse_linear_backward_weight(dy, x.half(), fmt)
    with pytest.raises(TypeError, match="out_dtype"):
        sparse_linear_backward_weight(dy, x, fmt, out_dtype=torch.int32)


def test_bad_format(prob):
    mask, fmt, values, x, b, dy = prob
    for name in ("col_idx", "row_ptr", "t_perm", "t_row_idx", "col_ptr", "row_order"):
        bad = dataclasses.replace(fmt, **{name: getattr(fmt, name)[:-1]})
        with pytest.raises(ValueError, match=name):
            sparse_linear_forward(x, values, bad, b)
        with pytest.raises(ValueError, match=name):
            sparse_linear_backward_input(dy, values, bad)
        with pytest.raises(ValueError, match=name):
            sparse_linear_backward_weight(dy, x, bad)
    with pytest.raises(ValueError, match="col_idx"):
        sparse_linear_forward(x, values, dataclasses.replace(fmt, col_idx=fmt.col_idx.float()), b)
    with pytest.raises(TypeError, match="SparseFormat"):
        sparse_linear_forward(x, values, mask, b)
    with pytest.raises(ValueError, match="activation"):
        sparse_linear_forward(x, values, fmt, b, activation="gelu")
    with pytest.raises(ValueError, match="power of two"):
        sparse_linear_forward(x, values, fmt, b, config={"BLOCK_R": 1, "BLOCK_K": 3, "BLOCK_B": 16})
    with pytest.raises(ValueError, match="config"):
        sparse_linear_backward_weight(dy, x, fmt, config={"BLOCK_K": 16, "BLOCK_B": 16})


def test_mismatched_devices(prob):
    mask, fmt, values, x, b, dy = prob
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="different devices"):
        sparse_linear_forward(x.to(meta), values, fmt, b)
    with pytest.raises(ValueError, match="different devices"):
        sparse_linear_forward(x, values, fmt.to(meta), b)
    with pytest.raises(ValueError, match="different devices"):
        sparse_linear_backward_input(dy, values.to(meta), fmt)
    with pytest.raises(ValueError, match="different devices"):
        sparse_linear_backward_weight(dy, x.to(meta), fmt)
    if torch.cuda.is_available():
        other = "cpu" if x.is_cuda else "cuda"
        with pytest.raises(ValueError, match="different devices"):
            sparse_linear_forward(x, values, fmt.to(other), b)


def test_autotune_bench_setting(monkeypatch):
    from sparse_lth.kernels._triton import autotune_bench

    monkeypatch.delenv("SPARSE_LTH_TUNE_MS", raising=False)
    assert autotune_bench() is None                       # Triton's own default timing
    monkeypatch.setenv("SPARSE_LTH_TUNE_MS", "5,20")
    assert callable(autotune_bench())
    for bad in ("20", "a,b", "5,0", "-1,20"):
        monkeypatch.setenv("SPARSE_LTH_TUNE_MS", bad)
        with pytest.raises(ValueError, match="WARMUP,REP"):
            autotune_bench()


# ---------------------------------------------------------------------------------------------------------------
# the slab kernels (variant "slab"): one panel of the dense operand in L1 while a program sweeps all its rows
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_panels(monkeypatch):
    """Base panels of 8 columns, so that small interpreted shapes have several panels (a partial last one)."""
    from sparse_lth.kernels import format as F

    monkeypatch.setattr(F, "PANEL", 8)
    return 8


SLAB_CFG = {"PANEL_STEP": 1, "BLOCK_R": 4, "BLOCK_K": 4, "BLOCK_B": 16, "CHUNKS": 2}


@pytest.mark.parametrize("density", [1.0, 0.3, 0.02, 0.0])
def test_slab_kernels_all_densities(kernel_device, small_panels, density):
    # 45 columns = 6 panels of 8 (the last partial), 23 rows over 2 chunks of 4-row blocks, k in steps of 4,
    # batch 37 = 3 blocks of 16 (the last partial); bias + relu, a strided input, batch-minor poisoned outputs
    fmt = run_all(23, 45, 37, density, torch.float32, kernel_device, bias=True, activation="relu",
                  in_layout="strided", out_layout="batch_minor", seed=71, config_fwd=SLAB_CFG, config_w=SLAB_CFG)
    assert fmt.row_panel_ptr.shape == (23, 7) and fmt.col_panel_ptr.shape == (45, 4)


@pytest.mark.parametrize("cfg", [
    {"PANEL_STEP": 2, "BLOCK_R": 16, "BLOCK_K": 16, "BLOCK_B": 16, "CHUNKS": 1000},  # more chunks than rows
    {"PANEL_STEP": 8, "BLOCK_R": 8, "BLOCK_K": 8, "BLOCK_B": 32, "CHUNKS": 1},       # one sweep, one chunk
    None,                                                                              # the launcher's heuristic
])
def test_slab_kernels_configs(kernel_device, small_panels, cfg):
    kw = dict(config_fwd=cfg, config_w=cfg) if cfg else {}
    if cfg is None:
        from sparse_lth.kernels import sparse_linear as K

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(K, "DEFAULT_VARIANT", "slab")  # ($SPARSE_LTH_LINEAR_VARIANT=slab at import)
            assert K._resolve_variant(None, None, "op") == "slab"
            run_all(19, 30, 5, 0.4, torch.float32, kernel_device, bias=False, seed=72)
        return
    run_all(19, 30, 5, 0.4, torch.float32, kernel_device, bias=False, seed=72, **kw)


def test_slab_kernels_batch1_and_reduced_precision(kernel_device, small_panels):
    run_all(13, 29, 1, 0.3, torch.float32, kernel_device, bias=True, seed=73, config_fwd=SLAB_CFG,
            config_w=SLAB_CFG)
    # bf16: partial sums of all but the last panel go through an fp32 workspace; weight gradient in fp32 and bf16
    run_all(13, 29, 6, 0.5, torch.bfloat16, kernel_device, bias=True, activation="relu", seed=74,
            config_fwd=SLAB_CFG, config_w=SLAB_CFG, wgrad_dtype=torch.float32)
    run_all(13, 29, 6, 0.5, torch.bfloat16, kernel_device, bias=True, seed=75, config_fwd=SLAB_CFG,
            config_w=SLAB_CFG)


def test_slab_kernels_int64_pointers(kernel_device, small_panels):
    mask, fmt, values, x, b, dy = setup(17, 26, 4, 0.3, torch.float32, kernel_device, seed=76)
    fmt64 = dataclasses.replace(fmt, **{k: v.long() for k, v in fmt.tensors().items()})
    a_fwd, a_in, a_w = abs_refs(x, values, fmt, b, dy)
    assert_matches(sparse_linear_forward(x, values, fmt64, b, config=SLAB_CFG), reference_forward(x, values, fmt, b),
                   a_fwd, torch.float32, "slab forward int64")
    assert_matches(sparse_linear_backward_input(dy, values, fmt64, config=SLAB_CFG),
                   reference_backward_input(dy, values, fmt), a_in, torch.float32, "slab backward_input int64")
    assert_matches(sparse_linear_backward_weight(dy, x, fmt64, config=SLAB_CFG),
                   reference_backward_weight(dy, x, fmt), a_w, torch.float32, "slab backward_weight int64")


def test_interpreter_numpy_mismatch_is_named():
    """Triton 3.6's interpreter (the GPU machine's Triton) with NumPy >= 2.4 fails every launch with a TypeError
    deep in the interpreter: the detector names it from the interpreter's source line and NumPy's version."""
    from sparse_lth.kernels._triton import interpreter_numpy_problem

    unfixed = '    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))\n'  # triton 3.6
    fixed = '    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))\n'  # 3.8
    msg = interpreter_numpy_problem("2.4.6", unfixed)
    assert msg is not None and "numpy<2.4" in msg and "9171" in msg
    assert interpreter_numpy_problem("2.5.0rc1", unfixed) is not None
    assert interpreter_numpy_problem("2.3.5", unfixed) is None
    assert interpreter_numpy_problem("1.26.4", unfixed) is None
    assert interpreter_numpy_problem("2.4.6", fixed) is None
    assert interpreter_numpy_problem("unknown", unfixed) is None


def test_interpreter_numpy_mismatch_refused_at_launch(prob, monkeypatch):
    from sparse_lth.kernels import _triton

    mask, fmt, values, x, b, dy = prob
    monkeypatch.setattr(_triton, "_interpreter_problem", lambda: "NumPy 2.4 and this interpreter disagree")
    if x.device.type == "cuda":  # compiled launches never ask
        assert sparse_linear_forward(x, values, fmt, b).shape == (3, 6)
        return
    with pytest.raises(RuntimeError, match="sparse_linear_forward: NumPy 2.4 and this interpreter disagree"):
        sparse_linear_forward(x, values, fmt, b)
    monkeypatch.undo()
    assert _triton._interpreter_problem() is None  # this install runs the interpreter (every kernel test here)


@pytest.mark.parametrize("variant", ["gather", "slab"])
def test_fused_relu_keeps_nan_as_torch_relu(kernel_device, small_panels, variant):
    """A NaN pre-activation stays NaN through the fused ReLU, as torch.relu, the torch backend and the dense path
    give: Triton's default maximum returns the other operand (PTX max.f32, the interpreter's fmax), which zeroed
    it, so a run diverging to NaN on the sparse path could have gone on training instead of failing visibly."""
    mask, fmt, values, x, b, _ = setup(12, 20, 5, 0.5, torch.float32, kernel_device, seed=81, empty=False)
    x[2, :] = float("nan")  # every output of batch row 2 is NaN before the ReLU
    b[3] = float("inf")     # and +inf survives it
    cfg = SLAB_CFG if variant == "slab" else None
    y = sparse_linear_forward(x, values, fmt, b, "relu", variant=variant, config=cfg).cpu()
    ref = reference_forward(x, values, fmt, b, "relu").cpu()
    assert torch.isnan(y[2]).all() and torch.isnan(ref[2]).all()
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.isinf(y[[0, 1, 3, 4], 3]).all()
    keep = torch.ones(5, dtype=torch.bool)
    keep[2] = False
    torch.testing.assert_close(y[keep], ref[keep])


def test_slab_bad_configs(prob):
    mask, fmt, values, x, b, dy = prob
    with pytest.raises(ValueError, match="variant must be one of"):
        sparse_linear_forward(x, values, fmt, b, variant="fast")
    with pytest.raises(ValueError, match="CHUNKS"):
        sparse_linear_forward(x, values, fmt, b, config={**SLAB_CFG, "CHUNKS": 0})
    with pytest.raises(ValueError, match="OCC"):
        sparse_linear_backward_weight(dy, x, fmt, config={**SLAB_CFG, "OCC": 1.5})
    with pytest.raises(ValueError, match="power of two"):
        sparse_linear_backward_input(dy, values, fmt, config={**SLAB_CFG, "PANEL_STEP": 3})
    with pytest.raises(ValueError, match="config needs keys"):  # a gather config for the slab kernel
        sparse_linear_forward(x, values, fmt, b, variant="slab", config={"BLOCK_R": 4, "BLOCK_K": 4, "BLOCK_B": 16})
    with pytest.raises(ValueError, match="row_panel_ptr"):
        sparse_linear_forward(x, values, dataclasses.replace(fmt, row_panel_ptr=fmt.row_panel_ptr[:, :-1]), b)
    with pytest.raises(ValueError, match="col_panel_ptr"):
        sparse_linear_backward_input(dy, values, dataclasses.replace(fmt, col_panel_ptr=fmt.col_panel_ptr.t()))


def test_auto_variant_times_the_kernels_once_per_problem(kernel_device, small_panels, monkeypatch):
    """variant="auto" on a large enough op (here: any) times the gather kernel and every slab configuration, keeps
    the fastest for the problem, and reuses that choice; the result is right whichever kernel wins."""
    from sparse_lth.kernels import sparse_linear as K

    timed = []

    def fake_ms(run):  # the first slab configuration "wins"; every candidate still runs (and must be correct)
        run()
        timed.append(run)
        if len(timed) == 3:  # a candidate that cannot run on this device (e.g. out of registers) is passed over
            raise RuntimeError("out of resources")
        return 0.5 if len(timed) in (2, 5) else 1.0  # forward: gather, slab 1, slab 2; weight gradient: gather, slab

    monkeypatch.setattr(K, "_times_variants", lambda: True)
    monkeypatch.setattr(K, "SLAB_MIN_GATHERS", 0)
    monkeypatch.setattr(K, "_bench_ms", fake_ms)
    monkeypatch.setattr(K, "_SPMM_SLAB_CONFIGS", {4: [(1, 4, 4, 16, 4, 1), (2, 8, 8, 16, 4, 2)], 2: []})
    monkeypatch.setattr(K, "_SDDMM_SLAB_CONFIGS", {4: [(1, 4, 4, 16, 4, 1)]})
    monkeypatch.setattr(K, "_choices", {})
    mask, fmt, values, x, b, dy = setup(11, 20, 3, 0.4, torch.float32, kernel_device, seed=77)
    a_fwd, a_in, a_w = abs_refs(x, values, fmt, b, dy)
    for _ in range(2):
        assert_matches(sparse_linear_forward(x, values, fmt, b), reference_forward(x, values, fmt, b), a_fwd,
                       torch.float32, "auto forward")
        assert_matches(sparse_linear_backward_weight(dy, x, fmt), reference_backward_weight(dy, x, fmt), a_w,
                       torch.float32, "auto backward_weight")
    assert len(timed) == 3 + 2  # forward: gather + 2 slab configs; weight gradient: gather + 1; once each
    choices = K.variant_choices()
    assert {p[0] for p in choices} == {"fwd", "bwd_weight"}
    for problem, (variant, cfg, times) in choices.items():
        assert variant == "slab" and cfg["PANEL_STEP"] == 1 and min(times.values()) == 0.5, (problem, times)
    assert sorted(choices[next(p for p in choices if p[0] == "fwd")][2].values()) == [0.5, 1.0, float("inf")]


# ---------------------------------------------------------------------------------------------------------------
# offsets: int32 unless an offset can reach 2**30 (fewer registers); the int64 kernels give the same results
# ---------------------------------------------------------------------------------------------------------------
def test_offset_dtype_choice():
    import triton.language as tl

    from sparse_lth.kernels._triton import offset_dtype

    small = torch.empty(4096, 4096, device="meta")             # 2**24 elements: int32 offsets
    big = torch.empty(2**16, 2**15, device="meta")             # offsets up to 2**31: int64
    assert offset_dtype(small, None, counts=(10**6,)) == tl.int32
    assert offset_dtype(small, big) == tl.int64
    assert offset_dtype(small.t(), counts=(2**30,)) == tl.int64   # e.g. nnz positions
    assert offset_dtype(big[:, :1]) == tl.int64                   # a view: its strides count, not its size
    assert offset_dtype(torch.empty(0, 2**31, device="meta")) == tl.int32   # empty: no offset at all
    # contiguous: the extent is numel - 1, at the limit's edge either way
    assert offset_dtype(torch.empty(2**15, 2**15, device="meta")) == tl.int32
    assert offset_dtype(torch.empty(2**30 + 1, device="meta")) == tl.int64
    # size-1 dimensions with any stride are contiguous and reach nothing; a broadcast dimension reaches nothing
    assert offset_dtype(torch.empty_strided((1, 8), (2**40, 1), device="meta")) == tl.int32
    assert offset_dtype(torch.empty(8, 1, device="meta").expand(8, 2**31)) == tl.int32


@pytest.mark.parametrize("cfg", [None, SLAB_CFG])
def test_int64_offsets(kernel_device, small_panels, monkeypatch, cfg):
    from sparse_lth.kernels import _triton

    monkeypatch.setattr(_triton, "FORCE_OFFSET64", True)
    run_all(19, 30, 5, 0.3, torch.float32, kernel_device, bias=True, activation="relu", in_layout="strided",
            seed=78, config_fwd=cfg, config_w=cfg)
