"""Index structures of a sparse weight, shared by every sparse op of sparse-lth.

A weight of shape ``(rows, cols)`` (a linear layer's ``(out_features, in_features)``, or a conv layer's
``(C_out, C_in * kh * kw)``) under a boolean mask is held as

* ``values``: the live weights, a 1-D tensor of length ``nnz`` in **row-major (CSR) order**, i.e. exactly
  ``weight.reshape(rows, cols)[mask]``; it is the trainable parameter of a layer on the sparse path;
* a :class:`SparseFormat`: the index structures below, built once per mask (once per IMP round), never per step.

CSR view (forward pass, weight gradient)::

    row_ptr   int32/int64 [rows + 1]  values[row_ptr[r]:row_ptr[r+1]] are row r's live weights
    col_idx   int32 [nnz]             their column indices (ascending within a row)
    row_idx   int32 [nnz]             the row of every value (for the sampled weight gradient)

Transposed (CSC) view pointing into the *same* values (input gradient)::

    col_ptr   int32/int64 [cols + 1]  CSC entries col_ptr[c]:col_ptr[c+1] belong to column c
    t_row_idx int32 [nnz]             their row indices (ascending within a column)
    t_perm    int32/int64 [nnz]       their positions in ``values``: entry k is values[t_perm[k]]

Load balancing::

    row_order int32 [rows]            rows sorted by decreasing number of live weights
    col_order int32 [cols]            columns likewise

Column panels (the "slab" kernels, which keep one panel of the dense operand in L1 while they sweep every row)::

    row_panel_ptr int32/int64 [rows, NP + 1]   row r's entries with col in [j * PANEL, (j + 1) * PANEL) are
                                               row_panel_ptr[r, j]:row_panel_ptr[r, j + 1] (CSR positions);
                                               NP = max(1, ceil(cols / PANEL)), column 0 = row_ptr[:-1],
                                               column NP = row_ptr[1:]
    col_panel_ptr int32/int64 [cols, NPt + 1]  the same for the CSC view over panels of rows (CSC positions)

with ``PANEL`` = 128; a kernel may walk several base panels at a time.

Pointers (``row_ptr``, ``col_ptr``, ``t_perm``) are int64 once ``nnz`` can pass 2**31 - 1, int32 below that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = ["SparseFormat", "build_format", "check_mask", "to_values", "to_dense", "PANEL"]

_INT32_MAX = 2**31 - 1
PANEL = 128  # columns (rows, for the CSC view) per base panel of row_panel_ptr (col_panel_ptr)


def n_panels(n: int) -> int:
    """Base panels over ``n`` columns (at least one, so that an empty dimension still has a pointer pair)."""
    return max(1, -(-n // PANEL))


@dataclass(frozen=True)  # validate() remembers a checked format: its fields must not change after
class SparseFormat:
    rows: int
    cols: int
    nnz: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    row_idx: torch.Tensor
    col_ptr: torch.Tensor
    t_row_idx: torch.Tensor
    t_perm: torch.Tensor
    row_order: torch.Tensor
    col_order: torch.Tensor
    row_panel_ptr: torch.Tensor
    col_panel_ptr: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    @property
    def density(self) -> float:
        n = self.rows * self.cols
        return self.nnz / n if n else 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device) -> "SparseFormat":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        out = SparseFormat(**kw)
        return _as_built(out) if self.__dict__.get("_built") else out

    def mask(self) -> torch.Tensor:
        """The boolean ``(rows, cols)`` mask this format describes."""
        m = torch.zeros(self.rows * self.cols, dtype=torch.bool, device=self.device)
        m[self.row_idx.long() * self.cols + self.col_idx.long()] = True
        return m.view(self.rows, self.cols)

    def validate(self) -> None:
        """Raise ``ValueError`` if the structures are inconsistent (wrong lengths, dtypes or devices). A format
        that passed is not checked again (its fields are frozen; ``dataclasses.replace`` makes a new, unchecked
        one): every kernel call validates its format, and on a GPU the ~10 us of checks per call were a large part
        of a LeNet-sized layer's host time."""
        if self.__dict__.get("_validated"):
            return
        for name in ("rows", "cols", "nnz"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"SparseFormat.{name} must be an int >= 0, got {v!r}")
        expect = {
            "row_ptr": (self.rows + 1,), "col_idx": (self.nnz,), "row_idx": (self.nnz,), "col_ptr": (self.cols + 1,),
            "t_row_idx": (self.nnz,), "t_perm": (self.nnz,), "row_order": (self.rows,), "col_order": (self.cols,),
            "row_panel_ptr": (self.rows, n_panels(self.cols) + 1),
            "col_panel_ptr": (self.cols, n_panels(self.rows) + 1),
        }
        for name, shape in expect.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_contiguous():
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"SparseFormat.{name}: expected a contiguous tensor of shape {shape}, got {got}")
            if t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"SparseFormat.{name}: expected an int32 or int64 tensor, got {t.dtype}")
            if t.device != self.device:
                raise ValueError(f"SparseFormat.{name} is on {t.device}, row_ptr on {self.device}")
        if not self.__dict__.get("_built"):  # made by hand, not by build_format: its contents too, once
            self.check_contents()
        object.__setattr__(self, "_validated", True)

    def check_contents(self) -> None:
        """Raise ``ValueError`` unless the structures are those :func:`build_format` makes of the mask that
        ``row_idx`` / ``col_idx`` describe (``row_order`` and ``col_order`` may be any permutations). The kernels
        trust them: a pointer past ``nnz`` or an index out of range reads and writes out of bounds, and an
        inconsistent transposed view gives wrong gradients silently. Formats from :func:`build_format` (and their
        ``.to()`` copies) are right by construction and skip this; :meth:`validate` runs it once for any other
        (it reads the tensors: a device sync, and a build's time)."""
        rows, cols, nnz = self.rows, self.cols, self.nnz
        ri, ci = self.row_idx.long(), self.col_idx.long()
        if nnz and (int(ri.min()) < 0 or int(ri.max()) >= rows or int(ci.min()) < 0 or int(ci.max()) >= cols):
            raise ValueError(f"SparseFormat: row_idx / col_idx out of range for a ({rows}, {cols}) weight")
        ref = build_format(self.mask())
        if ref.nnz != nnz:
            raise ValueError(f"SparseFormat: row_idx / col_idx name {ref.nnz} distinct positions, nnz is {nnz}")
        for name in ("row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx", "t_perm", "row_panel_ptr",
                     "col_panel_ptr"):
            if not torch.equal(getattr(self, name).long(), getattr(ref, name).long()):
                raise ValueError(f"SparseFormat.{name} does not match the mask that row_idx / col_idx describe "
                                 "(rows in order, columns ascending within a row; build_format makes it right)")
        for name, n in (("row_order", rows), ("col_order", cols)):
            order = getattr(self, name).long()
            if not torch.equal(order.sort().values, torch.arange(n, device=order.device)):
                raise ValueError(f"SparseFormat.{name} is not a permutation of 0 .. {n - 1}")


