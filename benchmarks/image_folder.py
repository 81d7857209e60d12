"""ImageFolderDataModule on a folder of FashionMNIST PNGs (``make data-folders``) against the built-in FashionMNIST.

Prints: the first run's decode throughput (cache removed first), the second run's start (listing, cache key,
cache load), and the training epoch time of the Baseline MLP (``train.py fit`` machinery, validation included)
with each datamodule, alternating built-in / folder epoch by epoch in one process, medians.

    python benchmarks/image_folder.py --root data/fashion_mnist_png --epochs 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from benchmarks.overhead import EpochTimer  # noqa: E402
from datamodules import ImageFolderDataModule  # noqa: E402
from datamodules.image_folder import CACHE_DIR  # noqa: E402


def start(root: str) -> tuple[float, ImageFolderDataModule]:
    began = time.perf_counter()
    data = ImageFolderDataModule(root=root, image_size=28, channels=1)
    data.setup("fit")
    return time.perf_counter() - began, data


def fit_epochs(config: str, extra: list[str], epochs: int, tmp: str) -> list[float]:
    cli = train.main(["--config", config, f"--trainer.max_epochs={epochs}", f"--trainer.logger.init_args.save_dir={tmp}",
                      "--trainer.enable_progress_bar=false", "--test_after_fit=false", *extra], run=False)
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/fashion_mnist_png")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fit; fits alternate built-in / folder")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from fit_epochs only
    shutil.rmtree(Path(args.root) / CACHE_DIR, ignore_errors=True)
    first, data = start(args.root)
    images = sum(len(x) for x, _ in data.splits.values())
    second, _ = start(args.root)
    print(f"images: {images:,} in {data.num_classes} classes under {args.root}")
    print(f"first run (decode + cache): {first:.1f} s, {images / first:,.0f} images/s")
    print(f"second run (cached): {second:.2f} s")
    builtin, folder = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            builtin += fit_epochs("configs/fashion_mnist/baseline.yaml", [], args.epochs, tmp)
            folder += fit_epochs("configs/fashion_mnist_png/baseline.yaml", [f"--data.init_args.root={args.root}"], args.epochs, tmp)
    b, f = statistics.median(builtin), statistics.median(folder)
    print(f"epoch, built-in FashionMNIST: {b:.2f} s  (epochs: {', '.join(f'{t:.2f}' for t in builtin)})")
    print(f"epoch, image folder        : {f:.2f} s  (epochs: {', '.join(f'{t:.2f}' for t in folder)})")
    print(f"ratio (folder / built-in): {f / b:.3f}")


if __name__ == "__main__":
    main()
