"""The torch backend's sparse conv2d (kernels/torch_conv.py: shifted CSR products) against dense references.

Every op is compared with ``torch.nn.functional.conv2d`` / ``torch.nn.grad`` on the masked dense weight, computed
in float64 from the same (rounded) inputs, over the geometries the lottery-ticket networks use and the edge cases
of the shift construction (strides with their phases, dilation, padding wider than the kernel's reach, rows and
columns that no output reads). Uninitialized outputs are poisoned with NaN first.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from sparse_lth.kernels import sparse_conv as sc
from sparse_lth.kernels import torch_conv as tc
from sparse_lth.kernels.format import build_format, to_values

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.bfloat16: dict(atol=6e-2, rtol=2e-2), torch.float16: dict(atol=1e-2, rtol=5e-3)}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    def nan_alloc(shape, dtype, device):
        return torch.full(shape if isinstance(shape, tuple) else (shape,), float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tc, "_alloc", nan_alloc)


def make_case(seed, n, c_in, c_out, h, w, k, density, dtype=torch.float32, empty_filter=False):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    weight = torch.randn(c_out, c_in, kh, kw, generator=g)
    mask = torch.rand(c_out, c_in, kh, kw, generator=g) < density
    if empty_filter:
        mask[c_out // 2] = False
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype)
    bias = torch.randn(c_out, generator=g).to(dtype)
    fmt = build_format(mask)
    values = to_values(weight, mask).to(dtype)
    return x, values, fmt, tc.build_conv_taps(fmt, (kh, kw)), bias


def ref64(fn, *args):
    return fn(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])


def check(got, want, dtype):
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) elements in the output"
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.double(), **TOL[dtype])


def all_three(x, v, fmt, taps, b, k, s, p, d, dtype):
    kk = (k, k) if isinstance(k, int) else k
    y = tc.conv2d_forward(x, v, taps, b, s, p, d)
    check(y, ref64(sc.reference_forward, x, v, fmt, kk, b, s, p, d), dtype)
    check(tc.conv2d_forward(x, v, taps, None, s, p, d), ref64(sc.reference_forward, x, v, fmt, kk, None, s, p, d),
          dtype)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dx = tc.conv2d_backward_input(dy, v, taps, x.shape, s, p, d)
    assert dx.shape == x.shape
    check(dx, ref64(sc.reference_backward_input, dy, v, fmt, x.shape, kk, s, p, d), dtype)
    dv = tc.conv2d_backward_weight(dy, x, taps, s, p, d)
    assert dv.shape == (fmt.nnz,)
    check(dv, ref64(sc.reference_backward_weight, dy, x, fmt, kk, s, p, d), dtype)


# the grid: densities 100/50/10/2/0 %, kernels 1/3/5, stride 1/2, padding 0/1/2, dilation 1/2, odd
# spatial sizes, batch 1, 1 and 3 input channels (a cross product of the geometry, densities cycled through it)
GEOMS = [(k, s, p, d) for k, s, p, d in itertools.product((1, 3, 5), (1, 2), (0, 1, 2), (1, 2))
         if 9 + 2 * p - d * (k - 1) - 1 >= 0]
DENSITIES = (1.0, 0.5, 0.1, 0.02, 0.0)


@pytest.mark.parametrize("k,s,p,d", GEOMS, ids=[f"k{k}-s{s}-p{p}-dil{d}" for k, s, p, d in GEOMS])
def test_every_geometry_float64(k, s, p, d):
    i = GEOMS.index((k, s, p, d))
    for j, (n, c_in) in enumerate(((1, 3), (2, 1))):
        density = DENSITIES[(i + j) % len(DENSITIES)]
        x, v, fmt, taps, b = make_case(i, n, c_in, 5, 9, 11, k, density, torch.float64, empty_filter=True)
        all_three(x, v, fmt, taps, b, k, s, p, d, torch.float64)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("geom", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (5, 1, 2, 2), ((3, 1), (2, 1), (1, 0),
                                                                                          (1, 2))],
                         ids=["k3-s1-p1", "k3-s2-p1", "k1-s2-shortcut", "k5-p2-dil2", "asymmetric"])
def test_densities_float32(geom, density):
    k, s, p, d = geom
    x, v, fmt, taps, b = make_case(7, 2, 3, 6, 7, 9, k, density, torch.float32)
    all_three(x, v, fmt, taps, b, k, s, p, d, torch.float32)


@pytest.mark.parametrize("geom", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1)], ids=["same", "strided", "1x1"])
def test_empty_batch(geom):
    """Batch 0: empty outputs and input gradient, a weight gradient of zeros (a view of the empty grid used to
    raise: 'cannot reshape tensor of 0 elements')."""
    k, s, p, d = geom
    x, v, fmt, taps, b = make_case(4, 0, 16, 8, 7, 9, k, 0.1)
    all_three(x, v, fmt, taps, b, k, s, p, d, torch.float32)
    assert torch.all(tc.conv2d_backward_weight(torch.zeros(0, 8, 7, 9)[:, :, ::s, ::s], x, taps, s, p, d) == 0)


def test_lottery_ticket_layer_shape():
    """A Conv-6-like 3x3 layer at 2 % (many taps, every filter partly live), fp32."""
    x, v, fmt, taps, b = make_case(9, 2, 16, 24, 8, 8, 3, 0.02)
    assert len(taps.taps) == 9
    all_three(x, v, fmt, taps, b, 3, 1, 1, 1, torch.float32)


def test_taps_regroup_the_format():
    """Each tap's CSR (and its transpose) holds exactly the live weights of that (ky, kx), in values' order."""
    _, v, fmt, taps, _ = make_case(3, 1, 4, 5, 3, 3, 3, 0.4, torch.float64)
    w = sc._dense_weight(v, fmt, 4, (3, 3))
    for i, (ky, kx) in enumerate(taps.taps):
        tv = v[taps.perm]
        torch.testing.assert_close(tc._tap_csr(tv, taps, i, False).to_dense(), w[:, :, ky, kx])
        torch.testing.assert_close(tc._tap_csr(v[taps.t_perm], taps, i, True).to_dense(), w[:, :, ky, kx].t())
    assert sorted(taps.perm.tolist()) == list(range(fmt.nnz)) and taps.bounds[-1] == fmt.nnz
    live = {(ky, kx) for ky in range(3) for kx in range(3) if w[:, :, ky, kx].any()}
    assert set(taps.taps) == live


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_float32(dtype):
    x, v, fmt, taps, b = make_case(5, 2, 3, 4, 9, 11, 3, 0.5, dtype)
    all_three(x, v, fmt, taps, b, 3, 2, 1, 1, dtype)
    dy = torch.randn(2, 4, 5, 6).to(dtype)
    dv32 = tc.conv2d_backward_weight(dy, x, taps, 2, 1, 1, out_dtype=torch.float32)
    check(dv32, ref64(sc.reference_backward_weight, dy, x, fmt, 3, 2, 1), torch.float32)


def test_non_contiguous_inputs():
    _, v, fmt, taps, b = make_case(11, 2, 3, 5, 7, 9, 3, 0.5, empty_filter=True)
    g = torch.Generator().manual_seed(12)
    x_cl = torch.randn(2, 7, 9, 3, generator=g).permute(0, 3, 1, 2)
    x_sl = torch.randn(2, 6, 7, 18, generator=g)[:, ::2, :, ::2]
    for x in (x_cl, x_sl):
        assert not x.is_contiguous()
        y = tc.conv2d_forward(x, v, taps, b, 1, 1)
        check(y, ref64(sc.reference_forward, x, v, fmt, 3, b, 1, 1), torch.float32)
        # laid out as nn.Conv2d's output: channels_last for a channels_last input (it was always NCHW)
        assert y.is_contiguous(memory_format=torch.channels_last if x is x_cl else torch.contiguous_format)
        assert y.is_contiguous(memory_format=torch.channels_last) == \
            torch.nn.functional.conv2d(x, torch.zeros(5, 3, 3, 3), None, 1, 1).is_contiguous(
                memory_format=torch.channels_last)
        dy = torch.randn(2, 9, 7, 5, generator=g).permute(0, 3, 2, 1)
        assert not dy.is_contiguous()
        check(tc.conv2d_backward_input(dy, v, taps, x.shape, 1, 1),
              ref64(sc.reference_backward_input, dy, v, fmt, x.shape, 3, 1, 1), torch.float32)
        check(tc.conv2d_backward_weight(dy, x, taps, 1, 1), ref64(sc.reference_backward_weight, dy, x, fmt, 3, 1, 1),
              torch.float32)


@pytest.mark.parametrize("k,s,h,w", [(3, 2, 8, 8), (2, 3, 10, 10)], ids=["inside-the-grid", "beyond-the-grid"])
def test_unread_input_rows_get_zero_gradient(k, s, h, w):
    """Input rows and columns that no output reads: the last ones of an even size at stride 2 (they lie inside
    the phase grid), and at stride 3 with a 2x2 kernel ones that lie beyond it (the gradient is filled in)."""
    x, v, fmt, taps, b = make_case(13, 1, 2, 3, h, w, k, 1.0)
    g = tc.ShiftGrid(x.shape, taps, s, 0, 1)
    assert (g.h_in, g.w_in) == ((h, w) if s == 2 else (h - 1, w - 1))
    y = tc.conv2d_forward(x, v, taps, b, s, 0)
    check(y, ref64(sc.reference_forward, x, v, fmt, k, b, s, 0), torch.float32)
    dy = torch.randn(y.shape)
    dx = tc.conv2d_backward_input(dy, v, taps, x.shape, s, 0)
    assert torch.equal(dx[..., -1, :], torch.zeros_like(dx[..., -1, :]))
    assert torch.equal(dx[..., -1], torch.zeros_like(dx[..., -1]))
    check(dx, ref64(sc.reference_backward_input, dy, v, fmt, x.shape, k, s, 0), torch.float32)
    check(tc.conv2d_backward_weight(dy, x, taps, s, 0), ref64(sc.reference_backward_weight, dy, x, fmt, k, s, 0),
          torch.float32)


def test_bad_input():
    x, v, fmt, taps, b = make_case(19, 2, 3, 4, 7, 9, 3, 0.5)
    dy = torch.randn(2, 4, 7, 9)
    fwd, bwi, bww = tc.conv2d_forward, tc.conv2d_backward_input, tc.conv2d_backward_weight
    with pytest.raises(ValueError, match="4-D"):
        fwd(x[0], v, taps, b, 1, 1)
    # a non-integer input shape (int() took 2.5 as 2; float sizes failed deep inside torch)
    with pytest.raises(TypeError, match="input_shape must be a sequence of 4 ints"):
        bwi(dy, v, taps, (2.0, 3, 7, 9), 1, 1)
    with pytest.raises(TypeError, match="input_shape must be a sequence of 4 ints"):
        sc.sparse_conv2d_backward_input(dy, v, fmt, (2.5, 3, 7, 9), 3, 1, 1)
    with pytest.raises(TypeError, match="float32"):
        fwd(x.long(), v, taps, b, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        fwd(x[:, :2], v, taps, b, 1, 1)
    with pytest.raises(ValueError, match="length fmt.nnz"):
        fwd(x, v[:-1], taps, b, 1, 1)
    with pytest.raises(TypeError, match="dtype"):
        fwd(x, v.double(), taps, b, 1, 1)
    with pytest.raises(TypeError, match="ConvTaps"):
        fwd(x, v, fmt, b, 1, 1)
    with pytest.raises(ValueError, match="bias"):
        fwd(x, v, taps, b[:-1], 1, 1)
    with pytest.raises(ValueError, match="stride"):
        fwd(x, v, taps, b, 0, 1)
    with pytest.raises(ValueError, match="padding"):
        fwd(x, v, taps, b, 1, -1)
    with pytest.raises(ValueError, match="empty output"):
        fwd(x[:, :, :2, :2], v, taps, b, 1, 0)
    with pytest.raises(ValueError, match="different devices"):
        fwd(x, v.to("meta"), taps, b, 1, 1)
    with pytest.raises(ValueError, match="multiple of kh\\*kw"):
        tc.build_conv_taps(fmt, 2)
    with pytest.raises(ValueError, match="dy has shape"):
        bwi(dy[:, :, :-1], v, taps, x.shape, 1, 1)
    with pytest.raises(ValueError, match="input_shape"):
        bwi(dy, v, taps, (2, 3, 7), 1, 1)
    with pytest.raises(ValueError, match="dy has shape"):
        bww(dy[:, :3], x, taps, 1, 1)
    with pytest.raises(ValueError, match="batch"):
        bww(dy[:1], x, taps, 1, 1)
    with pytest.raises(TypeError, match="must match"):
        bww(dy.double(), x, taps, 1, 1)
    with pytest.raises(TypeError, match="out_dtype"):
        bww(dy, x, taps, 1, 1, out_dtype=torch.int32)


def test_grid_shares_padding_where_it_can():
    """Stride 1 with padding within the kernel's reach: rows share padding columns, images padding rows (an image
    takes (H + p) x (W + p) grid pixels); padding wider than the reach, or a stride, gives every image its own."""
    _, _, _, taps3, _ = make_case(1, 1, 2, 2, 4, 4, 3, 1.0)
    _, _, _, taps1, _ = make_case(1, 1, 2, 2, 4, 4, 1, 1.0)
    g = tc.ShiftGrid((2, 2, 2, 3), taps3, 1, 1, 1)
    assert g.shared and (g.hq, g.wq, g.lead) == (3, 4, 5) and g.length == 2 * 3 * 4
    assert not tc.ShiftGrid((2, 2, 2, 3), taps1, 1, 1, 1).shared  # 1x1 with padding 1: wider than its reach
    assert not tc.ShiftGrid((2, 2, 6, 6), taps3, 2, 1, 1).shared
    g = tc.ShiftGrid((2, 2, 5, 5), taps3, 1, 2, 2)  # dilation 2 reaches 4: padding 2 shares too
    assert g.shared and (g.hq, g.wq) == (7, 7)
    for k, p, d, h, w in ((3, 1, 1, 2, 3), (1, 1, 1, 2, 3), (3, 0, 1, 4, 5), (3, 2, 2, 5, 5), (3, 1, 2, 5, 6)):
        x, v, fmt, taps, b = make_case(2, 3, 2, 2, h, w, k, 0.7, torch.float64)
        all_three(x, v, fmt, taps, b, k, 1, p, d, torch.float64)


def test_the_grid_shares_padding_up_to_the_reach_inclusive():
    """padding equal to the kernel's reach shares (3x3, padding 2; 1x1, padding 0)."""
    taps3 = tc.build_conv_taps(build_format(torch.ones(2, 18, dtype=torch.bool)), (3, 3))
    taps1 = tc.build_conv_taps(build_format(torch.ones(2, 2, dtype=torch.bool)), (1, 1))
    assert tc.ShiftGrid((2, 2, 4, 4), taps3, 1, 2, 1).shared
    assert tc.ShiftGrid((2, 2, 4, 4), taps1, 1, 0, 1).shared
