"""ImageFolderDataModule on real images: FashionMNIST written as PNG folders by the tests themselves."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.datasets import FashionMNIST
from torchvision.io import write_png

from conftest import ROOT, png_folder, quiet, run_cli, summary
from datamodules import ImageFolderDataModule

CLASSES = ["Ankle boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker", "T-shirt_top", "Trouser"]


@pytest.fixture
def folder(tmp_path) -> Path:
    """A private copy of the 20-per-class PNG folder (train/ and test/), free to damage."""
    return Path(shutil.copytree(png_folder(), tmp_path / "png", ignore=shutil.ignore_patterns(".morphlab-cache")))


def dm(root: Path, **kwargs) -> ImageFolderDataModule:
    module = ImageFolderDataModule(root=str(root), image_size=28, channels=1, **kwargs)
    module.setup("fit")
    return module


def test_the_pixels_and_labels_are_fashion_mnist_s_own(folder):
    data = dm(folder)
    assert data.class_names == CLASSES and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    source = FashionMNIST(str(ROOT / "data"), train=False, download=False)
    x, y = data.splits["test"]
    assert len(data.sample_ids["test"]) == len(x) == 200
    for i in (0, 57, 199):  # PNG is lossless: the decoded image is the dataset's, under its class's folder
        path = Path(data.sample_ids["test"][i])
        index = int(path.stem)
        assert torch.equal(x[i, 0], source.data[index])
        assert source.classes[int(source.targets[index])].replace("/", "_") == path.parent.name == CLASSES[int(y[i])]
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    train_n, val_n = len(data.splits["train"][0]), len(data.splits["val"][0])
    assert (train_n, val_n) == (180, 20)  # val_fraction 0.1 of train/, stratified


def test_a_second_run_reads_the_cache_and_a_touched_file_is_decoded_again(folder):
    first = dm(folder)
    assert "decoded" in first.source and list((folder / ".morphlab-cache").glob("*.pt"))
    second = dm(folder)
    assert "cached tensors" in second.source
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(first.splits[split], second.splits[split]))
    image = next((folder / "train" / "Bag").iterdir())
    write_png(torch.zeros(1, 28, 28, dtype=torch.uint8), str(image))
    os.utime(image, ns=(1, 1))
    third = dm(folder)
    assert "decoded" in third.source
    assert not all(torch.equal(a, b) for a, b in zip(first.splits["train"], third.splits["train"]))


def test_a_flat_folder_gets_a_stratified_test_split_and_a_val_folder_is_used(folder, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(folder / "train", flat)
    data = dm(flat, test_fraction=0.25)
    assert torch.bincount(data.splits["test"][1], minlength=10).tolist() == [5] * 10
    assert len(data.splits["train"][0]) + len(data.splits["val"][0]) == 150
    assert all(Path(p).parent.name in CLASSES and len(Path(p).parts) == 2 for p in data.sample_ids["test"])  # <class>/<file>
    shutil.copytree(folder / "test", folder / "val")
    with_val = dm(folder)
    assert len(with_val.splits["train"][0]) == 200 and len(with_val.splits["val"][0]) == 200
    assert torch.equal(with_val.splits["val"][0], with_val.splits["test"][0])


def test_color_and_size_are_converted(folder):
    data = ImageFolderDataModule(root=str(folder), image_size=16, channels=3)
    data.setup("fit")
    x = data.splits["test"][0]
    assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 1])  # a grey image as RGB: three equal planes


def test_an_unreadable_image_is_skipped_and_counted(folder):
    (folder / "train" / "Bag" / "broken.png").write_bytes(b"not a png")
    data = dm(folder)
    assert "1 unreadable file(s) skipped" in data.source
    assert len(data.splits["train"][0]) + len(data.splits["val"][0]) == 200


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: shutil.rmtree(f), r"no such directory"),
        (lambda f: [shutil.rmtree(p) for p in (f / "train").iterdir() if p.name != "Bag"], r"one class folder \(Bag\)"),
        (lambda f: (f / "train" / "Empty").mkdir(), r"class folder .*Empty is empty"),
        (lambda f: (f / "test" / "Unicorn").mkdir(), r"class folder\(s\) \['Unicorn'\] that the training folder does not have"),
        (lambda f: [p.rename(p.with_suffix(".txt")) for p in (f / "train" / "Coat").iterdir()], r"Coat holds no file with an image extension"),
    ],
    ids=["missing root", "one class", "empty class", "unknown test class", "no image files"],
)
def test_bad_folders_are_refused_in_one_sentence(folder, damage, message):
    damage(folder)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        dm(folder)


def test_the_baseline_fits_on_an_image_folder_from_the_cli(folder, tmp_path):
    cli = run_cli("fit", "--config", str(ROOT / "configs/fashion_mnist_png/baseline.yaml"),
                  f"--data.init_args.root={folder}", "--trainer.max_epochs=2", *quiet(tmp_path))
    result = summary(Path(cli.trainer.log_dir))
    assert result["dataset"] == "image_folder" and result["epochs"] == 2
    assert result["metrics"]["test/acc"] > 0.5  # 10 classes, 180 training images

    best = cli.trainer.checkpoint_callback.best_model_path
    predicted = run_cli("predict", "--config", str(ROOT / "configs/fashion_mnist_png/baseline.yaml"),
                        f"--data.init_args.root={folder}", f"--ckpt_path={best}", *quiet(tmp_path, "predict"))
    rows = list(csv.DictReader(open(Path(predicted.trainer.log_dir) / "predictions.csv")))
    assert len(rows) == 200 and list(rows[0]) == ["sample", "predicted", "label", *(f"p_{c}" for c in CLASSES)]
    assert all((folder / r["sample"]).is_file() and Path(r["sample"]).parent.name == r["label"] for r in rows)
    accuracy = sum(r["predicted"] == r["label"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(result["metrics"]["test/acc"], abs=1e-6)  # the checkpoint fit tested


def test_predict_root_classifies_unlabelled_images_by_path(folder, tmp_path):
    """Unlabelled images (flattened, no class folders): predictions.csv names each file and has no label column."""
    unlabelled = tmp_path / "inbox"
    (unlabelled / "day1").mkdir(parents=True)
    originals = sorted((folder / "test").rglob("*.png"))[:30]
    for i, image in enumerate(originals):
        shutil.copy(image, unlabelled / ("day1" if i % 2 else "") / f"img{i:02d}.png")
    (unlabelled / "notes.txt").write_text("not an image")
    cli = run_cli("fit", "--config", str(ROOT / "configs/fashion_mnist_png/baseline.yaml"), f"--data.init_args.root={folder}",
                  "--trainer.max_epochs=1", "--test_after_fit=false", *quiet(tmp_path))
    predicted = run_cli("predict", "--config", str(ROOT / "configs/fashion_mnist_png/baseline.yaml"),
                        f"--data.init_args.root={folder}", f"--data.init_args.predict_root={unlabelled}",
                        f"--ckpt_path={cli.trainer.checkpoint_callback.best_model_path}", *quiet(tmp_path, "predict"))
    rows = list(csv.DictReader(open(Path(predicted.trainer.log_dir) / "predictions.csv")))
    assert len(rows) == 30 and "label" not in rows[0] and {r["predicted"] for r in rows} <= set(CLASSES)
    assert sorted(r["sample"] for r in rows) == sorted(str(p.relative_to(unlabelled)) for p in unlabelled.rglob("*.png"))
    with pytest.raises(FileNotFoundError, match="predict_root"):
        ImageFolderDataModule(root=str(folder), predict_root=str(tmp_path / "absent"))
