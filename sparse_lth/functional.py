"""Autograd Functions of the sparse path: forward and both gradients on the compact live values.

The backend (``triton``, ``interpret`` or ``torch``) picks the implementation of the three ops; the Triton modules
are imported only when a Triton backend is used.

Each of the three ops (:data:`OPS`: the forward, the input gradient, the weight gradient) runs either on the sparse
kernels or **dense**: the live values scattered into a dense weight (one write of ``rows x cols``) and the dense
product on cuBLAS/cuDNN/MKL, with the weight gradient computed dense and gathered at the live positions. The
trainable parameter stays the compact ``values`` either way. A layer picks per op (``dense=`` below) because the
crossover differs: a dense weight gradient on tensor cores can beat the sampled product at densities where the
sparse forward already wins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import BACKENDS
from .kernels import torch_conv, torch_ops
from .kernels.format import SparseFormat


def _check_backend(backend, op: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS}")


def _check_function_input(x, fmt: SparseFormat, width: int, op: str) -> None:
    """The Functions' own O(1) checks, for a direct caller (the layers and sparse_linear() check more first): an
    input of the wrong width or an integer dtype made the Triton kernels read out of bounds or return integers."""
    if not isinstance(fmt, SparseFormat):
        raise TypeError(f"{op}: fmt must be a SparseFormat, got {type(fmt).__name__}")
    if width != fmt.cols or not x.is_floating_point():
        raise ValueError(f"{op}: an input of shape {tuple(x.shape)} and dtype {x.dtype} does not fit a "
                         f"({fmt.rows}, {fmt.cols}) sparse weight (a floating input whose rows hold {fmt.cols} "
                         "values, or C_in * kh * kw of them for a conv)")


def _linear_ops(backend: str):
    """(prepare, forward, backward_input, backward_weight). ``prepare(t, nnz)`` turns a dense operand into the form
    the ops read without a copy (the Triton kernels: batch-minor, or in place when small); an operand that feeds
    two ops is prepared once, so a layout copy, when one is needed, is made once per step, not once per op."""
    ops = _LINEAR_OPS.get(backend)
    if ops is None:
        _check_backend(backend, "SparseLinearFunction")
        if backend == "torch":
            ops = (torch_ops.prepare_operand, torch_ops.linear_forward, torch_ops.linear_backward_input,
                   torch_ops.linear_backward_weight)
        else:  # the Triton kernels without their argument checks: sparse_linear() and SparseLinear make them
            from .kernels import sparse_linear as k

            ops = k.prepare_operand, k.forward_trusted, k.backward_input_trusted, k.backward_weight_trusted
        _LINEAR_OPS[backend] = ops
    return ops


# (a plain dict, not functools.lru_cache: torch.compile warns on every traced call of an lru_cache-wrapped function)
_LINEAR_OPS: dict = {}
_CONV_OPS: list = []


def _conv_ops():
    """The Triton conv ops without their argument checks (SparseConv2d makes them): (forward, backward_input,
    backward_weight). Imported at the first call: an import statement in the Function costs every launch ~1 us."""
    if not _CONV_OPS:
        from .kernels import sparse_conv as k

        _CONV_OPS.extend((k.forward_trusted, k.backward_input_trusted, k.backward_weight_trusted))
    return _CONV_OPS


OPS = ("forward", "input_grad", "weight_grad")
IMPLS = ("sparse", "dense")
ALL_SPARSE = (False, False, False)


def check_ops(ops) -> tuple[bool, bool, bool]:
    """``ops`` ("sparse", "dense", or a dict {op: "sparse" | "dense"} over :data:`OPS`, missing ops sparse) as the
    tuple of per-op dense flags that the Functions take."""
    if isinstance(ops, str) and ops in IMPLS:
        return (ops == "dense",) * 3
    if not isinstance(ops, dict):
        raise ValueError(f"ops must be 'sparse', 'dense' or a dict {{op: 'sparse' | 'dense'}} with ops from {OPS}, "
                         f"got {ops!r}")
    bad = sorted(set(ops) - set(OPS))
    if bad:
        raise ValueError(f"ops: unknown op(s) {bad}; the ops are {OPS}")
    for op, impl in ops.items():
        if impl not in IMPLS:
            raise ValueError(f"ops[{op!r}] must be one of {IMPLS}, got {impl!r}")
    return tuple(ops.get(op, "sparse") == "dense" for op in OPS)


def ops_dict(dense: tuple) -> dict[str, str]:
    """The per-op dense flags as {op: "sparse" | "dense"}."""
    return {op: "dense" if d else "sparse" for op, d in zip(OPS, dense)}


def _gather_grad(g: torch.Tensor, flat_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The entries of a dense weight gradient at the live positions, as the compact values' gradient."""
    return torch_ops.as_dtype(g.reshape(-1).index_select(0, flat_index), dtype)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (..., n) as a matrix (batch, n), its leading dimensions flattened: ``reshape(-1, n)`` names the batch
    size explicitly, since with no element (n = 0, or a batch of 0) ``-1`` has no unique value and torch refuses."""
    if t.dim() == 2:
        return t
    batch = 1
    for s in t.shape[:-1]:
        batch *= s
    return t.reshape(batch, n)


def _not_a_view(y: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor of its own for autograd when it is a view of a tensor made inside the forward (a
    transposed product, a reshape): autograd refuses in-place ops on a custom Function's view outputs
    (``nn.ReLU(inplace=True)`` after the layer), and nothing else holds that tensor. Same storage and version
    counter, so an in-place op on it is still seen by what the backward saved."""
    return y.detach() if y._base is not None else y


