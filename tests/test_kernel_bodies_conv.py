"""The bodies of the sparse conv2d kernels (the Triton kernels of kernels/sparse_conv.py and the shifted CSR
products of kernels/torch_conv.py): behaviours the other conv tests left open, found by a mutation audit.

* Unequal strides with the larger one on the width (every other strided case had ``s_w <= s_h``), and unequal
  padding / kernel sizes at stride 1 (the torch backend's shared-padding grid), so that h and w cannot be swapped.
* Output buffers: every buffer the launchers allocate is NaN-poisoned and sits between two NaN guard regions; a
  store that misses its mask lands in a guard instead of corrupting the heap (which killed the process only by luck).
* A non-finite input pixel: the sparse ops skip pruned weights, so only the outputs a live weight reads see it
  (masked lanes must not multiply a zero weight by it).
* Operands at a PROT_NONE guard page (interpreter, in a subprocess): masked loads never read past ``x`` or ``dy``.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from sparse_lth.kernels import sparse_conv as sc
from sparse_lth.kernels import torch_conv as tc
from sparse_lth.kernels.format import build_format, to_values

from test_kernels_conv import check, make_case, ref64
from test_kernels_edges import at_page_end, run_guard_case
import test_torch_conv as ttc



@pytest.fixture(autouse=True)
def guards(monkeypatch):
    """Both backends allocate their outputs through ``_alloc``: hand out NaN buffers inside a larger NaN buffer, with
    a guard region as long as the buffer before and after it. Returns the list of guard regions."""
    regions = []

    def guarded_alloc(shape, dtype, device):
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (int(shape),)
        numel = 1
        for s in shape:
            numel *= s
        pad = numel + 64
        buf = torch.full((2 * pad + numel,), float("nan"), dtype=dtype, device=device)
        regions.append(buf[:pad])
        regions.append(buf[pad + numel:])
        return buf[pad:pad + numel].view(shape)

    monkeypatch.setattr(sc, "_alloc", guarded_alloc)
    monkeypatch.setattr(tc, "_alloc", guarded_alloc)
    return regions


def assert_guards_intact(regions):
    assert regions, "no buffer was allocated through _alloc"
    for r in regions:
        assert torch.isnan(r).all(), "a kernel wrote outside the buffer it was given"


def triton_all_three(x, v, fmt, b, k, s, p, d, splits=(None, 3)):
    """Forward (with bias), input gradient and weight gradient of the Triton ops against float64 references."""
    y = sc.sparse_conv2d_forward(x, v, fmt, k, b, s, p, d)
    check(y, ref64(sc.reference_forward, x, v, fmt, k, b, s, p, d), torch.float32)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(x.device)
    dx = sc.sparse_conv2d_backward_input(dy, v, fmt, x.shape, k, s, p, d)
    check(dx, ref64(sc.reference_backward_input, dy, v, fmt, x.shape, k, s, p, d), torch.float32)
    dv_ref = ref64(sc.reference_backward_weight, dy, x, fmt, k, s, p, d)
    for n in splits:
        check(sc.sparse_conv2d_backward_weight(dy, x, fmt, k, s, p, d, num_splits=n), dv_ref, torch.float32)


# (n, c_in, c_out, h, w, kernel, stride, padding, dilation, density): the width's stride above the height's
WIDE_STRIDES = [
    pytest.param(2, 3, 4, 7, 11, (2, 3), (1, 2), (0, 1), (2, 1), 0.6, id="k2x3-s1x2-p0x1-dil2x1"),
    pytest.param(1, 2, 5, 9, 13, (3, 3), (2, 3), (1, 2), (1, 1), 0.5, id="k3-s2x3-p1x2"),
]


@pytest.mark.parametrize("n,c_in,c_out,h,w,k,s,p,d,density", WIDE_STRIDES)
def test_triton_ops_with_the_larger_stride_on_the_width(kernel_device, guards, n, c_in, c_out, h, w, k, s, p, d,
                                                        density):
    """Stride (1, 2) and (2, 3): the input gradient divides the width offset by the width's stride and keeps only
    the taps it divides exactly, whatever the height's stride is (1 included)."""
    x, v, fmt, b, _ = make_case(31, n, c_in, c_out, h, w, k, density, device=kernel_device)
    triton_all_three(x, v, fmt, b, k, s, p, d)
    assert_guards_intact(guards)


