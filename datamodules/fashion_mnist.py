"""FashionMNIST (60k train / 10k test, 28x28 grey, 10 classes), the full real set.

Sources, first that works: torchvision's files already in ``<root>/FashionMNIST/raw``; the Debian package
``dataset-fashion-mnist`` (gunzipped into that folder; copying the ``.gz`` files is not enough because they
were recompressed and fail torchvision's checksums); torchvision's download.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import FashionMNIST

from datamodules.vision import VisionDataModule

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _has_raw(root: Path, folder: str) -> bool:
    return all((root / folder / "raw" / name).is_file() for name in RAW_FILES)


class FashionMNISTDataModule(VisionDataModule):
    """Full FashionMNIST; see the module docstring for where the files come from."""

    name = "fashion_mnist"
    input_shape = (1, 28, 28)
    num_classes = 10
    dataset_mean = (0.2860,)
    dataset_std = (0.3530,)
    class_names = FashionMNIST.classes

    def prepare_data(self) -> None:
        root = Path(self.root)
        if _has_raw(root, "FashionMNIST"):
            self.source = f"torchvision files in {root / 'FashionMNIST/raw'}"
            return
        debian = DEBIAN_DIR
        if all((debian / f"{name}.gz").is_file() for name in RAW_FILES):
            raw = root / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for name in RAW_FILES:
                tmp = raw / f"{name}.part"
                with gzip.open(debian / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.replace(raw / name)
            self.source = f"Debian package dataset-fashion-mnist ({debian})"
            return
        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as error:  # any network/IO failure ends in the same instruction
            raise FileNotFoundError(
                f"FashionMNIST is not in {root / 'FashionMNIST/raw'} and could not be downloaded ({error}); "
                "install it with `apt-get install dataset-fashion-mnist` or run once with internet access."
            ) from None
        self.source = "torchvision download"

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not self.source:
            self.prepare_data()
        train = FashionMNIST(self.root, train=True, download=False)
        test = FashionMNIST(self.root, train=False, download=False)
        return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long()