class SparseLinearFunction(torch.autograd.Function):
    """y = x W^T + b (+ ReLU) with W given by ``values`` (nnz) and ``fmt``; x of shape (..., cols).

    ``dense``: per-op flags (forward, input gradient, weight gradient) for the dense implementation, which needs
    ``flat_index`` (``row * cols + col`` of each live value)."""

    @staticmethod
    def forward(ctx, x, values, bias, fmt: SparseFormat, backend: str, activation: str | None,
                dense: tuple = ALL_SPARSE, flat_index: torch.Tensor | None = None):
        _check_function_input(x, fmt, x.shape[-1] if x.dim() else -1, "SparseLinearFunction")
        prep, fwd, _, _ = _linear_ops(backend)
        d_fwd, d_dx, d_dw = dense
        lead = x.shape[:-1]
        x2 = _rows(x, x.shape[-1])
        if not (d_fwd and d_dw):  # what the forward reads is what the weight gradient reads
            x2 = prep(x2, fmt.nnz)
        w = None
        if d_fwd:
            w = scatter_values(values, flat_index, fmt.shape)
            y = F.linear(x2, w, bias)
            if activation == "relu":
                y = torch.relu_(y)
            elif activation is not None:
                raise ValueError(f"unknown activation {activation!r} (None or 'relu')")
        else:
            y = fwd(x2, values, fmt, bias, activation)
        ctx.fmt, ctx.backend, ctx.activation, ctx.x_shape = fmt, backend, activation, x.shape
        ctx.has_bias, ctx.dense = bias is not None, dense
        # x itself too when it needs a gradient (no copy): x2 may be a batch-minor copy made here, which double
        # backward cannot trace to x
        ctx.save_for_backward(x2, values, y if activation == "relu" else None, w if d_dx else None, flat_index,
                              x if (x2 is not x and x.requires_grad) else None)
        return _not_a_view(y if len(lead) == 1 else y.reshape(*lead, fmt.rows))

    @staticmethod
    def backward(ctx, dy):
        x2, values, y, w, flat_index, x = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (Hessian-vector products, gradient penalties)
            return _double_differentiable_linear_backward(ctx, dy, x2 if x is None else x, values, y, flat_index)
        prep, _, bwd_in, bwd_w = _linear_ops(ctx.backend)
        _, d_dx, d_dw = ctx.dense
        dy2 = _rows(dy, ctx.fmt.rows)
        if ctx.activation == "relu":
            # ReLU's own backward op (what nn.ReLU's gradient runs): one pass, where dy * (y > 0) made a bool
            # tensor and then multiplied by it (2 launches on a GPU; on the CPU the bool multiply alone took
            # ~10x as long). Written into dy's layout (the op alone would follow y's), which prep() relies on.
            # Unlike the multiply it gives 0, not NaN, where y <= 0 and dy is inf or NaN, as torch.relu does.
            dy2 = torch.ops.aten.threshold_backward.grad_input(dy2, y, 0, grad_input=torch.empty_like(dy2))
        dy2 = torch_ops.as_dtype(dy2, x2.dtype)
        if not (d_dx and d_dw):
            dy2 = prep(dy2, ctx.fmt.nnz)  # one operand for both gradients
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            if d_dx:
                if w is None:
                    w = scatter_values(values, flat_index, ctx.fmt.shape)
                dx = torch.mm(dy2, w.to(dy2.dtype))
            else:
                dx = bwd_in(dy2, values, ctx.fmt)
            if len(ctx.x_shape) != 2:
                dx = dx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if d_dw:
                dv = _gather_grad(torch.mm(dy2.t(), x2), flat_index, values.dtype)
            else:
                dv = bwd_w(dy2, x2, ctx.fmt, out_dtype=values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dv, db, None, None, None, None, None


def _flat_index_of(fmt: SparseFormat, flat_index: torch.Tensor | None) -> torch.Tensor:
    if flat_index is not None:
        return flat_index
    return fmt.row_idx.long() * fmt.cols + fmt.col_idx.long()


def _vjp(out: torch.Tensor, grad_out: torch.Tensor, inputs: list, needs: list) -> list:
    """``d<out, grad_out>/d input`` for the inputs whose gradient is asked (None for the others), with a graph."""
    want = [t for t, n in zip(inputs, needs) if n]
    got = iter(torch.autograd.grad(out, want, grad_out, create_graph=True, allow_unused=True) if want else ())
    res = []
    for t, n in zip(inputs, needs):
        g = next(got) if n else None
        res.append(torch.zeros_like(t) if n and g is None else g)
    return res


def _double_differentiable_linear_backward(ctx, dy, x, values, y, flat_index):
    """The backward of :class:`SparseLinearFunction` as differentiable torch ops on the scattered weight, used when
    autograd records the backward (``create_graph=True``): the sparse kernels' results carry no graph. It costs a
    dense product; plain training never takes it."""
    dy2 = _rows(dy, ctx.fmt.rows)
    if ctx.activation == "relu":
        # ReLU's gradient as nn.ReLU's (0 where y <= 0, also for an inf/NaN dy, which a multiply by the mask made
        # NaN); differentiable in dy, and ReLU's second derivative is zero
        dy2 = torch.where(y > 0, dy2, dy2.new_zeros(()))
    w = scatter_values(values, _flat_index_of(ctx.fmt, flat_index), ctx.fmt.shape)
    pre = F.linear(_rows(x, ctx.fmt.cols).to(w.dtype), w)
    dx, dv = _vjp(pre, dy2.to(pre.dtype), [x, values], list(ctx.needs_input_grad[:2]))
    db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dv, db, None, None, None, None, None


def sparse_linear(x, values, bias, fmt: SparseFormat, backend: str = "torch", activation: str | None = None,
                  dense: tuple = ALL_SPARSE, flat_index: torch.Tensor | None = None):
    """``act(x @ W^T + bias)`` through :class:`SparseLinearFunction`, its arguments checked first (clear errors for
    bad input; :class:`~sparse_lth.layers.SparseLinear` makes its own checks and calls the Function itself)."""
    from .kernels import sparse_linear as k

    _check_backend(backend, "sparse_linear")
    if any(dense) and flat_index is None:
        raise ValueError("sparse_linear: a dense op needs flat_index (row * cols + col of each live value)")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"sparse_linear: x must be a tensor of at least one dimension, got {x!r:.60}")
    # the torch backend runs float64 too, on any device
    torch_backend = backend == "torch"
    k.check_forward_args(_rows(x, x.shape[-1]), values, fmt, bias, activation, op="sparse_linear",
                         dtypes=k._FLOAT_DTYPES + ((torch.float64,) if torch_backend else ()),
                         launch=not torch_backend)
    return SparseLinearFunction.apply(x, values, bias, fmt, backend, activation, tuple(dense), flat_index)


