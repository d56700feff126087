"""The ``torch`` backend: plain-PyTorch sparse ops, on any device.

For the linear op this is the fast CPU path: ``torch.sparse`` CSR products for the forward pass and the input
gradient (the transposed CSR view is built from the format's CSC arrays with one gather of ``nnz`` values), and a
sampled dense-dense product (``torch.sparse.sampled_addmm``) for the weight gradient at live positions only.
CPU sparse products exist for float32/float64 only; other dtypes are computed in float32 and cast back.

The dense references that every kernel is tested against live beside the kernels (``sparse_linear.reference_*``,
``sparse_conv.reference_*``).
"""
from __future__ import annotations

import functools
import warnings

import torch

from .format import SparseFormat

__all__ = [
    "as_dtype", "prepare_operand", "linear_forward", "linear_backward_input", "linear_backward_weight", "weight_csr",
    "weight_t_csr",
]

# torch warns once per process that CSR support is "beta"; this module relies on it knowingly.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

_SPARSE_DTYPES = (torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _SPARSE_DTYPES else torch.float32


def _no_autocast(op):
    """Run ``op`` with autocast off on its first argument's device: autocast would cast the float32 operands of
    the CSR products (``addmm``) back to bfloat16/float16, which the CPU's sparse kernels do not take."""
    @functools.wraps(op)
    def run(t: torch.Tensor, *args, **kwargs):
        dev = t.device.type
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return op(t, *args, **kwargs)
        return op(t, *args, **kwargs)
    return run


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it is one already (a no-op ``to`` costs about a microsecond, and a
    small layer's step made dozens of them)."""
    return t if t.dtype == dtype else t.to(dtype)


def _csr(ptr: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    if ptr.dtype != idx.dtype:
        idx = idx.to(ptr.dtype)
    return torch.sparse_csr_tensor(ptr, idx, values, shape, check_invariants=False)


def weight_csr(values: torch.Tensor, fmt: SparseFormat) -> torch.Tensor:
    """W (rows x cols) as a torch CSR tensor sharing ``values``."""
    return _csr(fmt.row_ptr, fmt.col_idx, values, fmt.shape)


def weight_t_csr(values: torch.Tensor, fmt: SparseFormat) -> torch.Tensor:
    """W^T (cols x rows) as a torch CSR tensor (one gather of the values through ``t_perm``)."""
    return _csr(fmt.col_ptr, fmt.t_row_idx, values[fmt.t_perm], (fmt.cols, fmt.rows))


def _check(x: torch.Tensor, values: torch.Tensor, fmt: SparseFormat, dim: str, what: str, op: str) -> None:
    """``x`` 2-D with ``fmt``'s ``dim`` ("rows" or "cols") columns, ``values`` of length nnz, one device."""
    if not isinstance(fmt, SparseFormat):
        raise TypeError(f"{op}: fmt must be a SparseFormat (kernels.format.build_format), got {type(fmt).__name__}")
    fmt.validate()  # (once per format: it remembers)
    dim = getattr(fmt, dim)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: {what} must be a floating tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if values is not None and values.dtype != x.dtype:
        raise TypeError(f"{op}: dtypes must match: {what} {x.dtype}, values {values.dtype}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{op}: {what} must be 2-D with {dim} columns, got shape {tuple(x.shape)}")
    if values is not None and (values.dim() != 1 or values.numel() != fmt.nnz):
        raise ValueError(f"{op}: values must be 1-D of length nnz={fmt.nnz}, got shape {tuple(values.shape)}")
    devs = {x.device, fmt.device} | ({values.device} if values is not None else set())
    if len(devs) != 1:
        raise ValueError(f"{op}: tensors are on different devices: {sorted(str(d) for d in devs)}")


def prepare_operand(t: torch.Tensor, nnz: int = 0) -> torch.Tensor:
    """``t`` (B, n) in the layout these ops read without a copy: batch-minor (strides (1, B), so ``t.t()`` is
    contiguous). ``torch.sparse.mm(W, t.t())`` and ``sampled_addmm`` otherwise transpose the dense operand
    themselves, once per op; prepared once, an operand that feeds the forward and the weight gradient (or both
    gradients) is transposed once per step, and a sparse layer's output, already batch-minor, never. On a 2-core
    CPU this made the LeNet-300-100 layers' forward ~3x and weight gradient ~2.5x faster at 1 %, the transpose
    included once (``notes/sparse_linear.md``, session 6). ``nnz`` is ignored (the Triton backend's signature)."""
    if t.dim() != 2 or t.shape[0] <= 1 or t.stride(0) == 1:
        return t
    return t.t().contiguous().t()


@_no_autocast
def linear_forward(x: torch.Tensor, values: torch.Tensor, fmt: SparseFormat, bias: torch.Tensor | None = None,
                   activation: str | None = None) -> torch.Tensor:
    """y = x W^T + b (optionally ReLU), x: (B, cols) -> (B, rows)."""
    _check(x, values, fmt, "cols", "x", "linear_forward")
    if bias is not None and (tuple(bias.shape) != (fmt.rows,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"linear_forward: bias must be ({fmt.rows},) {x.dtype} on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")  # (a (1,) or (B, rows) broadcast)
    ct = _compute_dtype(x.dtype)
    y = torch.sparse.mm(weight_csr(as_dtype(values, ct), fmt), as_dtype(x, ct).t()).t()
    if bias is not None:
        y = y + as_dtype(bias, ct)
    if activation == "relu":
        y = torch.relu(y)
    elif activation is not None:
        raise ValueError(f"linear_forward: unknown activation {activation!r} (None or 'relu')")
    return as_dtype(y, x.dtype)


@_no_autocast
def linear_backward_input(dy: torch.Tensor, values: torch.Tensor, fmt: SparseFormat) -> torch.Tensor:
    """dx = dy W, dy: (B, rows) -> (B, cols)."""
    _check(dy, values, fmt, "rows", "dy", "linear_backward_input")
    ct = _compute_dtype(dy.dtype)
    # a contiguous dense operand: ~15% faster than the strided dy.t() here (LeNet sizes, one CPU thread); free
    # when dy was prepared (prepare_operand)
    dx = torch.sparse.mm(weight_t_csr(as_dtype(values, ct), fmt), as_dtype(dy, ct).t().contiguous()).t()
    return as_dtype(dx, dy.dtype)


@_no_autocast
def linear_backward_weight(dy: torch.Tensor, x: torch.Tensor, fmt: SparseFormat,
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dvalues[k] = sum_b dy[b, row_idx[k]] * x[b, col_idx[k]]: the weight gradient at live positions only."""
    _check(dy, None, fmt, "rows", "dy", "linear_backward_weight")
    _check(x, None, fmt, "cols", "x", "linear_backward_weight")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"linear_backward_weight: dy has {dy.shape[0]} rows, x has {x.shape[0]}")
    if dy.dtype != x.dtype:
        raise TypeError(f"linear_backward_weight: dtypes must match: dy {dy.dtype}, x {x.dtype}")
    out_dtype = out_dtype or dy.dtype
    if not out_dtype.is_floating_point:
        raise TypeError(f"linear_backward_weight: out_dtype must be a floating dtype, got {out_dtype}")
    if fmt.nnz == 0:
        return torch.zeros(0, dtype=out_dtype, device=dy.device)
    ct = _compute_dtype(dy.dtype)
    pattern = weight_csr(torch.zeros(fmt.nnz, dtype=ct, device=dy.device), fmt)  # beta=0 still reads it
    out = torch.sparse.sampled_addmm(pattern, as_dtype(dy, ct).t().contiguous(), as_dtype(x, ct), beta=0.0)
    return as_dtype(out.values(), out_dtype)
