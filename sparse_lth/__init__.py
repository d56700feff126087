"""sparse-lth: lottery tickets by iterative magnitude pruning, trained sparse."""
import os as _os

__version__ = "0.1.0"

# An installed package holds its kernels as ``sparse_lth/kernels`` (setup.py maps the repository's top-level
# ``kernels/`` there). Run from a source checkout without installing (``PYTHONPATH=<repo>``, e.g. on a machine
# without network access for pip), the subpackage lives beside this folder: let ``sparse_lth.kernels`` find it.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "kernels")) and \
        _os.path.isfile(_os.path.join(_here, _os.pardir, "kernels", "__init__.py")):
    __path__.append(_os.path.normpath(_os.path.join(_here, _os.pardir)))  # noqa: F821 - the package's __path__
del _here