def test_triton_ops_write_only_inside_their_outputs(kernel_device, guards):
    """Pixel counts that are no multiple of the pixel block (2*8*11 = 176 output and input pixels), the reduction
    split two and three ways: every lane past the end is masked at the store (the guard regions stay NaN)."""
    x, v, fmt, b, _ = make_case(33, 2, 3, 5, 8, 11, 3, 0.5, empty_filter=True, device=kernel_device)
    triton_all_three(x, v, fmt, b, (3, 3), 1, (1, 2), (1, 2), splits=(None, 2, 3))
    assert_guards_intact(guards)


def _inf_case(kernel_device):
    """A 3x3 layer with tap (0, 0) pruned everywhere: the (output channel 0, input channel 0, tap (0, 0)) that a
    lane past a filter's (or an input channel's) last live weight decodes to is a pruned weight."""
    g = torch.Generator().manual_seed(35)
    c_out, c_in = 5, 2
    weight = torch.randn(c_out, c_in, 3, 3, generator=g)
    mask = torch.rand(c_out, c_in, 3, 3, generator=g) < 0.5
    mask[:, :, 0, 0] = False
    mask[:, :, 2, 1] = True
    fmt = build_format(mask.to(kernel_device))
    # every filter and every input channel leaves lanes past its last live weight in a block of 16
    assert (mask.sum((1, 2, 3)) % 16 != 0).all() and (mask.sum((0, 2, 3)) % 16 != 0).all()
    return mask, fmt, to_values(weight, mask).to(kernel_device)


def test_an_infinite_input_pixel_reaches_only_the_outputs_a_live_weight_reads(kernel_device):
    """x holds +inf at one pixel of channel 0. Outputs that no live weight reads it for are finite and equal the
    conv of x with that pixel zeroed (a pruned weight is skipped, never multiplied: 0 * inf would be NaN)."""
    mask, fmt, v = _inf_case(kernel_device)
    s, p, d = (1, 2), (1, 1), (1, 1)
    x = torch.randn(2, 2, 7, 9, generator=torch.Generator().manual_seed(36))
    x0 = x.clone()
    x[1, 0, 3, 5] = float("inf")  # tap (0, 0) reads it for output (4, 3)
    y = sc.sparse_conv2d_forward(x.to(kernel_device), v, fmt, 3, None, s, p, d).cpu()
    hit = torch.zeros_like(x)
    hit[1, 0, 3, 5] = 1
    reached = F.conv2d(hit, mask.float(), None, s, p, d) > 0
    assert reached.any() and (~reached).any()
    want = F.conv2d(x0.double(), sc._dense_weight(v.cpu().double(), fmt.to("cpu"), 2, (3, 3)), None, s, p, d)
    assert torch.isinf(y[reached]).all()
    torch.testing.assert_close(y[~reached].double(), want[~reached], atol=1e-4, rtol=1e-4)


