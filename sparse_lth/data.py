"""Datasets held in full on the training device, with deterministic, resumable batches.

Where the data is read from (:func:`data_root`): the ``root`` argument, else ``$SPARSE_LTH_DATA``, else
``~/.cache/sparse_lth/data``. Under it, the layout torchvision uses:

- ``MNIST/raw/`` and ``FashionMNIST/raw/``: the four idx files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
  gzipped (``.gz``, as distributed) or unpacked. They are read directly with gzip + numpy: nothing is unpacked,
  copied or cached, and nothing is ever written under the data root (which may be read-only).
- ``cifar-10-batches-py/``: the real CIFAR-10 python format (pickled ``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``; ``batches.meta`` is not needed). The pickles are read with a restricted unpickler that only
  accepts plain containers and numpy arrays (torchvision's ``CIFAR10`` class reads the same files, but insists on
  the md5 sums of the official files).

Nothing is ever downloaded: missing files raise ``FileNotFoundError`` naming the folder and the files expected.

Normalization: per-channel mean/std of each training set, applied to both splits (constants below): MNIST
0.1307 / 0.3081, Fashion-MNIST 0.2860 / 0.3530, CIFAR-10 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616).

Batches (:meth:`DeviceDataset.batch`): the training stream is the concatenation of epochs, each epoch a random
permutation of the N samples drawn from a generator seeded by (seed, epoch). Batch ``i`` of size B is positions
``[i*B, (i+1)*B)`` of that stream, so the last partial batch of an epoch *wraps* into the next epoch (no sample
is dropped, every batch is full, and an epoch is N/B iterations, possibly fractional). Augmentation of batch
``i`` is drawn from a generator seeded by (seed, i). Both generators are CPU ``torch.Generator`` s, so the batches
are the same on every device, and a run resumed at iteration i sees exactly the batches it would have seen: no
RNG state needs saving.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import operator
import os
import pathlib
import pickle
import zlib
from typing import Iterator

import numpy as np
import torch

__all__ = ["DATASETS", "DeviceDataset", "data_root", "load_dataset", "NORMALIZATION", "ENV_DATA", "INPUT_SHAPES",
           "TRAIN_SIZES"]

DATASETS = ("mnist", "fashion_mnist", "cifar10")
ENV_DATA = "SPARSE_LTH_DATA"
DEFAULT_ROOT = "~/.cache/sparse_lth/data"

# Per-channel mean and std of the *training* images scaled to [0, 1] (MNIST/Fashion-MNIST: computed from the files
# in /work/shared/data, 0.130660 / 0.308108 and 0.286041 / 0.353024; CIFAR-10: the usual per-channel figures of
# its 50,000 training images).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# (C, H, W) of one example, as load_dataset gives it.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
# Training examples in each dataset's files (the standard releases): what an experiment's --plan checks a
# validation split against without reading them.
TRAIN_SIZES: dict[str, int] = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}
_NUM_CLASSES = 10
_CROP_PAD = 4


def data_root(root: str | os.PathLike | None = None) -> pathlib.Path:
    """The data folder: ``root`` if given, else ``$SPARSE_LTH_DATA``, else ``~/.cache/sparse_lth/data``."""
    if root is None:
        root = os.environ.get(ENV_DATA) or DEFAULT_ROOT
    return pathlib.Path(os.path.expanduser(os.fspath(root)))


def _stream_seed(seed: int, kind: str, index: int) -> int:
    """A well-mixed 63-bit seed for the generator of (seed, kind, index)."""
    h = hashlib.blake2b(f"sparse_lth/{kind}/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _index(name: str, value, low: int) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


class DeviceDataset:
    """A whole dataset as two tensors on one device.

    ``x``: (N, C, H, W) float32, normalized; ``y``: (N,) int64; ``augment``: apply CIFAR-style augmentation
    (4-pixel padded random crop + random horizontal flip, on x's device) to the training batches of
    :meth:`batch`. ``mean``/``std`` (per channel) are the normalization that was applied; the crop pads with the
    normalized value of a black pixel, ``-mean/std`` (as torchvision's RandomCrop before Normalize), or 0 when
    they are not given.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool = False, *, name: str = "",
                 split: str = "", mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 num_classes: int = _NUM_CLASSES):
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be tensors")
        if x.dim() != 4 or x.dtype != torch.float32:
            raise ValueError(f"x must be a (N, C, H, W) float32 tensor, got shape {tuple(x.shape)} {x.dtype}")
        if y.dim() != 1 or y.dtype != torch.int64:
            raise ValueError(f"y must be a (N,) int64 tensor, got shape {tuple(y.shape)} {y.dtype}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError("a DeviceDataset needs at least one sample")
        if x.device != y.device:
            raise ValueError(f"x is on {x.device} but y is on {y.device}")
        if not isinstance(augment, bool):
            raise TypeError(f"augment must be a bool, got {type(augment).__name__}")
        c = x.shape[1]
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mean is not None and (len(mean) != c or len(std) != c):
            raise ValueError(f"mean/std need {c} entries (one per channel), got {len(mean)}/{len(std)}")
        self.x = x
        self.y = y
        self.augment = augment
        self.name = name
        self.split = split
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        self.num_classes = num_classes
        if mean is not None:
            pad = [-m / s for m, s in zip(self.mean, self.std)]
        else:
            pad = [0.0] * c
        self._pad_value = torch.tensor(pad, dtype=torch.float32, device=x.device)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return (f"DeviceDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.x.shape[1:])}, device={self.device}, augment={self.augment})")

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def epoch(self, iteration: int, batch_size: int) -> float:
        """The (fractional) epoch at which batch ``iteration`` starts: iteration * batch_size / N."""
        return iteration * batch_size / len(self)

    def to(self, device) -> "DeviceDataset":
        """The same data on ``device`` (a new object; batches are identical on every device)."""
        device = torch.device(device)
        return DeviceDataset(self.x.to(device), self.y.to(device), self.augment, name=self.name,
                             split=self.split, mean=self.mean, std=self.std, num_classes=self.num_classes)

    def split_off(self, n: int, seed: int = 0) -> tuple["DeviceDataset", "DeviceDataset"]:
        """``(rest, held_out)``: ``n`` examples drawn at random (a draw fixed by ``seed``, the same on every device
        and for every run seed, so that every experiment on this data holds out the same examples) and the others,
        each in its original order. The held-out part is never augmented (split ``"val"``): the paper's
        validation set, 5,000 of MNIST's 60,000 training images."""
        n = _index("n", n, 1)
        if n >= len(self):
            raise ValueError(f"cannot hold out {n} of {len(self)} examples: at least one must stay for training")
        g = torch.Generator().manual_seed(_stream_seed(seed, "validation", n))
        perm = torch.randperm(len(self), generator=g)
        held, rest = perm[:n].sort().values.to(self.device), perm[n:].sort().values.to(self.device)
        kw = dict(name=self.name, mean=self.mean, std=self.std, num_classes=self.num_classes)
        return (DeviceDataset(self.x[rest], self.y[rest], self.augment, split=self.split, **kw),
                DeviceDataset(self.x[held], self.y[held], False, split="val", **kw))

    # ----------------------------------------------------------------------------------------------------------
    def _perm(self, seed: int, epoch: int) -> torch.Tensor:
        key = (seed, epoch)
        p = self._perms.get(key)
        if p is None:
            g = torch.Generator().manual_seed(_stream_seed(seed, "epoch", epoch))
            p = _to_device(torch.randperm(len(self), generator=g), self.device)
            if len(self._perms) >= 4:  # the stream only ever needs the current and the next epoch
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = p
        return p

    def indices(self, iteration: int, batch_size: int, seed: int) -> torch.Tensor:
        """Sample indices (int64, on the dataset's device) of training batch ``iteration``."""
        iteration = _index("iteration", iteration, 0)
        batch_size = _index("batch_size", batch_size, 1)
        seed = _index("seed", seed, -(1 << 62))
        n = len(self)
        start, stop = iteration * batch_size, (iteration + 1) * batch_size
        e0, e1 = start // n, (stop - 1) // n
        if e0 == e1:
            return self._perm(seed, e0)[start - e0 * n: stop - e0 * n]
        stream = torch.cat([self._perm(seed, e) for e in range(e0, e1 + 1)])
        return stream[start - e0 * n: stop - e0 * n]

    def batch(self, iteration: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch ``iteration`` (see the module docstring): deterministic in (seed, iteration,
        batch_size), augmented when ``self.augment``. Returns (x, y) on the dataset's device."""
        idx = self.indices(iteration, batch_size, seed)
        # index_select, not x[idx]: the same rows, without advanced indexing's Python-side dispatch (~40 us a step
        # on a CPU, 2 % of a LeNet-300-100 round)
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        if not self.x.is_contiguous() and self.x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # (as x[idx] kept it; index_select makes NCHW)
        if self.augment:
            x = self._augment(x, iteration, seed)
        return x, y

    def batches(self, batch_size: int, seed: int, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``batch(i, batch_size, seed)`` for i = start, start + 1, ... up to ``stop`` (exclusive; None: forever)."""
        start = _index("start", start, 0)
        if stop is not None:
            stop = _index("stop", stop, 0)
        i = start
        while stop is None or i < stop:
            yield self.batch(i, batch_size, seed)
            i += 1

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample once, in order, without augmentation (the last batch may be smaller)."""
        batch_size = _index("batch_size", batch_size, 1)
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]

    # ----------------------------------------------------------------------------------------------------------
    def augmentation_params(self, iteration: int, seed: int, batch_size: int) -> tuple[torch.Tensor, ...]:
        """The (dy, dx, flip) drawn for batch ``iteration``: crop offsets in [0, 2*4] into the 4-pixel padded
        image and a 0/1 flip flag per sample (CPU int64 tensors)."""
        g = torch.Generator().manual_seed(_stream_seed(seed, "augment", iteration))
        dy = torch.randint(0, 2 * _CROP_PAD + 1, (batch_size,), generator=g)
        dx = torch.randint(0, 2 * _CROP_PAD + 1, (batch_size,), generator=g)
        flip = torch.randint(0, 2, (batch_size,), generator=g)
        return dy, dx, flip

    def _augment(self, x: torch.Tensor, iteration: int, seed: int) -> torch.Tensor:
        b, c, h, w = x.shape
        dy, dx, flip = _to_device(torch.stack(self.augmentation_params(iteration, seed, b)), x.device)
        p = _CROP_PAD
        padded = self._pad_value.view(1, c, 1, 1).expand(b, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p:p + h, p:p + w] = x
        rows = dy[:, None] + torch.arange(h, device=x.device)                       # (B, H)
        ar = torch.arange(w, device=x.device)
        cols = dx[:, None] + torch.where(flip[:, None].bool(), w - 1 - ar, ar)      # (B, W): crop, then flip
        out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * p))    # pick rows, then columns
        return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` in one transfer. To a GPU through pinned memory, without blocking: a copy
    from pageable memory waits for every kernel queued on the device (a sync at every augmented step, so the host
    could not run ahead of the GPU)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------------------------
def _missing(folder: pathlib.Path, files: list[str], what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found: expected the files {', '.join(files)} in the folder {folder} "
        f"(nothing can be downloaded here; put the files there, or point the `root` argument or "
        f"${ENV_DATA} at a folder holding them)")


def _read_idx(path: pathlib.Path, ndim: int, limit: int | None) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzipped or not), only the first ``limit`` items if given."""
    if path.suffix != ".gz":
        return _read_idx_from(open, path, ndim, limit)
    try:
        return _read_idx_from(gzip.open, path, ndim, limit)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # an interrupted copy, a file unpacked but named .gz
        raise ValueError(f"{path}: damaged, or not a gzip file ({type(e).__name__}: {e}); copy it again, or "
                         f"unpack it to {path.with_suffix('').name} beside it") from None


def _read_idx_from(opener, path: pathlib.Path, ndim: int, limit: int | None) -> np.ndarray:
    with opener(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
        if len(header) != 4 + 4 * ndim:
            raise ValueError(f"{path}: truncated idx header")
        magic = int.from_bytes(header[:4], "big")
        if magic != 0x0800 + ndim:
            raise ValueError(f"{path}: not an idx file of unsigned bytes with {ndim} dimensions "
                             f"(magic {magic:#010x}, expected {0x0800 + ndim:#010x})")
        dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        n = dims[0] if limit is None else min(dims[0], limit)
        item = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
        data = f.read(n * item)
    if len(data) != n * item:
        raise ValueError(f"{path}: truncated, expected {n * item} bytes of data, got {len(data)}")
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(n, *dims[1:])


def _load_idx_dataset(folder: pathlib.Path, split: str, limit: int | None, what: str):
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = []
    for nm in names:
        for cand in (folder / f"{nm}.gz", folder / nm):
            if cand.is_file():
                paths.append(cand)
                break
    if len(paths) != 2:
        raise _missing(folder, [f"{nm}.gz" for nm in names], f"{what} ({split})")
    images = _read_idx(paths[0], 3, limit)
    labels = _read_idx(paths[1], 1, limit)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images[:, None], labels  # (N, 1, 28, 28), (N,)


class _CifarUnpickler(pickle.Unpickler):
    """Only what a CIFAR-10 batch file holds: dicts, lists, str/bytes, ints and numpy arrays."""

    _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}

    def find_class(self, module, name):
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # the real files name numpy.core (numpy 1)
            module = "numpy._core." + module[len("numpy.core."):]
        elif module.startswith("numpy._core.") and not hasattr(np, "_core"):
            module = "numpy.core." + module[len("numpy._core."):]
        if (module.replace("numpy.core.", "numpy._core."), name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch file")


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            d = _CifarUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        except Exception as e:  # noqa: BLE001 - turned into a clear error
            raise ValueError(f"{path}: not a CIFAR-10 python batch file ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python batch file (a {type(d).__name__}, not a dict)")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path}: a CIFAR-10 batch file needs the keys 'data' and 'labels', has {sorted(d)}")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be (n, 3072) uint8, got {data.shape} {data.dtype}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: pathlib.Path, split: str, limit: int | None):
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / nm).is_file() for nm in names):
        raise _missing(folder, names, f"CIFAR-10 ({split})")
    xs, ys, n = [], [], 0
    for nm in names:
        x, y = _read_cifar_batch(folder / nm)
        xs.append(x)
        ys.append(y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    x, y = np.concatenate(xs), np.concatenate(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", augment: bool | None = None,
                 limit: int | None = None) -> DeviceDataset:
    """Load ``name`` (one of :data:`DATASETS`), split ``"train"`` or ``"test"``, normalized, onto ``device``.

    ``augment``: ``None`` means True for the CIFAR-10 training split and False otherwise. ``limit``: keep only the
    first ``limit`` samples. Files are read from :func:`data_root` ``(root)``; see the module docstring.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None:
        limit = _index("limit", limit, 1)
    if augment is None:
        augment = name == "cifar10" and split == "train"
    if not isinstance(augment, bool):
        raise TypeError(f"augment must be a bool or None, got {type(augment).__name__}")
    device = torch.device(device)
    root = data_root(root)
    if name == "cifar10":
        images, labels = _load_cifar10(root, split, limit)
    else:
        folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        images, labels = _load_idx_dataset(folder, split, limit, "MNIST" if name == "mnist" else "Fashion-MNIST")
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise ValueError(f"{name} ({split}): labels outside [0, {_NUM_CLASSES}): {labels.min()}..{labels.max()}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} ({split}) holds no samples")
    mean, std = NORMALIZATION[name]
    u8 = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    x = (u8.to(torch.float32).div_(255.0) - m).div_(s)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return DeviceDataset(x, y, augment, name=name, split=split, mean=mean, std=std)
