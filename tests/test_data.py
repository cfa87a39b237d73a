import numpy as np
import pytest
import torch

from lit_nas.data import (
    DEBIAN_FASHION_MNIST,
    CIFAR10DataModule,
    DatasetNotFoundError,
    EpochShuffle,
    FashionMNISTDataModule,
    SyntheticDataModule,
    random_crop_flip,
    read_idx,
)
from tests.dataset_files import skip_md5, write_idx, write_tiny_cifar10


def test_cifar10_on_disk_format_loads_through_torchvision(tmp_path, monkeypatch):
    written = write_tiny_cifar10(tmp_path, per_batch=20)
    skip_md5(monkeypatch)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, val_size=10, batch_size=8)
    assert dm.data_shape.in_channels == 3 and dm.data_shape.input_size == 32
    dm.setup()
    train, val, test = (dm._splits[k] for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (90, 10, 20)
    # pixels and labels are exactly what was written (rows are channel-major 3x32x32)
    test_data, test_labels = written["test_batch"]
    assert torch.equal(test.x, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert torch.equal(test.y, torch.from_numpy(test_labels))
    all_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    both = torch.cat([train.x, val.x])
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, all_train))
    # normalisation statistics come from the training split only
    expected_mean = train.x.float().div(255).mean(dim=(0, 2, 3))
    torch.testing.assert_close(dm.mean, expected_mean)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32) and y.dtype == torch.long
    xn, _ = dm.prepare_batch((x, y), train=True)
    assert xn.dtype == torch.float32 and xn.shape == x.shape


def test_cifar10_split_is_fixed_by_seed(tmp_path, monkeypatch):
    write_tiny_cifar10(tmp_path)
    skip_md5(monkeypatch)

    def val_labels(split_seed):
        dm = CIFAR10DataModule(root=str(tmp_path), download=False, val_size=10, split_seed=split_seed)
        dm.setup()
        return dm._splits["val"].x

    assert torch.equal(val_labels(0), val_labels(0))
    assert not torch.equal(val_labels(0), val_labels(1))


def test_cifar10_missing_offline_says_how_to_get_it(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-python\.tar\.gz"):
        dm.setup()


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files_from_a_root(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (30,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (12,)),
    }
    for name, arr in arrays.items():
        write_idx(tmp_path / (name + (".gz" if gz else "")), arr, gz)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=5)
    train_x, _train_y, test_x, test_y = dm.load_arrays()
    assert train_x.shape == (30, 1, 28, 28) and test_x.shape == (12, 1, 28, 28)
    assert torch.equal(test_y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert torch.equal(train_x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="is not a uint8 IDX file"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("lit_nas.data.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    dm = FashionMNISTDataModule(root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.setup()


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist_from_debian_package():
    dm = FashionMNISTDataModule()
    dm.setup()
    assert (len(dm._splits["train"]), len(dm._splits["val"]), len(dm._splits["test"])) == (55000, 5000, 10000)
    assert torch.bincount(dm._splits["test"].y).tolist() == [1000] * 10
    assert 0.25 < dm.mean.item() < 0.32  # Fashion-MNIST's mean pixel is about 0.286


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).reshape(2, 1, 8, 8)
    out = random_crop_flip(x, pad=2, flip=False, generator=g)
    padded = torch.nn.functional.pad(x.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):
        windows = [padded[i, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = random_crop_flip(x, pad=0, flip=True, generator=torch.Generator().manual_seed(3))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    many = random_crop_flip(x.repeat(64, 1, 1, 1), pad=0, generator=torch.Generator().manual_seed(1))
    n_flipped = sum(not torch.equal(m, x[i % 2]) for i, m in enumerate(many))
    assert 30 < n_flipped < 98  # about half


def test_epoch_shuffle_depends_only_on_seed_and_epoch():
    a, b = EpochShuffle(100, seed=7), EpochShuffle(100, seed=7)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(100))
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(a) != list(EpochShuffle(100, seed=8))


def test_augmentation_only_on_training_batches():
    dm = SyntheticDataModule(num_train=64, num_test=32, input_size=16, augment=True)
    dm.setup()
    batch = (dm._splits["val"].x[:16], dm._splits["val"].y[:16])
    plain1, _ = dm.prepare_batch(batch, train=False)
    plain2, _ = dm.prepare_batch(batch, train=False)
    torch.testing.assert_close(plain1, plain2)
    aug, _ = dm.prepare_batch(batch, train=True, epoch=0)
    assert not torch.allclose(aug, plain1)
    dm._aug = None
    again, _ = dm.prepare_batch(batch, train=True, epoch=0)
    torch.testing.assert_close(aug, again)  # same epoch, same draws


def test_the_data_goes_to_a_cuda_device_unless_told_otherwise():
    from lit_nas.data import data_device

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert data_device(None, cuda) == cuda and data_device(True, cuda) == cuda
    assert data_device(None, cpu) is None and data_device(False, cuda) is None
    assert (
        data_device(True, cpu) == cpu and data_device(None, None) is None and data_device(True, None) is None
    )


@pytest.mark.gpu
def test_on_a_gpu_the_images_live_there_and_a_step_copies_none(tmp_path):
    from lit_nas.data import SyntheticDataModule
    from tests.helpers import tiny_module, tiny_trainer

    dm = SyntheticDataModule(num_train=160, num_test=64, input_size=16, batch_size=32)
    trainer = tiny_trainer(tmp_path, accelerator="gpu", deterministic="warn")
    trainer.fit(tiny_module(), datamodule=dm)
    assert all(ds.x.is_cuda and ds.y.is_cuda for ds in dm._splits.values())
    x, y = next(iter(dm.train_dataloader()))  # straight from the loader: already on the device
    assert x.is_cuda and y.is_cuda and x.dtype == torch.uint8
    with pytest.raises(ValueError, match="num_workers: 0"):
        bad = SyntheticDataModule(num_train=160, num_test=64, input_size=16, batch_size=32, num_workers=2)
        tiny_trainer(tmp_path, accelerator="gpu", deterministic="warn").fit(tiny_module(), datamodule=bad)
