"""The Triton linear kernels' bodies (kernels/sparse_linear.py, gather and slab variants), from a mutation campaign
on their device code: each test pins a behaviour that the other kernel tests let a wrong line get away with.

* Exact fp32 accumulation for half-precision operands: values chosen so that every product and every partial sum is
  exact in fp32 but not in fp16, and the exact results cancel to a tiny number. A product, a partial sum (the slab
  kernel's workspace between panels) or a row sum rounded to fp16 before the bias gives 0 instead.
* Lanes past the batch are never read: batch-minor operands that are views of NaN-padded buffers, so a batch lane
  that a load's mask lets through brings NaN into the weight gradient's batch reduction.
* A non-finite live weight pollutes only the outputs that read it: the k lanes of a row block past a row's length
  are masked to 0.0, never loaded from the neighbouring entries (inf * 0 would be NaN).
* A strided ``out`` for the gather weight gradient.
* The slab grid with numbers of batch blocks and row chunks that share a factor.
* Guard-page tests (always interpreted, in a subprocess as in test_kernels_edges.py): the gather kernel's processing
  order and the slab kernel's fp32 partial sums (in ``out`` or in its workspace) against a PROT_NONE page.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_lth.kernels.format import build_format, to_values
from sparse_lth.kernels.sparse_linear import (
    reference_backward_input,
    reference_backward_weight,
    reference_forward,
    sparse_linear_backward_input,
    sparse_linear_backward_weight,
    sparse_linear_forward,
)

from test_kernels_edges import at_page_end, batch_minor_at_page_end, run_guard_case
from test_kernels_linear import SLAB_CFG, abs_refs, assert_matches, run_all, setup, small_panels  # noqa: F401

VARIANTS = ["gather", "slab"]


def _config(variant):
    return SLAB_CFG if variant == "slab" else None


# ---------------------------------------------------------------------------------------------------------------
# fp32 accumulation, exact where fp16 is not
# ---------------------------------------------------------------------------------------------------------------
A = 1 + 2.0**-10       # fp16: 1 + one ulp; A * A = 1 + 2**-9 + 2**-20 (exact in fp32, rounds to 1 + 2**-9 in fp16)
M = -(1 + 2.0**-9)     # cancels A * A down to 2**-20 (an fp16 subnormal: exact)
T = 2.0**-11           # 1 + T is not an fp16 number (rounds to 1); T itself is


def _exact_problem(device):
    """A 3 x 12 fp16 layer (two 8-column panels under small_panels), batch 2, whose every result is exact in fp32:
    row 0 sums A*A + M (2**-20); row 1 sums 1 + T in panel 0 and -1 in panel 1 (2**-11); row 2 sums 1 + T (A + T
    in batch row 0) and adds the bias -1; column 10 of dx sums A*A + M over rows 0 and 1; dW(2, 4) sums A*A + M
    over the batch."""
    w = torch.zeros(3, 12, dtype=torch.float64)
    w[0, 0], w[0, 1], w[0, 10] = A, M, A
    w[1, 2], w[1, 3], w[1, 9], w[1, 10] = 1, T, -1, M
    w[2, 4], w[2, 5], w[2, 11] = 1, T, 1
    mask = w != 0
    x = torch.zeros(2, 12, dtype=torch.float64)
    x[:, 0], x[:, 1], x[:, 2], x[:, 3], x[:, 5], x[:, 9] = A, 1, 1, 1, 1, 1
    x[0, 4], x[1, 4] = A, 1                         # dW(2, 4) = dy[0, 2] * A + dy[1, 2] * 1
    dy = torch.zeros(2, 3, dtype=torch.float64)
    dy[:, 0], dy[:, 1] = A, 1
    dy[0, 2], dy[1, 2] = A, M
    bias = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    fmt = build_format(mask.to(device))
    h = lambda t: t.to(torch.float16).to(device)  # noqa: E731  (every number above is an fp16 number)
    assert torch.equal(h(w).double().cpu(), w) and torch.equal(h(x).double().cpu(), x)
    return fmt, h(to_values(w, mask)), h(x), h(bias), h(dy)


@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_products_and_partial_sums_are_accumulated_exactly_in_fp32(kernel_device, small_panels,
                                                                                  variant):
    """fp16 operands: each product is formed in fp32, each sum (and the slab kernel's partial sum of a panel) stays
    fp32 until the one rounding on store, after the bias. Results that cancel to 2**-20 / 2**-11 come out exact."""
    fmt, values, x, bias, dy = _exact_problem(kernel_device)
    cfg = _config(variant)
    y = sparse_linear_forward(x, values, fmt, bias, variant=variant, config=cfg).cpu()
    ref = reference_forward(x, values, fmt, bias).cpu()
    assert torch.equal(y[:, 0], torch.full((2,), 2.0**-20, dtype=torch.float16)), y[:, 0]   # product in fp32
    assert torch.equal(y[:, 1], torch.full((2,), T, dtype=torch.float16)), y[:, 1]          # partial sum in fp32
    assert torch.equal(y[:, 2], torch.tensor([A + T - 1, T], dtype=torch.float16)), y[:, 2]  # bias, then rounding
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    dx = sparse_linear_backward_input(dy, values, fmt, variant=variant, config=cfg).cpu()
    assert torch.equal(dx[:, 10], torch.full((2,), 2.0**-20, dtype=torch.float16)), dx[:, 10]
    torch.testing.assert_close(dx, reference_backward_input(dy, values, fmt).cpu(), rtol=0, atol=0)
    dv = sparse_linear_backward_weight(dy, x, fmt, variant=variant, config=cfg).cpu()
    k = int(((fmt.row_idx == 2) & (fmt.col_idx == 4)).nonzero())
    assert dv[k].item() == 2.0**-20, dv[k]
    torch.testing.assert_close(dv, reference_backward_weight(dy, x, fmt).cpu(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# lanes past the batch
# ---------------------------------------------------------------------------------------------------------------
def nan_padded_batch_minor(t: torch.Tensor, pad: int = 40) -> torch.Tensor:
    """``t`` (B, n) as a batch-minor view (strides (1, B + pad)) of a buffer whose ``pad`` entries after each
    column's batch are NaN: used in place by the kernels (unit batch stride), and any batch lane past B reads NaN."""
    b, n = t.shape
    buf = torch.full((n, b + pad), float("nan"), dtype=t.dtype, device=t.device)
    buf[:, :b] = t.t()
    view = buf[:, :b].t()
    assert view.stride(0) == 1 and torch.equal(view, t)
    return view


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [5, 21])
def test_weight_gradient_never_reads_lanes_past_the_batch(kernel_device, small_panels, variant, batch):
    """The weight gradient reduces over the batch inside the kernel: dy and x lanes past the batch (here NaN) must be
    masked in both loads, for one partial batch block (5 of 16 lanes) and a full one plus a partial one (21)."""
    mask, fmt, values, x, b, dy = setup(13, 29, batch, 0.4, torch.float32, kernel_device, seed=91)
    ref = reference_backward_weight(dy.double(), x.double(), fmt)
    a_w = abs_refs(x, values, fmt, b, dy)[2]
    cfg = _config(variant) if variant == "slab" else {"BLOCK_NNZ": 32, "BLOCK_B": 16}
    dv = sparse_linear_backward_weight(nan_padded_batch_minor(dy), nan_padded_batch_minor(x), fmt,
                                       variant=variant, config=cfg)
    assert_matches(dv, ref, a_w, torch.float32, f"{variant} weight gradient, NaN past the batch")
    # the forward and input gradient with the same operands (their lanes past the batch are never stored)
    a_fwd, a_in, _ = abs_refs(x, values, fmt, b, dy)
    y = sparse_linear_forward(nan_padded_batch_minor(x), values, fmt, b, "relu", variant=variant,
                              config=_config(variant))
    assert_matches(y, reference_forward(x.double(), values.double(), fmt, b.double(), "relu"), a_fwd,
                   torch.float32, f"{variant} forward, NaN past the batch")
    dx = sparse_linear_backward_input(nan_padded_batch_minor(dy), values, fmt, variant=variant,
                                      config=_config(variant))
    assert_matches(dx, reference_backward_input(dy.double(), values.double(), fmt), a_in, torch.float32,
                   f"{variant} backward_input, NaN past the batch")


