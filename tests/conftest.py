# Triton's interpreter must be switched on before Triton is first imported: on a machine with no GPU the
# kernel tests run the very same Triton kernels on CPU tensors through it. On a GPU machine they run compiled.
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernel tests run: the GPU if there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
                        else "cpu")
