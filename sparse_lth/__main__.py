"""``python -m sparse_lth``: the command line (the same as the ``sparse-lth`` script), also from a source checkout
run without installing (``PYTHONPATH=<repo>``)."""
import sys

from .cli import main

sys.exit(main())
