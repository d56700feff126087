"""The ``torch`` backend's sparse conv2d: a direct sparse convolution from ``torch.sparse`` CSR products, no im2col.

The weight ``(C_out, C_in, kh, kw)`` is the layer's ``values`` and :class:`~.format.SparseFormat` (CSR over
``(C_out, C_in*kh*kw)``, column ``ci*kh*kw + ky*kw + kx``), regrouped once per mask by :func:`build_conv_taps`
into one ``C_out x C_in`` CSR matrix per kernel tap ``(ky, kx)`` that has a live weight.

**Shifts instead of im2col.** The input is copied once into a zero-padded, channel-major grid ``(C_in, N, Hq, Wq)``
flattened to ``(C_in, L)``. On that grid the input pixel a tap reads for output pixel ``j`` (flattened over
``(N, Hq, Wq)`` with the same row pitch) is pixel ``j + off(tap)``: every tap is one CSR product with the grid
buffer viewed ``off`` elements further on, a *contiguous* ``(C_in, L)`` view (a column slice would be copied
inside ``torch.sparse``'s products), accumulated into the output grid, ``Y += W_tap @ X[off:]``; grid pixels that
are no output are computed and thrown away. For stride 1 with padding no wider than the kernel's reach (the
usual "same" conv) rows share their padding columns and images their padding rows, so an image takes
``(H + p_h) x (W + p_w)`` grid pixels. With stride ``s > 1`` the padded input is split once into its
``s_h * s_w`` phases (``x[..., a::s_h, b::s_w]``) and each tap reads a shifted view of one phase. Dilation only
changes the offsets. Memory traffic per op is one pass over the grid per tap instead of im2col's ``kh*kw``-fold
copy of the input, and the products skip pruned weights.

* :func:`conv2d_forward`: ``y = conv2d(x, W) + b``.
* :func:`conv2d_backward_input`: ``dx``, the transposed products ``dX[off:] += W_tap^T @ dY`` on the output-gradient
  grid (zero at every pixel that is no output), then the phases put back and the padding cut.
* :func:`conv2d_backward_weight`: the weight gradient at the live positions only, one sampled dense-dense
  product (``torch.sparse.sampled_addmm``) per tap between the output-gradient grid and the shifted input view.

The :class:`~sparse_lth.functional.SparseConv2dFunction` of the torch backend uses the grid-level functions
(:func:`input_grid`, :func:`forward_grid`, :func:`grad_output_grid`, ...): one output-gradient grid serves both
gradients; the weight gradient builds the input grid again from the saved input rather than keep the forward's
(a padded copy of the input held through the backward) alive.
CPU sparse products exist for float32/float64 only; other dtypes are computed in float32 and cast back.
"""
from __future__ import annotations

import dataclasses
import operator
import warnings

import torch

from ._conv_geometry import check_fmt, check_tensor4, check_values, geometry, out_size
from .format import SparseFormat
from .torch_ops import _compute_dtype

__all__ = [
    "ConvTaps", "ShiftGrid", "build_conv_taps", "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
    "compute_dtype", "input_grid", "forward_grid", "grad_output_grid", "backward_input_grid", "backward_weight_grid",
]

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _alloc(shape, dtype, device) -> torch.Tensor:
    """The uninitialized outputs of these ops come from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU sparse products run in (the linear ops' rule: float32/float64, else float32)."""
    return _compute_dtype(dtype)


@dataclasses.dataclass(frozen=True)
class ConvTaps:
    """A conv weight's live entries grouped by kernel tap (built once per mask by :func:`build_conv_taps`).

    ``taps``: the ``(ky, kx)`` that have live weights; tap ``i``'s entries are positions ``bounds[i]:bounds[i+1]``
    of two orderings of the live values: ``perm`` (by tap, output channel, input channel; ``crow[i]`` and ``col``
    form tap ``i``'s ``C_out x C_in`` CSR) and ``t_perm`` (by tap, input channel, output channel; ``t_crow[i]``
    and ``t_col``: the transposed ``C_in x C_out`` CSR). ``perm[k]`` is the index into ``values``."""

    kernel_size: tuple[int, int]
    c_out: int
    c_in: int
    nnz: int
    taps: tuple[tuple[int, int], ...]
    bounds: tuple[int, ...]
    perm: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    t_perm: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.perm.device


