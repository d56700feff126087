"""The kernels' host-side Python: SparseFormat's checks and .to(), build_format of a 1-D mask, the conv geometry's
bounds and unequal dilations, the conv weight gradient's splits, the linear variant choice's errors, out= overlap
rules and autograd's view of out= writes, out_dtype, launch checks. Written after a mutation campaign on kernels/
(session 34: 85 mutants, 20 real survivors): each test failed under a mutant the other kernel tests let through.
Small shapes (the interpreter is slow); expectations come from torch ops on the dense masked weight."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sparse_lth.kernels.format import build_format, to_values


def _fmt(rows=5, cols=7, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[0, 0] = True
    return mask, build_format(mask)


# ---------------------------------------------------------------------------------------------------------------
# SparseFormat.validate / .to / build_format
# ---------------------------------------------------------------------------------------------------------------
def test_a_hand_made_format_moved_with_to_still_has_its_contents_checked():
    """.to() keeps a format "built" only if it was: a hand-made format with a wrong t_perm stays unchecked after
    .to() and its first validate() must still read its contents (mutant: .to() always marks the copy as built)."""
    _, fmt = _fmt()
    t_perm = fmt.t_perm.clone()
    t_perm[[0, 1]] = t_perm[[1, 0]]
    bad = dataclasses.replace(fmt, t_perm=t_perm)
    with pytest.raises(ValueError, match="t_perm"):
        bad.to("cpu").validate()


def test_bool_sizes_are_refused():
    """rows / cols / nnz must be ints, not bools (True == 1 would pass every shape check of a 1-row format)."""
    _, fmt = _fmt(rows=1, cols=6)
    with pytest.raises(ValueError, match="rows must be an int"):
        dataclasses.replace(fmt, rows=True).validate()


def test_a_non_contiguous_index_tensor_is_refused():
    """The kernels read every index tensor as contiguous: a strided view holding the right values is refused (its
    contents compare equal, so only the contiguity check stands between it and the kernels)."""
    _, fmt = _fmt()
    strided = fmt.col_idx.repeat_interleave(2)[::2]
    assert torch.equal(strided, fmt.col_idx) and not strided.is_contiguous()
    with pytest.raises(ValueError, match="col_idx"):
        dataclasses.replace(fmt, col_idx=strided).validate()


def test_an_index_tensor_on_another_device_is_refused():
    """The launchers check the devices of fmt.row_ptr only; every other index tensor must be on the same device."""
    _, fmt = _fmt()
    with pytest.raises(ValueError, match="row_order is on meta"):
        dataclasses.replace(fmt, row_order=fmt.row_order.to("meta")).validate()


def test_a_1d_mask_is_a_column_of_weights():
    """A 1-D mask of n is an (n, 1) weight: cols = 1 (mutant: 0, and the reshape fails)."""
    mask = torch.tensor([True, False, True, True, False])
    fmt = build_format(mask)
    assert (fmt.rows, fmt.cols, fmt.nnz) == (5, 1, 3)
    assert torch.equal(fmt.mask(), mask.view(5, 1))
    fmt.validate()


# ---------------------------------------------------------------------------------------------------------------
# conv geometry
# ---------------------------------------------------------------------------------------------------------------
def _conv_case(kernel_device, n=2, c_in=3, c_out=4, h=7, w=9, k=3, density=0.5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, k, k, generator=g)
    mask = torch.rand(c_out, c_in, k, k, generator=g) < density
    mask[0, 0, 0, 0] = True
    x = torch.randn(n, c_in, h, w, generator=g)
    bias = torch.randn(c_out, generator=g)
    fmt = build_format(mask.to(kernel_device))
    values = to_values(weight, mask)
    dense = (weight * mask).double()
    return (x.to(dtype).to(kernel_device), values.to(dtype).to(kernel_device), fmt, bias.to(dtype).to(kernel_device),
            dense, mask)


def test_conv_dilation_zero_is_refused(kernel_device):
    """dilation must be >= 1 (F.conv2d refuses 0 too): a dilation of 0 would put every tap on one pixel."""
    from sparse_lth.kernels import sparse_conv as sc

    x, v, fmt, b, _, _ = _conv_case(kernel_device)
    with pytest.raises(ValueError, match="dilation"):
        sc.sparse_conv2d_forward(x, v, fmt, 3, b, 1, 1, (1, 0))


def test_conv_an_input_too_narrow_for_the_kernel_is_refused(kernel_device):
    """An input whose width (not height) gives an empty output is refused, as F.conv2d refuses it."""
    from sparse_lth.kernels import sparse_conv as sc

    x, v, fmt, b, _, _ = _conv_case(kernel_device, h=7, w=2)
    with pytest.raises(RuntimeError):
        F.conv2d(x.cpu(), torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match="empty output"):
        sc.sparse_conv2d_forward(x, v, fmt, 3, b, 1, 0)


def test_conv_unequal_dilations_match_f_conv2d(kernel_device):
    """Dilation (1, 2) with a 3x3 kernel: the output width depends on the width's dilation."""
    from sparse_lth.kernels import sparse_conv as sc

    x, v, fmt, b, dense, _ = _conv_case(kernel_device, seed=3)
    y = sc.sparse_conv2d_forward(x, v, fmt, 3, b, 1, (1, 0), (1, 2))
    ref = F.conv2d(x.cpu().double(), dense, b.cpu().double(), 1, (1, 0), (1, 2))
    assert y.shape == ref.shape
    torch.testing.assert_close(y.cpu().double(), ref, atol=1e-4, rtol=1e-4)


