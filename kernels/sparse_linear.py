"""Triton kernels for a sparse linear layer ``Y = X W^T + b`` and its two gradients.

``W`` (``out_features x in_features`` = ``rows x cols`` of a :class:`~.format.SparseFormat`) is held as its compact
live ``values`` (length ``nnz``, CSR order) plus the format ``fmt`` built once per mask by
:func:`~.format.build_format`.

Public ops (tensors in, tensors out; no autograd)::

    sparse_linear_forward(x, values, fmt, bias=None, activation=None, *, out=None, config=None) -> y      (B, rows)
    sparse_linear_backward_input(dy, values, fmt, *, out=None, config=None) -> dx                    (B, cols)
    sparse_linear_backward_weight(dy, x, fmt, *, out_dtype=None, out=None, config=None) -> dvalues   (nnz,)

and their plain-torch references ``reference_forward``, ``reference_backward_input``,
``reference_backward_weight`` (dense-mask based, computed in float64, returned in the op's output dtype).

Design (see ``notes/sparse_linear.md``)
--------------------------------------
Every kernel works on *batch-minor* ("transposed") activations, so that each gather of a sparse index is one
contiguous vector over a block of the batch:

* forward          ``y_t[r, b]  = sum_{k in row_ptr[r]:row_ptr[r+1]}  values[k]          * x_t[col_idx[k], b]``
* input gradient   ``dx_t[c, b] = sum_{k in col_ptr[c]:col_ptr[c+1]}  values[t_perm[k]]  * dy_t[t_row_idx[k], b]``
* weight gradient  ``dvalues[k] = sum_b dy_t[row_idx[k], b] * x_t[col_idx[k], b]``     (a sampled dense-dense product)

The forward and the input gradient are one kernel (``_spmm_t_kernel``), with or without the ``t_perm``
indirection into the same ``values``: no per-step copy or transpose of the weights. One program computes
``BLOCK_R`` output rows (``r``, or ``c`` for the input gradient) for one block of ``BLOCK_B`` batch entries. The
rows are taken consecutively from ``fmt.row_order`` / ``fmt.col_order`` (longest first), so the rows of a program
have similar lengths and the longest rows start first. A program walks its rows' nonzeros ``BLOCK_K`` at a time,
gathering a ``(BLOCK_R, BLOCK_K, BLOCK_B)`` tile and accumulating in fp32 registers, and reduces over ``k`` once
at the end; bias and ReLU are applied in the epilogue. Programs are numbered batch-block-major, so the programs in
flight share one ``(n_in, BLOCK_B)`` slab of the dense operand in L2.

The weight gradient (``_sddmm_t_kernel``) gives each program ``BLOCK_NNZ`` consecutive live weights (perfect load
balance whatever the row lengths) and loops over the whole batch; consecutive live weights mostly share a row, so
the ``dy`` gathers mostly hit L1.

With ``activation="relu"`` the caller keeps ``y`` (or ``y > 0``) to mask ``dy`` before the two gradients.

Layouts: ``x`` may have any strides (:func:`prepare_operand` decides how it is read). A ``(B, n)`` tensor whose
batch stride is 1 (e.g. ``x_t.t()`` of a contiguous ``x_t``) is used as it is. Any other is either read in place
with its own strides, when it is small and feeds few gathers (``IN_PLACE_MAX_BYTES``, ``IN_PLACE_MAX_GATHERS``:
the uncoalesced reads then cost less than a second launch), or transposed once into a contiguous ``(n, B)``
copy. Outputs ``y`` and ``dx`` are allocated batch-minor, i.e. they are ``(B, n)`` tensors with strides ``(1, B)``
(``y.t()`` is contiguous), so a chain of sparse layers never transposes; pass ``out=`` to choose another layout.
So a LeNet-sized network's forward is one launch per layer, the first layer's row-major input included, and a
caller that runs both gradients (or the forward and the weight gradient) on one operand calls
:func:`prepare_operand` once and passes its result to each op, so that a copy, when one is needed, is made once.

The bias gradient is *not* fused: it is ``dy.sum(0)`` and is left to the caller.

Index contents (monotone pointers, indices in range) are trusted as built by ``build_format``; their lengths,
dtypes and devices are checked on every call (checking contents would need a device sync per step).
"""
from __future__ import annotations

import os

import torch
from torch.autograd.graph import increment_version

from ._triton import HAS_TRITON, autotune_bench, cdiv, check_launch, check_unit_stride, interpreting, offset_dtype
from .format import PANEL, SparseFormat, to_dense

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "sparse_linear_forward", "sparse_linear_backward_input", "sparse_linear_backward_weight", "prepare_operand",
    "reference_forward", "reference_backward_input", "reference_backward_weight",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BATCH_MAX = 2**31 - 1 - 4096  # a batch loop's index (int32 compiled) plus a block stays below 2**31
