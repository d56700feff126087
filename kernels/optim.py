"""Mask-aware fused optimizer updates (SGD with momentum / Nesterov, Adam, AdamW, AMSGrad) in Triton.

One pass over memory per parameter: each element of the parameter, its gradient, its optimizer state and (on the
dense path) its 1-byte mask is read once and the parameter and state are written once. Where the mask is False the
gradient is ignored and the parameter and every state tensor are written as exact zeros, so a pruned weight, its
momentum / exp_avg / exp_avg_sq / max_exp_avg_sq stay 0 and no separate "mask the gradient" / "re-mask the weight"
passes are needed.

Multi-tensor ("foreach") launches: one kernel launch updates many parameters. The launcher writes a small int64
table with, per tensor, the addresses of its parameter, gradient, mask and state tensors and its length; and a
per-program table (tensor index, block index). Program ``pid`` loads its row, casts the addresses back to typed
pointers (``int64 -> tl.pointer_type``; this works compiled and in Triton's CPU interpreter, where CPU tensors are
used in place) and updates one block of ``BLOCK`` elements of one tensor. Per-tensor hyper-parameters (learning rate,
weight decay, bias corrections, ...) are a second, fp32 table, so parameter groups with different learning rates and
parameters with different Adam step counts share one launch. Tensors are split into launches only by what is a
compile-time constant: parameter dtype, mask / no mask, 16-byte alignment of every address, and the optimizer's
structural flags (momentum / nesterov / amsgrad / decoupled weight decay).

Parameters are float32, bfloat16 or float16; gradients have the parameter's dtype; state is always float32;
arithmetic is float32. bf16 results are rounded to nearest-even explicitly (bit arithmetic), because Triton's CPU
interpreter truncates on an fp32->bf16 cast while compiled Triton rounds; doing it by hand gives the same bits on both.

Public API (all update tensors in place and return the number of kernel launches made):

- :func:`fused_sgd_`  and its plain-torch reference :func:`sgd_reference_`
- :func:`fused_adam_` and its plain-torch reference :func:`adam_reference_`
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch.autograd.graph import increment_version

from ._triton import HAS_TRITON, check_launch

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - depends on the install
    triton = None
    tl = None

__all__ = ["fused_sgd_", "fused_adam_", "sgd_reference_", "adam_reference_", "PARAM_DTYPES", "DEFAULT_BLOCK"]

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.bool, torch.uint8)
DEFAULT_BLOCK = 1024

# Columns of the int64 pointer table (one row per tensor).
_C_PARAM, _C_GRAD, _C_MASK, _C_S0, _C_S1, _C_S2, _C_NUMEL, _C_STEP = range(8)
_PTR_COLS = 8
# Columns of the fp32 hyper-parameter tables (one row per tensor).
_SGD_COLS = 8   # lr, weight_decay, buf_coef, grad_coef, momentum
_ADAM_COLS = 16  # lr, weight_decay, beta1, 1-beta1, beta2, 1-beta2, step_size, sqrt(bias_correction2), eps, decay
_ADAM64_COLS = 4  # capturable Adam, fp64: lr, log2(beta1), log2(beta2)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    # Every program updates one block of BLOCK elements of one tensor. A block that lies wholly inside its tensor
    # (every block but a tensor's last) is updated without bounds masks (FULL): together with 16-byte aligned
    # pointers this lets the compiler use 16-byte vector loads and stores, which a bounds mask on an unknown
    # length would forbid. The last block of each tensor takes the masked path.
    @triton.jit
    def _ld(ptrs, offs, numel, FULL: tl.constexpr):
        if FULL:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs < numel, other=0)

    @triton.jit
    def _st(ptrs, val, offs, numel, FULL: tl.constexpr):
        if FULL:
            tl.store(ptrs, val)
        else:
            tl.store(ptrs, val, mask=offs < numel)

    @triton.jit
    def _round_to_param(p, PARAM_DTYPE: tl.constexpr):
        if PARAM_DTYPE == tl.bfloat16:
            # fp32 -> bf16 rounding to nearest even by hand: Triton's interpreter truncates on this cast while
            # compiled Triton rounds; this gives the same bits on both (and torch's)
            u = p.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            r = tl.where(p != p, 0x7FC0, r)  # NaN stays a quiet NaN
            return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return p.to(PARAM_DTYPE)

    @triton.jit
    def _program_block(ptr_table, prog_table, n_programs, BLOCK: tl.constexpr):
        """This program's tensor (index t, its row of the pointer table, its numel) and block of elements (offs),
        and whether the block lies wholly inside the tensor."""
        pid = tl.program_id(0)
        t = tl.load(prog_table + pid).to(tl.int64)
        blk = tl.load(prog_table + n_programs + pid).to(tl.int64)
        row = ptr_table + t * 8  # _PTR_COLS
        numel = tl.load(row + 6)  # _C_NUMEL
        offs = blk * BLOCK + tl.arange(0, BLOCK)  # int64: a tensor may hold more than 2**31 elements
        return t, row, numel, offs, (blk + 1) * BLOCK <= numel

    @triton.jit
    def _typed(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        """int64 address -> pointer to DTYPE; the alignment hint goes on the pointer (the compiler's alignment
        analysis does not carry a hint on the integer through the cast).

        The hint is 4 elements' worth of bytes (16 for fp32, 8 for bf16/fp16, 4 for the int8 mask), not the 16
        bytes every pointer really has: the compiler gives a fused elementwise block one register layout, the widest
        its loads allow, but caps each *store* at 16 bytes per thread. With 16-byte hints the int8 mask (16 per
        thread) or bf16 values (8) widened the fp32 loads beyond what the fp32 stores could take, and every block
        paid a layout conversion through 4 KB of shared memory (and a barrier). With 4 elements per thread for
        every tensor, all loads and stores share one layout: fp32 still moves 16 bytes per access."""
        ptr = addr.to(tl.pointer_type(DTYPE))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 4 * (DTYPE.primitive_bitwidth // 8))
        return ptr

    @triton.jit
    def _sgd_block(p_ptr, g_ptr, m_ptr, b_ptr, hyp, offs, numel,
                   PARAM_DTYPE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, FULL: tl.constexpr):
        lr = tl.load(hyp + 0)
        weight_decay = tl.load(hyp + 1)
        p = _ld(p_ptr + offs, offs, numel, FULL).to(tl.float32)
        g = _ld(g_ptr + offs, offs, numel, FULL).to(tl.float32)
        if HAS_MASK:
            # Live outputs never depend on pruned inputs, so masking every output (where, NaN-safe) is all it
            # takes: the gradient itself needs no masking.
            live = _ld(m_ptr + offs, offs, numel, FULL) != 0
        # torch.optim.SGD: d_p = g + wd * p, only where wd != 0 (0 * an inf weight is NaN: gradient and state
        # would take it, where torch.optim leaves the weight inf and its state finite)
        g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)
        if HAS_MOMENTUM:
            buf_coef = tl.load(hyp + 2)   # momentum, or 0 on a buffer's first step (buf = d_p)
            grad_coef = tl.load(hyp + 3)  # 1 - dampening, or 1 on the first step
            buf = _ld(b_ptr + offs, offs, numel, FULL)
            buf = buf * buf_coef + grad_coef * g
            if HAS_MASK:
                buf = tl.where(live, buf, 0.0)
            _st(b_ptr + offs, buf, offs, numel, FULL)
            if NESTEROV:
                momentum = tl.load(hyp + 4)
                g = g + momentum * buf
            else:
                g = buf
        p = p - lr * g
        if HAS_MASK:
            p = tl.where(live, p, 0.0)
        _st(p_ptr + offs, _round_to_param(p, PARAM_DTYPE), offs, numel, FULL)

    @triton.jit
    def _sgd_kernel(
        # Tables written by the launcher
        ptr_table,    # int64 [n_tensors, 8]: param, grad, mask, momentum buffer, -, -, numel, -
        hyper_table,  # fp32 [n_tensors, 8]: lr, weight_decay, buf_coef, grad_coef, momentum
        prog_table,   # int32 [2, n_programs]: tensor index, block index within that tensor
        n_programs,
        # Meta-parameters
        PARAM_DTYPE: tl.constexpr,   # tl.float32 / tl.bfloat16 / tl.float16 (the gradient's dtype too)
        HAS_MASK: tl.constexpr,      # dense-path parameters: read the 1-byte mask
        HAS_MOMENTUM: tl.constexpr,
        NESTEROV: tl.constexpr,
        ALIGNED: tl.constexpr,       # every address of this launch is a multiple of 16 bytes
        BLOCK: tl.constexpr,
    ):
        t, row, numel, offs, full = _program_block(ptr_table, prog_table, n_programs, BLOCK)
        hyp = hyper_table + t * 8  # _SGD_COLS
        # addresses from the table -> typed pointers
        p_ptr = _typed(tl.load(row + 0), PARAM_DTYPE, ALIGNED)
        g_ptr = _typed(tl.load(row + 1), PARAM_DTYPE, ALIGNED)
        m_ptr = _typed(tl.load(row + 2), tl.int8, ALIGNED)
        b_ptr = _typed(tl.load(row + 3), tl.float32, ALIGNED)
        if full:
            _sgd_block(p_ptr, g_ptr, m_ptr, b_ptr, hyp, offs, numel, PARAM_DTYPE, HAS_MASK, HAS_MOMENTUM, NESTEROV,
                       True)
        else:
            _sgd_block(p_ptr, g_ptr, m_ptr, b_ptr, hyp, offs, numel, PARAM_DTYPE, HAS_MASK, HAS_MOMENTUM, NESTEROV,
                       False)

    @triton.jit
    def _adam_block(p_ptr, g_ptr, mk_ptr, m1_ptr, m2_ptr, mx_ptr, hyp, step_size, bias_correction2_sqrt, offs,
                    numel, PARAM_DTYPE: tl.constexpr, HAS_MASK: tl.constexpr, AMSGRAD: tl.constexpr,
                    DECOUPLED: tl.constexpr, FULL: tl.constexpr):
        # step_size = lr / (1 - beta1**step), bias_correction2_sqrt = sqrt(1 - beta2**step): fp32 values
        weight_decay = tl.load(hyp + 1)
        one_minus_beta1 = tl.load(hyp + 3)
        beta2 = tl.load(hyp + 4)
        one_minus_beta2 = tl.load(hyp + 5)
        eps = tl.load(hyp + 8)
        p = _ld(p_ptr + offs, offs, numel, FULL).to(tl.float32)
        g = _ld(g_ptr + offs, offs, numel, FULL).to(tl.float32)
        exp_avg = _ld(m1_ptr + offs, offs, numel, FULL)
        exp_avg_sq = _ld(m2_ptr + offs, offs, numel, FULL)
        if HAS_MASK:  # outputs are masked below; the gradient itself needs no masking (see _sgd_block)
            live = _ld(mk_ptr + offs, offs, numel, FULL) != 0
        if DECOUPLED:
            decay = tl.load(hyp + 9)  # 1 - lr * wd
            p = p * decay
        else:
            g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)  # (only where wd != 0: see _sgd_block)
        # exp_avg.lerp_(g, 1 - beta1) as torch's lerp computes it: m + w (g - m) for a weight w < 0.5, else
        # g - (g - m)(1 - w) (exact at w = 1: beta1 = 0 gives g itself; an inf g gives NaN, as torch's);
        # exp_avg_sq = b2 * v + (1 - b2) g^2
        diff = g - exp_avg
        exp_avg = tl.where(one_minus_beta1 < 0.5, exp_avg + one_minus_beta1 * diff,
                           g - diff * (1.0 - one_minus_beta1))
        exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * (g * g)
        if HAS_MASK:
            exp_avg = tl.where(live, exp_avg, 0.0)
            exp_avg_sq = tl.where(live, exp_avg_sq, 0.0)
        _st(m1_ptr + offs, exp_avg, offs, numel, FULL)
        _st(m2_ptr + offs, exp_avg_sq, offs, numel, FULL)
        if AMSGRAD:
            max_sq = tl.maximum(_ld(mx_ptr + offs, offs, numel, FULL), exp_avg_sq,
                                propagate_nan=tl.PropagateNan.ALL)  # NaN kept, as torch.maximum
            if HAS_MASK:
                max_sq = tl.where(live, max_sq, 0.0)
            _st(mx_ptr + offs, max_sq, offs, numel, FULL)
            second = max_sq
        else:
            second = exp_avg_sq
        denom = tl.div_rn(tl.sqrt_rn(second), bias_correction2_sqrt) + eps
        p = p - step_size * tl.div_rn(exp_avg, denom)
        if HAS_MASK:
            p = tl.where(live, p, 0.0)
        _st(p_ptr + offs, _round_to_param(p, PARAM_DTYPE), offs, numel, FULL)

    @triton.jit
    def _adam_kernel(
        # Tables written by the launcher
        ptr_table,    # int64 [n_tensors, 8]: param, grad, mask, exp_avg, exp_avg_sq, max_exp_avg_sq, numel, step
        hyper_table,  # fp32 [n_tensors, 16]: lr, wd, beta1, 1-beta1, beta2, 1-beta2, step_size, sqrt(bc2), eps, decay
        hyper64_table,  # CAPTURABLE: fp64 [n_tensors, 4]: lr, log2(beta1), log2(beta2), -
        prog_table,   # int32 [2, n_programs]: tensor index, block index within that tensor
        n_programs,
        # Meta-parameters
        PARAM_DTYPE: tl.constexpr,   # tl.float32 / tl.bfloat16 / tl.float16 (the gradient's dtype too)
        HAS_MASK: tl.constexpr,      # dense-path parameters: read the 1-byte mask
        AMSGRAD: tl.constexpr,
        DECOUPLED: tl.constexpr,     # AdamW: p *= 1 - lr * wd instead of g += wd * p
        CAPTURABLE: tl.constexpr,    # the step count is read from the device (pointer table column 7)
        ALIGNED: tl.constexpr,       # every address of this launch is a multiple of 16 bytes
        BLOCK: tl.constexpr,
    ):
        t, row, numel, offs, full = _program_block(ptr_table, prog_table, n_programs, BLOCK)
        hyp = hyper_table + t * 16  # _ADAM_COLS
        if CAPTURABLE:
            # The bias corrections from the step count in device memory (float32, already incremented), in fp64
            # as torch.optim's non-capturable Adam computes them on the host: 1 - beta**step with
            # beta**step = exp2(step * log2(beta)), log2(beta) computed on the host in double. In fp32, 1 - beta2
            # alone would be off by ~1e-5 relative for beta2 = 0.999. A few fp64 operations per program.
            h64 = hyper64_table + t * 4  # _ADAM64_COLS
            step = tl.load(_typed(tl.load(row + 7), tl.float32, False)).to(tl.float64)
            bias_correction1 = 1.0 - tl.exp2(step * tl.load(h64 + 1))
            bias_correction2 = 1.0 - tl.exp2(step * tl.load(h64 + 2))
            step_size = (tl.load(h64 + 0) / bias_correction1).to(tl.float32)
            bias_correction2_sqrt = tl.sqrt(bias_correction2).to(tl.float32)
        else:
            step_size = tl.load(hyp + 6)
            bias_correction2_sqrt = tl.load(hyp + 7)
        # addresses from the table -> typed pointers
        p_ptr = _typed(tl.load(row + 0), PARAM_DTYPE, ALIGNED)
        g_ptr = _typed(tl.load(row + 1), PARAM_DTYPE, ALIGNED)
        mk_ptr = _typed(tl.load(row + 2), tl.int8, ALIGNED)
        m1_ptr = _typed(tl.load(row + 3), tl.float32, ALIGNED)
        m2_ptr = _typed(tl.load(row + 4), tl.float32, ALIGNED)
        mx_ptr = _typed(tl.load(row + 5), tl.float32, ALIGNED)
        if full:
            _adam_block(p_ptr, g_ptr, mk_ptr, m1_ptr, m2_ptr, mx_ptr, hyp, step_size, bias_correction2_sqrt, offs,
                        numel, PARAM_DTYPE, HAS_MASK, AMSGRAD, DECOUPLED, True)
        else:
            _adam_block(p_ptr, g_ptr, mk_ptr, m1_ptr, m2_ptr, mx_ptr, hyp, step_size, bias_correction2_sqrt, offs,
                        numel, PARAM_DTYPE, HAS_MASK, AMSGRAD, DECOUPLED, False)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if HAS_TRITON else {}


def _padded(row, cols: int) -> tuple[float, ...]:
    """A hyperparameter row as the kernel's table reads it: a tuple of ``cols`` floats (zeros after the values)."""
    return tuple(row) + (0.0,) * (cols - len(row))


