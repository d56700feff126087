"""build_format against a plain-Python construction of the same index structures."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_lth.kernels.format import PANEL, build_format, check_mask, to_dense, to_values


def _reference(mask2d: torch.Tensor) -> dict:
    """CSR, CSC (rows ascending within a column) and longest-first orders, by Python loops over the entries."""
    rows, cols = mask2d.shape
    live = [(r, c) for r in range(rows) for c in range(cols) if bool(mask2d[r, c])]
    pos = {rc: k for k, rc in enumerate(live)}                       # position of (r, c) in CSR order
    row_counts = [sum(1 for r, _ in live if r == i) for i in range(rows)]
    col_counts = [sum(1 for _, c in live if c == j) for j in range(cols)]
    csc = sorted(live, key=lambda rc: (rc[1], rc[0]))
    ptr = lambda counts: [sum(counts[:i]) for i in range(len(counts) + 1)]  # noqa: E731
    order = lambda counts: sorted(range(len(counts)), key=lambda i: (-counts[i], i))  # noqa: E731

    def panel_ptr(entries, n_major, n_minor):
        """[i][j]: position (in the order of ``entries``, sorted by major) of major i's first entry with
        minor >= j * PANEL; j runs to ceil(n_minor / PANEL) (at least 1)."""
        n_p = max(1, -(-n_minor // PANEL))
        return [[sum(1 for a, b in entries if a < i or (a == i and b < j * PANEL)) for j in range(n_p + 1)]
                for i in range(n_major)]

    return {
        "row_ptr": ptr(row_counts), "col_idx": [c for _, c in live], "row_idx": [r for r, _ in live],
        "col_ptr": ptr(col_counts), "t_row_idx": [r for r, _ in csc], "t_perm": [pos[rc] for rc in csc],
        "row_order": order(row_counts), "col_order": order(col_counts),
        "row_panel_ptr": panel_ptr(live, rows, cols), "col_panel_ptr": panel_ptr([(c, r) for r, c in csc], cols, rows),
    }


@pytest.mark.parametrize("shape,density", [
    ((1, 1), 1.0), ((1, 1), 0.0), ((7, 13), 0.5), ((7, 13), 0.0), ((7, 13), 1.0), ((20, 9), 0.1),
    ((4, 3, 3, 3), 0.3),  # a conv weight: viewed as (C_out, C_in * kh * kw)
    ((6, 300), 0.2), ((270, 4), 0.3),  # several column (row) panels, a partial last one
])
def test_build_format_matches_reference(shape, density):
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(shape, generator=g) < density
    if len(shape) == 2 and shape[0] > 2 and 0 < density < 1:
        mask[1] = False       # a row with no live weight
        mask[:, 2] = False    # a column with no live weight
        mask[0] = True        # a full row
    fmt = build_format(mask)
    m2 = mask.reshape(shape[0], -1)
    ref = _reference(m2)
    assert (fmt.rows, fmt.cols, fmt.nnz) == (m2.shape[0], m2.shape[1], int(m2.sum()))
    for name, want in ref.items():
        got = getattr(fmt, name)
        assert got.dtype in (torch.int32, torch.int64), name
        assert got.tolist() == want, name
    fmt.validate()
    assert torch.equal(fmt.mask(), m2)
    # every panel pointer pair brackets exactly the entries of its panel
    for k, (r, c) in enumerate(zip(fmt.row_idx.tolist(), fmt.col_idx.tolist())):
        assert fmt.row_panel_ptr[r, c // PANEL] <= k < fmt.row_panel_ptr[r, c // PANEL + 1]
    w = torch.randn(shape, generator=g)
    values = to_values(w, mask)
    assert torch.equal(to_dense(values, fmt), (w * mask).reshape(m2.shape))
    # the CSC view points into the same values: values[t_perm] read column by column is W^T's CSR order
    assert torch.equal(values[fmt.t_perm.long()], (w * mask).reshape(m2.shape).t()[m2.t()])


def test_build_format_refuses_bad_masks():
    with pytest.raises(TypeError, match="bool mask"):
        build_format(torch.ones(3, 3))
    with pytest.raises(ValueError, match="at least one dimension"):
        build_format(torch.tensor(True))
    with pytest.raises(ValueError, match="only 0 and 1"):
        check_mask(torch.full((2, 2), 0.5), (2, 2))
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        check_mask(torch.ones(3, 2, dtype=torch.bool), (2, 3))


def test_validated_format_is_checked_once_and_a_replaced_one_again():
    """validate() remembers a format that passed (every kernel call validates its format); a format made from it
    by dataclasses.replace is new and checked again, and tensors() hands out a fresh dict each time."""
    fmt = build_format(torch.rand(6, 9, generator=torch.Generator().manual_seed(3)) < 0.4)
    fmt.validate()
    assert fmt.__dict__.get("_validated") is True
    fmt.validate()  # the remembered answer
    with pytest.raises(dataclasses.FrozenInstanceError):  # so a checked format cannot change under it
        fmt.t_perm = fmt.t_perm[:-1]
    bad = dataclasses.replace(fmt, t_perm=fmt.t_perm[:-1])
    assert "_validated" not in bad.__dict__
    with pytest.raises(ValueError, match="t_perm"):
        bad.validate()
    with pytest.raises(ValueError, match="col_idx"):
        dataclasses.replace(fmt, col_idx=fmt.col_idx.float()).validate()
    got = fmt.tensors()
    assert list(got) == ["row_ptr", "col_idx", "row_idx", "col_ptr", "t_row_idx", "t_perm", "row_order",
                         "col_order", "row_panel_ptr", "col_panel_ptr"]
    assert all(got[k] is getattr(fmt, k) for k in got)
    got.clear()
    assert len(fmt.tensors()) == 10
    assert fmt.to("cpu").tensors().keys() == fmt.tensors().keys()


def _corrupt(fmt, name, fn):
    t = getattr(fmt, name).clone()
    fn(t)
    return dataclasses.replace(fmt, **{name: t})


def test_a_format_made_by_hand_has_its_contents_checked_once():
    """The kernels trust the index contents: a pointer past nnz segfaulted (interpreter) or read out of bounds, an
    index out of range or an inconsistent transposed view gave wrong outputs or gradients silently. A format not
    made by build_format has its contents checked at its first validate() (once: the answer is remembered);
    build_format's own formats, their .to() copies and a layer's format skip that."""
    from sparse_lth.kernels import format as F
    gen = torch.Generator().manual_seed(5)
    fmt = build_format(torch.rand(6, 8, generator=gen) < 0.4)
    n = fmt.nnz
    cases = {
        "row_ptr": [lambda t: t.__setitem__(-1, n + 1000), lambda t: t.__setitem__(0, 1),
                    lambda t: t.__setitem__(2, t[3] + 1)],
        "col_idx": [lambda t: t.__setitem__(0, 8), lambda t: t.__setitem__(0, -1),
                    lambda t: t.__setitem__(slice(0, 2), t[0:2].flip(0))],
        "row_idx": [lambda t: t.__setitem__(-1, 6)],
        "t_perm": [lambda t: t.__setitem__(0, n + 3), lambda t: t.__setitem__(0, t[1]),
                   lambda t: t.__setitem__(slice(0, 2), t[0:2].flip(0))],
        "t_row_idx": [lambda t: t.__setitem__(0, (t[0] + 1) % 6)],
        "col_ptr": [lambda t: t.__setitem__(1, t[1] + 1)],
        "row_panel_ptr": [lambda t: t.__setitem__((0, 0), 1)],
        "col_panel_ptr": [lambda t: t.__setitem__((0, 1), t[0, 1] + 1)],
        "row_order": [lambda t: t.__setitem__(0, t[1])],
        "col_order": [lambda t: t.__setitem__(0, 99)],
    }
    for name, fns in cases.items():
        for fn in fns:
            bad = _corrupt(fmt, name, fn)
            if torch.equal(getattr(bad, name), getattr(fmt, name)):
                continue  # (a flip of two equal entries changes nothing)
            with pytest.raises(ValueError, match="SparseFormat"):
                bad.validate()
            assert "_validated" not in bad.__dict__
    # right contents made by hand (another order of equally long rows, int64 pointers) pass, once
    order = fmt.row_order.clone()
    alt = dataclasses.replace(fmt, row_ptr=fmt.row_ptr.long(), row_order=torch.arange(6, dtype=torch.int32))
    alt.validate()
    assert alt.__dict__.get("_validated") and torch.equal(order, fmt.row_order)
    with pytest.raises(ValueError, match="rows must be an int"):
        dataclasses.replace(fmt, rows=6.0).validate()
    # build_format's formats (and their copies) are right by construction: not read again
    calls = []
    real = F.SparseFormat.check_contents
    try:
        F.SparseFormat.check_contents = lambda self: calls.append(1)
        build_format(torch.rand(5, 7, generator=gen) < 0.5).validate()
        build_format(torch.rand(5, 7, generator=gen) < 0.5).to("cpu").validate()
        assert calls == []
        dataclasses.replace(fmt).validate()
        assert calls == [1]
    finally:
        F.SparseFormat.check_contents = real
    with pytest.raises(ValueError, match="beyond 2\\*\\*31 - 1"):  # int32 indices: refused, not wrapped
        build_format(torch.empty(2, 2 ** 31, dtype=torch.bool, device="meta"))
