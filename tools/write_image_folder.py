"""Write FashionMNIST (real, offline: see datamodules/fashion_mnist.py) as PNG files in torchvision's ImageFolder
layout, ``<out>/train/<class>/<index>.png`` and ``<out>/test/<class>/<index>.png``: a folder of real images for
``datamodules.ImageFolderDataModule`` (``make data-folders``; configs/data/fashion_mnist_png.yaml reads it).

    python tools/write_image_folder.py --out data/fashion_mnist_png [--per-class N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST
from torchvision.io import write_png
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import FashionMNISTDataModule  # noqa: E402


def folder_name(class_name: str) -> str:
    return class_name.replace("/", "_")  # "T-shirt/top" cannot be a folder name


def write_image_folder(root: str, out: Path, per_class: int | None = None) -> int:
    """Write the PNG folder (files already there are kept); returns the number of images in it."""
    FashionMNISTDataModule(root=root).prepare_data()
    written = 0
    for split, train in (("train", True), ("test", False)):
        data = FashionMNIST(root, train=train, download=False)
        counts = torch.zeros(len(data.classes), dtype=torch.long)
        for index in tqdm(range(len(data)), desc=f"writing {out / split}", unit="img", disable=None):
            label = int(data.targets[index])
            if per_class is not None and counts[label] >= per_class:
                continue
            counts[label] += 1
            path = out / split / folder_name(data.classes[label]) / f"{index:05d}.png"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png(data.data[index].unsqueeze(0), str(path))
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data", help="where FashionMNIST's files are (or go)")
    parser.add_argument("--out", default="data/fashion_mnist_png")
    parser.add_argument("--per-class", type=int, default=None, help="at most this many images per class and split")
    args = parser.parse_args()
    start = time.perf_counter()
    written = write_image_folder(args.root, Path(args.out), args.per_class)
    print(f"{written} PNG files under {args.out} ({time.perf_counter() - start:.1f} s)")

if __name__ == "__main__":
    main()