def build_conv_taps(fmt: SparseFormat, kernel_size) -> ConvTaps:
    """Group the live weights of a conv format by kernel tap (two argsorts of ``nnz`` keys; once per mask)."""
    k = geometry(kernel_size, 1, 0, 1)[0]
    c_in = check_fmt(fmt, k, "build_conv_taps")
    khw = k[0] * k[1]
    rows = fmt.rows
    row = fmt.row_idx.long()
    col = fmt.col_idx.long()
    tap = col % khw
    ci = col // khw
    perm = torch.argsort((tap * rows + row) * c_in + ci)  # keys are distinct: no stability needed
    t_perm = torch.argsort((tap * c_in + ci) * rows + row)
    counts = torch.bincount(tap, minlength=khw).tolist()
    live = [t for t in range(khw) if counts[t]]
    bounds = [0]
    for t in live:
        bounds.append(bounds[-1] + counts[t])

    # int32 indices (what MKL's sparse products take; int64 ones are converted at every call) unless one tap's
    # nnz could pass 2**31
    idx = torch.int32 if rows * c_in < 2**31 else torch.int64

    def ptrs(major: torch.Tensor, n_major: int) -> torch.Tensor:
        c = torch.bincount(tap * n_major + major, minlength=khw * n_major).view(khw, n_major)[live]
        return torch.cat([c.new_zeros(len(live), 1), c.cumsum(1)], 1).to(idx)

    return ConvTaps(kernel_size=k, c_out=rows, c_in=c_in, nnz=fmt.nnz,
                    taps=tuple((t // k[1], t % k[1]) for t in live), bounds=tuple(bounds),
                    perm=perm, crow=ptrs(row, rows), col=ci[perm].to(idx),
                    t_perm=t_perm, t_crow=ptrs(ci, c_in), t_col=row[t_perm].to(idx))


class ShiftGrid:
    """The geometry of one input shape: output size, the padded (phase) grid and each tap's phase and offset."""

    def __init__(self, x_shape, taps: ConvTaps, stride, padding, dilation, op: str = "conv2d"):
        k, s, p, d = geometry(taps.kernel_size, stride, padding, dilation)
        n, c, h, w = x_shape
        if c != taps.c_in:
            raise ValueError(f"{op}: the input has {c} channels, the weight {taps.c_in}")
        self.n, self.c, self.h, self.w = n, c, h, w
        self.k, self.s, self.p, self.d = k, s, p, d
        self.oh, self.ow = out_size(h, w, k, s, p, d, op)
        reach_h, reach_w = d[0] * (k[0] - 1), d[1] * (k[1] - 1)  # how far a tap reaches, in input pixels
        self.phases = s[0] * s[1]
        # Stride 1 with padding no wider than the reach ("same" or "valid" convs, the usual case): neighbouring
        # rows share their zero padding columns and neighbouring images their zero padding rows, so an image
        # takes (H + p_h) x (W + p_w) grid pixels (VGG-19's 2x2 layers: 9 instead of 16): a pixel left of column
        # 0 is the previous row's padding, one above row 0 the previous image's; ``lead`` zeros in front of the
        # buffer stand in for both before the first row. Otherwise each phase holds every padded output's reach
        # on its own (the padding written inside each image's block).
        self.shared = self.phases == 1 and p[0] <= reach_h and p[1] <= reach_w
        if self.shared:
            self.hq, self.wq = h + p[0], w + p[1]
            self.lead, self.row0, self.col0 = p[0] * self.wq + p[1], 0, 0
        else:
            self.hq, self.wq = self.oh + reach_h // s[0], self.ow + reach_w // s[1]  # each phase's rows, columns
            self.lead, self.row0, self.col0 = 0, p[0], p[1]
        self.length = n * self.hq * self.wq
        self.c_len = c * self.length
        # the phase and the offset of every tap with live weights
        self.tap_at = [(((ky * d[0]) % s[0]) * s[1] + (kx * d[1]) % s[1],
                        ((ky * d[0]) // s[0]) * self.wq + (kx * d[1]) // s[1]) for ky, kx in taps.taps]
        # zeros after the last channel, so that the farthest tap's shifted view ends inside the buffer
        self.tail = max(0, (reach_h // s[0]) * self.wq + reach_w // s[1] - self.lead)
        # the input rows/columns that lie in the grid (the rest is never read)
        self.h_in = max(0, min(h, self.hq * s[0] - self.row0))
        self.w_in = max(0, min(w, self.wq * s[1] - self.col0))


def _shifted(buf: torch.Tensor, phase: int, off: int, grid: ShiftGrid) -> torch.Tensor:
    """Phase ``phase`` of a grid buffer seen ``off`` pixels further on: a contiguous ``(C, L)`` view whose row
    ``c`` reads, for output pixel ``j``, the input pixel tap ``off`` needs (channel ``c``'s data starts ``lead``
    elements into its row). Near the end of a row the view runs into the next channel (or the buffer's zero
    tail): only grid pixels that are no output read there."""
    return buf[phase, off:off + grid.c_len].view(grid.c, grid.length)


def input_grid(x: torch.Tensor, grid: ShiftGrid, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (N, C, H, W) as the zero-padded phase grid buffer ``(phases, C * L + tail)`` in ``dtype`` (one copy;
    two when strided); :func:`_shifted` views it per tap."""
    g = grid
    s0, s1 = g.s
    buf = x.new_zeros((g.phases, g.lead + g.c_len + g.tail), dtype=dtype)
    if g.phases == 1:
        xp = buf[0, g.lead:g.lead + g.c_len].view(g.c, g.n, g.hq, g.wq)
    else:
        xp = x.new_zeros((g.c, g.n, g.hq * s0, g.wq * s1), dtype=dtype)
    if g.h_in and g.w_in:
        xp[:, :, g.row0:g.row0 + g.h_in, g.col0:g.col0 + g.w_in] = x[:, :, :g.h_in, :g.w_in].transpose(0, 1)
    if g.phases > 1:
        buf[:, :g.c_len].view(s0, s1, g.c, g.n, g.hq, g.wq).copy_(
            xp.view(g.c, g.n, g.hq, s0, g.wq, s1).permute(3, 5, 0, 1, 2, 4))
    return buf


def _tap_csr(values: torch.Tensor, taps: ConvTaps, i: int, transposed: bool) -> torch.Tensor:
    a, b = taps.bounds[i], taps.bounds[i + 1]
    if transposed:
        return torch.sparse_csr_tensor(taps.t_crow[i], taps.t_col[a:b], values[a:b], (taps.c_in, taps.c_out),
                                       check_invariants=False)
    return torch.sparse_csr_tensor(taps.crow[i], taps.col[a:b], values[a:b], (taps.c_out, taps.c_in),
                                   check_invariants=False)


def onednn_safe_input(x: torch.Tensor, kernel_size, stride) -> torch.Tensor:
    """``x`` for a CPU convolution's weight gradient: NCHW-contiguous where oneDNN's AVX2 1x1 backward-weights
    kernel would otherwise get it non-contiguous (channels_last) with a stride above 1. That kernel writes past its
    workspace when the input has fewer channels than its block (uxlfoundation/oneDNN#6035): wrong weight gradients,
    heap corruption, crashes or hangs, seen with torch 2.14.1 on an AVX2 host (3 input channels). One copy of the
    input, in this case only (any channel count: the block differs between instruction sets)."""
    if (x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous() and tuple(kernel_size) == (1, 1)
            and any(s > 1 for s in stride)):
        return x.contiguous()
    return x


def channels_last(x: torch.Tensor) -> bool:
    """Whether ``nn.Conv2d`` gives a channels_last output for input ``x``: ``x.suggest_memory_format()`` is
    channels_last, by c10's rule on the strides (``is_contiguous`` cannot tell a one-channel or 1x1-pixel tensor's
    two layouts apart; the strides still can)."""
    if x.dim() != 4 or x.stride(1) == 0:
        return False
    shape, strides = x.shape, x.stride()
    lo = 0
    for d in (1, 3, 2, 0):  # C fastest, then W, H, N
        if shape[d] == 0 or strides[d] < lo or (d == 0 and lo == strides[1]):
            return False
        lo = strides[d] * shape[d]
    return True


def forward_grid(xg: torch.Tensor, values: torch.Tensor, taps: ConvTaps, grid: ShiftGrid,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, last: bool = False) -> torch.Tensor:
    """``y`` (N, C_out, OH, OW) from the input grid buffer of :func:`input_grid`: contiguous, or channels_last
    with ``last`` (as ``nn.Conv2d`` gives for a channels_last input; the same one strided copy)."""
    g = grid
    yg = xg.new_zeros((taps.c_out, g.length))
    v = values.to(xg.dtype)[taps.perm]  # one gather of nnz values into tap order
    for i, (phase, off) in enumerate(g.tap_at):
        yg.addmm_(_tap_csr(v, taps, i, False), _shifted(xg, phase, off, g))
    if last:
        out = _alloc((g.n, g.oh, g.ow, taps.c_out), out_dtype, xg.device).permute(0, 3, 1, 2)
    else:
        out = _alloc((g.n, taps.c_out, g.oh, g.ow), out_dtype, xg.device)
    out.copy_(yg.view(taps.c_out, g.n, g.hq, g.wq)[:, :, :g.oh, :g.ow].transpose(0, 1))
    if bias is not None:
        out += bias.to(out_dtype).view(1, -1, 1, 1)
    return out


def grad_output_grid(dy: torch.Tensor, grid: ShiftGrid, dtype: torch.dtype) -> torch.Tensor:
    """``dy`` (N, C_out, OH, OW) on the output grid ``(C_out, L)``, zero at every pixel that is not an output."""
    g = grid
    c_out = dy.shape[1]
    dyg = dy.new_zeros((c_out, g.n, g.hq, g.wq), dtype=dtype)
    dyg[:, :, :g.oh, :g.ow] = dy.transpose(0, 1)
    return dyg.view(c_out, g.length)


def backward_input_grid(dyg: torch.Tensor, values: torch.Tensor, taps: ConvTaps, grid: ShiftGrid,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """``dx`` (N, C_in, H, W), contiguous, from the output-gradient grid of :func:`grad_output_grid`."""
    g = grid
    s0, s1 = g.s
    dbuf = dyg.new_zeros((g.phases, g.lead + g.c_len + g.tail))
    v = values.to(dyg.dtype)[taps.t_perm]
    for i, (phase, off) in enumerate(g.tap_at):
        # grid pixels that are no output carry a zero dyg: what they add is zero
        _shifted(dbuf, phase, off, g).addmm_(_tap_csr(v, taps, i, True), dyg)
    if g.phases == 1:
        dxp = dbuf[0, g.lead:g.lead + g.c_len].view(g.c, g.n, g.hq, g.wq)
    else:
        dxp = dbuf[:, :g.c_len].view(s0, s1, g.c, g.n, g.hq, g.wq).permute(2, 3, 4, 0, 5, 1).reshape(
            g.c, g.n, g.hq * s0, g.wq * s1)
    if g.h_in == g.h and g.w_in == g.w:
        dx = _alloc((g.n, g.c, g.h, g.w), out_dtype, dyg.device)
    else:  # input rows/columns that no output reads get a zero gradient
        dx = torch.zeros((g.n, g.c, g.h, g.w), dtype=out_dtype, device=dyg.device)
    if g.h_in and g.w_in:
        dx[:, :, :g.h_in, :g.w_in] = dxp[:, :, g.row0:g.row0 + g.h_in, g.col0:g.col0 + g.w_in].transpose(0, 1)
    return dx


def backward_weight_grid(dyg: torch.Tensor, xg: torch.Tensor, taps: ConvTaps, grid: ShiftGrid,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """``dvalues`` (nnz,) in the order of ``values``: the weight gradient at the live positions only."""
    g = grid
    dv_taps = _alloc(taps.nnz, dyg.dtype, dyg.device)
    zeros = dyg.new_zeros(taps.nnz)  # the patterns' values: beta=0 still reads them
    for i, (phase, off) in enumerate(g.tap_at):
        a, b = taps.bounds[i], taps.bounds[i + 1]
        # full-length contiguous operands (sliced ones are copied inside sampled_addmm, ~10x slower); the
        # grid pixels that are no output pair a zero of dyg with whatever the shifted view holds there: real
        # input pixels of the next row or image, so an inf or NaN in the input makes 0 * inf = NaN in taps that
        # never read it (a dense conv's gradient is finite there; the input was non-finite already: left so)
        dv_taps[a:b] = torch.sparse.sampled_addmm(_tap_csr(zeros, taps, i, False), dyg,
                                                  _shifted(xg, phase, off, g).t(), beta=0.0).values()
    out = _alloc(taps.nnz, out_dtype, dyg.device)
    out[taps.perm] = dv_taps.to(out_dtype)
    return out


# ------------------------------------------------------------------------------------- standalone ops, checked
def _check(op, t, name, values, taps):
    check_tensor4(t, name, op, _DTYPES)
    if not isinstance(taps, ConvTaps):
        raise TypeError(f"{op}: taps must be a ConvTaps (build_conv_taps(fmt, kernel_size)), got "
                        f"{type(taps).__name__}")
    if values is not None:
        check_values(values, taps, t.dtype, op)
    devs = {t.device, taps.device} | ({values.device} if values is not None else set())
    if len(devs) != 1:
        raise ValueError(f"{op}: tensors are on different devices: {sorted(str(d) for d in devs)}")


def conv2d_forward(x, values, taps: ConvTaps, bias=None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """``conv2d(x, W, bias, stride, padding, dilation)`` for x (N, C_in, H, W), W given by ``values`` and ``taps``."""
    op = "torch_conv.conv2d_forward"
    _check(op, x, "x", values, taps)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (taps.c_out,):
            raise ValueError(f"{op}: bias must be a tensor of shape ({taps.c_out},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device}, x on {x.device}")
    g = ShiftGrid(x.shape, taps, stride, padding, dilation, op)
    ct = compute_dtype(x.dtype)
    return forward_grid(input_grid(x, g, ct), values, taps, g, bias, x.dtype, channels_last(x))


def conv2d_backward_input(dy, values, taps: ConvTaps, input_shape, stride=1, padding=0, dilation=1):
    """``dx`` (``input_shape``) of the convolution, given ``dy`` (N, C_out, OH, OW)."""
    op = "torch_conv.conv2d_backward_input"
    _check(op, dy, "dy", values, taps)
    try:
        input_shape = tuple(operator.index(v) for v in input_shape)
    except TypeError:
        raise TypeError(f"{op}: input_shape must be a sequence of 4 ints, got {input_shape!r}") from None
    if len(input_shape) != 4:
        raise ValueError(f"{op}: input_shape must be (N, C_in, H, W), got {input_shape}")
    g = ShiftGrid(input_shape, taps, stride, padding, dilation, op)
    _check_dy(op, dy, g, taps)
    ct = compute_dtype(dy.dtype)
    return backward_input_grid(grad_output_grid(dy, g, ct), values, taps, g, dy.dtype)


def conv2d_backward_weight(dy, x, taps: ConvTaps, stride=1, padding=0, dilation=1, out_dtype=None):
    """The weight gradient at the live positions (``values``' order), given ``dy`` and the input ``x``."""
    op = "torch_conv.conv2d_backward_weight"
    _check(op, dy, "dy", None, taps)
    _check(op, x, "x", None, taps)
    if dy.dtype != x.dtype:
        raise TypeError(f"{op}: dy has dtype {dy.dtype}, x {x.dtype}; they must match")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"{op}: out_dtype must be a floating dtype, got {out_dtype}")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"{op}: dy has batch {dy.shape[0]}, x {x.shape[0]}")
    g = ShiftGrid(x.shape, taps, stride, padding, dilation, op)
    _check_dy(op, dy, g, taps)
    ct = compute_dtype(x.dtype)
    return backward_weight_grid(grad_output_grid(dy, g, ct), input_grid(x, g, ct), taps, g,
                                x.dtype if out_dtype is None else out_dtype)


def _check_dy(op, dy, g: ShiftGrid, taps: ConvTaps):
    want = (g.n, taps.c_out, g.oh, g.ow)
    if tuple(dy.shape) != want:
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, expected {want} (input {(g.n, g.c, g.h, g.w)}, "
                         f"kernel_size {g.k}, stride {g.s}, padding {g.p}, dilation {g.d})")
