"""Where the Triton kernels can run: compiled on CUDA tensors, or interpreted on CPU tensors when
``TRITON_INTERPRET=1`` was set before Triton was first imported."""
from __future__ import annotations

import functools
import inspect
import os
import re

import torch

try:  # Triton ships with torch's Linux wheels; keep the CPU path alive where it is missing.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launch grids (host side: Triton 3.8's ``triton.cdiv`` is a constexpr function whose
    host calls cost microseconds each)."""
    return -(-a // b)


# Triton decides between its interpreter and the compiler when a kernel is decorated (``triton.jit`` reads
# TRITON_INTERPRET then), that is when the kernel modules are imported, just after this one has imported Triton:
# so the variable is read once, here, as the kernels saw it. Reading it at every launch cost ~2 us a read, 27 reads
# in a LeNet-300-100 step. Tests that need the other mode set ``INTERPRET`` itself.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 when Triton was imported)."""
    return INTERPRET


def can_launch(device: torch.device | str) -> bool:
    """Can a Triton kernel run on tensors of ``device``?"""
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()


def interpreter_numpy_problem(numpy_version: str, interpreter_source: str) -> str | None:
    """Why Triton's interpreter cannot run these kernels with this NumPy, or None. NumPy 2.4 made ``int()`` of a
    one-element array an error, and the interpreter of Triton 3.6 (the GPU machine's) still converts a loaded
    scalar that way (``range(k_start, k_end, ...)`` over row pointers, in every sparse kernel): each launch then
    fails with "only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171, fixed by
    #9172; Triton 3.8 has the fix). Told by the unfixed line in the interpreter's source, not by version numbers."""
    try:
        major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", numpy_version).groups())
    except (AttributeError, ValueError):
        return None
    if (major, minor) < (2, 4) or "int(self.handle.data))" not in interpreter_source:
        return None
    return (f"Triton's interpreter in this install (triton {getattr(triton, '__version__', '?')}) cannot run "
            f"with NumPy {numpy_version}: it converts one-element arrays to Python ints, which NumPy 2.4 refuses "
            "(triton-lang/triton#9171). Install 'numpy<2.4', or a Triton with the fix (3.8 has it)")


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> str | None:
    try:
        import numpy
        import triton.runtime.interpreter as interp

        source = inspect.getsource(interp)
    except Exception:  # pragma: no cover - no source to read: let Triton's own error speak
        return None
    return interpreter_numpy_problem(numpy.__version__, source)


# Devices that passed check_launch, keyed with what decided it (the mode; the interpreter check, which tests replace)
_LAUNCHABLE: set[tuple] = set()


def check_unit_stride(t: torch.Tensor, name: str, op: str) -> None:
    """The kernels read a vector (values, bias) with unit stride: a strided view would be read as contiguous."""
    if t.numel() > 1 and t.stride(0) != 1:
        raise ValueError(f"{op}: {name} has stride {t.stride(0)}; a vector must be contiguous (pass "
                         f"{name}.contiguous())")


def check_launch(*tensors: torch.Tensor, op: str) -> torch.device:
    """Raise a clear error unless every tensor is on one device where Triton can run; return that device."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) != 1:
        raise ValueError(f"{op}: tensors are on different devices: {sorted(str(d) for d in devs)}")
    (dev,) = devs
    key = (dev, INTERPRET, HAS_TRITON, _interpreter_problem)
    if key in _LAUNCHABLE:
        return dev
    ok = can_launch(dev)
    if ok and dev.type == "cpu" and _interpreter_problem():
        raise RuntimeError(f"{op}: {_interpreter_problem()}")
    if ok:
        _LAUNCHABLE.add(key)
        return dev
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: Triton is not installed")
    if dev.type == "cpu":
        raise RuntimeError(f"{op}: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "Triton is imported to run them on the CPU through the interpreter")
    raise RuntimeError(f"{op}: Triton cannot run on device {dev}")


def autotune_bench():
    """The timing function for the kernels' autotuners, or None for Triton's default (``do_bench`` with 25 ms of
    warmup and 100 ms of timing per configuration). ``$SPARSE_LTH_TUNE_MS="WARMUP,REP"`` (milliseconds) shortens
    it: the GPU benchmark plan sets it so that tuning every layer, density and precision fits its time budget."""
    spec = os.environ.get("SPARSE_LTH_TUNE_MS", "").strip()
    if not spec:
        return None
    try:
        warmup, rep = (float(v) for v in spec.split(","))
        if warmup < 0 or rep <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"SPARSE_LTH_TUNE_MS must be 'WARMUP,REP' in milliseconds (e.g. '5,20'), got {spec!r}") \
            from None
    import triton.testing

    return lambda fn, quantiles: triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=quantiles)


# Offsets (index x stride sums) in the kernels are int32 unless one of a launch's tensors or counts reaches 2**30,
# then int64: int32 offsets take half the registers of the gathered-pointer arithmetic (sm_90a compile report: the
# sparse linear gather forward at (2, 16, 128) fp32 went from 167 to 128 registers). FORCE_OFFSET64 makes every
# launch use int64 (tests).
FORCE_OFFSET64 = False
_OFFSET32_LIMIT = 1 << 30


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset from ``t``'s first element that an index into it reaches (its extent)."""
    off = 0
    for n, st in zip(t.shape, t.stride()):
        if n == 0:
            return 0
        off += (n - 1) * (st if st >= 0 else -st)
    return off


def offset_dtype(*tensors, counts=()):
    """``tl.int64`` when an element offset into one of ``tensors`` (from their shapes and strides) or one of
    ``counts`` can reach 2**30, else ``tl.int32``: the kernels' ``OFFSET`` meta-parameter. (Plain loops: this runs
    at every launch, and generator expressions cost a LeNet-sized launch ~1 us.)"""
    if FORCE_OFFSET64:
        return tl.int64
    for t in tensors:
        # a contiguous tensor's extent is numel - 1 (two C calls instead of a loop over its dimensions)
        if t is not None and (t.numel() > _OFFSET32_LIMIT or not t.is_contiguous()) \
                and _max_offset(t) >= _OFFSET32_LIMIT:
            return tl.int64
    for c in counts:
        if int(c) >= _OFFSET32_LIMIT:
            return tl.int64
    return tl.int32
