"""Direct sparse 2-D convolution (NCHW, groups=1) and its two gradients, in Triton.

The weight ``(C_out, C_in, kh, kw)`` is held as its live weights ``values`` (length ``nnz``, CSR order of the
weight viewed as ``(C_out, C_in*kh*kw)``) and a :class:`~.format.SparseFormat` ``fmt`` (rows = C_out,
cols = C_in*kh*kw, column ``c = ci*kh*kw + ky*kw + kx``).

Three ops, each with a launcher that checks its arguments and picks the grid, and a plain-torch reference:

* :func:`sparse_conv2d_forward`          ``y = conv2d(x, W) + b``; a program owns one output channel and a block of
  output pixels (flattened over batch and space) and walks that channel's live weights ``BLOCK_K`` at a time,
  gathering the input pixels each live weight touches straight from ``x`` (no im2col in memory). Bias fused.
* :func:`sparse_conv2d_backward_input`   ``dx = conv_transpose(dy, W)``; a program owns one input channel and a
  block of input pixels and walks that channel's CSC range (``col_ptr[ci*kh*kw] : col_ptr[(ci+1)*kh*kw]``),
  gathering the output-gradient pixels each live weight sends to it.
* :func:`sparse_conv2d_backward_weight`  ``dW`` at the live positions only (a sampled product): a program owns
  ``BLOCK_K`` consecutive live weights and one slice of the batch*pixel reduction; slices write fp32 partial sums
  that are then reduced in a fixed order (deterministic, no atomics) and cast.

All products accumulate in fp32; inputs may be fp32, fp16 or bf16. Memory offsets are int32, or int64 when an
offset into a launch's tensors can reach 2**30 (``_triton.offset_dtype``).
See ``notes/sparse_conv.md`` for the design and its reasons.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, cdiv, check_launch, check_unit_stride, interpreting, offset_dtype
from ._conv_geometry import (FLOAT_DTYPES as _FLOAT_DTYPES, check_fmt as _check_fmt, check_tensor4 as _check_tensor4,
                             check_values as _check_values, geometry as _geometry, out_size as _out_size)
from .format import to_dense
from .torch_conv import onednn_safe_input

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = [
    "sparse_conv2d_forward", "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight",
    "reference_forward", "reference_backward_input", "reference_backward_weight",
]

_INT32_MAX = 2**31 - 1


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output and scratch buffer of the launchers comes from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _sparse_conv2d_fwd_kernel(
        # pointers
        x_ptr, val_ptr, row_ptr_ptr, col_idx_ptr, row_order_ptr, bias_ptr, y_ptr,
        # sizes
        C_out, H, W, OH, OW, P,  # P = N * OH * OW
        # strides of x (any layout) and of y (contiguous NCHW, passed for clarity)
        stride_xn, stride_xc, stride_xh, stride_xw,
        stride_yn, stride_yc, stride_yh, stride_yw,
        # convolution geometry
        pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        # meta
        HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, OFFSET: tl.constexpr,
    ):
        # Output channels vary fastest across programs, so the programs that run together share one block of
        # input pixels (it stays in L2); heavy channels (row_order: most live weights first) start first.
        pid = tl.program_id(0)
        co = tl.load(row_order_ptr + pid % C_out).to(OFFSET)
        pid_p = pid // C_out

        # this program's output pixels, flattened over (n, oh, ow)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        ow = offs_p % OW
        t = offs_p // OW
        oh = t % OH
        n = t // OH
        ih0 = oh * STRIDE_H - pad_h
        iw0 = ow * STRIDE_W - pad_w
        # OFFSET is int64 when n * stride_xn can pass 2**31 (large batches of large images), else int32
        x_base = n.to(OFFSET) * stride_xn + ih0.to(OFFSET) * stride_xh + iw0.to(OFFSET) * stride_xw

        k_start = tl.load(row_ptr_ptr + co).to(OFFSET)
        k_end = tl.load(row_ptr_ptr + co + 1).to(OFFSET)
        # 2-D accumulator, reduced over its BLOCK_K rows once after the loop (no cross-lane reduction per step)
        acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            w = tl.load(val_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            col = tl.load(col_idx_ptr + offs_k, mask=k_mask, other=0)
            kx = col % KW
            ky = (col // KW) % KH
            ci = col // (KH * KW)
            sh = ky * dil_h  # the tap's shift in the input
            sw = kx * dil_w
            k_off = ci.to(OFFSET) * stride_xc + sh.to(OFFSET) * stride_xh + sw.to(OFFSET) * stride_xw
            ih = ih0[None, :] + sh[:, None]
            iw = iw0[None, :] + sw[:, None]
            ld_mask = (k_mask[:, None] & p_mask[None, :]
                       & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            xv = tl.load(x_ptr + (x_base[None, :] + k_off[:, None]), mask=ld_mask, other=0.0)
            acc += xv.to(tl.float32) * w[:, None]

        out = tl.sum(acc, axis=0)
        if HAS_BIAS:
            out += tl.load(bias_ptr + co).to(tl.float32)
        y_off = (n.to(OFFSET) * stride_yn + co * stride_yc
                 + oh.to(OFFSET) * stride_yh + ow.to(OFFSET) * stride_yw)
        tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=p_mask)

    @triton.jit
    def _sparse_conv2d_bwd_input_kernel(
        # pointers
        dy_ptr, val_ptr, col_ptr_ptr, t_row_idx_ptr, t_perm_ptr, col_idx_ptr, dx_ptr,
        # sizes
        C_in, H, W, OH, OW, Q,  # Q = N * H * W
        # strides of dy (any layout) and of dx (contiguous NCHW)
        stride_dyn, stride_dyc, stride_dyh, stride_dyw,
        stride_dxn, stride_dxc, stride_dxh, stride_dxw,
        # convolution geometry
        pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        # meta
        BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, OFFSET: tl.constexpr,
    ):
        pid = tl.program_id(0)
        ci = pid % C_in
        pid_q = pid // C_in

        # this program's input pixels, flattened over (n, ih, iw)
        offs_q = pid_q * BLOCK_P + tl.arange(0, BLOCK_P)
        q_mask = offs_q < Q
        iw = offs_q % W
        t = offs_q // W
        ih = t % H
        n = t // H
        dy_base = n.to(OFFSET) * stride_dyn
        # output pixel (oh, ow) reads input (oh*s - pad + ky*dil, ...): invert for each live (ky, kx)
        th = ih + pad_h
        tw = iw + pad_w

        # the CSC entries of input channel ci: all its columns ci*KH*KW .. (ci+1)*KH*KW - 1 are contiguous
        k_start = tl.load(col_ptr_ptr + ci * (KH * KW)).to(OFFSET)
        k_end = tl.load(col_ptr_ptr + (ci + 1) * (KH * KW)).to(OFFSET)
        acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            src = tl.load(t_perm_ptr + offs_k, mask=k_mask, other=0).to(OFFSET)
            w = tl.load(val_ptr + src, mask=k_mask, other=0.0).to(tl.float32)
            co = tl.load(t_row_idx_ptr + offs_k, mask=k_mask, other=0)
            col = tl.load(col_idx_ptr + src, mask=k_mask, other=0)
            kx = col % KW
            ky = (col // KW) % KH
            oh_s = th[None, :] - (ky * dil_h)[:, None]  # = oh * STRIDE_H when this tap hits
            ow_s = tw[None, :] - (kx * dil_w)[:, None]
            ok = k_mask[:, None] & q_mask[None, :] & (oh_s >= 0) & (ow_s >= 0)
            # never divide a negative number (C and numpy round it differently)
            oh_s = tl.where(ok, oh_s, 0)
            ow_s = tl.where(ok, ow_s, 0)
            if STRIDE_H == 1:
                oh = oh_s
            else:
                oh = oh_s // STRIDE_H
                ok = ok & (oh * STRIDE_H == oh_s)
            if STRIDE_W == 1:
                ow = ow_s
            else:
                ow = ow_s // STRIDE_W
                ok = ok & (ow * STRIDE_W == ow_s)
            ok = ok & (oh < OH) & (ow < OW)
            off = (dy_base[None, :] + co.to(OFFSET)[:, None] * stride_dyc
                   + oh.to(OFFSET) * stride_dyh + ow.to(OFFSET) * stride_dyw)
            g = tl.load(dy_ptr + off, mask=ok, other=0.0)
            acc += g.to(tl.float32) * w[:, None]

        dx_off = (n.to(OFFSET) * stride_dxn + ci.to(OFFSET) * stride_dxc
                  + ih.to(OFFSET) * stride_dxh + iw.to(OFFSET) * stride_dxw)
        tl.store(dx_ptr + dx_off, tl.sum(acc, axis=0).to(dx_ptr.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _sparse_conv2d_bwd_weight_kernel(
        # pointers
        dy_ptr, x_ptr, row_idx_ptr, col_idx_ptr, part_ptr,
        # sizes
        NNZ, H, W, OH, OW, P, P_PER_SPLIT,  # P = N * OH * OW; each split reduces P_PER_SPLIT of them
        # strides of dy and x (any layout)
        stride_dyn, stride_dyc, stride_dyh, stride_dyw,
        stride_xn, stride_xc, stride_xh, stride_xw,
        # convolution geometry
        pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        # meta
        BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, OFFSET: tl.constexpr,
    ):
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)

        # BLOCK_K consecutive live weights (CSR order: mostly one output channel, so dy rows are shared)
        offs_k = pid_k.to(OFFSET) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < NNZ
        co = tl.load(row_idx_ptr + offs_k, mask=k_mask, other=0)
        col = tl.load(col_idx_ptr + offs_k, mask=k_mask, other=0)
        kx = col % KW
        ky = (col // KW) % KH
        ci = col // (KH * KW)
        dh = ky * dil_h
        dw = kx * dil_w
        x_koff = ci.to(OFFSET) * stride_xc + dh.to(OFFSET) * stride_xh + dw.to(OFFSET) * stride_xw
        dy_koff = co.to(OFFSET) * stride_dyc

        acc = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
        p_lo = pid_s * P_PER_SPLIT
        p_hi = p_lo + tl.minimum(P - p_lo, P_PER_SPLIT)  # (p_lo + P_PER_SPLIT could pass int32 for many splits)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < p_hi
            ow = offs_p % OW
            t = offs_p // OW
            oh = t % OH
            n = t // OH
            ih0 = oh * STRIDE_H - pad_h
            iw0 = ow * STRIDE_W - pad_w
            n_o = n.to(OFFSET)
            x_base = n_o * stride_xn + ih0.to(OFFSET) * stride_xh + iw0.to(OFFSET) * stride_xw
            dy_base = n_o * stride_dyn + oh.to(OFFSET) * stride_dyh + ow.to(OFFSET) * stride_dyw
            ih = ih0[None, :] + dh[:, None]
            iw = iw0[None, :] + dw[:, None]
            m2 = k_mask[:, None] & p_mask[None, :]
            g = tl.load(dy_ptr + (dy_base[None, :] + dy_koff[:, None]), mask=m2, other=0.0)
            xm = m2 & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (x_base[None, :] + x_koff[:, None]), mask=xm, other=0.0)
            acc += g.to(tl.float32) * xv.to(tl.float32)

        part = tl.sum(acc, axis=1)
        tl.store(part_ptr + pid_s.to(OFFSET) * NNZ + offs_k, part, mask=k_mask)


# ----------------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------------
def _check_devices(op, fmt, **tensors):
    dev = fmt.device
    for t in tensors.values():
        if t is not None and t.device != dev:
            where = ", ".join([f"{k} on {v.device}" for k, v in tensors.items() if v is not None] + [f"fmt on {dev}"])
            raise ValueError(f"{op}: all tensors and the SparseFormat must be on one device; got {where}")
    # a validated format's tensors all sit on fmt.device: one of them stands for all
    return check_launch(fmt.row_ptr, op=op)


def _check_pixels(count, channels, op):
    """Pixel indices and program ids are int32 (memory offsets become int64 when needed): refuse what would overflow
    them."""
    if count > _INT32_MAX - 4096 or channels * cdiv(count, 32) > _INT32_MAX:
        raise ValueError(f"{op}: {count} pixels (batch * height * width) x {channels} channels overflow the "
                         f"kernel's int32 pixel/program indices; split the batch")


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def sparse_conv2d_forward(x, values, fmt, kernel_size, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """``y = conv2d(x, W, bias, stride, padding, dilation)`` with the sparse weight ``W`` = (``values``, ``fmt``).

    ``x``: (N, C_in, H, W), any strides, float32/float16/bfloat16; ``values``: (nnz,) of x's dtype; ``bias``:
    None or (C_out,) of x's dtype. Returns ``y`` (N, C_out, OH, OW), contiguous, of x's dtype.
    """
    op = "sparse_conv2d_forward"
    k, s, p, d = _geometry(kernel_size, stride, padding, dilation)
    _check_tensor4(x, "x", op)
    c_in = _check_fmt(fmt, k, op)
    if x.shape[1] != c_in:
        raise ValueError(f"{op}: x has {x.shape[1]} channels, the weight {c_in} (fmt.cols {fmt.cols} / kh*kw)")
    _check_values(values, fmt, x.dtype, op)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{op}: bias must be None or a torch.Tensor, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.numel() != fmt.rows:
            raise ValueError(f"{op}: bias must be 1-D of length C_out = {fmt.rows}, got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias has dtype {bias.dtype}, x {x.dtype}; they must match")
        check_unit_stride(bias, "bias", op)
    _check_devices(op, fmt, x=x, values=values, bias=bias)
    return _forward(x, values, fmt, k, bias, s, p, d, op)


def _forward(x, values, fmt, k, bias, s, p, d, op):
    n, _, h, w = x.shape
    oh, ow = _out_size(h, w, k, s, p, d, op)
    c_out = fmt.rows
    npix = n * oh * ow
    _check_pixels(npix, c_out, op)
    y = _alloc((n, c_out, oh, ow), x.dtype, x.device)
    if y.numel() == 0:
        return y
    if fmt.nnz == 0:  # every weight pruned: the output is the bias alone
        y.copy_((bias if bias is not None else torch.zeros(c_out, dtype=x.dtype, device=x.device))
                .view(1, c_out, 1, 1).expand_as(y))
        return y
    block_p, block_k, warps = (64, 16, 4) if interpreting() else (128, 16, 4)
    grid = (c_out * cdiv(npix, block_p),)
    _sparse_conv2d_fwd_kernel[grid](
        x, values, fmt.row_ptr, fmt.col_idx, fmt.row_order, bias if bias is not None else values, y,
        c_out, h, w, oh, ow, npix,
        *x.stride(), *y.stride(),
        p[0], p[1], d[0], d[1],
        KH=k[0], KW=k[1], STRIDE_H=s[0], STRIDE_W=s[1],
        HAS_BIAS=bias is not None, BLOCK_K=block_k, BLOCK_P=block_p,
        OFFSET=offset_dtype(x, y, counts=(fmt.nnz,)), num_warps=warps,
    )
    return y


def sparse_conv2d_backward_input(dy, values, fmt, input_shape, kernel_size, stride=(1, 1), padding=(0, 0),
                                 dilation=(1, 1)):
    """``dx``: the gradient of :func:`sparse_conv2d_forward` with respect to its input (a transposed sparse conv).

    ``dy``: (N, C_out, OH, OW), any strides; ``input_shape``: (N, C_in, H, W). Returns ``dx`` of ``input_shape``,
    contiguous, of dy's dtype.
    """
    op = "sparse_conv2d_backward_input"
    k, s, p, d = _geometry(kernel_size, stride, padding, dilation)
    _check_tensor4(dy, "dy", op)
    c_in = _check_fmt(fmt, k, op)
    try:
        input_shape = tuple(operator.index(v) for v in input_shape)  # (int() took 2.5 as 2)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: input_shape must be a sequence of 4 ints, got {input_shape!r}") from None
    if len(input_shape) != 4 or min(input_shape) < 0:
        raise ValueError(f"{op}: input_shape must be (N, C_in, H, W), got {input_shape}")
    n, c, h, w = input_shape
    if c != c_in:
        raise ValueError(f"{op}: input_shape has {c} channels, the weight {c_in} (fmt.cols {fmt.cols} / kh*kw)")
    oh, ow = _out_size(h, w, k, s, p, d, op)
    if tuple(dy.shape) != (n, fmt.rows, oh, ow):
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, expected {(n, fmt.rows, oh, ow)} "
                         f"(input {input_shape}, C_out {fmt.rows}, kernel_size {k}, stride {s}, padding {p}, "
                         f"dilation {d})")
    _check_values(values, fmt, dy.dtype, op)
    _check_devices(op, fmt, dy=dy, values=values)
    return _backward_input(dy, values, fmt, input_shape, k, s, p, d, op)


def _backward_input(dy, values, fmt, input_shape, k, s, p, d, op):
    n, c_in, h, w = input_shape
    oh, ow = dy.shape[2], dy.shape[3]
    npix = n * h * w
    _check_pixels(npix, c_in, op)
    if fmt.nnz == 0 or npix == 0 or c_in == 0:
        return torch.zeros(input_shape, dtype=dy.dtype, device=dy.device)
    dx = _alloc(input_shape, dy.dtype, dy.device)
    block_p, block_k, warps = (64, 16, 4) if interpreting() else (128, 16, 4)
    grid = (c_in * cdiv(npix, block_p),)
    _sparse_conv2d_bwd_input_kernel[grid](
        dy, values, fmt.col_ptr, fmt.t_row_idx, fmt.t_perm, fmt.col_idx, dx,
        c_in, h, w, oh, ow, npix,
        *dy.stride(), *dx.stride(),
        p[0], p[1], d[0], d[1],
        KH=k[0], KW=k[1], STRIDE_H=s[0], STRIDE_W=s[1],
        BLOCK_K=block_k, BLOCK_P=block_p, OFFSET=offset_dtype(dy, dx, counts=(fmt.nnz,)), num_warps=warps,
    )
    return dx


def sparse_conv2d_backward_weight(dy, x, fmt, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                                  out_dtype=None, *, num_splits=None):
    """``dvalues`` (nnz,): the weight gradient at the live positions only, in the order of ``values``.

    ``dy``: (N, C_out, OH, OW) and ``x``: (N, C_in, H, W), any strides, one dtype. The reduction over batch and
    pixels is split across ``num_splits`` programs per block of weights (default: enough to fill the GPU), each
    writing fp32 partial sums, reduced in a fixed order (deterministic) and cast to ``out_dtype`` (default x's).
    """
    op = "sparse_conv2d_backward_weight"
    k, s, p, d = _geometry(kernel_size, stride, padding, dilation)
    _check_tensor4(dy, "dy", op)
    _check_tensor4(x, "x", op)
    if dy.dtype != x.dtype:
        raise TypeError(f"{op}: dy has dtype {dy.dtype}, x {x.dtype}; they must match")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{op}: out_dtype must be a floating dtype, got {out_dtype}")
    c_in = _check_fmt(fmt, k, op)
    n, c, h, w = x.shape
    if c != c_in:
        raise ValueError(f"{op}: x has {c} channels, the weight {c_in} (fmt.cols {fmt.cols} / kh*kw)")
    oh, ow = _out_size(h, w, k, s, p, d, op)
    if tuple(dy.shape) != (n, fmt.rows, oh, ow):
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, expected {(n, fmt.rows, oh, ow)} "
                         f"(x {tuple(x.shape)}, C_out {fmt.rows}, kernel_size {k}, stride {s}, padding {p}, "
                         f"dilation {d})")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"{op}: num_splits must be a positive int, got {num_splits!r}")
    dev = _check_devices(op, fmt, dy=dy, x=x)
    return _backward_weight(dy, x, fmt, k, s, p, d, out_dtype, num_splits, dev, op)


def _backward_weight(dy, x, fmt, k, s, p, d, out_dtype, num_splits, dev, op):
    n, _, h, w = x.shape
    oh, ow = dy.shape[2], dy.shape[3]
    npix = n * oh * ow
    _check_pixels(npix, 1, op)
    nnz = fmt.nnz
    if nnz == 0 or npix == 0:
        return torch.zeros(nnz, dtype=out_dtype, device=x.device)
    block_p, block_k, warps = 64, 32, 4
    k_blocks = cdiv(nnz, block_k)
    p_blocks = cdiv(npix, block_p)
    if num_splits is None:
        # enough programs for ~4 waves of the GPU, but no split shorter than 4 pixel blocks
        num_splits = 1 if interpreting() else max(1, min(cdiv(4 * _num_sms(dev), k_blocks), p_blocks // 4, 64))
    # every split gets a whole number of pixel blocks; drop splits that would be empty
    p_per_split = cdiv(p_blocks, min(num_splits, p_blocks, 65535)) * block_p  # grid axis 1 <= 65535
    num_splits = cdiv(npix, p_per_split)
    part = _alloc((num_splits, nnz) if num_splits > 1 else (nnz,), torch.float32, x.device)
    grid = (k_blocks, num_splits)
    _sparse_conv2d_bwd_weight_kernel[grid](
        dy, x, fmt.row_idx, fmt.col_idx, part,
        nnz, h, w, oh, ow, npix, p_per_split,
        *dy.stride(), *x.stride(),
        p[0], p[1], d[0], d[1],
        KH=k[0], KW=k[1], STRIDE_H=s[0], STRIDE_W=s[1],
        BLOCK_K=block_k, BLOCK_P=block_p, OFFSET=offset_dtype(dy, x, part, counts=(nnz,)), num_warps=warps,
    )
    out = part if num_splits == 1 else part.sum(0)
    return out if out_dtype is torch.float32 else out.to(out_dtype)


# The layer's calls (sparse_lth.functional.SparseConv2dFunction). SparseConv2d has checked what the public
# launchers would: its format when the mask was set, its geometry (as pairs) at construction, the input's shape,
# channels and dtype (the values') at every call; autograd gives dy y's shape. What is left to check here is cheap:
# one device Triton can launch on, a floating dtype (a model made .double()), the output's size and index range.
# The public launchers' checks cost a Conv-6 layer ~6 us of host time per launch.
def forward_trusted(x, values, fmt, k, s, p, d, bias=None):
    op = "sparse_conv2d_forward"
    check_launch(x, values, bias, op=op)
    if x.dtype not in _FLOAT_DTYPES:
        _check_tensor4(x, "x", op)  # its clear error
    return _forward(x, values, fmt, k, bias, s, p, d, op)


def backward_input_trusted(dy, values, fmt, input_shape, k, s, p, d):
    op = "sparse_conv2d_backward_input"
    check_launch(dy, values, op=op)
    if dy.dtype not in _FLOAT_DTYPES:
        _check_tensor4(dy, "dy", op)
    return _backward_input(dy, values, fmt, tuple(input_shape), k, s, p, d, op)


def backward_weight_trusted(dy, x, fmt, k, s, p, d, out_dtype):
    op = "sparse_conv2d_backward_weight"
    dev = check_launch(dy, x, op=op)
    if x.dtype not in _FLOAT_DTYPES:
        _check_tensor4(x, "x", op)
    return _backward_weight(dy, x, fmt, k, s, p, d, out_dtype, None, dev, op)


# ----------------------------------------------------------------------------------------------------------------
# plain-torch references (dense masked weight; same signatures)
# ----------------------------------------------------------------------------------------------------------------
def _dense_weight(values, fmt, c_in, k):
    return to_dense(values, fmt).view(fmt.rows, c_in, k[0], k[1])


def reference_forward(x, values, fmt, kernel_size, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    """``F.conv2d`` on the dense masked weight."""
    k, s, p, d = _geometry(kernel_size, stride, padding, dilation)
    c_in = _check_fmt(fmt, k, "reference_forward")
    return F.conv2d(x, _dense_weight(values, fmt, c_in, k), bias, s, p, d)


def reference_backward_input(dy, values, fmt, input_shape, kernel_size, stride=(1, 1), padding=(0, 0),
                             dilation=(1, 1)):
    """``torch.nn.grad.conv2d_input`` on the dense masked weight."""
    k, s, p, d = _geometry(kernel_size, stride, padding, dilation)
    c_in = _check_fmt(fmt, k, "reference_backward_input")
    return torch.nn.grad.conv2d_input(tuple(input_shape), _dense_weight(values, fmt, c_in, k), dy, s, p, d)


def reference_backward_weight(dy, x, fmt, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                              out_dtype=None):
    """``torch.nn.grad.conv2d_weight`` taken at the live positions (CSR order), cast to ``out_dtype``."""
    k, s, p, d = _geometry(kernel_size, stride, padding, dilation)
    c_in = _check_fmt(fmt, k, "reference_backward_weight")
    x = onednn_safe_input(x, k, s)  # (a 1x1 strided channels_last input: oneDNN's AVX2 kernel writes past a buffer)
    gw = torch.nn.grad.conv2d_weight(x, (fmt.rows, c_in, k[0], k[1]), dy, s, p, d)
    dv = gw.reshape(fmt.rows, fmt.cols)[fmt.row_idx.long(), fmt.col_idx.long()]
    return dv.to(x.dtype if out_dtype is None else out_dtype)
