# Triton's interpreter must be switched on before Triton is first imported: on a machine with no GPU the
# kernel tests run the very same Triton kernels on CPU tensors through it. On a GPU machine they run compiled.
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def find_shared_data() -> pathlib.Path:
    """The real MNIST / Fashion-MNIST folder: $SPARSE_LTH_DATA, else ../shared/data beside the checkout (as in
    CI), else /work/shared/data; the first of these paths when none holds the data. Only the tests that read it
    need it, and they fail (never skip) when it is missing (``require_shared_data``); the others, e.g. the kernel
    tests run on a GPU machine that has no copy of the data, do not depend on it."""
    candidates = [p for p in (os.environ.get("SPARSE_LTH_DATA"), REPO.parent / "shared" / "data",
                              "/work/shared/data") if p]
    for p in candidates:
        if (pathlib.Path(p) / "MNIST" / "raw").is_dir():
            return pathlib.Path(p)
    return pathlib.Path(candidates[0])


SHARED_DATA = find_shared_data()


def pytest_report_header(config):
    """Which Triton runs the kernel tests, and (before 100 tests fail with the same TypeError) whether this
    Triton's interpreter can run with this NumPy at all."""
    from sparse_lth.kernels import _triton

    if not _triton.HAS_TRITON:
        return "triton: not installed (the kernel tests fail)"
    mode = "interpreter (TRITON_INTERPRET=1)" if _triton.interpreting() else "compiled"
    lines = [f"triton {_triton.triton.__version__}: {mode}"]
    if _triton.interpreting() and _triton._interpreter_problem():
        lines.append(f"WARNING: {_triton._interpreter_problem()}")
    return lines


def require_shared_data() -> pathlib.Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        raise FileNotFoundError(f"the shared data folder (MNIST/raw, FashionMNIST/raw) was not found at "
                                f"{SHARED_DATA}: set SPARSE_LTH_DATA or put it at ../shared/data beside the checkout")
    return SHARED_DATA


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernel tests run: the GPU if there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
                        else "cpu")


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is many times faster than two on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def threads():
    """The process's torch thread count, restored after the test (scripts' and examples' --threads set it)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny_data(n_train=200, n_test=100, seed=0):
    """A learnable 10-class problem on 28x28 inputs (a random prototype per class, plus noise), as
    (train, test) DeviceDatasets: fast stand-ins for MNIST in the training and IMP tests."""
    from sparse_lth.data import DeviceDataset

    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x = protos[y] + 2.0 * torch.randn(n_train + n_test, 1, 28, 28, generator=g)
    return (DeviceDataset(x[:n_train].contiguous(), y[:n_train].contiguous()),
            DeviceDataset(x[n_train:].contiguous(), y[n_train:].contiguous()))


class OpLog(TorchFunctionMode):
    """``with OpLog() as log: ...``: the names of the torch functions called inside, in order (``log.names``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))