def test_conv_weight_gradient_drops_empty_splits(kernel_device, monkeypatch):
    """num_splits beyond the pixel blocks: the launcher drops the splits that would be empty (fewer programs and
    partial-sum rows; on a GPU a grid axis past 65535 fails to launch), and the gradient is still right."""
    from sparse_lth.kernels import sparse_conv as sc

    shapes = []
    real = sc._alloc

    def spy(shape, dtype, device):
        shapes.append(tuple(shape))
        return real(shape, dtype, device)

    monkeypatch.setattr(sc, "_alloc", spy)
    x, v, fmt, b, dense, mask = _conv_case(kernel_device, n=1, h=7, w=9, seed=4)   # 63 output pixels: 1 block
    dy = torch.randn(1, 4, 7, 9, generator=torch.Generator().manual_seed(5)).to(kernel_device)
    dv = sc.sparse_conv2d_backward_weight(dy, x, fmt, 3, 1, 1, num_splits=64)
    assert shapes == [(fmt.nnz,)]  # one split: the partial sums are the result itself
    gw = torch.nn.grad.conv2d_weight(x.cpu().double(), dense.shape, dy.cpu().double(), 1, 1)
    torch.testing.assert_close(dv.cpu().double(), gw[mask], atol=1e-4, rtol=1e-4)


