"""Data: MNIST / Fashion-MNIST from the shared folder, CIFAR-10 from small files in the real on-disk format,
deterministic resumable batches, augmentation, and clear errors."""
import gzip
import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparse_lth.data import DATASETS, NORMALIZATION, DeviceDataset, data_root, load_dataset

from conftest import SHARED_DATA as SHARED  # noqa: E402
# real per-class counts of the MNIST training set; Fashion-MNIST is balanced (6,000 / 1,000 per class)
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _snapshot(folder: pathlib.Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def shared_untouched():
    """The shared data folder must look exactly the same after the tests that read it."""
    assert SHARED.is_dir(), f"{SHARED} (the shared test data) is missing"
    before = _snapshot(SHARED)
    yield SHARED
    assert _snapshot(SHARED) == before, "files were added to or changed in the shared data folder"


# ---------------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_like_full_splits(name, shared_untouched, monkeypatch):
    monkeypatch.setenv("SPARSE_LTH_DATA", str(shared_untouched))  # found through the environment
    train = load_dataset(name, "train")
    test = load_dataset(name, "test", root=shared_untouched)
    assert (len(train), len(test)) == (60_000, 10_000)
    for d in (train, test):
        assert d.x.shape == (len(d), 1, 28, 28) and d.x.dtype == torch.float32
        assert d.y.shape == (len(d),) and d.y.dtype == torch.int64
        assert int(d.y.min()) == 0 and int(d.y.max()) == 9
        assert d.augment is False and d.name == name
    counts = train.y.bincount(minlength=10).tolist()
    assert counts == (MNIST_TRAIN_COUNTS if name == "mnist" else [6000] * 10)
    if name == "fashion_mnist":
        assert test.y.bincount(minlength=10).tolist() == [1000] * 10
    # normalized with the training set's statistics
    (mean,), (std,) = NORMALIZATION[name]
    assert abs(train.x.mean().item()) < 2e-3 and abs(train.x.std().item() - 1) < 2e-3
    assert abs(test.x.mean().item()) < 0.05 and abs(test.x.std().item() - 1) < 0.05
    assert train.x.min().item() == pytest.approx(-mean / std, abs=1e-5)
    assert train.x.max().item() == pytest.approx((1 - mean) / std, abs=1e-5)
    # pixel values come in steps of 1/255
    raw = train.x[:100] * std + mean
    assert torch.allclose(raw * 255, (raw * 255).round(), atol=1e-3)
    # `limit` keeps the first samples
    small = load_dataset(name, "train", root=shared_untouched, limit=123)
    assert len(small) == 123 and torch.equal(small.x, train.x[:123]) and torch.equal(small.y, train.y[:123])


def test_mnist_matches_torchvision_reader_and_unpacked_files(shared_untouched, tmp_path):
    """Our gzip reader against torchvision's idx reader, on files unpacked into tmp_path (never next to the
    shared files); the unpacked layout loads too."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for nm in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(shared_untouched / "MNIST" / "raw" / f"{nm}.gz", "rb") as src, open(raw / nm, "wb") as dst:
            shutil.copyfileobj(src, dst)
    ref_x = read_image_file(str(raw / "t10k-images-idx3-ubyte"))
    ref_y = read_label_file(str(raw / "t10k-labels-idx1-ubyte"))
    ours = load_dataset("mnist", "test", root=shared_untouched)
    mean, std = NORMALIZATION["mnist"][0][0], NORMALIZATION["mnist"][1][0]
    expect = (ref_x.float().div(255) - mean) / std
    assert torch.equal(ours.y, ref_y.long())
    assert torch.allclose(ours.x[:, 0], expect, atol=1e-6)
    unpacked = load_dataset("mnist", "test", root=tmp_path)  # plain (not gzipped) idx files
    assert torch.equal(unpacked.x, ours.x) and torch.equal(unpacked.y, ours.y)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 in the real cifar-10-batches-py format
# ---------------------------------------------------------------------------------------------------------------
def _write_cifar_batch(path: pathlib.Path, data: np.ndarray, labels: list, *, bytes_keys=False, numpy1=True):
    d = {"batch_label": f"batch {path.name}", "labels": labels, "data": data,
         "filenames": [f"img_{i}.png" for i in range(len(labels))]}
    if bytes_keys:  # how the python-2 pickles look when read with encoding="bytes"
        d = {k.encode(): v for k, v in d.items()}
    blob = pickle.dumps(d, protocol=2)
    if numpy1:  # the real files name numpy.core.multiarray (numpy 1); protocol 2 spells globals as text lines
        blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(blob)


@pytest.fixture
def cifar_root(tmp_path):
    """A small CIFAR-10: 5 train batches of 6 images, a test batch of 5, and batches.meta."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=6).tolist()
        _write_cifar_batch(folder / f"data_batch_{i}", x, y, numpy1=(i != 3))
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    test_y = rng.integers(0, 10, size=5).tolist()
    _write_cifar_batch(folder / "test_batch", test_x, test_y)
    meta = {"num_cases_per_batch": 6, "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                        "frog", "horse", "ship", "truck"], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return tmp_path, (np.concatenate(train_x), np.array(train_y)), (test_x, np.array(test_y))


def _normalize_cifar(flat: np.ndarray) -> torch.Tensor:
    mean, std = NORMALIZATION["cifar10"]
    x = torch.from_numpy(flat.reshape(-1, 3, 32, 32).copy()).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_cifar10_loads_real_format(cifar_root):
    root, (trx, try_), (tex, tey) = cifar_root
    train = load_dataset("cifar10", "train", root=root)
    test = load_dataset("cifar10", split="test", root=root)
    assert len(train) == 30 and len(test) == 5
    assert train.x.shape == (30, 3, 32, 32) and train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert torch.allclose(train.x, _normalize_cifar(trx), atol=1e-6)
    assert torch.allclose(test.x, _normalize_cifar(tex), atol=1e-6)
    assert train.y.tolist() == try_.tolist() and test.y.tolist() == tey.tolist()
    assert train.augment is True and test.augment is False      # default: augment the training split only
    assert load_dataset("cifar10", "train", root=root, augment=False).augment is False
    lim = load_dataset("cifar10", "train", root=root, limit=8)  # spans two batch files
    assert len(lim) == 8 and torch.equal(lim.x, train.x[:8]) and torch.equal(lim.y, train.y[:8])


def test_cifar10_matches_torchvision(cifar_root, monkeypatch):
    """torchvision's CIFAR10 reads the same files the same way (its md5 checks switched off for these files)."""
    import torchvision.datasets.cifar as tvc

    root, _, _ = cifar_root
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    for split in ("train", "test"):
        ref = tvc.CIFAR10(str(root), train=(split == "train"), download=False)
        ours = load_dataset("cifar10", split, root=root)
        ref_x = torch.from_numpy(ref.data).permute(0, 3, 1, 2)  # HWC -> CHW
        mean, std = NORMALIZATION["cifar10"]
        assert torch.allclose(ours.x * torch.tensor(std).view(1, 3, 1, 1) * 255
                              + torch.tensor(mean).view(1, 3, 1, 1) * 255, ref_x.float(), atol=1e-3)
        assert ours.y.tolist() == list(ref.targets)


def test_cifar10_bytes_keys(cifar_root):
    """Batch files whose dict keys are bytes (python-2 pickles read with encoding="bytes") load too."""
    root, _, _ = cifar_root
    x = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    _write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", x, [3, 4], bytes_keys=True)
    d = load_dataset("cifar10", "test", root=root)
    assert d.y.tolist() == [3, 4] and torch.allclose(d.x, _normalize_cifar(x), atol=1e-6)


def test_cifar10_refuses_code_in_pickles(cifar_root, tmp_path):
    root, _, _ = cifar_root
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset("cifar10", "test", root=root)
    assert not marker.exists()


def test_cifar10_bad_files(cifar_root):
    root, _, _ = cifar_root
    f = root / "cifar-10-batches-py" / "test_batch"
    _write_cifar_batch(f, np.zeros((4, 100), np.uint8), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="3072"):
        load_dataset("cifar10", "test", root=root)
    _write_cifar_batch(f, np.zeros((4, 3072), np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match="labels"):
        load_dataset("cifar10", "test", root=root)
    _write_cifar_batch(f, np.zeros((2, 3072), np.uint8), [0, 10])
    with pytest.raises(ValueError, match="labels outside"):
        load_dataset("cifar10", "test", root=root)
    f.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10"):
        load_dataset("cifar10", "test", root=root)


# ---------------------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------------------
def _toy(n=50, augment=False, c=1, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g)
    return DeviceDataset(x, torch.arange(n, dtype=torch.int64), augment)


def test_batch_is_deterministic_and_resumable():
    d = _toy()
    b = [d.batch(i, 7, seed=3) for i in range(20)]
    again = _toy()  # a fresh object (no cached permutations), visited out of order: a resumed run
    for i in (13, 2, 19, 0, 7):
        x, y = again.batch(i, 7, seed=3)
        assert torch.equal(x, b[i][0]) and torch.equal(y, b[i][1])
    it = list(again.batches(7, seed=3, start=5, stop=9))
    assert len(it) == 4 and all(torch.equal(it[k][1], b[5 + k][1]) for k in range(4))
    other = [d.batch(i, 7, seed=4)[1] for i in range(8)]
    assert not all(torch.equal(o, b[i][1]) for i, o in enumerate(other))
    for x, y in b:  # without augmentation a batch is exactly the indexed samples
        assert x.shape == (7, 1, 8, 8) and torch.equal(x, d.x[y])
    # a channels_last dataset gives channels_last batches without augmentation (as indexing did)
    cl = _toy(c=3)
    cl.x = cl.x.contiguous(memory_format=torch.channels_last)
    x, _ = cl.batch(3, 7, seed=1)
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, _toy(c=3).batch(3, 7, seed=1)[0])


@pytest.mark.parametrize("batch_size", [1, 7, 10, 50, 120])
def test_every_epoch_is_a_permutation(batch_size):
    n = 50
    d = _toy(n)
    iters = -(-3 * n // batch_size)  # enough batches to cover three epochs
    stream = torch.cat([d.batch(i, batch_size, seed=11)[1] for i in range(iters)])
    assert all(d.batch(i, batch_size, 11)[1].numel() == batch_size for i in range(3))  # always full batches
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        assert torch.equal(e.sort().values, torch.arange(n))  # each sample exactly once per epoch
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert not torch.equal(epochs[0], torch.arange(n))
    # the stream depends on (seed, epoch) only, not on the batch size
    ref = torch.cat([d.batch(i, 5, seed=11)[1] for i in range(3 * n // 5)])
    assert torch.equal(stream[:3 * n], ref)
    assert d.epoch(iters, batch_size) == iters * batch_size / n


def test_augmentation_matches_reference_and_is_deterministic():
    torch.manual_seed(0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = torch.randn(20, 3, 32, 32)
    d = DeviceDataset(x, torch.arange(20) % 10, True, mean=mean, std=std)
    plain = DeviceDataset(x, torch.arange(20) % 10, False, mean=mean, std=std)
    for it in (0, 1, 5):
        xa, ya = d.batch(it, 16, seed=2)
        xp, yp = plain.batch(it, 16, seed=2)
        assert xa.shape == xp.shape == (16, 3, 32, 32)
        assert torch.equal(ya, yp)                    # labels and sample choice unchanged
        assert not torch.equal(xa, xp)                # the images are changed
        xb, _ = d.batch(it, 16, seed=2)
        assert torch.equal(xa, xb)                    # deterministic in (seed, iteration)
        # reference: pad 4 px with a black pixel's normalized value, crop at (dy, dx), flip
        dy, dx, flip = d.augmentation_params(it, 2, 16)
        pad = [-m / s for m, s in zip(mean, std)]
        for k in range(16):
            img = torch.stack([F.pad(xp[k, ch], (4, 4, 4, 4), value=pad[ch]) for ch in range(3)])
            ref = img[:, dy[k]:dy[k] + 32, dx[k]:dx[k] + 32]
            if flip[k]:
                ref = ref.flip(-1)
            assert torch.equal(xa[k], ref), (it, k)
    assert not torch.equal(d.batch(0, 16, seed=2)[0], d.batch(0, 16, seed=3)[0])
    # both flips and several offsets occur
    dy, dx, flip = d.augmentation_params(0, 2, 256)
    assert set(flip.tolist()) == {0, 1} and len(set(dy.tolist())) > 5 and dx.min() >= 0 and dx.max() <= 8


def test_cifar_augmentation_on_loaded_data(cifar_root):
    root, _, _ = cifar_root
    train = load_dataset("cifar10", "train", root=root)
    xa, ya = train.batch(3, 8, seed=0)
    idx = train.indices(3, 8, seed=0)
    assert torch.equal(ya, train.y[idx]) and xa.shape == (8, 3, 32, 32)
    assert not torch.equal(xa, train.x[idx])
    assert torch.equal(xa, train.batch(3, 8, seed=0)[0])


def test_eval_batches_cover_everything_in_order_without_augmentation():
    d = _toy(23, augment=True, hw=32)
    parts = list(d.eval_batches(10))
    assert [p[0].shape[0] for p in parts] == [10, 10, 3]
    assert torch.equal(torch.cat([p[0] for p in parts]), d.x)
    assert torch.equal(torch.cat([p[1] for p in parts]), d.y)
    assert len(list(d.eval_batches())) == 1


def test_to_device_gives_the_same_batches():
    d = _toy(30, augment=True, c=3, hw=32)
    e = d.to("cpu")
    assert e is not d and e.device == torch.device("cpu")
    assert torch.equal(e.batch(4, 8, 1)[0], d.batch(4, 8, 1)[0])
    if torch.cuda.is_available():
        g = d.to("cuda")
        xg, yg = g.batch(4, 8, 1)
        assert xg.is_cuda and torch.equal(xg.cpu(), d.batch(4, 8, 1)[0]) and torch.equal(yg.cpu(), d.batch(4, 8, 1)[1])


def test_split_off_holds_out_a_fixed_draw():
    """The validation split: n examples drawn at random, the same draw every time (whatever the run's seed), both
    parts in their original order, disjoint and together the whole set; the held-out part is not augmented."""
    d = _toy(50, augment=True, c=3, hw=32)  # y is each sample's row
    rest, held = d.split_off(12)
    assert (len(rest), len(held)) == (38, 12)
    assert rest.augment and not held.augment and held.split == "val"
    ri, hi = rest.y.tolist(), held.y.tolist()
    assert ri == sorted(ri) and hi == sorted(hi) and sorted(ri + hi) == list(range(50))
    assert torch.equal(held.x, d.x[hi]) and torch.equal(rest.x, d.x[ri])
    assert hi != list(range(12)) and hi != list(range(38, 50))  # drawn, not the first or last ones
    again_rest, again_held = d.split_off(12)
    assert torch.equal(again_held.x, held.x) and torch.equal(again_rest.x, rest.x)
    assert not torch.equal(d.split_off(12, seed=1)[1].x, held.x)
    with pytest.raises(ValueError, match="cannot hold out 50 of 50"):
        d.split_off(50)
    with pytest.raises(ValueError, match="n must be >= 1"):
        d.split_off(0)


# ---------------------------------------------------------------------------------------------------------------
# roots and errors
# ---------------------------------------------------------------------------------------------------------------
def test_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_LTH_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("SPARSE_LTH_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "sparse_lth" / "data"
    assert data_root("~/d") == tmp_path / "home" / "d"


def test_missing_data_names_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", "train", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg and "download" in msg
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*FashionMNIST"):
        load_dataset("fashion_mnist", "test", root=tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", "train", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value) and "data_batch_5" in str(e.value)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_corrupt_idx_files(tmp_path, shared_untouched):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(shared_untouched / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", raw)
    with gzip.open(shared_untouched / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", "rb") as f:
        blob = f.read()
    (raw / "t10k-images-idx3-ubyte").write_bytes(blob[:16 + 784 * 10])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", "test", root=tmp_path)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + blob[4:])  # wrong magic
    with pytest.raises(ValueError, match="magic"):
        load_dataset("mnist", "test", root=tmp_path)
    (raw / "t10k-images-idx3-ubyte").write_bytes(blob)
    assert len(load_dataset("mnist", "test", root=tmp_path, limit=10)) == 10
    # .gz files: a gzip stream cut short (an interrupted copy), an unpacked file named .gz, garbage
    (raw / "t10k-images-idx3-ubyte").unlink()
    packed = (shared_untouched / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read_bytes()
    for content in (packed[:len(packed) // 2], blob, packed[:10] + b"\xff" * 500):
        (raw / "t10k-images-idx3-ubyte.gz").write_bytes(content)
        with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz: damaged, or not a gzip file"):
            load_dataset("mnist", "test", root=tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset.*mnist.*fashion_mnist.*cifar10"):
        load_dataset("imagenet", root=tmp_path)
    assert DATASETS == ("mnist", "fashion_mnist", "cifar10")
    with pytest.raises(ValueError, match="split"):
        load_dataset("mnist", "valid", root=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_dataset("mnist", root=tmp_path, limit=0)
    d = _toy(10)
    with pytest.raises(ValueError, match="iteration"):
        d.batch(-1, 4, 0)
    with pytest.raises(ValueError, match="batch_size"):
        d.batch(0, 0, 0)
    with pytest.raises(TypeError, match="batch_size"):
        d.batch(0, 4.0, 0)
    with pytest.raises(TypeError, match="seed"):
        d.batch(0, 4, None)
    with pytest.raises(ValueError, match="x must be"):
        DeviceDataset(torch.zeros(4, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must be"):
        DeviceDataset(torch.zeros(4, 1, 2, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="y must be"):
        DeviceDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="samples"):
        DeviceDataset(torch.zeros(4, 1, 2, 2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="mean/std"):
        DeviceDataset(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.int64), mean=(0.1,), std=(0.2,))


def test_crop_offsets_cover_every_shift_and_are_drawn_independently():
    """Row and column offsets each take all 9 values and differ (dx = dy, diagonal crops only, passed: the reference
    test rebuilds its expected output from augmentation_params itself)."""
    from sparse_lth.data import DeviceDataset
    d = DeviceDataset(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), True)
    dy, dx, flip = d.augmentation_params(0, 2, 256)
    assert set(dx.tolist()) == set(range(9)) == set(dy.tolist()) and not torch.equal(dx, dy)


def test_cifar_is_normalized_with_the_published_constants(cifar_root):
    """The per-channel mean and std as literals (the tests compared against NORMALIZATION itself: swapped
    channels passed)."""
    from sparse_lth.data import load_dataset
    root, _, _ = cifar_root
    raw = load_dataset("cifar10", "test", root=root, augment=False)
    # pixel value v in channel c -> (v/255 - mean_c) / std_c with the published constants
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    u8 = torch.round((raw.x * torch.tensor(raw.std).view(1, 3, 1, 1) + torch.tensor(raw.mean).view(1, 3, 1, 1)) * 255)
    torch.testing.assert_close(raw.x, (u8 / 255 - mean) / std, rtol=1e-5, atol=1e-5)