# ---------------------------------------------------------------------------------------------------------------
# masked k lanes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # lanes never stored
@pytest.mark.parametrize("variant", VARIANTS)
def test_an_infinite_weight_reaches_only_the_outputs_that_read_it(kernel_device, small_panels, variant):
    """A row block runs to its longest row; the other rows' lanes past their length must give 0.0, not the next
    entries' values times a zero input (inf * 0 = NaN). Infinite live weights (the first, one in the middle, the
    last in CSR order) make exactly the outputs the dense reference makes infinite, and no NaN."""
    mask, fmt, values, x, b, dy = setup(12, 20, 5, 0.5, torch.float32, kernel_device, seed=92)
    x, dy = x.abs() + 0.5, dy.abs() + 0.5        # positive: each output sums +inf terms only, never inf - inf
    values = values.clone()
    values[[0, fmt.nnz // 2, fmt.nnz - 1]] = float("inf")
    cfg = _config(variant)
    for got, ref in ((sparse_linear_forward(x, values, fmt, b, variant=variant, config=cfg),
                      reference_forward(x, values, fmt, b)),
                     (sparse_linear_backward_input(dy, values, fmt, variant=variant, config=cfg),
                      reference_backward_input(dy, values, fmt))):
        got, ref = got.cpu(), ref.cpu()
        assert not torch.isnan(ref).any() and torch.isinf(ref).any() and torch.isfinite(ref).any()
        assert not torch.isnan(got).any(), f"{int(torch.isnan(got).sum())} NaN outputs"
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = torch.isfinite(ref)
        torch.testing.assert_close(got[fin], ref[fin])


def test_gather_weight_gradient_honours_a_strided_out(kernel_device):
    """The gather weight gradient writes dvalues[k] at out + k * stride (a strided view of a NaN buffer): every
    other element written, the ones between left alone."""
    mask, fmt, values, x, b, dy = setup(13, 29, 6, 0.4, torch.float32, kernel_device, seed=93)
    buf = torch.full((2 * fmt.nnz + 1,), float("nan"), device=kernel_device)
    out = buf[1::2]
    res = sparse_linear_backward_weight(dy, x, fmt, out=out, variant="gather", config={"BLOCK_NNZ": 32, "BLOCK_B": 16})
    assert res.data_ptr() == out.data_ptr()
    assert torch.isnan(buf[0::2]).all(), "wrote between the strided elements"
    assert_matches(out, reference_backward_weight(dy.double(), x.double(), fmt), abs_refs(x, values, fmt, b, dy)[2],
                   torch.float32, "strided out")


# ---------------------------------------------------------------------------------------------------------------
# the slab grid
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,chunks", [(32, 2), (48, 6)])
def test_slab_grid_covers_every_batch_block_and_row_chunk(kernel_device, small_panels, batch, chunks):
    """A slab program's (batch block, row chunk) pair comes from its program id as (pid % n_bblk, pid // n_bblk):
    every pair exactly once also when the number of batch blocks and of chunks share a factor (2 and 2, 3 and 6),
    where a mapping such as (pid % n_bblk, pid % n_chunks) repeats some pairs and never runs others."""
    cfg = {**SLAB_CFG, "CHUNKS": chunks}
    run_all(14, 24, batch, 0.4, torch.float32, kernel_device, bias=True, activation="relu", seed=94,
            config_fwd=cfg, config_w=cfg)


# ---------------------------------------------------------------------------------------------------------------
# guard pages (always interpreted, in a subprocess)
# ---------------------------------------------------------------------------------------------------------------
def _guard_case(case: str) -> None:
    """Run in a subprocess (TRITON_INTERPRET=1, CPU tensors): one kernel with a tensor against a guard page; assert
    its result right."""
    from sparse_lth.kernels import format as F

    F.PANEL = 8
    g = torch.Generator().manual_seed(6)
    rows, cols, batch = 11, 21, 5
    mask = torch.rand(rows, cols, generator=g) < 0.6
    mask[-1, :] = True
    mask[:, -1] = True
    fmt = build_format(mask)
    values = torch.randn(fmt.nnz, generator=g)
    x = torch.randn(batch, cols, generator=g)
    dy = torch.randn(batch, rows, generator=g)
    tol = dict(rtol=1e-5, atol=1e-5)
    if case == "gather_order_past_n_rows":   # a 32-row block over 11 rows (21 columns): the order's masked lanes
        guarded = F._as_built(dataclasses.replace(fmt, row_order=at_page_end(fmt.row_order),
                                                  col_order=at_page_end(fmt.col_order)))
        y = sparse_linear_forward(x, values, guarded, variant="gather")
        torch.testing.assert_close(y, reference_forward(x, values, fmt), **tol)
        dx = sparse_linear_backward_input(dy, values, guarded, variant="gather")
        torch.testing.assert_close(dx, reference_backward_input(dy, values, fmt), **tol)
    elif case == "slab_partial_sums_past_the_batch":   # fp32 out holds the partial sums between the 3 panels
        out = batch_minor_at_page_end(torch.zeros(batch, rows))
        sparse_linear_forward(x, values, fmt, out=out, config=SLAB_CFG)
        torch.testing.assert_close(out, reference_forward(x, values, fmt), **tol)
        out = batch_minor_at_page_end(torch.zeros(batch, cols))
        sparse_linear_backward_input(dy, values, fmt, out=out, config=SLAB_CFG)
        torch.testing.assert_close(out, reference_backward_input(dy, values, fmt), **tol)
    elif case == "slab_half_precision_workspace":   # fp16 out: partial sums in an fp32 workspace at a page end
        from sparse_lth.kernels import sparse_linear as K

        K._alloc_batch_minor = (lambda n_b, n, dtype, device:
                                batch_minor_at_page_end(torch.zeros(n_b, n, dtype=dtype)))
        h = lambda t: t.half()  # noqa: E731
        out = torch.full((batch, rows + 3), float("nan"), dtype=torch.float16)[:, :rows]   # padded rows
        sparse_linear_forward(h(x), h(values), fmt, out=out, config=SLAB_CFG)
        ref = reference_forward(h(x).double(), h(values).double(), fmt)
        torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
        out = torch.full((batch, cols + 3), float("nan"), dtype=torch.float16)[:, :cols]
        sparse_linear_backward_input(h(dy), h(values), fmt, out=out, config=SLAB_CFG)
        ref = reference_backward_input(h(dy).double(), h(values).double(), fmt)
        torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
    else:
        raise ValueError(case)
    print("GUARD-OK")


@pytest.mark.parametrize("case", ["gather_order_past_n_rows", "slab_partial_sums_past_the_batch",
                                  "slab_half_precision_workspace"])
def test_loads_never_touch_memory_past_a_tensor(kernel_device, case):
    """The gather kernel's processing order (rows of the last block past n_out), the slab kernel's partial sums read
    back from an fp32 out (lanes past the batch), its fp32 workspace for an fp16 out with padded rows (addressed
    with the workspace's own strides, not out's): a load or store whose mask or strides miss the bound touches the
    guard page and the subprocess dies."""
    run_guard_case(kernel_device, "test_kernel_bodies_linear", case, "a load or store touched memory past the tensor")
