"""Packaging: ``kernels/`` is ``sparse_lth.kernels`` both installed and straight from a source checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_from_a_source_checkout(tmp_path):
    # -S: no site-packages, so no installed or editable sparse_lth can answer; only the checkout on sys.path
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import sparse_lth.kernels as k, sparse_lth; "
            "print(k.__file__); print('kernels' in sys.modules)")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    path, toplevel = r.stdout.split()
    assert Path(path) == ROOT / "kernels" / "__init__.py"
    assert toplevel == "False"  # no top-level module named `kernels` is created


def test_kernels_subpackage_as_imported_here():
    import sparse_lth.kernels.format as fmt
    assert Path(fmt.__file__).resolve().parent.name == "kernels"
    assert fmt.__name__ == "sparse_lth.kernels.format"