def test_conv_weight_gradient_uses_at_most_the_splits_asked_for(kernel_device, monkeypatch):
    """num_splits=2 over 126 output pixels (two blocks of 64): two splits of whole pixel blocks, not more."""
    from sparse_lth.kernels import sparse_conv as sc

    shapes = []
    real = sc._alloc
    monkeypatch.setattr(sc, "_alloc", lambda shape, dtype, device: shapes.append(tuple(shape)) or
                        real(shape, dtype, device))
    x, v, fmt, b, dense, mask = _conv_case(kernel_device, n=2, h=7, w=9, seed=6)
    dy = torch.randn(2, 4, 7, 9, generator=torch.Generator().manual_seed(7)).to(kernel_device)
    dv = sc.sparse_conv2d_backward_weight(dy, x, fmt, 3, 1, 1, num_splits=2)
    assert shapes == [(2, fmt.nnz)]
    gw = torch.nn.grad.conv2d_weight(x.cpu().double(), dense.shape, dy.cpu().double(), 1, 1)
    torch.testing.assert_close(dv.cpu().double(), gw[mask], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# sparse linear: variant choice
# ---------------------------------------------------------------------------------------------------------------
def _linear_case(kernel_device, rows=11, cols=20, batch=3, density=0.4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[0, 0] = True
    w = torch.randn(rows, cols, generator=g)
    fmt = build_format(mask.to(kernel_device))
    values = to_values(w, mask).to(dtype).to(kernel_device)
    x = torch.randn(batch, cols, generator=g).to(dtype).to(kernel_device)
    b = torch.randn(rows, generator=g).to(dtype).to(kernel_device)
    dy = torch.randn(batch, rows, generator=g).to(dtype).to(kernel_device)
    dense = (w * mask).to(dtype).double()
    return fmt, values, x, b, dy, dense, mask


def test_auto_variant_does_not_hide_a_failing_gather_kernel(kernel_device, monkeypatch):
    """When "auto" times the candidates, an error of the gather kernel (the one every op falls back on) is raised,
    not passed over in favour of a slab configuration."""
    from sparse_lth.kernels import sparse_linear as K

    calls = []

    def fake_ms(run):
        calls.append(run)
        if len(calls) == 1:
            raise RuntimeError("the gather kernel broke")
        run()
        return 1.0

    monkeypatch.setattr(K, "_times_variants", lambda: True)
    monkeypatch.setattr(K, "SLAB_MIN_GATHERS", 0)
    monkeypatch.setattr(K, "_bench_ms", fake_ms)
    monkeypatch.setattr(K, "_SPMM_SLAB_CONFIGS", {4: [(1, 4, 4, 16, 4, 1)]})
    monkeypatch.setattr(K, "_choices", {})
    fmt, values, x, b, dy, dense, mask = _linear_case(kernel_device)
    with pytest.raises(RuntimeError, match="gather kernel broke"):
        K.sparse_linear_forward(x, values, fmt, b)
    assert K.variant_choices() == {}


# ---------------------------------------------------------------------------------------------------------------
# sparse linear: out=
# ---------------------------------------------------------------------------------------------------------------
def _ref_linear(x, dense, b):
    return F.linear(x.cpu().double(), dense, None if b is None else b.cpu().double())


def test_linear_out_sharing_a_single_element_with_the_input_is_refused(kernel_device):
    """out's last element is x's first: they overlap (one element) and the kernel would read what it wrote."""
    fmt, values, _, b, _, dense, _ = _linear_case(kernel_device, rows=7, cols=7, batch=3, seed=1)
    buf = torch.randn(41, device=kernel_device)
    x = buf[20:41].view(3, 7)
    out = buf[0:21].view(3, 7)
    from sparse_lth.kernels.sparse_linear import sparse_linear_forward

    with pytest.raises(ValueError, match="shares memory"):
        sparse_linear_forward(x, values, fmt, b, out=out)


def test_linear_out_adjacent_to_the_input_is_accepted(kernel_device):
    """Two views of one buffer that touch but do not overlap: fine, and the result is F.linear's."""
    from sparse_lth.kernels.sparse_linear import sparse_linear_forward

    fmt, values, _, b, _, dense, _ = _linear_case(kernel_device, rows=7, cols=7, batch=3, seed=2)
    buf = torch.randn(42, device=kernel_device)
    x, out = buf[0:21].view(3, 7), buf[21:42].view(3, 7)
    ref = _ref_linear(x, dense, b)
    y = sparse_linear_forward(x, values, fmt, b, out=out)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y.cpu().double(), ref, atol=1e-5, rtol=1e-5)


def test_linear_out_that_requires_grad_is_fine_under_no_grad(kernel_device):
    """As torch's out= ops: a leaf that requires grad is refused only while grad is enabled."""
    from sparse_lth.kernels.sparse_linear import sparse_linear_forward

    fmt, values, x, b, _, dense, _ = _linear_case(kernel_device, seed=3)
    out = torch.zeros(3, 11, device=kernel_device, requires_grad=True)
    with torch.no_grad():
        y = sparse_linear_forward(x, values, fmt, b, out=out)
    torch.testing.assert_close(y.detach().cpu().double(), _ref_linear(x, dense, b), atol=1e-5, rtol=1e-5)


def test_linear_backward_input_and_weight_out_written_are_seen_by_autograd(kernel_device):
    """out= of the two gradients is written behind autograd's back too: a graph that saved the buffer must fail
    its backward (as after torch's in-place ops), not go on with the new values."""
    from sparse_lth.kernels.sparse_linear import sparse_linear_backward_input, sparse_linear_backward_weight

    fmt, values, x, b, dy, dense, mask = _linear_case(kernel_device, seed=4)
    a = torch.randn(3, 20, device=kernel_device, requires_grad=True)
    o = torch.zeros(3, 20, device=kernel_device)
    loss = (a * o).sum()
    dx = sparse_linear_backward_input(dy, values, fmt, out=o)
    torch.testing.assert_close(dx.cpu().double(), dy.cpu().double() @ dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    a = torch.randn(fmt.nnz, device=kernel_device, requires_grad=True)
    o = torch.zeros(fmt.nnz, device=kernel_device)
    loss = (a * o).sum()
    dv = sparse_linear_backward_weight(dy, x, fmt, out=o)
    gw = dy.cpu().double().t() @ x.cpu().double()
    torch.testing.assert_close(dv.cpu().double(), gw[mask], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_linear_trusted_weight_gradient_honours_out_dtype(kernel_device):
    """backward_weight_trusted(..., out_dtype=float32) on bf16 operands returns the fp32 gradient."""
    from sparse_lth.kernels import sparse_linear as K

    fmt, values, x, b, dy, dense, mask = _linear_case(kernel_device, seed=5, dtype=torch.bfloat16)
    dv = K.backward_weight_trusted(dy, x, fmt, out_dtype=torch.float32)
    assert dv.dtype == torch.float32 and dv.shape == (fmt.nnz,)
    gw = dy.cpu().double().t() @ x.cpu().double()
    torch.testing.assert_close(dv.cpu().double(), gw[mask], atol=1e-5, rtol=1e-5)


def test_linear_out_sharing_memory_with_bias_or_values_is_refused(kernel_device):
    """The kernels read bias (forward) and values (both spmm ops) while they write out: an out over either is
    refused, not only an out over the dense operand."""
    from sparse_lth.kernels.sparse_linear import sparse_linear_backward_input, sparse_linear_forward

    fmt, values, x, b, dy, dense, mask = _linear_case(kernel_device, seed=6)
    buf = torch.randn(3 * 11, device=kernel_device)
    bias = buf[:11]
    with pytest.raises(ValueError, match="shares memory"):
        sparse_linear_forward(x, values, fmt, bias, out=buf.view(3, 11))
    buf = torch.zeros(max(3 * 20, fmt.nnz), device=kernel_device)
    vals = buf[:fmt.nnz]
    vals.copy_(values)
    with pytest.raises(ValueError, match="shares memory"):
        sparse_linear_backward_input(dy, vals, fmt, out=buf[:60].view(3, 20))


def test_linear_backward_input_refuses_a_device_triton_cannot_run_on(kernel_device, monkeypatch):
    """With the interpreter off, CPU tensors are refused with a clear error by every op."""
    from sparse_lth.kernels import _triton
    from sparse_lth.kernels import sparse_linear as K

    fmt, values, x, b, dy, dense, mask = _linear_case("cpu", seed=7)
    monkeypatch.setattr(_triton, "INTERPRET", False)
    monkeypatch.setattr(_triton, "_LAUNCHABLE", set())
    for call in (lambda: K.sparse_linear_forward(x, values, fmt, b),
                 lambda: K.sparse_linear_backward_input(dy, values, fmt),
                 lambda: K.sparse_linear_backward_weight(dy, x, fmt)):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            call()
