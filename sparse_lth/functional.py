"""Autograd Functions of the sparse path: forward and both gradients on the compact live values.

The backend (``triton``, ``interpret`` or ``torch``) picks the implementation of the three ops; the Triton modules
are imported only when a Triton backend is used.
"""
from __future__ import annotations

import torch

from .kernels import torch_ops
from .kernels.format import SparseFormat


def _as_is(t, nnz):
    return t


def _linear_ops(backend: str):
    """(prepare, forward, backward_input, backward_weight). ``prepare(t, nnz)`` turns a dense operand into the form
    the ops read without a copy (the Triton kernels: batch-minor, or in place when small); an operand that feeds
    two ops is prepared once, so a layout copy, when one is needed, is made once per step, not once per op."""
    if backend == "torch":
        return _as_is, torch_ops.linear_forward, torch_ops.linear_backward_input, torch_ops.linear_backward_weight
    from .kernels import sparse_linear as k

    return k.prepare_operand, k.sparse_linear_forward, k.sparse_linear_backward_input, k.sparse_linear_backward_weight


class SparseLinearFunction(torch.autograd.Function):
    """y = x W^T + b (+ ReLU) with W given by ``values`` (nnz) and ``fmt``; x of shape (..., cols)."""

    @staticmethod
    def forward(ctx, x, values, bias, fmt: SparseFormat, backend: str, activation: str | None):
        prep, fwd, _, _ = _linear_ops(backend)
        lead = x.shape[:-1]
        x2 = prep(x.reshape(-1, x.shape[-1]), fmt.nnz)  # what the forward reads is what the weight gradient reads
        y = fwd(x2, values, fmt, bias, activation)
        ctx.fmt, ctx.backend, ctx.activation, ctx.x_shape = fmt, backend, activation, x.shape
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, values, y if activation == "relu" else None)
        return y.reshape(*lead, fmt.rows)

    @staticmethod
    def backward(ctx, dy):
        x2, values, y = ctx.saved_tensors
        prep, _, bwd_in, bwd_w = _linear_ops(ctx.backend)
        dy2 = dy.reshape(-1, ctx.fmt.rows)
        if ctx.activation == "relu":
            dy2 = dy2 * (y > 0)
        dy2 = prep(dy2.to(x2.dtype), ctx.fmt.nnz)  # one operand for both gradients
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            dx = bwd_in(dy2, values, ctx.fmt).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dv = bwd_w(dy2, x2, ctx.fmt, out_dtype=values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dv, db, None, None, None


def sparse_linear(x, values, bias, fmt: SparseFormat, backend: str = "torch", activation: str | None = None):
    return SparseLinearFunction.apply(x, values, bias, fmt, backend, activation)


class SparseConv2dFunction(torch.autograd.Function):
    """Direct sparse conv2d on the Triton backends (NCHW, groups=1, zero padding)."""

    @staticmethod
    def forward(ctx, x, values, bias, fmt: SparseFormat, kernel_size, stride, padding, dilation):
        from .kernels import sparse_conv as k

        y = k.sparse_conv2d_forward(x, values, fmt, kernel_size, bias, stride, padding, dilation)
        ctx.fmt, ctx.geom, ctx.has_bias = fmt, (kernel_size, stride, padding, dilation), bias is not None
        ctx.save_for_backward(x, values)
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels import sparse_conv as k

        x, values = ctx.saved_tensors
        kernel_size, stride, padding, dilation = ctx.geom
        dy = dy.to(x.dtype)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            dx = k.sparse_conv2d_backward_input(dy, values, ctx.fmt, tuple(x.shape), kernel_size, stride, padding,
                                                dilation)
        if ctx.needs_input_grad[1]:
            dv = k.sparse_conv2d_backward_weight(dy, x, ctx.fmt, kernel_size, stride, padding, dilation,
                                                 out_dtype=values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dv, db, None, None, None, None, None


def scatter_values(values: torch.Tensor, flat_index: torch.Tensor, shape) -> torch.Tensor:
    """The dense weight of ``shape`` with ``values`` at ``flat_index`` and zeros elsewhere (differentiable)."""
    n = 1
    for s in shape:
        n *= s
    w = values.new_zeros(n).index_put((flat_index,), values)
    return w.view(shape)

