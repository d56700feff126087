"""Argument checks and output geometry shared by the conv ops of every backend (Triton and torch); no Triton here."""
from __future__ import annotations

import torch

from ._triton import check_unit_stride
from .format import SparseFormat

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pair(v, name: str, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints as a pair, each at least ``minimum`` (clear errors otherwise)."""
    # the usual cases first: every conv op call normalizes four of these
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        if v[0] >= minimum and v[1] >= minimum:
            return v
    elif type(v) is int and v >= minimum:
        return (v, v)
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    try:
        v = tuple(v)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(v) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def geometry(kernel_size, stride, padding, dilation):
    """``(kernel_size, stride, padding, dilation)``, each checked and as a pair."""
    return (pair(kernel_size, "kernel_size", minimum=1), pair(stride, "stride", minimum=1),
            pair(padding, "padding", minimum=0), pair(dilation, "dilation", minimum=1))


def out_size(h, w, k, s, p, d, op):
    """The output height and width of a convolution (an empty output is refused)."""
    oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{op}: input {h}x{w} with kernel_size {k}, stride {s}, padding {p}, dilation {d} gives "
                         f"an empty output ({oh}x{ow})")
    return oh, ow


def _names(dtypes) -> str:
    names = [str(t).removeprefix("torch.") for t in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_tensor4(t, name, op, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {_names(dtypes)}, got {t.dtype}")


def check_fmt(fmt, k, op) -> int:
    """Validate ``fmt`` as a conv weight's format for kernel size ``k``; return C_in."""
    if not isinstance(fmt, SparseFormat):
        raise TypeError(f"{op}: fmt must be a SparseFormat (kernels.format.build_format), got {type(fmt).__name__}")
    fmt.validate()
    khw = k[0] * k[1]
    if fmt.cols % khw != 0:
        raise ValueError(f"{op}: fmt has {fmt.cols} columns, not a multiple of kh*kw = {khw} "
                         f"(kernel_size {k}); expected cols = C_in*kh*kw")
    return fmt.cols // khw


def check_values(values, fmt, dtype, op, name="values"):
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1 or values.numel() != fmt.nnz:
        raise ValueError(f"{op}: {name} must be 1-D of length fmt.nnz = {fmt.nnz}, got shape {tuple(values.shape)}")
    if values.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {values.dtype}, the activations {dtype}; they must match")
    check_unit_stride(values, name, op)
