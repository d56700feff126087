"""Direct sparse conv2d kernels (kernels/sparse_conv.py) against their dense references.

Run on ``kernel_device``: the GPU if there is one, else the CPU through Triton's interpreter (tiny shapes).
References are computed in float64 on the CPU from the very same (rounded) inputs, so that the comparison does
not depend on cuDNN's TF32 setting. Every output buffer the launchers allocate is poisoned with NaN first.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_lth.kernels import _triton
from sparse_lth.kernels import sparse_conv as sc
from sparse_lth.kernels.format import SparseFormat, build_format, to_values

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=1e-2, rtol=5e-3),
       torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Launchers allocate through ``sc._alloc``: fill what it returns with NaN so unwritten elements show."""
    def nan_alloc(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(sc, "_alloc", nan_alloc)


def make_case(seed, n, c_in, c_out, h, w, k, density, *, empty_filter=False, empty_channel=False,
              dtype=torch.float32, device="cpu"):
    """Random x, weight, mask (at least one live weight unless density is 0), bias."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    weight = torch.randn(c_out, c_in, kh, kw, generator=g)
    if density >= 1:
        mask = torch.ones(c_out, c_in, kh, kw, dtype=torch.bool)
    elif density <= 0:
        mask = torch.zeros(c_out, c_in, kh, kw, dtype=torch.bool)
    else:
        mask = torch.rand(c_out, c_in, kh, kw, generator=g) < density
        if empty_filter:
            mask[c_out // 2] = False
        if empty_channel:
            mask[:, 0] = False
        if not mask.any():  # a tiny layer at 2% may draw nothing: keep one live weight (not in the empty parts)
            mask[-1, -1, 0, 0] = True
    x = torch.randn(n, c_in, h, w, generator=g)
    bias = torch.randn(c_out, generator=g)
    fmt = build_format(mask.to(device))
    values = to_values(weight, mask)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(values), fmt, cast(bias), mask


def ref64(fn, *args, **kw):
    """Run a reference in float64 on the CPU."""
    conv = [a.detach().cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
            (a.to("cpu") if isinstance(a, SparseFormat) else a) for a in args]
    kw = {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return fn(*conv, **kw)


def check(got, want, dtype):
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or NaN elements in the kernel's output"
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().double(), want.double(), **TOL[dtype])


# (n, c_in, c_out, h, w, kernel, stride, padding, dilation, density, extras): a covering set, not a cross product.
CASES = [
    pytest.param(1, 3, 4, 7, 9, 3, 1, 1, 1, 1.0, {}, id="dense-k3-s1-p1-batch1"),
    pytest.param(2, 3, 5, 7, 9, 3, 2, 1, 1, 0.5, dict(empty_filter=True), id="d50-k3-s2-p1-emptyfilter"),
    pytest.param(2, 1, 4, 9, 7, 5, 1, 2, 1, 0.1, {}, id="d10-k5-s1-p2-cin1"),
    pytest.param(1, 3, 6, 8, 9, 5, 2, 2, 2, 0.5, dict(empty_channel=True), id="d50-k5-s2-p2-dil2-emptychan"),
    pytest.param(2, 3, 4, 7, 9, 1, 1, 0, 1, 0.5, {}, id="d50-k1-s1-p0"),
    pytest.param(2, 3, 4, 7, 9, 1, 2, 0, 1, 0.1, {}, id="d10-k1-s2-p0-shortcut"),
    pytest.param(2, 3, 8, 11, 13, 3, 1, 0, 2, 0.02, {}, id="d2-k3-s1-p0-dil2"),
    pytest.param(1, 3, 1, 7, 9, 3, 1, 2, 1, 0.5, {}, id="d50-k3-p2-cout1"),
    pytest.param(2, 8, 6, 9, 11, 3, 1, 1, 1, 0.5, dict(empty_filter=True), id="d50-k3-many-blocks"),
    pytest.param(2, 3, 4, 7, 9, (3, 1), (2, 1), (1, 0), (1, 2), 0.5, {}, id="d50-asymmetric-pairs"),
]


@pytest.mark.parametrize("n,c_in,c_out,h,w,k,s,p,d,density,extra", CASES)
def test_all_three_fp32(kernel_device, n, c_in, c_out, h, w, k, s, p, d, density, extra):
    x, v, fmt, b, mask = make_case(hash((n, c_in, c_out, h, w)) % 1000, n, c_in, c_out, h, w, k, density,
                                   device=kernel_device, **extra)
    if extra.get("empty_filter"):
        assert fmt.row_ptr[c_out // 2] == fmt.row_ptr[c_out // 2 + 1]
    kk = (k, k) if isinstance(k, int) else k
    # forward, with and without bias
    y = sc.sparse_conv2d_forward(x, v, fmt, kk, b, s, p, d)
    y_ref = ref64(sc.reference_forward, x, v, fmt, kk, b, s, p, d)
    check(y, y_ref, torch.float32)
    y0 = sc.sparse_conv2d_forward(x, v, fmt, kk, None, s, p, d)
    check(y0, ref64(sc.reference_forward, x, v, fmt, kk, None, s, p, d), torch.float32)
    # input gradient
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(kernel_device)
    dx = sc.sparse_conv2d_backward_input(dy, v, fmt, x.shape, kk, s, p, d)
    assert dx.shape == x.shape
    check(dx, ref64(sc.reference_backward_input, dy, v, fmt, x.shape, kk, s, p, d), torch.float32)
    # weight gradient, default split and a forced 3-way split of the reduction
    dv_ref = ref64(sc.reference_backward_weight, dy, x, fmt, kk, s, p, d)
    for splits in (None, 3):
        dv = sc.sparse_conv2d_backward_weight(dy, x, fmt, kk, s, p, d, num_splits=splits)
        assert dv.shape == (fmt.nnz,)
        check(dv, dv_ref, torch.float32)


def test_reference_matches_autograd_of_masked_conv():
    """The references themselves: gradients of F.conv2d with a masked dense weight, via autograd."""
    x, v, fmt, b, mask = make_case(3, 2, 3, 4, 7, 9, 3, 0.5)
    weight = torch.zeros(mask.shape)
    weight[mask] = v
    x = x.double().requires_grad_()
    weight = weight.double().requires_grad_()
    y = torch.nn.functional.conv2d(x, weight * mask, b.double(), 2, 1, 1)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(sc.reference_forward(x.detach(), v.double(), fmt, 3, b.double(), 2, 1), y.detach())
    torch.testing.assert_close(sc.reference_backward_input(dy, v.double(), fmt, x.shape, 3, 2, 1), x.grad)
    torch.testing.assert_close(sc.reference_backward_weight(dy, x.detach(), fmt, 3, 2, 1),
                               weight.grad.reshape(4, -1)[mask.reshape(4, -1)])


def test_density_zero(kernel_device):
    x, v, fmt, b, _ = make_case(5, 2, 3, 4, 7, 9, 3, 0.0, device=kernel_device)
    assert fmt.nnz == 0 and v.numel() == 0
    y = sc.sparse_conv2d_forward(x, v, fmt, 3, b, 1, 1)
    check(y, b.cpu().double().view(1, -1, 1, 1).expand(2, 4, 7, 9), torch.float32)
    y0 = sc.sparse_conv2d_forward(x, v, fmt, 3, None, 2, 1)
    check(y0, torch.zeros(2, 4, 4, 5, dtype=torch.float64), torch.float32)
    dy = torch.randn(2, 4, 7, 9).to(kernel_device)
    dx = sc.sparse_conv2d_backward_input(dy, v, fmt, x.shape, 3, 1, 1)
    check(dx, torch.zeros(x.shape, dtype=torch.float64), torch.float32)
    dv = sc.sparse_conv2d_backward_weight(dy, x, fmt, 3, 1, 1)
    assert dv.shape == (0,) and dv.dtype == torch.float32


def test_non_contiguous_inputs(kernel_device):
    """channels-last x, a strided slice of x, and a transposed dy."""
    _, v, fmt, b, _ = make_case(11, 2, 3, 5, 7, 9, 3, 0.5, empty_filter=True, device=kernel_device)
    g = torch.Generator().manual_seed(12)
    x_cl = torch.randn(2, 7, 9, 3, generator=g).permute(0, 3, 1, 2).to(kernel_device)  # NHWC storage
    x_sl = torch.randn(2, 6, 7, 18, generator=g)[:, ::2, :, ::2].to(kernel_device)   # every other channel/column
    for x in (x_cl, x_sl):
        assert not x.is_contiguous()
        y = sc.sparse_conv2d_forward(x, v, fmt, 3, b, 1, 1)
        check(y, ref64(sc.reference_forward, x, v, fmt, 3, b, 1, 1), torch.float32)
        dy = torch.randn(2, 9, 7, 5, generator=g).permute(0, 3, 2, 1).to(kernel_device)  # (2, 5, 7, 9) strided
        assert not dy.is_contiguous()
        dx = sc.sparse_conv2d_backward_input(dy, v, fmt, x.shape, 3, 1, 1)
        check(dx, ref64(sc.reference_backward_input, dy, v, fmt, x.shape, 3, 1, 1), torch.float32)
        dv = sc.sparse_conv2d_backward_weight(dy, x, fmt, 3, 1, 1, num_splits=2)
        check(dv, ref64(sc.reference_backward_weight, dy, x, fmt, 3, 1, 1), torch.float32)


@pytest.mark.parametrize("offset64", [False, True], ids=["int32-offsets", "int64-offsets"])
def test_int64_pointers(kernel_device, monkeypatch, offset64):
    """A format whose pointers are int64 (as build_format makes them past 2**31 live weights), with the kernels'
    int32 offsets (what small tensors get) and their int64 offsets (what tensors past 2**30 elements get)."""
    from sparse_lth.kernels import _triton

    monkeypatch.setattr(_triton, "FORCE_OFFSET64", offset64)
    x, v, fmt, b, _ = make_case(13, 2, 3, 4, 7, 9, 3, 0.5, device=kernel_device)
    d = {name: getattr(fmt, name) for name in ("rows", "cols", "nnz")}
    d.update({name: t.long() for name, t in fmt.tensors().items()})
    fmt64 = SparseFormat(**d)
    y = sc.sparse_conv2d_forward(x, v, fmt64, 3, b, 2, 1)
    check(y, ref64(sc.reference_forward, x, v, fmt, 3, b, 2, 1), torch.float32)
    dy = torch.randn(y.shape).to(kernel_device)
    check(sc.sparse_conv2d_backward_input(dy, v, fmt64, x.shape, 3, 2, 1),
          ref64(sc.reference_backward_input, dy, v, fmt, x.shape, 3, 2, 1), torch.float32)
    check(sc.sparse_conv2d_backward_weight(dy, x, fmt64, 3, 2, 1),
          ref64(sc.reference_backward_weight, dy, x, fmt, 3, 2, 1), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geom", [dict(k=3, s=1, p=1, d=1, density=0.5), dict(k=5, s=2, p=2, d=2, density=0.1)],
                         ids=["k3-d50", "k5-s2-dil2-d10"])
def test_half_precision(kernel_device, dtype, geom):
    x, v, fmt, b, _ = make_case(17, 2, 3, 4, 9, 11, geom["k"], geom["density"], empty_filter=True,
                                dtype=dtype, device=kernel_device)
    k, s, p, d = geom["k"], geom["s"], geom["p"], geom["d"]
    y = sc.sparse_conv2d_forward(x, v, fmt, k, b, s, p, d)
    check(y, ref64(sc.reference_forward, x, v, fmt, k, b, s, p, d), dtype)
    dy = torch.randn(y.shape).to(dtype).to(kernel_device)
    dx = sc.sparse_conv2d_backward_input(dy, v, fmt, x.shape, k, s, p, d)
    check(dx, ref64(sc.reference_backward_input, dy, v, fmt, x.shape, k, s, p, d), dtype)
    dv_ref = ref64(sc.reference_backward_weight, dy, x, fmt, k, s, p, d)
    dv = sc.sparse_conv2d_backward_weight(dy, x, fmt, k, s, p, d, num_splits=2)
    check(dv, dv_ref, dtype)
    dv32 = sc.sparse_conv2d_backward_weight(dy, x, fmt, k, s, p, d, out_dtype=torch.float32)
    check(dv32, dv_ref, torch.float32)  # fp32 accumulation: exact to fp32 on the half inputs


def test_bad_input(kernel_device):
    x, v, fmt, b, _ = make_case(19, 2, 3, 4, 7, 9, 3, 0.5, device=kernel_device)
    fwd = sc.sparse_conv2d_forward
    bwi = sc.sparse_conv2d_backward_input
    bww = sc.sparse_conv2d_backward_weight
    dy = torch.randn(2, 4, 7, 9).to(kernel_device)
    with pytest.raises(ValueError, match="4-D"):
        fwd(x[0], v, fmt, 3, b, 1, 1)
    with pytest.raises(TypeError, match="float32"):
        fwd(x.long(), v, fmt, 3, b, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        fwd(x[:, :2], v, fmt, 3, b, 1, 1)
    with pytest.raises(ValueError, match="multiple of kh\\*kw"):
        fwd(x, v, fmt, 2, b, 1, 1)
    with pytest.raises(ValueError, match="length fmt.nnz"):
        fwd(x, v[:-1], fmt, 3, b, 1, 1)
    with pytest.raises(TypeError, match="dtype"):
        fwd(x, v.double(), fmt, 3, b, 1, 1)
    with pytest.raises(ValueError, match="bias"):
        fwd(x, v, fmt, 3, b[:-1], 1, 1)
    # a strided vector would be read as if contiguous: refused
    with pytest.raises(ValueError, match="values has stride 2; a vector must be contiguous"):
        fwd(x, v.repeat_interleave(2)[::2], fmt, 3, b, 1, 1)
    with pytest.raises(ValueError, match="bias has stride 2"):
        fwd(x, v, fmt, 3, b.repeat_interleave(2)[::2], 1, 1)
    with pytest.raises(ValueError, match="values has stride 2"):
        bwi(dy, v.repeat_interleave(2)[::2], fmt, x.shape, 3, 1, 1)
    with pytest.raises(TypeError, match="bias"):
        fwd(x, v, fmt, 3, b.half(), 1, 1)
    with pytest.raises(TypeError, match="SparseFormat"):
        fwd(x, v, fmt.mask(), 3, b, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        fwd(x, v, fmt, 3, b, 0, 1)
    with pytest.raises(ValueError, match="padding"):
        fwd(x, v, fmt, 3, b, 1, -1)
    with pytest.raises(TypeError, match="kernel_size"):
        fwd(x, v, fmt, (3, 3, 3), b, 1, 1)
    with pytest.raises(ValueError, match="empty output"):
        fwd(x[:, :, :2, :2], v, fmt, 3, b, 1, 0)
    huge = torch.zeros(1, 1, 1, 1, device=kernel_device).expand(70000, 3, 128, 256)  # no memory behind it
    with pytest.raises(ValueError, match="overflow"):
        fwd(huge, v, fmt, 3, b, 1, 1)
    # devices: values (or the format) elsewhere
    with pytest.raises(ValueError, match="one device"):
        fwd(x, v.to("meta"), fmt, 3, b, 1, 1)
    with pytest.raises(ValueError, match="one device"):
        fwd(x, v, fmt.to("meta"), 3, b, 1, 1)
    # a broken format
    broken = dataclasses.replace(fmt, col_idx=fmt.col_idx[:-1])  # (a new, unchecked format: fmt is frozen)
    with pytest.raises(ValueError, match="col_idx"):
        fwd(x, v, broken, 3, b, 1, 1)
    # backward input
    with pytest.raises(ValueError, match="dy has shape"):
        bwi(dy[:, :, :-1], v, fmt, x.shape, 3, 1, 1)
    with pytest.raises(ValueError, match="dy has shape"):
        bwi(dy, v, fmt, x.shape, 3, 2, 1)  # stride 2 would give a 4x5 output
    with pytest.raises(ValueError, match="channels"):
        bwi(dy, v, fmt, (2, 2, 7, 9), 3, 1, 1)
    with pytest.raises(ValueError, match="input_shape"):
        bwi(dy, v, fmt, (2, 3, 7), 3, 1, 1)
    with pytest.raises(TypeError, match="dtype"):
        bwi(dy.half(), v, fmt, x.shape, 3, 1, 1)
    # backward weight
    with pytest.raises(ValueError, match="dy has shape"):
        bww(dy[:, :3], x, fmt, 3, 1, 1)
    with pytest.raises(TypeError, match="must match"):
        bww(dy.half(), x, fmt, 3, 1, 1)
    with pytest.raises(TypeError, match="out_dtype"):
        bww(dy, x, fmt, 3, 1, 1, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="num_splits"):
        bww(dy, x, fmt, 3, 1, 1, num_splits=0)
    with pytest.raises(ValueError, match="one device"):
        bww(dy.to("meta"), x, fmt, 3, 1, 1)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    """On CPU tensors with the interpreter off the launchers say why, rather than fail deep inside Triton."""
    x, v, fmt, b, _ = make_case(23, 1, 3, 4, 7, 9, 3, 0.5)
    monkeypatch.setattr(_triton, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sc.sparse_conv2d_forward(x, v, fmt, 3, b, 1, 1)