def _sgd_hyper(lr, weight_decay, momentum, dampening, first: bool) -> tuple[float, ...]:
    """Per-tensor scalars of torch.optim.SGD's step, as the kernel's row: lr, weight_decay, buf_coef, grad_coef,
    momentum. ``first``: the buffer's first step (buf = d_p: buf_coef 0, grad_coef 1)."""
    lr, weight_decay, momentum, dampening = map(float, (lr, weight_decay, momentum, dampening))
    return _padded((lr, weight_decay, 0.0 if first else momentum, 1.0 if first else 1.0 - dampening, momentum),
                   _SGD_COLS)


def _per_tensor(value, n: int, name: str) -> list:
    """A scalar or a sequence of n scalars -> a list of n Python scalars."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: got {len(value)} values for {n} tensors")
        return list(value)
    return [value] * n


def _check_tensor_list(op: str, name: str, tensors, n: int, allow_none: bool = False) -> list:
    tensors = list(tensors) if tensors is not None else [None] * n
    if len(tensors) != n:
        raise ValueError(f"{op}: {name} has {len(tensors)} tensors for {n} parameters")
    for i, t in enumerate(tensors):
        if t is None:
            if not allow_none:
                raise ValueError(f"{op}: {name}[{i}] is None")
        elif not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a Tensor")
    return tensors


def _check_entry(op: str, i: int, p, g, mask, states) -> None:
    """Shapes, dtypes, layouts of one parameter's tensors; raise a clear error on anything the kernel can't take."""
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"{op}: params[{i}] has dtype {p.dtype}; supported: {PARAM_DTYPES}")
    if g.dtype != p.dtype:
        raise TypeError(f"{op}: grads[{i}] has dtype {g.dtype} but its parameter has {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"{op}: grads[{i}] has shape {tuple(g.shape)} but its parameter has {tuple(p.shape)}")
    if g.is_sparse or p.is_sparse:
        raise TypeError(f"{op}: sparse (torch.sparse) parameters or gradients are not supported")
    for name, s in states:
        if s.dtype != torch.float32:
            raise TypeError(f"{op}: {name}[{i}] has dtype {s.dtype}; optimizer state must be float32")
        if s.shape != p.shape:
            raise ValueError(f"{op}: {name}[{i}] has shape {tuple(s.shape)} but its parameter has {tuple(p.shape)}")
    if mask is not None:
        if mask.dtype not in MASK_DTYPES:
            raise TypeError(f"{op}: masks[{i}] has dtype {mask.dtype}; a mask must be torch.bool or torch.uint8")
        if mask.shape != p.shape:
            raise ValueError(f"{op}: masks[{i}] has shape {tuple(mask.shape)} but its parameter has "
                             f"{tuple(p.shape)}")
    for name, t in [("params", p), ("grads", g), ("masks", mask)] + list(states):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}] is not contiguous")


# Pointer and program tables by content: a table depends only on its key, so a cached one is always right. The
# program table (which tensor and block each program updates) depends only on the tensors' sizes; the pointer table
# on their addresses too, which change whenever a gradient is allocated anew (zero_grad(set_to_none=True), the
# default: on the CPU every step; on a GPU the caching allocator often hands back the same blocks). A step whose
# pointers are new rebuilds only the pointer table, one small host-to-device copy.
_TABLE_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_PROG_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, int]]" = OrderedDict()
_HYPER_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()  # hyperparameter tables by their values
_TABLE_CACHE_SIZE = 64
# The last compiled kernel per (op, dtype, has_mask, aligned), for inspection (benchmarks/bench_optim.py).
LAST_COMPILED: dict[tuple, object] = {}


def _cached(cache: OrderedDict, key: tuple, build, store: bool = True):
    """The cached table for ``key``, else ``build()``'s, remembered unless ``store`` is False: a table built during
    a CUDA graph capture is filled only when the graph replays (its copy is a node of the graph), so an eager launch
    must not find it in the cache before that, or after a capture that failed."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    out = build()
    if store:
        cache[key] = out
        if len(cache) > _TABLE_CACHE_SIZE:
            cache.popitem(last=False)
    return out