class SparseConv2dFunction(torch.autograd.Function):
    """Direct sparse conv2d (NCHW, groups=1, zero padding) on the Triton kernels (``backend`` "triton" or
    "interpret") or the torch backend's shifted CSR products (``backend="torch"``, which needs ``taps``, the
    format grouped by kernel tap: :func:`~sparse_lth.kernels.torch_conv.build_conv_taps`).

    ``dense``: per-op flags as for :class:`SparseLinearFunction`; a dense op runs cuDNN/MKL-DNN on the scattered
    weight (``flat_index`` indexes the flattened ``(C_out, C_in * kh * kw)`` weight).

    The Triton ops run without the public launchers' argument checks (``sparse_conv.forward_trusted`` etc.):
    the caller, :class:`~sparse_lth.layers.SparseConv2d`, has made them (format, geometry as pairs of ints, a 4-D
    input of the values' dtype)."""

    @staticmethod
    def forward(ctx, x, values, bias, fmt: SparseFormat, kernel_size, stride, padding, dilation,
                dense: tuple = ALL_SPARSE, flat_index: torch.Tensor | None = None, backend: str = "triton",
                taps=None):
        _check_backend(backend, "SparseConv2dFunction")
        _check_function_input(x, fmt, x.shape[1] * kernel_size[0] * kernel_size[1] if x.dim() == 4 else -1,
                              "SparseConv2dFunction")
        d_fwd, d_dx, d_dw = dense
        w_shape = (fmt.rows, fmt.cols // (kernel_size[0] * kernel_size[1])) + tuple(kernel_size)
        w = xg = grid = None
        if backend == "torch":
            if taps is None:
                raise ValueError("SparseConv2dFunction: the torch backend needs taps (torch_conv.build_conv_taps)")
            grid = torch_conv.ShiftGrid(x.shape, taps, stride, padding, dilation, "SparseConv2dFunction")
            if not d_fwd:
                xg = torch_conv.input_grid(x, grid, torch_conv.compute_dtype(x.dtype))
        if d_fwd:
            w = scatter_values(values, flat_index, w_shape)
            y = F.conv2d(x, w, bias, stride, padding, dilation)
        elif backend == "torch":
            y = torch_conv.forward_grid(xg, values, taps, grid, bias, x.dtype, torch_conv.channels_last(x))
        else:
            y = _conv_ops()[0](x, values, fmt, kernel_size, stride, padding, dilation, bias)
        ctx.fmt, ctx.geom, ctx.has_bias = fmt, (kernel_size, stride, padding, dilation), bias is not None
        ctx.dense, ctx.w_shape, ctx.backend, ctx.taps, ctx.grid = dense, w_shape, backend, taps, grid
        # not the grid: the weight gradient builds it again from x (one copy of x, 1-4 % of a Conv-6, ResNet-20 or
        # VGG-19 step on the CPU), which x's other users keep alive anyway; saved, it was a padded copy of every
        # sparse conv's input held through the backward (ResNet-20 at batch 128: 1.4x dense masking's activations)
        ctx.save_for_backward(x, values, w if d_dx else None, flat_index)
        return _not_a_view(y)

    @staticmethod
    def backward(ctx, dy):
        x, values, w, flat_index = ctx.saved_tensors
        kernel_size, stride, padding, dilation = ctx.geom
        if torch.is_grad_enabled():  # create_graph=True: differentiable torch ops on the scattered weight
            w = scatter_values(values, _flat_index_of(ctx.fmt, flat_index), ctx.w_shape)
            pre = F.conv2d(torch_conv.onednn_safe_input(x.to(w.dtype), kernel_size, stride), w, None, stride, padding,
                           dilation)
            dx, dv = _vjp(pre, dy.to(pre.dtype), [x, values], list(ctx.needs_input_grad[:2]))
            db = dy.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return dx, dv, db, None, None, None, None, None, None, None, None, None
        _, d_dx, d_dw = ctx.dense
        dy = torch_ops.as_dtype(dy, x.dtype)
        dx = dv = db = None
        need_dx, need_dv = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dyg = None
        if ctx.backend == "torch" and ((need_dx and not d_dx) or (need_dv and not d_dw)):
            dyg = torch_conv.grad_output_grid(dy, ctx.grid, torch_conv.compute_dtype(dy.dtype))  # for both
        if need_dx:
            if d_dx:
                if w is None:
                    w = scatter_values(values, flat_index, ctx.w_shape)
                dx = torch.nn.grad.conv2d_input(tuple(x.shape), w.to(dy.dtype), dy, stride, padding, dilation)
            elif ctx.backend == "torch":
                dx = torch_conv.backward_input_grid(dyg, values, ctx.taps, ctx.grid, dy.dtype)
            else:
                dx = _conv_ops()[1](dy, values, ctx.fmt, x.shape, kernel_size, stride, padding, dilation)
        if need_dv:
            if d_dw:
                g = torch.nn.grad.conv2d_weight(torch_conv.onednn_safe_input(x, kernel_size, stride), ctx.w_shape,
                                                dy, stride, padding, dilation)
                dv = _gather_grad(g, flat_index, values.dtype)
            elif ctx.backend == "torch":
                xg = torch_conv.input_grid(x, ctx.grid, torch_conv.compute_dtype(x.dtype))
                dv = torch_conv.backward_weight_grid(dyg, xg, ctx.taps, ctx.grid, values.dtype)
            else:
                dv = _conv_ops()[2](dy, x, ctx.fmt, kernel_size, stride, padding, dilation, values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dv, db, None, None, None, None, None, None, None, None, None


def scatter_values(values: torch.Tensor, flat_index: torch.Tensor, shape) -> torch.Tensor:
    """The dense weight of ``shape`` with ``values`` at ``flat_index`` and zeros elsewhere (differentiable)."""
    n = 1
    for s in shape:
        n *= s
    w = values.new_zeros(n).index_put((flat_index,), values)
    return w.view(shape)