def check_mask(mask, shape, *, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as a bool tensor of ``shape``, or raise a clear error.

    Accepted: a bool tensor, or a real-valued / integer tensor whose entries are all 0 or 1.
    Refused: a wrong shape, a complex or non-tensor mask, NaN, and values other than 0 and 1.
    """
    shape = tuple(shape)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {shape} (the weight's shape)")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or real-valued 0/1, got {mask.dtype}")
    if mask.is_floating_point() and bool(torch.isnan(mask).any()):
        raise ValueError(f"{name} contains NaN")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        v = mask[bad].flatten()[0].item()
        raise ValueError(f"{name} must hold only 0 and 1 (or be a bool tensor); found {v}")
    return mask != 0


def _ptr(counts: torch.Tensor, dtype) -> torch.Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr.to(dtype)


def _panel_ptr(major: torch.Tensor, minor: torch.Tensor, n_major: int, n_minor: int, dtype) -> torch.Tensor:
    """``(n_major, NP + 1)`` pointers of the entries ``(major[k], minor[k])``, sorted by (major, minor), into their
    base panels of ``minor``: entry ``[i, j]`` is the first position whose key ``(major, minor // PANEL)`` is at
    least ``(i, j)``. The keys are sorted, so that is the running count of the keys below ``(i, j)``: one
    ``bincount`` and one ``cumsum`` (a ``searchsorted`` of every (i, j) had tripled the whole build on a CPU)."""
    np_ = n_panels(n_minor)
    kdt = torch.int32 if n_major * np_ <= _INT32_MAX else torch.int64  # int32 keys: much faster on a CPU
    keys = major.to(kdt) * np_ + torch.div(minor.to(kdt), PANEL, rounding_mode="floor")
    pos = torch.zeros(n_major * np_ + 1, dtype=torch.int64, device=major.device)
    torch.cumsum(torch.bincount(keys, minlength=n_major * np_), 0, out=pos[1:])
    # row i's pointers are the counts below keys i * NP ... (i + 1) * NP: consecutive rows share their boundary
    return pos.as_strided((n_major, np_ + 1), (np_, 1)).to(dtype).contiguous()


def build_format(mask: torch.Tensor) -> SparseFormat:
    """Build the index structures of a boolean mask of any shape ``(rows, ...)`` on the mask's device.

    The mask is viewed as ``(rows, prod(rest))``. Cost: one ``nonzero`` and one stable sort of ``nnz`` keys.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("build_format expects a bool mask (use check_mask first)")
    if mask.dim() < 1:
        raise ValueError("build_format expects a mask with at least one dimension")
    rows = mask.shape[0]
    cols = math.prod(mask.shape[1:]) if mask.dim() > 1 else 1
    if rows > _INT32_MAX or cols > _INT32_MAX:  # the row and column indices are int32
        raise ValueError(f"build_format: a ({rows}, {cols}) weight has a dimension beyond 2**31 - 1, which int32 "
                         "row and column indices cannot address")
    m2 = mask.reshape(rows, cols)
    nz = m2.nonzero()  # (nnz, 2), row-major order
    nnz = nz.shape[0]
    ptr_dtype = torch.int32 if nnz <= _INT32_MAX else torch.int64
    row_idx = nz[:, 0].to(torch.int32)
    col_idx = nz[:, 1].to(torch.int32)
    row_counts = m2.sum(1, dtype=torch.int64)
    col_counts = m2.sum(0, dtype=torch.int64)
    # stable sort by column keeps rows ascending within each column (int32 keys: half the sort's time on a CPU)
    _, t_perm = torch.sort(col_idx, stable=True)
    t_row_idx = row_idx[t_perm]
    # the column of every CSC entry (ascending): a sequential fill, not a gather through t_perm
    t_col_idx = torch.repeat_interleave(torch.arange(cols, dtype=torch.int32, device=mask.device), col_counts)
    return _as_built(SparseFormat(
        rows=rows, cols=cols, nnz=nnz,
        row_ptr=_ptr(row_counts, ptr_dtype),
        col_idx=col_idx,
        row_idx=row_idx,
        col_ptr=_ptr(col_counts, ptr_dtype),
        t_row_idx=t_row_idx,
        t_perm=t_perm.to(ptr_dtype),
        row_order=torch.argsort(row_counts, descending=True, stable=True).to(torch.int32),
        col_order=torch.argsort(col_counts, descending=True, stable=True).to(torch.int32),
        row_panel_ptr=_panel_ptr(row_idx, col_idx, rows, cols, ptr_dtype),
        col_panel_ptr=_panel_ptr(t_col_idx, t_row_idx, cols, rows, ptr_dtype),
    ))


def _as_built(fmt: SparseFormat) -> SparseFormat:
    """``fmt`` marked as build_format's (right by construction: validate() skips check_contents); for the
    structures of a format built so, kept or moved (``.to()``, a layer's own)."""
    object.__setattr__(fmt, "_built", True)
    return fmt


def to_values(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The live weights of ``weight`` under ``mask`` in CSR order (a new contiguous 1-D tensor)."""
    return weight.reshape(mask.shape)[mask].contiguous()  # row-major: CSR order (also with 0 rows or columns)


def to_dense(values: torch.Tensor, fmt: SparseFormat) -> torch.Tensor:
    """The dense ``(rows, cols)`` weight whose live entries are ``values`` and whose pruned entries are 0."""
    w = torch.zeros(fmt.rows * fmt.cols, dtype=values.dtype, device=values.device)
    w[fmt.row_idx.long() * fmt.cols + fmt.col_idx.long()] = values
    return w.view(fmt.rows, fmt.cols)