def _program_table(numels: tuple[int, ...], device: torch.device, block: int) -> tuple[torch.Tensor, int]:
    nblocks = (torch.tensor(numels, dtype=torch.int64) + block - 1) // block
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), nblocks)
    starts = torch.cumsum(nblocks, 0) - nblocks
    block_idx = torch.arange(tensor_idx.numel(), dtype=torch.int64) - starts[tensor_idx]
    if block_idx.numel() and int(block_idx.max()) >= 2**31:
        raise ValueError("tensor too large for the int32 program table")
    prog = torch.stack([tensor_idx, block_idx]).to(torch.int32).contiguous()
    return _to_device(prog, device), int(tensor_idx.numel())


# Tables a CUDA graph may read: every table used while a stream was being captured, and the host tensors that
# tables made during a capture were copied from. A graph replays the kernels with the tables' addresses and the
# copies from their host sources, so neither may ever be freed (the caches above evict); they are a few hundred
# bytes per launch and per capture.
_CAPTURE_KEEPALIVE: dict[int, torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on the device. non_blocking: from pageable memory the source is staged at once and no
    stream synchronization is forced (a blocking copy would make every optimizer step wait for the queued backward
    pass). During a CUDA graph capture the copy becomes a node of the graph that reads the host tensor at every
    replay, so that tensor is kept alive (and never written again)."""
    if device.type == "cpu":
        return host
    if not _capturing(device):
        return host.to(device, non_blocking=True)
    _CAPTURE_KEEPALIVE[id(host)] = host
    try:
        return host.to(device, non_blocking=True)
    except RuntimeError as e:  # torch >= 2.11 refuses a copy from pageable memory inside a capture (pytorch#172156)
        raise RuntimeError(
            "sparse_lth.optim: a step captured in a CUDA graph needs an optimizer table that its warm-up steps did "
            "not build (a parameter, gradient or state tensor at a new address: gradients set to None are "
            "allocated anew by the captured backward), and this torch cannot copy it from the host inside a "
            "capture. Zero the gradients in place (zero_grad(set_to_none=False)) and run a warm-up step before "
            f"capturing, as sparse_lth.train does with cuda_graph=True. ({e})") from e


def _tables(rows: tuple[tuple[int, ...], ...], device: torch.device, block: int,
            store: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(pointer table, program table, number of programs) for the rows of one launch (``store``: see _cached)."""
    numels = tuple([r[_C_NUMEL] for r in rows])
    prog, n_programs = _cached(_PROG_CACHE, (device, block, numels), lambda: _program_table(numels, device, block),
                               store)
    ptr = _cached(_TABLE_CACHE, (device, rows),
                  lambda: _to_device(torch.tensor(rows, dtype=torch.int64).reshape(len(rows), _PTR_COLS), device),
                  store)
    return ptr, prog, n_programs


def ptr_row(p: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, s0: torch.Tensor | None = None,
            s1: torch.Tensor | None = None, s2: torch.Tensor | None = None,
            aux: torch.Tensor | None = None) -> tuple[tuple[int, ...], bool]:
    """One tensor's pointer-table row (addresses of p, g, mask, states s0-s2, numel, aux's address; 0 for a
    missing tensor) and whether all its addresses are 16-byte aligned. No checks: the caller made them."""
    pp, gp = p.data_ptr(), g.data_ptr()
    mp = 0 if mask is None else mask.data_ptr()
    a = 0 if s0 is None else s0.data_ptr()
    b = 0 if s1 is None else s1.data_ptr()
    c = 0 if s2 is None else s2.data_ptr()
    return (pp, gp, mp, a, b, c, p.numel(), 0 if aux is None else aux.data_ptr()), not (pp | gp | mp | a | b | c) & 15


def _launch_all(op: str, kernel, entries: list[dict], flags: dict, block: int, num_warps: int,
                hyper64_cols: int | None = None) -> int:
    """The public launchers' entries -> :func:`launch_buckets`. Returns the launch count.

    An entry: ``p``, ``g``, ``mask`` (or None), ``states`` (up to 3) and ``hyper`` (its fp32 table row, padded);
    with ``hyper64_cols`` > 0 also ``hyper64`` (its fp64 row) and ``aux`` (capturable Adam's step count)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1) \
            or block > 1 << 16:  # a power of two (tl.arange), within what a program can hold
        raise ValueError(f"{op}: block must be a power of two in [16, 65536], got {block!r}")
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{op}: num_warps must be a power of two up to 32, got {num_warps!r}")
    entries = [e for e in entries if e["p"].numel() > 0]
    if not entries:
        return 0
    all_tensors = [t for e in entries for t in (e["p"], e["g"], e["mask"], *e["states"], e.get("aux"))
                   if t is not None]
    device = check_launch(*all_tensors, op=op)
    buckets: dict[tuple, list] = {}
    for e in entries:
        row, aligned = ptr_row(e["p"], e["g"], e["mask"], *e["states"], *[None] * (3 - len(e["states"])),
                               aux=e.get("aux"))
        bucket = buckets.setdefault((e["p"].dtype, e["mask"] is not None, aligned), ([], [], []))
        bucket[0].append(row)
        bucket[1].append(e["hyper"])
        if hyper64_cols:
            bucket[2].append(e["hyper64"])
    launches = launch_buckets(op, kernel, device, buckets, flags, block, num_warps, hyper64_cols)
    # written in place behind autograd's back: a graph that saved one of them must see it changed
    increment_version([t for e in entries for t in (e["p"], *e["states"])])
    return launches


def launch_buckets(op: str, kernel, device: torch.device, buckets: dict, flags: dict, block: int = DEFAULT_BLOCK,
                   num_warps: int = 4, hyper64_cols: int | None = None) -> int:
    """One launch per compile-time key. ``buckets``: ``{(dtype, has_mask, aligned): (rows, hyper_rows,
    hyper64_rows)}``, the rows from :func:`ptr_row` (no empty tensor), the hyper rows fp32 (fp64) tuples padded to
    the kernel's table width. The caller has checked every tensor (dtypes, shapes, layouts, one ``device``).

    ``hyper64_cols``: None for a kernel without an fp64 table argument (SGD); 0 when the kernel has one but does
    not read it (non-capturable Adam: the fp32 table is passed in its place); > 0 when it reads it (capturable
    Adam, whose step count's address is each row's last column). Returns the launch count."""
    capturing = _capturing(device)
    launches = 0
    for (dtype, has_mask, aligned), (rows, hyper_rows, hyper64_rows) in buckets.items():
        if not rows:
            continue
        ptr_table, prog_table, n_programs = _tables(tuple(rows), device, block, not capturing)
        hyper = _hyper_table(tuple(hyper_rows), torch.float32, device, not capturing)
        tables = [ptr_table, hyper]
        if hyper64_cols:
            tables.append(_hyper_table(tuple(hyper64_rows), torch.float64, device, not capturing))
        elif hyper64_cols == 0:
            tables.append(hyper)
        if capturing:  # a graph will read these at every replay: never free them
            for t in tables + [prog_table]:
                _CAPTURE_KEEPALIVE[id(t)] = t
        handle = kernel[(n_programs,)](
            *tables, prog_table, n_programs,
            PARAM_DTYPE=_TL_DTYPES[dtype], HAS_MASK=has_mask, ALIGNED=aligned, BLOCK=block,
            num_warps=num_warps, **flags,
        )
        if handle is not None:  # compiled: keep it for inspection (e.g. vectorized loads in handle.asm["ptx"])
            LAST_COMPILED[(op, dtype, has_mask, aligned)] = handle
        launches += 1
    return launches


def _hyper_table(rows: tuple[tuple[float, ...], ...], dtype: torch.dtype, device: torch.device,
                 store: bool = True):
    """The hyperparameter table of one launch (rows padded to the kernel's width), cached by its values: constant
    across steps for SGD (but its first) and capturable Adam, new every step for Adam (the bias corrections)."""
    return _cached(_HYPER_CACHE, (device, dtype, rows), lambda: _to_device(torch.tensor(rows, dtype=dtype), device),
                   store)


def fused_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    masks: Sequence[torch.Tensor | None] | None,
    *,
    lr: float | Sequence[float],
    weight_decay: float | Sequence[float] = 0.0,
    momentum: float | Sequence[float] = 0.0,
    dampening: float | Sequence[float] = 0.0,
    nesterov: bool = False,
    first_step: bool | Sequence[bool] = False,
    block: int = DEFAULT_BLOCK,
    num_warps: int = 4,
    check: bool = True,
) -> int:
    """One torch.optim.SGD step on every tensor, masked, in one pass per tensor and few launches; in place.

    ``momentum_buffers``: float32 tensors (one per parameter) or None for momentum-free SGD. ``first_step[i]``: the
    buffer has no history yet, so it becomes the (decayed, masked) gradient, as torch.optim.SGD's
    ``buf = clone(d_p)``; it must then hold finite values (e.g. zeros). ``masks``: bool/uint8 tensors of each
    parameter's shape, or None entries for unmasked (compact) parameters. Returns the number of kernel launches.
    ``check=False`` skips the per-tensor checks of dtypes, shapes and layouts, for a caller that has made them
    (sparse_lth.optim's optimizers, at every step: ~3 us a parameter of host time).
    """
    op = "fused_sgd_"
    n = len(params)
    params = _check_tensor_list(op, "params", params, n)
    grads = _check_tensor_list(op, "grads", grads, n)
    masks = _check_tensor_list(op, "masks", masks, n, allow_none=True)
    has_momentum = momentum_buffers is not None
    bufs = _check_tensor_list(op, "momentum_buffers", momentum_buffers, n) if has_momentum else [None] * n
    lrs, wds = _per_tensor(lr, n, "lr"), _per_tensor(weight_decay, n, "weight_decay")
    moms, damps = _per_tensor(momentum, n, "momentum"), _per_tensor(dampening, n, "dampening")
    firsts = _per_tensor(first_step, n, "first_step")
    if nesterov and not has_momentum:
        raise ValueError(f"{op}: nesterov needs momentum buffers")
    entries = []
    for i in range(n):
        states = [("momentum_buffers", bufs[i])] if has_momentum else []
        if check:
            _check_entry(op, i, params[i], grads[i], masks[i], states)
        hyper = _sgd_hyper(lrs[i], wds[i], moms[i], damps[i], bool(firsts[i]))
        entries.append(dict(p=params[i], g=grads[i], mask=masks[i], states=[s for _, s in states], hyper=hyper))
    return _launch_all(op, _sgd_kernel, entries, dict(HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov)), block,
                       num_warps)


def _adam_hyper(lr, weight_decay, beta1, beta2, eps, step) -> tuple[float, ...]:
    """Per-tensor scalars of torch.optim.Adam's (non-capturable) step, computed in double as torch does, as the
    kernel's row."""
    lr, weight_decay, beta1, beta2, eps, step = map(float, (lr, weight_decay, beta1, beta2, eps, step))
    if not 1 <= step < math.inf:  # (a NaN step passed `step < 1` and made every weight NaN)
        raise ValueError(f"Adam step count must be >= 1 after incrementing, got {step}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:  # (beta1 = 1: a ZeroDivisionError in the bias correction)
            raise ValueError(f"Adam needs 0 <= {name} < 1, got {b}")
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return _padded((lr, weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, lr / bias_correction1,
                    bias_correction2 ** 0.5, eps, 1 - lr * weight_decay), _ADAM_COLS)


def _adam_hyper_capturable(lr, weight_decay, beta1, beta2, eps) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Capturable Adam's per-tensor scalars as the kernel's rows: the fp32 row without the step's bias corrections
    (constant across steps), and the fp64 row (lr, log2(beta1), log2(beta2)) from which the kernel computes them."""
    lr, weight_decay, beta1, beta2, eps = map(float, (lr, weight_decay, beta1, beta2, eps))
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"capturable Adam needs 0 <= {name} < 1, got {b}")
    log2 = [math.log2(b) if b > 0 else -math.inf for b in (beta1, beta2)]  # 0**step = exp2(-inf) = 0
    return (_padded((lr, weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, 0.0, 0.0, eps, 1 - lr * weight_decay),
                    _ADAM_COLS),
            _padded((lr, *log2), _ADAM64_COLS))


def fused_adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    masks: Sequence[torch.Tensor | None] | None,
    *,
    lr: float | Sequence[float],
    beta1: float | Sequence[float],
    beta2: float | Sequence[float],
    eps: float | Sequence[float],
    weight_decay: float | Sequence[float],
    step: float | Sequence[float] | Sequence[torch.Tensor],
    decoupled_weight_decay: bool = False,
    capturable: bool = False,
    block: int = DEFAULT_BLOCK,
    num_warps: int = 4,
    check: bool = True,
) -> int:
    """One torch.optim.Adam (AdamW with ``decoupled_weight_decay``, AMSGrad when ``max_exp_avg_sqs`` is given)
    step on every tensor, masked, in one pass per tensor and few launches; in place.

    ``step[i]``: the parameter's step count *after* this step's increment (1 on the first step), as torch's
    ``state['step']``. State tensors are float32. Returns the number of kernel launches. ``check``: as for
    :func:`fused_sgd_`.

    ``capturable``: ``step`` is a sequence of one-element float32 tensors on the parameters' device, which the
    kernel reads (the host never does), computing the bias corrections there in fp64. The tables of a launch are
    then the same at every step (cached), so a step makes no host-to-device copy once its tables exist, and it can
    be captured in a CUDA graph; a learning rate or beta changed later takes effect in eager steps, not in a graph
    captured before (as torch.optim's capturable Adam with a float learning rate).
    """
    op = "fused_adam_"
    n = len(params)
    params = _check_tensor_list(op, "params", params, n)
    grads = _check_tensor_list(op, "grads", grads, n)
    m1 = _check_tensor_list(op, "exp_avgs", exp_avgs, n)
    m2 = _check_tensor_list(op, "exp_avg_sqs", exp_avg_sqs, n)
    amsgrad = max_exp_avg_sqs is not None
    mx = _check_tensor_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, n) if amsgrad else [None] * n
    masks = _check_tensor_list(op, "masks", masks, n, allow_none=True)
    lrs, b1s, b2s = _per_tensor(lr, n, "lr"), _per_tensor(beta1, n, "beta1"), _per_tensor(beta2, n, "beta2")
    epss, wds = _per_tensor(eps, n, "eps"), _per_tensor(weight_decay, n, "weight_decay")
    if capturable:
        steps = _check_tensor_list(op, "step", step if isinstance(step, (list, tuple)) else [step] * n, n)
    else:
        steps = _per_tensor(step, n, "step")
    entries = []
    for i in range(n):
        states = [("exp_avgs", m1[i]), ("exp_avg_sqs", m2[i])] + ([("max_exp_avg_sqs", mx[i])] if amsgrad else [])
        if check:
            _check_entry(op, i, params[i], grads[i], masks[i], states)
        if capturable:
            step_t = steps[i]
            if step_t.dtype != torch.float32 or step_t.numel() != 1:
                raise TypeError(f"{op}: capturable step[{i}] must be a one-element float32 tensor, got "
                                f"{step_t.dtype} of shape {tuple(step_t.shape)}")
            hyper, hyper64 = _adam_hyper_capturable(lrs[i], wds[i], b1s[i], b2s[i], epss[i])
            entries.append(dict(p=params[i], g=grads[i], mask=masks[i], states=[s for _, s in states],
                                hyper=hyper, hyper64=hyper64, aux=step_t))
        else:
            entries.append(dict(p=params[i], g=grads[i], mask=masks[i], states=[s for _, s in states],
                                hyper=_adam_hyper(lrs[i], wds[i], b1s[i], b2s[i], epss[i], steps[i])))
    return _launch_all(op, _adam_kernel, entries,
                       dict(AMSGRAD=amsgrad, DECOUPLED=bool(decoupled_weight_decay), CAPTURABLE=bool(capturable)),
                       block, num_warps, hyper64_cols=_ADAM64_COLS if capturable else 0)


# ----------------------------------------------------------------------------------------------------------------
# Plain-torch references (per tensor, fp32 arithmetic, the same semantics as the kernels)
# ----------------------------------------------------------------------------------------------------------------
def _live(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.to(torch.bool)


def _zero_pruned(x: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    return x if live is None else torch.where(live, x, torch.zeros((), dtype=x.dtype, device=x.device))


def sgd_reference_(params, grads, momentum_buffers, masks, *, lr, weight_decay=0.0, momentum=0.0, dampening=0.0,
                   nesterov=False, first_step=False) -> None:
    """Plain-torch reference of :func:`fused_sgd_` (same arguments, in place)."""
    n = len(params)
    masks = list(masks) if masks is not None else [None] * n
    lrs, wds = _per_tensor(lr, n, "lr"), _per_tensor(weight_decay, n, "weight_decay")
    moms, damps = _per_tensor(momentum, n, "momentum"), _per_tensor(dampening, n, "dampening")
    firsts = _per_tensor(first_step, n, "first_step")
    for i, (p, g) in enumerate(zip(params, grads)):
        live = _live(masks[i])
        p32, d_p = p.float(), _zero_pruned(g.float(), live)
        if wds[i] != 0:  # as torch.optim: no 0 * p term (0 * inf is NaN)
            d_p = d_p + wds[i] * p32
        if momentum_buffers is not None:
            buf = momentum_buffers[i]
            new = d_p.clone() if firsts[i] else buf * moms[i] + (1 - damps[i]) * d_p
            new = _zero_pruned(new, live)
            buf.copy_(new)
            d_p = d_p + moms[i] * new if nesterov else new
        p.copy_(_zero_pruned(p32 - lrs[i] * d_p, live))


def adam_reference_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, *, lr, beta1, beta2, eps,
                    weight_decay, step, decoupled_weight_decay=False) -> None:
    """Plain-torch reference of :func:`fused_adam_` (same arguments, in place)."""
    n = len(params)
    masks = list(masks) if masks is not None else [None] * n
    lrs, b1s, b2s = _per_tensor(lr, n, "lr"), _per_tensor(beta1, n, "beta1"), _per_tensor(beta2, n, "beta2")
    epss, wds, steps = _per_tensor(eps, n, "eps"), _per_tensor(weight_decay, n, "weight_decay"), _per_tensor(step, n, "step")
    for i, (p, g) in enumerate(zip(params, grads)):
        live = _live(masks[i])
        h = _adam_hyper(lrs[i], wds[i], b1s[i], b2s[i], epss[i], steps[i])
        p32, g32 = p.float(), _zero_pruned(g.float(), live)
        if decoupled_weight_decay:
            p32 = p32 * h[9]
        elif h[1] != 0:
            g32 = g32 + h[1] * p32
        m1 = _zero_pruned(exp_avgs[i].lerp(g32, h[3]), live)
        m2 = _zero_pruned(exp_avg_sqs[i] * h[4] + h[5] * (g32 * g32), live)
        exp_avgs[i].copy_(m1)
        exp_avg_sqs[i].copy_(m2)
        second = m2
        if max_exp_avg_sqs is not None:
            second = _zero_pruned(torch.maximum(max_exp_avg_sqs[i], m2), live)
            max_exp_avg_sqs[i].copy_(second)
        denom = second.sqrt() / h[7] + h[8]
        p.copy_(_zero_pruned(p32 - h[6] * (m1 / denom), live))
