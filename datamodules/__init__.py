"""Datamodules: real loading paths plus the offline sources of shared/DATA.md, all in-memory and index-batched."""

from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.hf_dataset import HFImageDataModule, HFTextDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist import MNISTDataModule
from datamodules.sst2 import SST2DataModule
from datamodules.table import TableDataModule
from datamodules.tabular import TabularDataModule
from datamodules.tensor_data import TensorDataModule

__all__ = [
    "TensorDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "HFImageDataModule",
    "HFTextDataModule",
    "MNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "TabularDataModule",
    "TableDataModule",
    "SST2DataModule",
]
