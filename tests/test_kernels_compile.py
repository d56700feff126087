"""Every Triton kernel compiles for the H100/H200 (sm_90) through its real launcher, without a GPU.

The interpreter runs of the other kernel tests never compile anything; this runs benchmarks/compile_kernels.py in
a fresh process (no TRITON_INTERPRET) with Triton's bundled ptxas, so that a kernel that only the compiler would
reject fails here rather than on a rented GPU. Code generation is checked too where a regression would be silent:
the fused optimizers' aligned full blocks must use 16-byte vector loads and stores (fp32), and no optimizer kernel
may need shared memory (a layout conversion between its 1-byte mask, 2-byte or 4-byte tensors would).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["_spmm_t_kernel", "_sddmm_t_kernel", "_spmm_slab_kernel", "_sddmm_slab_kernel",
           "_sparse_conv2d_fwd_kernel", "_sparse_conv2d_bwd_input_kernel", "_sparse_conv2d_bwd_weight_kernel",
           "_sgd_kernel", "_adam_kernel"]

triton = pytest.importorskip("triton", reason="Triton is not installed (it ships with torch's Linux wheels)")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not PTXAS.exists():
        pytest.fail(f"Triton's bundled ptxas is missing ({PTXAS}); this Triton install cannot compile for CUDA")
    out = tmp_path_factory.mktemp("compile") / "sm90.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")  # compile for real, not from an earlier cache
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_kernels.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=1500, cwd=ROOT, env=env)
    assert r.returncode == 0, f"compile_kernels.py failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out.read_text()


def _rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| _")]


def test_every_kernel_compiles_for_sm90(report):
    assert "0 failed cases" in report
    rows = _rows(report)
    names = {r[0] for r in rows}
    assert set(KERNELS) <= names, f"not compiled: {set(KERNELS) - names}"
    for r in rows:
        regs = int(r[3])
        assert 0 < regs <= 255, r          # ptxas reported a real register count
        assert re.fullmatch(r"\d+/\d+", r[4]), r


def test_fused_optimizers_vectorize_aligned_blocks(report):
    rows = [r for r in _rows(report) if r[0] in ("_sgd_kernel", "_adam_kernel")
            and "PARAM_DTYPE=fp32" in r[1] and "ALIGNED=True" in r[1]]
    assert rows
    for r in rows:
        ld_v4, st_v4 = int(r[7]), int(r[9])
        assert ld_v4 >= 2 and st_v4 >= 1, f"no 16-byte vector loads/stores in {r[0]} {r[1]}"


def test_fused_optimizers_need_no_layout_conversion(report):
    """Mask (int8), bf16 and fp32 tensors of one block share one register layout: no shared-memory round trip."""
    rows = [r for r in _rows(report) if r[0] in ("_sgd_kernel", "_adam_kernel") and "ALIGNED=True" in r[1]]
    assert any("HAS_MASK=True" in r[1] for r in rows) and any("PARAM_DTYPE=bf16" in r[1] for r in rows)
    assert any("CAPTURABLE=True" in r[1] for r in rows)  # capturable Adam's fp64 bias corrections compile too
    for r in rows:
        assert int(r[6]) == 0, f"{r[0]} {r[1]} uses {r[6]} B of shared memory (a layout conversion)"
        if "PARAM_DTYPE=bf16" in r[1]:
            assert int(r[8]) >= 2, f"no 8-byte vector loads of the bf16 tensors in {r[0]} {r[1]}"
