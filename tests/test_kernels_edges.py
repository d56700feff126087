"""The kernels at their edges, from a mutation audit of their internals (session 33): each test kills a mutant that
the other kernel tests let through.

* Guard-page tests (interpreter only): an operand is placed so that its last byte is the last byte before a
  PROT_NONE page. Triton's interpreter reads only the addresses a masked load's mask lets through, so a load whose
  mask misses a bound (a batch lane past n_b, a row of the processing order past n_rows) touches the protected page
  and the process dies with SIGSEGV; on a GPU the same load reads past the allocation (garbage or an illegal address).
  These run in a subprocess, so a crash fails the test instead of killing pytest.
* The slab weight gradient in bf16 with several batch blocks (its partial sums reduced into a non-fp32 ``out``).
* A uint8 mask whose live entries are not 1 (the reference and the torch backend take any nonzero as live).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

_KEEP: list = []


def at_page_end(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose storage ends exactly at a PROT_NONE page."""
    t = t.contiguous()
    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    npages = (nbytes + page - 1) // page + 1
    buf = mmap.mmap(-1, npages * page)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    guard = raw.data_ptr() + (npages - 1) * page
    assert guard % page == 0
    assert libc.mprotect(ctypes.c_void_p(guard), page, 0) == 0  # PROT_NONE
    end = (npages - 1) * page
    out = raw[end - nbytes:end].view(t.dtype).view(t.shape)
    out.copy_(t)
    _KEEP.append((buf, raw))
    return out


def batch_minor_at_page_end(t: torch.Tensor) -> torch.Tensor:
    """``t`` (B, n) with strides (1, B), its storage (``t.t()`` contiguous) ending at a guard page."""
    return at_page_end(t.t().contiguous()).t()


def _guard_case(case: str) -> None:
    """Run in a subprocess (TRITON_INTERPRET=1): one kernel with an operand against a guard page; assert it right."""
    import dataclasses

    from sparse_lth.kernels import format as F
    from sparse_lth.kernels.format import build_format
    from sparse_lth.kernels.sparse_linear import (reference_backward_input, reference_backward_weight,
                                                  reference_forward, sparse_linear_backward_input,
                                                  sparse_linear_backward_weight, sparse_linear_forward)

    F.PANEL = 8  # several panels on a small shape (as the small_panels fixture)
    g = torch.Generator().manual_seed(5)
    rows, cols, batch = 11, 21, 5  # batch 5: a 16-wide batch block has 11 lanes past the batch
    mask = torch.rand(rows, cols, generator=g) < 0.6
    mask[:, -1] = True   # the last column (the operand's last bytes) and the last row are read
    mask[-1, :] = True
    fmt = build_format(mask)
    values = torch.randn(fmt.nnz, generator=g)
    x = torch.randn(batch, cols, generator=g)
    dy = torch.randn(batch, rows, generator=g)
    slab = {"PANEL_STEP": 1, "BLOCK_R": 4, "BLOCK_K": 4, "BLOCK_B": 16, "CHUNKS": 2}
    tol = dict(rtol=1e-5, atol=1e-5)
    if case == "fwd_gather_batch_lanes":
        y = sparse_linear_forward(batch_minor_at_page_end(x), values, fmt, variant="gather")
        torch.testing.assert_close(y, reference_forward(x, values, fmt), **tol)
    elif case == "fwd_slab_batch_lanes":
        y = sparse_linear_forward(batch_minor_at_page_end(x), values, fmt, config=slab)
        torch.testing.assert_close(y, reference_forward(x, values, fmt), **tol)
    elif case == "bwd_input_slab_batch_lanes":
        dx = sparse_linear_backward_input(batch_minor_at_page_end(dy), values, fmt, config=slab)
        torch.testing.assert_close(dx, reference_backward_input(dy, values, fmt), **tol)
    elif case == "slab_row_order_past_n_rows":
        guarded = F._as_built(dataclasses.replace(fmt, row_order=at_page_end(fmt.row_order),
                                                  col_order=at_page_end(fmt.col_order)))
        y = sparse_linear_forward(x, values, guarded, config=slab)
        torch.testing.assert_close(y, reference_forward(x, values, fmt), **tol)
        dx = sparse_linear_backward_input(dy, values, guarded, config=slab)
        torch.testing.assert_close(dx, reference_backward_input(dy, values, fmt), **tol)
        dv = sparse_linear_backward_weight(dy, x, guarded, config=slab)
        torch.testing.assert_close(dv, reference_backward_weight(dy, x, fmt), **tol)
    elif case == "optim_tail_block":
        from sparse_lth.kernels import optim as K

        for n in (70, 130):  # a partial last block of 64: its lanes past numel must not be read
            p = at_page_end(torch.randn(n, generator=g))
            grad = at_page_end(torch.randn(n, generator=g))
            buf = at_page_end(torch.zeros(n))
            m = at_page_end(torch.rand(n, generator=g) < 0.5)
            ref_p, ref_b = p.clone(), buf.clone()
            K.fused_sgd_([p], [grad], [buf], [m], lr=0.1, momentum=0.9, block=64)
            K.sgd_reference_([ref_p], [grad], [ref_b], [m], lr=0.1, momentum=0.9)
            torch.testing.assert_close(p, ref_p)
            torch.testing.assert_close(buf, ref_b)
            s1, s2 = at_page_end(torch.zeros(n)), at_page_end(torch.zeros(n))
            K.fused_adam_([p], [grad], [s1], [s2], None, [m], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, step=1, block=64)
    else:
        raise ValueError(case)
    print("GUARD-OK")