def test_an_infinite_output_gradient_reaches_only_the_inputs_a_live_weight_sends_it_to(kernel_device):
    """dy holds +inf at one pixel of output channel 0: the input gradient is finite wherever no live weight sends
    that pixel, and equals the transposed conv of dy with the pixel zeroed there."""
    mask, fmt, v = _inf_case(kernel_device)
    s, p, d = (2, 1), (1, 0), (1, 2)
    shape = (2, 2, 9, 10)
    oh, ow = sc._out_size(9, 10, (3, 3), s, p, d, "test")
    dy = torch.randn(2, 5, oh, ow, generator=torch.Generator().manual_seed(37))
    dy0 = dy.clone()
    dy[0, 0, 2, 2] = float("inf")  # tap (0, 0) sends it to input pixel (3, 2)
    dx = sc.sparse_conv2d_backward_input(dy.to(kernel_device), v, fmt, shape, 3, s, p, d).cpu()
    hit = torch.zeros_like(dy)
    hit[0, 0, 2, 2] = 1
    reached = torch.nn.grad.conv2d_input(shape, mask.float(), hit, s, p, d) > 0
    assert reached.any() and (~reached).any()
    want = sc.reference_backward_input(dy0.double(), v.cpu().double(), fmt.to("cpu"), shape, 3, s, p, d)
    assert torch.isinf(dx[reached]).all()
    torch.testing.assert_close(dx[~reached].double(), want[~reached], atol=1e-4, rtol=1e-4)


def _guard_case(case: str) -> None:
    """Run in a subprocess (TRITON_INTERPRET=1, CPU): x and dy each end at a PROT_NONE page; a masked load that
    lets a lane past the last pixel through reads that page and the process dies with SIGSEGV."""
    g = torch.Generator().manual_seed(39)
    mask = torch.ones(4, 3, 3, 3, dtype=torch.bool)  # every tap of input channel 0 is read
    fmt = build_format(mask)
    v = torch.randn(fmt.nnz, generator=g)
    # 2 x 7 x 9 = 126 output pixels: the second block of 64 has two lanes past the end (image n = 2, just past x)
    x = at_page_end(torch.randn(2, 3, 7, 9, generator=g))
    y = sc.sparse_conv2d_forward(x, v, fmt, 3, None, 1, 1)
    torch.testing.assert_close(y, sc.reference_forward(x, v, fmt, 3, None, 1, 1), atol=1e-4, rtol=1e-4)
    dy = at_page_end(torch.randn(y.shape, generator=g))
    torch.testing.assert_close(sc.sparse_conv2d_backward_input(dy, v, fmt, x.shape, 3, 1, 1),
                               sc.reference_backward_input(dy, v, fmt, x.shape, 3, 1, 1), atol=1e-4, rtol=1e-4)
    for splits in (1, 2):
        torch.testing.assert_close(sc.sparse_conv2d_backward_weight(dy, x, fmt, 3, 1, 1, num_splits=splits),
                                   sc.reference_backward_weight(dy, x, fmt, 3, 1, 1), atol=1e-4, rtol=1e-4)
    print("GUARD-OK")


def test_conv_kernels_never_read_past_x_or_dy(kernel_device):
    """Lanes past the last output pixel are masked in every load of x and dy (forward, input gradient, weight
    gradient with one and two splits); checked on the interpreter, whose masked loads touch only unmasked lanes."""
    run_guard_case(kernel_device, "test_kernel_bodies_conv", "conv", "a load read past x or dy")


# ---------------------------------------------------------------------------------------------------------------
# the torch backend (kernels/torch_conv.py)
# ---------------------------------------------------------------------------------------------------------------
# (kernel, stride, padding, dilation, shared grid): unequal pairs everywhere, so h and w cannot be swapped
TORCH_GEOMS = [
    pytest.param((3, 3), (1, 1), (1, 0), (1, 1), True, id="k3-p1x0-shared"),
    pytest.param((3, 3), (1, 1), (0, 2), (1, 2), True, id="k3-p0x2-dil1x2-shared"),
    pytest.param((2, 3), (1, 1), (1, 2), (1, 1), True, id="k2x3-p1x2-shared"),
    pytest.param((3, 1), (1, 1), (1, 1), (1, 1), False, id="k3x1-p1-wider-than-w-reach"),
    pytest.param((1, 3), (1, 1), (1, 1), (1, 1), False, id="k1x3-p1-wider-than-h-reach"),
    pytest.param((2, 3), (1, 2), (0, 1), (2, 1), False, id="k2x3-s1x2-dil2x1"),
    pytest.param((3, 3), (2, 3), (1, 2), (1, 1), False, id="k3-s2x3-p1x2"),
    pytest.param((3, 3), (3, 2), (2, 0), (1, 2), False, id="k3-s3x2-p2x0-dil1x2"),  # the last column is read
]


