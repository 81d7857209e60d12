"""Write real data as local Hugging Face datasets (``save_to_disk``) for ``datamodules.HFImageDataModule`` and
``HFTextDataModule`` (``make data-folders``): FashionMNIST with an ``Image`` and a ``ClassLabel`` column, and the
rt-snippets sentences (datamodules/sst2.py) with a ``sentence`` and a ``ClassLabel`` column.

    python tools/write_hf_datasets.py --out data/hf [--limit N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import datasets
from PIL import Image
from torchvision.datasets import FashionMNIST

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import FashionMNISTDataModule  # noqa: E402
from datamodules.sst2 import RT_FILE, fetch_rt_snippets, read_rt_snippets  # noqa: E402

SENTIMENT = ["negative", "positive"]


def write_fashion(root: str, out: Path, limit: int | None = None) -> Path:
    """FashionMNIST's train and test splits (the first ``limit`` images of each) as a DatasetDict at ``out``."""
    if (out / "dataset_dict.json").is_file():
        return out
    FashionMNISTDataModule(root=root).prepare_data()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FashionMNIST.classes)})
    splits = {}
    for name in ("train", "test"):
        data = FashionMNIST(root, train=name == "train", download=False)
        n = len(data) if limit is None else min(limit, len(data))
        rows = {"image": [Image.fromarray(data.data[i].numpy()) for i in range(n)], "label": data.targets[:n].tolist()}
        splits[name] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


def write_sentences(root: str, out: Path, limit: int | None = None) -> Path:
    """The labelled rt-snippets sentences (the first ``limit``) as one ``train`` Dataset at ``out``."""
    if (out / "dataset_info.json").is_file():
        return out
    path = Path(root) / "rt-snippets" / RT_FILE
    if not path.is_file():
        fetch_rt_snippets(path)
    texts, labels = read_rt_snippets(path)
    n = len(texts) if limit is None else min(limit, len(texts))
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=SENTIMENT)})
    datasets.Dataset.from_dict({"sentence": texts[:n], "label": labels[:n].tolist()}, features=features).save_to_disk(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data")
    parser.add_argument("--out", default="data/hf")
    parser.add_argument("--limit", type=int, default=None, help="at most this many rows per split")
    args = parser.parse_args()
    out = Path(args.out)
    print(write_fashion(args.root, out / "fashion_mnist", args.limit), write_sentences(args.root, out / "rt_snippets", args.limit))


if __name__ == "__main__":
    main()