def run_guard_case(kernel_device, module: str, case: str, what: str = "a load read past the operand") -> None:
    """Run ``module._guard_case(case)`` in a subprocess under Triton's interpreter (operands against PROT_NONE
    pages: a stray access kills it with SIGSEGV, failing the test instead of pytest). On a GPU machine the check is
    compute-sanitizer's, not this one (its Triton's interpreter may not run there: numpy, see README)."""
    if kernel_device.type != "cpu":
        pytest.skip("guard pages need the interpreter's CPU tensors (on a GPU: compute-sanitizer)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import {module} as m; m._guard_case({case!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "GUARD-OK" in r.stdout, (
        f"{case}: exit {r.returncode} (-11: {what})\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


@pytest.mark.parametrize("case", ["fwd_gather_batch_lanes", "fwd_slab_batch_lanes", "bwd_input_slab_batch_lanes",
                                  "slab_row_order_past_n_rows", "optim_tail_block"])
def test_masked_loads_never_touch_memory_past_an_operand(kernel_device, case):
    run_guard_case(kernel_device, "test_kernels_edges", case)


def test_slab_weight_gradient_in_bf16_sums_every_batch_block(kernel_device, monkeypatch):
    """bf16 out: the slab kernel's fp32 partial sums (one row per batch block) are reduced and cast into out through
    the non-fp32 path; with 37 rows and BLOCK_B 16 there are 3 batch blocks to sum."""
    from sparse_lth.kernels import format as F
    from sparse_lth.kernels.format import build_format
    from sparse_lth.kernels.sparse_linear import reference_backward_weight, sparse_linear_backward_weight

    monkeypatch.setattr(F, "PANEL", 8)
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(13, 29, generator=g) < 0.4
    fmt = build_format(mask.to(kernel_device))
    dy = torch.randn(37, 13, generator=g).to(torch.bfloat16).to(kernel_device)
    x = torch.randn(37, 29, generator=g).to(torch.bfloat16).to(kernel_device)
    cfg = {"PANEL_STEP": 1, "BLOCK_R": 4, "BLOCK_K": 4, "BLOCK_B": 16, "CHUNKS": 2}
    ref = reference_backward_weight(dy.double(), x.double(), fmt)
    absref = reference_backward_weight(dy.double().abs(), x.double().abs(), fmt)
    for out_dtype in (torch.bfloat16, torch.float16):
        dv = sparse_linear_backward_weight(dy, x, fmt, out_dtype=out_dtype, config=cfg).double().cpu()
        err = (dv - ref.cpu()).abs()
        assert (err <= 2.0**-7 * ref.abs().cpu() + 1e-5 * absref.cpu() + 1e-6).all(), (out_dtype, err.max())
    # fp32 out that is not contiguous (a strided view): the same path
    buf = torch.full((2 * fmt.nnz,), float("nan"), device=kernel_device)
    sparse_linear_backward_weight(dy, x, fmt, out_dtype=torch.float32, out=buf[::2], config=cfg)
    err = (buf[::2].double().cpu() - ref.cpu()).abs()
    assert (err <= 1e-5 * absref.cpu() + 1e-6).all(), err.max()


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_uint8_mask_any_nonzero_is_live(kernel_device, opt):
    """A uint8 mask marks a live weight with any nonzero byte (as mask.bool(), the references, the torch backend):
    a mask of 0/255 (an image-style mask) or 0/2 must update the live weights, not zero them."""
    from sparse_lth.kernels import optim as K

    g = torch.Generator().manual_seed(3)
    p = torch.randn(70, generator=g).to(kernel_device)
    grad = torch.randn(70, generator=g).to(kernel_device)
    live = torch.rand(70, generator=g) < 0.5
    mask = torch.where(live, torch.tensor([255, 2, 7, 1] * 17 + [255, 2], dtype=torch.uint8),
                       torch.tensor(0, dtype=torch.uint8)).to(kernel_device)
    ref_p = p.clone()
    if opt == "sgd":
        K.fused_sgd_([p], [grad], None, [mask], lr=0.1, block=64)
        K.sgd_reference_([ref_p], [grad], None, [mask], lr=0.1)
    else:
        st = [torch.zeros(70, device=kernel_device) for _ in range(2)]
        rst = [s.clone() for s in st]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
        K.fused_adam_([p], [grad], [st[0]], [st[1]], None, [mask], block=64, **kw)
        K.adam_reference_([ref_p], [grad], [rst[0]], [rst[1]], None, [mask], **kw)
        torch.testing.assert_close(st[0], rst[0])
    assert (p[live.to(p.device)] != 0).all()
    torch.testing.assert_close(p, ref_p)


def test_conv_pixel_check_boundaries():
    """_check_pixels: the kernels' int32 pixel index plus a block (BLOCK_P <= 128 < 4096) must not wrap, and the
    grid (channels x pixel blocks of >= 32) must fit int32 program ids."""
    from sparse_lth.kernels import sparse_conv as sc

    sc._check_pixels(2**31 - 1 - 4096, 1, "op")                 # the largest count allowed
    with pytest.raises(ValueError, match="overflow"):
        sc._check_pixels(2**31 - 4096, 1, "op")                 # offs_p + BLOCK_P could pass 2**31 - 1
    with pytest.raises(ValueError, match="overflow"):
        sc._check_pixels(2**31 - 1, 1, "op")
    sc._check_pixels(2**25, 2**11 - 1, "op")                    # (2**11 - 1) x 2**20 blocks of 32 < 2**31
    with pytest.raises(ValueError, match="overflow"):
        sc._check_pixels(2**25, 2**11, "op")                    # 2**11 x 2**20 = 2**31 programs: too many
    with pytest.raises(ValueError, match="overflow"):
        sc._check_pixels(2**30, 64, "op")


def test_pair_checks_both_entries():
    from sparse_lth.kernels._conv_geometry import pair

    assert pair((1, 0), "padding", minimum=0) == (1, 0)
    for bad in ((1, -1), (-1, 1)):
        with pytest.raises(ValueError, match="padding"):
            pair(bad, "padding", minimum=0)
    with pytest.raises(ValueError, match="stride"):
        pair((2, 0), "stride", minimum=1)


def test_offset_dtype_of_a_view_just_below_the_limit():
    """A non-contiguous view whose largest offset is 2**30 - 1 still takes int32 offsets (the extent is
    sum((n - 1) * stride), not sum(n * stride))."""
    import triton.language as tl

    from sparse_lth.kernels._triton import offset_dtype

    t = torch.empty(2**15, 2**15, device="meta").t()       # extent (2**15 - 1) * (2**15 + 1) = 2**30 - 1
    assert not t.is_contiguous()
    assert offset_dtype(t) == tl.int32
    assert offset_dtype(torch.empty(2**15 + 1, 2**15, device="meta").t()) == tl.int64   # extent 2**30 + 2**15 - 1


def test_bf16_rounding_keeps_a_canonical_gpu_nan():
    """A GPU's fp32 arithmetic returns NaN as 0x7FFFFFFF: rounding that to bf16 by adding 0x7FFF + 1 carries into the
    sign bit and gives -0.0 unless NaN is special-cased. Reproduced here with a momentum buffer holding that NaN."""
    from sparse_lth.kernels import optim as K

    p = torch.ones(8, dtype=torch.bfloat16)
    g = torch.zeros(8, dtype=torch.bfloat16)
    buf = torch.zeros(8)
    buf.view(torch.int32)[3] = 0x7FFFFFFF  # NaN, all payload bits set (the canonical NaN of NVIDIA GPUs)
    buf.view(torch.int32)[5] = -1          # 0xFFFFFFFF: -NaN, all payload bits
    K.fused_sgd_([p], [g], [buf], None, lr=0.1, momentum=0.9, block=64)
    assert torch.isnan(p[3]) and torch.isnan(p[5]), p
    assert torch.isnan(p).sum() == 2


def test_program_table_follows_the_block_size(kernel_device):
    """The cached program table (tensor, block index per program) depends on the block size too: the same shapes
    updated with block 64 and then block 16 must get a table of 16-element blocks."""
    from sparse_lth.kernels import optim as K

    g = torch.Generator().manual_seed(4)
    shapes = [(100,), (37,)]
    ps = [torch.randn(s, generator=g).to(kernel_device) for s in shapes]
    ref = [p.clone() for p in ps]
    for block in (64, 16, 128):
        gs = [torch.randn(s, generator=g).to(kernel_device) for s in shapes]
        K.fused_sgd_(ps, gs, None, None, lr=0.1, block=block)
        K.sgd_reference_(ref, gs, None, None, lr=0.1)
        for a, b in zip(ps, ref):
            torch.testing.assert_close(a, b)


class LaunchSpy:
    """Stands in for an optimizer kernel: records each launch's ALIGNED flag and pointer table, then launches."""

    def __init__(self, kern, seen: list):
        self.kern, self.seen = kern, seen

    def __getitem__(self, grid):
        def launch(ptr_table, *args, **kw):
            self.seen.append((kw["ALIGNED"], ptr_table.cpu().clone()))
            return self.kern[grid](ptr_table, *args, **kw)
        return launch


def test_an_aligned_launch_holds_only_16_byte_aligned_tensors(kernel_device, monkeypatch):
    """ALIGNED=True promises the compiler 16-byte aligned addresses (vector loads): a launch with that flag must not
    carry a tensor at an unaligned address (misaligned vector accesses on a GPU). Checked at the launch."""
    from sparse_lth.kernels import optim as K

    seen = []
    monkeypatch.setattr(K, "_sgd_kernel", LaunchSpy(K._sgd_kernel, seen))
    base = torch.zeros(200, device=kernel_device)
    ps = [base[0:64], base[65:129]]                            # aligned, and 4 bytes past an aligned address
    gs = [torch.randn(64, device=kernel_device), torch.randn(64, device=kernel_device)]
    ref = [p.clone() for p in ps]
    assert K.fused_sgd_(ps, gs, None, None, lr=0.1, block=64) == 2
    K.sgd_reference_(ref, gs, None, None, lr=0.1)
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b)
    assert {a for a, _ in seen} == {True, False}
    for aligned, table in seen:
        if aligned:
            addrs = table[:, :6].flatten()
            assert ((addrs % 16) == 0).all(), f"an unaligned address in an ALIGNED launch: {addrs.tolist()}"