_REF_DTYPES = _FLOAT_DTYPES + (torch.float64,)
_ACTIVATIONS = (None, "relu")


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit(do_not_specialize=["nnz"])
    def _spmm_t_kernel(
        # sparse operand: pointers [n_out + 1], indices into the dense operand [nnz], values (via perm if HAS_PERM)
        ptr_ptr, idx_ptr, val_ptr, perm_ptr,
        # processing order of the output rows [n_out] (a permutation; longest rows first balances the load)
        order_ptr,
        # dense operand in_t[i, b], output out_t[o, b], bias [n_out]
        in_ptr, out_ptr, bias_ptr,
        # sizes (nnz is only the autotuner's key: a new mask is tuned anew)
        n_out, n_b, nnz,
        # strides (in elements)
        stride_in_i, stride_in_b,
        stride_out_o, stride_out_b,
        # meta-parameters
        HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, OFFSET: tl.constexpr,
    ):
        """out_t[o, b] = act(sum_{k in ptr[o]:ptr[o+1]} val[k or perm[k]] * in_t[idx[k], b] + bias[o]) for BLOCK_R
        output rows (consecutive in ``order``, hence of similar length) and one block of BLOCK_B batch entries."""
        pid = tl.program_id(0)
        n_rblk = tl.cdiv(n_out, BLOCK_R)
        # batch-block-major numbering: the programs in flight share one slab in_t[:, b-block] in L2
        pid_b = pid // n_rblk
        pid_r = pid % n_rblk

        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < n_out
        o = tl.load(order_ptr + offs_r, mask=mask_r, other=0).to(OFFSET)              # [BLOCK_R]
        start = tl.load(ptr_ptr + o, mask=mask_r, other=0).to(OFFSET)
        length = tl.load(ptr_ptr + o + 1, mask=mask_r, other=0).to(OFFSET) - start     # 0 for masked rows
        max_len = tl.max(length, axis=0)

        offs_b = pid_b.to(OFFSET) * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < n_b
        in_b = in_ptr + offs_b[None, None, :] * stride_in_b                              # [1, 1, BLOCK_B]

        acc = tl.zeros((BLOCK_R, BLOCK_K, BLOCK_B), dtype=tl.float32)
        for k0 in range(0, max_len, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk[None, :] < length[:, None]                                       # [BLOCK_R, BLOCK_K]
            offs_k = start[:, None] + kk[None, :]
            idx = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(OFFSET)
            if HAS_PERM:
                pos = tl.load(perm_ptr + offs_k, mask=mask_k, other=0).to(OFFSET)
                v = tl.load(val_ptr + pos, mask=mask_k, other=0.0)
            else:
                v = tl.load(val_ptr + offs_k, mask=mask_k, other=0.0)
            xt = tl.load(in_b + idx[:, :, None] * stride_in_i,
                         mask=mask_k[:, :, None] & mask_b[None, None, :], other=0.0)     # [BLOCK_R, BLOCK_K, BLOCK_B]
            acc += v.to(tl.float32)[:, :, None] * xt.to(tl.float32)

        y = tl.sum(acc, axis=1)                                                          # [BLOCK_R, BLOCK_B]
        if HAS_BIAS:
            y += tl.load(bias_ptr + o, mask=mask_r, other=0.0).to(tl.float32)[:, None]
        if RELU:
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
        out_ptrs = out_ptr + o[:, None] * stride_out_o + offs_b[None, :] * stride_out_b
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_b[None, :])

    @triton.jit
    def _sddmm_t_kernel(
        # CSR coordinates of the live weights [nnz]
        row_idx_ptr, col_idx_ptr,
        # dense operands dy_t[r, b], x_t[c, b]; output dvalues [nnz]
        dy_ptr, x_ptr, out_ptr,
        # sizes
        nnz, n_b,
        # strides (in elements)
        stride_dy_r, stride_dy_b,
        stride_x_c, stride_x_b,
        stride_out,
        # meta-parameters
        BLOCK_NNZ: tl.constexpr, BLOCK_B: tl.constexpr, OFFSET: tl.constexpr,
    ):
        """out[k] = sum_b dy_t[row_idx[k], b] * x_t[col_idx[k], b] for one block of BLOCK_NNZ live weights."""
        pid = tl.program_id(0).to(OFFSET)
        offs_k = pid * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
        mask_k = offs_k < nnz
        r = tl.load(row_idx_ptr + offs_k, mask=mask_k, other=0).to(OFFSET)
        c = tl.load(col_idx_ptr + offs_k, mask=mask_k, other=0).to(OFFSET)
        dy_rows = dy_ptr + r[:, None] * stride_dy_r
        x_rows = x_ptr + c[:, None] * stride_x_c

        acc = tl.zeros((BLOCK_NNZ, BLOCK_B), dtype=tl.float32)
        for b0 in range(0, n_b, BLOCK_B):
            offs_b = (b0 + tl.arange(0, BLOCK_B)).to(OFFSET)
            m = mask_k[:, None] & (offs_b < n_b)[None, :]
            g = tl.load(dy_rows + offs_b[None, :] * stride_dy_b, mask=m, other=0.0)
            a = tl.load(x_rows + offs_b[None, :] * stride_x_b, mask=m, other=0.0)
            acc += g.to(tl.float32) * a.to(tl.float32)

        dv = tl.sum(acc, axis=1)
        tl.store(out_ptr + offs_k * stride_out, dv.to(out_ptr.dtype.element_ty), mask=mask_k)

    @triton.jit
    def _slab_rows(order_ptr, pp_ptr, stride_pp, chunk, n_chunks, t, n_mine, j0, j1, OFFSET: tl.constexpr):
        """Rows ``order[chunk + t * n_chunks]`` of a slab program (t < n_mine) and their entries in base panels
        [j0, j1): (row, start, length), length 0 for masked rows."""
        mask_r = t < n_mine
        o = tl.load(order_ptr + chunk + t.to(OFFSET) * n_chunks, mask=mask_r, other=0).to(OFFSET)
        pp_o = pp_ptr + o * stride_pp
        start = tl.load(pp_o + j0, mask=mask_r, other=0).to(OFFSET)
        length = tl.load(pp_o + j1, mask=mask_r, other=0).to(OFFSET) - start
        return o, start, length

    @triton.jit
    def _slab_program(n_b, n_rows, n_panels, BLOCK_B: tl.constexpr, PANEL_STEP: tl.constexpr,
                      OFFSET: tl.constexpr):
        """What a slab program owns: batch block ``pid_b`` (offsets, mask), row chunk ``chunk`` of ``n_chunks``
        (``n_mine`` rows), and the number of panel sweeps ``n_steps``."""
        pid = tl.program_id(0)
        n_bblk = tl.cdiv(n_b, BLOCK_B)
        n_chunks = tl.num_programs(0) // n_bblk
        pid_b = pid % n_bblk
        chunk = pid // n_bblk
        offs_b = pid_b.to(OFFSET) * BLOCK_B + tl.arange(0, BLOCK_B)
        n_mine = tl.cdiv(n_rows - chunk, n_chunks)  # rows order[chunk], order[chunk + n_chunks], ...
        return pid_b, chunk, n_chunks, offs_b, offs_b < n_b, n_mine, tl.cdiv(n_panels, PANEL_STEP)

    @triton.jit(do_not_specialize=["nnz"])
    def _spmm_slab_kernel(
        # sparse operand: panel pointers [n_out, n_panels + 1], indices [nnz], values (via perm if HAS_PERM)
        pp_ptr, idx_ptr, val_ptr, perm_ptr,
        # processing order of the output rows [n_out]
        order_ptr,
        # dense operand in_t[i, b]; fp32 partial sums ws_t[o, b] (may be out_t itself); output out_t[o, b]; bias
        in_ptr, ws_ptr, out_ptr, bias_ptr,
        # sizes (n_panels: base panels of the pointer table; nnz is only the autotuner's key)
        n_out, n_b, nnz, n_panels,
        # strides (in elements)
        stride_pp,
        stride_in_i, stride_in_b,
        stride_ws_o, stride_ws_b,
        stride_out_o, stride_out_b,
        # meta-parameters: PANEL_STEP base panels of columns per sweep
        HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, PANEL_STEP: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, OFFSET: tl.constexpr,
    ):
        """The forward / input gradient of ``_spmm_t_kernel`` with reuse of the dense operand in L1: a program owns
        one block of BLOCK_B batch entries and every ``n_chunks``-th row (``n_chunks = num_programs / n_bblk``), and
        sweeps the columns one panel of PANEL_STEP base panels at a time. While it walks all its rows' entries in one
        panel, the gathers hit one ``(panel, BLOCK_B)`` slab of ``in_t`` (e.g. 1024 x 32 fp32 = 128 KB), which stays
        in the SM's L1, instead of reaching L2 for every live weight. Partial sums of all but the last panel go
        through ``ws_t`` in fp32 (each element read and written by the program that owns it); the last panel adds
        bias and ReLU and stores ``out_t``. The next row block's pointers are loaded before the current block's
        gathers, so that their latency overlaps the arithmetic."""
        _, chunk, n_chunks, offs_b, mask_b, n_mine, n_steps = _slab_program(n_b, n_out, n_panels, BLOCK_B,
                                                                             PANEL_STEP, OFFSET)
        in_b = in_ptr + offs_b[None, None, :] * stride_in_b                              # [1, 1, BLOCK_B]
        for s in range(0, n_steps):
            # the partial sums this program stored in the last sweep are read back by whichever of its threads the
            # load's layout assigns: a barrier makes every thread's stores visible to all of them
            tl.debug_barrier()
            j0 = s * PANEL_STEP
            j1 = tl.minimum(j0 + PANEL_STEP, n_panels)
            o, start, length = _slab_rows(order_ptr, pp_ptr, stride_pp, chunk, n_chunks, tl.arange(0, BLOCK_R),
                                          n_mine, j0, j1, OFFSET)
            for t0 in range(0, n_mine, BLOCK_R):
                o_next, start_next, length_next = _slab_rows(order_ptr, pp_ptr, stride_pp, chunk, n_chunks,
                                                             t0 + BLOCK_R + tl.arange(0, BLOCK_R), n_mine, j0, j1,
                                                             OFFSET)
                acc = tl.zeros((BLOCK_R, BLOCK_K, BLOCK_B), dtype=tl.float32)
                for k0 in range(0, tl.max(length, axis=0), BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    mask_k = kk[None, :] < length[:, None]
                    offs_k = start[:, None] + kk[None, :]
                    idx = tl.load(idx_ptr + offs_k, mask=mask_k, other=0).to(OFFSET)
                    if HAS_PERM:
                        pos = tl.load(perm_ptr + offs_k, mask=mask_k, other=0).to(OFFSET)
                        v = tl.load(val_ptr + pos, mask=mask_k, other=0.0)
                    else:
                        v = tl.load(val_ptr + offs_k, mask=mask_k, other=0.0)
                    xt = tl.load(in_b + idx[:, :, None] * stride_in_i,
                                 mask=mask_k[:, :, None] & mask_b[None, None, :], other=0.0)
                    acc += v.to(tl.float32)[:, :, None] * xt.to(tl.float32)

                y = tl.sum(acc, axis=1)                                                  # [BLOCK_R, BLOCK_B]
                mask_r = t0 + tl.arange(0, BLOCK_R) < n_mine
                mask_y = mask_r[:, None] & mask_b[None, :]
                ws_ptrs = ws_ptr + o[:, None] * stride_ws_o + offs_b[None, :] * stride_ws_b
                if s > 0:
                    y += tl.load(ws_ptrs, mask=mask_y, other=0.0)
                if s == n_steps - 1:
                    if HAS_BIAS:
                        y += tl.load(bias_ptr + o, mask=mask_r, other=0.0).to(tl.float32)[:, None]
                    if RELU:
                        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
                    out_ptrs = out_ptr + o[:, None] * stride_out_o + offs_b[None, :] * stride_out_b
                    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_y)
                else:
                    tl.store(ws_ptrs, y, mask=mask_y)
                o, start, length = o_next, start_next, length_next

    @triton.jit(do_not_specialize=["nnz"])
    def _sddmm_slab_kernel(
        # panel pointers [n_rows, n_panels + 1] into the CSR positions, column indices [nnz], row order [n_rows]
        pp_ptr, col_idx_ptr, order_ptr,
        # dense operands dy_t[r, b], x_t[c, b]; fp32 partial sums part[b-block, nnz]
        dy_ptr, x_ptr, part_ptr,
        # sizes
        n_rows, n_b, nnz, n_panels,
        # strides (in elements)
        stride_pp,
        stride_dy_r, stride_dy_b,
        stride_x_c, stride_x_b,
        stride_part,
        # meta-parameters
        PANEL_STEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
        OFFSET: tl.constexpr,
    ):
        """The weight gradient with the same L1 reuse as ``_spmm_slab_kernel``: the program of batch block ``pb``
        and row chunk ``chunk`` sweeps the columns panel by panel and writes, for every live weight ``k`` of its
        rows, ``part[pb, k] = sum_{b in block pb} dy_t[row(k), b] * x_t[col(k), b]``; the caller sums ``part`` over
        the batch blocks. Each row's ``dy_t`` vector is loaded once per panel and broadcast over its entries."""
        pid_b, chunk, n_chunks, offs_b, mask_b, n_mine, n_steps = _slab_program(n_b, n_rows, n_panels, BLOCK_B,
                                                                                 PANEL_STEP, OFFSET)
        x_b = x_ptr + offs_b[None, None, :] * stride_x_b
        part_b = part_ptr + pid_b.to(OFFSET) * stride_part
        for s in range(0, n_steps):
            j0 = s * PANEL_STEP
            j1 = tl.minimum(j0 + PANEL_STEP, n_panels)
            r, start, length = _slab_rows(order_ptr, pp_ptr, stride_pp, chunk, n_chunks, tl.arange(0, BLOCK_R),
                                          n_mine, j0, j1, OFFSET)
            for t0 in range(0, n_mine, BLOCK_R):
                r_next, start_next, length_next = _slab_rows(order_ptr, pp_ptr, stride_pp, chunk, n_chunks,
                                                             t0 + BLOCK_R + tl.arange(0, BLOCK_R), n_mine, j0, j1,
                                                             OFFSET)
                g = tl.load(dy_ptr + r[:, None, None] * stride_dy_r + offs_b[None, None, :] * stride_dy_b,
                            mask=(length > 0)[:, None, None] & mask_b[None, None, :],
                            other=0.0).to(tl.float32)                                    # [BLOCK_R, 1, BLOCK_B]
                for k0 in range(0, tl.max(length, axis=0), BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    mask_k = kk[None, :] < length[:, None]
                    offs_k = start[:, None] + kk[None, :]
                    c = tl.load(col_idx_ptr + offs_k, mask=mask_k, other=0).to(OFFSET)
                    a = tl.load(x_b + c[:, :, None] * stride_x_c,
                                mask=mask_k[:, :, None] & mask_b[None, None, :], other=0.0)
                    tl.store(part_b + offs_k, tl.sum(a.to(tl.float32) * g, axis=2), mask=mask_k)
                r, start, length = r_next, start_next, length_next

    # Autotuning (compiled GPU runs only; the interpreter uses the fixed heuristic configs below). The key holds
    # nnz, so a new mask (a new IMP round) is tuned anew: a few configs, once per layer and round.
    _SPMM_CONFIGS = [
        # (BLOCK_R, BLOCK_K, BLOCK_B, num_warps); BLOCK_R * BLOCK_K * BLOCK_B <= 32 fp32 accumulators per thread
        (8, 16, 16, 4), (4, 16, 32, 4), (4, 16, 64, 4), (2, 32, 64, 4), (1, 32, 64, 2),
        (2, 16, 128, 4), (1, 32, 128, 4), (1, 16, 256, 4),
    ]
    _SDDMM_CONFIGS = [
        # (BLOCK_NNZ, BLOCK_B, num_warps)
        (32, 32, 2), (64, 32, 4), (32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8),
    ]
    # The slab kernels (compiled GPU runs, variant "auto" on large problems: timed against the gather kernel by
    # _pick). A slab is PANEL_STEP * PANEL columns x BLOCK_B batch entries of the dense operand; 128 KB of it fits
    # an H100 SM's L1 next to a small shared-memory carve-out. BLOCK_B * element size = 128 B makes each gather one
    # whole cache line.
    _SPMM_SLAB_CONFIGS = {  # by element size of the dense operand
        # (PANEL_STEP, BLOCK_R, BLOCK_K, BLOCK_B, num_warps, OCC): OCC programs per SM share its L1; every tile holds
        # 32 elements per thread (sm_90 compile report: larger tiles spill at 255 registers)
        4: [(8, 16, 16, 32, 8, 1),    # 1024 x 32 fp32 = 128 KB, line-wide gathers, 4 panels over 4096 columns
            (4, 4, 16, 32, 4, 2),     # 512 x 32 = 64 KB, two programs per SM, twice the partial-sum passes
                                      # (BLOCK_R 8 spilled 8-16 B at 168 registers, triton 3.8)
            (16, 16, 16, 16, 4, 1)],  # 2048 x 16 = 128 KB, half-line gathers, half the partial-sum passes
        2: [(8, 8, 16, 64, 8, 1),     # 1024 x 64 bf16 = 128 KB, line-wide gathers
            (4, 4, 16, 64, 4, 2),     # 512 x 64 = 64 KB, two programs per SM
            (16, 16, 16, 32, 8, 1)],  # 2048 x 32 = 128 KB, half-line gathers
    }
    _SDDMM_SLAB_CONFIGS = {  # the partial sums are (n_b / BLOCK_B) x nnz fp32
        4: [(4, 16, 8, 64, 8, 1),     # 512 x 64 fp32 = 128 KB
            (2, 8, 8, 64, 4, 2)],     # 256 x 64 = 64 KB, two programs per SM
        2: [(8, 8, 8, 64, 4, 1),      # 1024 x 64 bf16 = 128 KB (8 warps spilled on sm_90a)
            (4, 8, 8, 64, 4, 2)],     # 512 x 64 = 64 KB, two programs per SM
    }
    _tuned: dict = {}

# Which kernel computes an op: "gather" (_spmm_t_kernel / _sddmm_t_kernel: every live weight gathers its B-vector
# from L2), "slab" (the *_slab_kernels: one panel of the dense operand stays in L1 while a program sweeps all its
# rows), or "auto": on a GPU with autotuning on, an op that gathers at least SLAB_MIN_GATHERS elements (nnz * B)
# times the gather kernel and every slab configuration once per problem and keeps the fastest (variant_choices()
# lists what it chose); smaller ops, the interpreter and SPARSE_LTH_AUTOTUNE=0 use the gather kernel.
# $SPARSE_LTH_LINEAR_VARIANT sets the default (read at import: DEFAULT_VARIANT below).
VARIANTS = ("auto", "gather", "slab")
SLAB_MIN_GATHERS = 1 << 25
_SLAB_NAMES = ("PANEL_STEP", "BLOCK_R", "BLOCK_K", "BLOCK_B")
_choices: dict = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Environment knobs, read once when this module is imported (as TRITON_INTERPRET is): a read at every launch cost
# ~2 us each, one or two per launch. A running process changes them through these attributes.
AUTOTUNE = os.environ.get("SPARSE_LTH_AUTOTUNE", "1") not in ("0", "")   # $SPARSE_LTH_AUTOTUNE=0: heuristic configs
DEFAULT_VARIANT = os.environ.get("SPARSE_LTH_LINEAR_VARIANT", "auto") or "auto"   # variant=None means this


def _autotune_enabled() -> bool:
    return AUTOTUNE and not interpreting()


def _times_variants() -> bool:
    """Does variant "auto" time the gather and slab kernels against each other? Where autotuning runs (compiled)."""
    return _autotune_enabled()


def _b_cap(n_b: int) -> int:
    """Largest useful batch block for a batch of n_b (at least 32, so that every tuned list is non-empty)."""
    return max(32, _next_pow2(n_b))


def _spmm_heuristic(n_b: int) -> dict:
    block_b = min(128, max(16, _next_pow2(n_b)))
    if interpreting():  # few, large programs and steps: the interpreter's cost is per program and per step
        return {"BLOCK_R": 32, "BLOCK_K": 64, "BLOCK_B": min(block_b, 64), "num_warps": 4}
    block_r = min(8, max(1, 256 // block_b))
    return {"BLOCK_R": block_r, "BLOCK_K": min(32, max(8, 4096 // (block_r * block_b))), "BLOCK_B": block_b,
            "num_warps": 4}


def _sddmm_heuristic(n_b: int) -> dict:
    block_b = min(128, max(16, _next_pow2(n_b)))
    if interpreting():
        return {"BLOCK_NNZ": 256, "BLOCK_B": min(block_b, 64), "num_warps": 4}
    return {"BLOCK_NNZ": 64 if block_b <= 64 else 32, "BLOCK_B": block_b, "num_warps": 4}


def _slab_heuristic(n_b: int, element_size: int, sddmm: bool) -> dict:
    if interpreting():  # several panels, chunks and row blocks on small test shapes, few interpreted steps
        return {"PANEL_STEP": 1, "BLOCK_R": 16, "BLOCK_K": 16, "BLOCK_B": min(64, max(16, _next_pow2(n_b))),
                "num_warps": 4}
    # forward / input gradient: a cache line per gather; weight gradient: 64 (128 bf16 spilled on sm_90a)
    block_b = min(64 if sddmm else 128 // element_size, max(16, _next_pow2(n_b)))
    step = max(1, (128 << 10) // (PANEL * block_b * element_size))                       # a 128 KB slab
    # fewer warps for narrow batch blocks and for the weight gradient: their 8-warp tiles spilled on sm_90a
    if sddmm:
        block_k, warps = 8, (4 if block_b >= 64 else 2)
    else:
        block_k, warps = 16, (8 if block_b >= 32 else 4)
    block_r = max(1, min(16, 32 * 32 * warps // (block_k * block_b)))                    # 32 elements per thread
    return {"PANEL_STEP": step, "BLOCK_R": block_r, "BLOCK_K": block_k, "BLOCK_B": block_b, "num_warps": warps}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (3 elsewhere, so that the interpreted tests meet several row
    chunks)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _slab_meta(config: dict | None, n_b: int, n_rows: int, dtype, device, sddmm: bool, op: str) -> tuple[dict, int]:
    """(meta-parameters, row chunks) of a slab launch. The grid is ``ceil(n_b / BLOCK_B) * chunks`` programs;
    ``config`` may hold ``OCC`` (programs per SM meant to share its L1, default 1: chunks fill the SMs that many
    times over) or ``CHUNKS`` (the row chunks themselves)."""
    config = None if config is None else dict(config)
    chunks = None if config is None else config.pop("CHUNKS", None)
    occ = 1 if config is None else config.pop("OCC", 1)
    elem = torch.empty((), dtype=dtype).element_size()
    meta = _meta(config, _slab_heuristic(n_b, elem, sddmm), _SLAB_NAMES, op)
    for name, v in (("CHUNKS", chunks), ("OCC", occ)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{op}: config[{name!r}] must be a positive int, got {v!r}")
    if chunks is None:
        chunks = cdiv(_sm_count(device) * occ, cdiv(n_b, meta["BLOCK_B"]))
    return meta, max(1, min(chunks, n_rows))


def _resolve_variant(variant, config, op: str) -> str:
    if variant is None:
        variant = DEFAULT_VARIANT
    if variant not in VARIANTS:
        raise ValueError(f"{op}: variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "auto" and config is not None:  # an explicit config names its kernel
        variant = "slab" if "PANEL_STEP" in config else "gather"
    return variant


def variant_choices() -> dict:
    """What ``variant="auto"`` chose for each problem timed so far: ``{problem: (variant, config, {candidate:
    median ms})}``, with problem = (op, n_out, n_in, batch, nnz, dtype, batch-minor input, device)."""
    return dict(_choices)


def _bench_ms(fn) -> float:
    import triton.testing

    bench = autotune_bench()
    if bench is None:
        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
    else:
        q = bench(fn, quantiles=[0.5])
    return float(q[0] if isinstance(q, (list, tuple)) else q)


def _pick(problem: tuple, candidates: list) -> tuple:
    """The fastest of ``candidates`` [(variant, config, run)] for ``problem``, timed once (each run is the whole op,
    its extra launches included) and remembered; returns (variant, config)."""
    if problem not in _choices:
        times = []
        for variant, cfg, run in candidates:
            try:
                run()  # compile (and, for the gather kernel, autotune) outside the timing
                times.append((_bench_ms(run), variant, cfg))
            except Exception:  # noqa: BLE001 - e.g. a slab config out of registers on this GPU: not a candidate
                if variant == "gather":  # the kernel every op can fall back on must work
                    raise
                times.append((float("inf"), variant, cfg))
        _, variant, cfg = min(times, key=lambda t: t[0])
        _choices[problem] = (variant, cfg, {f"{v} {c}" if c else v: ms for ms, v, c in times})
    variant, cfg, _ = _choices[problem]
    return variant, cfg


def _slab_candidates(configs: dict, run, n_b: int, dtype) -> list:
    cfgs = [{"PANEL_STEP": p, "BLOCK_R": r, "BLOCK_K": k, "BLOCK_B": b, "num_warps": w, "OCC": occ}
            for p, r, k, b, w, occ in configs.get(torch.empty((), dtype=dtype).element_size(), [])
            if b <= _b_cap(n_b)]
    return [("slab", cfg, lambda cfg=cfg: run("slab", cfg)) for cfg in cfgs]


def _dispatch(variant: str, config, problem: tuple, gathers: int, run, slab_configs) -> None:
    """Run the op through ``run(variant, config)`` with the kernel that ``variant`` names (see VARIANTS)."""
    if variant == "auto":
        if config is None and gathers >= SLAB_MIN_GATHERS and _times_variants():
            variant, config = _pick(problem, [("gather", None, lambda: run("gather", None))]
                                    + _slab_candidates(slab_configs, run, problem[3], problem[5]))
        else:
            variant = "gather"
    run(variant, config)


def _tuned_kernel(kind: str, n_b: int):
    cap = _b_cap(n_b)
    key = (kind, cap)
    if key not in _tuned:
        if kind == "spmm":
            cfgs = [triton.Config({"BLOCK_R": r, "BLOCK_K": k, "BLOCK_B": b}, num_warps=w)
                    for r, k, b, w in _SPMM_CONFIGS if b <= cap]
            # HAS_PERM tells the input gradient (transposed format) from the forward, whose sizes are the same for
            # a square layer but whose row lengths are not: each gets its own tuned configuration
            _tuned[key] = triton.autotune(configs=cfgs, key=["n_out", "n_b", "nnz", "HAS_PERM"],
                                         do_bench=autotune_bench())(_spmm_t_kernel)
        else:
            cfgs = [triton.Config({"BLOCK_NNZ": k, "BLOCK_B": b}, num_warps=w) for k, b, w in _SDDMM_CONFIGS
                    if b <= cap]
            _tuned[key] = triton.autotune(configs=cfgs, key=["nnz", "n_b"], do_bench=autotune_bench())(_sddmm_t_kernel)
    return _tuned[key]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------
def _check_fmt(fmt, op: str) -> None:
    if not isinstance(fmt, SparseFormat):
        raise TypeError(f"{op}: fmt must be a SparseFormat (from build_format), got {type(fmt).__name__}")
    try:
        fmt.validate()
    except ValueError as e:
        raise ValueError(f"{op}: invalid SparseFormat: {e}") from None
    if fmt.rows < 0 or fmt.cols < 0 or fmt.nnz < 0 or fmt.nnz > fmt.rows * fmt.cols:
        raise ValueError(f"{op}: invalid SparseFormat sizes rows={fmt.rows} cols={fmt.cols} nnz={fmt.nnz}")


def _check_dense(t, name: str, shape: tuple, op: str, dtypes=_FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {want}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: " + ", ".join(str(d) for d in dtypes))
    if t.dim() == 1:
        check_unit_stride(t, name, op)


def _check_same_dtype(op: str, **named) -> None:
    dts = {k: v.dtype for k, v in named.items() if v is not None}
    if len(set(dts.values())) > 1:
        raise TypeError(f"{op}: dtypes must match: " + ", ".join(f"{k}={d}" for k, d in dts.items()))


def _check_devices(op: str, fmt: SparseFormat, **named) -> None:
    devs = {k: v.device for k, v in named.items() if v is not None}
    devs["fmt"] = fmt.device
    if len(set(devs.values())) > 1:
        where = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"{op}: tensors are on different devices: {where}")


def _check_out(out, shape: tuple, dtype, device, op: str, *inputs) -> None:
    """``out=``: of the result's shape, dtype and device; every element its own memory (an expanded, stride-0
    buffer made every row the last one written), none of it the inputs' (the kernels read them while they write:
    an ``out`` that was ``x`` gave wrong results on a GPU's many programs), and no tensor that requires grad while
    grad is enabled (as torch's ops with ``out=``)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{op}: out is {tuple(out.shape)} {out.dtype} on {out.device}, "
                         f"expected {tuple(shape)} {dtype} on {device}")
    if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)):
        raise ValueError(f"{op}: out has a zero stride (an expanded tensor): its elements share memory")
    if out.requires_grad and torch.is_grad_enabled():  # (as torch's out= ops: fine under no_grad)
        raise ValueError(f"{op}: out requires grad; the kernels' writes are not differentiable")
    for t in inputs:
        if t is not None and _overlap(out, t):
            raise ValueError(f"{op}: out shares memory with an input, which the kernel reads while it writes")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``t`` can touch, [first, last), from its data pointer and strides."""
    lo = hi = 0
    for n, st in zip(t.shape, t.stride()):
        if n > 1:
            if st > 0:
                hi += (n - 1) * st
            else:
                lo += (n - 1) * st
    p, size = t.data_ptr(), t.element_size()
    return p + lo * size, p + (hi + 1) * size


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _check_activation(activation, op: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")


# A (B, n) operand without unit batch stride (a row-major input batch, a loss gradient) is read in place, with its
# own strides, when it is at most IN_PLACE_MAX_BYTES and the kernel gathers at most IN_PLACE_MAX_GATHERS of its
# elements (nnz * B); otherwise it is first copied batch-minor. In place, each gathered element of a row-major
# operand is its own 32-byte sector (8x the traffic of a coalesced fp32 gather), but the operand stays in L1/L2:
# 2M sectors spread over an H100's 132 SMs at ~4 sectors per clock take ~2 us, about what the transpose copy's
# extra launch costs. These are estimates from arithmetic, not GPU measurements (none was available when they were
# set); bench_linear_gpu.py's LeNet rows include whichever of the two a layer takes.
IN_PLACE_MAX_BYTES = 1 << 20
IN_PLACE_MAX_GATHERS = 1 << 21


def _batch_minor_copy(t: torch.Tensor) -> torch.Tensor:
    """A (B, n) copy of t with strides (1, B): one transpose launch."""
    return t.t().contiguous().t()


def prepare_operand(t: torch.Tensor, nnz: int) -> torch.Tensor:
    """The ``(B, n)`` tensor the kernels should be given for a ``(B, n)`` activation or gradient ``t`` that feeds
    ``nnz`` gathers of a ``B``-vector each: ``t`` itself when it is batch-minor (unit batch stride, e.g. a sparse
    layer's output) or small enough to read in place, else a batch-minor copy. The kernels call it on every dense
    operand; its result passes through a second call unchanged, so a caller that feeds one operand to two ops calls it
    once and pays for at most one copy."""
    if t.dim() != 2 or t.shape[0] <= 1 or t.stride(0) == 1:
        return t
    if (t.numel() * t.element_size() <= IN_PLACE_MAX_BYTES
            and max(int(nnz), 1) * t.shape[0] <= IN_PLACE_MAX_GATHERS):
        return t
    return _batch_minor_copy(t)


def _alloc_batch_minor(n_b: int, n: int, dtype, device) -> torch.Tensor:
    """A (B, n) tensor with strides (1, B): its transpose is contiguous. Not a view (an autograd Function's output
    that is a view of a tensor made inside it would have to be detached)."""
    return torch.empty_strided((n_b, n), (1, n_b), dtype=dtype, device=device)


def _meta(config: dict | None, default: dict, names: tuple, op: str) -> dict:
    if config is None:
        return default
    meta = dict(config)
    meta.setdefault("num_warps", 4)
    missing = [n for n in names if n not in meta]
    extra = [n for n in meta if n not in names + ("num_warps", "num_stages")]
    if missing or extra:
        raise ValueError(f"{op}: config needs keys {names} (+ num_warps, num_stages); "
                         f"missing {missing}, unknown {extra}")
    for n in names:
        v = meta[n]
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"{op}: config[{n!r}] must be a power of two, got {v!r}")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _launch_spmm(ptr, idx, vals, perm, order, inp, out, bias, relu, n_out, n_b, nnz, config, op):
    """out (n_b, n_out), inp (n_b, n_in), any strides; all checked by the caller. The kernel indexes them as
    in_t[i, b] and out_t[o, b]: their strides are passed swapped (no transposed views made per launch)."""
    if n_out == 0 or n_b == 0:
        return
    has_perm = perm is not None
    args = (ptr, idx, vals, perm if has_perm else idx, order, inp, out, bias if bias is not None else out)
    strides = (inp.stride(1), inp.stride(0), out.stride(1), out.stride(0))
    flags = dict(HAS_PERM=has_perm, HAS_BIAS=bias is not None, RELU=relu,
                 OFFSET=offset_dtype(inp, out, counts=(nnz, n_out)))
    if config is None and _autotune_enabled():
        kern = _tuned_kernel("spmm", n_b)
        grid = lambda meta: (cdiv(n_out, meta["BLOCK_R"]) * cdiv(n_b, meta["BLOCK_B"]),)  # noqa: E731
        kern[grid](*args, n_out, n_b, nnz, *strides, **flags)
        return
    meta = _meta(config, _spmm_heuristic(n_b), ("BLOCK_R", "BLOCK_K", "BLOCK_B"), op)
    grid = (cdiv(n_out, meta["BLOCK_R"]) * cdiv(n_b, meta["BLOCK_B"]),)
    _spmm_t_kernel[grid](*args, n_out, n_b, nnz, *strides, **flags, **meta)


def _launch_spmm_slab(pp, idx, vals, perm, order, inp, out, bias, relu, n_out, n_b, nnz, config, op):
    """The slab kernel (inp, out as for :func:`_launch_spmm`); partial sums of all but the last panel go through
    out when it is fp32, else through an fp32 workspace."""
    if n_out == 0 or n_b == 0:
        return
    meta, chunks = _slab_meta(config, n_b, n_out, vals.dtype, out.device, False, op)
    n_pan = pp.shape[1] - 1
    ws = out
    if n_pan > meta["PANEL_STEP"] and out.dtype != torch.float32:
        ws = _alloc_batch_minor(n_b, n_out, torch.float32, out.device)
    has_perm = perm is not None
    grid = (cdiv(n_b, meta["BLOCK_B"]) * chunks,)
    _spmm_slab_kernel[grid](
        pp, idx, vals, perm if has_perm else idx, order, inp, ws, out, bias if bias is not None else out,
        n_out, n_b, nnz, n_pan, pp.stride(0), inp.stride(1), inp.stride(0), ws.stride(1), ws.stride(0),
        out.stride(1), out.stride(0), HAS_PERM=has_perm, HAS_BIAS=bias is not None, RELU=relu,
        OFFSET=offset_dtype(inp, out, ws, pp, counts=(nnz, n_out)), **meta)


def _spmm(kind, ptr, pp, idx, vals, perm, order, inp, out, bias, relu, n_out, n_b, nnz, config, variant, op):
    """The forward (kind "fwd") or input gradient ("bwd_input") through the kernel ``variant`` names; ``inp``
    (n_b, n_in) and ``out`` (n_b, n_out)."""
    def run(v, cfg):
        if v == "slab":
            _launch_spmm_slab(pp, idx, vals, perm, order, inp, out, bias, relu, n_out, n_b, nnz, cfg, op)
        else:
            _launch_spmm(ptr, idx, vals, perm, order, inp, out, bias, relu, n_out, n_b, nnz, cfg, op)

    problem = (kind, n_out, inp.shape[1], n_b, nnz, vals.dtype, inp.stride(0) == 1, inp.device)
    _dispatch(variant, config, problem, nnz * n_b, run, _SPMM_SLAB_CONFIGS if HAS_TRITON else {})


def sparse_linear_forward(x, values, fmt, bias=None, activation=None, *, out=None, config=None, variant=None):
    """``y = act(x @ W^T + bias)`` with ``W`` the sparse ``(rows, cols)`` weight held as ``(values, fmt)``.

    x: ``(B, cols)`` float32/float16/bfloat16, any strides; values: ``(nnz,)`` of x's dtype; bias: ``(rows,)`` of
    x's dtype or None; activation: None or ``"relu"`` (fused). Accumulates in fp32. Returns ``y`` ``(B, rows)`` of
    x's dtype, allocated batch-minor (``y.t()`` contiguous) unless ``out`` (any strides) is given.
    ``config``: explicit meta-parameters instead of autotuning, ``{"BLOCK_R", "BLOCK_K", "BLOCK_B"[, "num_warps"]}``
    for the gather kernel, ``{"PANEL_STEP", "BLOCK_R", "BLOCK_K", "BLOCK_B"[, "num_warps", "CHUNKS"]}`` for the
    slab kernel. ``variant``: ``"auto"`` (default, or ``$SPARSE_LTH_LINEAR_VARIANT``), ``"gather"`` or ``"slab"``
    (see ``VARIANTS``).
    """
    op = "sparse_linear_forward"
    variant = _resolve_variant(variant, config, op)
    check_forward_args(x, values, fmt, bias, activation, out=out, op=op)
    y = _forward(x, values, fmt, bias, activation == "relu", out, config, variant, op)
    if out is not None:  # written behind autograd's back: a graph that saved it must see it changed
        increment_version(out)
    return y


def check_forward_args(x, values, fmt, bias=None, activation=None, *, out=None, op="sparse_linear_forward",
                       dtypes=_FLOAT_DTYPES, launch: bool = True) -> None:
    """The argument checks of :func:`sparse_linear_forward` (clear errors for bad input), without the launch.
    ``dtypes`` and ``launch=False`` (whether Triton can launch on the tensors' device is not checked): the same
    checks for the torch backend, which also takes float64."""
    _check_fmt(fmt, op)
    _check_activation(activation, op)
    _check_dense(x, "x", (None, fmt.cols), op, dtypes)
    _check_dense(values, "values", (fmt.nnz,), op, dtypes)
    if bias is not None:
        _check_dense(bias, "bias", (fmt.rows,), op, dtypes)
    _check_same_dtype(op, x=x, values=values, bias=bias)
    _check_devices(op, fmt, x=x, values=values, bias=bias, out=out)
    if launch:
        check_launch(x, values, bias, fmt.row_ptr, op=op)  # fmt validated: its tensors all on fmt.device
    if out is not None:
        _check_out(out, (x.shape[0], fmt.rows), x.dtype, x.device, op, x, values, bias)


def _forward(x, values, fmt, bias, relu, out, config, variant, op):
    n_b = x.shape[0]
    if out is None:
        out = _alloc_batch_minor(n_b, fmt.rows, x.dtype, x.device)
    _spmm("fwd", fmt.row_ptr, fmt.row_panel_ptr, fmt.col_idx, values, None, fmt.row_order,
          prepare_operand(x, fmt.nnz), out, bias, relu, fmt.rows, n_b, fmt.nnz, config, variant, op)
    return out


def sparse_linear_backward_input(dy, values, fmt, *, out=None, config=None, variant=None):
    """``dx = dy @ W`` through the transposed (CSC) view ``(col_ptr, t_row_idx, t_perm)`` into the same ``values``.

    dy: ``(B, rows)``, any strides; values: ``(nnz,)`` of dy's dtype. Returns ``dx`` ``(B, cols)`` of dy's dtype,
    allocated batch-minor unless ``out`` is given. ``config``, ``variant``: as for :func:`sparse_linear_forward`.
    """
    op = "sparse_linear_backward_input"
    variant = _resolve_variant(variant, config, op)
    _check_fmt(fmt, op)
    _check_dense(dy, "dy", (None, fmt.rows), op)
    _check_dense(values, "values", (fmt.nnz,), op)
    _check_same_dtype(op, dy=dy, values=values)
    _check_devices(op, fmt, dy=dy, values=values, out=out)
    check_launch(dy, values, fmt.row_ptr, op=op)
    if out is not None:
        _check_out(out, (dy.shape[0], fmt.cols), dy.dtype, dy.device, op, dy, values)
    dx = _backward_input(dy, values, fmt, out, config, variant, op)
    if out is not None:
        increment_version(out)
    return dx


def _backward_input(dy, values, fmt, out, config, variant, op):
    n_b = dy.shape[0]
    if out is None:
        out = _alloc_batch_minor(n_b, fmt.cols, dy.dtype, dy.device)
    _spmm("bwd_input", fmt.col_ptr, fmt.col_panel_ptr, fmt.t_row_idx, values, fmt.t_perm, fmt.col_order,
          prepare_operand(dy, fmt.nnz), out, None, False, fmt.cols, n_b, fmt.nnz, config, variant, op)
    return out


def sparse_linear_backward_weight(dy, x, fmt, *, out_dtype=None, out=None, config=None, variant=None):
    """``dvalues[k] = sum_b dy[b, row_idx[k]] * x[b, col_idx[k]]``: the weight gradient at the live positions only.

    dy: ``(B, rows)``, x: ``(B, cols)``, same dtype, any strides. Accumulates in fp32; returns ``(nnz,)`` in
    ``out_dtype`` (default: dy's dtype; float32 keeps full precision for bf16/fp16 inputs).
    ``config``: ``{"BLOCK_NNZ", "BLOCK_B"[, "num_warps"]}`` for the gather kernel, ``{"PANEL_STEP", "BLOCK_R",
    "BLOCK_K", "BLOCK_B"[, "num_warps", "CHUNKS"]}`` for the slab kernel, whose fp32 partial sums per batch block
    (``ceil(B / BLOCK_B) x nnz``) are summed by one torch reduction. ``variant``: as for
    :func:`sparse_linear_forward`.
    """
    op = "sparse_linear_backward_weight"
    variant = _resolve_variant(variant, config, op)
    _check_fmt(fmt, op)
    _check_dense(dy, "dy", (None, fmt.rows), op)
    _check_dense(x, "x", (dy.shape[0] if isinstance(dy, torch.Tensor) else None, fmt.cols), op)
    _check_same_dtype(op, dy=dy, x=x)
    out_dtype = dy.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    _check_devices(op, fmt, dy=dy, x=x, out=out)
    check_launch(dy, x, fmt.row_ptr, op=op)
    if out is not None:
        _check_out(out, (fmt.nnz,), out_dtype, dy.device, op, dy, x)
    dv = _backward_weight(dy, x, fmt, out_dtype, out, config, variant, op)
    if out is not None:
        increment_version(out)
    return dv


def _backward_weight(dy, x, fmt, out_dtype, out, config, variant, op):
    if out is None:
        out = torch.empty(fmt.nnz, dtype=out_dtype, device=dy.device)
    n_b = dy.shape[0]
    if fmt.nnz == 0:
        return out
    if n_b == 0:
        return out.zero_()
    if n_b > _BATCH_MAX:  # the kernels' batch loop counts in int32 (compiled): b0 + BLOCK_B must not wrap
        raise ValueError(f"{op}: a batch of {n_b} rows overflows the kernels' int32 batch loop "
                         f"(at most {_BATCH_MAX}); split the batch")
    dy, x = prepare_operand(dy, fmt.nnz), prepare_operand(x, fmt.nnz)

    def run(v, cfg):
        if v == "slab":
            _launch_sddmm_slab(fmt, dy, x, out, n_b, cfg, op)
        else:
            _launch_sddmm(fmt, dy, x, out, n_b, cfg, op)

    problem = ("bwd_weight", fmt.rows, fmt.cols, n_b, fmt.nnz, dy.dtype, x.stride(0) == 1, out.device)
    _dispatch(variant, config, problem, fmt.nnz * n_b, run, _SDDMM_SLAB_CONFIGS if HAS_TRITON else {})
    return out


# The three ops for sparse-lth's autograd Function (functional.SparseLinearFunction), without the argument checks
# above: the Function's callers (SparseLinear, which validated its format when the mask was set and holds values
# and bias of its sizes, and checks each input's features, dtype and device; functional.sparse_linear, which runs
# check_forward_args) have made them, and in the backward autograd gives dy the output's shape, dtype and device.
# What stays is one device check (a tensor where Triton cannot run gets a clear error, not a crash in the launcher).
# On a LeNet-300-100 step that is ~5 us less host time per launch (benchmarks/bench_host_overhead.py).
def forward_trusted(x, values, fmt, bias=None, activation=None):
    op = "sparse_linear_forward"
    check_launch(x, values, op=op)
    if values.dtype not in _FLOAT_DTYPES:  # e.g. a model made .double(): the kernels would round it to fp32
        _check_dense(values, "values", (fmt.nnz,), op)
    return _forward(x, values, fmt, bias, activation == "relu", None, None, _resolve_variant(None, None, op), op)


def backward_input_trusted(dy, values, fmt):
    op = "sparse_linear_backward_input"
    check_launch(dy, values, op=op)
    return _backward_input(dy, values, fmt, None, None, _resolve_variant(None, None, op), op)


def backward_weight_trusted(dy, x, fmt, out_dtype=None):
    op = "sparse_linear_backward_weight"
    check_launch(dy, x, op=op)
    return _backward_weight(dy, x, fmt, dy.dtype if out_dtype is None else out_dtype, None, None,
                            _resolve_variant(None, None, op), op)


def _launch_sddmm(fmt, dy, x, out, n_b, config, op):
    """dy (n_b, rows), x (n_b, cols), any strides (passed swapped: the kernel indexes dy_t[r, b], x_t[c, b])."""
    args = (fmt.row_idx, fmt.col_idx, dy, x, out, fmt.nnz, n_b,
            dy.stride(1), dy.stride(0), x.stride(1), x.stride(0), out.stride(0))
    offset = offset_dtype(dy, x, out, counts=(fmt.nnz,))
    if config is None and _autotune_enabled():
        kern = _tuned_kernel("sddmm", n_b)
        kern[lambda meta: (cdiv(fmt.nnz, meta["BLOCK_NNZ"]),)](*args, OFFSET=offset)
        return
    meta = _meta(config, _sddmm_heuristic(n_b), ("BLOCK_NNZ", "BLOCK_B"), op)
    _sddmm_t_kernel[(cdiv(fmt.nnz, meta["BLOCK_NNZ"]),)](*args, OFFSET=offset, **meta)


def _launch_sddmm_slab(fmt, dy, x, out, n_b, config, op):
    """The slab kernel's partial sums per batch block (dy, x as for :func:`_launch_sddmm`), then their sum into
    ``out``."""
    meta, chunks = _slab_meta(config, n_b, fmt.rows, dy.dtype, out.device, True, op)
    n_bblk = cdiv(n_b, meta["BLOCK_B"])
    part = torch.empty((n_bblk, fmt.nnz), dtype=torch.float32, device=out.device)
    pp = fmt.row_panel_ptr
    _sddmm_slab_kernel[(n_bblk * chunks,)](
        pp, fmt.col_idx, fmt.row_order, dy, x, part, fmt.rows, n_b, fmt.nnz, pp.shape[1] - 1, pp.stride(0),
        dy.stride(1), dy.stride(0), x.stride(1), x.stride(0), part.stride(0),
        OFFSET=offset_dtype(dy, x, part, pp, counts=(fmt.nnz,)), **meta)
    if out.dtype == torch.float32 and out.is_contiguous():
        torch.sum(part, 0, out=out)
    else:
        out.copy_(part.sum(0))


# ----------------------------------------------------------------------------------------------------------------
# Plain-torch references (dense mask, float64)
# ----------------------------------------------------------------------------------------------------------------
def _dense64(values, fmt) -> torch.Tensor:
    return to_dense(values.detach().to(torch.float64), fmt)


def reference_forward(x, values, fmt, bias=None, activation=None):
    """``act(x @ W^T + bias)`` through the dense masked weight, in float64; returned in x's dtype."""
    op = "reference_forward"
    _check_fmt(fmt, op)
    _check_activation(activation, op)
    _check_dense(x, "x", (None, fmt.cols), op, _REF_DTYPES)
    _check_dense(values, "values", (fmt.nnz,), op, _REF_DTYPES)
    if bias is not None:
        _check_dense(bias, "bias", (fmt.rows,), op, _REF_DTYPES)
    _check_devices(op, fmt, x=x, values=values, bias=bias)
    y = x.detach().to(torch.float64) @ _dense64(values, fmt).t()
    if bias is not None:
        y = y + bias.detach().to(torch.float64)
    if activation == "relu":
        y = torch.relu(y)
    return y.to(x.dtype)


def reference_backward_input(dy, values, fmt):
    """``dy @ W`` through the dense masked weight, in float64; returned in dy's dtype."""
    op = "reference_backward_input"
    _check_fmt(fmt, op)
    _check_dense(dy, "dy", (None, fmt.rows), op, _REF_DTYPES)
    _check_dense(values, "values", (fmt.nnz,), op, _REF_DTYPES)
    _check_devices(op, fmt, dy=dy, values=values)
    return (dy.detach().to(torch.float64) @ _dense64(values, fmt)).to(dy.dtype)


def reference_backward_weight(dy, x, fmt, *, out_dtype=None):
    """``(dy^T @ x)`` at the live positions (CSR order), in float64; returned in ``out_dtype`` (default dy's)."""
    op = "reference_backward_weight"
    _check_fmt(fmt, op)
    _check_dense(dy, "dy", (None, fmt.rows), op, _REF_DTYPES)
    _check_dense(x, "x", (dy.shape[0], fmt.cols), op, _REF_DTYPES)
    _check_devices(op, fmt, dy=dy, x=x)
    g = dy.detach().to(torch.float64).t() @ x.detach().to(torch.float64)
    return g[fmt.row_idx.long(), fmt.col_idx.long()].to(dy.dtype if out_dtype is None else out_dtype)