@pytest.mark.parametrize("k,s,p,d,shared", TORCH_GEOMS)
def test_torch_ops_with_unequal_height_and_width_geometry(guards, k, s, p, d, shared):
    """Each of kernel size, stride, padding and dilation differing between height and width, at stride 1 (the
    grid sharing padding rows/columns where the padding is within the reach on both axes) and strided (phases):
    forward, input gradient and weight gradient in float64 against F.conv2d / torch.nn.grad."""
    for j, (n, c_in, h, w) in enumerate(((2, 3, 8, 11), (1, 2, 11, 7))):
        x, v, fmt, taps, b = ttc.make_case(40 + j, n, c_in, 4, h, w, k, 0.6, torch.float64, empty_filter=True)
        assert tc.ShiftGrid(x.shape, taps, s, p, d).shared == shared
        ttc.all_three(x, v, fmt, taps, b, k, s, p, d, torch.float64)
    assert_guards_intact(guards)


@pytest.mark.parametrize("h,w", [(11, 10), (10, 11)], ids=["last-columns-unread", "last-rows-unread"])
def test_torch_input_gradient_zero_on_an_axis_whose_last_pixels_no_output_reads(h, w):
    """A 2x2 kernel at stride 3: along one axis every input pixel is read, along the other the last one is not
    (it lies beyond the phase grid); its gradient is zero (not left as the uninitialized, here NaN-poisoned, buffer),
    the rest matches the reference."""
    x, v, fmt, taps, b = ttc.make_case(44, 2, 2, 3, h, w, 2, 1.0)
    g = tc.ShiftGrid(x.shape, taps, 3, 0, 1)
    assert (g.h_in, g.w_in) == ((h, w - 1) if w == 10 else (h - 1, w))
    dy = torch.randn(2, 3, g.oh, g.ow, generator=torch.Generator().manual_seed(45))
    dx = tc.conv2d_backward_input(dy, v, taps, x.shape, 3, 0)
    ttc.check(dx, ref64(sc.reference_backward_input, dy, v, fmt, x.shape, 2, 3, 0), torch.float32)
    unread = dx[..., -1] if w == 10 else dx[..., -1, :]
    assert torch.equal(unread, torch.zeros_like(unread))


def test_torch_forward_output_layout_follows_f_conv2d_for_ambiguous_input_strides(guards):
    """Strides that c10's channels_last rule settles as NCHW: an (N, 1, 1, 1) input (contiguous, or a slice of
    the width whose strides are all equal) and a channel dimension expanded with stride 0. The output has
    F.conv2d's strides (contiguous NCHW) and its values."""
    g = torch.Generator().manual_seed(47)
    cases = [(torch.randn(3, 1, 1, 1, generator=g), 1, 0),
             (torch.randn(3, 1, 1, 5, generator=g)[..., 2:3], 1, 0),
             (torch.randn(2, 1, 5, 7, generator=g).expand(2, 3, 5, 7), 3, 1),
             (torch.randn(2, 5, 7, 1, generator=g).permute(0, 3, 1, 2).expand(2, 3, 5, 7), 3, 1)]
    for x, k, p in cases:
        w = torch.randn(4, x.shape[1], k, k, generator=g)
        mask = torch.ones(w.shape, dtype=torch.bool)
        fmt = build_format(mask)
        y = tc.conv2d_forward(x, to_values(w, mask), tc.build_conv_taps(fmt, (k, k)), None, 1, p)
        want = F.conv2d(x, w, None, 1, p)
        assert y.stride() == want.stride(), (tuple(x.shape), x.stride(), y.stride(), want.stride())
        torch.testing.assert_close(y, want)
    assert_guards_intact(guards)
